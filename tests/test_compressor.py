"""The streaming compressor on tiny models: lossless round trips, tied and resized weights, LoRA
import, rules, stats, and the fidelity claims of the papers on a model really fine-tuned."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file

import delta_format
from delta_format import InvalidArgumentError, OutputExistsError, ResolutionError
from delta_format.io.reader import DeltaReader
from delta_format.loaders.apply import apply_delta
from delta_format.methods.dense import same_bits
from tests.models import (
    CALIBRATION_TEXTS,
    byte_tokenizer,
    clone,
    encode,
    finetune_by_training,
    fresh_memory,
    save,
    state_dict_on_disk,
    structured_perturbation,
    tiny_gpt2,
    tiny_llama,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama and a real fine-tune of it (20 AdamW steps), saved with a tokenizer."""
    root = tmp_path_factory.mktemp("trained")
    base = tiny_llama()
    ft = finetune_by_training(base, steps=20, lr=1e-3)
    tokenizer = byte_tokenizer()
    return {
        "base": save(base, root / "base", tokenizer),
        "ft": save(ft, root / "ft", tokenizer),
        "base_model": base,
        "ft_model": ft,
        "tokenizer": tokenizer,
    }


def compress(base, ft, out, **kwargs):
    kwargs.setdefault("progress", False)
    return delta_format.compress(base, ft, out, **kwargs)


def loss_of(model, texts=CALIBRATION_TEXTS) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = encode(text)
            total += float(model(input_ids=ids, labels=ids).loss) * ids.numel()
            count += ids.numel()
    return total / count


# -- lossless ------------------------------------------------------------------------------------


def test_dense_compress_then_apply_reproduces_the_finetune_bit_for_bit(trained, tmp_path):
    delta = compress(trained["base"], trained["ft"], tmp_path / "delta", method="dense")
    assert delta.manifest.stats["rel_error"] == 0.0
    apply_delta(tmp_path / "delta", tmp_path / "full")
    expected, got = state_dict_on_disk(trained["ft"]), state_dict_on_disk(tmp_path / "full")
    assert set(got) == set(expected)
    assert all(same_bits(got[name], expected[name]) for name in expected)


def test_dense_bf16_delta_is_lossless_and_no_larger_than_the_finetune(tmp_path):
    base = tiny_llama(dtype=torch.bfloat16)
    ft = structured_perturbation(base, rel=1e-2, seed=1)
    save(base, tmp_path / "base"), save(ft, tmp_path / "ft")
    delta = compress(tmp_path / "base", tmp_path / "ft", tmp_path / "delta", method="dense")
    stats = delta.manifest.stats
    assert stats["stored_bytes"] <= stats["finetune_bytes"]
    apply_delta(tmp_path / "delta", tmp_path / "full")
    expected, got = state_dict_on_disk(tmp_path / "ft"), state_dict_on_disk(tmp_path / "full")
    assert all(same_bits(got[name], expected[name]) for name in expected)


def test_applied_checkpoint_loads_in_transformers_with_the_finetunes_logits(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    compress(trained["base"], trained["ft"], tmp_path / "delta", method="dense")
    apply_delta(tmp_path / "delta", tmp_path / "full")
    model = fresh_memory(AutoModelForCausalLM.from_pretrained(tmp_path / "full"))
    ids = encode(CALIBRATION_TEXTS[0])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh_memory(trained["ft_model"])(input_ids=ids).logits)
    assert (tmp_path / "full" / "tokenizer.json").is_file()


@pytest.mark.filterwarnings("ignore:the in-memory base model")
def test_tensors_equal_to_the_base_are_omitted(trained, tmp_path):
    ft = clone(trained["ft_model"])
    with torch.no_grad():
        ft.model.norm.weight.copy_(trained["base_model"].model.norm.weight)
    delta = compress(trained["base_model"], ft, tmp_path / "delta", method="dense")
    assert "model.norm.weight" not in delta.manifest.tensors
    assert delta.manifest.stats["tensors"]["unchanged"] == 1


@pytest.mark.filterwarnings("ignore:the in-memory base model")
def test_a_dtype_change_alone_is_a_zero_byte_entry_that_keeps_the_dtype(tmp_path):
    base = tiny_llama()
    ft = clone(base).to(torch.bfloat16)
    base_bf16_values = clone(ft).float()  # the base, with values the bf16 fine-tune holds exactly
    delta = compress(base_bf16_values, ft, tmp_path / "delta", method="dare", p=0.9)
    entries = delta.manifest.tensors.values()
    assert all(e.dtype == "bfloat16" and e.stats["stored_bytes"] == 0 for e in entries)


# -- tied, resized, new and missing tensors ------------------------------------------------------


def test_tied_gpt2_embeddings_are_stored_once_and_apply_keeps_them_tied(tmp_path):
    from transformers import GPT2LMHeadModel

    base = tiny_gpt2()
    ft = finetune_by_training(base, steps=5, lr=1e-3)
    save(base, tmp_path / "base")
    delta = compress(tmp_path / "base", ft, tmp_path / "delta", method="dense")
    names = set(delta.manifest.tensors)
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    apply_delta(tmp_path / "delta", tmp_path / "full")
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "full")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert torch.equal(loaded.transformer.wte.weight, ft.transformer.wte.weight)


def test_in_memory_models_give_the_same_delta_as_their_saved_directories(trained, tmp_path):
    from_dirs = compress(trained["base"], trained["ft"], tmp_path / "a", method="dare", p=0.9)
    with pytest.warns(UserWarning, match="records only its fingerprint"):
        from_memory = compress(trained["base_model"], trained["ft_model"], tmp_path / "b", method="dare", p=0.9)
    assert from_memory.manifest.base.local_path is None and from_memory.manifest.base.repo_id is None
    assert from_dirs.manifest.base.fingerprint == from_memory.manifest.base.fingerprint
    assert set(from_dirs.manifest.tensors) == set(from_memory.manifest.tensors)
    for name in from_dirs.manifest.tensors:
        assert torch.equal(from_dirs.reader.stored(name)["values"], from_memory.reader.stored(name)["values"])


def test_an_in_memory_base_loaded_from_a_directory_is_referenced_by_that_directory(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(trained["base"])
    delta = compress(base, trained["ft"], tmp_path / "delta", method="sign")
    assert delta.manifest.base.local_path == str(trained["base"].resolve())


def test_a_resized_vocabulary_is_a_delta_of_the_base_with_its_new_rows_beside_it(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_llama()
    ft = clone(base)
    ft.resize_token_embeddings(base.config.vocab_size + 4)
    ft = structured_perturbation(ft, rel=1e-2, seed=2)
    save(base, tmp_path / "base"), save(ft, tmp_path / "ft")
    delta = compress(tmp_path / "base", tmp_path / "ft", tmp_path / "delta", method="sign")
    tensors = delta.manifest.tensors
    vocab = base.config.vocab_size
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert tensors[name].encoding.label().startswith("sign(tensor) + rows-q(4 rows, 8b")
        assert tensors[name].shape == (vocab + 4, 64) and tensors[name].base_rows == vocab
    apply_delta(tmp_path / "delta", tmp_path / "full")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full").model.embed_tokens.weight.detach()
    want = ft.model.embed_tokens.weight.detach()
    # the rows-q part holds what the sign part leaves of the new rows (they +- its scale): 8-bit codes
    scale = float(delta.reader.stored("model.embed_tokens.weight")["0.scale"].abs().max())
    bound = (float(want[vocab:].abs().max()) + scale) / 127
    assert float((loaded[vocab:] - want[vocab:]).abs().max()) <= bound
    old_delta = want[:vocab] - base.model.embed_tokens.weight.detach()
    assert float((loaded[:vocab] - want[:vocab]).norm() / old_delta.norm()) < 0.8  # the sign's error on the old rows


def test_a_tensor_only_in_the_base_is_an_error_unless_excluded(trained, tmp_path):
    ft = trained["ft_model"]

    class Smaller(torch.nn.Module):  # the fine-tune without its final norm
        def state_dict(self, *a, **k):
            return {n: t for n, t in ft.state_dict().items() if n != "model.norm.weight"}

    with pytest.raises(InvalidArgumentError, match="cannot delete a parameter"):
        compress(trained["base"], Smaller(), tmp_path / "delta", method="dense")
    assert not (tmp_path / "delta").exists()
    delta = compress(trained["base"], Smaller(), tmp_path / "delta", method="dense", exclude=["model.norm.weight"])
    assert "model.norm.weight" not in delta.manifest.tensors


# -- LoRA import ---------------------------------------------------------------------------------


def write_adapter(directory, tensors, config):
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return directory


def test_lora_import_equals_the_merged_lora_weights(trained, tmp_path):
    g = torch.Generator().manual_seed(0)
    base = trained["base_model"]
    prefix = "base_model.model."
    factors, tensors = {}, {}
    for layer in range(2):
        for proj, rank in (("q_proj", 4), ("v_proj", 2)):
            module = f"model.layers.{layer}.self_attn.{proj}"
            weight = dict(base.named_parameters())[f"{module}.weight"]
            a = torch.randn(rank, weight.shape[1], generator=g) * 0.1
            b = torch.randn(weight.shape[0], rank, generator=g) * 0.1
            tensors[f"{prefix}{module}.lora_A.weight"], tensors[f"{prefix}{module}.lora_B.weight"] = a, b
            factors[f"{module}.weight"] = (a, b, rank)
    a_emb = torch.randn(4, base.config.vocab_size, generator=g) * 0.1  # lora_embedding_A [r, vocab]
    b_emb = torch.randn(64, 4, generator=g) * 0.1  # lora_embedding_B [dim, r]
    tensors[f"{prefix}model.embed_tokens.lora_embedding_A"] = a_emb
    tensors[f"{prefix}model.embed_tokens.lora_embedding_B"] = b_emb
    config = {
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {"v_proj": 2},
        "alpha_pattern": {"layers.1.self_attn.q_proj": 16},
        "target_modules": ["q_proj", "v_proj", "embed_tokens"],
        "fan_in_fan_out": False,
    }
    adapter = write_adapter(tmp_path / "adapter", tensors, config)

    delta = compress(trained["base"], adapter, tmp_path / "delta", method="lora")
    assert delta.manifest.method == "lora"
    assert {e.encoding.name for e in delta.manifest.tensors.values()} == {"lowrank"}
    apply_delta(tmp_path / "delta", tmp_path / "full")
    merged = state_dict_on_disk(tmp_path / "full")
    params = dict(base.named_parameters())
    for name, (a, b, rank) in factors.items():
        alpha = 16 if "layers.1.self_attn.q_proj" in name else 8
        expected = params[name].detach() + (b @ a) * (alpha / rank)  # PEFT's merge
        assert torch.allclose(merged[name], expected, rtol=0, atol=1e-6), name
    expected_emb = params["model.embed_tokens.weight"].detach() + (b_emb @ a_emb).T * (8 / 4)
    assert torch.allclose(merged["model.embed_tokens.weight"], expected_emb, rtol=0, atol=1e-6)
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert untouched not in delta.manifest.tensors and torch.equal(merged[untouched], params[untouched])


def test_lora_import_of_fan_in_fan_out_conv1d_layers(tmp_path):
    base = tiny_gpt2()
    save(base, tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 64, generator=g) * 0.1, torch.randn(192, 4, generator=g) * 0.1  # c_attn: Conv1D [64, 192]
    module = "transformer.h.0.attn.c_attn"
    adapter = write_adapter(
        tmp_path / "adapter",
        {f"base_model.model.{module}.lora_A.weight": a, f"base_model.model.{module}.lora_B.weight": b},
        {"r": 4, "lora_alpha": 4, "fan_in_fan_out": True, "use_rslora": True},
    )
    compress(tmp_path / "base", adapter, tmp_path / "delta", method="lora")
    apply_delta(tmp_path / "delta", tmp_path / "full")
    expected = base.transformer.h[0].attn.c_attn.weight.detach() + (b @ a).T * (4 / math.sqrt(4))
    assert torch.allclose(state_dict_on_disk(tmp_path / "full")[f"{module}.weight"], expected, rtol=0, atol=1e-6)


def test_the_lora_method_needs_an_adapter(trained, tmp_path):
    with pytest.raises(InvalidArgumentError, match="LoRA adapter's factors"):
        compress(trained["base"], trained["ft"], tmp_path / "delta", method="lora")


def test_dora_adapters_are_refused(trained, tmp_path):
    adapter = write_adapter(tmp_path / "adapter", {"x": torch.zeros(1)}, {"r": 4, "lora_alpha": 8, "use_dora": True})
    with pytest.raises(InvalidArgumentError, match="DoRA"):
        compress(trained["base"], adapter, tmp_path / "delta", method="lora")


# -- rules, include/exclude, alpha, parameters ---------------------------------------------------


def test_rules_pick_methods_by_name_and_the_first_match_wins(trained, tmp_path):
    delta = compress(
        trained["base"],
        trained["ft"],
        tmp_path / "delta",
        method="dare",
        p=0.9,
        scale="row",
        rules=[
            ("*embed_tokens*", "dense"),
            ("*norm*", "dense"),
            (re.compile(r".*\.q_proj\.weight"), "sign"),
            ("*proj*", "sign", {"scale": "tensor"}),
            ("*q_proj*", "lowrank", {"rank": 2}),
        ],
    )
    tensors = delta.manifest.tensors
    assert tensors["model.embed_tokens.weight"].stats["method"] == "dense"
    assert tensors["model.layers.0.input_layernorm.weight"].stats["method"] == "dense"
    assert tensors["model.layers.0.self_attn.q_proj.weight"].encoding.to_dict() == {
        "scale": "row",
        "scale_bits": 8,
        "scale_group": 64,
    }
    assert tensors["model.layers.0.mlp.up_proj.weight"].encoding.to_dict() == {"scale": "tensor"}
    assert tensors["lm_head.weight"].encoding.name == "sparse"
    assert delta.manifest.method_params["rules"][0] == ["*embed_tokens*", "dense", {"form": "smallest"}]


def test_include_and_exclude_leave_other_tensors_at_the_base(trained, tmp_path):
    delta = compress(
        trained["base"],
        trained["ft"],
        tmp_path / "delta",
        method="dense",
        include=["model.layers.*"],
        exclude=["*mlp*"],
    )
    names = set(delta.manifest.tensors)
    assert names and all(n.startswith("model.layers.") and "mlp" not in n for n in names)
    assert delta.manifest.stats["tensors"]["excluded"] == 21 - len(names)


def test_alpha_is_stored_in_every_delta_entry(trained, tmp_path):
    delta = compress(trained["base"], trained["ft"], tmp_path / "delta", method="sign", alpha=1.5)
    assert {e.alpha for e in delta.manifest.tensors.values()} == {1.5}
    assert delta.manifest.method_params["alpha"] == 1.5


def test_a_parameter_no_method_in_use_takes_is_an_error(trained, tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"\['rank'\] is not a parameter of dare"):
        compress(trained["base"], trained["ft"], tmp_path / "delta", method="dare", rank=4)


def test_methods_that_need_calibration_texts_say_so_before_reading_anything(trained, tmp_path):
    with pytest.raises(InvalidArgumentError, match="needs calibration texts"):
        compress(trained["base"], trained["ft"], tmp_path / "delta", method="darex", p=0.9, q="auto")


def test_an_existing_output_is_kept_unless_overwrite(trained, tmp_path):
    compress(trained["base"], trained["ft"], tmp_path / "delta", method="sign")
    with pytest.raises(OutputExistsError):
        compress(trained["base"], trained["ft"], tmp_path / "delta", method="dense")
    assert DeltaReader(tmp_path / "delta").manifest.method == "sign"
    compress(trained["base"], trained["ft"], tmp_path / "delta", method="dense", overwrite=True)
    assert DeltaReader(tmp_path / "delta").manifest.method == "dense"


# -- what the manifest records -------------------------------------------------------------------


def test_the_manifest_pins_a_local_base_by_absolute_path_and_fingerprint(trained, tmp_path, monkeypatch):
    from delta_format.io.checkpoint import Checkpoint

    monkeypatch.chdir(trained["base"].parent)
    delta = compress("base", trained["ft"], tmp_path / "delta", method="sign")
    assert delta.manifest.base.local_path == str(trained["base"].resolve())
    assert delta.manifest.base.repo_id is None
    assert delta.manifest.base.fingerprint == Checkpoint(trained["base"]).fingerprint()


def test_the_finetunes_config_generation_config_and_tokenizer_are_copied(trained, tmp_path):
    compress(trained["base"], trained["ft"], tmp_path / "delta", method="sign")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (tmp_path / "delta" / name).is_file(), name
    assert (tmp_path / "delta" / "config.json").read_bytes() == (trained["ft"] / "config.json").read_bytes()


def test_recorded_errors_are_those_of_the_stored_bytes(trained, tmp_path):
    delta = compress(trained["base"], trained["ft"], tmp_path / "delta", method="dare", p=0.9, value_dtype="bfloat16")
    base, ft = state_dict_on_disk(trained["base"]), state_dict_on_disk(trained["ft"])
    err_sq = norm_sq = 0.0
    for name, entry in delta.manifest.tensors.items():
        exact = ft[name] - base[name]
        decoded = delta.reader.decode(name)
        rel = float((decoded - exact).norm() / exact.norm())
        assert entry.stats["rel_error"] == pytest.approx(rel, rel=1e-6)
        assert entry.stats["stored_bytes"] == sum(
            t.numel() * t.element_size() for t in delta.reader.stored(name).values()
        )
        err_sq += float((decoded - exact).norm()) ** 2
        norm_sq += float(exact.norm()) ** 2
    stats = delta.manifest.stats
    assert stats["rel_error"] == pytest.approx(math.sqrt(err_sq / norm_sq), rel=1e-6)
    assert stats["compression_ratio"] == pytest.approx(stats["finetune_bytes"] / stats["stored_bytes"])
    assert stats["finetune_bytes"] == sum(t.numel() * t.element_size() for t in ft.values())


def test_calibration_records_output_error_and_a_first_order_loss_estimate_that_holds(trained, tmp_path):
    """EXPO with a small step, alpha = 1.02: the loss change is first order, so the unified view's
    <grad L, theta_hat - theta_ft> should predict it."""
    from transformers import AutoModelForCausalLM

    delta = compress(
        trained["base"],
        trained["ft"],
        tmp_path / "delta",
        method="dense",
        alpha=1.02,
        calibration_texts=CALIBRATION_TEXTS,
    )
    stats = delta.manifest.stats
    apply_delta(tmp_path / "delta", tmp_path / "full")
    actual = loss_of(AutoModelForCausalLM.from_pretrained(tmp_path / "full")) - loss_of(trained["ft_model"])
    assert stats["calibration_loss"] == pytest.approx(loss_of(trained["ft_model"]), rel=1e-5)
    assert stats["loss_change_estimate"] == pytest.approx(actual, rel=0.1)
    assert stats["output_error"] > 0
    assert all("loss_change_estimate" in e.stats for e in delta.manifest.tensors.values())


# -- fidelity on a real fine-tune ----------------------------------------------------------------


def output_error(trained, tmp_path, label, **kwargs):
    kwargs.setdefault("calibration_texts", CALIBRATION_TEXTS)
    return compress(trained["base"], trained["ft"], tmp_path / label, **kwargs).manifest.stats


def test_dare_error_grows_with_p(trained, tmp_path):
    stats = [output_error(trained, tmp_path, f"p{p}", method="dare", p=p) for p in (0.5, 0.9, 0.99)]
    rel = [s["rel_error"] for s in stats]
    out = [s["output_error"] for s in stats]
    assert rel[0] < rel[1] < rel[2] and out[0] < out[1] < out[2]
    assert rel[1] == pytest.approx(3.0, rel=0.1)  # sqrt(p / (1 - p)) for DARE


def test_darex_q_beats_dares_rescale_at_p_099(trained, tmp_path):
    dare = output_error(trained, tmp_path, "dare", method="dare", p=0.99)
    auto = output_error(trained, tmp_path, "auto", method="darex", p=0.99, q="auto")
    searched = output_error(trained, tmp_path, "output", method="darex", p=0.99, q="output")
    assert auto["output_error"] < 0.5 * dare["output_error"]
    assert searched["output_error"] < 0.5 * dare["output_error"]
    assert searched["prepare"]["darex"]["q"] > 0.01  # not DARE's 1 - p


def test_per_row_sign_scales_beat_per_tensor_scales(trained, tmp_path):
    tensor = output_error(trained, tmp_path, "tensor", method="sign", scale="tensor")
    row = output_error(trained, tmp_path, "row", method="sign", scale="row")
    assert row["rel_error"] < tensor["rel_error"] and row["output_error"] < tensor["output_error"]


def test_sign_scale_distillation_lowers_the_logit_mse(trained, tmp_path):
    plain = output_error(trained, tmp_path, "plain", method="sign", scale="row")
    distilled = output_error(trained, tmp_path, "distilled", method="sign", scale="row", distill_steps=20)
    assert distilled["output_error"] < 0.5 * plain["output_error"]
    report = distilled["prepare"]["sign"]
    assert report["output_mse_distilled"] < report["output_mse_initial"]


# -- the Hub -------------------------------------------------------------------------------------


@pytest.mark.hub
def test_a_hub_base_is_pinned_to_the_commit_it_resolved_to(hub, trained, tmp_path):
    repo = hub.repo_id("base")
    hub.api.create_repo(repo)
    hub.api.upload_folder(repo_id=repo, folder_path=str(trained["base"]))
    delta = compress(repo, trained["ft"], tmp_path / "delta", method="sign")
    assert delta.manifest.base.repo_id == repo
    assert delta.manifest.base.revision == hub.api.model_info(repo).sha
    assert delta.manifest.base.local_path is None


@pytest.mark.hub
def test_a_hub_base_is_downloaded_into_cache_dir_and_read_from_it_offline(hub, trained, tmp_path):
    repo = hub.repo_id("base")
    hub.api.create_repo(repo)
    hub.api.upload_folder(repo_id=repo, folder_path=str(trained["base"]))
    cache = tmp_path / "cache"
    with pytest.raises(ResolutionError, match="not in the local cache"):
        compress(repo, trained["ft"], tmp_path / "before", method="sign", cache_dir=cache, local_files_only=True)
    online = compress(repo, trained["ft"], tmp_path / "online", method="sign", cache_dir=cache)
    assert list(cache.rglob("model.safetensors"))
    hub.server.stop()
    offline = compress(repo, trained["ft"], tmp_path / "offline", method="sign", cache_dir=cache, local_files_only=True)
    assert offline.manifest.base == online.manifest.base
