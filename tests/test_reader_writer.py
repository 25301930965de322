"""Writing and reading delta directories (SPEC §2-§4, §8) and putting deltas on bases (§9).

Corruption tests edit one thing and, where the file's recorded size and SHA-256 (§3.5) would
otherwise catch it first, record the edited file's new size and hash, so that each test reaches
the check it is named for."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from delta_format.core.encodings import DenseEncoding, LowRankEncoding, ReplaceEncoding, SignEncoding, SparseEncoding
from delta_format.core.manifest import BaseReference, TensorEntry
from delta_format.core.reconstruct import reconstruct
from delta_format.errors import (
    BaseMismatchError,
    CorruptDeltaError,
    InvalidArgumentError,
    ManifestError,
    NumericalError,
    OutputExistsError,
    UnknownEncodingError,
    UnsafePathError,
    UnsupportedVersionError,
)
from delta_format.io.reader import DeltaReader
from delta_format.io.writer import DeltaWriter

REF = BaseReference(repo_id="org/base", revision="0123456789abcdef0123456789abcdef01234567")


def tensor(shape, seed=0, dtype=torch.float32):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.01).to(dtype)


def params() -> dict[str, tuple[TensorEntry, dict[str, torch.Tensor]]]:
    """One parameter per encoding and index coding; about 2.3 KB stored in all."""
    d = tensor((8, 10), 1)
    seeded = SparseEncoding("seeded", scale=10.0, seed=2**40 + 1, p=0.9)
    sign = SignEncoding("row")
    lowrank = LowRankEncoding(2)
    idx = torch.tensor([0, 5, 17, 79])
    return {
        "dense.w": (TensorEntry(DenseEncoding(), (8, 10), "float32"), DenseEncoding().encode(d)),
        "gaps.w": (
            TensorEntry(SparseEncoding("gaps", 2.0), (8, 10), "float32"),
            SparseEncoding("gaps", 2.0).encode(d, name="gaps.w", positions=idx),
        ),
        "mask.w": (
            TensorEntry(SparseEncoding("bitmask"), (8, 10), "float16"),
            SparseEncoding("bitmask").encode(d, name="mask.w", positions=idx, dtype=torch.float16),
        ),
        "seeded.w": (
            TensorEntry(seeded, (30, 30), "bfloat16"),
            seeded.encode(tensor((30, 30), 2), name="seeded.w", dtype=torch.bfloat16),
        ),
        "sign.w": (TensorEntry(sign, (5, 13), "float32", alpha=1.5), sign.encode(tensor((5, 13), 3))),
        "lowrank.w": (TensorEntry(lowrank, (8, 10), "float32"), lowrank.encode(d)),
        "new.head": (TensorEntry(ReplaceEncoding(), (3, 4), "float32"), ReplaceEncoding().encode(tensor((3, 4), 4))),
    }


def write(out: Path, max_shard_size=2**30, **kwargs) -> dict:
    content = params()
    with DeltaWriter(
        out, base=REF, method="mixed", method_params={"k": 1}, max_shard_size=max_shard_size, **kwargs
    ) as w:
        for name, (entry, stored) in content.items():
            w.add(name, entry, stored)
    return content


@pytest.fixture
def delta(tmp_path) -> Path:
    out = tmp_path / "delta"
    write(out)
    return out


def manifest(directory: Path) -> dict:
    return json.loads((directory / "delta_config.json").read_text())


def save_manifest(directory: Path, data: dict) -> None:
    (directory / "delta_config.json").write_text(json.dumps(data))


def rerecord(directory: Path, file: str) -> None:
    """Record an edited tensor file's size and SHA-256 so the §3.5 check passes."""
    data = manifest(directory)
    raw = (directory / file).read_bytes()
    data["files"][file] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    save_manifest(directory, data)


def replace_stored(directory: Path, updates: dict[str, torch.Tensor | None]) -> None:
    """Rewrite delta.safetensors with some stored tensors replaced (None removes one)."""
    path = directory / "delta.safetensors"
    tensors = load_file(path)
    for key, value in updates.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    save_file(tensors, str(path), metadata={"format": "pt"})
    rerecord(directory, "delta.safetensors")


def decode_all(directory: Path) -> None:
    with DeltaReader(directory) as reader:
        for name in reader:
            reader.decode(name)


# --- round trips -----------------------------------------------------------------------------


def test_round_trip_returns_every_stored_tensor_and_entry(delta):
    content = params()
    with DeltaReader(delta) as reader:
        assert list(reader) == list(content)
        assert (
            reader.manifest.base == REF
            and reader.manifest.method == "mixed"
            and reader.manifest.method_params == {"k": 1}
        )
        for name, (entry, stored) in content.items():
            got = reader.entry(name)
            assert (got.encoding, got.shape, got.dtype, got.alpha) == (
                entry.encoding,
                entry.shape,
                entry.dtype,
                entry.alpha,
            )
            read = reader.stored(name)
            assert read.keys() == stored.keys()
            for role in stored:
                assert read[role].dtype == stored[role].dtype and torch.equal(read[role], stored[role]), (name, role)


def test_stored_bytes_are_recorded_per_parameter_and_summed(delta):
    content = params()
    with DeltaReader(delta) as reader:
        for name, (_, stored) in content.items():
            want = sum(t.numel() * t.element_size() for t in stored.values())
            assert reader.entry(name).stats["stored_bytes"] == want
        assert reader.stored_bytes() == sum(
            t.numel() * t.element_size() for _, s in content.values() for t in s.values()
        )


def test_a_delta_that_fits_is_one_file_without_index(delta):
    names = sorted(p.name for p in delta.iterdir())
    assert names == ["delta.safetensors", "delta_config.json"]
    raw = (delta / "delta.safetensors").read_bytes()
    assert manifest(delta)["files"] == {
        "delta.safetensors": {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    }


@pytest.mark.parametrize(
    "tensors",
    [
        {},
        {
            "w:values": torch.randn(9).to(torch.bfloat16),
            "w:gaps": torch.arange(9, dtype=torch.uint8),
            "v:mask": torch.ones(3, dtype=torch.uint8),
            "b:delta": torch.randn(3, 4),
            'é"q\\\n:value': torch.zeros(0),
            "h:value": torch.randn(5).half(),
            "g:value": torch.randn(2).double(),
            "u:gaps": torch.arange(4).to(torch.uint16),
            "i:gaps": torch.arange(4, dtype=torch.int32),
            "l:gaps": torch.arange(3, dtype=torch.int64),
        },
    ],
)
def test_shards_are_hashed_while_written_with_the_bytes_safetensors_writes(tmp_path, tensors):
    from delta_format.io.checksums import file_sha256, save_hashed

    # The hash comes from memory, for the header safetensors is expected to write; it must be
    # computed (not left to the file-reading fallback) and equal the file's.
    assert save_hashed(tensors, tmp_path / "s.safetensors") == file_sha256(tmp_path / "s.safetensors")


def test_small_shard_size_writes_several_shards_and_an_index(tmp_path):
    out = tmp_path / "delta"
    content = write(out, max_shard_size=300)
    index = json.loads((out / "delta.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert shards == [f"delta-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    assert not (out / "delta.safetensors").exists()
    assert sorted(manifest(out)["files"]) == sorted([*shards, "delta.safetensors.index.json"])
    assert index["metadata"]["total_size"] == sum((out / s).stat().st_size for s in shards)
    with DeltaReader(out) as reader:
        assert set(index["weight_map"]) == {f"{n}:{r}" for n, (_, s) in content.items() for r in s}
        for name, (_, stored) in content.items():
            assert all(torch.equal(reader.stored(name)[r], stored[r]) for r in stored)


def test_empty_delta_is_valid(tmp_path):
    with DeltaWriter(tmp_path / "d", base=REF, method="dense"):
        pass
    with DeltaReader(tmp_path / "d") as reader:
        assert list(reader) == [] and reader.stored_bytes() == 0


def test_side_files_are_copied_and_must_be_plain_names(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama"}')
    with DeltaWriter(tmp_path / "d", base=REF, method="dense") as w:
        w.add_file("config.json", config)
        w.add_file("README.md", b"# card\n")
        with pytest.raises(InvalidArgumentError):
            w.add_file("../escape.json", b"{}")
    assert (tmp_path / "d" / "config.json").read_text() == '{"model_type": "llama"}'
    assert (tmp_path / "d" / "README.md").read_bytes() == b"# card\n"
    assert not (tmp_path / "escape.json").exists()


def test_writer_refuses_roles_that_do_not_match_the_encoding(tmp_path):
    with DeltaWriter(tmp_path / "d", base=REF, method="dense") as w:
        with pytest.raises(CorruptDeltaError):
            w.add("w", TensorEntry(DenseEncoding(), (2,), "float32"), {"value": torch.ones(2)})
        with pytest.raises(CorruptDeltaError):
            w.add("w", TensorEntry(DenseEncoding(), (2,), "float32"), {"delta": torch.ones(3)})


# --- atomic publishing -----------------------------------------------------------------------


def test_exception_inside_the_writer_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with DeltaWriter(tmp_path / "d", base=REF, method="dense", max_shard_size=10) as w:
            w.add("w", TensorEntry(DenseEncoding(), (8,), "float32"), {"delta": torch.ones(8)})  # flushed a shard
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_without_overwrite(delta):
    before = manifest(delta)
    with pytest.raises(OutputExistsError):
        DeltaWriter(delta, base=REF, method="dense")
    assert manifest(delta) == before


def test_overwrite_replaces_the_old_delta_only_once_the_new_one_is_complete(delta):
    old = manifest(delta)
    w = DeltaWriter(delta, base=REF, method="other", overwrite=True)
    w.add("w", TensorEntry(DenseEncoding(), (2,), "float32"), {"delta": torch.ones(2)})
    assert manifest(delta) == old  # still the old delta while the new one is being written
    DeltaReader(delta)
    w.close()
    assert manifest(delta)["method"]["name"] == "other"
    assert sorted(p.name for p in delta.parent.iterdir()) == ["delta"]


def test_failed_overwrite_keeps_the_old_delta(delta):
    old = manifest(delta)
    with pytest.raises(RuntimeError):
        with DeltaWriter(delta, base=REF, method="other", overwrite=True):
            raise RuntimeError("interrupted")
    assert manifest(delta) == old
    assert sorted(p.name for p in delta.parent.iterdir()) == ["delta"]


# --- manifest errors -------------------------------------------------------------------------


def test_missing_manifest_is_a_manifest_error(delta):
    (delta / "delta_config.json").unlink()
    with pytest.raises(ManifestError, match="delta_config.json"):
        DeltaReader(delta)


def test_newer_major_version_asks_to_upgrade(delta):
    data = manifest(delta)
    data["spec_version"] = "2.0"
    save_manifest(delta, data)
    with pytest.raises(UnsupportedVersionError, match="upgrade") as info:
        DeltaReader(delta)
    assert "2.0" in str(info.value)


def test_newer_minor_version_is_read(delta):
    data = manifest(delta)
    data["spec_version"] = "1.9"
    data["added_in_1_9"] = {"anything": True}
    save_manifest(delta, data)
    decode_all(delta)


@pytest.mark.parametrize("version", ["1", "1.0.0", "v1.0", 1.0, None, "01.0"])
def test_malformed_version_is_a_manifest_error(delta, version):
    data = manifest(delta)
    data["spec_version"] = version
    save_manifest(delta, data)
    with pytest.raises(ManifestError, match="spec_version"):
        DeltaReader(delta)


def test_unknown_encoding_is_refused(delta):
    data = manifest(delta)
    data["tensors"]["dense.w"]["encoding"] = "zstd"
    save_manifest(delta, data)
    with pytest.raises(UnknownEncodingError, match="zstd"):
        DeltaReader(delta)


def test_base_revision_must_be_a_commit(delta):
    data = manifest(delta)
    data["base"]["revision"] = "main"
    save_manifest(delta, data)
    with pytest.raises(ManifestError, match="revision"):
        DeltaReader(delta)


def test_nan_in_the_manifest_is_refused(delta):
    text = (delta / "delta_config.json").read_text().replace('"alpha": 1.5', '"alpha": NaN')
    (delta / "delta_config.json").write_text(text)
    with pytest.raises(ManifestError):
        DeltaReader(delta)


# --- paths -----------------------------------------------------------------------------------


def shard(tmp_path) -> Path:
    out = tmp_path / "delta"
    write(out, max_shard_size=300)
    return out


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""])
def test_index_naming_a_file_outside_is_unsafe(tmp_path, name):
    out = shard(tmp_path)
    (tmp_path / "x.safetensors").write_bytes((out / "delta-00001-of-00003.safetensors").read_bytes())
    index = json.loads((out / "delta.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = name
    (out / "delta.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafePathError):
        DeltaReader(out)


def test_symlink_pointing_outside_is_unsafe(tmp_path, delta):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(delta / "delta.safetensors", outside)
    os.symlink(outside, delta / "delta.safetensors")
    with pytest.raises(UnsafePathError, match="outside"):
        DeltaReader(delta)


def test_manifest_symlink_pointing_outside_is_unsafe(tmp_path, delta):
    outside = tmp_path / "manifest.json"
    shutil.move(delta / "delta_config.json", outside)
    os.symlink(outside, delta / "delta_config.json")
    with pytest.raises(UnsafePathError):
        DeltaReader(delta)


def test_hub_cache_symlinks_into_blobs_are_allowed(tmp_path, delta):
    # huggingface_hub's layout: snapshots/<commit>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--org--delta"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in delta.iterdir():
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / blob)
        os.symlink(f"../../blobs/{blob}", snapshot / file.name)
    decode_all(snapshot)


# --- stored tensors --------------------------------------------------------------------------


def test_truncated_shard_fails_its_recorded_size(tmp_path):
    out = shard(tmp_path)
    path = out / "delta-00002-of-00003.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptDeltaError, match="wrong size"):
        DeltaReader(out)


def test_truncated_file_with_a_matching_record_fails_safetensors_checks(delta):
    path = delta / "delta.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    rerecord(delta, "delta.safetensors")
    with pytest.raises(CorruptDeltaError, match="safetensors"):
        DeltaReader(delta)


def test_flipped_byte_fails_the_checksum(delta):
    path = delta / "delta.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptDeltaError, match="checksum"):
        DeltaReader(delta)


def test_tensor_file_not_listed_in_the_manifest_is_refused(delta):
    data = manifest(delta)
    data["files"] = {}
    save_manifest(delta, data)
    with pytest.raises(CorruptDeltaError, match="not listed"):
        DeltaReader(delta)


def test_header_dtype_disagreeing_with_the_manifest_is_refused(delta):
    replace_stored(delta, {"sign.w:bits": load_file(delta / "delta.safetensors")["sign.w:bits"].to(torch.int32)})
    with pytest.raises(CorruptDeltaError, match="wrong dtype"):
        DeltaReader(delta)


def test_header_shape_disagreeing_with_the_manifest_is_refused(delta):
    replace_stored(delta, {"dense.w:delta": torch.zeros(10, 8)})
    with pytest.raises(CorruptDeltaError, match="wrong shape"):
        DeltaReader(delta)


def test_missing_stored_tensor_is_refused(delta):
    replace_stored(delta, {"lowrank.w:v": None})
    with pytest.raises(CorruptDeltaError, match="missing"):
        DeltaReader(delta)


def test_extra_stored_tensor_is_refused(delta):
    replace_stored(delta, {"dense.w:scale": torch.ones(1)})
    with pytest.raises(CorruptDeltaError, match="unexpected"):
        DeltaReader(delta)


def decode_one(delta: Path, name: str):
    with DeltaReader(delta) as reader:
        return reader.decode(name)


@pytest.mark.parametrize(
    "gaps,match",
    [
        (torch.tensor([0, -1, 3, 1], dtype=torch.int32), "negative"),
        (torch.tensor([0, 4, 11, 62], dtype=torch.uint8), "past"),
        (torch.tensor([0, 2**63 - 1, 0, 0], dtype=torch.int64), "past"),  # wraps past 2**63
    ],
)
def test_sparse_gaps_out_of_range_are_refused(delta, gaps, match):
    replace_stored(delta, {"gaps.w:gaps": gaps})
    with pytest.raises(CorruptDeltaError, match=match):
        decode_one(delta, "gaps.w")


def test_sparse_gaps_and_values_of_different_lengths_are_refused(delta):
    replace_stored(delta, {"gaps.w:gaps": torch.tensor([0, 4, 11], dtype=torch.uint8)})
    with pytest.raises(CorruptDeltaError, match="do not match"):
        decode_one(delta, "gaps.w")


def test_bitmask_popcount_mismatch_is_refused(delta):
    mask = load_file(delta / "delta.safetensors")["mask.w:mask"]
    mask[1] |= 0x01  # element 8 was not kept
    replace_stored(delta, {"mask.w:mask": mask})
    with pytest.raises(CorruptDeltaError, match="set bits"):
        decode_one(delta, "mask.w")


def test_seeded_values_count_mismatch_is_refused(delta):
    values = load_file(delta / "delta.safetensors")["seeded.w:values"]
    replace_stored(delta, {"seeded.w:values": values[:-1]})
    with pytest.raises(CorruptDeltaError, match="do not match"):
        decode_one(delta, "seeded.w")


def test_implausible_seeded_values_count_is_refused_before_generating(delta, monkeypatch):
    import delta_format.core.encodings.sparse as sparse

    def never(*args, **kwargs):
        raise AssertionError("positions generated")

    monkeypatch.setattr(sparse, "iter_kept_positions", never)
    replace_stored(delta, {"seeded.w:values": torch.zeros(900, dtype=torch.bfloat16)})  # p = 0.9 of 900
    with pytest.raises(CorruptDeltaError, match="cannot come from"):
        decode_one(delta, "seeded.w")


def test_sign_bits_of_the_wrong_length_are_refused_on_opening(delta):
    replace_stored(delta, {"sign.w:bits": torch.zeros(8, dtype=torch.uint8)})  # 65 bits need 9 bytes
    with pytest.raises(CorruptDeltaError, match="wrong shape"):
        DeltaReader(delta)


def test_sign_bits_with_nonzero_padding_are_refused(delta):
    bits = load_file(delta / "delta.safetensors")["sign.w:bits"]
    bits[-1] |= 0x80  # 65 elements: bits 1-7 of the last byte are padding
    replace_stored(delta, {"sign.w:bits": bits})
    with pytest.raises(CorruptDeltaError, match="padding"):
        decode_one(delta, "sign.w")


@pytest.mark.parametrize(
    "key,name",
    [
        ("gaps.w:values", "gaps.w"),
        ("dense.w:delta", "dense.w"),
        ("sign.w:scale", "sign.w"),
        ("lowrank.w:u", "lowrank.w"),
        ("new.head:value", "new.head"),
    ],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_stored_floats_are_refused(delta, key, name, bad):
    value = load_file(delta / "delta.safetensors")[key]
    value.view(-1)[0] = bad
    replace_stored(delta, {key: value})
    with pytest.raises(CorruptDeltaError, match="NaN or Inf"):
        decode_one(delta, name)


# --- reconstruction --------------------------------------------------------------------------


def dense_entry(shape, dtype="float32", alpha=1.0):
    return TensorEntry(DenseEncoding(), shape, dtype, alpha)


def test_alpha_scales_a_dense_delta_exactly():
    base = torch.tensor([1.0, -2.0, 0.5, 3.0])
    delta = torch.tensor([0.25, 0.125, -0.5, 1.0])
    out = reconstruct("w", dense_entry((4,), alpha=2.0), delta, base)
    assert torch.equal(out, torch.tensor([1.5, -1.75, -0.5, 5.0]))


def test_load_time_alpha_multiplies_the_stored_alpha():
    base, delta = torch.zeros(2), torch.tensor([1.0, -1.0])
    out = reconstruct("w", dense_entry((2,), alpha=2.0), delta, base, alpha_scale=0.25)
    assert torch.equal(out, torch.tensor([0.5, -0.5]))


def test_alpha_is_rounded_to_float32_before_multiplying():
    # SPEC §9: round32(round32(alpha) * delta), not round32(alpha * delta) in float64.
    delta = tensor((1000,), 5) * 100
    out = reconstruct("w", dense_entry((1000,), alpha=0.1), delta, torch.zeros(1000))
    want = (delta.double().numpy().astype("float32") * __import__("numpy").float32(0.1)).astype("float32")
    assert torch.equal(out, torch.from_numpy(want))


def test_result_is_cast_to_the_entry_dtype_once():
    # In float32, 1 + 2**-8 + 2**-20 lies just above the bfloat16 tie and rounds up; rounding the
    # delta to bfloat16 first (2**-8) would make it a tie and round to even, 1.0.
    base = torch.tensor([1.0], dtype=torch.bfloat16)
    delta = torch.tensor([2**-8 + 2**-20])
    out = reconstruct("w", dense_entry((1,), "bfloat16"), delta, base)
    assert out.dtype == torch.bfloat16 and out.item() == 1.0078125


def test_reconstruct_leaves_its_inputs_unchanged():
    base, delta = torch.ones(3), torch.tensor([1.0, 2.0, 3.0])
    reconstruct("w", dense_entry((3,), alpha=0.5), delta, base)
    assert torch.equal(delta, torch.tensor([1.0, 2.0, 3.0])) and torch.equal(base, torch.ones(3))


def test_float16_overflow_is_a_numerical_error():
    base = torch.tensor([60000.0], dtype=torch.float16)
    with pytest.raises(NumericalError, match="float16"):
        reconstruct("w", dense_entry((1,), "float16"), torch.tensor([10000.0]), base)


def test_non_finite_base_is_passed_through():
    base = torch.tensor([float("inf"), 1.0])
    out = reconstruct("w", dense_entry((2,)), torch.tensor([0.0, 1.0]), base)
    assert out[0].item() == float("inf") and out[1].item() == 2.0


def test_base_of_another_shape_is_a_base_mismatch():
    with pytest.raises(BaseMismatchError, match="shape"):
        reconstruct("w", dense_entry((2, 3)), torch.zeros(2, 3), torch.zeros(3, 2))


def test_missing_base_tensor_is_a_base_mismatch():
    with pytest.raises(BaseMismatchError):
        reconstruct("w", dense_entry((2,)), torch.zeros(2), None)


@pytest.mark.parametrize("base", [None, torch.zeros(7)], ids=["absent", "other shape"])
def test_replace_without_a_matching_base_ignores_alpha(base):
    value = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    entry = TensorEntry(ReplaceEncoding(), (2, 2), "float32", alpha=3.0)
    out = reconstruct("w", entry, value, base, alpha_scale=2.0)
    assert torch.equal(out, value)


def test_replace_with_alpha_one_is_the_value_whatever_the_base():
    value = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    out = reconstruct("w", TensorEntry(ReplaceEncoding(), (2, 2), "float32"), value, torch.full((2, 2), 100.0))
    assert torch.equal(out, value)


def test_replace_with_alpha_scales_value_minus_a_same_shape_base():
    value, base = torch.tensor([[1.0, -2.0], [0.5, 3.0]]), torch.full((2, 2), 100.0)
    entry = TensorEntry(ReplaceEncoding(), (2, 2), "float32", alpha=3.0)
    out = reconstruct("w", entry, value, base, alpha_scale=2.0)
    assert torch.equal(out, base + (value - base) * 6.0)


def test_every_encoding_reconstructs_through_the_reader(delta):
    content = params()
    with DeltaReader(delta) as reader:
        for name, (entry, _) in content.items():
            base = None if name == "new.head" else torch.zeros(entry.shape, dtype=getattr(torch, entry.dtype))
            out = reconstruct(name, reader.entry(name), reader.decode(name), base)
            assert out.dtype == getattr(torch, entry.dtype) and tuple(out.shape) == entry.shape
            assert torch.isfinite(out).all()
