"""The model card a delta is published with (SPEC §10)."""

import json
from pathlib import Path

import jsonschema
import torch
from huggingface_hub import ModelCard
from transformers import LlamaConfig, LlamaForCausalLM

from delta_format.io.delta import Delta
from tests.test_loader import LLAMA, perturbed, sign_or_dense, write_delta

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "spec" / "model_card.schema.json").read_text())


def make_delta(tmp_path, **ref):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA))
    base.save_pretrained(tmp_path / "base")
    perturbed(base, 0.05, seed=1).save_pretrained(tmp_path / "ft")
    return Delta(write_delta(tmp_path / "d", tmp_path / "base", tmp_path / "ft", sign_or_dense, method="sign", **ref))


def test_card_of_a_hub_base_names_it_as_an_adapter_relation(tmp_path):
    delta = make_delta(tmp_path, repo_id="org/base", revision="a" * 40)
    data = ModelCard(delta.model_card("me/ft-delta")).data.to_dict()
    jsonschema.validate(data, SCHEMA)
    assert (data["base_model"], data["base_model_relation"]) == ("org/base", "adapter")
    assert data["tags"] == ["delta-format", "delta-format:sign", "bitdelta"]
    assert data["delta_format"]["stored_bytes"] == sum(e.stats["stored_bytes"] for e in delta.manifest.tensors.values())


def test_card_of_a_local_base_has_no_base_model_and_still_validates(tmp_path):
    data = ModelCard(make_delta(tmp_path).model_card()).data.to_dict()
    jsonschema.validate(data, SCHEMA)
    assert "base_model" not in data and "base_model_relation" not in data


def test_save_pretrained_copies_the_delta_with_a_card(tmp_path):
    delta = make_delta(tmp_path)
    saved = delta.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "README.md").is_file()
    assert saved.manifest.to_dict() == delta.manifest.to_dict()
