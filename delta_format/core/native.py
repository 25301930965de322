"""The native loops (C sources in ``_native/``): a first load's one-pass reconstruction and the
few-token products of on-the-fly deltas, where the optional extension ``delta_format.core._native``
was built at install (it needs a C compiler; nothing else), with the checks that make raw
addresses safe to hand to it.

Each function returns None (or False) where it cannot do the work — extension not built, turned
off with ``DELTA_FORMAT_NATIVE=0``, a tensor off the CPU or of another dtype or layout — and the
caller then takes its torch path: the same bits for the reconstruction (tests/test_native.py
compares them on every case), the same products up to float32 summation order. The loops release
the GIL; the one-pass reconstruction splits its rows over `torch.get_num_threads` threads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    from . import _native
except ImportError:  # not built: no C compiler at install, or a platform without one
    _native = None

ENV_VAR = "DELTA_FORMAT_NATIVE"
"""Set to ``0`` to use the torch ops everywhere (the extension stays unused)."""


def available() -> bool:
    """Whether the extension is built and not turned off by `ENV_VAR`."""
    return _native is not None and os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


_FLOAT_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def all_finite(tensor: torch.Tensor) -> bool | None:
    """Whether every element of a bfloat16, float16 or float32 CPU tensor is finite (one thread, no
    torch op), None where this cannot run here."""
    kind = _FLOAT_KINDS.get(tensor.dtype)
    if kind is None or not available() or not _cpu(tensor):
        return None
    return tensor.numel() == 0 or bool(_native.all_finite(tensor.data_ptr(), tensor.numel(), kind))


def _windows_fit(table: torch.Tensor, offsets: torch.Tensor, rows: int, cols: int) -> bool:
    """A dither table (int16 holding SPEC §9.1's 16-bit values) and every row's window inside it."""
    if table.dtype != torch.int16 or table.dim() != 1 or offsets.dtype != torch.int64:
        return False
    if tuple(offsets.shape) != (rows,):
        return False
    if not rows:
        return True
    low, high = torch.aminmax(offsets)
    return int(low) >= 0 and int(high) + cols <= table.numel()


def cast_window_bf16(acc: torch.Tensor, out: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor) -> bool | None:
    """``out`` (bfloat16, ``rows x cols``) from float32 ``acc`` rounded as SPEC §9.1's
    ``"stochastic-window"`` says, row ``r``'s dither being ``table[offsets[r] : offsets[r] + cols]``.

    Returns True when every element was rounded, False when a row holds an edge (an element at
    bfloat16's largest magnitude or past it, or not finite; ``out`` is then partly written and the
    caller must round the block itself), None when this cannot run here."""
    if not available() or acc.dim() != 2 or not _cpu(acc, out, table, offsets):
        return None
    rows, cols = acc.shape
    if acc.dtype != torch.float32 or out.dtype != torch.bfloat16 or tuple(out.shape) != (rows, cols):
        return None
    if not _windows_fit(table, offsets, rows, cols):
        return None
    if rows == 0 or cols == 0:
        return True
    # One thread: a block's loop runs between torch ops, whose OpenMP workers spin for a while after
    # each one; threads of our own would fight them for the cores (1.8 vs 0.4 ns an element, 2 cores).
    # The one-pass loop (`reconstruct_bf16`) runs after no parallel torch op, and takes threads.
    args = (acc.data_ptr(), out.data_ptr(), table.data_ptr(), offsets.data_ptr(), rows, cols, 1)
    return _native.cast_window_bf16(*args) == 0


def _sign_fits(bits: torch.Tensor, scale: torch.Tensor, rows: int, cols: int) -> bool:
    """Packed sign bits for a ``rows x cols`` matrix and a float32 scale per row or one."""
    if bits.dtype != torch.uint8 or scale.dtype != torch.float32 or scale.numel() not in (1, rows):
        return False
    return (rows * cols + 7) // 8 <= bits.numel()


def _scale_args(scale: torch.Tensor, rows: int) -> tuple[int, float]:
    """The per-row scales' address (0 for one scale) and the one scale."""
    if scale.numel() == rows and rows != 1:
        return scale.data_ptr(), 0.0
    return 0, float(scale.reshape(()))


@dataclass
class SignPart:
    """A sign delta as `reconstruct_bf16` takes it: packed bits, float32 scale per row or one."""

    bits: torch.Tensor
    scale: torch.Tensor


@dataclass
class SparsePart:
    """A sparse delta as `reconstruct_bf16` takes it: ascending int64 flat positions, one stored
    value each (bfloat16 or float32), each value times ``value_scale`` then ``alpha`` (float32,
    each product rounded, as `SparseEncoding.scaled_values`)."""

    positions: torch.Tensor
    values: torch.Tensor
    value_scale: float
    alpha: float


@dataclass
class SeededPart:
    """A sparse delta whose positions are a seeded mask's (SPEC §6): its stream, `seeded_checkpoints`
    over its ``len(values)`` kept positions (all inside the parameter: the caller checked), and
    the values as in `SparsePart`. The loop draws each row's positions as it makes the row."""

    stream: Stream
    checkpoints: torch.Tensor
    values: torch.Tensor
    value_scale: float
    alpha: float


def reconstruct_bf16(
    out: torch.Tensor,
    base: torch.Tensor,
    known: int,
    table: torch.Tensor,
    offsets: torch.Tensor,
    part: SignPart | SparsePart | SeededPart,
) -> bool | None:
    """A bfloat16 parameter (``out``, ``rows x cols``) in one pass: each row is the base's row
    (``known`` rows, bfloat16 or float32; zero past them), plus the part, rounded as
    `cast_window_bf16`. True when done, False when a row holds an edge (``out`` partly written),
    None when this cannot run here."""
    if not available() or out.dim() != 2 or not _cpu(out, base, table, offsets):
        return None
    rows, cols = out.shape
    if out.dtype != torch.bfloat16 or base.dtype not in (torch.bfloat16, torch.float32):
        return None
    if not 0 <= known <= rows or base.numel() != known * cols or not _windows_fit(table, offsets, rows, cols):
        return None
    sign, row_scale, value, positions, kept, values, value_scale, alpha = 0, 0, 0.0, 0, 0, 0, 1.0, 1.0
    values_f32, seeded, stream, checkpoints = 0, 0, (0, 0, 0, 0, 0, 0), 0
    if isinstance(part, SignPart):
        if not _cpu(part.bits, part.scale) or not _sign_fits(part.bits, part.scale, rows, cols):
            return None
        sign = part.bits.data_ptr()
        row_scale, value = _scale_args(part.scale, rows) if rows else (0, 0.0)
    elif isinstance(part, SeededPart):
        kept = part.values.numel()
        if not part.stream.fits() or not _cpu(part.values, part.checkpoints) or part.values.dim() != 1:
            return None
        if part.values.dtype not in (torch.bfloat16, torch.float32) or part.checkpoints.dtype != torch.int64:
            return None
        if part.checkpoints.numel() != -(-kept // CHUNK) + 1:
            return None
        seeded, stream, checkpoints = int(kept > 0), part.stream.args(), part.checkpoints.data_ptr()
        values, values_f32 = part.values.data_ptr(), int(part.values.dtype == torch.float32)
        value_scale, alpha = part.value_scale, part.alpha
    else:
        if not _cpu(part.positions, part.values) or part.positions.dtype != torch.int64:
            return None
        if part.values.dtype not in (torch.bfloat16, torch.float32) or part.values.numel() != part.positions.numel():
            return None
        kept = part.positions.numel()
        if kept and (int(part.positions[0]) < 0 or int(part.positions[-1]) >= rows * cols):
            return None
        if kept > 1 and not bool((part.positions[1:] > part.positions[:-1]).all()):  # the loop walks them in order
            return None
        positions, values = part.positions.data_ptr(), part.values.data_ptr()
        values_f32 = int(part.values.dtype == torch.float32)
        value_scale, alpha = part.value_scale, part.alpha
        if not kept:
            positions = 0  # nothing to add: no sparse part
    if rows == 0 or cols == 0:
        return True
    edges = _native.reconstruct_bf16(
        out.data_ptr(), rows, cols, known, base.data_ptr(), int(base.dtype == torch.float32),
        table.data_ptr(), offsets.data_ptr(), sign, row_scale, value, positions, kept, values, values_f32,
        value_scale, alpha, seeded, *stream, checkpoints, CHUNK, torch.get_num_threads(),
    )  # fmt: skip
    return edges == 0


@dataclass
class Stream:
    """A seeded mask's stream as the native loops take it (SPEC §6): its key and
    `seeded_mask._gap_lookup`'s tables (on the CPU)."""

    key: int
    ascending: torch.Tensor
    above: torch.Tensor
    inside: torch.Tensor
    exact_below: int

    def args(self) -> tuple[int, ...]:
        return (
            self.key,
            self.ascending.data_ptr(),
            self.ascending.numel(),
            self.above.data_ptr(),
            self.inside.data_ptr(),
            self.exact_below,
        )

    def fits(self) -> bool:
        """The tables' layout the loops read (4096 buckets, int64 thresholds)."""
        tables = (self.ascending, self.above, self.inside)
        if not _cpu(*tables) or self.ascending.dtype != torch.int64:
            return False
        return all(t.dtype == torch.int32 and t.numel() == 1 << 12 for t in (self.above, self.inside))


def seeded_positions(stream: Stream, start: int, count: int, offset: int) -> torch.Tensor | None:
    """``offset - 1 + cumsum(gap_k + 1)`` for counters ``start .. start + count - 1`` (int64): the
    kept positions `seeded_mask.iter_kept_positions` makes of them. None where this cannot run."""
    if not available() or not stream.fits() or count < 0 or start < 0 or start + count > 1 << 64:
        return None
    out = torch.empty(count, dtype=torch.int64)
    if count:
        _native.seeded_positions(out.data_ptr(), *stream.args(), start, count, offset)
    return out


CHUNK = 4096
"""Counters between two checkpoints of a seeded walk (`seeded_checkpoints`)."""


def seeded_checkpoints(stream: Stream, count: int) -> torch.Tensor | None:
    """``c[i]``: the position of counter ``i * CHUNK - 1`` (``c[0] = -1``), for ``i`` up to
    ``ceil(count / CHUNK)``, the last being counter ``count - 1``'s: where a walk of the stream
    from chunk ``i`` starts (the one-pass loop's threads each start from one). None where this
    cannot run."""
    if not available() or not stream.fits() or count < 0 or count >= 1 << 62:
        return None
    out = torch.zeros(-(-count // CHUNK) + 1, dtype=torch.int64)
    _native.seeded_checkpoints(out.data_ptr(), *stream.args(), count, CHUNK, torch.get_num_threads())
    return out


PRODUCT_MAX_TOKENS = 32
"""The on-the-fly products take at most this many tokens (`Factor.apart` merges from 32 on)."""


def _transposed(x: torch.Tensor, cols: int) -> tuple[torch.Tensor, int, int] | None:
    """``x`` (``[..., cols]``) as the products take it: float32 ``[cols, lanes]``, token ``t`` in
    column ``t``, zeros past the last token, ``lanes`` the token count rounded up to 8."""
    if x.device.type != "cpu" or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != cols or cols == 0:
        return None
    flat = x.reshape(-1, cols)
    tokens = flat.shape[0]
    if not 0 < tokens <= PRODUCT_MAX_TOKENS:
        return None
    lanes = -(-tokens // 8) * 8
    xt = torch.zeros(cols, lanes)
    xt[:, :tokens] = flat.T
    return xt, tokens, lanes


def _product_result(y: torch.Tensor, x: torch.Tensor, tokens: int, rows: int) -> torch.Tensor:
    return y[:tokens].to(x.dtype).reshape(*x.shape[:-1], rows)


def sign_product(x: torch.Tensor, bits: torch.Tensor, scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor | None:
    """``x @ (scale * S).T`` for the ``rows x cols`` sign matrix ``S`` of packed ``bits`` (SPEC §5.3)
    and float32 ``scale`` (per row or one), for at most `PRODUCT_MAX_TOKENS` tokens of ``x``
    (``[..., cols]``), in ``x``'s dtype, summed in float32 from a table of partial sums per four
    columns: no +-1 matrix is expanded. None where this cannot run here (then expand)."""
    if not available() or cols % 8 or not _cpu(bits, scale) or not _sign_fits(bits, scale, rows, cols):
        return None
    prepared = _transposed(x, cols)
    if prepared is None:
        return None
    xt, tokens, lanes = prepared
    table, total, y = torch.empty(cols // 4 * 16 * lanes), torch.empty(lanes), torch.empty(lanes, rows)
    row_scale, value = _scale_args(scale, rows)
    _native.sign_product(
        xt.data_ptr(), table.data_ptr(), total.data_ptr(), lanes, rows, cols, bits.data_ptr(), row_scale, value,
        y.data_ptr(), 1,
    )  # fmt: skip
    return _product_result(y, x, tokens, rows)


def sparse_product(
    x: torch.Tensor, positions: torch.Tensor, values: torch.Tensor, rows: int, cols: int
) -> torch.Tensor | None:
    """``x @ D.T`` for the ``rows x cols`` matrix ``D`` holding ``values`` at flat ``positions``
    (int32 or int64, ascending: a factor's own), for at most `PRODUCT_MAX_TOKENS` tokens of ``x``,
    in ``x``'s dtype: one multiply-add of a token vector per kept value (float32). Memory-safe for
    any positions (one outside its row is skipped). None where this cannot run here."""
    if not available() or not _cpu(positions, values) or positions.dim() != 1 or values.dim() != 1:
        return None
    if positions.dtype not in (torch.int32, torch.int64) or values.dtype not in (torch.bfloat16, torch.float32):
        return None
    if positions.numel() != values.numel():
        return None
    prepared = _transposed(x, cols)
    if prepared is None:
        return None
    xt, tokens, lanes = prepared
    y = torch.empty(lanes, rows)
    _native.sparse_product(
        xt.data_ptr(), lanes, rows, cols, positions.data_ptr(), int(positions.dtype == torch.int32),
        positions.numel(), values.data_ptr(), int(values.dtype == torch.float32), y.data_ptr(), 1,
    )  # fmt: skip
    return _product_result(y, x, tokens, rows)
