"""``dense``: lossless, and never larger than the fine-tune.

Three exact forms compete per parameter, and the smallest is stored:

* ``bitdiff`` (SPEC §5.6): the integer difference of the fine-tune's and the base's bit
  patterns, zstd-compressed by byte planes. About 0.18 of the bytes of a bf16 fine-tune, 0.46 of
  an fp32 one. Needs the optional zstandard package; without it the method warns once and uses
  the other two.
* ``dense`` (SPEC §5.1): ``Δ = ft - base`` in the arithmetic dtype of SPEC §9 (float32; float64
  for float64 parameters), or in the fine-tune's narrower dtype where that reproduces it.
  ``Δ`` is exact for most entries but not for all (a float32 difference can round, and then
  ``base + Δ`` misses by an ulp), so the method *checks* the reconstruction the loader will
  compute, ``cast(base + Δ̂)``, against the fine-tune's bits. A float32 delta of a bf16 model is
  twice the fine-tune, so it is only a candidate where it is no larger than the fine-tune.
* ``replace`` (SPEC §5.5): the fine-tuned tensor itself, exactly the fine-tune's bytes, which
  bounds the other two: the delta is never larger than the fine-tune (plus headers).

``form="delta"`` leaves ``bitdiff`` out and stores a float delta wherever one is exact, even where
it is larger than the fine-tune (a float32 delta of a bf16 model is twice its size), for a delta
that applies on the fly, scales with a load-time alpha and adds up with other deltas.

With a coefficient α ≠ 1 the reconstruction is not meant to be the fine-tune, and a value would
ignore α, so the delta is stored in the arithmetic dtype without the fallback
(``exact_at_alpha_1`` in the stats says whether α = 1 would have been bit-exact).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.dtypes import compute_dtype
from ..core.encodings import BitdiffEncoding, DenseEncoding, ReplaceEncoding
from ..core.encodings.bitdiff import INSTALL_FIX, zstd_available
from ..errors import InvalidArgumentError
from .base import Edit, EditMethod, TensorContext, param

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


FORMS = ("smallest", "delta")
_warned_without_zstd = False


def _bitdiff(name: str, base: torch.Tensor, ft: torch.Tensor) -> Edit | str:
    """``bitdiff`` where it is smaller than the fine-tune (and decodes back to it bit for bit),
    else why not: it is not smaller, cannot apply (a NaN in a base of another dtype, SPEC §5.6)
    or zstandard is missing."""
    global _warned_without_zstd
    if not zstd_available():
        if not _warned_without_zstd:
            _warned_without_zstd = True
            warnings.warn(
                "zstandard is not installed: lossless deltas fall back to float deltas or whole values, "
                f"up to 5x larger than with the bitdiff encoding; {INSTALL_FIX}",
                UserWarning,
                stacklevel=4,
            )
        return "zstandard is not installed"
    if base.dtype != ft.dtype and bool(torch.isnan(base).any()):
        return "bitdiff cannot use a base of another dtype holding NaN"
    encoding = BitdiffEncoding()
    stored = encoding.encode(ft, name=name, base=base)
    size = sum(t.numel() * t.element_size() for t in stored.values())
    if size >= ft.numel() * ft.element_size():
        return "bitdiff is not smaller"
    rebuilt = encoding.decode(stored, tuple(ft.shape), name, ft.dtype, base=base.to(ft.dtype))
    if not same_bits(rebuilt, ft):  # zstd is trusted to round-trip, but a lossless claim is checked
        return "bitdiff does not decode back to the fine-tune"
    return Edit(encoding, stored, {"lossless": True}, lossless=True, decoder=lambda dtype: ft.reshape(-1).to(dtype))


@dataclass
class DenseMethod(EditMethod, name="dense"):
    """Lossless, never larger than the fine-tune: the smallest of ``bitdiff``, a float ``Δ`` that
    reproduces the fine-tune, and the fine-tuned tensor itself (see the module docstring).

    Example:
        >>> base, ft = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0])
        >>> edit = DenseMethod(form="delta").edit("w", ft - base, TensorContext("w", base=base, finetune=ft))
        >>> edit.encoding.name, edit.stored["delta"].tolist(), edit.lossless
        ('dense', [0.5, 0.0], True)
    """

    summary: ClassVar[str] = "lossless"
    form: str = param(
        "smallest",
        help="smallest: the smallest exact form, never larger than the fine-tune (bitdiff where zstandard is "
        "installed); delta: a float delta where one is exact, even if larger (applies on the fly, scales with "
        "alpha), else the value",
        choices=FORMS,
    )

    def __post_init__(self):
        if self.form not in FORMS:
            raise InvalidArgumentError("dense: unknown form", expected=FORMS, found=repr(self.form))

    def edit(self, name: str, delta: torch.Tensor, context: TensorContext) -> Edit:
        base, ft = context.base, context.finetune
        if base is None or ft is None:
            raise InvalidArgumentError(
                "dense needs the base and fine-tuned tensors to check losslessness",
                expected="both in the context",
                found="missing",
            )
        arithmetic = compute_dtype(ft.dtype)
        budget = ft.numel() * ft.element_size()  # what replace costs: the bound of every other form
        smallest, why = None, []
        if context.alpha == 1.0 and self.form == "smallest":
            found = _bitdiff(name, base, ft)
            if isinstance(found, str):
                why.append(found)
            else:
                smallest = found
                budget = sum(t.numel() * t.element_size() for t in found.stored.values()) - 1
        candidates = [context.value_dtype] if context.value_dtype.itemsize < arithmetic.itemsize else []
        candidates.append(arithmetic)
        dense = DenseEncoding()
        for dtype in candidates:
            kind = str(dtype).removeprefix("torch.")
            if context.alpha == 1.0 and self.form == "smallest" and ft.numel() * dtype.itemsize > budget:
                why.append(f"a {kind} delta would be larger than the fine-tune")
                continue
            if reconstructs(base, delta, ft, dtype):
                return Edit(dense, dense.encode(delta, dtype=dtype), {"lossless": True}, lossless=True)
            misses = differing_bits(
                base.to(arithmetic, copy=True).add_(delta.to(dtype).to(arithmetic)).to(ft.dtype), ft
            )
            why.append(f"a {kind} delta misses the fine-tune at {misses} of {ft.numel()} entries")
        if smallest is not None:
            return smallest
        if context.alpha != 1.0:
            return Edit(dense, dense.encode(delta, dtype=arithmetic), {"exact_at_alpha_1": False})
        replace = ReplaceEncoding()
        reason = "; ".join(why)
        return Edit(
            replace, replace.encode(ft), {"lossless": True, "fallback": "replace", "reason": reason}, lossless=True
        )
