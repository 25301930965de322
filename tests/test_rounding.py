"""Seeded stochastic rounding of half-precision results (SPEC §9.1, spec 1.3 and 1.6).

A lossy delta on a bfloat16 model is mostly below the spacing of its weights; rounding the sum to
nearest drops it, rounding stochastically keeps it in expectation. These tests check the rule
itself (neighbours only, unbiased, exact values untouched, the same bits whatever the blocks),
where the manifest carries it, what old readers and hostile configs get, and that `compress`
marks exactly the lossy half-precision entries; and both dithers (a hash of every element's
index, 1.3; a window of a hashed table per row, 1.6) against SPEC §9.1's definitions.
"""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from delta_format import compress
from delta_format.core.encodings import DenseEncoding, ReplaceEncoding, SignEncoding, encoding_from_dict
from delta_format.core.manifest import TensorEntry
from delta_format.core.reconstruct import reconstruct_stored
from delta_format.core.rounding import Dither, rounding_key, stochastic_cast
from delta_format.core.seeded_mask import stream_key, uniform_stream
from delta_format.errors import InvalidArgumentError, ManifestError, NumericalError
from delta_format.io.reader import DeltaReader
from tests.models import save, structured_perturbation, tiny_llama

reconstruct_module = importlib.import_module("delta_format.core.reconstruct")
rounding_module = importlib.import_module("delta_format.core.rounding")
HALF = {"bfloat16": (torch.bfloat16, 2.0**-7), "float16": (torch.float16, 2.0**-10)}
ROUNDINGS = ("stochastic", "stochastic-window")


def dither(acc: torch.Tensor, name: str = "w", rounding: str = "stochastic") -> torch.Tensor:
    """The dither of every element of ``acc`` seen as a parameter of its shape."""
    rows = acc.shape[0] if acc.dim() else 1
    return Dither(rounding, name, tuple(acc.shape)).rows(0, rows, acc.device)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", sorted(HALF))
@pytest.mark.parametrize("frac", [0.1, 0.37, -0.25])
def test_stochastic_cast_is_unbiased_and_picks_a_neighbour(dtype, frac, rounding):
    torch_dtype, spacing = HALF[dtype]  # of values in [1, 2)
    weights = (1.1 + 0.8 * torch.rand(400, 500, generator=torch.Generator().manual_seed(0))).to(torch_dtype)
    acc = weights.float() + frac * spacing
    got = stochastic_cast(acc, torch_dtype, dither(acc, rounding=rounding))
    nearest = acc.to(torch_dtype)
    moved = got != nearest
    # neighbours only: the nearest value, or one spacing past it toward acc
    steps = (got.double() - nearest.double()).abs()[moved]
    assert torch.equal(steps, torch.full_like(steps, spacing))
    share = float(moved.double().mean())
    assert abs(share - abs(frac)) < 0.01  # P(past) = |acc - nearest| / spacing; 5 sigma ≈ 0.005
    bias = float((got.double() - acc.double()).mean()) / spacing
    assert abs(bias) < 0.01 < abs(float((nearest.double() - acc.double()).mean()) / spacing)


@pytest.mark.parametrize("dtype", sorted(HALF))
def test_values_the_dtype_holds_are_returned_unchanged(dtype):
    torch_dtype = HALF[dtype][0]
    exact = torch.randn(300, 7).to(torch_dtype)
    exact[0, :3] = torch.tensor([0.0, -0.0, float(torch.finfo(torch_dtype).max)], dtype=torch_dtype)
    got = stochastic_cast(exact.float(), torch_dtype, dither(exact, "x"))
    assert torch.equal(got.view(torch.int16), exact.view(torch.int16))  # -0.0 included


def test_the_largest_value_is_never_rounded_to_infinity_and_nan_stays():
    top = torch.finfo(torch.float16).max
    acc = torch.tensor([top + 15.0] * 1000 + [float("nan"), -(top + 15.0)])
    got = stochastic_cast(acc, torch.float16, dither(acc, "top"))
    assert torch.equal(got[:1000], torch.full((1000,), top, dtype=torch.float16))
    assert got[1000].isnan() and got[1001] == -top


@pytest.mark.parametrize("dtype", sorted(HALF))
def test_non_finite_sums_round_as_to_nearest(dtype):
    torch_dtype = HALF[dtype][0]
    patterns = [0x7F800001, 0xFF800001, 0x7FFFFFFF, 0x7FC00000, 0x7F800000, 0xFF800000]  # NaNs (low bits set), ±inf
    acc = torch.tensor(patterns * 2000, dtype=torch.int64).to(torch.int32).view(torch.float32)
    got, nearest = stochastic_cast(acc, torch_dtype, dither(acc, "nan")), acc.to(torch_dtype)
    assert torch.equal(got.isnan(), nearest.isnan()) and torch.equal(got[~got.isnan()], nearest[~nearest.isnan()])


@pytest.mark.parametrize("dtype", sorted(HALF))
def test_subnormals_and_zero_round_between_their_neighbours(dtype):
    torch_dtype = HALF[dtype][0]
    tiny = float(torch.finfo(torch_dtype).smallest_normal) * (2.0**-7 if dtype == "bfloat16" else 2.0**-10)
    acc = torch.tensor([0.3 * tiny] * 20_000 + [-0.3 * tiny] * 20_000)
    got = stochastic_cast(acc, torch_dtype, dither(acc, "tiny")).double()
    assert set(got[:20_000].tolist()) == {0.0, tiny} and set(got[20_000:].tolist()) == {0.0, -tiny}
    assert abs(float(got[:20_000].mean()) / tiny - 0.3) < 0.02


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("row_block", [1, 5, 10**9])
@pytest.mark.parametrize("dtype", sorted(HALF))
def test_reconstruction_gets_the_same_bits_whatever_the_row_blocks(row_block, dtype, rounding, monkeypatch):
    torch_dtype = HALF[dtype][0]
    base = torch.randn(13, 9).to(torch_dtype)
    delta = torch.randn(13, 9) * 1e-3
    encoding = DenseEncoding()
    entry = TensorEntry(encoding, (13, 9), dtype, rounding=rounding)
    whole = stochastic_cast(base.float() + delta, torch_dtype, dither(base, "layer.w", rounding))
    monkeypatch.setitem(reconstruct_module.ROW_BLOCK_ELEMENTS, "cpu", row_block)
    got = reconstruct_stored("layer.w", [(entry, encoding.encode(delta), 1.0)], base, dtype=torch_dtype)
    assert torch.equal(got.view(torch.int16), whole.view(torch.int16))
    assert not torch.equal(got, (base.float() + delta).to(torch_dtype))  # the rule is in use


def test_the_stochastic_dither_is_the_hash_of_each_flat_index():
    got = Dither("stochastic", "a.b", (7, 3, 4)).rows(2, 5, "cpu")  # rows 2-4 of 12 elements
    assert torch.equal(got.long(), uniform_stream(rounding_key("a.b"), 24, 36) >> 16)


@pytest.mark.parametrize("cached_rows", [1 << 20, 0])  # every row's offsets once, or each block's
@pytest.mark.parametrize("shape", [(), (5,), (6, 7), (4, 3, 5), (2, 70_000)])  # the last: rows too wide to tabulate
def test_the_window_dither_is_a_hashed_tables_window_at_each_rows_offset(shape, cached_rows, monkeypatch):
    monkeypatch.setattr(rounding_module, "MAX_CACHED_OFFSETS", cached_rows)
    # SPEC §9.1 (1.6): one table W[j] = u(key(b"window", ""), j) >> 16 for every parameter, the
    # row's offset o[r] = u(key, r) >> 12, and element c of row r gets W[o[r] + c]
    name = "model.layers.0.w"
    rows, cols = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    table = uniform_stream(stream_key(int.from_bytes(b"window", "big"), ""), 0, 2**20 + cols - 1) >> 16
    offsets = uniform_stream(rounding_key(name), 0, rows) >> 12
    want = torch.cat([table[o : o + cols] for o in offsets.tolist()])
    got = Dither("stochastic-window", name, shape)
    assert torch.equal(got.rows(0, rows, "cpu").long(), want)
    if rows > 2:  # any block of rows reads its part
        assert torch.equal(got.rows(1, 3, "cpu").long(), want[cols : 3 * cols])
    counters = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(1))[:50]
    assert torch.equal(got.at(counters).long(), want[counters])  # an embedding's gathered elements
    if counters.numel() == 50:  # any shape of indices, and a fresh table
        fresh = Dither("stochastic-window", name, shape).at(counters.view(5, 10))
        assert torch.equal(fresh.long(), want[counters].view(5, 10))


def test_the_window_dither_is_uniform_and_rows_do_not_repeat_each_other():
    d = Dither("stochastic-window", "emb", (2048, 256)).rows(0, 2048, "cpu").view(2048, 256).double()
    counts = torch.histc(d, bins=16, min=0, max=2**16)
    assert float((counts / d.numel() - 1 / 16).abs().max()) < 0.003  # ~6 sigma at 524288 draws
    centred = (d - d.mean()) / d.std()
    neighbours = float((centred[1:] * centred[:-1]).mean())  # row r against row r + 1, column by column
    assert abs(neighbours) < 0.01  # ~5 sigma
    assert len({tuple(row[:8].tolist()) for row in d}) > 2000  # windows at (almost all) distinct offsets


def test_the_first_part_that_rounds_stochastically_chooses_the_dither():
    from delta_format.core.reconstruct import parameter_dither

    entries = [TensorEntry(DenseEncoding(), (4, 3), "bfloat16", rounding=r) for r in ROUNDINGS]
    nearest = TensorEntry(DenseEncoding(), (4, 3), "bfloat16")
    assert parameter_dither("w", [nearest, *entries], torch.bfloat16).rounding == "stochastic"
    assert parameter_dither("w", entries[::-1], torch.bfloat16).rounding == "stochastic-window"
    assert parameter_dither("w", entries, torch.float32) is None  # only a half-precision result is dithered
    assert parameter_dither("w", [nearest], torch.bfloat16) is None


def test_float32_results_and_nearest_entries_are_not_dithered():
    base, delta = torch.randn(6, 5), torch.randn(6, 5) * 1e-3
    encoding = DenseEncoding()
    stochastic = TensorEntry(encoding, (6, 5), "float32", rounding="stochastic")
    got = reconstruct_stored("w", [(stochastic, encoding.encode(delta), 1.0)], base, dtype=torch.float32)
    assert torch.equal(got, base + delta)
    half = base.to(torch.bfloat16)
    nearest = TensorEntry(encoding, (6, 5), "bfloat16")
    got = reconstruct_stored("w", [(nearest, encoding.encode(delta), 1.0)], half, dtype=torch.bfloat16)
    assert torch.equal(got, (half.float() + delta).to(torch.bfloat16))


def test_the_manifest_stores_rounding_in_the_config_and_refuses_what_it_cannot_mean():
    entry = TensorEntry(SignEncoding("row"), (4, 3), "bfloat16", rounding="stochastic")
    data = entry.to_dict()
    assert data["config"] == {"scale": "row", "rounding": "stochastic"}
    assert TensorEntry.from_dict("w", json.loads(json.dumps(data))).rounding == "stochastic"
    assert "rounding" not in TensorEntry(SignEncoding("row"), (4, 3), "bfloat16").to_dict()["config"]
    # a reader before 1.3 sees an unknown key in a closed config, and refuses the file
    with pytest.raises(ManifestError, match="wrong fields"):
        encoding_from_dict("sign", data["config"])
    for bad in ("down", 1, None, ["stochastic"]):
        with pytest.raises(ManifestError, match="invalid rounding"):
            TensorEntry.from_dict("w", {**data, "config": {"scale": "row", "rounding": bad}})
    value = {"encoding": "replace", "config": {"rounding": "stochastic"}, "shape": [2], "dtype": "bfloat16"}
    with pytest.raises(ManifestError, match="rounding"):
        TensorEntry.from_dict("w", value)
    assert ReplaceEncoding().is_delta is False
    for bad, encoding in (("up", SignEncoding("row")), ("stochastic", ReplaceEncoding())):  # nor written
        with pytest.raises(InvalidArgumentError, match="rounding"):
            TensorEntry(encoding, (4, 3), "bfloat16", rounding=bad)
    part = {"encoding": "dense", "config": {"rounding": "stochastic"}}
    summed = {"encoding": "sum", "config": {"parts": [part, {"encoding": "dense"}]}, "shape": [2], "dtype": "bfloat16"}
    with pytest.raises(ManifestError, match="wrong fields"):  # rounding belongs to the entry, not a part
        TensorEntry.from_dict("w", summed)


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base = tiny_llama(dtype=torch.bfloat16)
    ft = structured_perturbation(base, rel=3e-3, seed=1).to(torch.bfloat16)
    return save(base, root / "base"), save(ft, root / "ft")


def _roundings(delta) -> dict[str, str]:
    with DeltaReader(delta.directory) as reader:
        return {name: reader.entry(name).rounding for name in reader.manifest.tensors}


def test_compress_marks_lossy_half_precision_entries_stochastic(bf16_pair, tmp_path):
    base, ft = bf16_pair
    lossy = _roundings(compress(base, ft, tmp_path / "sign", method="sign", scale="row", progress=False))
    assert lossy and set(lossy.values()) == {"stochastic-window"}  # spec 1.6's cheaper dither
    hashed = compress(base, ft, tmp_path / "hash", method="sign", rounding="stochastic", progress=False)
    assert set(_roundings(hashed).values()) == {"stochastic"}  # what spec 1.3-1.5 readers take
    exact = _roundings(compress(base, ft, tmp_path / "dense", method="dense", progress=False))
    assert exact and set(exact.values()) == {"nearest"}  # lossless: the same bits, a file 1.2 readers take
    kept = _roundings(compress(base, ft, tmp_path / "near", method="sign", rounding="nearest", progress=False))
    assert set(kept.values()) == {"nearest"}
    with pytest.raises(InvalidArgumentError, match="rounding"):
        compress(base, ft, tmp_path / "bad", method="sign", rounding="up", progress=False)


def test_stochastic_rounding_keeps_a_delta_below_the_spacing_that_nearest_drops(bf16_pair, tmp_path):
    base_dir, ft_dir = bf16_pair
    out = compress(base_dir, ft_dir, tmp_path / "sign", method="sign", scale="row", progress=False).directory
    kept = lost = total = 0.0
    with DeltaReader(out) as reader:
        from safetensors.torch import load_file

        base = load_file(str(base_dir / "model.safetensors"))
        for name in reader.manifest.tensors:
            entry, stored = reader.entry(name), reader.stored(name)
            if len(entry.shape) < 2:
                continue
            exact = reconstruct_stored(name, [(entry, stored, 1.0)], base[name], dtype=torch.float32).double()
            intended = exact - base[name].double()  # the decoded delta, in float32
            got = reconstruct_stored(name, [(entry, stored, 1.0)], base[name], dtype=torch.bfloat16).double()
            near = exact.to(torch.bfloat16).double()
            total += float(intended.abs().sum())
            kept += float(((got - base[name].double()) * intended.sign()).sum())
            lost += float(((near - base[name].double()) * intended.sign()).sum())
    assert abs(kept / total - 1) < 0.05  # unbiased: the delta's mass is kept
    assert lost / total < 0.9  # nearest rounding loses a measurable share of it here


@pytest.mark.parametrize(
    "flag, want", [("auto", "stochastic-window"), ("stochastic", "stochastic"), ("nearest", "nearest")]
)
def test_the_cli_passes_rounding_through(bf16_pair, tmp_path, flag, want):
    from delta_format.cli import main

    out = tmp_path / "d"
    argv = ["compress", *map(str, bf16_pair), str(out), "--no-progress", "--method", "sign", "--rounding", flag]
    assert main(argv) == 0
    with DeltaReader(out) as reader:
        assert {reader.entry(name).rounding for name in reader.manifest.tensors} == {want}


def test_inspect_shows_which_entries_round_stochastically(bf16_pair, tmp_path, capsys):
    from delta_format.cli import main

    out = tmp_path / "d"
    assert main(["compress", *map(str, bf16_pair), str(out), "--no-progress", "--method", "sign"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "bfloat16 (stochastic-window)" in capsys.readouterr().out


def _kept_share(got: torch.Tensor, weight: torch.Tensor, intended: torch.Tensor) -> float:
    """Share of the intended delta's mass (along its signs) that ``got - weight`` carries."""
    moved = (got.double() - weight.double()) * intended.sign()
    return float(moved.sum()) / float(intended.abs().sum())


def test_on_the_fly_merges_and_lookups_round_as_a_load_rounds(bf16_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from delta_format.loaders.onthefly import attach_deltas, set_active_delta
    from delta_format.loaders.onthefly.factors import RoundedFactor

    base_dir, ft_dir = bf16_pair
    out = compress(base_dir, ft_dir, tmp_path / "sign", method="sign", scale="row", progress=False).directory
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    attach_deltas(model, {"ft": out})
    set_active_delta(model, "ft")
    with DeltaReader(out) as reader:
        for module, name in (
            (model.model.layers[0].mlp.down_proj, "model.layers.0.mlp.down_proj.weight"),
            (model.model.embed_tokens, "model.embed_tokens.weight"),
        ):
            factor, weight = module.factors["ft"], module.weight.detach()
            assert isinstance(factor, RoundedFactor)
            exact = reconstruct_stored(
                name, [(reader.entry(name), reader.stored(name), 1.0)], weight, dtype=torch.float32
            )
            intended = exact.double() - weight.double()
            with torch.no_grad():
                merged = factor.merged(weight)
                nearest = factor.inner.merged(weight)
            assert abs(_kept_share(merged, weight, intended) - 1) < 0.05, name
            assert _kept_share(nearest, weight, intended) < 0.9, name  # what rounding to nearest keeps
    embedding = model.model.embed_tokens
    ids = torch.arange(embedding.num_embeddings).view(4, -1)
    with torch.no_grad():  # a lookup of every row is the merged table, bit for bit
        rows = embedding.factors["ft"].add_gathered(embedding.weight[ids], ids)
        assert torch.equal(rows.view(-1, rows.shape[-1]), embedding.factors["ft"].merged(embedding.weight))
        assert torch.equal(embedding(ids), rows)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", sorted(HALF))
def test_a_load_keeps_the_bases_non_finite_values_and_refuses_an_overflow(dtype, rounding):
    torch_dtype = HALF[dtype][0]
    top = float(torch.finfo(torch_dtype).max)
    base = torch.randn(6, 4).to(torch_dtype)
    base[0, :3] = torch.tensor([float("inf"), float("nan"), top], dtype=torch_dtype)
    delta = torch.randn(6, 4) * 1e-3
    delta[0, 2] = 0.0  # the largest value plus nothing stays the largest value
    encoding = DenseEncoding()
    entry = TensorEntry(encoding, (6, 4), dtype, rounding=rounding)
    got = reconstruct_stored("w", [(entry, encoding.encode(delta), 1.0)], base, dtype=torch_dtype)
    want = stochastic_cast(base.float() + delta, torch_dtype, dither(base, "w", rounding))
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])
    assert got[0, 0] == float("inf") and got[0, 1].isnan() and got[0, 2] == top
    delta[0, 2] = top / 64  # pushes the largest value past it: an infinity the base did not have
    with pytest.raises(NumericalError, match="overflows"):
        reconstruct_stored("w", [(entry, encoding.encode(delta), 1.0)], base, dtype=torch_dtype)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_an_on_the_fly_dare_merge_rounds_only_the_kept_positions(bf16_pair, tmp_path, rounding):
    from transformers import AutoModelForCausalLM

    from delta_format.loaders.onthefly import attach_deltas

    base_dir, ft_dir = bf16_pair
    out = compress(base_dir, ft_dir, tmp_path / "dare", method="dare", p=0.9, rounding=rounding, progress=False)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    attach_deltas(model, {"ft": out.directory})
    name = "model.layers.1.self_attn.o_proj.weight"
    module = model.model.layers[1].self_attn.o_proj
    factor, weight = module.factors["ft"], module.weight.detach()
    assert factor.inner.sparse() is not None  # the sparse merge is the one under test
    with DeltaReader(out.directory) as reader:
        entry = reader.entry(name)
        assert entry.rounding == rounding
        loaded = reconstruct_stored(name, [(entry, reader.stored(name), 1.0)], weight, dtype=torch.bfloat16)
    with torch.no_grad():
        merged = factor.merged(weight)
        factor.inner.sparse = lambda: None  # the whole-matrix dithered merge
        whole = factor.merged(weight)
    assert torch.equal(merged.view(torch.int16), whole.view(torch.int16))  # the same bits, O(kept) work
    assert not torch.equal(merged, factor.inner.merged(weight))  # not the nearest merge
    # as a load rounds it, but for kept values the factor holds scaled in bfloat16 (1 ulp apart)
    apart = merged.view(torch.int16).int() - loaded.view(torch.int16).int()
    assert int(apart.abs().max()) <= 1 and float((apart != 0).float().mean()) < 0.01


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_a_cuda_reconstruction_rounds_bit_for_bit_as_the_cpu_one(rounding):
    base = torch.randn(300, 70).to(torch.bfloat16)
    delta = torch.randn(300, 70) * 1e-3
    encoding = DenseEncoding()
    entry = TensorEntry(encoding, (300, 70), "bfloat16", rounding=rounding)
    cpu = reconstruct_stored("w", [(entry, encoding.encode(delta), 1.0)], base, dtype=torch.bfloat16)
    stored = {k: v.cuda() for k, v in encoding.encode(delta).items()}
    cuda = reconstruct_stored("w", [(entry, stored, 1.0)], base.cuda(), dtype=torch.bfloat16)
    assert torch.equal(cuda.cpu().view(torch.int16), cpu.view(torch.int16))
    counters = torch.randperm(300 * 70)[:500]
    got = Dither(rounding, "w", (300, 70)).at(counters.cuda()).cpu()
    assert torch.equal(got, Dither(rounding, "w", (300, 70)).at(counters))
