"""Every architecture family a published fine-tune is likely to be: a lossless delta loads as
transformers loads the fine-tune, bit for bit, and a lossy one as transformers loads the fine-tune
that ``apply`` writes (same bits: one arithmetic, SPEC §9). Tiny random models, perturbed."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import delta_format
from delta_format import DeltaModel
from delta_format.loaders.apply import apply_delta
from tests.models import clone, structured_perturbation

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
ARCHITECTURES = {
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **SMALL)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, **SMALL)),
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(num_key_value_heads=2, head_dim=16, **SMALL)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(num_key_value_heads=2, pad_token_id=0, **SMALL)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**SMALL)),  # checkpoint keys renamed on loading
    "opt": lambda: T.OPTForCausalLM(
        T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
    ),
    "roberta": lambda: T.RobertaModel(T.RobertaConfig(max_position_embeddings=64, **SMALL)),
    "t5": lambda: T.T5ForConditionalGeneration(
        T.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=300, decoder_start_token_id=0)
    ),
    "mixtral": lambda: T.MixtralForCausalLM(  # experts merged on loading
        T.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **SMALL)
    ),
    "vit": lambda: T.ViTModel(  # checkpoint keys renamed on loading
        T.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32)
    ),
}


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_deltas_of_every_family_load_as_transformers_loads_the_fine_tune(tmp_path, name):
    torch.manual_seed(0)
    base = ARCHITECTURES[name]().eval()
    base.save_pretrained(tmp_path / "base")
    structured_perturbation(clone(base), rel=2e-2, seed=3).save_pretrained(tmp_path / "ft")
    cls = type(base)
    delta_format.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "dense", method="dense", progress=False)
    assert same_weights(DeltaModel.from_pretrained(tmp_path / "dense"), cls.from_pretrained(tmp_path / "ft"))
    delta_format.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "dare", method="dare", p=0.9, progress=False)
    apply_delta(tmp_path / "dare", tmp_path / "applied", progress=False)
    assert same_weights(DeltaModel.from_pretrained(tmp_path / "dare"), cls.from_pretrained(tmp_path / "applied"))
