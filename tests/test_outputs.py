"""Outputs never destroy an input, replace an old output atomically, and a full disk is a typed
error with nothing partial left (`delta_format.io.staging`)."""

from __future__ import annotations

import errno
import subprocess

import pytest

import delta_format
from delta_format import InvalidArgumentError, OutputError
from delta_format.cli import main
from delta_format.io import staging
from delta_format.io.delta import Delta
from delta_format.loaders.apply import apply_delta
from tests.models import save, structured_perturbation, tiny_llama


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    base = tiny_llama()
    save(base, root / "base")
    save(structured_perturbation(base, 0.05, seed=1), root / "ft")
    delta_format.compress(root / "base", root / "ft", root / "delta", method="sign", progress=False)
    return root


def compress(pair, out, **kwargs):
    return delta_format.compress(pair / "base", pair / "ft", out, method="sign", progress=False, **kwargs)


def snapshot(directory):
    return sorted((p.relative_to(directory).as_posix(), p.read_bytes()) for p in directory.rglob("*") if p.is_file())


@pytest.mark.parametrize("out", ["base", "ft", ".", "base/inside"])
def test_compress_refuses_an_output_that_is_contains_or_lies_inside_an_input(pair, out):
    before = snapshot(pair / "base"), snapshot(pair / "ft")
    with pytest.raises(InvalidArgumentError, match="overlaps an input"):
        compress(pair, pair / out, overwrite=True)
    assert (snapshot(pair / "base"), snapshot(pair / "ft")) == before


@pytest.mark.parametrize("out", ["base", "delta", "delta/full"])
def test_apply_refuses_an_output_that_overlaps_the_delta_or_the_base(pair, out):
    with pytest.raises(InvalidArgumentError, match="overlaps an input"):
        apply_delta(pair / "delta", pair / out, overwrite=True)
    assert (pair / "base" / "model.safetensors").is_file() and (pair / "delta" / "delta_config.json").is_file()


def test_save_pretrained_refuses_to_overwrite_its_own_directory(pair):
    with pytest.raises(InvalidArgumentError, match="overlaps an input"):
        Delta(pair / "delta").save_pretrained(pair / "delta", overwrite=True)


def test_rename_exchange_swaps_two_directories_atomically(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    if not staging._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (tmp_path / "b" / "x").read_text() == "a" and not (tmp_path / "a" / "x").exists()


def test_overwrite_leaves_no_hidden_directory_behind(pair, tmp_path):
    compress(pair, tmp_path / "d")
    compress(pair, tmp_path / "d", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_an_overwrite_interrupted_between_two_renames_is_recovered_on_the_next_call(pair, tmp_path, monkeypatch):
    out = tmp_path / "d"
    compress(pair, out)
    before = snapshot(out)
    real_replace = staging.os.replace

    def dying_replace(src, dst):
        if str(src).rsplit("/", 1)[-1].startswith(".d.partial-"):
            raise KeyboardInterrupt  # the process dies between the two renames
        return real_replace(src, dst)

    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    monkeypatch.setattr(staging.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        compress(pair, out, overwrite=True)
    monkeypatch.undo()
    assert not out.exists()  # the old output waits in a hidden sibling
    with pytest.raises(delta_format.OutputExistsError):
        compress(pair, out)  # the next call puts it back first, then refuses to overwrite it
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_compress_is_an_output_error_and_leaves_nothing(pair, tmp_path, monkeypatch):
    monkeypatch.setattr("delta_format.io.checksums.save_file", no_space)
    monkeypatch.setattr("delta_format.io.shards.save_file", no_space)
    with pytest.raises(OutputError, match="no space left"):
        compress(pair, tmp_path / "d")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_apply_is_an_output_error_and_leaves_nothing(pair, tmp_path, monkeypatch):
    monkeypatch.setattr("delta_format.io.shards.save_file", no_space)
    with pytest.raises(OutputError, match="no space left"):
        apply_delta(pair / "delta", tmp_path / "full")
    assert list(tmp_path.iterdir()) == []


def test_an_output_under_a_file_is_an_output_error(pair, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        compress(pair, tmp_path / "file" / "d")


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_is_one_error_line_from_the_cli(pair, tiny_disk, capsys):
    assert main(["compress", str(pair / "base"), str(pair / "ft"), str(tiny_disk / "d"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left" in err and "Traceback" not in err
    assert list(tiny_disk.iterdir()) == []
