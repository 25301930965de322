"""``dense``: the delta stored as is, checked to reconstruct the fine-tune bit for bit.

``Δ = ft - base`` in the arithmetic dtype of SPEC §9 (float32; float64 for float64 parameters)
is exact for most entries, but not for all: the difference of two float32 numbers can round, and
then ``base + Δ`` misses the fine-tune by an ulp. So the method *checks* the reconstruction the
loader will compute, ``cast(base + Δ̂)``, against the fine-tune's bits. It first tries storing Δ̂
in the fine-tune's own dtype (half the bytes for a bf16 model, and exact whenever the two weights
are close, which fine-tuning makes them), then in the arithmetic dtype, and where neither
reproduces the fine-tune it stores the fine-tuned tensor itself (``replace``), saying why in the
entry's stats. Either way the result is lossless.

With a coefficient α ≠ 1 the reconstruction is not meant to be the fine-tune, and a ``replace``
would silently ignore α, so the delta is stored in the arithmetic dtype without the fallback
(``exact_at_alpha_1`` in the stats says whether α = 1 would have been bit-exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..encodings import DenseEncoding, ReplaceEncoding, compute_dtype
from ..errors import InvalidArgumentError
from .base import Edit, EditMethod, TensorContext

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (``-0.0`` differs from ``0.0``; a NaN equals the same NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = _SAME_SIZE_INT[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def differing_bits(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many entries of two same-shape, same-dtype tensors differ bitwise."""
    as_int = _SAME_SIZE_INT[a.element_size()]
    return int((a.contiguous().view(as_int) != b.contiguous().view(as_int)).sum())


def reconstructs(base: torch.Tensor, stored_delta: torch.Tensor, finetune: torch.Tensor) -> bool:
    """Whether SPEC §9 reconstruction (``cast(base + delta)`` in the arithmetic dtype, alpha 1)
    of ``stored_delta`` gives exactly ``finetune``."""
    arithmetic = compute_dtype(finetune.dtype)
    rebuilt = base.to(arithmetic, copy=True).add_(stored_delta.to(arithmetic)).to(finetune.dtype)
    return same_bits(rebuilt, finetune)


@dataclass
class DenseMethod(EditMethod):
    """Lossless: ``Δ`` stored as is (narrowest dtype that reproduces the fine-tune), or the
    fine-tuned tensor itself where no stored delta does.

    Example:
        >>> base, ft = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0])
        >>> edit = DenseMethod().edit("w", ft - base, TensorContext("w", base=base, finetune=ft))
        >>> edit.encoding.name, edit.stored["delta"].tolist(), edit.lossless
        ('dense', [0.5, 0.0], True)
    """

    name: ClassVar[str] = "dense"

    def edit(self, name: str, delta: torch.Tensor, context: TensorContext) -> Edit:
        base, ft = context.base, context.finetune
        if base is None or ft is None:
            raise InvalidArgumentError("dense needs the base and fine-tuned tensors to check losslessness",
                                       expected="both in the context", found="missing")
        arithmetic = compute_dtype(ft.dtype)
        candidates = [context.value_dtype] if context.value_dtype.itemsize < arithmetic.itemsize else []
        candidates.append(arithmetic)
        for dtype in candidates:
            stored = delta.to(dtype)
            if reconstructs(base, stored, ft):
                return Edit(DenseEncoding(), {"delta": stored.contiguous()}, {"lossless": True}, lossless=True)
        if context.alpha != 1.0:
            return Edit(DenseEncoding(), {"delta": delta.to(arithmetic).contiguous()}, {"exact_at_alpha_1": False})
        misses = differing_bits(base.to(arithmetic, copy=True).add_(delta.to(arithmetic)).to(ft.dtype), ft)
        return Edit(
            ReplaceEncoding(), {"value": ft.contiguous()},
            {"lossless": True, "fallback": "replace",
             "reason": f"base + delta does not round back to the fine-tune at {misses} of {ft.numel()} entries"},
            lossless=True,
        )
