"""The native loops of a first load (`delta_format.core.native`) give the torch path's bits.

Every case is computed twice, with the extension and with ``DELTA_FORMAT_NATIVE=0`` (torch ops),
and compared bit for bit: the one-pass loop of sign and sparse deltas (seeded masks drawn inside
the loop, explicit positions, per-row and per-tensor scales, alpha, grown rows, float32 bases,
rows split over threads), the per-block cast that other encodings' blocks use, the
seeded-mask generator, and the finiteness check of stored values. Where a row cannot be rounded
natively (an overflow) or a delta is corrupt, the torch path's error still comes out.
"""

from __future__ import annotations

import pytest
import torch

from delta_format.core import native, rounding, seeded_mask
from delta_format.core.constants import ROUNDING_WINDOW
from delta_format.core.encodings import SignEncoding, SparseEncoding
from delta_format.core.manifest import TensorEntry
from delta_format.core.reconstruct import reconstruct_stored
from delta_format.errors import CorruptDeltaError, NumericalError

pytestmark = pytest.mark.skipif(
    not native.available(),
    reason="delta_format.core._native was not built (no C compiler at install) or is turned off "
    "(DELTA_FORMAT_NATIVE=0): the torch path runs everywhere",
)


@pytest.fixture
def torch_ops(monkeypatch):
    """A callable running ``fn()`` with the native loops turned off."""

    def run(fn):
        with monkeypatch.context() as m:
            m.setenv(native.ENV_VAR, "0")
            assert not native.available()
            return fn()

    return run


@pytest.fixture(params=[1, 4], ids=["1-thread", "4-threads"])
def threads(request):
    """The loops split rows over torch's thread count: one slice, and several."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


def rand(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


def encoded(kind: str, shape, seed: int):
    delta = rand(shape, seed, 1e-2)
    if kind.startswith("sign"):
        granularity = "tensor" if kind == "sign-tensor" else "row"
        enc = SignEncoding(granularity, *((8, 64) if kind == "sign-codes" else ()))
        return enc, enc.encode(delta, dtype=torch.bfloat16)
    if kind.startswith("seeded"):
        p = float(kind.split("-")[1])
        enc = SparseEncoding("seeded", scale=1 / (1 - p), seed=seed, p=p)
        dtype = torch.float32 if kind.endswith("f32") else torch.bfloat16
        return enc, enc.encode(delta, name="w", dtype=dtype)
    positions = (rand(shape, seed + 1).reshape(-1) > 1.0).nonzero().view(-1)
    enc = SparseEncoding(kind.removeprefix("sparse-"), scale=2.0)
    return enc, enc.encode(delta, name="w", positions=positions, dtype=torch.bfloat16)


KINDS = ["sign-row", "sign-tensor", "sign-codes", "seeded-0.9", "seeded-0.5-f32", "seeded-0.99", "sparse-gaps"]
SHAPES = {"matrix": (600, 515), "vector": (7001,), "conv": (40, 3, 5, 7), "one-row": (1, 4099)}
CASES = [  # per-row sign scales need a matrix
    pytest.param(kind, shape, id=f"{kind}-{label}")
    for kind in KINDS
    for label, shape in SHAPES.items()
    if len(shape) > 1 or kind in ("sign-tensor",) or not kind.startswith("sign")
]


@pytest.fixture
def passes(monkeypatch):
    """What each call of the one-pass loop returned (True: it made the parameter)."""
    results = []
    real = native.reconstruct_bf16

    def spy(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(native, "reconstruct_bf16", spy)
    return results


def both(name, parts, base, dtype, torch_ops):
    fast = reconstruct_stored(name, parts, base, dtype=dtype)
    slow = torch_ops(lambda: reconstruct_stored(name, parts, base, dtype=dtype))
    return fast, slow


@pytest.mark.parametrize("kind,shape", CASES)
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_one_pass_gives_the_torch_bits(kind, shape, alpha, threads, torch_ops, passes):
    enc, stored = encoded(kind, shape, seed=KINDS.index(kind))
    entry = TensorEntry(enc, shape, "bfloat16", alpha, rounding=ROUNDING_WINDOW)
    base = rand(shape, 99).to(torch.bfloat16)
    fast, slow = both("w", [(entry, stored, 1.0)], base, torch.bfloat16, torch_ops)
    assert passes == [True]  # made in one native pass; the torch path made `slow`
    assert same_bits(fast, slow)
    assert not same_bits(fast, base)  # the delta was applied


@pytest.mark.parametrize("kind", ["sign-row", "seeded-0.9"])
def test_a_float32_base_and_grown_rows(kind, torch_ops, passes):
    shape = (64, 96)
    enc, stored = encoded(kind, shape, seed=5)
    entry = TensorEntry(enc, shape, "bfloat16", rounding=ROUNDING_WINDOW, base_rows=50)
    base = rand((50, 96), 7)  # float32, 14 rows short: they start from zero (SPEC §9.2)
    fast, slow = both("w", [(entry, stored, 1.0)], base, torch.bfloat16, torch_ops)
    assert passes == [True]
    assert same_bits(fast, slow)


def test_an_overflow_is_still_reported(torch_ops, passes):
    shape = (16, 64)
    enc = SignEncoding("row")
    stored = enc.encode(torch.ones(shape), scale=torch.full((16,), 3e38), dtype=torch.float32)
    entry = TensorEntry(enc, shape, "bfloat16", rounding=ROUNDING_WINDOW)
    base = torch.full(shape, 3e38).to(torch.bfloat16)
    with pytest.raises(NumericalError, match="overflows"):
        reconstruct_stored("w", [(entry, stored, 1.0)], base, dtype=torch.bfloat16)
    assert passes == [False]  # a row the loop could not round: the block path took over, and reported it
    # an edge short of overflow (t is bfloat16's largest value) is rounded as the torch path does
    stored = enc.encode(torch.ones(shape), scale=torch.full((16,), 1e30), dtype=torch.float32)
    fast, slow = both("w", [(entry, stored, 1.0)], base, torch.bfloat16, torch_ops)
    assert same_bits(fast, slow)


@pytest.mark.parametrize("change", [1, -1])
def test_a_seeded_value_count_off_by_one_is_refused(change):
    shape = (128, 128)
    enc, stored = encoded("seeded-0.9", shape, seed=3)
    values = stored["values"]
    stored = {**stored, "values": values[:-1] if change < 0 else torch.cat([values, values[:1]])}
    entry = TensorEntry(enc, shape, "bfloat16", rounding=ROUNDING_WINDOW)
    with pytest.raises(CorruptDeltaError, match="do not match"):
        reconstruct_stored("w", [(entry, stored, 1.0)], rand(shape, 1).to(torch.bfloat16), dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 37, 1000])
def test_all_finite_finds_every_non_finite_value(dtype, bad, where):
    values = rand(1001, 2).to(dtype)
    assert native.all_finite(values) is True
    values[where] = bad
    assert native.all_finite(values) is False
    enc = SparseEncoding("gaps")
    stored = {"values": values, "gaps": torch.ones(1001, dtype=torch.int32)}
    with pytest.raises(CorruptDeltaError, match="NaN or Inf"):
        enc.rows(stored, (2003,), "w", torch.float32)


def test_the_block_cast_gives_the_torch_bits(torch_ops):
    rows, cols = 40, 1027  # a row's bits start mid-byte
    dither = rounding.Dither(ROUNDING_WINDOW, "w", (rows, cols))
    acc = rand((rows, cols), 4, 1e3)
    acc[0, :5] = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3.3e38])  # zeros, subnormals, near the top
    table, offsets = dither.native_windows(0, rows, acc.device)
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    assert native.cast_window_bf16(acc, out, table, offsets) is True
    slow = torch_ops(lambda: rounding.stochastic_cast(acc, torch.bfloat16, dither.rows(0, rows, "cpu")))
    assert same_bits(out, slow)
    acc[17, 3] = float("inf")  # an edge: the caller must round this block
    assert native.cast_window_bf16(acc, out, table, offsets) is False


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("start", [0, 2**32 - 1000])
def test_the_generator_gives_the_spec_positions(p, start, torch_ops):
    key = seeded_mask.stream_key(11, "w")
    fast = seeded_mask._positions(p, key, start, 5000, 17, torch.device("cpu"))
    slow = torch_ops(lambda: seeded_mask._positions(p, key, start, 5000, 17, torch.device("cpu")))
    assert torch.equal(fast, slow)
    walk = native.seeded_checkpoints(seeded_mask.native_stream(p, key), 9000)
    whole = native.seeded_positions(seeded_mask.native_stream(p, key), 0, 9000, 0)
    assert torch.equal(walk[1:-1], whole[native.CHUNK - 1 :: native.CHUNK][: walk.numel() - 2])
    assert int(walk[-1]) == int(whole[-1]) and int(walk[0]) == -1


def test_the_switch_turns_everything_off(monkeypatch):
    assert native.available()
    monkeypatch.setenv(native.ENV_VAR, "0")
    assert not native.available()
    assert native.all_finite(torch.ones(3)) is None
    assert native.seeded_checkpoints(seeded_mask.native_stream(0.5, 1), 10) is None


@pytest.mark.parametrize("tokens", [1, 5, 8, 9, 31])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sign_product_is_the_matmul(tokens, granularity, dtype, torch_ops):
    rows, cols = 70, 136
    enc = SignEncoding(granularity)
    stored = enc.encode(rand((rows, cols), 1), dtype=torch.float32)
    factor = enc.factor(stored, (rows, cols), "w", dtype, alpha=0.5)
    x = rand((tokens, cols), 2).to(dtype)
    exact = x.double() @ factor.merged(torch.zeros(rows, cols, dtype=torch.float64)).T
    fast = factor.product(x)
    assert fast.dtype == dtype and fast.shape == (tokens, rows)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # float32 sums; bfloat16 results
    assert torch.allclose(fast.double(), exact, rtol=tolerance, atol=tolerance * exact.abs().max())
    slow = torch_ops(lambda: factor.product(x))  # the expanded +-1 matrix
    assert torch.allclose(fast.double(), slow.double(), rtol=tolerance, atol=tolerance * exact.abs().max())
    assert native.sign_product(rand((32, cols), 3), stored["bits"], stored["scale"], rows, cols) is not None
    assert native.sign_product(rand((33, cols), 3), stored["bits"], stored["scale"], rows, cols) is None


@pytest.mark.parametrize("tokens", [1, 7, 16])  # x holds two sequences: up to 32 tokens
@pytest.mark.parametrize("index", [torch.int32, torch.int64])
def test_the_sparse_product_is_the_matmul(tokens, index, torch_ops):
    rows, cols = 90, 77
    dense = rand((rows, cols), 4) * (rand((rows, cols), 5) > 1.2)
    positions = dense.reshape(-1).nonzero().view(-1)
    values = dense.reshape(-1)[positions].to(torch.bfloat16)
    x = rand((2, tokens, cols), 6).to(torch.bfloat16)
    fast = native.sparse_product(x, positions.to(index), values, rows, cols)
    exact = (
        x.double()
        @ torch.zeros(rows * cols, dtype=torch.float64).index_put_((positions,), values.double()).view(rows, cols).T
    )
    assert fast.shape == (2, tokens, rows) and fast.dtype == torch.bfloat16
    assert torch.allclose(fast.double(), exact, rtol=1e-2, atol=1e-2 * exact.abs().max())
    # out-of-order positions give a wrong product but never read or write outside x and y
    shuffled = positions.flip(0).to(index)
    assert native.sparse_product(x, shuffled, values, rows, cols).shape == (2, tokens, rows)
