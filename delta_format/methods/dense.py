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

from ..core.dtypes import compute_dtype
from ..core.encodings import DenseEncoding, ReplaceEncoding
from ..errors import InvalidArgumentError
from .base import Edit, EditMethod, TensorContext

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_FIRST_BLOCK, _LAST_BLOCK = 1 << 14, 1 << 22
"""Entries per block of the losslessness check: from a few thousand up to a few megabytes."""


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


def reconstructs(
    base: torch.Tensor, stored_delta: torch.Tensor, finetune: torch.Tensor, stored_dtype: torch.dtype | None = None
) -> bool:
    """Whether SPEC §9 reconstruction (``cast(base + delta)`` in the arithmetic dtype, alpha 1)
    of ``stored_delta`` (cast to ``stored_dtype`` first, if given, as storing it would) gives
    exactly ``finetune``.

    Checked a block at a time, the blocks growing: a candidate that misses usually does within
    its first few thousand entries, and then costs that much, not a pass over the tensor."""
    arithmetic = compute_dtype(finetune.dtype)
    base, stored_delta, finetune = base.reshape(-1), stored_delta.reshape(-1), finetune.reshape(-1)
    start, block = 0, _FIRST_BLOCK
    while start < finetune.numel():
        end = start + block
        part = stored_delta[start:end]
        if stored_dtype is not None:
            part = part.to(stored_dtype)
        rebuilt = base[start:end].to(arithmetic, copy=True).add_(part.to(arithmetic)).to(finetune.dtype)
        if not same_bits(rebuilt, finetune[start:end]):
            return False
        start, block = end, min(2 * block, _LAST_BLOCK)
    return True


@dataclass
class DenseMethod(EditMethod, name="dense"):
    """Lossless: ``Δ`` stored as is (narrowest dtype that reproduces the fine-tune), or the
    fine-tuned tensor itself where no stored delta does.

    Example:
        >>> base, ft = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0])
        >>> edit = DenseMethod().edit("w", ft - base, TensorContext("w", base=base, finetune=ft))
        >>> edit.encoding.name, edit.stored["delta"].tolist(), edit.lossless
        ('dense', [0.5, 0.0], True)
    """

    summary: ClassVar[str] = "lossless"

    def edit(self, name: str, delta: torch.Tensor, context: TensorContext) -> Edit:
        base, ft = context.base, context.finetune
        if base is None or ft is None:
            raise InvalidArgumentError(
                "dense needs the base and fine-tuned tensors to check losslessness",
                expected="both in the context",
                found="missing",
            )
        arithmetic = compute_dtype(ft.dtype)
        candidates = [context.value_dtype] if context.value_dtype.itemsize < arithmetic.itemsize else []
        candidates.append(arithmetic)
        dense = DenseEncoding()
        for dtype in candidates:
            if reconstructs(base, delta, ft, dtype):
                return Edit(dense, dense.encode(delta, dtype=dtype), {"lossless": True}, lossless=True)
        if context.alpha != 1.0:
            return Edit(dense, dense.encode(delta, dtype=arithmetic), {"exact_at_alpha_1": False})
        misses = differing_bits(base.to(arithmetic, copy=True).add_(delta.to(arithmetic)).to(ft.dtype), ft)
        replace = ReplaceEncoding()
        return Edit(
            replace,
            replace.encode(ft),
            {
                "lossless": True,
                "fallback": "replace",
                "reason": f"base + delta does not round back to the fine-tune at {misses} of {ft.numel()} entries",
            },
            lossless=True,
        )
