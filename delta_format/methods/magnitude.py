"""``magnitude`` and ``importance``: keep the largest entries, drop the rest (no rescale).

Importance-based pruning keeps the fraction ``1 - p`` of entries with the largest score and
stores them exactly. The score is ``|Δ_ij|`` (``magnitude``), or ``|Δ_ij| * ||x_j||`` with
``||x_j||`` the norm of input feature ``j`` over the calibration tokens (``importance``, as in
Wanda): an entry that meets large inputs moves the outputs more. DAREx finds these beat random
dropping when deltas are large.

The kept positions are data-dependent, so they are stored, with whichever explicit index coding
is cheaper for them (`index_coding_bytes`): delta-coded gaps (1 byte per kept entry while gaps
stay under 256, so below ~p = 0.99) or a bitmask (1 bit per entry, cheaper when more than about
1/8 of the entries are kept with wide gaps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..encodings import SparseEncoding, index_coding_bytes
from .base import Edit, EditMethod, TensorContext, check_drop_rate, kept_count


_SAMPLE = 1 << 18


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The exact ``k``-th largest value of a 1-D tensor (``1 <= k <= n``).

    Large tensors first bracket it between two quantiles of a strided sample (with a margin of
    several binomial standard deviations), count what lies above the bracket, and select inside
    it: two vectorised comparisons and a small ``kthvalue`` instead of a single-threaded
    quickselect over everything. If the bracket misses (it practically never does), the plain
    ``kthvalue`` decides.
    """
    n = flat.numel()
    if n <= 4 * _SAMPLE:
        return flat.kthvalue(n - k + 1).values
    sample = flat[:: n // _SAMPLE].sort().values
    m = sample.numel()
    rank = (n - k + 1) / n  # ascending fraction of the target
    margin = 6 * math.sqrt(rank * (1 - rank) / m) + 2 / m
    lo_i, hi_i = math.floor((rank - margin) * m), math.ceil((rank + margin) * m)
    lo = sample[lo_i] if lo_i >= 0 else flat.new_tensor(-math.inf)
    hi = sample[hi_i] if hi_i < m else flat.new_tensor(math.inf)
    need = k - int((flat > hi).sum())
    if need > 0:
        band = flat[(flat >= lo) & (flat <= hi)]
        if need <= band.numel():
            return band.kthvalue(band.numel() - need + 1).values
    return flat.kthvalue(n - k + 1).values


def top_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat positions of the ``k`` largest scores (ties broken by position): a threshold
    (`kth_largest`) and one comparison, O(n) and several times faster than ``torch.topk``."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.arange(n)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64)
    threshold = kth_largest(flat, k)
    keep = flat > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        keep[(flat == threshold).nonzero().view(-1)[:missing]] = True
    return keep.nonzero().view(-1)


def explicit_sparse_edit(name: str, delta: torch.Tensor, positions: torch.Tensor, context: TensorContext,
                         scale: float = 1.0) -> Edit:
    """Store ``delta`` at ``positions`` with the cheaper explicit index coding."""
    costs = index_coding_bytes(positions, delta.numel())
    coding = min(costs, key=costs.get)
    encoding = SparseEncoding(coding, scale=scale)
    stored = encoding.encode(delta, name, indices=positions, dtype=context.value_dtype)
    return Edit(encoding, stored, {"kept": int(positions.numel()), "index_coding": coding}, positions=positions)


@dataclass
class MagnitudeMethod(EditMethod):
    """Keep the ``1 - p`` fraction of entries with the largest ``|Δ|``.

    Example:
        >>> delta = torch.tensor([0.1, -3.0, 0.2, 2.0])
        >>> edit = MagnitudeMethod(p=0.5).edit("w", delta, TensorContext("w"))
        >>> edit.encoding.decode(edit.stored, (4,), "w", torch.float32).tolist()
        [0.0, -3.0, 0.0, 2.0]
    """

    name: ClassVar[str] = "magnitude"
    p: float = 0.9

    def __post_init__(self):
        self.p = check_drop_rate(self.name, self.p)

    def scores(self, delta: torch.Tensor, context: TensorContext) -> tuple[torch.Tensor, str]:
        return delta.abs(), "magnitude"

    def edit(self, name: str, delta: torch.Tensor, context: TensorContext) -> Edit:
        scores, criterion = self.scores(delta, context)
        edit = explicit_sparse_edit(name, delta, top_positions(scores, kept_count(delta.numel(), self.p)), context)
        edit.stats["criterion"] = criterion
        return edit


@dataclass
class ImportanceMethod(MagnitudeMethod):
    """Keep the ``1 - p`` fraction with the largest ``|Δ_ij| * ||x_j||`` (activation-aware);
    parameters without layer inputs (vectors, embeddings) fall back to ``|Δ|``."""

    name: ClassVar[str] = "importance"

    def needs_calibration(self) -> bool:
        return True

    def scores(self, delta: torch.Tensor, context: TensorContext) -> tuple[torch.Tensor, str]:
        scores = context.activations.importance(delta) if context.activations is not None else None
        if scores is None:
            return delta.abs(), "magnitude (no layer inputs)"
        return scores, "|delta| * input norm"
