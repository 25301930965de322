"""Quantised values (SPEC §5.7) and the encodings built on them (`dense-q`, `sparse-q`,
`lowrank-q`, SPEC §5.8-§5.10): the bit order, the padding rule, the decode formula, error bounds of
the encoder, and every stored shape the manifest implies."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from delta_format.core.encodings import (
    QuantizedDenseEncoding,
    QuantizedLowRankEncoding,
    QuantizedSparseEncoding,
    bands_for,
    encoding_from_dict,
)
from delta_format.core.quant import dequantize, pack_codes, quantize, unpack_codes
from delta_format.errors import CorruptDeltaError, ManifestError

SETTINGS = settings(max_examples=30, deadline=None)


def randn(*shape: int, seed: int = 0, scale: float = 0.01) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- the codec -------------------------------------------------------------------------------


@SETTINGS
@given(bits=st.integers(1, 8), data=st.data())
def test_codes_pack_and_unpack_round_trip(bits, data):
    codes = torch.tensor(data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=50)), dtype=torch.int64)
    packed = pack_codes(codes, bits)
    assert packed.numel() == math.ceil(codes.numel() * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).long(), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_long_streams_unpack_chunk_by_chunk(bits, monkeypatch):
    import delta_format.core.quant as quant

    monkeypatch.setattr(quant, "UNPACK_GROUPS", 3)  # 24 codes a chunk: 42 chunks, the last one partial
    codes = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    got = unpack_codes(pack_codes(codes, bits), bits, codes.numel())
    assert got.dtype == torch.uint8 and torch.equal(got.long(), codes)


def test_code_bits_run_least_significant_first_across_bytes():
    # codes 1, 2, 7 of 3 bits: stream 100 010 111 -> byte 0 = 0b11_010_001, byte 1 = 0b1
    assert pack_codes(torch.tensor([1, 2, 7]), 3).tolist() == [0b11010001, 0b1]


def test_unpack_refuses_nonzero_padding_bits():
    with pytest.raises(CorruptDeltaError):
        unpack_codes(torch.tensor([0b11010001, 0b11], dtype=torch.uint8), 3, 3)


def test_unpack_refuses_a_stream_of_the_wrong_length():
    with pytest.raises(CorruptDeltaError):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 3)


def test_decode_is_scale_times_code_minus_half_range():
    values = dequantize(torch.tensor([0, 1, 2, 3]), torch.tensor([0.5], dtype=torch.float16), 2, 64)
    assert values.tolist() == [-0.75, -0.25, 0.25, 0.75]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_absmax_error_is_at_most_half_a_step(bits):
    x = randn(1000, seed=bits)
    codes, scales = quantize(x, bits, 64, "absmax")
    step = scales.float().repeat_interleave(64)[:1000]
    assert bool(((dequantize(codes, scales, bits, 64) - x).abs() <= step * 0.5 * (1 + 2**-9)).all())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_clipping_does_not_lose_to_absmax(bits):
    x = randn(4096, seed=10 + bits)
    errors = {clip: relative(dequantize(*quantize(x, bits, 64, clip), bits, 64), x) for clip in ("absmax", "mse")}
    assert errors["mse"] <= errors["absmax"] * 1.01


def test_more_bits_give_less_error():
    x = randn(4096, seed=3)
    errors = [relative(dequantize(*quantize(x, b, 64), b, 64), x) for b in range(1, 9)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01


def test_scales_are_float16_when_they_fit_and_float32_when_not():
    assert quantize(randn(100), 4, 64)[1].dtype == torch.float16
    assert quantize(randn(100, scale=1e-7), 4, 64)[1].dtype == torch.float32  # fp16 subnormal: precision lost


def test_an_all_zero_group_decodes_to_zeros():
    codes, scales = quantize(torch.zeros(70), 3, 64)
    assert not bool(dequantize(codes, scales, 3, 64).any())


# --- dense-q ---------------------------------------------------------------------------------


@SETTINGS
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), bits=st.integers(1, 8), group=st.integers(1, 20))
def test_dense_q_stores_what_the_manifest_implies_and_decodes_the_codec(rows, cols, bits, group):
    delta = randn(rows, cols, seed=rows * cols)
    enc = QuantizedDenseEncoding(bits, group)
    stored = enc.encode(delta)
    assert {k: tuple(v.shape) for k, v in stored.items()} == {k: e.shape for k, e in enc.expected((rows, cols)).items()}
    codes, scales = quantize(delta.reshape(-1), bits, group)
    decoded = enc.decode(stored, (rows, cols), "w", torch.float32)
    assert torch.equal(decoded.view(-1), dequantize(codes, scales, bits, group).view(-1))


# --- sparse-q --------------------------------------------------------------------------------


def seeded(p: float = 0.9, bits: int = 2) -> QuantizedSparseEncoding:
    enc = QuantizedSparseEncoding("seeded", bits=bits, group=64, count=0, scale=1 / (1 - p), seed=7, p=p)
    return enc.with_count(enc.positions(5000, "w").numel())


def test_sparse_q_is_zero_off_the_seeded_positions_and_rescaled_on_them():
    enc, delta = seeded(), randn(50, 100, seed=1)
    decoded = enc.decode(enc.encode(delta, name="w"), (50, 100), "w", torch.float32).view(-1)
    positions = enc.positions(5000, "w")
    off = torch.ones(5000, dtype=torch.bool)
    off[positions] = False
    assert not bool(decoded[off].any())
    assert relative(decoded[positions] / enc.scale, delta.view(-1)[positions]) < 0.5  # 2-bit codes


@pytest.mark.parametrize("coding", ["gaps", "bitmask"])
def test_sparse_q_explicit_codings_round_trip(coding):
    delta, positions = randn(40, seed=2), torch.tensor([0, 3, 4, 20, 39])
    enc = QuantizedSparseEncoding(coding, bits=8, group=4, count=5)
    decoded = enc.decode(enc.encode(delta, name="w", positions=positions), (40,), "w", torch.float32)
    assert relative(decoded[positions], delta[positions]) < 0.01 and not bool(decoded[[1, 2, 5]].any())


def test_sparse_q_refuses_a_count_the_positions_disagree_with():
    enc = QuantizedSparseEncoding("bitmask", bits=4, group=4, count=5)
    stored = enc.encode(randn(40), name="w", positions=torch.tensor([0, 3, 4, 20, 39]))
    wrong = QuantizedSparseEncoding("bitmask", bits=4, group=4, count=4)
    stored["codes"], stored["scales"] = stored["codes"][:2], stored["scales"][:1]
    with pytest.raises(CorruptDeltaError):
        wrong.decode(stored, (40,), "w", torch.float32)


# --- lowrank-q -------------------------------------------------------------------------------


def test_bands_follow_the_schedule_and_cover_the_rank():
    assert bands_for(64, [(1 / 16, 8), (7 / 16, 3), (1, 2)]) == [(4, 8), (28, 3), (32, 2)]
    assert bands_for(3, [(1 / 16, 8), (7 / 16, 3), (1, 2)]) == [(1, 8), (1, 3), (1, 2)]


@SETTINGS
@given(rows=st.integers(1, 70), cols=st.integers(1, 70), group=st.sampled_from([1, 4, 64]), data=st.data())
def test_lowrank_q_stores_what_the_manifest_implies(rows, cols, group, data):
    bands = data.draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 8)), min_size=1, max_size=3))
    enc = QuantizedLowRankEncoding(bands, group)
    if enc.rank > min(rows, cols):
        return
    stored = enc.encode(randn(rows, cols, seed=rows + cols))
    assert {k: tuple(v.shape) for k, v in stored.items()} == {k: e.shape for k, e in enc.expected((rows, cols)).items()}


def test_lowrank_q_at_8_bits_keeps_a_low_rank_delta():
    delta = randn(96, 8, seed=4) @ randn(8, 130, seed=5)
    enc = QuantizedLowRankEncoding([(8, 8)], 64)
    assert relative(enc.decode(enc.encode(delta), (96, 130), "w", torch.float32), delta) < 0.01


def test_lowrank_q_more_bits_on_the_top_vectors_beat_the_same_bits_spread_evenly():
    u, v = torch.linalg.qr(randn(128, 128, seed=6))[0], torch.linalg.qr(randn(128, 128, seed=7))[0]
    delta = (u / torch.arange(1.0, 129.0)) @ v.T  # singular values 1/i
    top = QuantizedLowRankEncoding([(2, 8), (14, 3), (16, 2)], 64)  # Delta-CoMe: 2*8 + 14*3 + 16*2 = 90 bits
    even = QuantizedLowRankEncoding([(30, 3)], 64)  # 90 bits
    errors = [relative(e.decode(e.encode(delta), (128, 128), "w", torch.float32), delta) for e in (top, even)]
    assert errors[0] < errors[1]


def test_lowrank_q_factor_is_the_decoded_product():
    delta = randn(20, 4, seed=8) @ randn(4, 30, seed=9)
    enc = QuantizedLowRankEncoding([(2, 4), (2, 2)], 8)
    stored = enc.encode(delta)
    x = randn(3, 30, seed=10)
    factor = enc.factor(stored, (20, 30), "w", torch.float32, alpha=2.0)
    assert torch.allclose(factor.product(x), 2 * x @ enc.decode(stored, (20, 30), "w", torch.float32).T, atol=1e-7)


def test_lowrank_q_refuses_nonzero_padding_between_bands():
    enc = QuantizedLowRankEncoding([(1, 3), (1, 2)], 64)  # band 1: 3 * (5 + 3) = 24 bits; band 2: 16
    stored = enc.encode(randn(5, 2, seed=11) @ randn(2, 3, seed=12))
    enc1 = QuantizedLowRankEncoding([(1, 3), (1, 2)], 64)
    assert enc1.decode(stored, (5, 3), "w", torch.float32).shape == (5, 3)
    odd = QuantizedLowRankEncoding([(1, 3), (1, 1)], 64)  # band 1: 24 bits; band 2: 8 bits
    stored = odd.encode(randn(4, 2, seed=13) @ randn(2, 3, seed=14))  # 3 * 7 = 21 bits: 3 padding
    stored["codes"][2] |= 0x80
    with pytest.raises(CorruptDeltaError):
        odd.decode(stored, (4, 3), "w", torch.float32)


# --- configs ---------------------------------------------------------------------------------

GOOD = [
    QuantizedDenseEncoding(3, 64),
    QuantizedSparseEncoding("seeded", bits=2, group=64, count=10, scale=10.0, seed=3, p=0.9),
    QuantizedSparseEncoding("gaps", bits=4, group=32, count=0),
    QuantizedLowRankEncoding([(4, 8), (28, 3), (32, 2)], 64),
]


@pytest.mark.parametrize("enc", GOOD, ids=repr)
def test_quantised_configs_round_trip(enc):
    assert encoding_from_dict(enc.name, enc.to_dict()) == enc


BAD = [
    ("dense-q", {"bits": 0, "group": 64}),
    ("dense-q", {"bits": 9, "group": 64}),
    ("dense-q", {"bits": 4}),
    ("dense-q", {"bits": 4, "group": 0, "x": 1}),
    ("sparse-q", {"index_coding": "gaps", "bits": 4, "group": 64}),
    ("sparse-q", {"index_coding": "seeded", "bits": 4, "group": 64, "count": 1, "p": 0.5}),
    ("sparse-q", {"index_coding": "gaps", "bits": 4, "group": 64, "count": -1}),
    ("lowrank-q", {"bands": [], "group": 64}),
    ("lowrank-q", {"bands": [[0, 4]], "group": 64}),
    ("lowrank-q", {"bands": [[4, 16]], "group": 64}),
    ("lowrank-q", {"bands": [[4, 4, 4]], "group": 64}),
    ("lowrank-q", {"bands": [[4, 4]]}),
    ("lowrank-q", {"bands": "4x4", "group": 64}),
]


@pytest.mark.parametrize("name,config", BAD, ids=[f"{n}-{c}" for n, c in BAD])
def test_invalid_quantised_configs_are_manifest_errors(name, config):
    with pytest.raises(ManifestError):
        encoding_from_dict(name, config)


def test_lowrank_q_refuses_vectors():
    with pytest.raises(ManifestError):
        QuantizedLowRankEncoding([(1, 4)], 64).expected((5,))


@pytest.mark.parametrize("blocks", [[(0, 37)], [(0, 5), (5, 13), (13, 30), (30, 37)]])
def test_lowrank_q_rows_decode_u_a_block_at_a_time_as_the_factors_do(blocks):
    rows, cols = 37, 23  # groups of 8 straddled by every block edge but the first
    enc = QuantizedLowRankEncoding([(2, 8), (3, 3), (2, 2)], 8)
    stored = enc.encode(randn(rows, 7, seed=11) @ randn(7, cols, seed=12))
    u, v = enc.factors(stored, (rows, cols), "w", torch.float32)
    delta = enc.rows(stored, (rows, cols), "w", torch.float32, alpha=0.5)
    for start, stop in blocks:
        acc = torch.zeros(stop - start, cols)
        delta.add_rows(acc, start, stop)
        assert torch.equal(acc, 0.5 * (u[start:stop] @ v))  # the block's rows of u, exactly
    assert torch.allclose(
        acc, 0.5 * (u @ v)[start:stop], rtol=1e-6, atol=1e-7
    )  # the whole product's, to BLAS's rounding


@pytest.mark.parametrize("blocks", [[(0, 9)], [(0, 2), (2, 3), (3, 8), (8, 9)]])
def test_dense_q_rows_are_the_decoded_delta_a_block_at_a_time(blocks):
    enc = QuantizedDenseEncoding(3, 8)  # groups of 8 over the flat tensor straddle rows of 7 x 2
    stored = enc.encode(randn(9, 7, 2, seed=13))
    whole = enc.decode(stored, (9, 7, 2), "w", torch.float32).view(9, 14)
    delta = enc.rows(stored, (9, 7, 2), "w", torch.float32, alpha=2.0)
    acc = torch.zeros(9, 14)
    for start, stop in blocks:
        delta.add_rows(acc[start:stop], start, stop)
    assert torch.equal(acc, 2.0 * whole)
