"""The seeded-mask generator (SPEC §6): the right statistics, the same positions however it is
chunked or on whichever device, and refusal of arguments it has no generator for."""

from __future__ import annotations

import math

import pytest
import torch

from delta_format.core import seeded_mask
from delta_format.errors import InvalidArgumentError

N = 200_000


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_kept_fraction_is_within_six_sigma_of_one_minus_p(p):
    kept = seeded_mask.kept_positions(N, p, seed=12345, name="w").numel()
    mean, sigma = N * (1 - p), math.sqrt(N * p * (1 - p))
    assert abs(kept - mean) <= 6 * sigma, (kept, mean, sigma)


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_gaps_follow_the_geometric_law_of_the_table(p):
    # P(gap >= j) = T_j / 2**32 (SPEC §6), checked for j = 1..4 within 6 sigma.
    count = 100_000
    gaps = seeded_mask.gaps(p, seeded_mask.stream_key(7, "w"), 0, count)
    table = seeded_mask.gap_table(p)
    for j in range(1, 5):
        prob = table[j - 1] / 2**32
        observed = int((gaps >= j).sum())
        assert abs(observed - count * prob) <= 6 * math.sqrt(count * prob * (1 - prob)), (j, observed)


def test_positions_are_sorted_unique_and_in_range():
    idx = seeded_mask.kept_positions(10_000, 0.7, seed=3, name="w")
    assert idx.dtype == torch.int64
    assert bool((idx[1:] > idx[:-1]).all())
    assert int(idx[0]) >= 0 and int(idx[-1]) < 10_000


@pytest.mark.parametrize("m", [0, 1, 17, 1000, 4096, 49_999])
def test_mask_of_a_shorter_tensor_is_the_prefix_of_a_longer_one(m):
    longer = seeded_mask.kept_positions(50_000, 0.9, seed=99, name="layer.w")
    shorter = seeded_mask.kept_positions(m, 0.9, seed=99, name="layer.w")
    assert torch.equal(shorter, longer[longer < m])


def test_positions_do_not_depend_on_the_chunk_size(monkeypatch):
    whole = seeded_mask.kept_positions(100_000, 0.5, seed=2**40 + 1, name="w")
    monkeypatch.setattr(seeded_mask, "_CHUNK", 1000)  # ~50 chunks instead of one
    assert torch.equal(seeded_mask.kept_positions(100_000, 0.5, seed=2**40 + 1, name="w"), whole)


def test_kept_mask_marks_exactly_the_kept_positions():
    mask = seeded_mask.kept_mask(5000, 0.8, seed=1, name="w")
    assert torch.equal(mask.nonzero().view(-1), seeded_mask.kept_positions(5000, 0.8, seed=1, name="w"))


def test_different_names_give_different_masks():
    a = seeded_mask.kept_mask(4096, 0.5, seed=1, name="model.layers.0.q_proj.weight")
    b = seeded_mask.kept_mask(4096, 0.5, seed=1, name="model.layers.0.k_proj.weight")
    assert not torch.equal(a, b)


@pytest.mark.parametrize("other", [2, 1 + 2**32, 2**63 + 1])  # low word, high word, top bit
def test_different_seeds_give_different_masks(other):
    a = seeded_mask.kept_mask(4096, 0.5, seed=1, name="w")
    assert not torch.equal(a, seeded_mask.kept_mask(4096, 0.5, seed=other, name="w"))


def test_same_arguments_give_the_same_mask():
    assert torch.equal(seeded_mask.kept_positions(4096, 0.5, 5, "w"), seeded_mask.kept_positions(4096, 0.5, 5, "w"))


def test_p_zero_keeps_every_element():
    assert torch.equal(seeded_mask.kept_positions(1000, 0.0, seed=5, name="w"), torch.arange(1000))


def test_empty_tensor_keeps_nothing():
    assert seeded_mask.kept_positions(0, 0.5, seed=5, name="w").numel() == 0


def test_drop_threshold_rounds_half_to_even():
    # p = (2k + 1) / 2**33 puts p * 2**32 exactly halfway: round to the even neighbour.
    assert seeded_mask.drop_threshold(1 / 2**33) == 0
    assert seeded_mask.drop_threshold(3 / 2**33) == 2
    assert seeded_mask.drop_threshold(0.5) == 2**31


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.5", None, True, 1 - 2**-34])
def test_invalid_drop_rate_is_refused(p):
    with pytest.raises(InvalidArgumentError):
        seeded_mask.kept_positions(10, p, seed=1, name="w")


def test_drop_rate_whose_gap_table_is_too_long_is_refused():
    # P = 2**32 - 2**12: the table's tail counts down one by one, far past 2**22 entries.
    with pytest.raises(InvalidArgumentError):
        seeded_mask.gap_table(1 - 2**-20)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "7", None, True])
def test_invalid_seed_is_refused(seed):
    with pytest.raises(InvalidArgumentError):
        seeded_mask.kept_positions(10, 0.5, seed=seed, name="w")


def test_int64_mix_equals_the_integer_definition_on_edge_inputs():
    xs = [0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
    x = torch.tensor(xs, dtype=torch.int64)
    got = seeded_mask._mix32_(x, torch.empty_like(x)).tolist()
    assert got == [seeded_mask._mix32_int(x) for x in xs]


COUNTER_STARTS = [0, 2**31 - 1000, 2**32 - 1000, 2**40 + 7]
"""Counter ranges that cross the int32 sign bit and the 32-bit boundary."""


def int64_stream(key: int, start: int, count: int) -> torch.Tensor:
    """The stream computed as SPEC §6 words it, every product below 2**63."""
    k = torch.arange(start, start + count, dtype=torch.int64)
    tmp = torch.empty_like(k)
    x = seeded_mask._mix32_((k & 0xFFFFFFFF) ^ key, tmp)
    return seeded_mask._mix32_(x ^ (k >> 32), tmp)


@pytest.mark.parametrize("start", COUNTER_STARTS)
def test_the_int32_stream_equals_the_int64_definition(start):
    key = seeded_mask.stream_key(9, "w")
    assert torch.equal(seeded_mask.uniform_stream(key, start, 5000), int64_stream(key, start, 5000))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_stream_equals_the_int64_definition_across_counter_widths():
    key = seeded_mask.stream_key(9, "w")
    for start in COUNTER_STARTS:
        assert torch.equal(
            seeded_mask.uniform_stream(key, start, 5000, device="cuda").cpu(), int64_stream(key, start, 5000)
        )
        assert torch.equal(
            seeded_mask.gaps(0.9, key, start, 5000, "cuda").cpu(), seeded_mask.gaps(0.9, key, start, 5000)
        )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_same_positions_as_cpu():
    for numel, p, seed in ((100_000, 0.9, 2**40 + 3), (50_000, 0.5, 0), (10_000, 0.99, 2**64 - 1)):
        cpu = seeded_mask.kept_positions(numel, p, seed, "w", device="cpu")
        cuda = seeded_mask.kept_positions(numel, p, seed, "w", device="cuda")
        assert cuda.device.type == "cuda"
        assert torch.equal(cuda.cpu(), cpu)


@pytest.mark.parametrize("p", [0.0001, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999])
def test_gap_lookup_equals_counting_thresholds_above_u(p):
    # gaps() uses bucket tables to avoid a binary search; the definition is #{g : T_g > u}.
    ascending = torch.tensor(seeded_mask.gap_table(p)[::-1], dtype=torch.int64)
    key = seeded_mask.stream_key(3, "x")
    for start in (0, 2**32 - 5000, 2**40):
        u = seeded_mask.uniform_stream(key, start, 50_000)
        expected = ascending.numel() - torch.searchsorted(ascending, u, right=True)
        assert torch.equal(seeded_mask.gaps(p, key, start, 50_000), expected)
