"""The fine-tuning loop of the real fidelity pairs: AdamW, 10 % linear warm-up then linear decay,
gradient clipping at 1 (how published fine-tunes are commonly trained)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def fine_tune(model, steps: int, lr: float, weight_decay: float, loss_at: Callable[[int], torch.Tensor], name: str):
    """Train ``model`` in place for ``steps`` steps; ``loss_at(step)`` computes that step's loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm)))
    )
    model.train()
    started = time.time()
    for step in range(steps):
        loss = loss_at(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 25 == 0:
            print(f"  {name} fine-tune step {step} loss {loss.item():.3f} {time.time() - started:.0f}s", flush=True)
    model.eval()
