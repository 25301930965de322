"""DeltaModel.from_pretrained: exact loads, lossy loads, bases, alpha, composition, architectures."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from delta_format import BaseMismatchError, DeltaModel, ResolutionError
from delta_format.core.encodings import DenseEncoding, ReplaceEncoding, SignEncoding, SparseEncoding
from delta_format.core.manifest import BaseReference, TensorEntry
from delta_format.core.reconstruct import reconstruct
from delta_format.io.checkpoint import Checkpoint
from delta_format.io.reader import DeltaReader
from delta_format.io.writer import DeltaWriter
from tests.models import fresh_memory

LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=96,
    max_position_embeddings=64,
)


def perturbed(model, rel: float, seed: int):
    """A fine-tune made by a structured perturbation: every parameter moves by ~rel of its scale."""
    g = torch.Generator().manual_seed(seed)
    ft = type(model)(model.config)
    ft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * rel * (p.float().abs().mean() + 1e-3))
    return ft


def write_delta(out, base_dir, ft_dir, encode, method="test", repo_id=None, revision=None):
    """A delta of every changed tensor, encoded by ``encode(name, delta) -> (encoding, stored)``;
    its base reference is ``repo_id@revision`` when given, else ``base_dir``."""
    base, ft = Checkpoint(base_dir), Checkpoint(ft_dir)
    if repo_id:
        ref = BaseReference(repo_id=repo_id, revision=revision, fingerprint=base.fingerprint())
    else:
        ref = BaseReference(local_path=str(base_dir), fingerprint=base.fingerprint())
    with DeltaWriter(out, base=ref, method=method) as writer:
        for name in ft:
            value = ft.get_tensor(name)
            dtype = str(value.dtype).removeprefix("torch.")
            if name not in base or base.shape_dtype(name)[0] != tuple(value.shape):
                writer.add(name, TensorEntry(ReplaceEncoding(), tuple(value.shape), dtype), {"value": value})
                continue
            delta = value.float() - base.get_tensor(name).float()
            if torch.count_nonzero(delta) == 0:
                continue
            encoding, stored = encode(name, delta)
            writer.add(name, TensorEntry(encoding, tuple(delta.shape), dtype), stored)
        for side in ("config.json", "generation_config.json"):
            if (ft_dir / side).is_file():
                writer.add_file(side, ft_dir / side)
    return out


def dense(name, delta):
    return DenseEncoding(), DenseEncoding().encode(delta)


def sign_or_dense(name, delta):
    if delta.dim() == 2:
        return SignEncoding("row"), SignEncoding("row").encode(delta)
    return dense(name, delta)


def sign_coded_or_dense(name, delta):
    if delta.dim() == 2:  # SPEC 1.7: the row scales as 8-bit codes
        return SignEncoding("row", 8, 64), SignEncoding("row", 8, 64).encode(delta)
    return dense(name, delta)


def dare(name, delta):
    if delta.dim() == 2:
        enc = SparseEncoding("seeded", scale=1 / 0.5, seed=3, p=0.5)
        return enc, enc.encode(delta, name=name)
    return dense(name, delta)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA))
    base.save_pretrained(root / "base")
    perturbed(base, 0.05, seed=1).save_pretrained(root / "ft")
    perturbed(base, 0.05, seed=2).save_pretrained(root / "ft2")
    return root


def logits(model, vocab=96):
    ids = torch.arange(12).remainder(vocab).unsqueeze(0)
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_same_weights(model, reference):
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_delta_loads_bit_identical_to_the_full_finetune(llama, tmp_path, dtype):
    delta = write_delta(tmp_path / "d", llama / "base", llama / "ft", dense)
    model = DeltaModel.from_pretrained(delta, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(llama / "ft", dtype=dtype)
    assert type(model) is LlamaForCausalLM and model.dtype == dtype
    assert_same_weights(model, reference)
    assert torch.equal(logits(fresh_memory(model)), logits(fresh_memory(reference)))


def test_rotary_buffers_are_initialised_as_transformers_does(llama, tmp_path):
    model = DeltaModel.from_pretrained(write_delta(tmp_path / "d", llama / "base", llama / "ft", dense))
    reference = AutoModelForCausalLM.from_pretrained(llama / "ft")
    got = dict(model.named_buffers())
    for name, buffer in reference.named_buffers():
        assert torch.equal(got[name], buffer), name


@pytest.mark.parametrize("encode", [sign_or_dense, sign_coded_or_dense])
def test_lossy_load_equals_decoding_each_tensor_onto_the_base(llama, tmp_path, encode):
    delta = write_delta(tmp_path / "d", llama / "base", llama / "ft", encode)
    model = DeltaModel.from_pretrained(delta)
    reader, base = DeltaReader(delta), Checkpoint(llama / "base")
    state = model.state_dict()
    for name in reader:
        expected = reconstruct(name, reader.entry(name), reader.decode(name), base.get_tensor(name))
        assert torch.equal(state[name], expected), name
    untouched = [n for n in base if n not in reader.manifest.tensors]
    for name in untouched:
        assert torch.equal(state[name], base.get_tensor(name))


def test_generate_and_save_pretrained_work_on_the_loaded_model(llama, tmp_path):
    model = DeltaModel.from_pretrained(write_delta(tmp_path / "d", llama / "base", llama / "ft", dare))
    out = model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    model.save_pretrained(tmp_path / "saved")
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "saved"), model)


def test_wrong_base_is_refused_before_a_model_is_returned(llama, tmp_path):
    delta = write_delta(tmp_path / "d", llama / "base", llama / "ft", dense)
    with pytest.raises(BaseMismatchError) as info:
        DeltaModel.from_pretrained(delta, base_model=llama / "ft2")
    message = str(info.value)
    assert "expected fingerprint" in message and "other weights" in message and "verify_base=False" in message


def test_verify_base_false_loads_against_another_base_with_a_warning(llama, tmp_path):
    delta = write_delta(tmp_path / "d", llama / "base", llama / "ft", dense)
    with pytest.warns(UserWarning, match="not checked"):
        model = DeltaModel.from_pretrained(delta, base_model=llama / "ft2", verify_base=False)
    other = Checkpoint(llama / "ft2")
    reader = DeltaReader(delta)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.state_dict()[name], other.get_tensor(name) + reader.decode(name))


def test_base_of_another_architecture_is_refused(llama, tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=96)).save_pretrained(tmp_path / "gpt2")
    delta = write_delta(tmp_path / "d", llama / "base", llama / "ft", dense)
    with pytest.raises(BaseMismatchError, match="another architecture"):
        DeltaModel.from_pretrained(delta, base_model=tmp_path / "gpt2")


def misfit_delta(llama, out):
    """A delta of the right base whose ``model.norm.weight`` has 3 entries where the model has 64."""
    base = Checkpoint(llama / "base")
    ref = BaseReference(local_path=str(llama / "base"), fingerprint=base.fingerprint())
    with DeltaWriter(out, base=ref, method="test") as writer:
        writer.add(
            "model.norm.weight", TensorEntry(DenseEncoding(), (3,), "float32"), DenseEncoding().encode(torch.ones(3))
        )
        writer.add_file("config.json", llama / "ft" / "config.json")
    return out


def _swap_in(llama, delta):
    DeltaModel.from_pretrained(write_delta(delta.parent / "fits", llama / "base", llama / "ft", dense)).swap_delta(
        delta
    )


def _attach(llama, delta):
    from delta_format import attach_deltas

    attach_deltas(AutoModelForCausalLM.from_pretrained(llama / "base"), {"misfit": delta})


def _apply(llama, delta):
    from delta_format.loaders.apply import apply_delta

    apply_delta(delta, delta.parent / "full")


@pytest.mark.parametrize(
    "load",
    [lambda llama, d: DeltaModel.from_pretrained(d), _swap_in, _attach, _apply],
    ids=["from_pretrained", "swap_delta", "attach_deltas", "apply_delta"],
)
def test_a_delta_that_reshapes_a_parameter_is_a_base_mismatch_in_every_loader(llama, tmp_path, load):
    with pytest.raises(BaseMismatchError, match="'model.norm.weight' \\[3\\] vs \\[64\\]"):
        load(llama, misfit_delta(llama, tmp_path / "misfit"))
    assert not (tmp_path / "full").exists()


def test_verify_reports_a_delta_that_reshapes_a_parameter_of_its_base(llama, tmp_path):
    from delta_format.loaders.apply import verify_delta

    report = verify_delta(misfit_delta(llama, tmp_path / "misfit"))
    assert not report.ok and any(line.startswith("FAIL  base") and "another shape" in line for line in report.lines)


def test_verify_base_false_warns_the_same_way_in_every_loader(llama, tmp_path):
    from delta_format import attach_deltas
    from delta_format.loaders.apply import apply_delta

    delta = write_delta(tmp_path / "d", llama / "base", llama / "ft", dense)
    with pytest.warns(UserWarning, match="verify_base=False: the base model is not checked") as caught:
        model = DeltaModel.from_pretrained(delta, verify_base=False)
        model.swap_delta(delta)
        attach_deltas(AutoModelForCausalLM.from_pretrained(llama / "base"), {"d": delta}, verify_base=False)
        apply_delta(delta, tmp_path / "full", verify_base=False)
    assert len([w for w in caught if "verify_base=False" in str(w.message)]) == 4
    assert all(w.filename == __file__ for w in caught if "verify_base=False" in str(w.message))


def test_missing_base_directory_is_a_resolution_error(llama, tmp_path):
    delta = write_delta(tmp_path / "d", llama / "base", llama / "ft", dense)
    with pytest.raises(ResolutionError, match="not a directory"):
        DeltaModel.from_pretrained(delta, base_model=tmp_path / "nowhere")


def test_alpha_scales_the_stored_coefficient_at_load_time(llama, tmp_path):
    delta = write_delta(tmp_path / "d", llama / "base", llama / "ft", dense)
    model = DeltaModel.from_pretrained(delta, alpha=2.0)
    base, ft = Checkpoint(llama / "base"), Checkpoint(llama / "ft")
    name = "model.layers.1.self_attn.q_proj.weight"
    b = base.get_tensor(name)
    assert torch.equal(model.state_dict()[name], b + 2.0 * (ft.get_tensor(name) - b))


def test_alpha_zero_gives_the_base_model(llama, tmp_path):
    delta = write_delta(tmp_path / "d", llama / "base", llama / "ft", sign_or_dense)
    model = DeltaModel.from_pretrained(delta, alpha=0.0)
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(llama / "base"))


def test_two_deltas_compose_with_weights(llama, tmp_path):
    d1 = write_delta(tmp_path / "d1", llama / "base", llama / "ft", dense)
    d2 = write_delta(tmp_path / "d2", llama / "base", llama / "ft2", dense)
    model = DeltaModel.from_pretrained([d1, d2], weights=[0.5, 0.25])
    r1, r2, base = DeltaReader(d1), DeltaReader(d2), Checkpoint(llama / "base")
    name = "model.layers.0.self_attn.v_proj.weight"
    expected = (base.get_tensor(name) + 0.5 * r1.decode(name)) + 0.25 * r2.decode(name)
    assert torch.equal(model.state_dict()[name], expected)


def test_composing_deltas_of_different_bases_is_refused(llama, tmp_path):
    d1 = write_delta(tmp_path / "d1", llama / "base", llama / "ft", dense)
    d2 = write_delta(tmp_path / "d2", llama / "ft2", llama / "ft", dense)
    with pytest.raises(BaseMismatchError, match="different bases"):
        DeltaModel.from_pretrained([d1, d2])


def test_gpt2_tied_embeddings_are_tied_after_loading(tmp_path):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=32))
    base.save_pretrained(tmp_path / "base")
    perturbed(base, 0.05, seed=1).save_pretrained(tmp_path / "ft")
    model = DeltaModel.from_pretrained(write_delta(tmp_path / "d", tmp_path / "base", tmp_path / "ft", dense))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    assert_same_weights(model, reference)
    assert torch.equal(logits(fresh_memory(model)), logits(fresh_memory(reference)))


def test_resized_vocabulary_is_carried_by_replace_tensors(llama, tmp_path):
    ft = AutoModelForCausalLM.from_pretrained(llama / "ft")
    ft.resize_token_embeddings(100)  # added tokens
    ft.save_pretrained(tmp_path / "ft")
    delta = write_delta(tmp_path / "d", llama / "base", tmp_path / "ft", dense)
    encodings = {n: e.encoding.name for n, e in DeltaReader(delta).manifest.tensors.items()}
    assert encodings["model.embed_tokens.weight"] == "replace" and encodings["lm_head.weight"] == "replace"
    model = DeltaModel.from_pretrained(delta)
    assert model.get_input_embeddings().weight.shape == (100, 64)
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(tmp_path / "ft"))


@pytest.mark.parametrize("cls", [BertForMaskedLM, BertForSequenceClassification])
def test_bert_encoders_and_classification_heads_load_exactly(tmp_path, cls):
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=96,
        max_position_embeddings=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    base = cls(config)
    base.save_pretrained(tmp_path / "base")
    perturbed(base, 0.05, seed=1).save_pretrained(tmp_path / "ft")
    model = DeltaModel.from_pretrained(write_delta(tmp_path / "d", tmp_path / "base", tmp_path / "ft", dense))
    assert type(model) is cls
    reference = cls.from_pretrained(tmp_path / "ft")
    assert_same_weights(model, reference)
    assert torch.equal(logits(fresh_memory(model)), logits(fresh_memory(reference)))


def test_classification_finetune_of_a_masked_lm_base_replaces_the_new_head(tmp_path):
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=96,
        max_position_embeddings=32,
        num_labels=2,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    ft = BertForSequenceClassification.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        ft.classifier.weight.add_(1.0)
    ft.save_pretrained(tmp_path / "ft")
    delta = write_delta(tmp_path / "d", tmp_path / "base", tmp_path / "ft", dense)
    assert list(DeltaReader(delta).manifest.tensors) == ["classifier.weight"]
    assert_same_weights(DeltaModel.from_pretrained(delta), ft)


def test_generation_config_comes_from_the_delta(llama, tmp_path):
    ft = AutoModelForCausalLM.from_pretrained(llama / "ft")
    ft.generation_config.do_sample, ft.generation_config.temperature = True, 0.55
    ft.save_pretrained(tmp_path / "ft")
    delta = write_delta(tmp_path / "d", llama / "base", tmp_path / "ft", dense)
    model = DeltaModel.from_pretrained(delta)
    assert model.generation_config.temperature == 0.55 and model.generation_config.do_sample


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_placement_puts_every_weight_on_the_gpu_and_matches_cpu(llama, tmp_path):
    delta = write_delta(tmp_path / "d", llama / "base", llama / "ft", dare)
    gpu = DeltaModel.from_pretrained(delta, device_map="cuda")
    cpu = DeltaModel.from_pretrained(delta)
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    for name, tensor in cpu.state_dict().items():
        assert torch.equal(gpu.state_dict()[name].cpu(), tensor), name


def test_load_time_alpha_applies_to_whole_values_of_same_shape_as_the_base(llama, tmp_path):
    base = Checkpoint(llama / "base")

    def replace_all(name, delta):  # the lossless dense method's fallback stores whole values
        value = base.get_tensor(name).float() + delta
        return ReplaceEncoding(), {"value": value}

    delta = write_delta(tmp_path / "d", llama / "base", llama / "ft", replace_all)
    name = "model.layers.0.mlp.down_proj.weight"
    b, value = base.get_tensor(name), DeltaReader(delta).decode(name)
    assert torch.equal(DeltaModel.from_pretrained(delta).state_dict()[name], value)
    extrapolated = DeltaModel.from_pretrained(delta, alpha=1.5).state_dict()[name]
    assert torch.equal(extrapolated, b + (value - b) * 1.5)
