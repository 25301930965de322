"""The budget's low-rank factors refined on the model's outputs (`delta_format.methods.refine`):
the rounding is differentiable as if absent, the refined factors are what is stored, a refinement
lowers the calibration output error or is dropped, and only calibrated compressions refine."""

from __future__ import annotations

import pytest
import torch

import delta_format
from delta_format.core.encodings import QuantizedLowRankEncoding
from delta_format.errors import InvalidArgumentError
from delta_format.methods import get_method
from delta_format.methods.refine import Factors, step_texts, straight_through
from tests.models import CALIBRATION_TEXTS, byte_tokenizer


def test_straight_through_rounds_forward_and_passes_the_gradient():
    rows = torch.randn(3, 100, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = straight_through(rows, 2, 64)
    assert len(torch.unique(out[0, :64].detach())) <= 4  # four levels in a group of 64
    assert not torch.equal(out.detach(), rows.detach())
    (out * torch.arange(300.0).view(3, 100)).sum().backward()
    assert torch.equal(rows.grad, torch.arange(300.0).view(3, 100))


def test_the_rounded_factors_are_what_the_encoding_stores():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(96, 16, generator=g) @ torch.randn(16, 80, generator=g)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    encoding = QuantizedLowRankEncoding([[2, 4], [6, 2]], 64)
    factors = Factors.from_svd(encoding, u[:, :8], s[:8], vh[:8], delta)
    a, b = factors.rounded()
    stored = encoding.encode(delta, u=factors.a, v=factors.b)
    decoded = encoding.decode(stored, (96, 80), "w", torch.float32)
    # the same codes; only the scales' float16 rounding differs
    assert torch.allclose(decoded, a @ b, rtol=0, atol=2e-3 * float(delta.abs().max()))
    assert torch.equal(factors.deviation(), (a @ b) - delta)


def test_step_texts_cover_every_text_in_a_seeded_order():
    lengths = [300, 500, 800, 200, 100]
    generator, order = torch.Generator().manual_seed(0), []
    steps = [step_texts(lengths, generator, order) for _ in range(6)]
    assert all(len(set(s)) == len(s) for s in steps)  # no text twice in a step
    seen = [i for s in steps for i in s]
    assert set(seen[:5]) == set(range(5))  # a whole pass before any text repeats
    again = [step_texts(lengths, torch.Generator().manual_seed(0), []) for _ in range(1)]
    assert again[0] == steps[0]


@pytest.mark.parametrize("steps", [-1, True, "many", 1.5])
def test_refine_steps_must_be_a_count(steps):
    with pytest.raises(InvalidArgumentError, match="refine_steps"):
        get_method("budget", bits=0.5, refine_steps=steps)
    with pytest.raises(InvalidArgumentError, match="refine_lr"):
        get_method("budget", bits=0.5, refine_lr=0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tests.models import trained_pair

    return trained_pair(tmp_path_factory.mktemp("refine"), steps=30, lr=3e-3)


def compressed(pair, out, **kwargs):
    kwargs.setdefault("calibration_texts", CALIBRATION_TEXTS)
    return delta_format.compress(pair["base"], pair["ft"], out, bits=0.3, progress=False, **kwargs)


def test_refined_factors_lower_the_output_error_of_the_published_delta(pair, tmp_path):
    plain = compressed(pair, tmp_path / "plain", refine_steps=0)
    refined = compressed(pair, tmp_path / "refined", refine_steps=40)
    report = refined.manifest.stats["prepare"]["budget"]["refined"]
    assert report["kept"] and report["output_error_refined"] < report["output_error_initial"]
    assert report["tensors"] == sum(e.stats.get("feedback") == "refined" for e in refined.manifest.tensors.values())
    assert report["tensors"] > 0
    assert "refined" not in plain.manifest.stats["prepare"]["budget"]
    # measured on the published files (the compressor's output_error reads the stored edits back)
    assert refined.manifest.stats["output_error"] < 0.9 * plain.manifest.stats["output_error"]
    size = sum(p.stat().st_size for p in refined.directory.glob("*.safetensors"))
    assert size == pytest.approx(sum(p.stat().st_size for p in plain.directory.glob("*.safetensors")), rel=0.02)


def test_a_data_free_budget_refines_a_language_model_on_the_built_in_text(pair, tmp_path):
    delta = delta_format.compress(pair["base"], pair["ft"], tmp_path / "free", bits=0.3, progress=False)
    report = delta.manifest.stats["prepare"]["budget"]["refined"]
    assert report["on"] == "built-in text" and report["tensors"] > 0 and report["steps"] > 0
    assert delta.manifest.stats["sensitivity"]["measured_on"] == "random tokens"  # plans as before
    assert "output_error" not in delta.manifest.stats  # no calibration figures from the built-in text


def test_a_data_free_language_model_without_a_tokenizer_is_not_refined(pair, tmp_path):
    import shutil

    bare = tmp_path / "bare"  # the fine-tune without its tokenizer: random tokens would mislead it
    bare.mkdir()
    for file in pair["ft"].iterdir():
        if file.suffix == ".safetensors" or file.name == "config.json":
            shutil.copy(file, bare / file.name)
    delta = delta_format.compress(pair["base"], bare, tmp_path / "free", bits=0.3, progress=False)
    assert "refined" not in delta.manifest.stats["prepare"]["budget"]
    assert not any(e.stats.get("feedback") == "refined" for e in delta.manifest.tensors.values())
    assert delta.manifest.stats["sensitivity"]["measured_on"] == "random tokens"
    given = delta_format.compress(  # a tokenizer passed in is read instead
        pair["base"], bare, tmp_path / "given", bits=0.3, tokenizer=byte_tokenizer(), refine_steps=4, progress=False
    )
    assert given.manifest.stats["prepare"]["budget"]["refined"]["on"] == "built-in text"


def test_a_refinement_that_does_not_help_is_dropped(pair, tmp_path):
    delta = compressed(pair, tmp_path / "wild", refine_steps=5, refine_lr=1e4)
    report = delta.manifest.stats["prepare"]["budget"]["refined"]
    assert not report["kept"] and report["output_error_refined"] >= report["output_error_initial"]


def test_auto_steps_shrink_with_the_model_and_stop_past_the_compute_cap():
    from delta_format.methods.refine import REFINE_COMPUTE, REFINE_STEPS, TOKENS_PER_STEP, auto_steps

    assert auto_steps(1_000_000) == REFINE_STEPS
    assert auto_steps(107_000_000) == int(REFINE_COMPUTE // (107_000_000 * TOKENS_PER_STEP)) < REFINE_STEPS
    assert auto_steps(10_000_000_000) == 0
    assert auto_steps(1_000_000, 60_000) == REFINE_STEPS  # the factors hold 6 % of the parameters
    assert auto_steps(1_000_000, 40_000) == 0  # 4 %: too few to repay a pass of the whole model a step


def test_auto_refines_only_at_small_budgets(pair, tmp_path):
    from delta_format.methods.refine import REFINE_MAX_BITS

    generous = delta_format.compress(
        pair["base"],
        pair["ft"],
        tmp_path / "one",
        bits=2 * REFINE_MAX_BITS,
        progress=False,
        calibration_texts=CALIBRATION_TEXTS,
    )
    assert "refined" not in generous.manifest.stats["prepare"]["budget"]
    assert generous.manifest.method_params["refine_steps"] == "auto"


def test_output_divergence_is_the_per_token_kl_the_stats_report(pair):
    from transformers import AutoModelForCausalLM

    from delta_format.compression.calibration import Calibration
    from tests.models import byte_tokenizer

    model = AutoModelForCausalLM.from_pretrained(pair["ft"], dtype=torch.float32)
    session = Calibration(model, byte_tokenizer(), CALIBRATION_TEXTS, sensitivity=False)
    assert session.output_divergence() == pytest.approx(0.0, abs=1e-6)
    name = next(n for n, p in session.params.items() if p.dim() == 2 and "layers.0" in n)
    change = {name: 0.05 * torch.randn(session.params[name].shape, generator=torch.Generator().manual_seed(0))}
    moved = session.output_divergence(change)
    session.set_parameter(name, session.parameter(name) + change[name])
    assert moved > 1e-4
    assert moved == pytest.approx(session.output_agreement()["output_kl"], rel=1e-4)
    assert session.output_divergence(texts=[0]) != pytest.approx(moved, rel=1e-3)  # one text, not all


def test_a_data_free_budget_refines_an_encoder_on_random_tokens(tmp_path):
    from transformers import BertConfig, BertModel

    from tests.models import save

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    base = BertModel(config).eval()
    ft = BertModel(config).eval()
    ft.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fine-tune of decaying spectrum in every matrix: low rank is worth buying
        for name, param in ft.named_parameters():
            if param.dim() == 2 and "embeddings" not in name:
                rows, cols = param.shape
                spectrum = torch.logspace(0, -2, min(rows, cols))
                u, v = torch.randn(rows, len(spectrum), generator=g), torch.randn(len(spectrum), cols, generator=g)
                param += 0.02 * (u * spectrum) @ v / cols**0.5
    save(base, tmp_path / "base"), save(ft, tmp_path / "ft")
    delta = delta_format.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "out", bits=0.3, progress=False)
    report = delta.manifest.stats["prepare"]["budget"]["refined"]
    assert report["on"] == "random tokens" and report["tensors"] > 0
    assert report["kept"] and report["output_error_refined"] < report["output_error_initial"]
    assert "output_error" not in delta.manifest.stats  # no calibration figures from random tokens


def _session(model, **kwargs):
    from delta_format.compression.calibration import Calibration

    return Calibration(model, byte_tokenizer(), CALIBRATION_TEXTS, parameters=(), sensitivity=False, **kwargs)


def test_an_encoders_refinement_also_fits_its_inner_layers():
    from tests.models import tiny_bert

    session = _session(tiny_bert(0, layers=3).bert)  # an encoder: hidden states out, no logits
    targets = session.layer_targets
    assert len(targets.texts) == len(session.batches)
    assert all(len(layers) == 2 for layers in targets.texts)  # between the embeddings and the output
    assert len(targets.scales) == 2 and all(s > 0 for s in targets.scales)
    name = "encoder.layer.0.attention.self.value.weight"
    noise = torch.randn(session.parameter(name).shape, generator=torch.Generator().manual_seed(0))
    change = {name: 0.05 * noise}
    assert float(session.output_divergence(grad=True)) == 0.0
    stepped = float(session.output_divergence(change, grad=True))
    judged = session.output_divergence(change)  # held-out judging: the output alone
    assert stepped > judged > 0  # layer 0's error is seen in layers 1 and 2 as well as the output


def test_a_model_with_logits_and_a_capped_encoder_fit_their_outputs_only(monkeypatch):
    from delta_format.compression import layer_targets
    from tests.models import tiny_bert, tiny_llama

    assert not _session(tiny_llama(0)).layer_targets  # its logits are compared as distributions
    monkeypatch.setattr(layer_targets, "MAX_LAYER_TARGET_VALUES", 1000)
    capped = _session(tiny_bert(0, layers=3).bert)
    assert not capped.layer_targets and capped.layer_targets.texts == []
    name = "encoder.layer.0.attention.self.value.weight"
    noise = torch.randn(capped.parameter(name).shape, generator=torch.Generator().manual_seed(0))
    change = {name: 0.05 * noise}
    assert float(capped.output_divergence(change, grad=True)) == pytest.approx(capped.output_divergence(change))
