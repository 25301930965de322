"""Base fingerprints (SPEC §7): the same from files and from memory, sensitive to what they
sample, and explicit about what differs when a base is the wrong one."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from delta_format.core.fingerprint import (
    check_fingerprint,
    fingerprint_differences,
    fingerprint_safetensors,
    fingerprint_state_dict,
    sample_ranges,
    validate_fingerprint,
)
from delta_format.errors import BaseMismatchError, ManifestError


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(64, 32, generator=g),  # 8 KiB: sampled, not hashed whole
        "norm.weight": torch.randn(32, generator=g).to(torch.bfloat16),
        "head.weight": torch.randn(16, 8, generator=g).to(torch.float16),
        "empty": torch.zeros(0, 4),
        "steps": torch.tensor([3], dtype=torch.int64),
    }


def files(tmp_path, tensors) -> list:
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return [path]


def test_file_and_memory_fingerprints_agree(tmp_path):
    tensors = state()
    assert fingerprint_safetensors(files(tmp_path, tensors)) == fingerprint_state_dict(tensors)


def test_sharded_files_fingerprint_like_one_file(tmp_path):
    tensors = state()
    names = sorted(tensors)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    save_file({k: tensors[k] for k in names[:2]}, str(tmp_path / "a" / "1.safetensors"))
    save_file({k: tensors[k] for k in names[2:]}, str(tmp_path / "b" / "2.safetensors"))
    sharded = fingerprint_safetensors([tmp_path / "a" / "1.safetensors", tmp_path / "b" / "2.safetensors"])
    assert sharded == fingerprint_safetensors(files(tmp_path, tensors))


def test_large_tensors_are_sampled_in_64_chunks_of_64_bytes():
    assert sample_ranges(4096) == [(0, 4096)]
    ranges = sample_ranges(8192)
    assert len(ranges) == 64 and ranges[0] == (0, 64) and ranges[-1] == (8192 - 64, 64)
    assert all(length == 64 for _, length in ranges)


def test_change_inside_a_sampled_chunk_changes_the_fingerprint_and_names_the_tensor():
    tensors = state()
    before = fingerprint_state_dict(tensors)
    offset, _ = sample_ranges(64 * 32 * 4)[10]
    tensors["embed.weight"].view(-1)[offset // 4] += 1.0
    after = fingerprint_state_dict(tensors)
    assert after["digest"] != before["digest"]
    assert fingerprint_differences(before, after) == ["'embed.weight' has other weights"]


def test_change_outside_every_sampled_chunk_goes_unnoticed():
    # The documented trade-off: ~4 KiB read per tensor, so a change between samples is not seen.
    tensors = state()
    before = fingerprint_state_dict(tensors)
    starts = {o for o, _ in sample_ranges(64 * 32 * 4)}
    unsampled = next(i for i in range(64 * 32) if not any(o <= 4 * i < o + 64 for o in starts))
    tensors["embed.weight"].view(-1)[unsampled] += 1.0
    assert fingerprint_state_dict(tensors) == before


def test_small_tensors_are_hashed_whole():
    tensors = state()
    before = fingerprint_state_dict(tensors)
    tensors["norm.weight"][-1] += 1
    assert fingerprint_differences(before, fingerprint_state_dict(tensors)) == ["'norm.weight' has other weights"]


def test_dtype_and_shape_differences_are_reported():
    tensors = state()
    before = fingerprint_state_dict(tensors)
    tensors["norm.weight"] = tensors["norm.weight"].float()
    tensors["head.weight"] = tensors["head.weight"].reshape(8, 16)
    assert fingerprint_differences(before, fingerprint_state_dict(tensors)) == [
        "'head.weight' is F16[8, 16], expected F16[16, 8]",
        "'norm.weight' is F32[32], expected BF16[32]",
    ]


def test_missing_and_extra_tensors_are_reported():
    tensors = state()
    before = fingerprint_state_dict(tensors)
    del tensors["head.weight"]
    tensors["lm_head.weight"] = torch.zeros(2)
    assert fingerprint_differences(before, fingerprint_state_dict(tensors)) == [
        "missing tensor 'head.weight'",
        "unexpected tensor 'lm_head.weight'",
    ]


def test_long_difference_lists_are_cut():
    before = fingerprint_state_dict({f"t{i}": torch.zeros(1) for i in range(10)})
    after = fingerprint_state_dict({f"t{i}": torch.ones(1) for i in range(10)})
    differences = fingerprint_differences(before, after, limit=3)
    assert len(differences) == 4 and differences[-1] == "... and 7 more"


def test_identical_bases_have_no_differences():
    fp = fingerprint_state_dict(state())
    assert fingerprint_differences(fp, copy.deepcopy(fp)) == []
    check_fingerprint(fp, copy.deepcopy(fp), "base")


def test_check_fingerprint_names_expected_and_found():
    tensors = state()
    expected = fingerprint_state_dict(tensors)
    tensors["norm.weight"] = tensors["norm.weight"] * 2
    found = fingerprint_state_dict(tensors)
    with pytest.raises(BaseMismatchError) as info:
        check_fingerprint(expected, found, "org/base@main")
    message = str(info.value)
    assert "org/base@main" in message
    assert expected["digest"][:16] in message and found["digest"][:16] in message
    assert "'norm.weight' has other weights" in message
    assert "verify_base=False" in message


@pytest.mark.parametrize(
    "mutate",
    [
        lambda fp: fp.update(algorithm="sampled-sha256-v2"),
        lambda fp: fp.pop("digest"),
        lambda fp: fp["tensors"]["empty"].pop("sample"),
        lambda fp: fp.update(tensors=[]),
    ],
    ids=["unknown algorithm", "no digest", "record without sample", "tensors not an object"],
)
def test_malformed_fingerprints_are_refused(mutate):
    fp = fingerprint_state_dict(state())
    mutate(fp)
    with pytest.raises(ManifestError):
        validate_fingerprint(fp)


@pytest.mark.parametrize("offsets", [["0", 16], [16, 8], [-8, 8], [0.0, 16]])
def test_a_file_with_impossible_data_offsets_is_refused_typed(tmp_path, offsets):
    import json
    import struct

    from delta_format.errors import CorruptDeltaError

    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": offsets}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CorruptDeltaError, match="impossible data offsets"):
        fingerprint_safetensors([path])
