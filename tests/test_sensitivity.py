"""Output sensitivity: the Fisher-trace estimate per parameter (`sensitivity.measure_sensitivity`,
on calibration texts or random tokens) and how the budget weighs errors by it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from delta_format.compression import sensitivity as sensitivity_module
from delta_format.compression.calibration import Calibration
from delta_format.methods import get_method
from delta_format.methods.activations import ActivationStats
from delta_format.methods.base import TensorContext
from delta_format.methods.priors import LOOKUP_MIN_ROWS
from tests.models import CALIBRATION_TEXTS, byte_tokenizer, tiny_bert, tiny_llama
from tests.test_budget import plan_of


class TinyLM(nn.Module):
    """Embedding, tanh, one linear head: the Fisher trace of the head's weight is known in closed
    form, ``Σ_tokens ||h||² (1 - ||p||²)`` (``h`` the head's input, ``p`` its softmax)."""

    def __init__(self, vocab: int = 260, hidden: int = 12):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        nn.init.normal_(self.head.weight, std=0.3)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.embed(input_ids))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(logits=self.head(self.hidden(input_ids)))


def test_the_estimate_is_the_fisher_trace_of_the_output_distribution(monkeypatch):
    model = TinyLM()
    tok = byte_tokenizer()
    with torch.no_grad():
        exact = 0.0
        for text in CALIBRATION_TEXTS:
            h = model.hidden(tok(text, return_tensors="pt")["input_ids"])[0]
            p = model.head(h).softmax(-1)
            exact += float((h.square().sum(-1) * (1 - p.square().sum(-1))).sum())
    exact /= model.head.weight.numel()
    monkeypatch.setattr(sensitivity_module, "SENSITIVITY_PROBES", 200)
    session = Calibration(copy.deepcopy(model), tok, CALIBRATION_TEXTS)
    assert session.sensitivities["head.weight"] == pytest.approx(exact, rel=0.1)


def test_every_recorded_parameter_gets_a_sensitivity_the_same_on_every_run():
    model, tok = tiny_llama(), byte_tokenizer()
    first = Calibration(copy.deepcopy(model), tok, CALIBRATION_TEXTS).sensitivities
    again = Calibration(copy.deepcopy(model), tok, CALIBRATION_TEXTS).sensitivities
    assert set(first) == {n for n, _ in model.named_parameters()}
    assert first == again
    assert all(s > 0 for n, s in first.items() if n.endswith("proj.weight"))
    # the measurement leaves no gradient behind and the model as it was
    session = Calibration(copy.deepcopy(model), tok, CALIBRATION_TEXTS)
    assert all(p.grad is None and not p.requires_grad for p in session.model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(session.model.state_dict()[name], value)


@pytest.mark.parametrize("bare", [True, False], ids=["encoder", "masked-lm"])
def test_a_parameter_the_output_ignores_has_no_sensitivity(bare):
    """An attention key's bias adds the same amount to every score of a query: the softmax cancels
    it, so the output has no sensitivity to it, in the encoder's embedding or in the logits."""
    model = tiny_bert()
    model = model.bert if bare else model
    prefix = "" if bare else "bert."
    stats = Calibration(model, byte_tokenizer(), CALIBRATION_TEXTS).sensitivities
    key_bias = stats[f"{prefix}encoder.layer.0.attention.self.key.bias"]
    value_bias = stats[f"{prefix}encoder.layer.0.attention.self.value.bias"]
    assert value_bias > 0
    assert key_bias < 1e-8 * value_bias


def plan_with(sensitivities: dict[str, float], bits: float = 1.0):
    torch.manual_seed(0)
    deltas = {n: torch.randn(128, 32) @ torch.randn(32, 96) * 1e-3 for n in ("quiet", "loud")}
    deltas["embed"] = torch.randn(LOOKUP_MIN_ROWS, 2) @ torch.randn(2, 16) * 1e-4
    deltas["norm"] = torch.randn(96) * 1e-3
    inputs = torch.randn(64, 96)

    def context(name: str) -> TensorContext:
        kind = "elementwise" if name in ("embed", "norm") else "linear"
        stats = ActivationStats(kind, inputs if kind == "linear" else None)
        return TensorContext(name, lookup=name == "embed", activations=stats, sensitivity=sensitivities[name])

    tensors = [(n, d, context(n)) for n, d in deltas.items()]
    return plan_of(get_method("budget", bits=bits, noise_weight="off"), tensors)


def test_the_budget_spends_where_the_output_is_sensitive_relative_to_the_typical_layer():
    even = {"quiet": 1.0, "loud": 1.0, "embed": 1.0, "norm": 1.0}
    uneven = {"quiet": 1.0, "loud": 100.0, "embed": 1.0, "norm": 1.0}
    plan, plain = plan_with(uneven), plan_with(even)
    assert plan["loud"].bits > plain["loud"].bits and plan["quiet"].bits < plain["quiet"].bits
    labels = {n: o.label for n, o in plan.items()}
    for factor in (1e-4, 1e4):  # only ratios count
        assert labels == {n: o.label for n, o in plan_with({n: s * factor for n, s in uneven.items()}).items()}
    # a vocabulary-sized lookup table keeps its prior: its sensitivity does not move the plan
    assert labels == {n: o.label for n, o in plan_with({**uneven, "embed": 1e6}).items()}
    # a parameter the output ignores costs nothing to drop
    assert plan_with({**uneven, "norm": 0.0}, bits=0.5)["norm"].spec[0] == "drop"
    assert plan_with({**uneven, "norm": 1e6}, bits=0.5)["norm"].spec[0] != "drop"


def test_only_methods_that_read_it_pay_for_the_measurement(tmp_path, monkeypatch):
    import delta_format
    from tests.models import save, structured_perturbation

    assert Calibration(tiny_llama(), byte_tokenizer(), CALIBRATION_TEXTS, sensitivity=False).sensitivities == {}

    asked: list[bool] = []
    real = Calibration.__init__

    def spy(self, *args, sensitivity: bool = True, **kwargs):
        asked.append(sensitivity)
        real(self, *args, sensitivity=sensitivity, **kwargs)

    monkeypatch.setattr(Calibration, "__init__", spy)
    base = tiny_llama()
    paths = (
        save(base, tmp_path / "base"),
        save(structured_perturbation(base), tmp_path / "ft", tokenizer=byte_tokenizer()),
    )
    budget = delta_format.compress(
        *paths, tmp_path / "b", bits=1.0, calibration_texts=CALIBRATION_TEXTS, progress=False
    )
    assert budget.manifest.stats["prepare"]["budget"]["weighting"].startswith("output sensitivity^0.5")
    assert budget.manifest.stats["sensitivity"]["measured_on"] == "calibration texts"
    delta_format.compress(
        *paths, tmp_path / "s", "sign", scale="row", layer_fit=True, calibration_texts=CALIBRATION_TEXTS, progress=False
    )
    assert asked == [True, False]


def shards(directory) -> list[bytes]:
    return [path.read_bytes() for path in sorted(directory.glob("*.safetensors"))]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from tests.models import save, structured_perturbation

    root = tmp_path_factory.mktemp("sensitivity")
    base = tiny_llama()
    return save(base, root / "base"), save(structured_perturbation(base), root / "ft")


def test_without_texts_the_budget_measures_it_on_random_tokens(paths, tmp_path):
    import delta_format

    delta = delta_format.compress(*paths, tmp_path / "auto", bits=0.5, progress=False)
    assert delta.manifest.stats["sensitivity"] == {"measured_on": "random tokens", "tokens": 16 * 128, "probes": 2}
    assert delta.manifest.stats["prepare"]["budget"]["weighting"].startswith("output sensitivity^0.5")
    delta_format.compress(*paths, tmp_path / "again", bits=0.5, sensitivity="on", progress=False)
    assert shards(tmp_path / "again") == shards(tmp_path / "auto")  # measured the same way every time
    off = delta_format.compress(*paths, tmp_path / "off", bits=0.5, sensitivity="off", progress=False)
    assert "sensitivity" not in off.manifest.stats
    assert off.manifest.stats["prepare"]["budget"]["weighting"].startswith("weight error")
    plain = delta_format.compress(*paths, tmp_path / "dare", "dare", p=0.5, progress=False)
    assert "sensitivity" not in plain.manifest.stats  # no method reads it: nothing measured


def test_a_model_transformers_cannot_run_is_weighed_by_its_weight_error_or_refused(paths, tmp_path):
    import shutil

    import delta_format

    bare = tmp_path / "bare"  # the fine-tune's tensors without a config: nothing to run
    bare.mkdir()
    for file in paths[1].glob("*.safetensors"):
        shutil.copy(file, bare / file.name)
    delta = delta_format.compress(paths[0], bare, tmp_path / "auto", bits=0.5, progress=False)
    assert delta.manifest.stats["sensitivity"]["measured_on"].startswith("nothing (the model could not be run")
    assert delta.manifest.stats["sensitivity"]["tokens"] == 0 and "probes" not in delta.manifest.stats["sensitivity"]
    assert delta.manifest.stats["prepare"]["budget"]["weighting"].startswith("weight error")
    with pytest.raises(delta_format.InvalidArgumentError, match="could not be measured") as caught:
        delta_format.compress(paths[0], bare, tmp_path / "on", bits=0.5, sensitivity="on", progress=False)
    assert "sensitivity='off'" in str(caught.value)
    assert not (tmp_path / "on").exists()


@pytest.mark.parametrize("value", ["yes", None, True, 1])
def test_sensitivity_must_be_auto_on_or_off(paths, tmp_path, value):
    import delta_format

    with pytest.raises(delta_format.InvalidArgumentError, match="sensitivity is"):
        delta_format.compress(*paths, tmp_path / "d", bits=0.5, sensitivity=value, progress=False)


@pytest.mark.parametrize("mode", ["off", "on"])
def test_the_cli_passes_sensitivity_through(paths, tmp_path, mode):
    import delta_format
    from delta_format.cli import main

    out = tmp_path / "d"
    assert main(["compress", *map(str, paths), str(out), "--no-progress", "--bits", "0.5", "--sensitivity", mode]) == 0
    stats = delta_format.Delta(out).manifest.stats
    assert stats.get("sensitivity", {}).get("measured_on") == (None if mode == "off" else "random tokens")


@pytest.mark.parametrize(
    "name, measured_on",
    [
        ("roberta", "random tokens"),  # positions start past a padding offset
        ("gpt_neox", "random tokens"),  # checkpoint keys renamed on loading
        ("t5", "random tokens"),  # an encoder-decoder: the ids on both sides
        ("vit", "nothing (the model could not be run: AttributeError)"),  # no token input
    ],
)
def test_families_are_measured_on_random_tokens_or_said_not_to_be(tmp_path, name, measured_on):
    import delta_format
    from tests.models import clone, structured_perturbation
    from tests.test_architectures import ARCHITECTURES

    torch.manual_seed(0)
    base = ARCHITECTURES[name]().eval()
    base.save_pretrained(tmp_path / "base")
    structured_perturbation(clone(base), rel=2e-2, seed=3).save_pretrained(tmp_path / "ft")
    delta = delta_format.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "d", bits=0.5, progress=False)
    assert delta.manifest.stats["sensitivity"]["measured_on"] == measured_on
    weighting = delta.manifest.stats["prepare"]["budget"]["weighting"]
    assert weighting.startswith("output sensitivity" if measured_on == "random tokens" else "weight error")
