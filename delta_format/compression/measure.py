"""What the compressor measures about what it stored: bytes, the relative error of each edit,
the totals over the model, and (with calibration texts) the edited model's loss change.

Every error is measured on what was stored, decoded the way a reader decodes it, so the manifest's
numbers describe the delta on disk and not the method's intentions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..core.dtypes import TORCH_DTYPES
from ..core.manifest import TensorEntry
from ..methods import TensorContext
from ..methods.base import Edit

if TYPE_CHECKING:
    from .calibration import Calibration


def stored_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors an entry stores (what its shard grows by, headers aside)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class EditError:
    """Squared norms of one edit's error ``decoded - Δ`` and of ``Δ`` itself (float64 sums, so
    the model's relative error adds tensors up before the square root)."""

    error_sq: float
    delta_sq: float

    @property
    def relative(self) -> float:
        """``||decoded - Δ|| / ||Δ||`` (0 for an all-zero delta)."""
        return math.sqrt(self.error_sq / self.delta_sq) if self.delta_sq > 0 else 0.0


def edit_error(edit: Edit, decoded: torch.Tensor | None, delta: torch.Tensor) -> EditError:
    """The error of ``edit`` given its ``decoded`` delta (None for a lossless edit, whose error is
    zero by construction). ``decoded`` is consumed: the difference is taken in place."""
    error_sq = 0.0
    if not edit.lossless:
        if any(decoded.data_ptr() == t.data_ptr() for t in edit.stored.values()):
            decoded = decoded.clone()  # decode may hand back a stored tensor itself
        error_sq = float(torch.linalg.vector_norm(decoded.sub_(delta))) ** 2
    return EditError(error_sq, float(torch.linalg.vector_norm(delta)) ** 2)


def measure_on_model(
    name: str, entry: TensorEntry, decoded: torch.Tensor, context: TensorContext, session: Calibration
) -> float | None:
    """Put the reconstructed parameter into the calibration model (so later tensors are measured
    against the model as it will load), and return the first-order loss change
    ``<∇L(θ_ft), θ̂ - θ_ft>`` of this tensor's edit, also recorded in ``entry.stats``; None when
    the calibration model has no such parameter or no gradient for it."""
    from ..core.reconstruct import reconstruct

    if session.parameter(name) is None:
        return None
    base = context.base if entry.base_rows is None else context.base[: entry.base_rows]  # the padding is §9.2's
    value = reconstruct(name, entry, decoded, base)
    estimate = session.loss_change_estimate(name, value.float() - context.finetune.float())
    if estimate is not None:
        entry.stats["loss_change_estimate"] = estimate
    session.set_parameter(name, value.float())
    return estimate


@dataclass
class Totals:
    """The model-wide numbers of the manifest's ``stats``, added up tensor by tensor."""

    stored_bytes: int = 0
    finetune_bytes: int = 0
    err_sq: float = 0.0
    delta_sq: float = 0.0
    loss_change: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: {"edited": 0, "replaced": 0, "unchanged": 0, "excluded": 0})

    def add_entry(self, entry: TensorEntry, stored: Mapping[str, torch.Tensor], kind: str) -> None:
        """Count an entry about to be written (``kind`` ``edited`` or ``replaced``), and record its
        compression ratio in its stats."""
        nbytes = stored_nbytes(stored)
        finetune_bytes = math.prod(entry.shape) * TORCH_DTYPES[entry.dtype].itemsize
        entry.stats["compression_ratio"] = finetune_bytes / nbytes if nbytes else None
        self.stored_bytes += nbytes
        self.counts[kind] += 1

    def add_error(self, error: EditError) -> None:
        """Add a delta entry's error to the model's (entries that store values whole have none)."""
        self.err_sq += error.error_sq
        self.delta_sq += error.delta_sq

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stored_bytes": self.stored_bytes, "finetune_bytes": self.finetune_bytes}
        if self.stored_bytes:
            out["compression_ratio"] = self.finetune_bytes / self.stored_bytes
        out["rel_error"] = EditError(self.err_sq, self.delta_sq).relative
        out["tensors"] = dict(self.counts)
        return out
