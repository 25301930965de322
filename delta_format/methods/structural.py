"""``structural``: keep whole rows (or columns) of the delta, those with the largest norm.

Row (output-unit) or column (input-feature) pruning drops entire slices, which structured
kernels can skip. The kept entries are stored exactly (no rescale).

Encoding choice: spec 1.0 has no "kept rows" index coding, so the kept entries are stored as a
``sparse`` tensor with the cheaper explicit coding for their flat positions (`index_coding_bytes`).
For row pruning that is almost always the bitmask: gaps inside a kept row are 0, but the jump over
dropped rows is a multiple of the row length, which forces wide (I32) gaps for every entry,
whereas the bitmask costs 1 bit per element, an overhead of ``1 / (16 (1 - p))`` over bf16
values (12.5 % at p = 0.5). A row-index coding (one integer per kept row) is the natural addition
for a future minor version; the bytes of kept values would not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.bits import packed_length
from ..core.constants import INDEX_BITMASK
from ..core.encodings import SparseEncoding
from ..errors import InvalidArgumentError
from .base import Edit, EditMethod, TensorContext, check_drop_rate, drop_rate, kept_count, param, scattered
from .magnitude import explicit_sparse_edit, top_positions

AXES = ("row", "column")


@dataclass
class StructuralMethod(EditMethod, name="structural"):
    """Keep the ``1 - p`` fraction of rows (``axis="row"``) or columns with the largest L2 norm;
    vectors are pruned entry by entry (a vector's rows are its entries).

    Example:
        >>> delta = torch.tensor([[1.0, 1.0], [0.1, 0.1], [-2.0, 0.0]])
        >>> edit = StructuralMethod(p=0.5).edit("w", delta, TensorContext("w"))
        >>> edit.encoding.decode(edit.stored, (3, 2), "w", torch.float32).tolist()
        [[1.0, 1.0], [0.0, 0.0], [-2.0, 0.0]]
    """

    summary: ClassVar[str] = "keep whole rows or columns"
    tags: ClassVar[tuple[str, ...]] = ("pruning",)
    p: float = drop_rate(0.5, "rows (or columns) of each matrix")
    axis: str = param("row", help="prune whole rows or columns", choices=AXES)

    def __post_init__(self):
        self.p = check_drop_rate(self.name, self.p)
        if self.axis not in AXES:
            raise InvalidArgumentError("structural: unknown axis", expected=AXES, found=repr(self.axis))

    def edit(self, name: str, delta: torch.Tensor, context: TensorContext) -> Edit:
        rows = delta.shape[0] if delta.dim() else 1
        matrix = delta.reshape(rows, -1)
        cols = matrix.shape[1]
        axis = self.axis if delta.dim() >= 2 else "row"
        if axis == "row":
            kept = top_positions(torch.linalg.vector_norm(matrix.float(), dim=1), kept_count(rows, self.p))
            where, laid_out = (kept,), (kept.numel(), cols)
        else:
            kept = top_positions(torch.linalg.vector_norm(matrix.float(), dim=0), kept_count(cols, self.p))
            where, laid_out = (slice(None), kept), (rows, kept.numel())
        if packed_length(delta.numel()) < math.prod(laid_out):  # the bitmask wins (see cheaper_index_coding)
            edit = _bitmask_of_slices(matrix, where, laid_out, context)
        else:
            if axis == "row":
                positions = (kept.unsqueeze(1) * cols + torch.arange(cols)).reshape(-1)
            else:
                positions = (torch.arange(rows).unsqueeze(1) * cols + kept.unsqueeze(0)).reshape(-1)
            edit = explicit_sparse_edit(name, delta, positions, context)
        edit.stats.update(axis=axis, kept_slices=int(kept.numel()))
        return edit


def _bitmask_of_slices(matrix: torch.Tensor, where: tuple, laid_out: tuple[int, int], context: TensorContext) -> Edit:
    """What `explicit_sparse_edit` stores with a bitmask for the entries of whole rows or columns
    (``matrix[where]``), built from the slices rather than from a list of their flat positions."""
    encoding = SparseEncoding(INDEX_BITMASK)
    mask = torch.zeros(matrix.shape, dtype=torch.bool, device=matrix.device)
    mask[where] = True
    values = matrix[where].reshape(-1)  # row-major, as positions ascend
    stored = encoding.encode(matrix, dtype=context.value_dtype, values=values, keep=mask)
    values = stored[encoding.VALUES]
    return Edit(
        encoding,
        stored,
        {"kept": int(values.numel()), "index_coding": INDEX_BITMASK},
        decoder=scattered(encoding, values, tuple(matrix.shape), where, laid_out),
    )
