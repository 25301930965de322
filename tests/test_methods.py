"""Each edit method against its definition, on real tensors; DAREx-L2 on a real fine-tune."""

from __future__ import annotations

import math

import pytest
import torch

from delta_format import InvalidArgumentError
from delta_format.core.encodings import index_coding_bytes
from delta_format.core.reconstruct import reconstruct
from delta_format.core.seeded_mask import kept_positions
from delta_format.methods import METHODS, TensorContext, get_method
from delta_format.methods.activations import ActivationStats
from delta_format.methods.darex import mse_optimal_rescale
from delta_format.methods.dense import same_bits
from delta_format.methods.magnitude import top_positions
from delta_format.regularization import DeltaL2Callback, DeltaL2Regularizer
from tests.models import TRAIN_TEXT, finetune_by_training, tiny_llama


def rows_delta(rows=64, cols=96, seed=0):
    """A delta whose rows differ in magnitude, as fine-tuning deltas do."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 1e-2


def decode(edit, shape, name="w"):
    return edit.encoding.decode(edit.stored, tuple(shape), name, torch.float32)


def ctx(name="w", **kw):
    return TensorContext(name, **kw)


# -- registry ------------------------------------------------------------------------------------


def test_registry_has_every_method_the_cli_offers():
    from delta_format.cli import build_parser

    compress = build_parser()._subparsers._group_actions[0].choices["compress"]
    method_choices = next(a.choices for a in compress._actions if a.dest == "method")
    assert set(method_choices) == set(METHODS)


def test_unknown_method_is_an_error():
    with pytest.raises(InvalidArgumentError, match="unknown edit method"):
        get_method("dare2")


def test_unknown_parameter_is_an_error_not_a_default():
    with pytest.raises(InvalidArgumentError, match=r"\['pp'\]"):
        get_method("dare", pp=0.9)


@pytest.mark.parametrize(
    "name,params",
    [
        ("dare", {"p": 1.0}),
        ("dare", {"p": -0.1}),
        ("dare", {"k": 0}),
        ("darex", {"q": "sometimes"}),
        ("darex", {"q": -1}),
        ("sign", {"scale": "col"}),
        ("lowrank", {"rank": 0}),
        ("lowrank", {"rank": 2, "energy": 0.9}),
        ("lowrank", {"energy": 1.5}),
        ("structural", {"axis": "diagonal"}),
    ],
)
def test_out_of_range_parameters_are_refused(name, params):
    with pytest.raises(InvalidArgumentError):
        get_method(name, **params)


# -- dense ---------------------------------------------------------------------------------------


def test_dense_stores_a_bf16_delta_when_it_reconstructs_the_finetune_exactly():
    base = torch.randn(64, 64).to(torch.bfloat16)
    ft = (base.float() * 1.01).to(torch.bfloat16)
    delta = ft.float() - base.float()
    edit = get_method("dense", form="delta").edit("w", delta, ctx(base=base, finetune=ft, value_dtype=torch.bfloat16))
    assert edit.encoding.name == "dense" and edit.lossless
    assert edit.stored["delta"].dtype == torch.bfloat16
    assert same_bits(reconstruct("w", _entry(edit, ft), decode(edit, ft.shape), base), ft)


def test_dense_widens_to_float32_when_the_bf16_delta_would_round():
    base = torch.tensor([1.0, 3.0]).to(torch.bfloat16)
    ft = torch.tensor([1.0 + 2**-7, 3.0e-3]).to(torch.bfloat16)  # second delta needs more than 8 bits
    delta = ft.float() - base.float()
    edit = get_method("dense", form="delta").edit("w", delta, ctx(base=base, finetune=ft, value_dtype=torch.bfloat16))
    assert edit.stored["delta"].dtype == torch.float32
    assert same_bits(reconstruct("w", _entry(edit, ft), decode(edit, ft.shape), base), ft)


def test_dense_falls_back_to_replace_where_no_delta_reconstructs_and_says_why():
    base = torch.tensor([1.0e8, 2.0])
    ft = torch.tensor([1.0, 2.5])  # 1 - 1e8 rounds in float32, so base + delta != 1
    edit = get_method("dense").edit("w", ft - base, ctx(base=base, finetune=ft))
    assert edit.encoding.name == "replace" and edit.lossless
    assert same_bits(edit.stored["value"], ft)
    assert "1 of 2 entries" in edit.stats["reason"]


def _entry(edit, ft):
    from delta_format.core.manifest import TensorEntry

    return TensorEntry(edit.encoding, tuple(ft.shape), str(ft.dtype).removeprefix("torch."))


# -- dare ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_dare_keeps_a_binomial_fraction(p):
    n = 200_000
    edit = get_method("dare", p=p).edit("w", torch.randn(n), ctx(seed=3))
    kept = edit.stored["values"].numel()
    mean, sd = n * (1 - p), math.sqrt(n * p * (1 - p))
    assert abs(kept - mean) < 5 * sd


def test_dare_rescales_kept_entries_by_k_over_one_minus_p_exactly():
    delta = rows_delta()
    edit = get_method("dare", p=0.8, k=0.5).edit("w", delta, ctx(seed=1))
    assert edit.encoding.scale == 0.5 / (1 - 0.8)
    positions = kept_positions(delta.numel(), 0.8, 1, "w")
    expected = torch.zeros(delta.numel())
    expected[positions] = delta.reshape(-1)[positions] * edit.encoding.scale
    assert torch.equal(decode(edit, delta.shape).reshape(-1), expected)


def test_dare_stores_only_the_kept_values_because_the_mask_comes_from_the_seed():
    delta = rows_delta()
    edit = get_method("dare", p=0.9).edit("w", delta, ctx(seed=5, value_dtype=torch.bfloat16))
    assert set(edit.stored) == {"values"}
    assert edit.stored["values"].dtype == torch.bfloat16
    assert edit.encoding.to_dict() == {"index_coding": "seeded", "scale": 1 / (1 - 0.9), "seed": 5, "p": 0.9}


def test_dare_masks_differ_between_seeds_and_tensors():
    delta = torch.ones(10_000)
    a = get_method("dare", p=0.5).edit("w", delta, ctx(seed=0))
    b = get_method("dare", p=0.5).edit("w", delta, ctx(seed=1))
    c = get_method("dare", p=0.5).edit("v", delta, ctx("v", seed=0))
    masks = [decode(e, delta.shape, n) != 0 for e, n in ((a, "w"), (b, "w"), (c, "v"))]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


# -- darex ---------------------------------------------------------------------------------------


def test_darex_with_a_given_q_rescales_by_one_over_q():
    edit = get_method("darex", p=0.99, q=0.04).edit("w", rows_delta(), ctx())
    assert edit.encoding.scale == 1 / 0.04
    assert edit.stats["q_source"] == "given"


def test_darex_uses_the_same_mask_as_dare():
    delta = rows_delta()
    dare = get_method("dare", p=0.9).edit("w", delta, ctx(seed=2))
    darex = get_method("darex", p=0.9, q=0.5).edit("w", delta, ctx(seed=2))
    assert torch.equal(dare.stored["values"], darex.stored["values"])


def test_rescale_terms_are_the_sums_of_s_squared_and_v_over_units_and_tokens():
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(20, 8, generator=g), torch.randn(5, 8, generator=g)
    s2, v = ActivationStats("linear", x, input_axis=1).rescale_terms(delta)
    s2_loop = sum(float((delta[i] * x[t]).sum()) ** 2 for i in range(5) for t in range(20))
    v_loop = sum(float((delta[i] ** 2 * x[t] ** 2).sum()) for i in range(5) for t in range(20))
    assert s2 == pytest.approx(s2_loop, rel=1e-5) and v == pytest.approx(v_loop, rel=1e-5)
    conv = ActivationStats("linear", x, input_axis=0).rescale_terms(delta.T.contiguous())  # GPT-2 Conv1D layout
    assert conv == pytest.approx((s2, v), rel=1e-6)


def test_mse_optimal_rescale_beats_dare_and_the_grid_around_it():
    """c* = S²/((1-p)S² + pV) minimises the expected output MSE: check it on sampled masks
    against DARE's 1/(1-p) and against neighbouring rescales."""
    g = torch.Generator().manual_seed(0)
    p, out, fan_in, tokens = 0.99, 32, 256, 64
    x = torch.randn(tokens, fan_in, generator=g)
    delta = (torch.randn(out, fan_in, generator=g) + 0.3) * 1e-2  # a mean, as real deltas have
    stats = ActivationStats("linear", x)
    c_star = mse_optimal_rescale(*stats.rescale_terms(delta), p)
    assert 1.0 < c_star < 1 / (1 - p)  # q* = 1/c* lies between 1 - p and 1

    def measured(c, trials=300):
        total = 0.0
        for t in range(trials):
            mask = torch.rand(delta.shape, generator=torch.Generator().manual_seed(t)) >= p
            total += stats.output_sq_error(delta * mask * c, delta)
        return total / trials

    at_optimum = measured(c_star)
    assert at_optimum < 0.2 * measured(1 / (1 - p))
    assert at_optimum <= 1.02 * min(measured(c_star * 0.7), measured(c_star * 1.4))


def test_darex_mse_computes_q_per_tensor_from_activations():
    g = torch.Generator().manual_seed(1)
    x, delta = torch.randn(64, 96, generator=g), rows_delta()
    stats = ActivationStats("linear", x)
    edit = get_method("darex", p=0.9, q="mse").edit("w", delta, ctx(activations=stats))
    assert edit.encoding.scale == pytest.approx(mse_optimal_rescale(*stats.rescale_terms(delta), 0.9))
    assert edit.stats["q"] == pytest.approx(1 / edit.encoding.scale)


def test_darex_mse_does_not_rescale_elementwise_parameters():
    """A bias or norm scale has S² = V for every output, so c* = 1: drop without rescaling."""
    edit = get_method("darex", p=0.9, q="mse").edit(
        "b", torch.randn(64), ctx("b", activations=ActivationStats("elementwise"))
    )
    assert edit.encoding.scale == pytest.approx(1.0)


def test_darex_auto_rescales_so_the_kept_entries_move_the_outputs_as_much_as_the_delta():
    g = torch.Generator().manual_seed(1)
    x, delta = torch.randn(64, 96, generator=g), rows_delta()
    stats = ActivationStats("linear", x)
    edit = get_method("darex", p=0.99, q="auto").edit("w", delta, ctx(activations=stats))
    decoded = edit.decode(tuple(delta.shape), "w", torch.float32)
    assert stats.output_energy(decoded) == pytest.approx(stats.output_energy(delta), rel=1e-4)
    assert edit.stats["q_source"].startswith("output norm")


def test_darex_auto_shrinks_the_delta_far_less_than_the_layer_mse_rule_at_p_099():
    g = torch.Generator().manual_seed(2)
    x, delta = torch.randn(64, 96, generator=g), rows_delta()
    stats = ActivationStats("linear", x)
    auto, mse = (get_method("darex", p=0.99, q=q).edit("w", delta, ctx(activations=stats)) for q in ("auto", "mse"))
    assert auto.encoding.scale > 3 * mse.encoding.scale


def test_darex_auto_keeps_dares_rescale_where_its_noise_is_small_beside_the_base():
    from delta_format.methods.darex import noise_tolerated

    g = torch.Generator().manual_seed(3)
    x, delta = torch.randn(64, 96, generator=g), rows_delta()
    stats = ActivationStats("linear", x)
    near = delta.norm() / 0.002 * torch.randn(64, 96, generator=g) / 96**0.5 / 64**0.5  # ||Δ|| = 0.2 % of ||W||
    far = delta * 10  # ||Δ|| = 10 % of ||W||
    assert noise_tolerated(delta, near, 0.99) and not noise_tolerated(delta, far, 0.99)
    small = get_method("darex", p=0.99, q="auto").edit("w", delta, ctx(activations=stats, base=near))
    assert small.encoding.scale == pytest.approx(100.0) and small.stats["q_source"].startswith("DARE's 1-p")
    large = get_method("darex", p=0.99, q="auto").edit("w", delta, ctx(activations=stats, base=far))
    assert large.stats["q_source"].startswith("output norm") and large.encoding.scale < 50


def test_darex_auto_without_statistics_falls_back_to_dare_and_says_so():
    edit = get_method("darex", p=0.9, q="auto").edit("w", rows_delta(), ctx())
    assert edit.encoding.scale == pytest.approx(10.0)
    assert "no activation statistics" in edit.stats["q_source"]


def test_darex_auto_mse_and_output_need_calibration_but_a_number_does_not():
    assert get_method("darex", q="auto").needs_calibration()
    assert get_method("darex", q="mse").needs_calibration()
    assert get_method("darex", q="output").needs_calibration()
    assert not get_method("darex", q=0.2).needs_calibration()


# -- magnitude, importance, structural -----------------------------------------------------------


def test_top_positions_keeps_exactly_k_with_ties_broken_by_position():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.0])
    assert top_positions(scores, 3).tolist() == [1, 2, 3]
    assert top_positions(scores, 0).tolist() == [] and top_positions(scores, 6).tolist() == list(range(6))


@pytest.mark.parametrize("k", [1, 1000, 600_000, 1_200_000])
def test_sampled_kth_largest_is_exact_on_large_tensors_with_ties(k):
    from delta_format.methods.magnitude import kth_largest

    g = torch.Generator().manual_seed(k)
    values = (torch.randn(1_200_000, generator=g) * 8).round()  # many ties
    assert torch.equal(kth_largest(values, k), values.kthvalue(values.numel() - k + 1).values)


@pytest.mark.parametrize("kind", ["continuous", "rounded", "mostly_zero", "some_zero"])
@pytest.mark.parametrize("fraction", [0.001, 0.1, 0.5, 0.97])
def test_top_positions_on_large_tensors_equals_a_stable_sort(kind, fraction):
    # The large-tensor paths (sampled bracket, candidates above it, ties at its low end) must pick
    # exactly what a stable descending sort picks: the k largest, ties broken by position.
    g = torch.Generator().manual_seed(len(kind))
    n = 400_000
    scores = torch.randn(n, generator=g).abs()
    if kind == "rounded":
        scores = (scores * 4).round()
    elif kind != "continuous":
        scores *= torch.rand(n, generator=g) < (0.1 if kind == "mostly_zero" else 0.9)
    k = round(fraction * n)
    expected = torch.sort(scores, descending=True, stable=True).indices[:k].sort().values
    assert torch.equal(top_positions(scores, k), expected)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_magnitude_keeps_the_largest_entries_exactly_with_the_cheaper_index_coding(p):
    delta = rows_delta(128, 128)
    edit = get_method("magnitude", p=p).edit("w", delta, ctx())
    restored = decode(edit, delta.shape)
    kept = restored != 0
    assert int(kept.sum()) == round((1 - p) * delta.numel())
    assert torch.equal(restored[kept], delta[kept])
    assert float(delta[~kept].abs().max()) <= float(delta[kept].abs().min())
    costs = index_coding_bytes(kept.reshape(-1).nonzero().view(-1), delta.numel())
    assert edit.encoding.index_coding == min(costs, key=costs.get)


def test_importance_weighs_entries_by_the_norm_of_their_input_feature():
    delta = torch.ones(16, 8) * 1e-2
    delta[:, 0] = 2e-2  # larger entries...
    x = torch.ones(32, 8)
    x[:, 3] = 10.0  # ...but feature 3 meets large inputs
    edit = get_method("importance", p=1 - 16 / 128).edit("w", delta, ctx(activations=ActivationStats("linear", x)))
    kept = decode(edit, delta.shape) != 0
    assert kept[:, 3].all() and not kept[:, 0].any()
    plain = get_method("magnitude", p=1 - 16 / 128).edit("w", delta, ctx())
    assert (decode(plain, delta.shape) != 0)[:, 0].all()


def test_importance_without_layer_inputs_falls_back_to_magnitude():
    edit = get_method("importance", p=0.5).edit("b", torch.randn(64), ctx("b"))
    assert edit.stats["criterion"].startswith("magnitude")


@pytest.mark.parametrize("axis", ["row", "column"])
def test_structural_keeps_whole_slices_with_the_largest_norm(axis):
    delta = rows_delta(64, 96)
    edit = get_method("structural", p=0.75, axis=axis).edit("w", delta, ctx())
    restored = decode(edit, delta.shape)
    dim = 1 if axis == "row" else 0
    kept = (restored != 0).any(dim=dim)
    assert int(kept.sum()) == round(0.25 * delta.shape[1 - dim])
    slices = restored if axis == "row" else restored.T
    original = delta if axis == "row" else delta.T
    assert torch.equal(slices[kept], original[kept])
    norms = original.norm(dim=1)
    assert float(norms[~kept].max()) <= float(norms[kept].min())
    if axis == "row":  # gaps jump whole rows, so every gap would need a wide integer
        assert edit.encoding.index_coding == "bitmask"


# -- sign ----------------------------------------------------------------------------------------


def test_sign_tensor_scale_is_mean_abs_delta_in_float16_and_signs_are_the_deltas():
    delta = rows_delta()
    edit = get_method("sign", scale="tensor").edit("w", delta, ctx())
    restored = decode(edit, delta.shape)
    assert edit.stored["scale"].dtype == torch.float16
    assert torch.equal(restored.abs().unique(), delta.abs().mean().reshape(1).half().float())
    assert torch.equal(restored > 0, delta >= 0)


def test_sign_row_scales_are_each_rows_mean_abs_delta_in_float16():
    delta = rows_delta()
    restored = decode(get_method("sign", scale="row", scale_bits=16).edit("w", delta, ctx()), delta.shape)
    want = delta.abs().mean(dim=1, keepdim=True).half().float().expand_as(delta)
    assert torch.equal(restored.abs(), want)


def test_sign_scales_too_small_for_float16_are_stored_in_float32():
    delta = rows_delta() * 1e-4  # mean |delta| ~ 1e-7: a float16 subnormal
    edit = get_method("sign", scale="row", scale_bits=16).edit("w", delta, ctx())
    assert edit.stored["scale"].dtype == torch.float32
    coded = get_method("sign", scale="row").edit("w", delta, ctx())  # 8-bit codes, the default
    assert coded.stored["scale_scales"].dtype == torch.float32  # their group scales too
    rows = decode(coded, delta.shape).abs().amax(1)
    assert float((rows / delta.abs().mean(1) - 1).abs().median()) < 0.01


def test_sign_row_scales_default_to_8_bit_codes_and_a_tensor_scale_to_a_float():
    assert get_method("sign", scale="row").scale_bits == 8
    assert get_method("sign", scale="tensor").scale_bits == 16
    edit = get_method("sign", scale="tensor").edit("w", rows_delta(), ctx())
    assert set(edit.stored) == {"bits", "scale"}


def test_layer_fit_sign_scales_give_a_lower_layer_output_error_than_mean_abs_scales():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 96, generator=g) * torch.linspace(0.1, 3, 96)  # inputs of unequal energy
    stats, delta = ActivationStats("linear", x), rows_delta()
    plain, fitted = (
        get_method("sign", scale="row", layer_fit=f).edit("w", delta, ctx(activations=stats)) for f in (False, True)
    )
    errors = [stats.output_sq_error(decode(e, delta.shape), delta) for e in (plain, fitted)]
    assert errors[1] < errors[0] and fitted.stats["scale_source"] == "layer fit"  # the minimiser, per row


def test_per_row_sign_scales_fit_rows_of_different_magnitude_better():
    delta = rows_delta()
    errors = {
        s: (decode(get_method("sign", scale=s).edit("w", delta, ctx()), delta.shape) - delta).norm()
        for s in ("tensor", "row")
    }
    assert errors["row"] < 0.9 * errors["tensor"]


def test_sign_on_a_vector_uses_one_scale_and_records_it():
    edit = get_method("sign", scale="row").edit("b", torch.randn(10), ctx("b"))
    assert edit.encoding.granularity == "tensor" and edit.stats["scale"] == "tensor"


@pytest.mark.parametrize("bits", [8, 4])
def test_sign_row_scales_as_codes_decode_alike_on_every_path_at_a_fraction_of_the_size(bits):
    from delta_format.core.encodings import SignEncoding

    delta = rows_delta()
    floats = get_method("sign", scale="row", scale_bits=16).edit("w", delta, ctx())
    coded = get_method("sign", scale="row", scale_bits=bits).edit("w", delta, ctx())
    assert coded.encoding.to_dict() == {"scale": "row", "scale_bits": bits, "scale_group": 64}
    assert set(coded.stored) == {"bits", "scale_codes", "scale_scales"}
    assert torch.equal(coded.stored["bits"], floats.stored["bits"])
    exact, rounded = decode(floats, delta.shape), decode(coded, delta.shape)
    exact_scale, coded_scale = exact.abs().amax(1), rounded.abs().amax(1)  # rows_delta: 60 rows, one group
    half_step = float(exact_scale.max()) / (2**bits - 1)  # absmax: the group's largest scale / (2^b - 1)
    assert float((coded_scale - exact_scale).abs().max()) <= half_step * 1.05  # + float16 scales' rounding
    error = [float((r - delta).norm() / delta.norm()) for r in (exact, rounded)]
    assert error[1] < error[0] * (1.001 if bits == 8 else 1.01)  # the signs' error dominates
    saved = floats.stored["scale"].numel() * 16 - coded.stored["scale_codes"].numel() * 8
    assert saved >= delta.shape[0] * (16 - bits) - 16 * coded.stored["scale_scales"].numel()
    encoding = SignEncoding.from_dict(coded.encoding.to_dict())  # as a reader builds it
    rows = torch.zeros(delta.shape)
    encoding.rows(coded.stored, tuple(delta.shape), "w", torch.float32).add_rows(rows, 0, delta.shape[0])
    assert torch.equal(rows, rounded)
    factor = encoding.factor(coded.stored, tuple(delta.shape), "w", torch.float32)
    x = torch.randn(5, delta.shape[1])
    assert torch.allclose(factor.product(x), x @ rounded.T, atol=1e-5)  # the on-the-fly path


def test_sign_scale_codes_are_refused_where_they_mean_nothing():
    from delta_format import ManifestError
    from delta_format.core.encodings import SignEncoding

    for bits in (0, 1, 9, 12, True):
        with pytest.raises(InvalidArgumentError, match="scale_bits"):
            get_method("sign", scale="row", scale_bits=bits)
    with pytest.raises(InvalidArgumentError, match="per-row"):
        get_method("sign", scale="tensor", scale_bits=8)
    for config in (
        {"scale": "tensor", "scale_bits": 8, "scale_group": 64},
        {"scale": "row", "scale_bits": 8},
        {"scale": "row", "scale_group": 64},
        {"scale": "row", "scale_bits": 9, "scale_group": 64},
        {"scale": "row", "scale_bits": 8, "scale_group": 0},
    ):
        with pytest.raises(ManifestError):
            SignEncoding.from_dict(config)


# -- lowrank, lora -------------------------------------------------------------------------------


def test_lowrank_at_the_deltas_rank_is_exact_to_float32_rounding():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 3, generator=g) @ torch.randn(3, 80, generator=g)
    edit = get_method("lowrank", rank=3).edit("w", delta, ctx())
    assert edit.encoding.rank == 3 and set(edit.stored) == {"u", "v"}
    assert torch.allclose(decode(edit, delta.shape), delta, atol=1e-5 * float(delta.abs().max()))


def test_lowrank_truncation_error_is_the_tail_of_the_singular_values():
    delta = rows_delta(64, 96)
    s = torch.linalg.svdvals(delta)
    edit = get_method("lowrank", rank=8).edit("w", delta, ctx())
    error = float((decode(edit, delta.shape) - delta).norm())
    assert error == pytest.approx(float(s[8:].norm()), rel=1e-3)


def test_lowrank_energy_picks_the_smallest_rank_holding_that_fraction():
    delta = rows_delta(64, 96)
    energy = torch.linalg.svdvals(delta).square().cumsum(0) / delta.square().sum()
    edit = get_method("lowrank", energy=0.5).edit("w", delta, ctx())
    r = edit.encoding.rank
    assert float(energy[r - 1]) >= 0.5 > float(energy[r - 2])


def test_lowrank_stores_vectors_and_unprofitable_ranks_dense():
    base, ft = torch.zeros(8), torch.randn(8)
    vector = get_method("lowrank", rank=2).edit("b", ft - base, ctx("b", base=base, finetune=ft))
    assert vector.encoding.name == "dense" and "vector" in vector.stats["reason"]
    base, ft = torch.zeros(8, 8), torch.randn(8, 8)
    square = get_method("lowrank", rank=4).edit("w", ft - base, ctx(base=base, finetune=ft))
    assert square.encoding.name == "dense" and "no smaller" in square.stats["reason"]


def test_lowrank_without_rank_or_energy_needs_adapter_factors():
    with pytest.raises(InvalidArgumentError, match="needs rank= or energy="):
        get_method("lowrank").edit("w", rows_delta(), ctx())


def test_lora_stores_the_adapter_factors_as_given():
    u, v = torch.randn(64, 4), torch.randn(4, 96)
    edit = get_method("lora").edit("w", u @ v, ctx(factors=(u, v)))
    assert torch.equal(edit.stored["u"], u) and torch.equal(edit.stored["v"], v)


# -- DAREx-L2 ------------------------------------------------------------------------------------


def test_darex_l2_keeps_the_delta_smaller_and_dare_more_faithful():
    base = tiny_llama()
    plain = finetune_by_training(base, steps=15, lr=1e-3)
    regularized = finetune_by_training(base, steps=15, lr=1e-3, regularizer=lambda m: DeltaL2Regularizer(m, 50.0))

    def delta_norm_and_dare_error(ft):
        deltas = [pf.detach() - pb.detach() for pf, pb in zip(ft.parameters(), base.parameters())]
        norm = math.sqrt(sum(float(d.square().sum()) for d in deltas))
        dare = get_method("dare", p=0.9)
        err = math.sqrt(
            sum(
                float((decode(dare.edit(f"t{i}", d, ctx(f"t{i}")), d.shape, f"t{i}") - d).square().sum())
                for i, d in enumerate(deltas)
            )
        )
        return norm, err

    norm_plain, err_plain = delta_norm_and_dare_error(plain)
    norm_reg, err_reg = delta_norm_and_dare_error(regularized)
    assert norm_reg < 0.9 * norm_plain
    assert err_reg < 0.9 * err_plain


def test_coupled_darex_l2_adds_the_penalty_gradient():
    model = torch.nn.Linear(4, 3)
    reg = DeltaL2Regularizer(model, 0.5, decoupled=False)
    with torch.no_grad():
        model.weight.add_(1.0)
    model.weight.grad = torch.zeros_like(model.weight)
    reg.add_gradients()
    assert torch.allclose(model.weight.grad, torch.full_like(model.weight, 2 * 0.5 * 1.0))
    assert float(reg.penalty().detach()) == pytest.approx(0.5 * model.weight.numel())


def test_darex_l2_callback_pulls_towards_the_base_inside_a_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from tests.models import encode

    base = tiny_llama()
    ids = encode(TRAIN_TEXT)[0][:64]
    data = [{"input_ids": ids, "labels": ids}] * 4

    def train(callbacks):
        model = tiny_llama()
        args = TrainingArguments(
            output_dir=str(tmp_path / "run"),
            max_steps=4,
            per_device_train_batch_size=1,
            learning_rate=1e-3,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks(model)).train()
        with torch.no_grad():
            return math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(model.parameters(), base.parameters())))

    plain = train(lambda m: [])
    pulled = train(lambda m: [DeltaL2Callback(m, 200.0)])
    assert pulled < 0.9 * plain


def test_dense_with_alpha_keeps_a_delta_so_alpha_applies():
    base = torch.tensor([1.0e8, 2.0])
    ft = torch.tensor([1.0, 2.5])
    edit = get_method("dense").edit("w", ft - base, ctx(base=base, finetune=ft, alpha=1.5))
    assert edit.encoding.name == "dense" and not edit.lossless
    assert edit.stats["exact_at_alpha_1"] is False
