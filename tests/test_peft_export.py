"""A delta exported as a PEFT LoRA adapter, loaded by the real peft package (the ``peft`` extra)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import delta_format
from delta_format import DeltaModel, InvalidArgumentError
from delta_format.cli import main
from delta_format.loaders.apply import apply_delta
from delta_format.loaders.export_lora import export_lora
from tests.models import (
    CALIBRATION_TEXTS,
    byte_tokenizer,
    encode,
    save,
    structured_perturbation,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)

peft = pytest.importorskip("peft", reason="the peft extra is not installed")

LOGIT_TOLERANCE = 1e-5
"""float32: ``W x + B (A x)`` and ``(W + B A) x`` round differently, by a few ulp of the logits."""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A Llama base and a fine-tune whose matrices moved by rank-4 deltas and whose norms moved too."""
    root = tmp_path_factory.mktemp("peft-pair")
    base = tiny_llama()
    save(base, root / "base")
    save(structured_perturbation(base, 0.05, low_rank=4), root / "ft")
    return root


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=encode(t)).logits[0] for t in CALIBRATION_TEXTS])


def peft_model(base_dir, adapter):
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter).eval()


def test_a_lowrank_delta_exported_as_lora_gives_the_same_logits_through_peft(pair, tmp_path):
    delta = delta_format.compress(pair / "base", pair / "ft", tmp_path / "d", method="lowrank", rank=4, progress=False)
    report = export_lora(delta.directory, tmp_path / "lora", rank=8)
    assert report.fitted == {} and report.rel_error == 0.0 and report.exact
    assert report.modules_to_save  # the norms, exact
    want = logits(DeltaModel.from_pretrained(delta.directory, dtype=torch.float32))
    got = logits(peft_model(pair / "base", tmp_path / "lora"))
    assert (got - want).abs().max() <= LOGIT_TOLERANCE * want.abs().max()


def test_biases_norms_and_tied_embeddings_travel_exactly(tmp_path):
    """BERT: every linear layer has a bias (PEFT's bias="all"), LayerNorms go to modules_to_save,
    and the MLM decoder shares the word embeddings (it gets the same LoRA pair)."""
    from transformers import AutoModelForMaskedLM

    base = tiny_bert()
    save(base, tmp_path / "base")
    save(structured_perturbation(base, 0.05, low_rank=4), tmp_path / "ft")
    delta = delta_format.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "d", method="lowrank", rank=4)
    report = export_lora(delta.directory, tmp_path / "lora", rank=4)
    assert report.biases and report.modules_to_save and report.rel_error < 1e-6
    want = logits(DeltaModel.from_pretrained(delta.directory, dtype=torch.float32))
    adapted = peft.PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(tmp_path / "base"), tmp_path / "lora")
    got = logits(adapted.eval())
    assert (got - want).abs().max() <= LOGIT_TOLERANCE * want.abs().max()


def test_an_svd_fit_states_the_error_peft_then_reproduces(pair, tmp_path):
    """A sign delta is full rank: the adapter holds its rank-r truncation, and the relative error it
    states is the one between the merged adapter and the delta, measured independently."""
    delta = delta_format.compress(pair / "base", pair / "ft", tmp_path / "d", method="sign", progress=False)
    report = export_lora(delta.directory, tmp_path / "lora", rank=4)
    assert report.fitted and 0.05 < report.rel_error < 1.0
    merged = peft_model(pair / "base", tmp_path / "lora").merge_and_unload().state_dict()
    base = AutoModelForCausalLM.from_pretrained(pair / "base", dtype=torch.float32).state_dict()
    full = DeltaModel.from_pretrained(delta.directory, dtype=torch.float32).state_dict()
    err_sq = sum(float((merged[n] - full[n]).square().sum()) for n in report.fitted)
    delta_sq = sum(float((full[n] - base[n]).square().sum()) for n in report.fitted)
    assert (err_sq / delta_sq) ** 0.5 == pytest.approx(report.rel_error, rel=1e-3)


def test_the_cli_writes_an_adapter_peft_reads(pair, tmp_path, capsys):
    delta = delta_format.compress(pair / "base", pair / "ft", tmp_path / "d", method="lowrank", rank=4, progress=False)
    assert main(["export-lora", str(delta.directory), str(tmp_path / "lora"), "--rank", "4"]) == 0
    assert "relative error 0" in capsys.readouterr().out
    config = peft.LoraConfig.from_pretrained(tmp_path / "lora")
    assert (config.r, config.lora_alpha, config.task_type) == (4, 4, "CAUSAL_LM")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] is None


def test_conv1d_layers_are_refused_with_a_way_out(tmp_path):
    base = tiny_gpt2()
    save(base, tmp_path / "base")
    save(structured_perturbation(base, 0.05), tmp_path / "ft")
    delta = delta_format.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "d", method="dense", progress=False)
    with pytest.raises(InvalidArgumentError, match="Conv1D"):
        export_lora(delta.directory, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_apply_writes_what_serving_engines_read(tmp_path):
    """vLLM and TGI load a directory with config.json, the tokenizer, generation_config.json and
    safetensors shards listed in model.safetensors.index.json: apply writes each of them."""
    base = tiny_llama()
    save(base, tmp_path / "base")
    ft = structured_perturbation(base, 0.05)
    ft.generation_config.max_new_tokens = 7
    save(ft, tmp_path / "ft", tokenizer=byte_tokenizer())
    delta = delta_format.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "d", method="sign", progress=False)
    out = apply_delta(delta.directory, tmp_path / "full", max_shard_size=100_000)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json"} <= names
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1 and all((out / f).is_file() for f in index.values())
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
