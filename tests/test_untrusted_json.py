"""Untrusted JSON (manifest, index) is parsed by the spec's rules or refused with a typed error,
and opening a manifest costs time linear in its bytes (SPEC §3, §8.9, §8.10)."""

from __future__ import annotations

import json
import time

import pytest

from delta_format.core import seeded_mask
from delta_format.core.constants import MAX_SEEDED_DROP_THRESHOLD, MAX_SEEDED_GAP_TABLE
from delta_format.core.manifest import Manifest
from delta_format.errors import InvalidArgumentError, ManifestError
from delta_format.io.reader import DeltaReader
from tests import spec_reference
from tests.test_reader_writer import write

HOSTILE_JSON = {
    "a number that overflows to infinity": b'{"format": "delta-format", "x": 1e400}',
    "a negative one": b'{"format": "delta-format", "x": -2e308}',
    "a 5000-digit integer": b'{"format": "delta-format", "x": ' + b"9" * 5000 + b"}",
    "a 400-digit float": b'{"format": "delta-format", "x": 1' + b"0" * 400 + b".5}",
    "NaN": b'{"format": "delta-format", "x": NaN}',
    "a duplicate key": b'{"format": "delta-format", "format": "delta-format"}',
    "200,000 levels of nesting": b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    "a lone surrogate": b'{"format": "delta-format", "method": {"name": "\\ud800"}}',
    "invalid UTF-8": b'{"format": "\xff"}',
}


@pytest.mark.parametrize("raw", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
def test_hostile_json_in_the_manifest_is_a_manifest_error(raw):
    with pytest.raises(ManifestError):
        Manifest.from_json_bytes(raw)


@pytest.mark.parametrize("raw", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
def test_hostile_json_in_the_index_is_a_manifest_error(tmp_path, raw):
    out = tmp_path / "d"
    write(out, max_shard_size=300)
    (out / "delta.safetensors.index.json").write_bytes(raw)
    manifest = json.loads((out / "delta_config.json").read_text())
    del manifest["files"]["delta.safetensors.index.json"]  # so the parser, not the checksum, sees it
    (out / "delta_config.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError):
        DeltaReader(out)


def test_paired_surrogates_strings_with_brackets_and_tiny_numbers_are_valid():
    raw = b'{"a": "\\ud83d\\ude00", "b": "[[[\\"{{", "c": 1e-400, "d": 1.7976931348623157e308, "e": "1e999"}'
    from delta_format.core.strict_json import loads_strict

    assert loads_strict(raw, "x") == {"a": "😀", "b": '[[["{{', "c": 0.0, "d": 1.7976931348623157e308, "e": "1e999"}


@pytest.mark.parametrize("field", ["rel_error", "compression_ratio", "stored_bytes"])
def test_non_numeric_stats_are_refused(tmp_path, field):
    out = tmp_path / "d"
    write(out)
    manifest = json.loads((out / "delta_config.json").read_text())
    manifest["stats"] = {field: "lots"}
    with pytest.raises(ManifestError, match=field):
        Manifest.from_dict(manifest)


@pytest.mark.parametrize("repo_id", ["../../etc", "a/b/c", "x--y/z", "a b", "-x/y", "x" * 200])
def test_a_base_repo_id_that_is_not_a_hub_id_is_refused(tmp_path, repo_id):
    out = tmp_path / "d"
    write(out)
    manifest = json.loads((out / "delta_config.json").read_text())
    manifest["base"]["repo_id"] = repo_id
    with pytest.raises(ManifestError, match="repo_id"):
        Manifest.from_dict(manifest)


def test_the_drop_threshold_limit_is_exactly_where_the_gap_table_outgrows_the_spec():
    at_limit = MAX_SEEDED_DROP_THRESHOLD / 2**32  # exact in binary64
    beyond = (MAX_SEEDED_DROP_THRESHOLD + 1) / 2**32
    assert len(spec_reference.gap_table(at_limit)) <= MAX_SEEDED_GAP_TABLE < len(spec_reference.gap_table(beyond))
    assert len(seeded_mask.gap_table(at_limit)) == len(spec_reference.gap_table(at_limit))
    with pytest.raises(InvalidArgumentError):
        seeded_mask.check_gap_table(beyond)


def seeded_manifest(count: int, p_of) -> bytes:
    entry = lambda i: {  # noqa: E731
        "encoding": "sparse",
        "config": {"index_coding": "seeded", "seed": i, "p": p_of(i), "scale": 1.0},
        "shape": [4, 4],
        "dtype": "float32",
    }
    manifest = {
        "format": "delta-format",
        "spec_version": "1.1",
        "base": {},
        "method": {"name": "dare"},
        "tensors": {f"t{i}": entry(i) for i in range(count)},
        "files": {},
    }
    return json.dumps(manifest).encode()


def test_thousands_of_seeded_entries_with_distinct_p_open_in_linear_time():
    # Each p needs a gap table of about 2**18 steps: ~30 ms each if computed, a minute for 2000.
    raw = seeded_manifest(2000, lambda i: 0.99995 - i * 1e-12)
    start = time.perf_counter()
    manifest = Manifest.from_json_bytes(raw)
    assert time.perf_counter() - start < 5.0
    assert len(manifest.tensors) == 2000


def test_a_seeded_p_beyond_the_limit_is_refused_on_opening():
    with pytest.raises(ManifestError, match="seeded"):
        Manifest.from_json_bytes(seeded_manifest(3, lambda i: 0.99999))
