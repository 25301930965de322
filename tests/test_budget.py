"""A size instead of a method: ``compress(..., bits=)`` allocates the budget across tensors
(`delta_format.methods.allocation`), meets it on disk, records what it chose, and spends bits where
they buy the most; DARE's kept values as codes (``value_bits``)."""

from __future__ import annotations

import pytest
import torch

import delta_format
from delta_format.io.reader import DeltaReader
from delta_format.methods import get_method
from delta_format.methods.allocation import Menu, Option, allocate, menu_for, vector_tables
from delta_format.methods.base import TensorContext
from tests.models import finetune_by_training, save, tiny_llama


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    base = tiny_llama()
    ft = finetune_by_training(base, steps=20, lr=1e-3)
    numel = sum(p.numel() for p in ft.parameters())
    return {"base": save(base, root / "base"), "ft": save(ft, root / "ft"), "numel": numel}


def tensor_bytes(directory) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@pytest.mark.parametrize("bits", [1.0, 0.2])
def test_bits_meets_the_budget_on_disk(pair, tmp_path, bits):
    delta = delta_format.compress(pair["base"], pair["ft"], tmp_path / "d", bits=bits, progress=False)
    assert delta.manifest.method == "budget"
    on_disk = 8 * tensor_bytes(tmp_path / "d") / pair["numel"]
    assert bits * 0.7 < on_disk <= bits  # headers included: an upper bound is planned for each entry


def test_header_bits_bound_the_written_header_entries(pair, tmp_path):
    import json
    import struct

    from delta_format.methods.allocation import FILE_BITS, header_bits

    delta_format.compress(pair["base"], pair["ft"], tmp_path / "d", bits=0.5, progress=False)
    for path in (tmp_path / "d").glob("*.safetensors"):
        raw = path.read_bytes()
        length = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + length])
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        planned = sum(header_bits(k.split(":")[0]) for k in entries) + FILE_BITS
        assert 8 * (8 + length) <= planned
        for key, value in entries.items():
            assert 8 * (len(json.dumps({key: value}, separators=(",", ":"))) - 1) <= header_bits(key.split(":")[0])


def test_a_bigger_budget_gives_a_smaller_error(pair, tmp_path):
    errors = [
        delta_format.compress(pair["base"], pair["ft"], tmp_path / f"d{b}", bits=b, progress=False).manifest.stats[
            "rel_error"
        ]
        for b in (0.1, 0.5, 2.0)
    ]
    assert errors[0] > errors[1] > errors[2]


def test_the_manifest_records_the_plan_and_each_choice(pair, tmp_path):
    delta = delta_format.compress(pair["base"], pair["ft"], tmp_path / "d", bits=0.3, progress=False)
    plan = delta.manifest.stats["prepare"]["budget"]
    assert plan["bits_per_weight_target"] == 0.3 and plan["bits_per_weight_planned"] <= 0.3
    assert sum(plan["choices"].values()) == delta.manifest.stats["tensors"]["edited"] + len(plan["dropped"])
    with DeltaReader(tmp_path / "d") as reader:
        for name, entry in reader.manifest.tensors.items():
            assert entry.stats["method"] == "budget" and entry.stats["choice"] and name not in plan["dropped"]


def test_dropped_tensors_keep_the_base_value(pair, tmp_path):
    delta = delta_format.compress(pair["base"], pair["ft"], tmp_path / "d", bits=0.05, progress=False)
    dropped = delta.manifest.stats["prepare"]["budget"]["dropped"]
    assert dropped and not set(dropped) & set(delta.manifest.tensors)


def test_low_rank_vectors_get_more_bits_for_larger_singular_values():
    u, v = torch.linalg.qr(torch.randn(96, 96))[0], torch.linalg.qr(torch.randn(80, 80))[0]
    delta = (u[:, :80] * (0.9 ** torch.arange(80.0))) @ v.T
    cost, error, _ = vector_tables(delta)
    menu = Menu("w", delta.numel(), [Option("drop", 0, float(error[:, 0].sum()), ("drop",))], cost, error)
    option = menu.best(price=error[0, 0].item() / cost[0, -1].item() * 1e-3)
    widths = [b for count, b in option.spec[2] for _ in range(count)]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]


def test_the_vector_error_estimate_matches_the_encoded_error():
    from delta_format.core.encodings import QuantizedLowRankEncoding

    delta = torch.randn(64, 8) @ torch.randn(8, 48) * 0.01
    cost, error, (u, s, vh) = vector_tables(delta)
    estimate = float(error[:8, 3].sum() + error[8:, 0].sum())  # 3 bits on the top 8 vectors
    enc = QuantizedLowRankEncoding([(8, 3)], 64)
    stored = enc.encode(delta, u=(u * s)[:, :8], v=vh[:8])
    measured = float((enc.decode(stored, (64, 48), "w", torch.float32) - delta).double().square().sum())
    assert measured == pytest.approx(estimate, rel=0.2)


def test_allocation_spends_where_the_error_drops_most():
    steep = Menu("steep", 100, [Option("drop", 0, 100.0, ("drop",)), Option("keep", 800, 1.0, ("x",))])
    flat = Menu("flat", 100, [Option("drop", 0, 10.0, ("drop",)), Option("keep", 800, 9.0, ("x",))])
    choice, _ = allocate([steep, flat], 1000)
    assert choice["steep"].label == "keep" and choice["flat"].label == "drop"


def test_vectors_are_stored_in_16_bits_and_dropped_when_the_budget_is_small():
    menu, _ = menu_for("b", torch.full((64,), 1e-3))
    assert {o.label for o in menu.options} == {"drop", "dense float16"}
    assert allocate([menu], 100)[0]["b"].label == "drop"


def test_bits_must_be_positive():
    with pytest.raises(delta_format.InvalidArgumentError):
        get_method("budget", bits=0)


def test_a_delta_of_plus_or_minus_a_row_constant_buys_signs_with_coded_row_scales():
    torch.manual_seed(0)
    rows = torch.rand(128, 1) + 0.5  # each row +-its own constant: full rank, one bit an entry
    delta = torch.where(torch.rand(128, 256) < 0.5, rows, -rows) * 1e-3
    method = get_method("budget", bits=1.2, noise_weight="off")
    choices = plan_of(method, [("w", delta, TensorContext("w"))])
    assert choices["w"].label == "sign row"
    edit = method.edit("w", delta, TensorContext("w"))
    assert edit.encoding.to_dict() == {"scale": "row", "scale_bits": 8, "scale_group": 64}
    stored_bits = sum(8 * t.numel() * t.element_size() for t in edit.stored.values())
    assert stored_bits <= choices["w"].bits  # the plan counts the payload and three header entries
    error = float((edit.decode((128, 256), "w", torch.float32) - delta).double().square().sum())
    assert error == pytest.approx(choices["w"].error, rel=0.01)  # the plan's (its scales summed in float64)
    assert error < 1e-4 * float(delta.double().square().sum())  # 8-bit scales of exact signs


# --- DARE with quantised values ------------------------------------------------------------------


def test_dare_value_bits_store_codes_at_a_fraction_of_the_size():
    delta = torch.randn(256, 256) * 0.01
    ctx = TensorContext("w", seed=1, value_dtype=torch.bfloat16)
    floats, codes = (get_method("dare", p=0.9, value_bits=b).edit("w", delta, ctx) for b in (16, 2))
    size = {e.encoding.name: sum(t.numel() * t.element_size() for t in e.stored.values()) for e in (floats, codes)}
    assert size["sparse-q"] * 16 / 2.25 == pytest.approx(size["sparse"], rel=0.02)
    kept = floats.decode((256, 256), "w", torch.float32) != 0
    error = codes.decode((256, 256), "w", torch.float32)[kept] - floats.decode((256, 256), "w", torch.float32)[kept]
    assert float(error.norm() / floats.decode((256, 256), "w", torch.float32)[kept].norm()) < 0.5


def test_dare_value_bits_decode_as_a_reader_does(pair, tmp_path):
    delta = delta_format.compress(pair["base"], pair["ft"], tmp_path / "d", "dare", p=0.9, value_bits=2, progress=False)
    assert 2.5 < delta.manifest.stats["rel_error"] < 3.6  # DARE's sqrt(p / (1 - p)) = 3, plus rounding
    with DeltaReader(tmp_path / "d") as reader:
        assert {e.encoding.name for e in reader.manifest.tensors.values()} == {"sparse-q"}


@pytest.mark.parametrize("p, coding", [(0.9, "gaps"), (0.5, "bitmask")])
def test_magnitude_value_bits_keep_the_same_entries_as_codes(p, coding):
    torch.manual_seed(0)
    delta = torch.randn(256, 256) * 0.01
    ctx = TensorContext("w", value_dtype=torch.bfloat16)
    floats, codes = (get_method("magnitude", p=p, value_bits=b).edit("w", delta, ctx) for b in (16, 4))
    importance = get_method("importance", p=p, value_bits=4).edit("w", delta, ctx)  # no inputs: |delta|
    assert torch.equal(importance.stored["codes"], codes.stored["codes"])
    assert (floats.encoding.name, codes.encoding.name) == ("sparse", "sparse-q")
    assert floats.stats["index_coding"] == codes.stats["index_coding"] == coding
    exact, rounded = (e.decode((256, 256), "w", torch.float32) for e in (floats, codes))
    assert torch.equal(exact != 0, rounded != 0)  # the same positions, stored the same way
    kept = exact != 0
    assert float((rounded - exact)[kept].norm() / exact[kept].norm()) < 0.1  # 4-bit codes of the kept values
    size = {e.encoding.name: sum(t.numel() * t.element_size() for t in e.stored.values()) for e in (floats, codes)}
    assert size["sparse-q"] < 0.6 * size["sparse"]


def test_magnitude_value_bits_decode_as_a_reader_does(pair, tmp_path):
    delta = delta_format.compress(
        pair["base"], pair["ft"], tmp_path / "d", "magnitude", p=0.9, value_bits=2, progress=False
    )
    assert delta.manifest.method_params["value_bits"] == 2
    with DeltaReader(tmp_path / "d") as reader:
        entries = reader.manifest.tensors.values()
        assert {e.encoding.name for e in entries} == {"sparse-q"} and {e.encoding.bits for e in entries} == {2}
    assert 0.3 < delta.manifest.stats["rel_error"] < 0.9  # the 10 % largest entries kept, 2-bit codes


def test_magnitude_value_bits_out_of_range_are_refused():
    for bits in (0, 9, 12, True):
        with pytest.raises(delta_format.InvalidArgumentError, match="value_bits"):
            get_method("magnitude", p=0.9, value_bits=bits)


# --- priors: lookup tables and DARE's noise ------------------------------------------------------


def plan_of(method, tensors):
    """Run ``method.prepare`` on ``(name, delta, context)`` triples; the chosen options by name."""
    method.prepare(lambda: iter(tensors), None)
    return method._choices


def test_lookup_tables_get_fewer_bits_than_linear_layers_with_the_same_error():
    from delta_format.methods.priors import LOOKUP_MIN_ROWS, LOOKUP_WEIGHT

    torch.manual_seed(0)
    delta = torch.randn(LOOKUP_MIN_ROWS, 8) @ torch.randn(8, 48) * 1e-3
    tensors = [(name, delta.clone(), TensorContext(name, lookup=name == "embed")) for name in ("embed", "linear")]
    choices = plan_of(get_method("budget", bits=1.0, noise_weight="off"), tensors)
    assert 0 < LOOKUP_WEIGHT < 1
    assert choices["linear"].bits > choices["embed"].bits
    # without the flag the two identical tensors get the same option
    same = plan_of(
        get_method("budget", bits=1.0, noise_weight="off"), [(n, delta.clone(), TensorContext(n)) for n in "ab"]
    )
    assert same["a"].label == same["b"].label
    # a small table (a character set, positions) is not discounted
    small = delta[:256].clone()
    tensors = [(name, small.clone(), TensorContext(name, lookup=name == "embed")) for name in ("embed", "linear")]
    choices = plan_of(get_method("budget", bits=1.0, noise_weight="off"), tensors)
    assert choices["embed"].label == choices["linear"].label


def test_a_bias_is_kept_before_a_norm_weight_with_the_same_delta():
    from delta_format.methods.priors import BIAS_WEIGHT, error_weight

    torch.manual_seed(0)
    delta = torch.randn(512) * 1e-3
    names = ("layer.norm.bias", "layer.norm.weight")
    # room for one of the two in float16 (plus its header), not both
    method = get_method("budget", bits=12.0, noise_weight="off")
    choices = plan_of(method, [(n, delta.clone(), TensorContext(n)) for n in names])
    assert [choices[n].label for n in names] == ["dense float16", "drop"]
    assert BIAS_WEIGHT > 1 and error_weight("x.bias", delta, False) == BIAS_WEIGHT
    # only additive vectors: a matrix called bias-something, or a 2-D "bias", keeps weight 1
    assert error_weight("x.weight", delta, False) == error_weight("x.bias", delta.view(16, 32), False) == 1.0
    assert error_weight("x.bias_scale", delta, False) == 1.0


def test_lookup_names_are_embeddings_and_heads_tied_or_not():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    from delta_format.io.model_class import lookup_names
    from tests.models import tiny_llama

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    assert lookup_names(gpt2) == {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    assert lookup_names(bert) == {f"embeddings.{k}_embeddings.weight" for k in ("word", "position", "token_type")}
    assert lookup_names(tiny_llama()) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert lookup_names(torch.nn.Sequential(torch.nn.Linear(4, 4))) == set()


def test_a_compression_marks_the_lookup_tables_of_its_model(pair, tmp_path):
    from delta_format.compression.sources import CheckpointSource

    source = CheckpointSource(pair["ft"])
    assert source.lookup_names() == {"model.embed_tokens.weight", "lm_head.weight"}
    assert "model.layers.0.mlp.up_proj.weight" in source.architecture_names()
    delta = delta_format.compress(pair["base"], pair["ft"], tmp_path / "d", bits=0.5, progress=False)
    assert "lookup tables x0.1" in delta.manifest.stats["prepare"]["budget"]["weighting"]


def test_noise_price_grows_with_the_delta_beside_its_base():
    from delta_format.methods.priors import NOISE_SLOPE, noise_price

    base = torch.randn(64, 64)
    small, large = base * 1e-3, base * 0.7
    assert noise_price(small, base) == pytest.approx(NOISE_SLOPE * 1e-3, rel=1e-6)
    assert noise_price(large, base) == 1.0
    assert noise_price(small, None) is None and noise_price(small, torch.zeros(64, 64)) == 1.0


def test_dare_sampling_noise_is_priced_apart_from_the_rounding_of_kept_values():
    from delta_format.methods.allocation import DARE_BITS, DARE_RATES, dare_options
    from delta_format.methods.budget import dare_q

    torch.manual_seed(0)
    delta = torch.randn(128, 96) * 1e-3
    options = {o.label: o for o in dare_options("w", delta, seed=3, noise_weight=1.0)}
    assert len(options) == len(DARE_RATES) * len(DARE_BITS)
    cheap = {o.label: o for o in dare_options("w", delta, seed=3, noise_weight=0.01)}
    for p in DARE_RATES:
        encoding, stored = dare_q("w", delta, 3, p, 8)
        measured = float((encoding.decode(stored, (128, 96), "w", torch.float32) - delta).double().square().sum())
        label = f"dare p={p:g} 8b"
        assert options[label].error == pytest.approx(measured, rel=0.01)  # 8-bit rounding: all noise
        assert options[label].bits >= 8 * sum(t.numel() * t.element_size() for t in stored.values())
        # the noise is priced at 1 %, the rounding in full: 2-bit codes lose more than 8-bit ones
        assert cheap[label].error < 0.02 * measured
        assert cheap[f"dare p={p:g} 2b"].error > cheap[label].error


def test_a_small_full_rank_delta_is_stored_as_dare_and_not_when_dare_is_off():
    torch.manual_seed(0)
    base = torch.randn(384, 384)
    delta = torch.randn(384, 384) * 2e-3  # full rank, 0.2 % of the base: DARE's noise is cheap here
    context = TensorContext("w", base=base)
    auto = plan_of(get_method("budget", bits=0.5), [("w", delta, context)])
    assert auto["w"].spec[0] == "sparse-q"
    off = plan_of(get_method("budget", bits=0.5, noise_weight="off"), [("w", delta, context)])
    assert off["w"].spec[0] != "sparse-q"


@pytest.mark.parametrize("value", [0, 1.5, "sometimes", -0.1, True, float("nan")])
def test_noise_weight_must_be_auto_off_or_a_fraction(value):
    with pytest.raises(delta_format.InvalidArgumentError):
        get_method("budget", bits=1.0, noise_weight=value)


def test_calibrated_weights_are_relative_to_the_mean_linear_layer():
    from delta_format.methods.activations import ActivationStats

    torch.manual_seed(0)
    deltas = {n: torch.randn(128, 32) @ torch.randn(32, 96) * 1e-3 for n in ("quiet", "loud", "embed")}
    deltas["norm"] = torch.randn(96) * 1e-3
    inputs = torch.randn(64, 96)

    def plan(scales: dict[str, float]):
        def context(name):
            stats = ActivationStats("linear", inputs * scales[name]) if name in scales else None
            return TensorContext(name, lookup=name == "embed", activations=stats)

        tensors = [(n, d, context(n)) for n, d in deltas.items()]
        return plan_of(get_method("budget", bits=1.0, noise_weight="off"), tensors)

    labels = {n: o.label for n, o in plan({"quiet": 1, "loud": 10}).items()}
    # inputs 100x larger or smaller everywhere: the same plan, the lookup table included
    for factor in (100, 0.01):
        assert labels == {n: o.label for n, o in plan({"quiet": factor, "loud": 10 * factor}).items()}
    choices = plan({"quiet": 1, "loud": 10})
    assert choices["loud"].bits > choices["quiet"].bits


def test_a_shrunk_vocabulary_is_stored_whole_and_said_to_be_outside_the_budget(tmp_path):
    """Fewer rows than the base's is not a delta of it (more rows is: tests/test_grown.py)."""
    base = tiny_llama()
    ft = tiny_llama()
    ft.load_state_dict(base.state_dict())
    ft.resize_token_embeddings(base.config.vocab_size - 2)
    with pytest.warns(UserWarning, match="stored whole") as caught:
        delta = delta_format.compress(
            save(base, tmp_path / "base"), save(ft, tmp_path / "ft"), tmp_path / "d", bits=0.5, progress=False
        )
    said = [str(w.message) for w in caught]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert any(m.startswith(f"{name} is stored whole (the base has another shape") for m in said)
        assert delta.manifest.tensors[name].encoding.name == "replace"
