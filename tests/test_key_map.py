"""Checkpoint names against model names (`delta_format.io.key_map`): transformers loads some
architectures under other names than their checkpoints keep (GPT-NeoX's ``embed_out`` is the
model's ``lm_head``), a classifier fine-tuned from a bare base prefixes the base's names
(``bert.``), and mixture-of-experts checkpoints are converted (experts stacked). Each loads, and
gives the weights transformers gives for the same fine-tune written out by ``apply``."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import transformers as T

import delta_format
from delta_format import DeltaModel, attach_deltas, using_delta
from delta_format.compression.sources import CheckpointSource
from delta_format.io.key_map import ConvertedCheckpointError
from delta_format.loaders.apply import apply_delta
from tests.models import clone, structured_perturbation

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])


def pair(tmp_path, build, name, seed=3):
    torch.manual_seed(0)
    base = build().eval()
    base.save_pretrained(tmp_path / f"{name}-base")
    structured_perturbation(clone(base), rel=2e-2, seed=seed).save_pretrained(tmp_path / f"{name}-ft")
    return tmp_path / f"{name}-base", tmp_path / f"{name}-ft"


def applied(delta_dir, out, cls):
    apply_delta(delta_dir, out, progress=False)
    return cls.from_pretrained(out).eval()


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def gpt_neox():
    return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**SMALL))


def test_renamed_keys_load_as_transformers_loads_the_applied_fine_tune(tmp_path):
    base, ft = pair(tmp_path, gpt_neox, "neox")
    assert "embed_out.weight" in CheckpointSource(ft).head_names()  # the head prior sees the checkpoint's name
    for label, kw in (("dare", dict(method="dare", p=0.9)), ("budget", dict(bits=0.5))):
        delta = delta_format.compress(base, ft, tmp_path / label, progress=False, **kw)
        assert "embed_out.weight" in delta.manifest.tensors  # named as the fine-tune's checkpoint names it
        model = DeltaModel.from_pretrained(tmp_path / label)
        reference = applied(tmp_path / label, tmp_path / f"{label}-full", T.GPTNeoXForCausalLM)
        assert same_weights(model, reference), label
    model.swap_delta(tmp_path / "dare")  # a swap reads the new delta through the same names
    assert same_weights(model, applied(tmp_path / "dare", tmp_path / "dare-full-2", T.GPTNeoXForCausalLM))


@pytest.mark.parametrize("with_base_files", [True, False])
def test_on_the_fly_deltas_attach_to_a_model_with_renamed_keys(tmp_path, with_base_files):
    base, ft = pair(tmp_path, gpt_neox, "neox")
    delta_format.compress(base, ft, tmp_path / "d", method="dare", p=0.9, progress=False)
    materialised = DeltaModel.from_pretrained(tmp_path / "d")
    model = T.GPTNeoXForCausalLM.from_pretrained(base).eval()
    attach_deltas(model, {"ft": tmp_path / "d"}, base_model=base if with_base_files else None)
    with torch.no_grad(), using_delta(model, "ft"):
        got = model(IDS).logits
        want = materialised(IDS).logits
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_a_classifier_fine_tuned_from_a_bare_base_is_a_delta_of_it(tmp_path):
    """``embeddings.…`` of a ``BertModel`` base is ``bert.embeddings.…`` of its classifier (with
    its own number of labels): a delta of the base, not a copy of every tensor."""
    config = T.BertConfig(**SMALL)
    torch.manual_seed(0)
    T.BertModel(config).save_pretrained(tmp_path / "base")
    head = copy.deepcopy(config)
    head.num_labels = 5
    ft = T.BertForSequenceClassification(head)
    ft.bert.load_state_dict(T.BertModel.from_pretrained(tmp_path / "base").state_dict())
    structured_perturbation(ft, rel=2e-2, seed=3).save_pretrained(tmp_path / "ft")
    ft = T.BertForSequenceClassification.from_pretrained(tmp_path / "ft").eval()
    lossless = delta_format.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "dense", method="dense")
    replaced = {n for n, e in lossless.manifest.tensors.items() if e.encoding.name == "replace"}
    assert replaced == {"classifier.weight", "classifier.bias"}  # only the new head is stored whole
    assert same_weights(DeltaModel.from_pretrained(tmp_path / "dense"), ft)
    assert same_weights(applied(tmp_path / "dense", tmp_path / "full", T.BertForSequenceClassification), ft)
    from delta_format.loaders.apply import verify_delta

    report = verify_delta(tmp_path / "dense", base_model=tmp_path / "base")
    assert report.ok, report.lines
    with pytest.warns(UserWarning, match="classifier.weight is stored whole"):  # 10 % of this tiny budget
        budget = delta_format.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "bits", bits=1.0)
    assert budget.manifest.stats["stored_bytes"] < 0.2 * lossless.manifest.stats["stored_bytes"]
    model = DeltaModel.from_pretrained(tmp_path / "bits")
    assert type(model) is T.BertForSequenceClassification and model.config.num_labels == 5


def test_converted_checkpoints_load_through_transformers_own_conversion(tmp_path):
    """Mixtral stacks its experts on loading: the fine-tune is rebuilt under the checkpoint's
    names and transformers converts it; on-the-fly serving refuses, saying what to do."""
    config = T.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **SMALL)
    base, ft = pair(tmp_path, lambda: T.MixtralForCausalLM(config), "moe")
    delta_format.compress(base, ft, tmp_path / "d", method="dare", p=0.9, progress=False)
    model = DeltaModel.from_pretrained(tmp_path / "d")
    assert same_weights(model, applied(tmp_path / "d", tmp_path / "full", T.MixtralForCausalLM))
    with pytest.raises(ConvertedCheckpointError, match="delta-format apply"):
        attach_deltas(T.MixtralForCausalLM.from_pretrained(base), {"ft": tmp_path / "d"})
    # a base that lacks a tensor the model needs is refused, never initialised at random
    from safetensors.torch import load_file, save_file

    from delta_format.errors import BaseMismatchError

    shutil.copytree(base, tmp_path / "short")
    tensors = load_file(tmp_path / "short" / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "short" / "model.safetensors", metadata={"format": "pt"})
    delta_format.compress(base, ft, tmp_path / "kept", method="dare", p=0.9, exclude=["model.norm.weight"])
    with pytest.raises(BaseMismatchError, match="does not fill the model"), pytest.warns(UserWarning):
        DeltaModel.from_pretrained(tmp_path / "kept", base_model=tmp_path / "short", verify_base=False)


def test_a_lora_export_targets_the_modules_under_the_model_names(tmp_path):
    peft = pytest.importorskip("peft")
    from delta_format.loaders.export_lora import export_lora

    base, ft = pair(tmp_path, gpt_neox, "neox")
    delta_format.compress(base, ft, tmp_path / "d", method="lowrank", rank=4, progress=False)
    report = export_lora(tmp_path / "d", tmp_path / "lora", rank=4)
    model = peft.PeftModel.from_pretrained(T.GPTNeoXForCausalLM.from_pretrained(base), str(report.directory)).eval()
    materialised = DeltaModel.from_pretrained(tmp_path / "d")
    with torch.no_grad():
        got, want = model(IDS).logits, materialised(IDS).logits
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_two_tensors_that_load_under_one_name_are_refused(tmp_path):
    """A renaming under which two entries (or two base tensors) would take one name would drop one
    silently: refused."""
    from delta_format.errors import CorruptDeltaError
    from delta_format.io.checkpoint import Checkpoint
    from delta_format.io.reader import DeltaReader

    base, ft = pair(tmp_path, gpt_neox, "neox")
    delta_format.compress(base, ft, tmp_path / "d", method="dense", progress=False)
    onto = {"embed_out.weight": "gpt_neox.embed_in.weight"}  # an entry renamed onto another's name
    with pytest.raises(CorruptDeltaError, match="two tensors that load as 'gpt_neox.embed_in.weight'"):
        DeltaReader(tmp_path / "d").renamed(onto)
    with pytest.raises(CorruptDeltaError, match="two tensors"):
        Checkpoint(base).renamed(onto)
    assert (
        DeltaReader(tmp_path / "d").renamed({"embed_out.weight": "lm_head.weight"}).source_name("lm_head.weight")
        == "embed_out.weight"
    )


@pytest.mark.parametrize("differs", [False, True])
def test_a_tied_copy_in_the_fine_tunes_checkpoint_is_left_out_as_transformers_leaves_it(tmp_path, differs):
    """Some exporters save a tied head beside its embedding: transformers loads the embedding for
    both, so the delta leaves the copy out (it used to be stored whole, and the load refused it).
    A copy with other values makes transformers load the two untied: the delta keeps it and the
    loaded model is untied too."""
    from safetensors.torch import load_file, save_file

    from tests.models import save, tiny_llama

    base = tiny_llama(tie=True)
    save(base, tmp_path / "base")
    save(structured_perturbation(clone(base), rel=2e-2, seed=3), tmp_path / "ft")
    tensors = load_file(tmp_path / "ft" / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] * (2 if differs else 1)
    save_file(tensors, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    reference = T.AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    delta = delta_format.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "d", method="dense")
    assert ("lm_head.weight" in delta.manifest.tensors) is differs
    assert delta.manifest.stats["tensors"].get("tied", 0) == (0 if differs else 1)
    model = DeltaModel.from_pretrained(tmp_path / "d")
    assert same_weights(model, reference)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is not differs


def test_calibration_measures_renamed_tensors_under_the_checkpoints_names(tmp_path):
    """The calibration model holds GPT-NeoX's head as ``lm_head``; the compressor names it
    ``embed_out``: the session answers for both (activations, gradients, the edited value)."""
    from tests.models import CALIBRATION_TEXTS, byte_tokenizer

    base, ft = pair(tmp_path, gpt_neox, "neox")
    for directory in (base, ft):
        byte_tokenizer().save_pretrained(directory)
    delta = delta_format.compress(
        base, ft, tmp_path / "d", method="darex", p=0.9, q="auto", calibration_texts=CALIBRATION_TEXTS[:4]
    )
    assert "loss_change_estimate" in delta.manifest.tensors["embed_out.weight"].stats


def test_a_converted_load_checks_every_files_checksum_first(tmp_path, monkeypatch):
    """A load that fills the materialised cache opens the delta without checksums (a hit reads no
    delta bytes) and checks them on a miss; the converted path is always a miss, so it checks."""
    from delta_format.errors import CorruptDeltaError

    monkeypatch.setenv("DELTA_FORMAT_MATERIALIZED_CACHE", str(tmp_path / "cache"))
    config = T.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **SMALL)
    base, ft = pair(tmp_path, lambda: T.MixtralForCausalLM(config), "moe")
    delta_format.compress(base, ft, tmp_path / "d", method="dare", p=0.5, progress=False)  # plain values
    weights = next((tmp_path / "d").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one flipped bit in a stored value: same size, another SHA-256
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptDeltaError, match="SHA-256|sha256|checksum"):
        DeltaModel.from_pretrained(tmp_path / "d")


def test_a_fine_tune_tensor_its_architecture_does_not_load_is_ignored(tmp_path):
    """An older transformers saved rotary ``inv_freq`` buffers that today's models do not load: the
    fine-tune loads without them, and its delta leaves them out (it stored one whole, and the load
    then refused a parameter the model lacks)."""
    from safetensors.torch import load_file, save_file

    from tests.models import save, tiny_llama

    base = tiny_llama()
    save(base, tmp_path / "base")
    save(structured_perturbation(clone(base), rel=2e-2, seed=3), tmp_path / "ft")
    tensors = load_file(tmp_path / "ft" / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.arange(8.0)
    save_file(tensors, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    delta = delta_format.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "d", method="dense")
    assert delta.manifest.stats["ignored_finetune_tensors"] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in delta.manifest.tensors
    assert same_weights(
        DeltaModel.from_pretrained(tmp_path / "d"), T.AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    )
