"""Parameters with more rows than the base's: a resized vocabulary (SPEC §9.2, 1.5).

A fine-tune that adds tokens has embedding and head tables (and a head's bias) with more rows
than its base's. Stored whole, such a table costs its full size whatever the method (a ``bits=0.5``
delta of a small model came out at 28 bits per weight). Instead the entry records the base's row
count (``base_rows``): the delta is added to the base extended with zero rows, so the old rows
carry the method's edit of their delta and the new rows their values.

The method never sees the new rows (they are values, not deltas: DARE would drop them, a sign
would flatten them): it edits the old rows' delta, the new rows zeroed, and the new rows are
stored beside it as one more part, a ``rows-q`` at `NEW_ROW_BITS` bits, in a ``sum``
(§5.11). What that part stores is what the method's edit leaves of the new rows (nothing, for
every method here but a per-tensor sign), so the new rows are exact up to their 8-bit codes.
"""

from __future__ import annotations

import torch

from ..core.constants import MAX_ADDED_ROWS
from ..core.encodings import QuantizedRowsEncoding, SumEncoding
from ..core.encodings.sum import MAX_PARTS
from ..methods.allocation import header_bits
from ..methods.base import Edit

NEW_ROW_BITS = 8
"""Bits of the new rows' codes: values, not deltas, so they get the widest codes (0.4 % of a
row's largest entry at most, per group of `NEW_ROW_GROUP`)."""
NEW_ROW_GROUP = 64


def grown_rows(base_shape: tuple[int, ...], shape: tuple[int, ...]) -> int | None:
    """The base's row count where ``shape`` only adds rows to ``base_shape`` (a resized vocabulary),
    at most as many as SPEC §8.1 allows; None otherwise (same shape, or another change: those are
    stored whole)."""
    base_shape, shape = tuple(base_shape), tuple(shape)
    if not shape or len(base_shape) != len(shape) or base_shape[1:] != shape[1:]:
        return None
    rows = base_shape[0]
    return rows if rows < shape[0] <= rows + max(rows, MAX_ADDED_ROWS) else None


def new_rows_bits(name: str, new_rows: int, cols: int) -> int:
    """An upper bound on what `with_new_rows` adds to a parameter's stored bytes, in bits: the
    codes, float32 scales, the row indices, three header entries, and the ``"<i>."`` prefix the
    method's own stored tensors get as parts of a ``sum``."""
    values = new_rows * cols
    scales = -(-values // NEW_ROW_GROUP)
    return NEW_ROW_BITS * values + 32 * scales + 32 * new_rows + 3 * header_bits(name) + 8 * 2 * 3 * MAX_PARTS


def padded(base: torch.Tensor, rows: int) -> torch.Tensor:
    """``base`` extended with zero rows to ``rows`` rows (what a grown entry's delta is added to)."""
    out = base.new_zeros((rows, *base.shape[1:]))
    out[: base.shape[0]] = base
    return out


def with_new_rows(edit: Edit, delta: torch.Tensor, base_rows: int, name: str) -> Edit | None:
    """``edit`` (of the old rows' delta, new rows zeroed) plus the new rows of ``delta`` (the full
    delta against the zero-extended base) as a ``rows-q`` part; None where that cannot be stored as
    one delta entry (a value encoding, a lossless edit that would turn lossy, a ``sum`` that is
    already full): the parameter is then stored whole."""
    if edit.dropped:
        parts, stored, decoded = [], [], None
    elif not edit.encoding.is_delta or edit.lossless:
        return None
    elif isinstance(edit.encoding, SumEncoding):
        if len(edit.encoding.parts) >= MAX_PARTS:
            return None
        parts, stored = list(edit.encoding.parts), edit.encoding.split(edit.stored)
        decoded = edit.decode(tuple(delta.shape), name, delta.dtype)
    else:
        parts, stored = [edit.encoding], [edit.stored]
        decoded = edit.decode(tuple(delta.shape), name, delta.dtype)
    rows = delta.shape[0]
    new = delta.reshape(rows, -1)[base_rows:]
    if decoded is not None:  # what the edit already puts there (a per-tensor sign's scale)
        new = new - decoded.reshape(rows, -1)[base_rows:]
    encoding = QuantizedRowsEncoding(NEW_ROW_BITS, NEW_ROW_GROUP, rows - base_rows)
    own = encoding.encode(new, name=name, rows=torch.arange(rows - base_rows))  # the new rows alone...
    own[encoding.ROWS] = torch.arange(base_rows, rows, dtype=torch.int32)  # ...are rows base_rows.. of the table
    stats = {**edit.stats, "new_rows": rows - base_rows, "new_row_bits": NEW_ROW_BITS}
    if not parts:
        return Edit(encoding, own, stats)
    total = SumEncoding([*parts, encoding])
    return Edit(total, total.join([*stored, own]), stats)
