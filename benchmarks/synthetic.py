"""Synthetic base/fine-tune pairs large enough that load times are not noise.

The base has random weights from a transformers config; the fine-tune adds a delta of realistic
relative magnitude (default 1e-3 of each tensor's mean |w|), written tensor by tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def llama_config(scale: str = "0.5B"):
    from transformers import LlamaConfig

    sizes = {
        "tiny": dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=8000,
        ),
        "160M": dict(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=8,
            vocab_size=32000,
        ),
        "220M": dict(  # a 32k vocabulary and an untied head: embedding and head are 30 % of the model
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=13,
            num_attention_heads=16,
            num_key_value_heads=8,
            vocab_size=32000,
        ),
        "0.5B": dict(
            hidden_size=1536,
            intermediate_size=4096,
            num_hidden_layers=16,
            num_attention_heads=12,
            num_key_value_heads=4,
            vocab_size=32000,
        ),
    }
    return LlamaConfig(**sizes[scale], max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16")


def build_pair(root: Path, scale: str = "0.5B", rel: float = 1e-3, seed: int = 0) -> tuple[Path, Path]:
    """``root/base`` and ``root/finetune`` (bf16 safetensors), built once and reused."""
    from transformers import LlamaForCausalLM

    base_dir, ft_dir = root / "base", root / "finetune"
    marker = root / "pair.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"scale": scale, "rel": rel, "seed": seed}:
        return base_dir, ft_dir
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(scale)).to(torch.bfloat16)
    model.save_pretrained(base_dir, max_shard_size="2GB")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_((p.float() + noise * rel * p.float().abs().mean()).to(p.dtype))
    model.save_pretrained(ft_dir, max_shard_size="2GB")
    marker.write_text(json.dumps({"scale": scale, "rel": rel, "seed": seed}))
    return base_dir, ft_dir


def cached_delta(base: Path, ft: Path, out: Path, method: str, **params) -> Path:
    """``compress(base, ft, out, method, **params)``, reusing ``out`` only if this version of
    delta-format wrote it: a delta from an older spec (no stochastic rounding before 1.3, say)
    would measure another load than today's."""
    import delta_format
    from delta_format.core.manifest import spec_version_string

    manifest = out / "delta_config.json"
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        if found.get("spec_version") == spec_version_string() and found.get("created_by") == (
            f"delta-format {delta_format.__version__}"
        ):
            return out
    delta_format.compress(base, ft, out, method=method, progress=False, overwrite=True, **params)
    return out


def machine() -> str:
    import os
    import platform

    mem = ""
    try:
        kb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores{mem}, Python {platform.python_version()}, torch {torch.__version__}"
