"""Hostile inputs not covered elsewhere: kills mid-write, oversized files and shapes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from delta_format import CorruptDeltaError, ManifestError
from delta_format.io.reader import DeltaReader
from tests.models import save, structured_perturbation, tiny_llama

ROOT = Path(__file__).resolve().parents[1]

KILL_AFTER_THIRD_WRITE = """
import os, signal, sys
import safetensors.torch
import delta_format, delta_format.io.checksums, delta_format.io.shards, delta_format.loaders.apply
calls = [0]
real = safetensors.torch.save_file
def dying_save_file(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup handler can run
    return real(*args, **kwargs)
delta_format.io.checksums.save_file = dying_save_file
delta_format.io.shards.save_file = dying_save_file
{action}
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base = tiny_llama()
    save(base, root / "base")
    save(structured_perturbation(base, 0.05, seed=1), root / "ft")
    return root


def run_killed(action: str) -> int:
    code = KILL_AFTER_THIRD_WRITE.format(action=textwrap.dedent(action))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=300).returncode


def test_compress_killed_mid_write_leaves_no_output_directory(pair, tmp_path):
    out = tmp_path / "delta"
    rc = run_killed(
        f"delta_format.compress({str(pair / 'base')!r}, {str(pair / 'ft')!r}, {str(out)!r}, "
        "method='dense', max_shard_size=20_000, progress=False)"
    )
    assert rc == -9
    assert not out.exists()
    assert not any(p.name == "delta" for p in tmp_path.iterdir())


def test_apply_killed_mid_write_leaves_no_output_directory(pair, tmp_path):
    import delta_format

    delta = delta_format.compress(pair / "base", pair / "ft", tmp_path / "delta", method="dense", progress=False)
    out = tmp_path / "full"
    rc = run_killed(
        f"delta_format.loaders.apply.apply_delta({str(delta.directory)!r}, {str(out)!r}, max_shard_size=20_000)"
    )
    assert rc == -9
    assert not out.exists()


def test_killed_compress_never_replaces_an_existing_output(pair, tmp_path):
    import delta_format

    out = tmp_path / "delta"
    delta_format.compress(pair / "base", pair / "ft", out, method="sign", progress=False)
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    rc = run_killed(
        f"delta_format.compress({str(pair / 'base')!r}, {str(pair / 'ft')!r}, {str(out)!r}, "
        "method='dense', max_shard_size=20_000, progress=False, overwrite=True)"
    )
    assert rc == -9
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before


def _small_delta(pair, tmp_path):
    import delta_format

    return delta_format.compress(
        pair / "base", pair / "ft", tmp_path / "delta", method="sign", progress=False
    ).directory


def test_oversized_manifest_is_refused_without_reading_it(pair, tmp_path):
    directory = _small_delta(pair, tmp_path)
    with open(directory / "delta_config.json", "r+b") as f:
        f.truncate(65 * 1024 * 1024)  # sparse file: costs no disk
    with pytest.raises(ManifestError, match="too large"):
        DeltaReader(directory)


def test_safetensors_header_length_beyond_the_file_is_refused(pair, tmp_path):
    directory = _small_delta(pair, tmp_path)
    path = directory / "delta.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = (200 * 1024 * 1024).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    manifest = json.loads((directory / "delta_config.json").read_text())
    manifest["files"]["delta.safetensors"]["sha256"] = __import__("hashlib").sha256(bytes(data)).hexdigest()
    (directory / "delta_config.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptDeltaError):
        DeltaReader(directory)


def test_declared_shape_whose_element_count_overflows_is_refused(pair, tmp_path):
    directory = _small_delta(pair, tmp_path)
    manifest = json.loads((directory / "delta_config.json").read_text())
    name = next(iter(manifest["tensors"]))
    manifest["tensors"][name]["shape"] = [2**31, 2**31, 2**31]
    (directory / "delta_config.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="too large"):
        DeltaReader(directory)
