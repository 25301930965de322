"""Every path that applies a delta (from_pretrained, swap_delta, attach_deltas, apply) runs the
same checks first (`delta_format.loaders.delta_checks`): unknown names, misfit shapes, tied
tensors, non-finite alphas; and the swap cache never serves a stale delta."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from delta_format import BaseMismatchError, DeltaModel, NumericalError, attach_deltas
from delta_format.core.encodings import ReplaceEncoding
from delta_format.core.manifest import BaseReference, TensorEntry
from delta_format.io.reader import DeltaReader
from delta_format.io.writer import DeltaWriter
from delta_format.loaders.swap import DeltaSwapper
from tests.crafting import edit_manifest
from tests.test_loader import LLAMA, dense, perturbed, write_delta

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
NORM = "model.norm.weight"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA))
    base.save_pretrained(root / "base")
    for i in (1, 2):
        perturbed(base, 0.05, seed=i).save_pretrained(root / f"ft{i}")
        write_delta(root / f"d{i}", root / "base", root / f"ft{i}", dense)
    tied = LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=True))
    tied.save_pretrained(root / "tied")
    return root


def base_model(root, name="base"):
    return AutoModelForCausalLM.from_pretrained(root / name)


def hostile(root, tmp_path, name, change) -> object:
    out = tmp_path / name
    shutil.copytree(root / "d1", out)
    edit_manifest(out, change)
    return out


def no_fingerprint(m):
    m["base"]["fingerprint"] = None


def one_element_norm(directory):
    """A ``replace`` of shape [1] for a [64] norm, without a fingerprint to catch anything else."""
    with DeltaWriter(directory, base=BaseReference(), method="x") as w:
        w.add(NORM, TensorEntry(ReplaceEncoding(), (1,), "float32"), {"value": torch.full((1,), 3.0)})
    return directory


def test_a_replace_of_another_shape_is_refused_by_every_path(root, tmp_path):
    bad = one_element_norm(tmp_path / "bad")
    model = DeltaModel.from_pretrained(root / "d1")
    before = model.state_dict()[NORM].clone()
    with pytest.raises(BaseMismatchError):
        model.swap_delta(bad)
    assert torch.equal(model.state_dict()[NORM], before)
    with pytest.raises(BaseMismatchError):
        attach_deltas(base_model(root), {"a": bad}, verify_base=False)
    with pytest.raises(BaseMismatchError):
        DeltaModel.from_pretrained(bad, base_model=root / "base", verify_base=False)


def test_unknown_names_are_refused_by_every_path(root, tmp_path):
    def rename(m):
        no_fingerprint(m)
        m["tensors"]["model.nonexistent.weight"] = m["tensors"].pop(NORM)

    bad = hostile(root, tmp_path, "unknown", rename)
    model = DeltaModel.from_pretrained(root / "d1")
    with pytest.raises(Exception) as swap_error:
        model.swap_delta(bad)
    assert isinstance(swap_error.value, (BaseMismatchError,)) or "disagree" in str(swap_error.value)
    with pytest.raises(Exception) as attach_error:
        attach_deltas(base_model(root), {"a": bad}, verify_base=False)
    assert type(attach_error.value).__module__ == "delta_format.errors"


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_a_non_finite_alpha_is_a_numerical_error_everywhere(root, alpha):
    with pytest.raises(NumericalError):
        attach_deltas(base_model(root), {"a": root / "d1"}, alpha=alpha)
    with pytest.raises(NumericalError):
        DeltaModel.from_pretrained(root / "d1", alpha=alpha)
    with pytest.raises(NumericalError):
        DeltaModel.from_pretrained(root / "d2").swap_delta(root / "d1", alpha=alpha)


def test_a_manifest_alpha_of_1e308_is_a_numerical_error_everywhere(root, tmp_path):
    def huge(m):
        for entry in m["tensors"].values():
            entry["alpha"] = 1e308

    bad = hostile(root, tmp_path, "huge", huge)
    with pytest.raises(NumericalError):
        attach_deltas(base_model(root), {"a": bad})
    with pytest.raises(NumericalError):
        DeltaModel.from_pretrained(bad)
    with pytest.raises(NumericalError):
        DeltaModel.from_pretrained(root / "d2").swap_delta(bad)


def test_an_alpha_that_overflows_the_weights_is_refused_at_attach_as_by_a_load(root):
    model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float16)
    with pytest.raises(NumericalError, match="overflows float16"):
        attach_deltas(model, {"a": root / "d1"}, alpha=1e9, base_model=root / "base")
    assert not hasattr(model, "on_the_fly_deltas")
    with pytest.raises(NumericalError, match="overflows float16"):
        DeltaModel.from_pretrained(root / "d1", alpha=1e9, dtype=torch.float16)


def test_the_swap_cache_serves_a_delta_published_again_at_the_same_path(root, tmp_path):
    path = tmp_path / "published"
    shutil.copytree(root / "d1", path)
    model = DeltaModel.from_pretrained(root / "d2")
    model.swap_delta(path)
    shutil.rmtree(path)
    shutil.copytree(root / "d2", path)  # a new version at the same path
    model.swap_delta(path)
    fresh = DeltaModel.from_pretrained(root / "d2")
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_failing_rollback_does_not_hide_the_error_that_caused_it(root, monkeypatch):
    model = DeltaModel.from_pretrained(root / "d1")
    calls = []

    def write(self, names, deltas):
        calls.append(1)
        raise (ValueError("the real error") if len(calls) == 1 else KeyError("rollback"))

    monkeypatch.setattr(DeltaSwapper, "_write", write)
    with pytest.raises(ValueError, match="the real error") as info:
        model.swap_delta(root / "d2")
    assert any("could not be restored" in note for note in info.value.__notes__)


def tied_delta(root, directory, names):
    with DeltaWriter(directory, base=BaseReference(local_path=str(root / "tied")), method="x") as w:
        for name in names:
            shape = (LLAMA["vocab_size"], LLAMA["hidden_size"])
            w.add(name, TensorEntry(ReplaceEncoding(), shape, "float32"), {"value": torch.randn(shape)})
    return directory


@pytest.mark.parametrize("names", [["lm_head.weight", "model.embed_tokens.weight"], ["lm_head.weight"]])
def test_edits_of_a_tied_tensor_under_its_other_name_are_refused(root, tmp_path, names):
    """A model built tied (on-the-fly serving, a swap) cannot hold an edit of the tied copy; a fresh
    load builds it untied, as transformers loads a checkpoint whose tied tensors differ."""
    delta = tied_delta(root, tmp_path / "tied-delta", names)
    untied = DeltaModel.from_pretrained(delta)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    head = DeltaReader(delta).stored("lm_head.weight")["value"]
    assert torch.equal(untied.lm_head.weight.detach(), head)
    with pytest.raises(BaseMismatchError, match="ties"):
        attach_deltas(base_model(root, "tied"), {"a": delta})
    edit = tied_delta(root, tmp_path / "embedding-only", ["model.embed_tokens.weight"])
    model = DeltaModel.from_pretrained(edit)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(BaseMismatchError, match="ties"):
        model.swap_delta(delta)
