"""From a manifest entry to the `Factor` its encoding keeps for the forward."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...core.dtypes import TORCH_DTYPES, compute_dtype
from ...core.encodings import Factor
from ...core.encodings.base import not_on_the_fly
from ...core.manifest import TensorEntry
from ...errors import NumericalError


def require_on_the_fly(name: str, entry: TensorEntry) -> None:
    """Refuse, before anything is read, a matrix whose encoding has no on-the-fly form."""
    if not entry.encoding.on_the_fly():
        raise not_on_the_fly(name, entry.encoding.name)


def build_factor(
    name: str, entry: TensorEntry, stored: Mapping[str, torch.Tensor], alpha: float, dtype: torch.dtype
) -> Factor:
    """The `Factor` of one matrix entry from its stored tensors, held in ``dtype`` (the weight's),
    with ``alpha`` (entry alpha times the caller's) applied as SPEC §9 applies it: the product
    rounded in the compute dtype of the entry's dtype."""
    compute = compute_dtype(TORCH_DTYPES[entry.dtype])
    return entry.encoding.factor(stored, tuple(entry.shape), name, dtype, entry.alpha * alpha, compute=compute)


def check_finite_merge(name: str, factor: Factor, weight: torch.Tensor) -> None:
    """The merged weight ``W + alpha * decode(delta)`` is finite wherever ``W`` is, as a load
    requires of every weight (SPEC §9): computed once here, so a delta whose alpha or values
    overflow is refused before it is attached (`NumericalError`), not served as NaN logits."""
    merged = factor.merged(weight)
    bad = ~torch.isfinite(merged)
    if weight.is_floating_point():
        bad &= torch.isfinite(weight)
    if bool(bad.any()):
        raise NumericalError(
            f"{name!r} overflows {str(weight.dtype).removeprefix('torch.')} with this delta",
            expected="finite weights",
            found=f"{int(bad.sum())} non-finite values after adding the delta",
            fix="lower alpha, or load in a wider dtype",
        )
