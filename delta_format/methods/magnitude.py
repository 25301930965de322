"""``magnitude`` and ``importance``: keep the largest entries, drop the rest (no rescale).

Importance-based pruning keeps the fraction ``1 - p`` of entries with the largest score and
stores them exactly. The score is ``|Δ_ij|`` (``magnitude``), or ``|Δ_ij| * ||x_j||`` with
``||x_j||`` the norm of input feature ``j`` over the calibration tokens (``importance``, as in
Wanda): an entry that meets large inputs moves the outputs more. DAREx finds these beat random
dropping when deltas are large.

The kept positions are data-dependent, so they are stored, with whichever explicit index coding
is cheaper for them (`index_coding_bytes`): delta-coded gaps (1 byte per kept entry while gaps
stay under 256, so below ~p = 0.99) or a bitmask (1 bit per entry, cheaper when more than about
1/8 of the entries are kept with wide gaps). With ``value_bits`` of 1-8 the kept values are
stored as codes with a 16-bit scale per 64 (``sparse-q`` with the same index coding), as DARE's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.bits import packed_length
from ..core.constants import INDEX_BITMASK
from ..core.encodings import SparseEncoding, index_coding_bytes
from .base import Edit, EditMethod, TensorContext, check_drop_rate, drop_rate, kept_count
from .dare import check_value_bits, stored_sparse, value_bits_param

_SAMPLE = 1 << 16
"""Entries sampled (strided) to bracket a k-th largest value."""
_DIRECT = 1 << 17
"""Up to this many entries one ``kthvalue`` over all of them is as cheap as bracketing."""


def _bracket(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two values ``lo <= hi`` that enclose the ``k``-th largest of ``flat`` with high
    probability: quantiles of a strided sample, widened by several binomial standard deviations
    (``-inf`` / ``inf`` where that runs off the sample). Callers check that they do."""
    n = flat.numel()
    sample = flat[:: max(n // _SAMPLE, 1)].contiguous()
    m = sample.numel()
    rank = (n - k + 1) / n  # ascending fraction of the target
    margin = 6 * math.sqrt(rank * (1 - rank) / m) + 2 / m
    lo_i, hi_i = math.floor((rank - margin) * m), math.ceil((rank + margin) * m)
    lo = sample.kthvalue(lo_i + 1).values if lo_i >= 0 else flat.new_tensor(-math.inf)
    hi = sample.kthvalue(hi_i + 1).values if hi_i < m else flat.new_tensor(math.inf)
    return lo, hi


def _kth_in_bracket(values: torch.Tensor, k: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor | None:
    """The ``k``-th largest of ``values`` if it lies in ``[lo, hi]`` (a small ``kthvalue`` over
    what lies there), else None."""
    need = k - int(torch.count_nonzero(values > hi))
    if need <= 0:
        return None
    band = values[(values >= lo) & (values <= hi)]
    if need > band.numel():
        return None
    return band.kthvalue(band.numel() - need + 1).values


def _has_nan(flat: torch.Tensor) -> bool:
    return bool(torch.isnan(flat.max()))  # NaN propagates through max


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The exact ``k``-th largest value of a 1-D tensor (``1 <= k <= n``; NaN counts as the
    largest, as in ``kthvalue``).

    Large tensors first bracket it between two quantiles of a strided sample (`_bracket`),
    count what lies above the bracket, and select inside it: vectorised comparisons and a small
    ``kthvalue`` instead of a single-threaded quickselect over everything. If the bracket misses
    (it practically never does), the plain ``kthvalue`` decides.
    """
    n = flat.numel()
    if n > _DIRECT and not _has_nan(flat):
        found = _kth_in_bracket(flat, k, *_bracket(flat, k))
        if found is not None:
            return found
    return flat.kthvalue(n - k + 1).values


def _end_of_first(values: torch.Tensor, value: torch.Tensor, count: int, block: int = 1 << 18) -> int | None:
    """The position just past the ``count``-th entry of ``values`` equal to ``value`` (``count >=
    1``), or None if there are fewer: compared block by block, so finding the first few ties
    costs a few blocks, not a pass over everything."""
    start = 0
    while start < values.numel():
        ties = values[start : start + block] == value
        found = int(torch.count_nonzero(ties))
        if found >= count:
            return start + int(ties.nonzero()[count - 1]) + 1
        count -= found
        start += block
    return None


def _keep_top(values: torch.Tensor, k: int, threshold: torch.Tensor) -> torch.Tensor:
    """Bool mask of the ``k`` entries to keep given the ``k``-th largest value: everything above
    it, then the first of those equal to it (all of them if fewer, which only NaN scores cause)."""
    keep = values > threshold
    missing = k - int(torch.count_nonzero(keep))
    if missing > 0:
        end = _end_of_first(values, threshold, missing) or values.numel()
        keep[:end] |= values[:end] == threshold
    return keep


def top_selection(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sorted flat positions of the ``k`` largest scores (ties broken by position), and the same
    selection as a bool mask over all scores where one was built on the way (else None).

    O(n) and several times faster than ``torch.topk``. Large tensors first bracket the ``k``-th
    largest score (`_bracket`). If more than ``k`` scores exceed the bracket's low end ``lo``,
    the ``k`` largest are among them: their positions (a little more than ``k``) are all that is
    examined further. Otherwise the ``k``-th largest is ``lo`` itself if enough scores equal it,
    which is the case of a delta with many exact zeros: everything above ``lo`` is kept, then
    the first ties. Small tensors, or a bracket that misses, take a threshold (`kth_largest`)
    and one comparison.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.arange(n), None
    if k <= 0:
        return torch.empty(0, dtype=torch.int64), None
    if n > _DIRECT and not _has_nan(flat):
        lo, hi = _bracket(flat, k)
        above = flat > lo
        count = int(torch.count_nonzero(above))
        if count >= k:
            candidates = above.nonzero().view(-1)
            del above
            values = flat[candidates]
            threshold = _kth_in_bracket(values, k, lo, hi)
            if threshold is None:
                threshold = kth_largest(values, k)
            return candidates[_keep_top(values, k, threshold)], None
        end = _end_of_first(flat, lo, k - count)
        if end is not None:  # the k-th largest is lo: keep what is above it, then the first ties
            above[:end] |= flat[:end] == lo
            return above.nonzero().view(-1), above
    keep = _keep_top(flat, k, kth_largest(flat, k))
    return keep.nonzero().view(-1), keep


def top_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat positions of the ``k`` largest scores, ties broken by position (`top_selection`)."""
    return top_selection(scores, k)[0]


def cheaper_index_coding(positions: torch.Tensor, numel: int) -> str:
    """The explicit index coding with fewer bytes for these positions (gaps on a tie). Gaps take
    at least a byte per kept entry, so a smaller bitmask wins without building them."""
    if packed_length(numel) < positions.numel():
        return INDEX_BITMASK
    costs = index_coding_bytes(positions, numel)
    return min(costs, key=costs.get)


def explicit_sparse_edit(
    name: str,
    delta: torch.Tensor,
    positions: torch.Tensor,
    context: TensorContext,
    scale: float = 1.0,
    mask: torch.Tensor | None = None,
    value_bits: int = 16,
) -> Edit:
    """Store ``delta`` at ``positions`` with the cheaper explicit index coding (`dare.stored_sparse`:
    floats, or ``value_bits``-bit codes; ``mask``, the positions as a bool tensor, if the caller has it)."""
    coding = cheaper_index_coding(positions, delta.numel())
    stats = {"kept": int(positions.numel()), "index_coding": coding}
    return stored_sparse(SparseEncoding(coding, scale=scale), name, delta, positions, context, stats, value_bits, mask)


@dataclass
class MagnitudeMethod(EditMethod, name="magnitude"):
    """Keep the ``1 - p`` fraction of entries with the largest ``|Δ|``.

    Example:
        >>> delta = torch.tensor([0.1, -3.0, 0.2, 2.0])
        >>> edit = MagnitudeMethod(p=0.5).edit("w", delta, TensorContext("w"))
        >>> edit.encoding.decode(edit.stored, (4,), "w", torch.float32).tolist()
        [0.0, -3.0, 0.0, 2.0]
    """

    summary: ClassVar[str] = "keep the largest entries"
    tags: ClassVar[tuple[str, ...]] = ("pruning",)
    p: float = drop_rate(0.9)
    value_bits: int = value_bits_param()

    def __post_init__(self):
        self.p = check_drop_rate(self.name, self.p)
        self.value_bits = check_value_bits(self.name, self.value_bits)

    def scores(self, delta: torch.Tensor, context: TensorContext) -> tuple[torch.Tensor, str]:
        return delta.abs(), "magnitude"

    def edit(self, name: str, delta: torch.Tensor, context: TensorContext) -> Edit:
        scores, criterion = self.scores(delta, context)
        positions, mask = top_selection(scores, kept_count(delta.numel(), self.p))
        edit = explicit_sparse_edit(name, delta, positions, context, mask=mask, value_bits=self.value_bits)
        edit.stats["criterion"] = criterion
        return edit


@dataclass
class ImportanceMethod(MagnitudeMethod, name="importance"):
    """Keep the ``1 - p`` fraction with the largest ``|Δ_ij| * ||x_j||`` (activation-aware);
    parameters without layer inputs (vectors, embeddings) fall back to ``|Δ|``."""

    summary: ClassVar[str] = "keep the entries moving the outputs most"

    def needs_calibration(self) -> bool:
        return True

    def scores(self, delta: torch.Tensor, context: TensorContext) -> tuple[torch.Tensor, str]:
        scores = context.activations.importance(delta) if context.activations is not None else None
        if scores is None:
            return delta.abs(), "magnitude (no layer inputs)"
        return scores, "|delta| * input norm"
