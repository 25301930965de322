"""Hot-swapping deltas on a loaded model: exact, in place, refusing foreign deltas."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from delta_format import BaseMismatchError, DeltaModel
from tests.test_loader import LLAMA, dare, dense, perturbed, sign_or_dense, write_delta


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_equal_state(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A bf16 base and three deltas of different encodings touching different tensors."""
    root = tmp_path_factory.mktemp("family")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA)).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    for i, encode in enumerate([sign_or_dense, dare, dense]):
        perturbed(base, 0.05, seed=10 + i).save_pretrained(root / f"ft{i}")
        write_delta(root / f"d{i}", root / "base", root / f"ft{i}", encode)
    return root


def test_swaps_give_weights_bit_identical_to_fresh_loads(family):
    fresh = {i: weights(DeltaModel.from_pretrained(family / f"d{i}")) for i in range(3)}
    model = DeltaModel.from_pretrained(family / "d0")
    for i in [1, 0, 2, 1, 1, 0]:
        model.swap_delta(family / f"d{i}")
        assert_equal_state(weights(model), fresh[i])


def test_remove_delta_restores_the_base_exactly(family):
    model = DeltaModel.from_pretrained(family / "d1")
    model.swap_delta(family / "d0")
    model.remove_delta()
    assert_equal_state(
        weights(model), weights(AutoModelForCausalLM.from_pretrained(family / "base", dtype=torch.bfloat16))
    )


def test_swap_writes_in_place_without_new_parameters(family):
    model = DeltaModel.from_pretrained(family / "d0")
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    model.swap_delta(family / "d1")
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers


def test_swap_with_alpha_matches_a_fresh_load_with_alpha(family):
    model = DeltaModel.from_pretrained(family / "d0")
    model.swap_delta(family / "d2", alpha=1.5)
    assert_equal_state(weights(model), weights(DeltaModel.from_pretrained(family / "d2", alpha=1.5)))


def test_a_delta_of_another_base_is_refused_and_the_model_is_untouched(family, tmp_path):
    write_delta(tmp_path / "foreign", family / "ft1", family / "ft2", dense)
    model = DeltaModel.from_pretrained(family / "d0")
    before = weights(model)
    with pytest.raises(BaseMismatchError, match="not the one this delta was made against"):
        model.swap_delta(tmp_path / "foreign")
    assert_equal_state(weights(model), before)
    assert model.delta_swapper.active_deltas[0].directory == family / "d0"


def test_swapped_deltas_are_cached_by_source(family):
    model = DeltaModel.from_pretrained(family / "d0")
    for i in [1, 2, 1, 2]:
        model.swap_delta(family / f"d{i}")
    assert len(model.delta_swapper.cache) == 2
    assert model.delta_swapper.cache.nbytes > 0


def test_cache_evicts_least_recently_used_beyond_its_byte_budget(family):
    model = DeltaModel.from_pretrained(family / "d0")
    model.delta_swapper.cache.max_bytes = 1
    for i in [1, 2]:
        model.swap_delta(family / f"d{i}")
    assert len(model.delta_swapper.cache) == 1


def test_tied_embeddings_survive_swaps(tmp_path):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=96, n_positions=32))
    base.save_pretrained(tmp_path / "base")
    for i in range(2):
        perturbed(base, 0.05, seed=i).save_pretrained(tmp_path / f"ft{i}")
        write_delta(tmp_path / f"d{i}", tmp_path / "base", tmp_path / f"ft{i}", dense)
    model = DeltaModel.from_pretrained(tmp_path / "d0")
    model.swap_delta(tmp_path / "d1")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert_equal_state(weights(model), weights(AutoModelForCausalLM.from_pretrained(tmp_path / "ft1")))


def test_a_delta_that_resized_the_vocabulary_cannot_be_swapped_away(family, tmp_path):
    ft = AutoModelForCausalLM.from_pretrained(family / "ft0", dtype=torch.bfloat16)
    ft.resize_token_embeddings(100)
    ft.save_pretrained(tmp_path / "ft")
    write_delta(tmp_path / "resized", family / "base", tmp_path / "ft", dense)
    model = DeltaModel.from_pretrained(tmp_path / "resized")
    before = weights(model)
    with pytest.raises(BaseMismatchError, match="fresh from_pretrained"):
        model.swap_delta(family / "d1")
    assert_equal_state(weights(model), before)
