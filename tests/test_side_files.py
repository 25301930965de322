"""Side files (config, tokenizer, files in folders) are part of the delta: listed in the manifest
with size and SHA-256, checked before use, and nothing outside the delta can leak out through a
symlink or a file the manifest does not vouch for (SPEC §3.5, §8.5)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from delta_format import CorruptDeltaError, InvalidArgumentError, ManifestError, UnsafePathError
from delta_format.core.encodings import DenseEncoding
from delta_format.core.manifest import BaseReference, TensorEntry
from delta_format.io.delta import Delta
from delta_format.io.reader import DeltaReader
from delta_format.io.writer import DeltaWriter
from delta_format.loaders.apply import apply_delta, verify_delta

SECRET = b"the user's private key\n"

pytestmark = pytest.mark.filterwarnings("ignore:the delta records no base fingerprint")


def write_delta(out: Path, base_dir: Path | None = None, side: dict[str, bytes] | None = None) -> Path:
    ref = BaseReference(local_path=str(base_dir) if base_dir else None)
    with DeltaWriter(out, base=ref, method="dense") as w:
        w.add("w", TensorEntry(DenseEncoding(), (2, 3), "float32"), {"delta": torch.ones(2, 3)})
        for name, content in (side or {"config.json": b'{"model_type": "llama"}'}).items():
            w.add_file(name, content)
    return out


@pytest.fixture
def base_dir(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_file({"w": torch.zeros(2, 3)}, str(base / "model.safetensors"))
    return base


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_bytes(SECRET)
    return path


def test_side_files_in_folders_are_listed_with_size_and_sha256(tmp_path):
    out = write_delta(tmp_path / "d", side={"config.json": b"{}", "1_Pooling/config.json": b'{"x": 1}'})
    files = json.loads((out / "delta_config.json").read_text())["files"]
    assert files["1_Pooling/config.json"]["size"] == 8 and len(files["1_Pooling/config.json"]["sha256"]) == 64
    assert "config.json" in files
    names = {p.relative_to(out).as_posix() for p in Delta(out).files()}
    assert names == {"delta_config.json", "delta.safetensors", "config.json", "1_Pooling/config.json"}


def test_the_model_card_is_not_listed_so_it_can_be_rewritten(tmp_path):
    out = write_delta(tmp_path / "d", side={"README.md": b"# card\n"})
    assert "README.md" not in json.loads((out / "delta_config.json").read_text())["files"]
    (out / "README.md").write_text("edited on the Hub")
    assert (out / "README.md") in Delta(out).files()


@pytest.mark.parametrize("name", ["../x.json", "/abs.json", "a//b.json", "a/../b.json", ".hidden", "a\\b", ""])
def test_add_file_refuses_paths_that_leave_the_delta(tmp_path, name):
    with DeltaWriter(tmp_path / "d", base=BaseReference(), method="dense") as w:
        with pytest.raises(InvalidArgumentError):
            w.add_file(name, b"{}")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("name", ["delta_config.json", "delta.safetensors", "delta.safetensors.index.json"])
def test_add_file_refuses_the_names_the_writer_uses(tmp_path, name):
    with DeltaWriter(tmp_path / "d", base=BaseReference(), method="dense") as w:
        with pytest.raises(InvalidArgumentError):
            w.add_file(name, b"{}")


def test_add_file_refuses_a_symlink_source(tmp_path, secret):
    link = tmp_path / "config.json"
    link.symlink_to(secret)
    with DeltaWriter(tmp_path / "d", base=BaseReference(), method="dense") as w:
        with pytest.raises(InvalidArgumentError, match="symlink"):
            w.add_file("config.json", link)


def test_add_file_refuses_a_source_that_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with DeltaWriter(tmp_path / "d", base=BaseReference(), method="dense") as w:
        with pytest.raises(InvalidArgumentError, match="regular"):
            w.add_file("config.json", fifo)


def test_an_altered_side_file_is_refused_on_opening(tmp_path):
    out = write_delta(tmp_path / "d")
    (out / "config.json").write_text('{"model_type": "llamb"}')
    with pytest.raises(CorruptDeltaError, match="config.json"):
        DeltaReader(out)


def test_a_listed_side_file_that_is_a_symlink_outside_is_refused(tmp_path, secret):
    out = write_delta(tmp_path / "d", side={"tokenizer.json": SECRET})
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").symlink_to(secret)  # same bytes: size and hash match
    with pytest.raises(UnsafePathError):
        DeltaReader(out)
    report = verify_delta(out)
    assert not report.ok


def test_a_listed_side_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    out = write_delta(tmp_path / "d")
    (out / "config.json").unlink()
    os.mkfifo(out / "config.json")
    with pytest.raises(UnsafePathError, match="regular"):
        DeltaReader(out)


def test_a_symlink_loop_as_a_shard_is_an_unsafe_path(tmp_path):
    out = write_delta(tmp_path / "d")
    (out / "delta.safetensors").unlink()
    (out / "delta.safetensors").symlink_to(out / "delta.safetensors")
    with pytest.raises(UnsafePathError):
        DeltaReader(out)


def test_a_symlinked_folder_is_refused_even_inside_the_delta(tmp_path):
    out = write_delta(tmp_path / "d", side={"sub/config.json": b"{}"})
    (out / "real").mkdir()
    (out / "sub").rename(out / "real" / "sub")
    (out / "sub").symlink_to(out / "real" / "sub")
    with pytest.raises(UnsafePathError):
        DeltaReader(out)


def test_a_model_card_symlinked_outside_is_never_copied(tmp_path, secret):
    out = write_delta(tmp_path / "d")
    (out / "README.md").symlink_to(secret)
    with pytest.raises(UnsafePathError):
        Delta(out).save_pretrained(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_files_the_manifest_does_not_list_are_not_part_of_the_delta(tmp_path, base_dir, secret):
    out = write_delta(tmp_path / "d", base_dir)
    (out / "notes.txt").symlink_to(secret)
    (out / "extra.json").write_text("{}")
    assert {p.name for p in Delta(out).files()} == {"delta_config.json", "delta.safetensors", "config.json"}
    saved = Delta(out).save_pretrained(tmp_path / "copy").directory
    assert not (saved / "notes.txt").exists() and not (saved / "extra.json").exists()
    full = apply_delta(out, tmp_path / "full", base_model=base_dir)
    assert sorted(p.name for p in full.iterdir()) == ["config.json", "model.safetensors"]


def test_apply_and_save_pretrained_copy_side_files_in_folders(tmp_path, base_dir):
    out = write_delta(tmp_path / "d", base_dir, side={"config.json": b"{}", "1_Pooling/config.json": b"{}"})
    assert (Delta(out).save_pretrained(tmp_path / "copy").directory / "1_Pooling" / "config.json").is_file()
    assert (apply_delta(out, tmp_path / "full", base_model=base_dir) / "1_Pooling" / "config.json").is_file()


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "a/./b", ".git/config", "delta_config.json"])
def test_manifest_files_with_unsafe_names_are_refused(tmp_path, name):
    out = write_delta(tmp_path / "d")
    manifest = json.loads((out / "delta_config.json").read_text())
    manifest["files"][name] = {"size": 0, "sha256": "0" * 64}
    (out / "delta_config.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="unsafe"):
        DeltaReader(out)
