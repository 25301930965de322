"""Reconstruction a block of rows at a time (SPEC §9) gives the bits of the whole-tensor formula.

The loader sums each parameter through a cache-sized float32 accumulator; these tests force
blocks of a few rows (and position blocks of a few elements) so that every block boundary case
is crossed on small tensors, and compare against §9 written out on whole tensors.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from delta_format.core.encodings import DenseEncoding, LowRankEncoding, SignEncoding, SparseEncoding
from delta_format.core.encodings import sparse as sparse_module
from delta_format.core.manifest import TensorEntry
from delta_format.core.reconstruct import reconstruct_stored
from delta_format.errors import CorruptDeltaError

reconstruct_module = importlib.import_module(
    "delta_format.core.reconstruct"
)  # the package exports a function of that name

SHAPE = (37, 11)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(params=[1, 3, 11 * 5 + 1, 10**9], ids=["1-elem", "3-elem", "6-rows", "whole"])
def row_block(request, monkeypatch):
    """Row blocks of 1 row, 1 row (3 elements < a row), 5 rows, and the whole tensor."""
    monkeypatch.setitem(reconstruct_module.ROW_BLOCK_ELEMENTS, "cpu", request.param)
    return request.param


def random(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def parts_for(kind: str, seed: int):
    """(encoding, stored) of a delta of SHAPE encoded as ``kind``."""
    delta = random(SHAPE, seed, 1e-2)
    if kind == "dense":
        enc = DenseEncoding()
        return enc, enc.encode(delta, dtype=torch.bfloat16)
    if kind in ("sign-tensor", "sign-row"):
        enc = SignEncoding(kind.removeprefix("sign-"))
        return enc, enc.encode(delta)
    if kind == "lowrank":
        enc = LowRankEncoding(3)
        return enc, enc.encode(delta)
    if kind == "seeded":
        enc = SparseEncoding("seeded", scale=1 / 0.1, seed=seed, p=0.9)
        return enc, enc.encode(delta, name="w", dtype=torch.bfloat16)
    coding = kind.removeprefix("sparse-")
    positions = (random(SHAPE, seed + 1).reshape(-1) > 0.8).nonzero().view(-1)
    enc = SparseEncoding(coding, scale=2.0)
    return enc, enc.encode(delta, name="w", positions=positions, dtype=torch.float16)


KINDS = ["dense", "sign-tensor", "sign-row", "lowrank", "seeded", "sparse-gaps", "sparse-bitmask"]


def by_formula(parts, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SPEC §9 on whole tensors: acc = base; acc += round(a * decode) per part; cast once."""
    acc = base.float().clone()
    for entry, stored, m in parts:
        delta = entry.encoding.decode(stored, entry.shape, "w", torch.float32)
        a = entry.alpha * m
        acc += delta * a if a != 1.0 else delta
    return acc.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", [1.0, 1.7])
def test_row_blocks_give_the_whole_tensor_bits(row_block, kind, dtype, alpha):
    enc, stored = parts_for(kind, seed=KINDS.index(kind))
    parts = [(TensorEntry(enc, SHAPE, str(dtype).removeprefix("torch."), alpha), stored, 1.0)]
    base = random(SHAPE, 99).to(dtype)
    got = reconstruct_stored("w", parts, base, dtype=dtype)
    assert torch.equal(got.view(torch.uint8), by_formula(parts, base, dtype).view(torch.uint8))


def test_task_arithmetic_in_row_blocks_adds_every_part_in_order(row_block):
    parts = []
    for i, kind in enumerate(KINDS):
        enc, stored = parts_for(kind, seed=10 + i)
        parts.append((TensorEntry(enc, SHAPE, "bfloat16", 1.0 + i / 10), stored, 0.5))
    base = random(SHAPE, 7).bfloat16()
    out = torch.full(SHAPE, float("nan"), dtype=torch.bfloat16)
    got = reconstruct_stored("w", parts, base, dtype=torch.bfloat16, out=out)
    assert got is out
    assert torch.equal(out.view(torch.int16), by_formula(parts, base, torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("coding", ["gaps", "bitmask"])
def test_sparse_position_blocks_smaller_than_row_blocks(row_block, coding, monkeypatch):
    """Position blocks of 8 (bitmask: 64) elements: a row block may span several, and one may span rows."""
    real_gaps, real_mask = sparse_module.gap_blocks, sparse_module.bitmask_blocks
    monkeypatch.setattr(sparse_module, "gap_blocks", lambda g, n, name: real_gaps(g, n, name, block=8))
    monkeypatch.setattr(sparse_module, "bitmask_blocks", lambda m, n: real_mask(m, n, block=64))
    enc, stored = parts_for(f"sparse-{coding}", seed=3)
    parts = [(TensorEntry(enc, SHAPE, "float32", 1.0), stored, 1.0)]
    base = random(SHAPE, 5)
    assert torch.equal(
        reconstruct_stored("w", parts, base, dtype=torch.float32), by_formula(parts, base, torch.float32)
    )


def corrupt_gaps(change):
    enc, stored = parts_for("sparse-gaps", seed=4)
    stored = dict(stored)
    change(stored)
    return [(TensorEntry(enc, SHAPE, "float32", 1.0), stored, 1.0)]


def _run_past_in_last_block(stored):
    gaps = stored["gaps"].to(torch.int64)
    gaps[-1] += SHAPE[0] * SHAPE[1] - int(torch.cumsum(gaps + 1, 0)[-1]) + 1  # last index = numel
    stored["gaps"] = gaps


@pytest.mark.parametrize(
    "change, message",
    [
        (_run_past_in_last_block, "run past"),
        (lambda s: s.update(values=s["values"][:-1]), "do not match"),
        (lambda s: s.update(values=torch.cat([s["values"], s["values"][:3]])), "do not match"),
    ],
    ids=["index-past-end", "too-few-values", "too-many-values"],
)
def test_corrupt_sparse_is_refused_whatever_the_blocks(row_block, change, message):
    with pytest.raises(CorruptDeltaError, match=message):
        reconstruct_stored("w", corrupt_gaps(change), random(SHAPE, 6), dtype=torch.float32)
