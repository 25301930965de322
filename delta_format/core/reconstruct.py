"""Putting deltas on their base (SPEC §9).

``theta = cast(((base + alpha_1 * d_1) + alpha_2 * d_2) + ..., dtype)``, computed in float32
(float64 for float64 parameters) left to right, with ``alpha_i * d_i`` rounded before it is
added, and cast once, so half-precision models do not accumulate rounding and every device gets
the same bits. The sum is formed a block of rows at a time (each element's arithmetic is the
same, so the bits are too): encodings add their rows into a cache-sized float32 accumulator
(`Encoding.rows`), and a sparse delta touches only its kept positions. An entry whose config says
``"rounding": "stochastic"`` (spec 1.3) or ``"stochastic-window"`` (spec 1.6) is cast to half
precision by `rounding.stochastic_cast`, with a dither seeded by the parameter's name and each
element's place (SPEC §9.1). A result that is not finite where the base was is reported, never
returned: an overflow in the cast would otherwise be a silent wrong weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import BaseMismatchError, NumericalError
from . import native
from .constants import ROUNDING_NEAREST
from .dtypes import TORCH_DTYPES, compute_dtype
from .encodings import DenseEncoding, ReplaceEncoding
from .encodings.base import matrix_shape
from .manifest import TensorEntry
from .rounding import Dither, inside_half, stochastic_cast

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
        decoded: the decoded delta (or, for a value encoding, the value) on the base's device.
        base: the base tensor (any dtype), or None where the encoding is ``replace``.
        alpha_scale: multiplies the stored alpha (load-time EXPO / interpolation knob).
        dtype: result dtype; the manifest's dtype by default.

    Returns:
        A tensor of ``entry.shape`` in ``dtype``; the same bits as `reconstruct_stored`.
    """
    if entry.encoding.is_delta:  # a decoded delta is a dense one: same arithmetic, same bits
        entry = TensorEntry(
            DenseEncoding(), entry.shape, entry.dtype, entry.alpha, rounding=entry.rounding, base_rows=entry.base_rows
        )
        stored = {DenseEncoding.DELTA: decoded}
    else:  # and a decoded value (replace, bitdiff) a replace one
        entry = TensorEntry(ReplaceEncoding(), entry.shape, entry.dtype, entry.alpha)
        stored = {ReplaceEncoding.VALUE: decoded}
    return reconstruct_stored(name, [(entry, stored, alpha_scale)], base, dtype=dtype or TORCH_DTYPES[entry.dtype])


ROW_BLOCK_ELEMENTS = {"cpu": 1 << 18}
"""Elements per row block of the float32 accumulator: 1 MiB on CPU (it stays in the core's cache,
which is most of the speed), one large block on accelerators (fewer kernel launches)."""
STOCHASTIC_BLOCK_ELEMENTS = 1 << 24
"""At most this many elements a block where the cast is `stochastic_cast` (its dither and masks
are ~18 bytes an element: 300 MB at this size, not 1.2 GB at an accelerator's 1 << 26)."""


def reconstruct_stored(
    name: str, parts: Sequence[Part], base: torch.Tensor | None, *, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The parameter from its base and one or more deltas' stored tensors (task arithmetic when
    several). A value part (``replace``, ``bitdiff``) must be the only part for its parameter.

    The sum is formed a block of rows at a time in a small float32 buffer and cast into the result
    (``out`` if given, a new tensor on the base's device otherwise), so the only full-size memory is
    the result itself. On an error the contents of ``out`` are unspecified.
    """
    shape = tuple(parts[0][0].shape)
    if any(not entry.encoding.is_delta for entry, _, _ in parts):
        value = _replaced(name, parts, base, dtype)
        return value if out is None else out.copy_(value)
    if base is None:
        raise BaseMismatchError(
            f"the base has no tensor {name!r}",
            expected=f"shape {list(shape)}",
            found="nothing",
            fix="load the base the delta was made against",
        )
    base_shape = parts[0][0].base_shape
    for entry, _, _ in parts:
        if tuple(base.shape) != entry.base_shape or tuple(entry.shape) != shape:
            raise BaseMismatchError(
                f"the base's {name!r} has another shape",
                expected=list(entry.base_shape)
                if tuple(entry.shape) == shape
                else f"one shape for every delta ({list(shape)})",
                found=list(base.shape) if tuple(entry.shape) == shape else list(entry.shape),
                fix="load the base the delta was made against",
            )
    compute = compute_dtype(dtype)
    dither = parameter_dither(name, [entry for entry, _, _ in parts], dtype)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=base.device)
    rows, cols = matrix_shape(shape)
    known = base_shape[0] if base_shape else 1  # rows the base has; the others start from zero (SPEC §9.2)
    if len(parts) == 1 and _native(name, parts[0], dither, base, out, known):
        return out
    deltas = [
        entry.encoding.rows(stored, entry.shape, name, compute, entry.alpha * alpha_scale)
        for entry, stored, alpha_scale in parts
    ]
    result, source = out.view(rows, cols), base.reshape(known, cols)
    block = ROW_BLOCK_ELEMENTS.get(out.device.type, 1 << 26)
    if dither is not None:  # its temporaries are ~18 bytes an element: a quarter of the block on accelerators
        block = min(block, STOCHASTIC_BLOCK_ELEMENTS)
    step = max(1, block // max(cols, 1))
    buffer = None if dtype == compute else torch.empty(min(step, rows) * cols, dtype=compute, device=out.device)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        target = result[start:stop]
        acc = target if buffer is None else buffer[: (stop - start) * cols].view(stop - start, cols)
        split = min(max(known, start), stop)  # rows [start, split) come from the base
        acc[: split - start].copy_(source[start:split])
        acc[split - start :].zero_()
        for delta in deltas:
            delta.add_rows(acc, start, stop)
        if dither is not None:
            if dither.cast_rows(acc, target, start):  # every sum inside the dtype's range, rounded natively
                continue
            inside = inside_half(acc, dtype)
            stochastic_cast(acc, dtype, dither.rows(start, stop, out.device), out=target, inside=inside)
            if inside:  # every sum finite and below the dtype's largest value: so is every result
                continue
        elif buffer is not None:
            target.copy_(acc)
        _check_finite(name, target[: split - start], source[start:split], dtype)
        _check_finite(name, target[split - start :], None, dtype)
    for delta in deltas:
        delta.finish()
    return out


def _native(name: str, part: Part, dither: Dither | None, base: torch.Tensor, out: torch.Tensor, known: int) -> bool:
    """The parameter in one native pass (`native.reconstruct_bf16`) where the extension takes this
    delta, base and dither; False otherwise, or where a row holds an edge (an overflow to report):
    the caller then computes it block by block, with deltas of its own (this one's is spent)."""
    if dither is None or out.dtype != torch.bfloat16 or not native.available():
        return False
    rows, cols = matrix_shape(tuple(out.shape))
    windows = dither.native_windows(0, rows, out.device)
    if windows is None:
        return False
    entry, stored, alpha_scale = part
    delta = entry.encoding.rows(stored, entry.shape, name, torch.float32, entry.alpha * alpha_scale).native_part()
    if delta is None:
        return False
    return bool(native.reconstruct_bf16(out.view(rows, cols), base.reshape(-1), known, *windows, delta))


def parameter_dither(name: str, entries: Sequence[TensorEntry], dtype: torch.dtype) -> Dither | None:
    """The dither of a parameter cast to ``dtype`` (SPEC §9.1), or None where it is rounded to
    nearest: the first of its parts (in order) whose rounding is not nearest decides, and only a
    half-precision result is dithered."""
    if compute_dtype(dtype) == dtype:
        return None
    rounding = next((entry.rounding for entry in entries if entry.rounding != ROUNDING_NEAREST), None)
    return None if rounding is None else Dither(rounding, name, tuple(entries[0].shape))


def _replaced(name: str, parts: Sequence[Part], base: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A value part (``replace``, ``bitdiff``): the value (SPEC §5.5, §5.6), or
    base + alpha (value - base) when alpha != 1."""
    if len(parts) > 1:
        raise BaseMismatchError(
            f"{name!r} is replaced by one delta and changed by another",
            expected="at most one delta touching a replaced parameter",
            found=f"{len(parts)} deltas",
            fix="compose deltas that edit disjoint replaced tensors",
        )
    entry, stored, alpha_scale = parts[0]
    alpha = entry.alpha * alpha_scale
    if alpha == 1.0 or base is None or tuple(base.shape) != tuple(entry.shape):
        value = _value(name, entry, stored, base, dtype)
        _check_finite(name, value, base if entry.encoding.needs_base else None, dtype)
        return value
    # alpha != 1 on a whole value: it stands for the delta value - base (SPEC §5.5, §9).
    acc = base.to(compute_dtype(dtype), copy=True)
    delta = _value(name, entry, stored, base, acc.dtype) - acc
    value = acc.add_(delta.mul_(alpha)).to(dtype)
    _check_finite(name, value, base, dtype)
    return value


def _value(
    name: str, entry: TensorEntry, stored: Mapping[str, torch.Tensor], base: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """A value part decoded in ``dtype``; one stored relative to the base (``needs_base``) gets the
    base rounded to the parameter's dtype (SPEC §5.6's Bd), which must exist with its shape."""
    if not entry.encoding.needs_base:
        return entry.encoding.decode(stored, entry.shape, name, dtype)
    if base is None or tuple(base.shape) != tuple(entry.shape):
        raise BaseMismatchError(
            f"the base has no tensor {name!r} of the delta's shape, which its {entry.encoding.name} value needs",
            expected=f"shape {list(entry.shape)}",
            found="nothing" if base is None else list(base.shape),
            fix="load the base the delta was made against",
        )
    rounded = base.to(TORCH_DTYPES[entry.dtype])
    return entry.encoding.decode(stored, entry.shape, name, dtype, base=rounded)


def _check_finite(name: str, out: torch.Tensor, base: torch.Tensor | None, dtype: torch.dtype) -> None:
    """Refuse non-finite results where the base was finite (an overflowing cast, SPEC §9)."""
    if not out.numel():
        return
    if bool(torch.isfinite(torch.stack(torch.aminmax(out.reshape(-1)))).all()):  # NaN propagates into both
        return  # one read of the result and one wait for the device
    bad_mask = ~torch.isfinite(out)
    if base is not None and base.is_floating_point():
        bad_mask &= torch.isfinite(base)  # non-finite where the base already was is not the delta's doing
    bad = int(bad_mask.sum())
    if bad == 0:
        return
    raise NumericalError(
        f"{name!r} overflows {str(dtype).removeprefix('torch.')}",
        expected="finite weights",
        found=f"{bad} non-finite values after adding the delta",
        fix="load in a wider dtype (dtype=torch.float32) or lower alpha",
    )
