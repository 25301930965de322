"""The merged-weight cache of on-the-fly serving: the active adapter's merged weights kept across
calls, the same bits as the merge path, emptied when adapters change, within its byte budget."""

from __future__ import annotations

import pytest
import torch

from delta_format import DeltaFormatError, DeltaModel
from delta_format.loaders.onthefly import DeltaLinear, attach_deltas, detach_deltas, load_on_the_fly, set_active_delta
from tests import test_onthefly
from tests.models import fresh_memory
from tests.test_onthefly import BATCH, ENCODINGS, FEW, RELATIVE_BOUND, base_model, logits

family = test_onthefly.family
"""The fixture of tests/test_onthefly.py: a float32 tiny Llama base and one delta per encoding."""

CACHED = ["sign", "dare", "dense"]
"""Encodings whose merged weight is kept (lowrank's two thin products are cheap already)."""


def served(family, names=ENCODINGS, **kwargs):
    model = base_model(family)
    attach_deltas(model, {name: family / name for name in names}, **kwargs)
    return model


def cache(model):
    return model.on_the_fly_deltas.merged_weights


def edited_linears(model, name):
    return [m for m in model.modules() if isinstance(m, DeltaLinear) and name in m.factors]


def weight_bytes(module):
    return module.weight.numel() * module.weight.element_size()


@pytest.mark.parametrize("name", CACHED)
def test_cached_weights_are_the_bits_of_the_merge_path(family, name):
    model, uncached = served(family, merged_cache_bytes=10**9), served(family, merged_cache_bytes=0)
    for m in (model, uncached):
        set_active_delta(m, name)
    assert torch.equal(logits(model), logits(uncached))  # a batch merges in both
    assert len(cache(model)) == len(edited_linears(model, name)) and len(cache(uncached)) == 0
    for module in edited_linears(model, name):
        factor = module.factors[name]
        assert torch.equal(cache(model).merged(module, factor), factor.merged(module.weight))
    # A decoding step runs on the cached weights: the materialised fine-tune's logits, bit for bit.
    materialised = fresh_memory(DeltaModel.from_pretrained(family / name))
    assert torch.equal(logits(model, FEW), logits(materialised, FEW))
    # Without the cache a step multiplies the delta apart (sparse merges): close, not always equal.
    want = logits(materialised, FEW)
    assert float((logits(uncached, FEW) - want).abs().max()) <= RELATIVE_BOUND * float(want.abs().max())


def test_lowrank_and_the_base_are_not_cached(family):
    model = served(family, merged_cache_bytes=10**9)
    logits(model, FEW)
    assert len(cache(model)) == 0  # no adapter active
    set_active_delta(model, "lowrank")
    logits(model, FEW)
    assert len(cache(model)) == 0 and model.on_the_fly_deltas.nbytes == sum(
        a.nbytes for a in model.on_the_fly_deltas.adapters.values()
    )


def test_switching_adapters_empties_the_cache(family):
    model = served(family, merged_cache_bytes=10**9)
    fresh = {}
    for name in CACHED:
        single = served(family, [name], merged_cache_bytes=0)
        set_active_delta(single, name)
        fresh[name] = logits(single)
    for name in ["sign", "dare", "sign", None, "dense", "dense"]:
        set_active_delta(model, name)
        if name is not None:
            logits(model, FEW)  # fills the cache
            assert len(cache(model)) == len(edited_linears(model, name))
            assert torch.equal(logits(model), fresh[name])
    set_active_delta(model, "dare")
    assert len(cache(model)) == 0 and cache(model).nbytes == 0


def test_attaching_or_detaching_empties_the_cache(family):
    model = served(family, ["sign", "dare"], merged_cache_bytes=10**9)
    set_active_delta(model, "sign")
    logits(model, FEW)
    assert len(cache(model)) > 0
    attach_deltas(model, {"dense": family / "dense"})
    assert len(cache(model)) == 0 and model.on_the_fly_deltas.active == "sign"
    logits(model, FEW)
    assert len(cache(model)) > 0
    detach_deltas(model, ["dare"])  # not the active one
    assert len(cache(model)) == 0 and model.on_the_fly_deltas.active == "sign"


def test_a_reattached_adapter_with_another_alpha_is_not_served_stale(family):
    model = served(family, ["sign", "dare"], merged_cache_bytes=10**9)
    set_active_delta(model, "sign")
    logits(model, FEW)
    detach_deltas(model, ["sign"])
    attach_deltas(model, {"sign": family / "sign"}, alpha=0.5)
    set_active_delta(model, "sign")
    half = served(family, ["sign"], alpha=0.5, merged_cache_bytes=0)
    set_active_delta(half, "sign")
    assert torch.equal(logits(model), logits(half))


def test_a_weight_changed_in_place_is_merged_again(family):
    model, uncached = served(family, merged_cache_bytes=10**9), served(family, merged_cache_bytes=0)
    for m in (model, uncached):
        set_active_delta(m, "sign")
    logits(model, FEW)
    with torch.no_grad():
        for m in (model, uncached):
            m.model.layers[0].mlp.up_proj.weight.mul_(0.5)  # an optimizer step would do the same
    assert torch.equal(logits(model), logits(uncached))


def test_the_budget_is_honoured(family):
    model = base_model(family)
    sizes = sorted(weight_bytes(m) for m in edited_linears(served(family, ["sign"]), "sign"))
    budget = sum(sizes[:3]) + sizes[0] // 2  # room for the three smallest, not four
    attach_deltas(model, {"sign": family / "sign"}, merged_cache_bytes=budget)
    set_active_delta(model, "sign")
    for ids in (FEW, BATCH, FEW):
        logits(model, ids)
        assert 0 < cache(model).nbytes <= budget
        assert cache(model).nbytes == sum(
            weight_bytes(m) for m in edited_linears(model, "sign") if cache(model)._entries.get(id(m))
        )
    assert model.on_the_fly_deltas.nbytes == model.on_the_fly_deltas.adapters["sign"].nbytes + cache(model).nbytes
    off = served(family, ["sign"], merged_cache_bytes=0)
    set_active_delta(off, "sign")
    assert torch.equal(logits(model), logits(off))  # a partly cached model gives the same batch logits
    logits(off, FEW)
    assert len(cache(off)) == 0 and cache(off).nbytes == 0


def test_the_default_budget_is_a_quarter_of_the_parameters(family):
    model = served(family, ["sign"])
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert cache(model).budget == params // 4
    attach_deltas(model, {"dare": family / "dare"}, merged_cache_bytes=123)  # a later attach may resize it
    assert cache(model).budget == 123
    attach_deltas(model, {"dense": family / "dense"})
    assert cache(model).budget == 123
    assert cache(load_on_the_fly({"sign": family / "sign"}, merged_cache_bytes=0)).budget == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "1GB", True])
def test_a_bad_budget_is_refused_before_the_model_changes(family, bad):
    model = base_model(family)
    with pytest.raises(DeltaFormatError, match="merged_cache_bytes"):
        attach_deltas(model, {"sign": family / "sign"}, merged_cache_bytes=bad)
    assert not hasattr(model, "on_the_fly_deltas")


def test_training_bypasses_the_cache(family):
    model = served(family, ["sign"], merged_cache_bytes=10**9)
    set_active_delta(model, "sign")
    model.train()
    model(input_ids=FEW, labels=FEW).loss.backward()
    assert len(cache(model)) == 0 and model.model.layers[0].mlp.up_proj.weight.grad is not None


def test_a_weight_given_new_storage_is_not_cached_again(family):
    model, uncached = served(family, merged_cache_bytes=10**9), served(family, merged_cache_bytes=0)
    for m in (model, uncached):
        set_active_delta(m, "dare")
    logits(model, FEW)
    for m in (model, uncached):
        weight = m.model.layers[0].mlp.up_proj.weight
        weight.data = weight.data * 2  # as accelerate's offloading places a weight for each call
    assert torch.equal(logits(model), logits(uncached))
    assert id(model.model.layers[0].mlp.up_proj) not in cache(model)._entries
    assert len(cache(model)) == len(edited_linears(model, "dare")) - 1
