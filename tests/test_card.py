"""The model card a delta is published with (SPEC §10)."""

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from transformers import LlamaConfig, LlamaForCausalLM

import delta_format
from delta_format.io.delta import Delta
from tests.models import CALIBRATION_TEXTS, byte_tokenizer, save, structured_perturbation, tiny_llama
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


FT_CARD = {"license": "apache-2.0", "language": ["en"], "datasets": ["org/chat-data"], "tags": ["chat", "fine-tuned"]}
"""The metadata a published fine-tune's card carries (``README.md`` YAML)."""


@pytest.fixture(scope="module")
def local_pair(tmp_path_factory):
    """A Llama base and fine-tune in local directories, the fine-tune with a card and a tokenizer."""
    root = tmp_path_factory.mktemp("card-pair")
    base = tiny_llama()
    save(base, root / "base")
    save(structured_perturbation(base, 0.05), root / "ft", tokenizer=byte_tokenizer())
    ModelCard.from_template(ModelCardData(**FT_CARD, pipeline_tag="text-generation")).save(root / "ft" / "README.md")
    return root


def compressed(local_pair, tmp_path, **kwargs):
    return delta_format.compress(
        local_pair / "base", local_pair / "ft", tmp_path / "my-ft-delta", progress=False, **kwargs
    )


def test_card_of_a_delta_made_from_local_directories_names_no_local_path(local_pair, tmp_path):
    delta = compressed(local_pair, tmp_path, method="sign")
    for card in (delta.model_card(), (delta.directory / "README.md").read_text(), delta.model_card("me/ft-delta")):
        assert str(local_pair) not in card and str(tmp_path) not in card and "/tmp" not in card


def test_card_metadata_passes_validation_and_carries_the_fine_tunes_license_and_tags(local_pair, tmp_path):
    card = ModelCard(compressed(local_pair, tmp_path, method="sign").model_card("me/ft-delta"))
    data = card.data.to_dict()
    ModelCardData(**data)  # huggingface_hub's own checks of the metadata (e.g. eval results)
    jsonschema.validate(data, SCHEMA)
    assert (data["license"], data["language"], data["datasets"]) == ("apache-2.0", ["en"], ["org/chat-data"])
    assert data["pipeline_tag"] == "text-generation"
    assert {"chat", "fine-tuned", "delta-format", "delta-format:sign"} <= set(data["tags"])
    assert data["library_name"] == "delta-format"


def test_card_is_titled_with_the_repo_name_or_the_directory_name(local_pair, tmp_path):
    delta = compressed(local_pair, tmp_path, method="sign")
    assert "\n# ft-delta\n" in delta.model_card("me/ft-delta")
    assert "\n# my-ft-delta\n" in (delta.directory / "README.md").read_text()
    assert 'DeltaModel.from_pretrained("me/ft-delta"' in delta.model_card("me/ft-delta")


def test_card_states_the_output_kl_measured_on_calibration_texts_beside_the_weight_error(local_pair, tmp_path):
    delta = compressed(local_pair, tmp_path, method="sign", calibration_texts=CALIBRATION_TEXTS)
    kl = delta.manifest.stats["output_kl"]
    data = ModelCard(delta.model_card()).data.to_dict()["delta_format"]
    assert kl > 0 and data["output_kl"] == kl and "rel_error" in data
    assert f"{kl:.4g} nats" in delta.model_card()
    stats = delta.manifest.stats  # the loss the delta adds on those texts, beside the fine-tune's
    assert data["output_loss"] == stats["output_loss"] and data["calibration_loss"] == stats["calibration_loss"]
    assert f"{stats['calibration_loss']:.4f} → {stats['output_loss']:.4f} nats" in delta.model_card()


def test_how_to_load_uses_the_library_of_the_fine_tune(local_pair, tmp_path):
    delta = compressed(local_pair, tmp_path, method="sign")
    assert "DeltaModel.from_pretrained" in delta.model_card()
    delta.manifest.stats["finetune_card"]["library_name"] = "sentence-transformers"
    assert 'load_sentence_transformer("my-ft-delta")' in delta.model_card()
