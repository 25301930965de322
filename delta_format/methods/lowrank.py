"""``lowrank`` and ``lora``: the delta as a product of two thin factors, ``U @ V``.

``lowrank`` truncates the SVD of each matrix delta at a given ``rank``, or at the smallest rank
that keeps a fraction ``energy`` of ``||Δ||²`` (the sum of squared singular values). The singular
values are split evenly between the factors (`LowRankEncoding.factorize`) so neither factor's
range explodes in half precision.

``lora`` stores a LoRA adapter's own factors exactly: a LoRA fine-tune *is* a low-rank delta,
``B @ A * lora_alpha / r``, with the scaling folded into ``U`` (the compressor reads the adapter
files, `delta_format.compression.lora.LoraAdapter`). ``lowrank`` with a rank below the adapter's
re-truncates it by SVD.

Vectors have no low-rank form, and a factorisation of rank ``r`` only saves space while
``r * (rows + cols) < rows * cols``; such tensors are stored ``dense`` instead (lossless, and
smaller), with the reason in their stats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.encodings import LowRankEncoding
from ..core.encodings.base import rows_cols
from ..errors import InvalidArgumentError
from .base import Edit, EditMethod, TensorContext, param
from .dense import DenseMethod


def _dense_instead(name: str, delta: torch.Tensor, context: TensorContext, reason: str) -> Edit:
    edit = DenseMethod().edit(name, delta, context)
    edit.stats.update(fallback=edit.stats.get("fallback", "dense"), reason=edit.stats.get("reason", reason))
    return edit


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest ``r`` with ``Σ_{i<r} s_i² >= energy * Σ s_i²`` (at least 1)."""
    cumulative = singular_values.double().square().cumsum(0)
    if cumulative.numel() == 0 or float(cumulative[-1]) == 0.0:
        return 1
    return max(1, min(int((cumulative < energy * cumulative[-1]).sum()) + 1, singular_values.numel()))


def _lowrank_edit(delta: torch.Tensor, u: torch.Tensor, v: torch.Tensor, context: TensorContext, stats: dict) -> Edit:
    encoding = LowRankEncoding(int(u.shape[1]))
    stored = encoding.encode(delta, dtype=context.value_dtype, u=u, v=v)
    return Edit(encoding, stored, {"rank": int(u.shape[1]), **stats})


@dataclass
class LowRankMethod(EditMethod, name="lowrank"):
    """Truncated SVD at ``rank`` or at an ``energy`` fraction; with neither, a LoRA source's own
    factors.

    Example:
        >>> delta = torch.outer(torch.arange(1.0, 5.0), torch.ones(6))     # rank 1
        >>> edit = LowRankMethod(rank=1).edit("w", delta, TensorContext("w"))
        >>> torch.allclose(edit.encoding.decode(edit.stored, (4, 6), "w", torch.float32), delta)
        True
    """

    summary: ClassVar[str] = "truncated SVD"
    tags: ClassVar[tuple[str, ...]] = ("low-rank",)
    rank: int | None = param(None, parse=int, help="rank of the truncated SVD")
    energy: float | None = param(None, parse=float, help="keep the smallest rank holding this fraction of ||delta||^2")

    def __post_init__(self):
        if self.rank is not None and self.energy is not None:
            raise InvalidArgumentError(
                "lowrank: give rank or energy, not both",
                expected="one of them",
                found=f"rank={self.rank}, energy={self.energy}",
            )
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise InvalidArgumentError("lowrank: rank must be an integer >= 1", expected=">= 1", found=repr(self.rank))
        if self.energy is not None and (
            isinstance(self.energy, bool) or not isinstance(self.energy, (int, float)) or not 0.0 < self.energy <= 1.0
        ):
            raise InvalidArgumentError(
                "lowrank: energy must be in (0, 1]", expected="e.g. 0.9", found=repr(self.energy)
            )

    def edit(self, name: str, delta: torch.Tensor, context: TensorContext) -> Edit:
        if delta.dim() < 2:
            return _dense_instead(name, delta, context, "a vector has no low-rank form")
        rows, cols = rows_cols(tuple(delta.shape))
        factors = context.factors
        if self.rank is None and self.energy is None:
            if factors is None:
                raise InvalidArgumentError(
                    f"lowrank: {name!r} needs rank= or energy=",
                    expected="rank or energy",
                    found="neither (and the source is not a LoRA adapter)",
                )
            u, v = factors
            stats = {"source": "adapter factors"}
        elif factors is not None and self.rank is not None and self.rank >= factors[0].shape[1]:
            u, v = factors
            stats = {"source": "adapter factors"}
        else:
            svd = LowRankEncoding.svd(delta)
            s = svd.s
            rank = min(self.rank, s.numel()) if self.rank is not None else energy_rank(s, self.energy)
            u, v = LowRankEncoding.split(svd, rank)
            total = float(s.double().square().sum())
            stats = {"source": "svd", "energy": float(s[:rank].double().square().sum()) / total if total else 1.0}
        rank = int(u.shape[1])
        if rank * (rows + cols) >= math.prod(delta.shape):
            return _dense_instead(name, delta, context, f"rank {rank} factors are no smaller than the matrix")
        return _lowrank_edit(delta, u, v, context, stats)


@dataclass
class LoraMethod(EditMethod, name="lora"):
    """A LoRA adapter's factors, stored as they are (tensors the adapter replaced outright, such as
    ``modules_to_save``, are stored ``dense``)."""

    summary: ClassVar[str] = "a LoRA adapter's own factors"
    tags: ClassVar[tuple[str, ...]] = ("low-rank", "lora")
    needs_adapter_factors: ClassVar[bool] = True

    def edit(self, name: str, delta: torch.Tensor, context: TensorContext) -> Edit:
        if context.factors is None:
            return _dense_instead(name, delta, context, "no LoRA factors for this tensor")
        u, v = context.factors
        return _lowrank_edit(delta, u, v, context, {"source": "adapter factors"})
