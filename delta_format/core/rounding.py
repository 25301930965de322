"""Seeded stochastic rounding of a reconstructed parameter to half precision (SPEC §9.1).

A lossy delta on a bfloat16 model is mostly smaller than the spacing of the weights it is added
to: bfloat16 keeps 8 significant bits, so a correction under half a unit in the last place of
its weight is rounded away by the final cast. Rounding to nearest turns that loss into a
coherent error (every small correction lost, in the delta's own direction); rounding up or down
with probability given by the distance keeps the correction in expectation and leaves noise,
which a network tolerates far better (benchmarks/RESULTS.md: SmolLM2-135M, per-row signs kept
67 % of the fine-tune's gain with nearest rounding, 72 % with this, as in float32).

Each element's 16-bit dither comes from the seeded-mask hash (SPEC §6), so every device and every
order of evaluation gets the same bits, and a value the dtype holds exactly (every parameter of a
lossless delta) is returned unchanged. ``"stochastic"`` (spec 1.3) hashes every element's flat
index: two hash rounds an element, most of a first load's time. ``"stochastic-window"`` (spec 1.6)
hashes one offset per row of C elements; a row's dither is the window of C values at its offset
in a table of 2**20 + C - 1 hashes shared by every parameter (a gather, ~8x cheaper), with the
same distribution: every element's dither is a hash output, and two rows share values only where
their windows overlap, at a random shift.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from . import native
from .constants import ROUNDING_SEED, ROUNDING_STOCHASTIC, ROUNDING_WINDOW, WINDOW_OFFSETS, WINDOW_SEED
from .seeded_mask import _uniform32, stream_key, uniform_at

DITHER_BITS = 16
"""Bits of each element's dither ``d``: the top 16 of a 32-bit hash."""


@lru_cache(maxsize=4096)
def rounding_key(name: str) -> int:
    """The dither stream's key of parameter ``name``: SPEC §6's ``key(ROUNDING_SEED, name)``."""
    return stream_key(ROUNDING_SEED, name)


@lru_cache(maxsize=1)
def window_table_key() -> int:
    """The key of ``"stochastic-window"``'s table, the same for every parameter: ``key(WINDOW_SEED, "")``."""
    return stream_key(WINDOW_SEED, "")


_TABLES: dict[torch.device, torch.Tensor] = {}
"""``"stochastic-window"``'s table on each device, as long as the widest row met so far needed."""
_TABLES16: dict[torch.device, torch.Tensor] = {}
"""The same tables' values as int16 (their 16 bits), half the bytes, for the native loops."""
MAX_TABLE = WINDOW_OFFSETS + (1 << 16)
"""Table entries kept (4.25 MiB): rows wider than 2**16 elements hash their windows' entries instead."""
MAX_CACHED_OFFSETS = 1 << 20
"""A parameter with at most this many rows has every row's offset computed once (8 MiB at most)."""


def window_table(length: int, device: torch.device) -> torch.Tensor:
    """``W[j] = u(window_table_key(), j) >> 16`` for ``j < length`` (at least; at most `MAX_TABLE`):
    one table for every parameter, so its cost (2**20 hashes, ~2 ms on a CPU core; 4 MiB) is paid
    once per process and device, grown when a wider row needs more."""
    table = _TABLES.get(device)
    if table is None or table.numel() < length:
        table = _top16(_uniform32(window_table_key(), 0, length, device))
        _TABLES[device] = table
    return table


def _top16(hashed: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of int32 tensors holding 32-bit hashes, in place (the shift is arithmetic)."""
    return hashed.bitwise_right_shift_(32 - DITHER_BITS).bitwise_and_((1 << DITHER_BITS) - 1)


class Dither:
    """The dither ``d`` (0 <= d < 2**16) of each element of one parameter, as SPEC §9.1 draws it for
    ``rounding``: by blocks of rows of its matrix view (``shape[0]`` rows of ``prod(shape[1:])``
    columns, a scalar one of one), or at given flat indices. Returned as new int32 tensors, which
    `stochastic_cast` consumes."""

    def __init__(self, rounding: str, name: str, shape: tuple[int, ...]):
        if rounding not in (ROUNDING_STOCHASTIC, ROUNDING_WINDOW):
            raise ValueError(f"no dither for rounding {rounding!r}")
        self.rounding, self.key = rounding, rounding_key(name)
        self.cols = math.prod(shape[1:]) if len(shape) else 1
        self.row_count = shape[0] if len(shape) else 1
        self.span = WINDOW_OFFSETS + self.cols - 1  # the table entries this parameter's windows read
        self._offsets: torch.Tensor | None = None

    def forget(self) -> None:
        """Drop the rows' offsets (``"stochastic-window"``); the next use computes them again."""
        self._offsets = None

    def offsets(self, rows: torch.Tensor | tuple[int, int], device: torch.device) -> torch.Tensor:
        """Each row's window offset ``o[r] = u(key, r) >> 12`` (int64, below `WINDOW_OFFSETS`), for
        rows ``start:stop`` or an int64 tensor of row indices."""
        if isinstance(rows, tuple):
            hashed = _uniform32(self.key, rows[0], rows[1] - rows[0], device)
        else:
            hashed = uniform_at(self.key, rows)
        top = WINDOW_OFFSETS.bit_length() - 1  # the top 20 bits of the hash
        return hashed.bitwise_right_shift_(32 - top).bitwise_and_(WINDOW_OFFSETS - 1).to(torch.int64)

    def _block_offsets(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Rows ``start:stop``'s offsets: from every row's, computed once where the rows are few
        (a block's few small hash ops would cost more than its gather), else the block's own."""
        if self.row_count > MAX_CACHED_OFFSETS:
            return self.offsets((start, stop), device)
        if self._offsets is None or self._offsets.device != device:
            self._offsets = self.offsets((0, self.row_count), device)
        return self._offsets[start:stop]

    def _entries(self, places: torch.Tensor) -> torch.Tensor:
        """``W[j]`` for int64 ``j`` of ``places``: read from the table, or hashed where it would be
        longer than `MAX_TABLE`."""
        if self.span <= MAX_TABLE:
            return window_table(self.span, places.device).index_select(0, places.view(-1)).view(places.shape)
        return _top16(uniform_at(window_table_key(), places))

    def rows(self, start: int, stop: int, device: torch.device | str) -> torch.Tensor:
        """The dither of rows ``start:stop``, flat (``(stop - start) * cols`` elements)."""
        device = torch.device(device)
        if self.rounding == ROUNDING_STOCHASTIC:  # u(key, k) of each flat index k
            return _top16(_uniform32(self.key, start * self.cols, (stop - start) * self.cols, device))
        offsets = self._block_offsets(start, stop, device)
        if self.span <= MAX_TABLE:  # each row's window of the table, a view; one gather
            windows = window_table(self.span, device)[: self.span].unfold(0, self.cols, 1)
            return windows.index_select(0, offsets).view(-1)
        columns = torch.arange(self.cols, dtype=torch.int64, device=device)
        return self._entries(offsets[:, None] + columns).view(-1)

    def native_windows(self, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For the native loops (`native`): the window table as int16 (its 16-bit values) and the
        offsets of rows ``start:stop``, or None where they cannot take this dither (spec 1.3's
        per-element hashes, rows too wide for the table, too many rows to hold their offsets)."""
        if self.rounding != ROUNDING_WINDOW or self.span > MAX_TABLE or self.row_count > MAX_CACHED_OFFSETS:
            return None
        if device.type != "cpu" or not native.available():
            return None
        table = _TABLES16.get(device)
        if table is None or table.numel() < self.span:
            table = _TABLES16[device] = window_table(self.span, device).to(torch.int16)
        return table, self._block_offsets(start, stop, device)

    def cast_rows(self, acc: torch.Tensor, out: torch.Tensor, start: int) -> bool:
        """Round float32 ``acc`` (rows ``start:start + len(acc)`` of the parameter, ``rows x cols``)
        into bfloat16 ``out`` in one native pass, as `stochastic_cast` with this dither would.
        False where that cannot be done here (see `native_windows`; another dtype; an element at
        an edge): the caller rounds the block itself."""
        windows = self.native_windows(start, start + acc.shape[0], acc.device)
        return windows is not None and bool(native.cast_window_bf16(acc, out, *windows))

    def at(self, counters: torch.Tensor) -> torch.Tensor:
        """The dither at each int64 flat index of ``counters`` (any order and shape; an embedding's
        gathered rows)."""
        if self.rounding == ROUNDING_STOCHASTIC:
            return _top16(uniform_at(self.key, counters))
        row = torch.div(counters, self.cols, rounding_mode="floor")
        column = counters - row * self.cols
        if self.row_count <= MAX_CACHED_OFFSETS:  # a hash per row, not per element read
            offsets = self._block_offsets(0, self.row_count, counters.device).index_select(0, row.view(-1))
            offsets = offsets.view(row.shape)
        else:
            offsets = self.offsets(row, counters.device)
        return self._entries(offsets.add_(column))


def stochastic_cast(
    acc: torch.Tensor,
    dtype: torch.dtype,
    dither: torch.Tensor,
    out: torch.Tensor | None = None,
    inside: bool | None = None,
) -> torch.Tensor:
    """``acc`` (float32) rounded to ``dtype`` (bfloat16 or float16) as SPEC §9.1 says: ``t`` the
    value toward zero, ``a`` the next one away from zero, ``f = (|acc| - |t|) / (|a| - |t|)``;
    ``a`` if ``d < f · 2**16`` (``d`` the element's `dither`, int32, ``acc``'s element count,
    consumed), else ``t``; where ``a`` is infinite (``t`` is the largest finite magnitude) or ``acc``
    is not finite, the nearest value, as without this rule (an overflow stays an infinity, an error
    for the caller; a NaN stays a NaN). Written into ``out`` (contiguous, ``acc``'s shape) if given;
    ``inside``: `inside_half` of ``acc``, if the caller knows it."""
    flat = acc.reshape(-1)
    dither = dither.reshape(-1)
    if inside is None:
        inside = inside_half(flat, dtype)
    if dtype == torch.bfloat16:  # bfloat16 is float32's top half: t and f · 2**16 are bit fields of acc
        # a iff d < f·2**16 (acc's low 16 bits), i.e. iff low + (0xFFFF - d) carries into t: one add
        # on the pattern (two's complement addition is the unsigned one; the magnitude grows)
        carried = torch.sub(flat.view(torch.int32), dither, out=dither).add_(0xFFFF)
        high = carried.bitwise_right_shift_(16)
        if inside:  # no t = ±max (where a is ±inf), no inf, no NaN: the common case
            if out is not None:  # the top halves straight into the result: one conversion pass
                out.view(torch.int16).view(-1).copy_(high)
                return out
            return high.to(torch.int16).view(dtype).view(acc.shape)
        edge = (flat.view(torch.int32) >> 16).bitwise_and_(0x7FFF) >= 0x7F7F
        result = torch.where(edge, flat.to(dtype), high.to(torch.int16).view(dtype))
    else:
        nearest = flat.to(dtype)
        toward, away = _toward_and_away(flat, nearest)
        f = (flat.abs() - toward.float().abs_()).div_((away.float() - toward.float()).abs_())
        result = torch.where(dither.float() < f.mul_(2.0**16), away, toward)
        if not inside:
            result = torch.where(~torch.isfinite(away), nearest, result)  # t = ±max, or acc is not finite
    result = result.view(acc.shape)
    return result if out is None else out.copy_(result)


def inside_half(acc: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every element of float32 ``acc`` is finite and below ``dtype``'s largest finite value in
    magnitude (one pass; a NaN fails every comparison): then no element's ``t`` is the largest
    value, both neighbours are finite, and so is the result."""
    if not acc.numel():
        return True
    low, high = torch.aminmax(acc.reshape(-1))
    edge = float(torch.finfo(dtype).max)
    return bool(torch.stack([high < edge, low > -edge]).all())


def _toward_and_away(acc: torch.Tensor, nearest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The half-precision neighbours of float32 ``acc`` toward and away from zero, from its nearest
    value (one of them: ``t`` where it is not past ``acc``, an exact ``acc`` included) and the
    pattern one unit of magnitude from it (the low 15 bits; the sign bit is ``acc``'s, -0 too)."""
    bits = nearest.view(torch.int16).to(torch.int32)
    beyond = nearest.float().abs() > acc.abs()  # nearest rounded away from zero: t is one step in
    other = bits.add_(torch.where(beyond, -1, 1)).to(torch.int16).view(nearest.dtype)
    return torch.where(beyond, other, nearest), torch.where(beyond, nearest, other)
