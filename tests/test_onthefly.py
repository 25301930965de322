"""On-the-fly deltas: several fine-tunes kept encoded on one base, applied in each Linear's forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import delta_format
from delta_format import BaseMismatchError, DeltaFormatError, DeltaModel
from delta_format.core.encodings import ReplaceEncoding
from delta_format.loaders.onthefly import (
    MERGE_MIN_TOKENS,
    DeltaEmbedding,
    DeltaLinear,
    UnsupportedOnTheFlyError,
    attach_deltas,
    detach_deltas,
    load_on_the_fly,
    set_active_delta,
    using_delta,
)
from tests.models import fresh_memory
from tests.test_loader import LLAMA, dense, perturbed, write_delta
from tests.test_swap import assert_equal_state, weights

ENCODINGS = ["sign", "dare", "lowrank", "dense"]

BATCH = torch.arange(2 * MERGE_MIN_TOKENS).remainder(96).view(2, MERGE_MIN_TOKENS)
"""Enough tokens for sign/dense to merge the delta into the weight for the call."""
FEW = BATCH[:1, :3]
"""Few enough that sign/dense/lowrank multiply the delta separately (two products)."""

RELATIVE_BOUND = 1e-5
"""On-the-fly logits vs the materialised fine-tune's, max |difference| / max |logit|, float32.
Measured: 0 where the delta is merged into the weight (the same §9 arithmetic), at most 5e-7
where it is multiplied separately (another rounding order); the base is >= 7e-2 away."""


def _compress(root, name, **kwargs):
    return delta_format.compress(root / "base", root / f"ft-{name}", root / name, progress=False, **kwargs).directory


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A float32 tiny Llama base and one fine-tune per encoding, every parameter perturbed (so
    the deltas edit embeddings, norms and the head as well as the Linear layers)."""
    root = tmp_path_factory.mktemp("onthefly")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA))
    base.save_pretrained(root / "base")
    for i, name in enumerate(ENCODINGS):
        perturbed(base, 0.05, seed=20 + i).save_pretrained(root / f"ft-{name}")
    _compress(root, "sign", method="sign", scale="row")
    _compress(root, "dare", method="dare", p=0.9, seed=0)
    _compress(root, "lowrank", method="lowrank", rank=4)
    write_delta(root / "dense", root / "base", root / "ft-dense", dense)
    return root


def base_model(family, **kwargs):
    return fresh_memory(AutoModelForCausalLM.from_pretrained(family / "base", **kwargs))


def logits(model, ids=BATCH):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def served(family):
    """A base with every fine-tune of the family attached on the fly."""
    model = base_model(family)
    attach_deltas(model, {name: family / name for name in ENCODINGS})
    return model


@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("ids", [BATCH, FEW], ids=["batch", "few-tokens"])
def test_on_the_fly_logits_match_the_materialised_finetune(family, served, name, ids):
    reference = logits(fresh_memory(DeltaModel.from_pretrained(family / name)), ids)
    scale = float(reference.abs().max())
    set_active_delta(served, name)
    error = float((logits(served, ids) - reference).abs().max())
    base_gap = float((logits(base_model(family), ids) - reference).abs().max())
    assert error <= RELATIVE_BOUND * scale
    assert base_gap >= 1e3 * RELATIVE_BOUND * scale  # the bound tells fine-tune from base
    if ids is BATCH and name != "lowrank":
        assert error == 0  # merged into the weight with the arithmetic of a load: the same bits


def test_sign_and_sparse_stay_encoded(family, served):
    adapters = served.on_the_fly_deltas.adapters
    layer = served.model.layers[0]
    assert isinstance(layer.mlp.up_proj, DeltaLinear) and isinstance(served.model.embed_tokens, DeltaEmbedding)
    assert sorted(layer.mlp.up_proj.factors) == sorted(ENCODINGS)
    matrices = sum(p.numel() * p.element_size() for p in served.parameters() if p.dim() == 2)
    assert adapters["sign"].nbytes < matrices / 20  # 1 bit per float32 weight, plus scales and vectors
    assert adapters["dare"].nbytes < matrices / 4  # 10 % of the entries, value and int32 position


def test_switching_adapters_gives_the_outputs_of_fresh_attachments(family, served):
    fresh = {}
    for name in ["sign", "dare"]:
        model = base_model(family)
        attach_deltas(model, {name: family / name})
        set_active_delta(model, name)
        fresh[name] = logits(model)
    plain = base_model(family)
    for name in ["sign", "dare", None, "sign", "dare", "dare"]:
        set_active_delta(served, name)
        assert torch.equal(logits(served), fresh[name] if name else logits(plain))
    set_active_delta(served, None)
    assert_equal_state(weights(served), weights(plain))  # the vectors are the base's again


def test_using_delta_restores_the_previous_adapter(family, served):
    set_active_delta(served, "sign")
    with using_delta(served, "lowrank"):
        assert served.on_the_fly_deltas.active == "lowrank"
    assert served.on_the_fly_deltas.active == "sign"


def test_alpha_matches_a_materialised_load_with_alpha(family):
    model = base_model(family)
    attach_deltas(model, {"x": family / "sign"}, alpha=1.5)
    set_active_delta(model, "x")
    reference = logits(DeltaModel.from_pretrained(family / "sign", alpha=1.5))
    assert float((logits(model) - reference).abs().max()) <= RELATIVE_BOUND * float(reference.abs().max())


def test_detach_puts_the_original_modules_back(family, served):
    before = {n: type(m) for n, m in base_model(family).named_modules()}
    set_active_delta(served, "dare")
    detach_deltas(served, ["dare", "sign"])
    assert served.on_the_fly_deltas.active is None and sorted(served.on_the_fly_deltas.adapters) == ["dense", "lowrank"]
    detach_deltas(served)
    assert not hasattr(served, "on_the_fly_deltas")
    assert {n: type(m) for n, m in served.named_modules()} == before
    assert torch.equal(logits(served), logits(base_model(family)))


def test_tied_embeddings_get_the_delta_in_the_lookup_and_in_the_head(tmp_path):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=True))
    base.save_pretrained(tmp_path / "base")
    perturbed(base, 0.05, seed=3).save_pretrained(tmp_path / "ft-sign")
    _compress(tmp_path, "sign", method="sign", scale="row")
    model = base_model(tmp_path)
    attach_deltas(model, {"ft": tmp_path / "sign"})
    set_active_delta(model, "ft")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.factors["ft"] is model.model.embed_tokens.factors["ft"]
    reference = logits(DeltaModel.from_pretrained(tmp_path / "sign"))
    assert float((logits(model) - reference).abs().max()) <= RELATIVE_BOUND * float(reference.abs().max())


def test_a_delta_of_another_base_is_refused_and_the_model_is_untouched(family, tmp_path):
    write_delta(tmp_path / "foreign", family / "ft-sign", family / "ft-dare", dense)
    model = base_model(family)
    before = weights(model)
    with pytest.raises(BaseMismatchError, match="not the one this delta was made against"):
        attach_deltas(model, {"ok": family / "sign", "foreign": tmp_path / "foreign"})
    assert not hasattr(model, "on_the_fly_deltas")
    assert not any(isinstance(m, (DeltaLinear, DeltaEmbedding)) for m in model.modules())
    assert_equal_state(weights(model), before)

    attach_deltas(model, {"ok": family / "sign"})
    set_active_delta(model, "ok")
    served = logits(model)
    with pytest.raises(BaseMismatchError, match="not the one this delta was made against"):
        attach_deltas(model, {"foreign": tmp_path / "foreign"})
    assert sorted(model.on_the_fly_deltas.adapters) == ["ok"] and torch.equal(logits(model), served)


def test_verify_base_false_attaches_a_foreign_delta_with_a_warning(family, tmp_path):
    write_delta(tmp_path / "foreign", family / "ft-sign", family / "ft-dare", dense)
    model = base_model(family)
    with pytest.warns(UserWarning, match="verify_base=False"):
        attach_deltas(model, {"foreign": tmp_path / "foreign"}, verify_base=False)
    assert sorted(model.on_the_fly_deltas.adapters) == ["foreign"]


def test_a_model_loaded_in_a_narrower_dtype_is_checked_through_its_files(family):
    model = base_model(family, dtype=torch.bfloat16)
    with pytest.raises(BaseMismatchError, match="pass base_model=<the base checkpoint directory>"):
        attach_deltas(model, {"sign": family / "sign"})
    attach_deltas(model, {"sign": family / "sign"}, base_model=family / "base")
    set_active_delta(model, "sign")
    assert logits(model).dtype == torch.bfloat16


def test_load_on_the_fly_resolves_the_base_from_the_manifests(family):
    model = load_on_the_fly({name: family / name for name in ["sign", "dare"]})
    assert sorted(model.on_the_fly_deltas.adapters) == ["dare", "sign"] and model.on_the_fly_deltas.active is None
    assert torch.equal(logits(model), logits(base_model(family)))


def _replace_matrices(name, delta):
    return (ReplaceEncoding(), {"value": delta}) if delta.dim() == 2 else dense(name, delta)


def test_replace_on_a_matrix_is_refused_with_a_typed_error(family, tmp_path):
    write_delta(tmp_path / "replace", family / "base", family / "ft-dense", _replace_matrices)
    model = base_model(family)
    before = weights(model)
    with pytest.raises(UnsupportedOnTheFlyError, match="'replace'") as info:
        attach_deltas(model, {"r": tmp_path / "replace"})
    assert isinstance(info.value, DeltaFormatError) and info.value.expected and info.value.found and info.value.fix
    assert not hasattr(model, "on_the_fly_deltas")
    assert_equal_state(weights(model), before)


def test_matrices_of_other_modules_are_refused(tmp_path):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=96, n_positions=32))
    base.save_pretrained(tmp_path / "base")
    perturbed(base, 0.05, seed=1).save_pretrained(tmp_path / "ft")
    write_delta(tmp_path / "d", tmp_path / "base", tmp_path / "ft", dense)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with pytest.raises(UnsupportedOnTheFlyError, match="Conv1D"):
        attach_deltas(model, {"d": tmp_path / "d"})
    assert not hasattr(model, "on_the_fly_deltas")


def test_unknown_adapter_names_are_refused(served):
    with pytest.raises(DeltaFormatError, match="no such on-the-fly delta"):
        set_active_delta(served, "nope")
    with pytest.raises(DeltaFormatError, match="must be new"):
        attach_deltas(served, {"sign": "anything"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("name", ENCODINGS)
def test_cuda_matches_cpu(family, name):
    cpu = base_model(family)
    attach_deltas(cpu, {name: family / name})
    set_active_delta(cpu, name)
    cuda = base_model(family).to("cuda")
    attach_deltas(cuda, {name: family / name})
    set_active_delta(cuda, name)
    for ids in (BATCH, FEW):
        want = logits(cpu, ids)
        got = logits(cuda, ids.to("cuda")).cpu()
        assert float((got - want).abs().max()) <= 1e-4 * float(
            want.abs().max()
        )  # TF32-free float32 kernels differ in order
    set_active_delta(cuda, None)
    assert torch.allclose(logits(cuda, BATCH.to("cuda")).cpu(), logits(base_model(family)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "device_map", [None, "cpu", torch.device("cpu"), {"": "cpu"}], ids=["none", "str", "device", "dict"]
)
def test_load_on_the_fly_takes_the_device_maps_from_pretrained_takes(family, device_map):
    model = load_on_the_fly({"sign": family / "sign"}, device_map=device_map)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    set_active_delta(model, "sign")
    assert torch.isfinite(logits(model)).all()
