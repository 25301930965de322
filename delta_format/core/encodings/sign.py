"""``sign``: one bit per element plus a scale per tensor or per row (SPEC §5.3, BitDelta).

Roles: ``bits`` (uint8, ``ceil(numel / 8)`` bytes, bit order of `delta_format.core.bits`; bit 1 means
``+scale``, bit 0 means ``-scale``) and ``scale`` (float, shape ``[1]`` or ``[rows]``).
Decoded: ``scale[row] * (2 * bit - 1)``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..bits import check_packed, pack_bits, packed_length, sign_table as _sign_table
from ..constants import SIGN
from ...errors import ManifestError
from ..dtypes import FLOAT_STORED
from .base import Encoding, Expected, RowDelta, check_config_keys, matrix_shape, require_finite, rows_cols

GRANULARITIES = ("tensor", "row")


class SignEncoding(Encoding):
    """Sign bits with a per-tensor or per-row scale.

    Example:
        >>> enc = SignEncoding("row")
        >>> delta = torch.tensor([[0.5, -1.0], [2.0, 3.0]])
        >>> enc.decode(enc.encode(delta), (2, 2), "w", torch.float32).tolist()
        [[0.75, -0.75], [2.5, 2.5]]
    """

    name = SIGN

    def __init__(self, granularity: str = "tensor"):
        if granularity not in GRANULARITIES:
            raise ManifestError("unknown sign scale granularity", expected=GRANULARITIES, found=repr(granularity))
        self.granularity = granularity

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "SignEncoding":
        check_config_keys(cls.name, config, {"scale"}, set())
        return cls(config["scale"])

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.granularity}

    def _scale_len(self, shape: tuple[int, ...]) -> int:
        if self.granularity == "tensor":
            return 1
        if len(shape) < 2:
            raise ManifestError(
                "per-row sign scales need a matrix", expected="a parameter with 2 or more dimensions",
                found=f"shape {list(shape)}", fix="use scale 'tensor' for vectors",
            )
        return shape[0]

    def expected(self, shape: tuple[int, ...]) -> dict[str, Expected]:
        return {
            "bits": Expected(("U8",), (packed_length(math.prod(shape)),)),
            "scale": Expected(FLOAT_STORED, (self._scale_len(shape),)),
        }

    def initial_scale(self, delta: torch.Tensor) -> torch.Tensor:
        """BitDelta's initial scale: mean |delta| over the tensor or over each row (float32)."""
        d = delta.float()
        if d.numel() == 0:  # the mean of nothing is NaN, which no reader accepts; any scale decodes the same
            return torch.zeros(self._scale_len(tuple(delta.shape)))
        if self.granularity == "tensor":
            return d.abs().mean().reshape(1)
        self._scale_len(tuple(delta.shape))
        return d.reshape(delta.shape[0], -1).abs().mean(dim=1)

    def encode(
        self, delta: torch.Tensor, scale: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float32
    ) -> dict[str, torch.Tensor]:
        """Bits from ``delta >= 0``; scale given or `initial_scale`."""
        if scale is None:
            scale = self.initial_scale(delta)
        return {"bits": pack_bits(delta >= 0), "scale": scale.reshape(-1).to(scale_dtype).contiguous()}

    def decode(self, stored, shape, name, dtype):
        numel = math.prod(shape)
        bits = stored["bits"]
        check_packed(bits, numel)
        scale = stored["scale"]
        require_finite(name, "scale", scale)
        # One gather from a 256 x 8 table of +-1 turns each byte into its 8 signs.
        table = _sign_table(dtype, bits.device)
        index = bits.to(torch.int32)
        if self.granularity == "tensor":
            return torch.index_select(table * scale.to(dtype), 0, index).view(-1)[:numel].view(shape)
        rows, cols = rows_cols(shape)
        signs = torch.index_select(table, 0, index).view(-1)[:numel].view(rows, cols)
        return signs.mul_(scale.to(dtype).view(rows, 1)).view(shape)

    def rows(self, stored, shape, name, dtype, alpha=1.0):
        check_packed(stored["bits"], math.prod(shape))
        require_finite(name, "scale", stored["scale"])
        return SignRows(stored["bits"], stored["scale"], self.granularity, shape, dtype, alpha)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SignEncoding) and other.granularity == self.granularity

    def __repr__(self) -> str:
        return f"SignEncoding({self.granularity!r})"


class SignRows(RowDelta):
    """Sign bits expanded a block of rows at a time: ``acc += signs * (alpha * scale)``.

    ``alpha * (scale * sign)`` and ``sign * (alpha * scale)`` round identically (multiplying by
    +-1 is exact and rounding is symmetric), so the scale is multiplied by alpha once per row.
    """

    def __init__(self, bits: torch.Tensor, scale: torch.Tensor, granularity: str, shape, dtype: torch.dtype, alpha: float):
        self.bits = bits
        self.cols = matrix_shape(tuple(shape))[1]
        scale = scale.to(dtype)
        if alpha != 1.0:
            scale = scale * alpha
        self.row_scale = scale.view(-1, 1) if granularity == "row" else None
        # Per-tensor scale: fold it into the 256 x 8 table, so a block is one gather and one add.
        self.table = _sign_table(dtype, bits.device) * (scale if self.row_scale is None else 1)

    def add_rows(self, acc, start, stop):
        first, last = start * self.cols, stop * self.cols
        signs = torch.index_select(self.table, 0, self.bits[first // 8 : (last + 7) // 8].to(torch.int32))
        signs = signs.view(-1)[first % 8 : first % 8 + last - first].view(stop - start, self.cols)
        if self.row_scale is None:
            acc.add_(signs)
        else:
            acc.addcmul_(signs, self.row_scale[start:stop])
