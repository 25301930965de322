"""``sparse``: kept values plus where they go, times a rescale (SPEC §5.2).

Role ``values`` holds the kept delta entries in ascending flat (row-major) position order.
Where they go is one of three index codings:

* ``gaps``: role ``gaps`` (``U8``/``U16``/``I32``/``I64``), the number of skipped elements before
  each kept one, so ``index[0] = gaps[0]`` and ``index[i] = index[i-1] + gaps[i] + 1``;
* ``bitmask``: role ``mask``, one bit per element (`delta_format.core.bits` order), 1 = kept;
* ``seeded``: nothing stored; positions come from `delta_format.core.seeded_mask` with the config's
  ``seed`` and ``p`` and the parameter name.

Decoded: ``scale * scatter(values)``, zero elsewhere. DARE stores the raw kept entries and puts
its rescale ``k / (1 - p)`` (or DAREx-q's ``1 / q``) in ``scale``, so the rescale can be
changed without touching the tensors.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import torch

from ..bits import check_packed, count_bits, pack_bits, packed_length
from ..constants import GAP_DTYPES, INDEX_BITMASK, INDEX_CODINGS, INDEX_GAPS, INDEX_SEEDED, SPARSE
from ...errors import CorruptDeltaError, InvalidArgumentError, ManifestError, UnknownEncodingError
from ..seeded_mask import drop_threshold, gap_table, iter_kept_positions, kept_positions
from ..dtypes import FLOAT_STORED
from .base import (
    Encoding, Expected, RowDelta, check_config_keys, config_int, config_number, matrix_shape, require_finite,
)

_GAP_TORCH = ((255, torch.uint8), (65535, torch.uint16), (2**31 - 1, torch.int32), (2**63 - 1, torch.int64))


def positions_to_gaps(indices: torch.Tensor) -> torch.Tensor:
    """Sorted unique flat indices -> gaps in the narrowest dtype that holds the largest gap."""
    indices = indices.to(torch.int64)
    if indices.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    prev = torch.cat([indices.new_full((1,), -1), indices[:-1]])
    gaps = indices - prev - 1
    largest = int(gaps.max())
    dtype = next(dt for limit, dt in _GAP_TORCH if largest <= limit)
    return gaps.to(dtype)


_BLOCK = 1 << 16
"""Positions per block when a delta is walked front to back (cache-sized)."""


def _run_past(name: str, numel: int, index: int) -> CorruptDeltaError:
    return CorruptDeltaError(f"sparse indices of {name!r} run past the tensor", expected=f"indices < {numel}",
                             found=f"index {index}", fix="the delta is corrupt; re-create it")


def gap_blocks(gaps: torch.Tensor, numel: int, name: str, block: int = _BLOCK) -> Iterator[torch.Tensor]:
    """Positions from stored gaps, a block at a time, refusing negative gaps and positions past
    the end. (A gap below ``numel`` keeps every partial sum below 2**63: no wrap-around.)"""
    last = -1
    for first in range(0, gaps.numel(), block):
        wide = gaps[first : first + block].to(torch.int64, copy=True)
        low, high = torch.aminmax(wide)
        if int(low) < 0:
            raise CorruptDeltaError(
                f"sparse gaps of {name!r} are negative", expected="gaps >= 0 (indices sorted and unique)",
                found=f"minimum gap {int(low)}", fix="the delta is corrupt; re-create it",
            )
        if int(high) >= numel:
            raise _run_past(name, numel, last + 1 + int(high))
        positions = wide.add_(1).cumsum_(0).add_(last)
        last = int(positions[-1])
        yield positions


def bitmask_blocks(mask: torch.Tensor, numel: int, block: int = _BLOCK * 8) -> Iterator[torch.Tensor]:
    """Positions of the set bits of a packed mask, ``block`` elements (a multiple of 8) at a time."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    for first in range(0, numel, block):
        last = min(numel, first + block)
        bits = (mask[first // 8 : (last + 7) // 8].unsqueeze(1) >> shifts) & 1
        yield bits.view(-1)[: last - first].nonzero().view(-1).add_(first)


def index_coding_bytes(indices: torch.Tensor, numel: int) -> dict[str, int]:
    """Bytes each explicit index coding would take for these positions (choose the cheaper)."""
    gaps = positions_to_gaps(indices)
    return {INDEX_GAPS: gaps.numel() * gaps.element_size(), INDEX_BITMASK: packed_length(numel)}


class SparseEncoding(Encoding):
    """Kept values with an index coding and a rescale.

    Example:
        >>> enc = SparseEncoding("seeded", scale=2.0, seed=1, p=0.5)
        >>> delta = torch.arange(8.0)
        >>> stored = enc.encode(delta, name="w")
        >>> restored = enc.decode(stored, (8,), "w", torch.float32)
        >>> bool(((restored == 0) | (restored == 2 * delta)).all())
        True
    """

    name = SPARSE

    def __init__(self, index_coding: str, scale: float = 1.0, seed: int | None = None, p: float | None = None):
        if index_coding not in INDEX_CODINGS:
            raise UnknownEncodingError("unknown sparse index coding", expected=INDEX_CODINGS, found=repr(index_coding))
        if not math.isfinite(scale):
            raise ManifestError("sparse scale is not finite", expected="a finite number", found=repr(scale))
        if index_coding == INDEX_SEEDED:
            if seed is None or p is None:
                raise ManifestError("seeded sparse coding needs seed and p", expected="both", found=f"seed={seed}, p={p}")
            drop_threshold(p)
        self.index_coding = index_coding
        self.scale = float(scale)
        self.seed = seed
        self.p = None if p is None else float(p)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "SparseEncoding":
        coding = config.get("index_coding") if isinstance(config, Mapping) else None
        if coding == INDEX_SEEDED:
            check_config_keys(cls.name, config, {"index_coding", "seed", "p"}, {"scale"})
            p = config_number(cls.name, config, "p")
            if not 0.0 <= p < 1.0:
                raise ManifestError("seeded sparse p is out of range", expected="0 <= p < 1", found=repr(p))
            try:
                gap_table(p)
            except InvalidArgumentError as exc:
                raise ManifestError("seeded sparse p cannot be generated", expected=exc.expected, found=exc.found,
                                    fix="re-create the delta with a smaller p or an explicit index coding") from None
            return cls(coding, config_number(cls.name, config, "scale", 1.0), config_int(cls.name, config, "seed", 0, 2**64), p)
        check_config_keys(cls.name, config, {"index_coding"}, {"scale"})
        if coding not in INDEX_CODINGS:
            raise UnknownEncodingError("unknown sparse index coding", expected=INDEX_CODINGS, found=repr(coding))
        return cls(coding, config_number(cls.name, config, "scale", 1.0))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index_coding": self.index_coding, "scale": self.scale}
        if self.index_coding == INDEX_SEEDED:
            out.update(seed=self.seed, p=self.p)
        return out

    def expected(self, shape: tuple[int, ...]) -> dict[str, Expected]:
        roles = {"values": Expected(FLOAT_STORED, (None,))}
        if self.index_coding == INDEX_GAPS:
            roles["gaps"] = Expected(GAP_DTYPES, (None,))
        elif self.index_coding == INDEX_BITMASK:
            roles["mask"] = Expected(("U8",), (packed_length(math.prod(shape)),))
        return roles

    def _check_seeded_count(self, numel: int, count: int, name: str) -> None:
        """Refuse, before generating any position, a value count a seeded mask of this size
        cannot produce (beyond 8 standard deviations): a hostile shape must not make us work."""
        keep = 1.0 - self.p
        mean, sd = numel * keep, math.sqrt(numel * keep * self.p)
        if abs(count - mean) > 8 * sd + 16:
            raise CorruptDeltaError(
                f"sparse values of {name!r} cannot come from a seeded mask of this shape",
                expected=f"about {mean:.0f} values (p={self.p}, {numel} elements)", found=f"{count}",
                fix="the delta is corrupt; re-create it",
            )

    def positions(self, numel: int, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The seeded mask's kept positions (seeded coding only)."""
        return kept_positions(numel, self.p, self.seed, name, device)

    def encode(
        self, delta: torch.Tensor, name: str, indices: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """Store ``delta``'s entries at ``indices`` (sorted, unique; implied by the seed when seeded)."""
        flat = delta.reshape(-1)
        if self.index_coding == INDEX_SEEDED:
            if indices is not None:
                raise ManifestError("seeded coding derives its indices", expected="indices=None", found="indices given")
            indices = self.positions(flat.numel(), name, flat.device)
        elif indices is None:
            raise ManifestError("explicit index codings need indices", expected="a tensor of indices", found="None")
        indices = indices.to(torch.int64)
        stored = {"values": flat[indices].to(dtype or delta.dtype).contiguous()}
        if self.index_coding == INDEX_GAPS:
            stored["gaps"] = positions_to_gaps(indices.cpu()).to(flat.device)
        elif self.index_coding == INDEX_BITMASK:
            mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            mask[indices] = True
            stored["mask"] = pack_bits(mask)
        return stored

    def _blocks(self, stored, numel: int, name: str) -> Iterator[torch.Tensor]:
        """The kept positions as ascending blocks, after the checks that need no walk: finite
        values, a bitmask's bit count, a plausible seeded count (before generating anything)."""
        values = stored["values"]
        require_finite(name, "values", values)
        if self.index_coding == INDEX_GAPS:
            return gap_blocks(stored["gaps"], numel, name)
        if self.index_coding == INDEX_BITMASK:
            check_packed(stored["mask"], numel)
            if count_bits(stored["mask"]) != values.numel():
                raise CorruptDeltaError(
                    f"sparse bitmask of {name!r} disagrees with its values",
                    expected=f"{values.numel()} set bits", found=f"{count_bits(stored['mask'])}",
                    fix="the delta is corrupt; re-create it",
                )
            return bitmask_blocks(stored["mask"], numel)
        self._check_seeded_count(numel, values.numel(), name)
        return iter_kept_positions(numel, self.p, self.seed, name, values.device)

    def _scaled(self, values: torch.Tensor, dtype: torch.dtype, alpha: float = 1.0) -> torch.Tensor:
        """``alpha * (scale * values)`` in ``dtype``, each product rounded (SPEC §9)."""
        values = values.to(dtype)
        if self.scale != 1.0:
            values = values * self.scale
        return values * alpha if alpha != 1.0 else values

    def decode(self, stored, shape, name, dtype):
        numel = math.prod(shape)
        values = stored["values"]
        positions = torch.cat([*self._blocks(stored, numel, name), torch.empty(0, dtype=torch.int64, device=values.device)])
        if positions.numel() and int(positions[-1]) >= numel:
            raise _run_past(name, numel, int(positions[-1]))
        check_value_count(name, positions.numel(), values.numel())
        out = torch.zeros(numel, dtype=dtype, device=values.device)
        out[positions] = self._scaled(values, dtype)
        return out.view(shape)

    def rows(self, stored, shape, name, dtype, alpha=1.0):
        # O(kept): only the kept positions of the accumulator change. Same bits as decode + add
        # except the sign of a base -0.0, which adding +0.0 would flip (SPEC §9 allows either).
        numel = math.prod(shape)
        return SparseRows(self._blocks(stored, numel, name), stored["values"], matrix_shape(tuple(shape))[1], numel, name,
                          lambda v: self._scaled(v, dtype, alpha))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SparseEncoding) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        return f"SparseEncoding({self.to_dict()})"


def check_value_count(name: str, positions: int, values: int) -> None:
    if positions != values:
        raise CorruptDeltaError(
            f"sparse values of {name!r} do not match their indices", expected=f"{positions} values", found=f"{values}",
            fix="the delta is corrupt or was written with another seed; re-create it",
        )


class SparseRows(RowDelta):
    """Kept values added a block of rows at a time, walking the positions front to back."""

    def __init__(self, blocks: Iterator[torch.Tensor], values: torch.Tensor, cols: int, numel: int, name: str, scaled):
        self.blocks, self.values, self.cols, self.numel, self.name, self.scaled = blocks, values, cols, numel, name, scaled
        self.pending = torch.empty(0, dtype=torch.int64, device=values.device)
        self.used = 0  # values consumed so far
        self.next_row = 0

    def _take(self, end: int) -> torch.Tensor:
        """The positions below ``end`` not yet taken."""
        taken = []
        while True:
            if self.pending.numel():
                if int(self.pending[-1]) >= end:
                    cut = int(torch.searchsorted(self.pending, end))
                    taken.append(self.pending[:cut])
                    self.pending = self.pending[cut:]
                    break
                taken.append(self.pending)
            self.pending = next(self.blocks, None)
            if self.pending is None:
                self.pending = self.values.new_empty(0, dtype=torch.int64)
                break
        return taken[0] if len(taken) == 1 else torch.cat([*taken, self.pending[:0]])

    def add_rows(self, acc, start, stop):
        if start != self.next_row:
            raise InvalidArgumentError("sparse row blocks out of order", expected=f"a block starting at row {self.next_row}",
                                       found=f"row {start}", fix="add row blocks front to back")
        self.next_row = stop
        first = start * self.cols
        positions = self._take(stop * self.cols)
        count = positions.numel()
        if self.used + count > self.values.numel():
            check_value_count(self.name, self.used + count + sum(b.numel() for b in self._rest()), self.values.numel())
        kept = self.scaled(self.values[self.used : self.used + count])
        self.used += count
        acc.view(-1).index_add_(0, positions.sub_(first) if first else positions, kept)

    def _rest(self) -> Iterator[torch.Tensor]:
        yield self._take(self.numel)
        yield from self.blocks  # positions past the end (gaps only)

    def finish(self):
        rest = self._take(self.numel)
        if self.pending.numel() or next(self.blocks, None) is not None:
            raise _run_past(self.name, self.numel, int(self.pending[0]) if self.pending.numel() else self.numel)
        check_value_count(self.name, self.used + rest.numel(), self.values.numel())
