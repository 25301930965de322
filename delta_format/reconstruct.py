"""Putting a decoded delta on its base (SPEC §9): ``theta = cast(base + alpha * delta, dtype)``.

The sum is computed in float32 (float64 for float64 parameters) and cast once, so half-precision
models do not accumulate rounding. A result that is not finite where the base was is reported,
never returned: an overflow in the cast would otherwise be a silent wrong weight.
"""

from __future__ import annotations

import torch

from .encodings import TORCH_DTYPES, compute_dtype
from .errors import BaseMismatchError, NumericalError
from .manifest import TensorEntry


def reconstruct(
    name: str,
    entry: TensorEntry,
    decoded: torch.Tensor,
    base: torch.Tensor | None,
    *,
    alpha_scale: float = 1.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The fine-tuned parameter from its base tensor and its decoded delta.

    Args:
        name: parameter name (for messages).
        entry: the manifest entry (encoding, shape, stored alpha).
        decoded: output of `DeltaReader.decode` for this parameter, on the target device.
        base: the base tensor (any dtype, same device), or None where the encoding is ``replace``.
        alpha_scale: multiplies the stored alpha (load-time EXPO / interpolation knob).
        dtype: result dtype; the manifest's dtype by default.

    Returns:
        A tensor of ``entry.shape`` in ``dtype``.
    """
    return reconstruct_sum(name, [(entry, decoded, alpha_scale)], base, dtype=dtype or TORCH_DTYPES[entry.dtype])


def reconstruct_sum(
    name: str,
    parts: list[tuple[TensorEntry, torch.Tensor, float]],
    base: torch.Tensor | None,
    *,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``cast(s + base, dtype)`` with ``s = alpha_1 * delta_1 + alpha_2 * delta_2 + ...`` summed in
    order in float32 (SPEC §9): one delta, or several composed on one base (task arithmetic).
    The decoded tensors are consumed (updated in place). A ``replace`` part must be the only part
    for its parameter."""
    replaced = [p for p in parts if not p[0].encoding.is_delta]
    if replaced:
        if len(parts) > 1:
            raise BaseMismatchError(f"{name!r} is replaced by one delta and changed by another", expected="at most one delta "
                                    "touching a replaced parameter", found=f"{len(parts)} deltas", fix="compose deltas that edit disjoint replaced tensors")
        result = replaced[0][1]
    else:
        entry = parts[0][0]
        if base is None:
            raise BaseMismatchError(f"the base has no tensor {name!r}", expected=f"shape {list(entry.shape)}", found="nothing",
                                    fix="load the base the delta was made against")
        if tuple(base.shape) != tuple(entry.shape):
            raise BaseMismatchError(f"the base's {name!r} has another shape", expected=list(entry.shape), found=list(base.shape),
                                    fix="load the base the delta was made against")
        result = None
        for part_entry, decoded, alpha_scale in parts:
            if tuple(decoded.shape) != tuple(base.shape):
                raise BaseMismatchError(f"deltas disagree on the shape of {name!r}", expected=list(base.shape), found=list(decoded.shape))
            alpha = part_entry.alpha * alpha_scale
            if result is None:  # decoded tensors are owned here: accumulate in place
                result = decoded if alpha == 1.0 else decoded.mul_(alpha)
            else:
                result.add_(decoded, alpha=alpha)
        result = result.to(compute_dtype(dtype)).add_(base)
    out = result.to(dtype)
    if not bool(torch.isfinite(out).all()):
        base_finite = base is None or not base.is_floating_point() or bool(torch.isfinite(base).all())
        if base_finite:
            bad = int((~torch.isfinite(out)).sum())
            raise NumericalError(
                f"{name!r} overflows {str(dtype).removeprefix('torch.')}", expected="finite weights",
                found=f"{bad} non-finite values after adding the delta",
                fix="load in a wider dtype (dtype=torch.float32) or lower alpha",
            )
    return out
