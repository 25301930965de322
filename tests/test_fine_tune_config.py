"""The delta's config.json and generation_config.json come from a stranger: they are used only
when the manifest vouches for them, checked against the base's config before a model is built,
and every failure is a typed error (SPEC §3.5, §8.8)."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from delta_format import BaseMismatchError, CorruptDeltaError, DeltaModel
from tests.crafting import rehash
from tests.test_loader import LLAMA, dense, perturbed, write_delta


@pytest.fixture(scope="module")
def delta(tmp_path_factory):
    root = tmp_path_factory.mktemp("config")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA))
    base.save_pretrained(root / "base")
    ft = perturbed(base, 0.05, seed=1)
    ft.generation_config.max_new_tokens = 7
    ft.save_pretrained(root / "ft")
    return write_delta(root / "delta", root / "base", root / "ft", dense)


@pytest.fixture
def copy(delta, tmp_path):
    out = tmp_path / "delta"
    shutil.copytree(delta, out)
    return out


def set_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    rehash(directory)  # as an attacker would: the manifest vouches for the edited file


def test_a_delta_config_with_200000_layers_is_refused_before_building_anything(copy):
    set_config(copy, num_hidden_layers=200_000)
    start = time.perf_counter()
    with pytest.raises(BaseMismatchError, match="num_hidden_layers=200000"):
        DeltaModel.from_pretrained(copy)
    assert time.perf_counter() - start < 10


def test_a_huge_head_dim_is_refused(copy):
    set_config(copy, head_dim=1 << 40)
    with pytest.raises(BaseMismatchError, match="head_dim"):
        DeltaModel.from_pretrained(copy)


def test_another_architecture_in_the_delta_config_is_refused(copy):
    set_config(copy, model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(BaseMismatchError, match="model_type"):
        DeltaModel.from_pretrained(copy)


@pytest.mark.parametrize("architecture", ["pipeline", "Trainer", "BertForMaskedLM", 5])
def test_architectures_naming_no_model_of_this_config_build_the_bare_model(copy, architecture):
    """The task head may differ from the base's (SPEC §8.8), so a stranger's config.json may name
    anything in ``architectures``: only a transformers model class of the config's own type is
    built; anything else falls back to the bare model, whose parameters are then checked as any."""
    set_config(copy, architectures=[architecture])
    with pytest.raises(BaseMismatchError, match="lacks"):
        DeltaModel.from_pretrained(copy)  # the delta edits lm_head.weight, which LlamaModel lacks


def test_a_huge_config_is_refused_before_it_is_parsed(copy):
    """Its label maps may differ from the base's, so their size is bounded by the file's."""
    set_config(copy, id2label={str(i): f"L{i}" for i in range(1_200_000)})
    with pytest.raises(CorruptDeltaError, match="too large"):
        DeltaModel.from_pretrained(copy)


def test_a_fine_tune_may_change_its_vocabulary_size_and_token_ids(copy):
    set_config(copy, vocab_size=LLAMA["vocab_size"], eos_token_id=5)
    model = DeltaModel.from_pretrained(copy)
    assert model.config.eos_token_id == 5


@pytest.mark.parametrize("raw", [b"{not json", b'{"a": 1, "a": 2}', b'{"x": 1e400}', b"[1, 2]"])
def test_a_malformed_delta_config_is_a_typed_error(copy, raw):
    (copy / "config.json").write_bytes(raw)
    rehash(copy)
    with pytest.raises(CorruptDeltaError, match="config.json"):
        DeltaModel.from_pretrained(copy)


def test_a_malformed_generation_config_is_a_typed_error(copy):
    (copy / "generation_config.json").write_bytes(b'{"max_new_tokens": ')
    rehash(copy)
    with pytest.raises(CorruptDeltaError, match="generation_config.json"):
        DeltaModel.from_pretrained(copy)


def test_the_delta_generation_config_is_used(copy):
    assert DeltaModel.from_pretrained(copy).generation_config.max_new_tokens == 7


def test_a_config_the_manifest_does_not_vouch_for_is_ignored(copy):
    manifest = json.loads((copy / "delta_config.json").read_text())
    del manifest["files"]["config.json"]
    (copy / "delta_config.json").write_text(json.dumps(manifest))
    (copy / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 200_000}))
    model = DeltaModel.from_pretrained(copy)
    assert model.config.num_hidden_layers == LLAMA["num_hidden_layers"]
