"""The explicit index codings of ``sparse`` (SPEC §5.2), both ways: sorted flat positions to
stored ``gaps`` (narrowest dtype) and back, and a packed ``bitmask`` back to positions. Positions
come back a block at a time, ascending, so a load walks a sparse delta front to back in
cache-sized pieces, refusing corrupt data (negative gaps, positions past the end) as it goes."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ...errors import CorruptDeltaError
from ..bits import bit_range, packed_length
from ..constants import INDEX_BITMASK, INDEX_GAPS

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


def run_past(name: str, numel: int, index: int) -> CorruptDeltaError:
    return CorruptDeltaError(
        f"sparse indices of {name!r} run past the tensor",
        expected=f"indices < {numel}",
        found=f"index {index}",
        fix="the delta is corrupt; re-create it",
    )


def gap_blocks(gaps: torch.Tensor, numel: int, name: str, block: int = _BLOCK) -> Iterator[torch.Tensor]:
    """Positions from stored gaps, a block at a time, refusing negative gaps and positions past
    the end. (A gap below ``numel`` keeps every partial sum below 2**63: no wrap-around.)"""
    last = -1
    for first in range(0, gaps.numel(), block):
        wide = gaps[first : first + block].to(torch.int64, copy=True)
        low, high = torch.aminmax(wide)
        if int(low) < 0:
            raise CorruptDeltaError(
                f"sparse gaps of {name!r} are negative",
                expected="gaps >= 0 (indices sorted and unique)",
                found=f"minimum gap {int(low)}",
                fix="the delta is corrupt; re-create it",
            )
        if int(high) >= numel:
            raise run_past(name, numel, last + 1 + int(high))
        positions = wide.add_(1).cumsum_(0).add_(last)
        last = int(positions[-1])
        yield positions


def bitmask_blocks(mask: torch.Tensor, numel: int, block: int = _BLOCK * 8) -> Iterator[torch.Tensor]:
    """Positions of the set bits of a packed mask, ``block`` elements (a multiple of 8) at a time."""
    for first in range(0, numel, block):
        yield bit_range(mask, first, min(numel, first + block)).nonzero().view(-1).add_(first)


def index_coding_bytes(indices: torch.Tensor, numel: int) -> dict[str, int]:
    """Bytes each explicit index coding would take for these positions (choose the cheaper)."""
    gaps = positions_to_gaps(indices)
    return {INDEX_GAPS: gaps.numel() * gaps.element_size(), INDEX_BITMASK: packed_length(numel)}
