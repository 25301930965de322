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
    target = dtype or TORCH_DTYPES[entry.dtype]
    if not entry.encoding.is_delta:
        result = decoded
    else:
        if base is None:
            raise BaseMismatchError(f"the base has no tensor {name!r}", expected=f"shape {list(entry.shape)}", found="nothing",
                                    fix="load the base the delta was made against")
        if tuple(base.shape) != tuple(entry.shape):
            raise BaseMismatchError(f"the base's {name!r} has another shape", expected=list(entry.shape), found=list(base.shape),
                                    fix="load the base the delta was made against")
        alpha = entry.alpha * alpha_scale
        result = torch.add(base.to(compute_dtype(target)), decoded, alpha=alpha)
    out = result.to(target)
    if not bool(torch.isfinite(out).all()):
        base_finite = base is None or not base.is_floating_point() or bool(torch.isfinite(base).all())
        if base_finite:
            bad = int((~torch.isfinite(out)).sum())
            raise NumericalError(
                f"{name!r} overflows {str(target).removeprefix('torch.')}", expected="finite weights",
                found=f"{bad} non-finite values after adding the delta",
                fix="load in a wider dtype (dtype=torch.float32) or lower alpha",
            )
    return out
