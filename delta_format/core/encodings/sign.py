"""``sign``: one bit per element plus a scale per tensor or per row (SPEC §5.3, BitDelta).

Roles: ``bits`` (uint8, ``ceil(numel / 8)`` bytes, bit order of `delta_format.core.bits`; bit 1 means
``+scale``, bit 0 means ``-scale``) and ``scale`` (float, shape ``[1]`` or ``[rows]``), or, for
per-row scales with ``scale_bits`` (spec 1.7), the row scales as one quantised sequence (SPEC §5.7):
``scale_codes`` and ``scale_scales``. A 16-bit scale per row costs 16 / cols bits per weight
(4 % at 384 columns); 8-bit codes halve that, 4-bit ones quarter it, for a rounding of each
scale far below the sign's own error.
Decoded: ``scale[row] * (2 * bit - 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import ManifestError
from .. import native
from ..bits import check_packed, expand_signs, pack_bits, packed_length, sign_table, signs_at
from ..constants import SIGN
from ..dtypes import FLOAT_STORED
from ..quant import dequantize, pack_codes, quantize, unpack_codes
from .base import Encoding, Expected, RowDelta, check_config_keys, config_int, matrix_shape, require_finite, scaled
from .dense_q import checked_quant, sequence_roles
from .factor import Factor

GRANULARITIES = ("tensor", "row")


class SignEncoding(Encoding, name=SIGN):
    """Sign bits with a per-tensor or per-row scale.

    Example:
        >>> enc = SignEncoding("row")
        >>> delta = torch.tensor([[0.5, -1.0], [2.0, 3.0]])
        >>> enc.decode(enc.encode(delta), (2, 2), "w", torch.float32).tolist()
        [[0.75, -0.75], [2.5, 2.5]]
    """

    BITS = "bits"
    SCALE = "scale"
    SCALE_CODES = "scale_codes"
    SCALE_SCALES = "scale_scales"

    def __init__(self, granularity: str = "tensor", scale_bits: int | None = None, scale_group: int | None = None):
        if granularity not in GRANULARITIES:
            raise ManifestError("unknown sign scale granularity", expected=GRANULARITIES, found=repr(granularity))
        self.granularity = granularity
        self.scale_bits = self.scale_group = None
        if scale_bits is not None or scale_group is not None:
            if granularity != "row" or scale_bits is None or scale_group is None:
                raise ManifestError(
                    "sign scale codes need per-row scales and both scale_bits and scale_group",
                    expected='{"scale": "row", "scale_bits": b, "scale_group": G}',
                    found=f"scale {granularity!r}, scale_bits {scale_bits!r}, scale_group {scale_group!r}",
                )
            self.scale_bits, self.scale_group = checked_quant(self.name, scale_bits, scale_group)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> SignEncoding:
        check_config_keys(cls.name, config, {"scale"}, {"scale_bits", "scale_group"})
        if "scale_bits" not in config and "scale_group" not in config:
            return cls(config["scale"])
        bits = config_int(cls.name, config, "scale_bits", 1, 9)
        group = config_int(cls.name, config, "scale_group", 1, 2**30 + 1)
        return cls(config["scale"], bits, group)

    def to_dict(self) -> dict[str, Any]:
        if self.scale_bits is None:
            return {"scale": self.granularity}
        return {"scale": self.granularity, "scale_bits": self.scale_bits, "scale_group": self.scale_group}

    def _scale_len(self, shape: tuple[int, ...]) -> int:
        if self.granularity == "tensor":
            return 1
        if len(shape) < 2:
            raise ManifestError(
                "per-row sign scales need a matrix",
                expected="a parameter with 2 or more dimensions",
                found=f"shape {list(shape)}",
                fix="use scale 'tensor' for vectors",
            )
        return shape[0]

    def expected(self, shape: tuple[int, ...]) -> dict[str, Expected]:
        bits = {self.BITS: Expected(("U8",), (packed_length(math.prod(shape)),))}
        if self.scale_bits is None:
            return {**bits, self.SCALE: Expected(FLOAT_STORED, (self._scale_len(shape),))}
        rows = self._scale_len(shape)
        return {**bits, **sequence_roles(self.SCALE_CODES, self.SCALE_SCALES, rows, self.scale_bits, self.scale_group)}

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
        self,
        delta: torch.Tensor,
        *,
        name: str = "",
        dtype: torch.dtype | None = None,
        scale: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Bits from ``delta >= 0``; ``scale`` given (e.g. distilled) or `initial_scale`, stored
        in ``dtype`` (default: ``delta``'s), or, with ``scale_bits``, as codes of absmax group
        scales (float16 where every one is a normal float16 number, else float32; ``dtype`` is
        not used)."""
        if scale is None:
            scale = self.initial_scale(delta)
        bits = pack_bits(delta >= 0)
        if self.scale_bits is None:
            return {self.BITS: bits, self.SCALE: scale.reshape(-1).to(dtype or delta.dtype).contiguous()}
        codes, scales = quantize(scale.reshape(-1).float(), self.scale_bits, self.scale_group, "absmax")
        return {
            self.BITS: bits,
            self.SCALE_CODES: pack_codes(codes, self.scale_bits),
            self.SCALE_SCALES: scales.reshape(-1).contiguous(),
        }

    def _checked(
        self, stored: Mapping[str, torch.Tensor], shape: tuple[int, ...], name: str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sign bits and the scale vector: stored, or decoded from its codes in the compute
        dtype ``dtype`` (SPEC §5.7)."""
        check_packed(stored[self.BITS], math.prod(shape))
        if self.scale_bits is None:
            require_finite(name, self.SCALE, stored[self.SCALE])
            return stored[self.BITS], stored[self.SCALE]
        scales = stored[self.SCALE_SCALES]
        require_finite(name, self.SCALE_SCALES, scales)
        codes = unpack_codes(stored[self.SCALE_CODES], self.scale_bits, self._scale_len(shape), name)
        return stored[self.BITS], dequantize(codes, scales, self.scale_bits, self.scale_group, dtype).reshape(-1)

    def decode(self, stored, shape, name, dtype):
        numel = math.prod(shape)
        bits, scale = self._checked(stored, tuple(shape), name, dtype)
        table = sign_table(dtype, bits.device)
        if self.granularity == "tensor":
            return expand_signs(bits, 0, numel, table * scale.to(dtype)).view(shape)
        rows, cols = matrix_shape(shape)
        return expand_signs(bits, 0, numel, table).view(rows, cols).mul_(scale.to(dtype).view(rows, 1)).view(shape)

    def rows(self, stored, shape, name, dtype, alpha=1.0):
        bits, scale = self._checked(stored, tuple(shape), name, dtype)
        return SignRows(bits, scale, self.granularity, shape, dtype, alpha)

    def factor(self, stored, shape, name, dtype, alpha=1.0, *, compute=torch.float32):
        rows, cols = shape
        bits, scale = self._checked(stored, (rows, cols), name, compute)
        # alpha * (scale * sign) == sign * (alpha * scale): multiplying by +-1 is exact.
        return SignFactor(bits, scaled(scale.to(compute), alpha), rows, cols, dtype)

    def label(self) -> str:
        coded = f", {self.scale_bits}-bit scales" if self.scale_bits is not None else ""
        return f"{self.name}({self.granularity}{coded})"

    def __repr__(self) -> str:
        if self.scale_bits is None:
            return f"SignEncoding({self.granularity!r})"
        return f"SignEncoding({self.granularity!r}, {self.scale_bits}, {self.scale_group})"


class SignRows(RowDelta):
    """Sign bits expanded a block of rows at a time: ``acc += signs * (alpha * scale)``.

    ``alpha * (scale * sign)`` and ``sign * (alpha * scale)`` round identically (multiplying by
    +-1 is exact and rounding is symmetric), so the scale is multiplied by alpha once per row.
    """

    def __init__(
        self, bits: torch.Tensor, scale: torch.Tensor, granularity: str, shape, dtype: torch.dtype, alpha: float
    ):
        self.bits = bits
        self.cols = matrix_shape(tuple(shape))[1]
        self.scale = scale = scaled(scale.to(dtype), alpha).reshape(-1)
        self.row_scale = scale.view(-1, 1) if granularity == "row" else None
        # Per-tensor scale: fold it into the 256 x 8 table, so a block is one gather and one add.
        self.table = sign_table(dtype, bits.device) * (scale if self.row_scale is None else 1)

    def native_part(self):
        return native.SignPart(self.bits, self.scale) if self.scale.dtype == torch.float32 else None

    def add_rows(self, acc, start, stop):
        signs = expand_signs(self.bits, start * self.cols, stop * self.cols, self.table).view(stop - start, self.cols)
        if self.row_scale is None:
            acc.add_(signs)
        else:
            acc.addcmul_(signs, self.row_scale[start:stop])


class SignFactor(Factor):
    """Sign bits (1 bit per weight) and a scale per row or per tensor: ``delta = scale * S``.

    Under 32 tokens on the CPU with the native extension, ``x @ S.T`` comes from a table of each
    token's partial sums over every four bits (`native.sign_product`: 2816 x 1024, 8 tokens,
    0.35-0.8 ms against 0.9-1.3 ms expanded). Otherwise the bits are expanded to a ±1 matrix for
    each call (one gather from a 256 x 8 table), then ``x @ S.T * scale`` or
    ``addcmul(W, S, scale)``."""

    def __init__(self, bits: torch.Tensor, scale: torch.Tensor, rows: int, cols: int, dtype: torch.dtype):
        self.bits, self.rows, self.cols = bits, rows, cols
        self.scale = scale.view(-1, 1) if scale.numel() == rows and rows != 1 else scale.view(1, 1)
        self.scale = self.scale.to(dtype)

    def signs(self, dtype: torch.dtype) -> torch.Tensor:
        table = sign_table(dtype, self.bits.device)
        return expand_signs(self.bits, 0, self.rows * self.cols, table).view(self.rows, self.cols)

    def product(self, x):
        if self.bits.device.type == "cpu":  # a table of partial sums per four columns, no +-1 matrix
            product = native.sign_product(x, self.bits, self.scale.float().view(-1), self.rows, self.cols)
            if product is not None:
                return product
        return F.linear(x, self.signs(x.dtype)).mul_(self.scale.view(-1))

    def merged(self, weight):
        return torch.addcmul(weight, self.signs(weight.dtype), self.scale)

    def gather(self, ids):
        pos = ids.unsqueeze(-1).to(torch.int64) * self.cols + torch.arange(self.cols, device=ids.device)
        signs = signs_at(self.bits, pos, self.scale.dtype)
        scale = self.scale.view(-1)[ids].unsqueeze(-1) if self.scale.numel() > 1 else self.scale.view(())
        return signs.mul_(scale)

    def tensors(self):
        return [self.bits, self.scale]
