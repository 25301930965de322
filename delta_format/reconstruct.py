"""Putting deltas on their base (SPEC §9).

``theta = cast(((base + alpha_1 * d_1) + alpha_2 * d_2) + ..., dtype)``, computed in float32
(float64 for float64 parameters) left to right, with ``alpha_i * d_i`` rounded before it is
added, and cast once, so half-precision models do not accumulate rounding and every device gets
the same bits. Encodings add themselves into the float32 accumulator (`Encoding.accumulate`):
a sparse delta touches only its kept positions, which is what makes loading it cheap. A result
that is not finite where the base was is reported, never returned: an overflow in the cast
would otherwise be a silent wrong weight.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .encodings import TORCH_DTYPES, DenseEncoding, compute_dtype
from .errors import BaseMismatchError, NumericalError
from .manifest import TensorEntry

Part = tuple[TensorEntry, Mapping[str, torch.Tensor], float]
"""One delta's contribution to a parameter: its entry, its stored tensors, an alpha multiplier."""


def reconstruct(
    name: str,
    entry: TensorEntry,
    decoded: torch.Tensor,
    base: torch.Tensor | None,
    *,
    alpha_scale: float = 1.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The fine-tuned parameter from its base tensor and its decoded delta (`DeltaReader.decode`).

    Args:
        name: parameter name (for messages).
        entry: the manifest entry (encoding, shape, stored alpha).
        decoded: the decoded delta (or, for ``replace``, the value) on the base's device.
        base: the base tensor (any dtype), or None where the encoding is ``replace``.
        alpha_scale: multiplies the stored alpha (load-time EXPO / interpolation knob).
        dtype: result dtype; the manifest's dtype by default.

    Returns:
        A tensor of ``entry.shape`` in ``dtype``; the same bits as `reconstruct_stored`.
    """
    if entry.encoding.is_delta:  # a decoded delta is a dense one: same arithmetic, same bits
        entry = TensorEntry(DenseEncoding(), entry.shape, entry.dtype, entry.alpha)
        stored = {"delta": decoded}
    else:
        stored = {"value": decoded}
    return reconstruct_stored(name, [(entry, stored, alpha_scale)], base, dtype=dtype or TORCH_DTYPES[entry.dtype])


def reconstruct_stored(name: str, parts: Sequence[Part], base: torch.Tensor | None, *, dtype: torch.dtype) -> torch.Tensor:
    """The parameter from its base and one or more deltas' stored tensors (task arithmetic when
    several). A ``replace`` part must be the only part for its parameter."""
    shape = tuple(parts[0][0].shape)
    if any(not entry.encoding.is_delta for entry, _, _ in parts):
        if len(parts) > 1:
            raise BaseMismatchError(f"{name!r} is replaced by one delta and changed by another",
                                    expected="at most one delta touching a replaced parameter", found=f"{len(parts)} deltas",
                                    fix="compose deltas that edit disjoint replaced tensors")
        entry, stored, alpha_scale = parts[0]
        alpha = entry.alpha * alpha_scale
        if alpha == 1.0 or base is None or tuple(base.shape) != tuple(entry.shape):
            return _checked(name, entry.encoding.decode(stored, entry.shape, name, dtype), dtype, None)
        # alpha != 1 on a whole value: it stands for the delta value - base (SPEC §5.5, §9).
        acc = base.to(compute_dtype(dtype), copy=True)
        delta = entry.encoding.decode(stored, entry.shape, name, acc.dtype) - acc
        return _checked(name, acc.add_(delta.mul_(alpha)).to(dtype), dtype, base)
    if base is None:
        raise BaseMismatchError(f"the base has no tensor {name!r}", expected=f"shape {list(shape)}", found="nothing",
                                fix="load the base the delta was made against")
    for entry, _, _ in parts:
        if tuple(base.shape) != tuple(entry.shape):
            raise BaseMismatchError(f"the base's {name!r} has another shape", expected=list(entry.shape),
                                    found=list(base.shape), fix="load the base the delta was made against")
    acc = base.to(compute_dtype(dtype), copy=True)
    for entry, stored, alpha_scale in parts:
        entry.encoding.accumulate(acc, stored, entry.shape, name, entry.alpha * alpha_scale)
    return _checked(name, acc.to(dtype), dtype, base)


def _checked(name: str, out: torch.Tensor, dtype: torch.dtype, base: torch.Tensor | None) -> torch.Tensor:
    low, high = torch.aminmax(out.reshape(-1)) if out.numel() else (out.new_zeros(()), out.new_zeros(()))
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return out
    bad_mask = ~torch.isfinite(out)
    if base is not None and base.is_floating_point():
        bad_mask &= torch.isfinite(base)  # non-finite where the base already was is not the delta's doing
    bad = int(bad_mask.sum())
    if bad == 0:
        return out
    raise NumericalError(
        f"{name!r} overflows {str(dtype).removeprefix('torch.')}", expected="finite weights",
        found=f"{bad} non-finite values after adding the delta", fix="load in a wider dtype (dtype=torch.float32) or lower alpha",
    )
