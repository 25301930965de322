"""``rows-q``: a few rows of a matrix as b-bit codes, every other row's delta zero (SPEC §5.12).

Roles ``rows`` (``I32``, the kept row indices, strictly increasing), ``codes`` and ``scales``
(the kept rows, in that order and concatenated, stored as ``dense-q`` stores a tensor of
``count · cols`` entries). Config ``bits``, ``group``, ``count`` (the number of kept rows).

Why: a fine-tune moves the embedding rows of the tokens it saw and leaves the others alone (or
moves them only by weight decay): an untied input embedding's delta is row-sparse, where low rank
(it is full rank) and DARE (its noise reaches every token that reads a row) both waste bits. On
the MiniLM pair the top 4096 of 30522 rows hold 98.6 % of the word embedding's delta energy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...errors import CorruptDeltaError, ManifestError
from ..constants import ROWS_Q
from ..quant import dequantize, pack_codes, quantize, unpack_codes
from .base import Encoding, Expected, RowDelta, check_config_keys, config_int, matrix_shape, require_finite, scaled
from .dense import DenseFactor
from .dense_q import checked_quant, quant_config, sequence_roles

MAX_ROWS = 2**31 - 1
"""Row indices are stored as ``I32``."""


class QuantizedRowsEncoding(Encoding, name=ROWS_Q):
    """``count`` rows of the delta as ``bits``-bit codes with a scale per ``group`` entries; the
    other rows are zero.

    Example:
        >>> enc = QuantizedRowsEncoding(bits=8, group=4, count=1)
        >>> delta = torch.zeros(3, 4); delta[1] = torch.tensor([0.1, -0.2, 0.3, 0.4])
        >>> stored = enc.encode(delta, rows=torch.tensor([1]))
        >>> restored = enc.decode(stored, (3, 4), "w", torch.float32)
        >>> stored["rows"].tolist(), bool((restored - delta).abs().max() < 2e-3)
        ([1], True)
    """

    ROWS = "rows"
    CODES = "codes"
    SCALES = "scales"

    def __init__(self, bits: int, group: int = 64, count: int = 0):
        self.bits, self.group = checked_quant(self.name, bits, group)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_ROWS:
            raise ManifestError("rows-q count is out of range", expected=f"an integer in [0, {MAX_ROWS}]", found=count)
        self.count = count

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> QuantizedRowsEncoding:
        check_config_keys(cls.name, config, {"bits", "group", "count"}, set())
        bits, group = quant_config(cls.name, config)
        return cls(bits, group, config_int(cls.name, config, "count", 0, MAX_ROWS + 1))

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "group": self.group, "count": self.count}

    def expected(self, shape: tuple[int, ...]) -> dict[str, Expected]:
        rows, cols = matrix_shape(tuple(shape))
        if self.count > rows:
            raise ManifestError(
                "rows-q keeps more rows than the parameter has",
                expected=f"count <= {rows} (the parameter's first dimension)",
                found=self.count,
            )
        codes = sequence_roles(self.CODES, self.SCALES, self.count * cols, self.bits, self.group)
        return {self.ROWS: Expected(("I32",), (self.count,)), **codes}

    def encode(
        self,
        delta: torch.Tensor,
        *,
        name: str = "",
        dtype: torch.dtype | None = None,
        rows: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The rows ``rows`` (indices; default: every row with a nonzero entry, at most ``count``
        of them: the config's ``count`` must equal how many are kept) of ``delta`` as codes, scales
        in ``dtype`` (default: float16 where they fit)."""
        matrix = delta.reshape(matrix_shape(tuple(delta.shape)))
        if rows is None:
            rows = matrix.ne(0).any(1).nonzero().view(-1)
        rows = torch.unique(rows.to(torch.int64))  # sorted, strictly increasing
        if rows.numel() != self.count or (rows.numel() and not 0 <= int(rows[0]) <= int(rows[-1]) < matrix.shape[0]):
            raise ManifestError(
                "rows-q rows do not match the config",
                expected=f"{self.count} distinct row indices in [0, {matrix.shape[0]})",
                found=f"{rows.numel()} rows",
            )
        codes, scales = quantize(matrix[rows].reshape(-1), self.bits, self.group, None, dtype)
        return {
            self.ROWS: rows.to(torch.int32),
            self.CODES: pack_codes(codes, self.bits),
            self.SCALES: scales.reshape(-1).contiguous(),
        }

    def kept_rows(self, stored: Mapping[str, torch.Tensor], rows: int, name: str) -> torch.Tensor:
        """The stored row indices as int64, checked strictly increasing and below ``rows``."""
        index = stored[self.ROWS].to(torch.int64)
        if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= rows or bool((index[1:] <= index[:-1]).any())):
            raise CorruptDeltaError(
                f"rows-q row indices of {name!r} are out of order or out of range",
                expected=f"strictly increasing indices in [0, {rows})",
                found=f"first {int(index[0])}, last {int(index[-1])}",
                fix="the delta is corrupt; re-create it",
            )
        return index

    def kept(self, stored, shape, name, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept row indices (int64) and their decoded rows ``[count, cols]`` in ``dtype``,
        every stored byte checked."""
        rows, cols = matrix_shape(tuple(shape))
        require_finite(name, self.SCALES, stored[self.SCALES])
        index = self.kept_rows(stored, rows, name)
        codes = unpack_codes(stored[self.CODES], self.bits, self.count * cols, name)
        values = dequantize(codes, stored[self.SCALES], self.bits, self.group, dtype)
        return index.to(values.device), values.view(self.count, cols)

    def decode(self, stored, shape, name, dtype):
        index, values = self.kept(stored, shape, name, dtype)
        delta = torch.zeros(matrix_shape(tuple(shape)), dtype=dtype, device=values.device)
        delta[index] = values
        return delta.view(shape)

    def rows(self, stored, shape, name, dtype, alpha=1.0):
        # Only the kept rows are decoded and added (SPEC §9 allows skipping the +0.0 of the
        # others): a vocabulary-sized table costs its kept rows, not a full-size temporary.
        index, values = self.kept(stored, shape, name, dtype)
        return KeptRows(index, scaled(values, alpha))

    def factor(self, stored, shape, name, dtype, alpha=1.0, *, compute=torch.float32):
        return DenseFactor(scaled(self.decode(stored, shape, name, compute), alpha).to(dtype))

    def label(self) -> str:
        return f"{self.name}({self.count} rows, {self.bits}b, g{self.group})"


class KeptRows(RowDelta):
    """``acc += delta[start:stop]`` for a delta that is zero outside its (sorted) kept rows."""

    def __init__(self, index: torch.Tensor, values: torch.Tensor):
        self.index, self.values = index, values

    def add_rows(self, acc, start, stop):
        lo, hi = (int(torch.searchsorted(self.index, bound)) for bound in (start, stop))
        if hi > lo:
            acc.index_add_(0, self.index[lo:hi] - start, self.values[lo:hi].to(acc.dtype))
