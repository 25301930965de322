"""DAREx-L2: keep the delta small *while fine-tuning*, so DARE can drop more of it afterwards.

DARE fails when the delta's entries are large or spread out (the variance it adds grows with
``Σ δ²``); DAREx-L2 (the AdamR-L2 of arXiv 2410.09344) penalises ``λ ||θ - θ_base||²`` during
fine-tuning, nothing new on disk. Two forms:

* **decoupled** (default, AdamR): after each optimizer step, ``θ ← θ - lr · λ · (θ - θ_base)``,
  like AdamW's weight decay but towards the base instead of towards zero, so the pull does not
  pass through Adam's per-coordinate normalisation;
* **coupled**: the gradient of ``λ ||θ - θ_base||²``, ``2λ (θ - θ_base)``, is added to the
  gradients before the step (what adding the penalty to the loss does).

`DeltaL2Regularizer` works with any training loop; `DeltaL2Callback` plugs it into a
transformers ``Trainer``. Both keep a float32 copy of the base parameters (the model's values when
they are created, or a given state dict): memory for one more model.

Example:
    >>> reg = DeltaL2Regularizer(model, strength=0.1)                          # doctest: +SKIP
    >>> for batch in data:                                                     # doctest: +SKIP
    ...     model(**batch).loss.backward(); optimizer.step(); reg.step(lr); optimizer.zero_grad()
    >>> trainer = Trainer(model, args, callbacks=[DeltaL2Callback(model, 0.1)])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .errors import InvalidArgumentError

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object


class DeltaL2Regularizer:
    """λ ||θ - θ_base||² on the trainable parameters of ``model``.

    Args:
        model: the model being fine-tuned.
        strength: λ (``0`` disables it).
        base: the base parameters by name (default: the model's current values, i.e. create the
            regularizer before training).
        decoupled: AdamR-style decoupled pull (`step`) rather than gradient (`add_gradients`).
    """

    def __init__(
        self,
        model: nn.Module,
        strength: float,
        *,
        base: Mapping[str, torch.Tensor] | None = None,
        decoupled: bool = True,
    ):
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not strength >= 0:
            raise InvalidArgumentError(
                "DAREx-L2 strength must be a number >= 0", expected="e.g. 0.1", found=repr(strength)
            )
        self.strength = float(strength)
        self.decoupled = decoupled
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        source = base if base is not None else {name: p.detach() for name, p in self.params.items()}
        missing = [name for name in self.params if name not in source]
        if missing:
            raise InvalidArgumentError(
                "the base lacks trainable parameters of the model", expected="every trainable name", found=missing[:5]
            )
        self.base = {
            name: source[name].detach().to(p.device, torch.float32, copy=True) for name, p in self.params.items()
        }

    def penalty(self) -> torch.Tensor:
        """``λ Σ ||θ - θ_base||²`` (differentiable): add it to the loss for the coupled form."""
        total = sum(((p.float() - self.base[n]) ** 2).sum() for n, p in self.params.items())
        return self.strength * total

    @torch.no_grad()
    def add_gradients(self) -> None:
        """Coupled form: ``grad += 2λ (θ - θ_base)``; call after ``backward``, before the step."""
        for name, p in self.params.items():
            if p.grad is not None:
                p.grad.add_((2 * self.strength) * (p.float() - self.base[name]).to(p.grad.dtype))

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """Decoupled form: ``θ ← θ - lr λ (θ - θ_base)``; call right after ``optimizer.step()``."""
        factor = lr * self.strength
        if factor == 0:
            return
        for name, p in self.params.items():
            p.copy_((p.float() - factor * (p.float() - self.base[name])).to(p.dtype))

    @torch.no_grad()
    def delta_norm(self) -> float:
        """``||θ - θ_base||`` over the regularised parameters."""
        return float(sum(((p.float() - self.base[n]) ** 2).sum() for n, p in self.params.items()) ** 0.5)


class DeltaL2Callback(TrainerCallback):
    """A transformers ``TrainerCallback`` applying DAREx-L2 at every optimizer step.

    The decoupled form reads the learning rate of the step from the trainer's scheduler (the
    optimizer's first param group), so warm-up and decay apply to the pull as to the update.
    """

    def __init__(
        self,
        model: nn.Module,
        strength: float,
        *,
        base: Mapping[str, torch.Tensor] | None = None,
        decoupled: bool = True,
    ):
        self.regularizer = DeltaL2Regularizer(model, strength, base=base, decoupled=decoupled)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.regularizer.decoupled:
            self.regularizer.add_gradients()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.regularizer.decoupled:
            lr = optimizer.param_groups[0]["lr"] if optimizer is not None else args.learning_rate
            self.regularizer.step(lr)


__all__ = ["DeltaL2Regularizer", "DeltaL2Callback"]
