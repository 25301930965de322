"""Low-rank factors refined on the model's outputs: quantisation-aware distillation of the
budget's ``lowrank-q`` entries on the calibration texts.

The budget fits each matrix's factors to its own delta (the truncated SVD, rounded to codes).
At a small budget much of each delta is left out, and where that error lands decides what it
costs: an error the rest of the network amplifies against one it washes out. Refining the kept
factors so that the whole edited model's outputs match the fine-tune's on the calibration texts
moves the error to directions the outputs do not see, and lets a matrix's factors make up for
what other tensors lost (the dropped embeddings, the untouched biases). Every other tensor is
already in the model as it will be stored, and the factors go through their codes in every
forward pass (a straight-through estimator: the forward sees the rounded factors, the gradient
reaches the factors it rounds), so the refined factors are what is stored.

Measured on MiniLM (all-MiniLM-L6-v2 and a contrastive fine-tune, 0.2 bit per weight, held-out
texts; benchmarks/RESULTS.md, "Refined factors"): the embedding cosine to the fine-tune rises from
0.981 to 0.990 with 64 calibration texts. Each step is one forward and backward pass on about
`TOKENS_PER_STEP` tokens of the calibration texts; the refined factors are kept only where the
model's output error on all the calibration texts is lower than the plan's. An encoder's session
adds its inner layers' hidden-state errors to the steps' loss (`output_divergence` with
``grad=True``), the held-out judgement stays on its output.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.encodings import QuantizedLowRankEncoding
from ..core.quant import dequantize, quantize

if TYPE_CHECKING:
    from .activations import CalibrationSession

REFINE_STEPS = 200
"""Steps of a refinement unless asked otherwise."""
REFINE_LR = 0.01
"""Adam's step relative to the root-mean-square of each factor matrix."""
TOKENS_PER_STEP = 1024
"""Calibration tokens a step runs (whole texts, at least one)."""
REFINE_MAX_BITS = 0.5
"""``refine_steps="auto"`` refines at budgets up to this many bits per weight, where the plan's
error is large enough for the outputs to pay back what fitting them to a few texts costs
elsewhere: on the trained tiny Llama (held-out perplexity gain kept) 0.1 / 0.2 / 0.5 / 1 bit went
15.6 → 26.0 / 38.4 → 54.3 / 87.7 → 88.1 / 97.9 → 96.0 %; on MiniLM 0.2 / 0.1 bit 0.984 → 0.988 /
0.965 → 0.974 and 1 bit 0.9988 → 0.9990 (16 calibration texts; benchmarks/RESULTS.md)."""
HELD_OUT_EVERY = 4
"""One calibration text in this many is held out to judge the refinement (not stepped on)."""
CHECKS = 8
"""Times a refinement measures its held-out error (and keeps the best factors so far)."""
REFINE_COMPUTE = 2.5e12
"""Parameter-tokens ``"auto"`` spends: `REFINE_STEPS` on MiniLM (11 M parameters outside its
embeddings, ~1 minute on 2 CPU cores), 22 steps on SmolLM2-135M (107 M, ~3 minutes), none past
~2.4 B parameters."""


REFINE_MIN_SHARE = 0.05
"""``"auto"`` refines only factors that hold at least this share of the parameters outside the
lookup tables: each step runs the whole model, and a few small matrices cannot move its outputs
enough to repay that (SmolLM2-135M at 0.2 bit on the built-in text: one matrix, 0.2 % of the
parameters, 22 steps in 182 s, held-out error 0.0044807 → 0.0044807). The plans refined on MiniLM
and the tiny Llama hold 89-100 %."""


def auto_steps(numel: int, refinable: int | None = None) -> int:
    """Steps of ``refine_steps="auto"`` for a model of ``numel`` parameters outside its lookup
    tables, ``refinable`` of them in the factors to refine: `REFINE_STEPS`, or fewer where that
    would cost more than `REFINE_COMPUTE`; none below `REFINE_MIN_SHARE`."""
    if refinable is not None and refinable < REFINE_MIN_SHARE * numel:
        return 0
    return min(REFINE_STEPS, int(REFINE_COMPUTE // max(numel * TOKENS_PER_STEP, 1)))


@dataclass
class Factors:
    """One matrix's factors ``a @ b`` (``[rows, r]``, ``[r, cols]``, ``σ`` split evenly between
    them) as ``encoding`` stores them, and the delta they stand for (in the parameter's shape)."""

    encoding: QuantizedLowRankEncoding
    a: torch.Tensor
    b: torch.Tensor
    delta: torch.Tensor
    alpha: float = 1.0

    @classmethod
    def from_svd(cls, encoding, u, s, vh, delta, alpha=1.0) -> Factors:
        root = s.float().sqrt()
        return cls(encoding, (u * root).float(), (vh * root[:, None]).float(), delta.float(), alpha)

    def rounded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors through their codes, band by band as `QuantizedLowRankEncoding.encode`
        quantises them; differentiable as if the rounding were not there."""
        us, vs, start = [], [], 0
        for count, bits in self.encoding.bands:
            us.append(straight_through(self.a[:, start : start + count].T, bits, self.encoding.group))
            vs.append(straight_through(self.b[start : start + count], bits, self.encoding.group))
            start += count
        return torch.cat(us).T, torch.cat(vs)

    def deviation(self) -> torch.Tensor:
        """What the stored factors change in the parameter, less what the fine-tune changed."""
        a, b = self.rounded()
        return (self.alpha * (a @ b)).view(self.delta.shape) - self.delta


def straight_through(rows: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """``rows`` rounded to their ``bits``-bit codes (groups of ``group``), the gradient passed through."""
    codes, scales = quantize(rows.detach(), bits, group, None, torch.float32)
    return rows + (dequantize(codes, scales, bits, group) - rows).detach()


def step_texts(lengths: list[int], generator: torch.Generator, order: list[int]) -> list[int]:
    """The next texts of a seeded pass over the calibration texts, about `TOKENS_PER_STEP` tokens
    (refilling ``order`` with a fresh permutation when it runs out)."""
    chosen, tokens = [], 0
    while not chosen or tokens < TOKENS_PER_STEP:
        if not order:
            order.extend(torch.randperm(len(lengths), generator=generator).tolist())
        if order[0] in chosen:
            break
        chosen.append(order.pop(0))
        tokens += lengths[chosen[-1]]
    return chosen


def split_texts(count: int) -> tuple[list[int], list[int]]:
    """Calibration texts to step on and texts held out to judge the steps by: every
    `HELD_OUT_EVERY`-th text is held out when there are at least that many, else none (all judge)."""
    if count < HELD_OUT_EVERY:
        everything = list(range(count))
        return everything, everything
    held = [i for i in range(count) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return [i for i in range(count) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1], held


def refine_factors(
    calibration: CalibrationSession, factors: dict[str, Factors], steps: int, lr: float, seed: int = 0
) -> dict[str, Any]:
    """Refine ``factors`` in place for up to ``steps`` Adam steps (cosine-decayed ``lr`` relative to
    each factor's size) on the calibration model's output error, keeping the factors of the step
    whose error on the held-out calibration texts (`split_texts`) was lowest, checked every
    ``steps / CHECKS`` steps: the initial factors when no step lowered it. Returns what happened."""
    started = time.perf_counter()
    latents = [t for f in factors.values() for t in (f.a, f.b)]
    best = [t.clone() for t in latents]
    groups = [{"params": [t], "lr": lr * float(t.square().mean().sqrt())} for t in latents]
    groups = [g for g in groups if g["lr"] > 0]
    all_lengths = calibration.text_lengths()
    train, held = split_texts(len(all_lengths))

    def deviation() -> dict[str, torch.Tensor]:
        return {name: f.deviation() for name, f in factors.items()}

    def judged() -> float:
        with torch.no_grad():
            return calibration.output_divergence(deviation(), texts=held)

    initial = judged()
    history = [(0, initial)]
    if groups and steps and train:
        for t in latents:
            t.requires_grad_(True)
        optimizer = torch.optim.Adam(groups)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
        generator, order = torch.Generator().manual_seed(seed), []
        lengths = [all_lengths[i] for i in train]
        every = max(1, math.ceil(steps / CHECKS))
        try:
            for step in calibration.progress_steps(steps, "refining factors"):
                chosen = [train[i] for i in step_texts(lengths, generator, order)]
                loss = calibration.output_divergence(deviation(), grad=True, texts=chosen)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                if (step + 1) % every == 0 or step + 1 == steps:
                    history.append((step + 1, judged()))
                    if history[-1][1] < min(e for _, e in history[:-1]):
                        best = [t.detach().clone() for t in latents]
        finally:
            for t in latents:
                t.requires_grad_(False)
                t.grad = None
    with torch.no_grad():
        for t, value in zip(latents, best):
            t.copy_(value)
    chosen_step, error = min(history, key=lambda h: (h[1], h[0]))
    return {
        "steps": steps,
        "kept": chosen_step > 0,
        "kept_step": chosen_step,
        "lr": lr,
        "tokens_per_step": TOKENS_PER_STEP,
        "held_out_texts": len(held) if held is not train else 0,
        "output_error_initial": initial,
        "output_error_refined": error,
        "tensors": len(factors),
        "seconds": round(time.perf_counter() - started, 1),
    }
