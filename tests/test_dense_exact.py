"""A dense delta is lossless: on a small Llama, Δ = float32(ft) − float32(base) written with
`DeltaWriter` and rebuilt with `DeltaReader` + `reconstruct` (SPEC §5.1, §9) gives back every
fine-tuned parameter bit for bit, in float32 and in bfloat16 models."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from delta_format.core.encodings import DenseEncoding
from delta_format.core.manifest import BaseReference, TensorEntry
from delta_format.core.reconstruct import reconstruct
from delta_format.io.reader import DeltaReader
from delta_format.io.writer import DeltaWriter

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def base_and_finetune(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    torch.manual_seed(0)
    base = {k: v.detach().to(dtype) for k, v in LlamaForCausalLM(config).state_dict().items()}
    # A structured update of every parameter: about 1e-3, the size of a fine-tuning step's sum,
    # against weights of about 0.02 (and norms of 1).
    finetune = {}
    for i, (name, b) in enumerate(base.items()):
        index = torch.arange(b.numel(), dtype=torch.float32).view(b.shape)
        finetune[name] = (b.float() + 1e-3 * torch.sin(0.37 * index + i)).to(dtype)
    return base, finetune


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_dense_delta_rebuilds_every_llama_parameter_bit_for_bit(tmp_path, dtype):
    base, finetune = base_and_finetune(dtype)
    enc = DenseEncoding()
    with DeltaWriter(tmp_path / "delta", base=BaseReference(local_path="base"), method="dense") as writer:
        for name, b in base.items():
            delta = finetune[name].float() - b.float()
            writer.add(
                name, TensorEntry(enc, tuple(b.shape), DTYPE_NAMES[dtype]), enc.encode(delta, dtype=torch.float32)
            )
    changed = 0
    with DeltaReader(tmp_path / "delta") as reader:
        assert set(reader) == set(base)
        for name in reader:
            out = reconstruct(name, reader.entry(name), reader.decode(name), base[name])
            want = finetune[name]
            assert out.dtype == dtype
            mismatched = int((out.view(INT_VIEW[dtype]) != want.view(INT_VIEW[dtype])).sum())
            assert mismatched == 0, f"{name}: {mismatched} of {want.numel()} elements differ"
            changed += int((want != base[name]).sum())
    assert changed > 0.9 * sum(b.numel() for b in base.values())  # the fine-tune really differs
