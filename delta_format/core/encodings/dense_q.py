"""``dense-q``: every delta entry as a b-bit code, one scale per group of entries (SPEC §5.8).

Roles ``codes`` (``U8``, the row-major entries as one stream of `delta_format.core.quant`) and
``scales`` (float, one per ``group`` consecutive entries in row-major order; the last group may be
shorter). For matrices whose delta is spread over every entry (no low-rank structure, no sparsity)
2-4 bits per entry beat 1-bit signs at a little more size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ...errors import InvalidArgumentError, ManifestError
from ..constants import DENSE_Q
from ..dtypes import FLOAT_STORED
from ..quant import (
    check_bits_group,
    dequantize,
    dequantize_range,
    group_count,
    pack_codes,
    packed_bytes,
    quantize,
    unpack_codes,
)
from .base import ComputedRows, Encoding, Expected, check_config_keys, config_int, matrix_shape, require_finite, scaled
from .dense import DenseFactor


def quant_config(name: str, config: Mapping[str, Any]) -> tuple[int, int]:
    """``bits`` and ``group`` of a quantised encoding's config, validated."""
    bits, group = config_int(name, config, "bits", 1, 9), config_int(name, config, "group", 1, 2**30 + 1)
    return bits, group


def checked_quant(name: str, bits: int, group: int) -> tuple[int, int]:
    try:
        return check_bits_group(bits, group)
    except InvalidArgumentError as exc:
        raise ManifestError(f"{name}: {exc.args[0]}", expected=exc.expected, found=exc.found) from None


def sequence_roles(codes: str, scales: str, length: int, bits: int, group: int) -> dict[str, Expected]:
    """The stored tensors of one quantised sequence of ``length`` values (SPEC §5.7)."""
    return {
        codes: Expected(("U8",), (packed_bytes(length, bits),)),
        scales: Expected(FLOAT_STORED, (group_count(length, group),)),
    }


class QuantizedDenseEncoding(Encoding, name=DENSE_Q):
    """Every entry as a ``bits``-bit code with a scale per ``group`` entries.

    Example:
        >>> enc = QuantizedDenseEncoding(bits=4, group=4)
        >>> delta = torch.tensor([[0.1, -0.2, 0.3, 0.0], [1.0, 2.0, 3.0, 4.0]])
        >>> restored = enc.decode(enc.encode(delta), (2, 4), "w", torch.float32)
        >>> float((restored - delta).abs().max()) <= 0.5 * 4 / 7.5  # half a step of the largest group
        True
    """

    CODES = "codes"
    SCALES = "scales"

    def __init__(self, bits: int, group: int = 64):
        self.bits, self.group = checked_quant(self.name, bits, group)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> QuantizedDenseEncoding:
        check_config_keys(cls.name, config, {"bits", "group"}, set())
        return cls(*quant_config(cls.name, config))

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "group": self.group}

    def expected(self, shape: tuple[int, ...]) -> dict[str, Expected]:
        return sequence_roles(self.CODES, self.SCALES, math.prod(shape), self.bits, self.group)

    def encode(
        self,
        delta: torch.Tensor,
        *,
        name: str = "",
        dtype: torch.dtype | None = None,
        clip: str | None = None,
        quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Codes of ``delta``'s entries; scales in ``dtype`` (default: float16 where they fit). An
        encoder that chose its own codes and scales (`quantize`'s layout for the flattened delta)
        passes them as ``quantized``; they are checked against the config and stored as given."""
        if quantized is not None:
            codes, scales = quantized
            if codes.numel() != delta.numel() or scales.numel() != group_count(delta.numel(), self.group):
                raise InvalidArgumentError(
                    "dense-q codes or scales do not match the delta",
                    expected=f"{delta.numel()} codes and {group_count(delta.numel(), self.group)} scales",
                    found=f"{codes.numel()} codes, {scales.numel()} scales",
                    fix="pass delta_format.core.quant.quantize's output for the flattened delta",
                )
        else:
            codes, scales = quantize(delta.reshape(-1), self.bits, self.group, clip, dtype)
        return {self.CODES: pack_codes(codes, self.bits), self.SCALES: scales.reshape(-1).contiguous()}

    def decode(self, stored, shape, name, dtype):
        numel = math.prod(shape)
        require_finite(name, self.SCALES, stored[self.SCALES])
        codes = unpack_codes(stored[self.CODES], self.bits, numel, name)
        return dequantize(codes, stored[self.SCALES], self.bits, self.group, dtype).view(shape)

    def rows(self, stored, shape, name, dtype, alpha=1.0):
        """The codes unpacked once (a byte each), dequantised a block of rows at a time."""
        require_finite(name, self.SCALES, stored[self.SCALES])
        codes, scales = unpack_codes(stored[self.CODES], self.bits, math.prod(shape), name), stored[self.SCALES]
        cols, group = matrix_shape(tuple(shape))[1], self.group

        def block(start: int, stop: int) -> torch.Tensor:  # groups run over the flat tensor
            values = dequantize_range(codes, scales, self.bits, group, start * cols, stop * cols, dtype)
            return values.view(stop - start, cols)

        return ComputedRows(block, alpha)

    def factor(self, stored, shape, name, dtype, alpha=1.0, *, compute=torch.float32):
        return DenseFactor(scaled(self.decode(stored, shape, name, compute), alpha).to(dtype))

    def label(self) -> str:
        return f"{self.name}({self.bits}b, g{self.group})"
