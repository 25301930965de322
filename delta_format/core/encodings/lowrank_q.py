"""``lowrank-q``: low rank with quantised factors, more bits for larger singular values (SPEC §5.10).

The delta is ``u @ v`` as in ``lowrank`` (``u`` is ``[rows, r]``, ``v`` is ``[r, cols]``), but the
``r`` factor pairs are stored as quantised values (`delta_format.core.quant`) in *bands*: the
config's ``bands`` lists ``[count, bits]`` from the first stored vector on, so
``[[4, 8], [28, 3], [32, 2]]`` stores the 4 largest singular directions with 8-bit codes, the next
28 with 3 and the last 32 with 2 (Delta-CoMe's mixed precision). Roles:

* ``codes`` (``U8``): band after band, each band's codes one bit stream starting on a byte
  boundary; inside a band, vector after vector, ``u[:, i]`` (rows values) then ``v[i, :]``
  (cols values);
* ``scales`` (float, float16 by default): band after band, vector after vector,
  ``ceil(rows / group)`` scales for ``u[:, i]`` then ``ceil(cols / group)`` for ``v[i, :]``: groups
  never straddle two vectors, and each group's scale follows its own range.

The encoder stores ``u = U S`` and ``v = Vᵀ`` of the SVD (the singular vectors have unit norm,
their groups' scales absorb the magnitudes). Why bands: the error a vector's rounding adds is
proportional to its singular value, so bits spent on the top few directions buy the most.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...errors import ManifestError
from ..constants import LOWRANK_Q, MAX_TENSOR_ELEMENTS
from ..dtypes import FLOAT_STORED
from ..quant import (
    dequantize,
    dequantize_range,
    group_count,
    pack_codes,
    packed_bytes,
    quantize,
    scale_dtype,
    unpack_codes,
)
from .base import ComputedRows, Encoding, Expected, check_config_keys, config_int, require_finite, rows_cols, scaled
from .dense_q import checked_quant
from .lowrank import LowRankEncoding, LowRankFactor

MAX_BANDS = 64


class QuantizedLowRankEncoding(Encoding, name=LOWRANK_Q):
    """Low-rank factors stored as b-bit codes in bands by singular value.

    Example:
        >>> delta = torch.outer(torch.arange(1.0, 9.0), torch.ones(16))      # rank 1
        >>> enc = QuantizedLowRankEncoding([(1, 8)], group=64)
        >>> restored = enc.decode(enc.encode(delta), (8, 16), "w", torch.float32)
        >>> float((restored - delta).abs().max()) < 0.05
        True
    """

    CODES = "codes"
    SCALES = "scales"

    def __init__(self, bands: Sequence[Sequence[int]], group: int = 64):
        parsed = []
        for band in bands:
            if not isinstance(band, (list, tuple)) or len(band) != 2:
                raise ManifestError("a lowrank-q band is [count, bits]", expected="e.g. [4, 8]", found=repr(band))
            count, bits = band
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ManifestError("lowrank-q band count must be >= 1", expected="an integer >= 1", found=repr(count))
            checked_quant(self.name, bits, group)
            parsed.append((count, bits))
        if not 1 <= len(parsed) <= MAX_BANDS or sum(c for c, _ in parsed) >= MAX_TENSOR_ELEMENTS:
            raise ManifestError(
                "lowrank-q needs 1 to 64 bands", expected=f"1 to {MAX_BANDS} bands", found=f"{len(parsed)} bands"
            )
        self.bands, self.group = parsed, group
        self.rank = sum(count for count, _ in parsed)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> QuantizedLowRankEncoding:
        check_config_keys(cls.name, config, {"bands", "group"}, set())
        if not isinstance(config["bands"], list):
            raise ManifestError("lowrank-q bands is not a list", expected="[[count, bits], ...]", found=repr(config))
        return cls(config["bands"], config_int(cls.name, config, "group", 1, 2**30 + 1))

    def to_dict(self) -> dict[str, Any]:
        return {"bands": [[count, bits] for count, bits in self.bands], "group": self.group}

    def _groups(self, rows: int, cols: int) -> tuple[int, int]:
        return group_count(rows, self.group), group_count(cols, self.group)

    def sizes(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(bytes of codes, number of scales) for a parameter of ``shape``."""
        rows, cols = rows_cols(shape)
        per_vector = sum(self._groups(rows, cols))
        codes = sum(packed_bytes(count * (rows + cols), bits) for count, bits in self.bands)
        return codes, self.rank * per_vector

    def expected(self, shape: tuple[int, ...]) -> dict[str, Expected]:
        if len(shape) < 2:
            raise ManifestError(
                "lowrank-q needs a matrix",
                expected="a parameter with 2 or more dimensions",
                found=f"shape {list(shape)}",
                fix="encode vectors as dense",
            )
        codes, scales = self.sizes(shape)
        return {self.CODES: Expected(("U8",), (codes,)), self.SCALES: Expected(FLOAT_STORED, (scales,))}

    def encode(
        self,
        delta: torch.Tensor,
        *,
        name: str = "",
        dtype: torch.dtype | None = None,
        u: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        clip: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Quantise ``u @ v`` (given, or ``U S`` and ``Vᵀ`` of ``delta``'s SVD at this rank) band by
        band; scales in ``dtype`` (default: float16 where every scale is a normal float16)."""
        if u is None or v is None:
            svd = LowRankEncoding.svd(delta)
            if svd.s.numel() < self.rank:
                raise ManifestError(
                    "lowrank-q rank exceeds the matrix", expected=f"<= {svd.s.numel()}", found=self.rank
                )
            u, v = svd.u[:, : self.rank] * svd.s[: self.rank], svd.vh[: self.rank]
        rows = u.shape[0]
        codes, scales, start = [], [], 0
        for count, bits in self.bands:
            part = torch.cat([u[:, start : start + count].T, v[start : start + count]], 1)
            u_codes, u_scales = quantize(part[:, :rows], bits, self.group, clip, dtype or torch.float32)
            v_codes, v_scales = quantize(part[:, rows:], bits, self.group, clip, dtype or torch.float32)
            codes.append(pack_codes(torch.cat([u_codes, v_codes], 1), bits))
            scales.append(torch.cat([u_scales, v_scales], 1).reshape(-1))
            start += count
        all_scales = torch.cat(scales)
        if dtype is None and scale_dtype(all_scales) != all_scales.dtype:  # one scale dtype per tensor:
            return self.encode(delta, name=name, dtype=torch.float16, u=u, v=v, clip=clip)  # codes follow it
        return {self.CODES: torch.cat(codes), self.SCALES: all_scales.contiguous()}

    def _bands(
        self, stored: Mapping[str, torch.Tensor], rows: int, cols: int, name: str
    ) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Each band's codes ``[count, rows + cols]`` (a byte each; vectors ``u[:, i]`` then
        ``v[i, :]``), its scales ``[count, groups of u + groups of v]`` and its bits, every
        stored byte checked."""
        codes, scales = stored[self.CODES], stored[self.SCALES]
        require_finite(name, self.SCALES, scales)
        g_u, g_v = self._groups(rows, cols)
        bands, byte, scale = [], 0, 0
        for count, bits in self.bands:
            size, n_scales = packed_bytes(count * (rows + cols), bits), count * (g_u + g_v)
            band = unpack_codes(codes[byte : byte + size], bits, count * (rows + cols), name).view(count, -1)
            bands.append((band, scales[scale : scale + n_scales].view(count, -1), bits))
            byte, scale = byte + size, scale + n_scales
        return bands

    def _v(self, bands, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        g_u = self._groups(rows, cols)[0]
        return torch.cat([dequantize(b[:, rows:], s[:, g_u:], bits, self.group, dtype) for b, s, bits in bands])

    def factors(
        self, stored: Mapping[str, torch.Tensor], shape: tuple[int, ...], name: str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded factors ``(u, v)`` in ``dtype``, after checking every stored byte."""
        rows, cols = rows_cols(shape)
        bands = self._bands(stored, rows, cols, name)
        g_u = self._groups(rows, cols)[0]
        u = torch.cat([dequantize(b[:, :rows], s[:, :g_u], bits, self.group, dtype) for b, s, bits in bands])
        return u.T.contiguous(), self._v(bands, rows, cols, dtype)

    def decode(self, stored, shape, name, dtype):
        u, v = self.factors(stored, shape, name, dtype)
        return (u @ v).reshape(shape)

    def rows(self, stored, shape, name, dtype, alpha=1.0):
        """``v`` decoded once, ``u``'s codes unpacked once (a byte each) and dequantised a block of
        rows at a time (the values `factors` gives), the block's product computed as it is added."""
        rows, cols = rows_cols(shape)
        bands = self._bands(stored, rows, cols, name)

        def u_rows(start: int, stop: int) -> torch.Tensor:  # u's codes are the first `rows` of a vector
            return torch.cat(
                [dequantize_range(band, scales, bits, self.group, start, stop, dtype) for band, scales, bits in bands]
            ).T

        v = self._v(bands, rows, cols, dtype)
        return ComputedRows(lambda start, stop: u_rows(start, stop) @ v, alpha)

    def factor(self, stored, shape, name, dtype, alpha=1.0, *, compute=torch.float32):
        u, v = self.factors(stored, shape, name, compute)
        return LowRankFactor(scaled(u, alpha).to(dtype), v.to(dtype))

    def label(self) -> str:
        return f"{self.name}(r={self.rank}, " + "+".join(f"{c}x{b}b" for c, b in self.bands) + ")"


def bands_for(rank: int, schedule: Sequence[tuple[float, int]]) -> list[tuple[int, int]]:
    """Bands from a schedule of ``(fraction of the rank, bits)``, the last entry taking the rest:
    ``bands_for(64, [(1/16, 8), (7/16, 3), (1, 2)])`` is ``[(4, 8), (28, 3), (32, 2)]``. Every band
    gets at least one vector while vectors remain; empty bands are left out."""
    bands, left = [], rank
    for i, (fraction, bits) in enumerate(schedule):
        count = left if i == len(schedule) - 1 else min(left, max(1, math.floor(fraction * rank)))
        if count:
            bands.append((count, bits))
        left -= count
    return bands
