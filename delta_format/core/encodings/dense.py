"""``dense``: the delta stored as is (SPEC §5.1). Role ``delta``, same shape as the parameter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..constants import DENSE
from ..dtypes import FLOAT_STORED
from .base import DecodedRows, Encoding, Expected, check_config_keys, require_finite, scaled
from .factor import Factor


class DenseEncoding(Encoding, name=DENSE):
    """The delta, unedited. Lossless when the writer checks that ``base + delta`` rounds back to
    the fine-tune (the compressor does; see `delta_format.methods.dense`)."""

    DELTA = "delta"

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> DenseEncoding:
        check_config_keys(cls.name, config, set(), set())
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return {}

    def expected(self, shape: tuple[int, ...]) -> dict[str, Expected]:
        return {self.DELTA: Expected(FLOAT_STORED, tuple(shape))}

    def encode(
        self, delta: torch.Tensor, *, name: str = "", dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """``delta`` in ``dtype`` (default: its own)."""
        return {self.DELTA: delta.to(dtype or delta.dtype).contiguous()}

    def decode(self, stored, shape, name, dtype):
        delta = stored[self.DELTA]
        require_finite(name, self.DELTA, delta)
        return delta.to(dtype)

    def rows(self, stored, shape, name, dtype, alpha=1.0):
        require_finite(name, self.DELTA, stored[self.DELTA])
        return DecodedRows(stored[self.DELTA], alpha)  # converted a block at a time, not whole

    def factor(self, stored, shape, name, dtype, alpha=1.0, *, compute=torch.float32):
        return DenseFactor(scaled(self.decode(stored, shape, name, compute), alpha).to(dtype))


class DenseFactor(Factor):
    """A whole delta matrix (no memory saved, but several adapters still share one base)."""

    def __init__(self, delta: torch.Tensor):
        self.delta = delta
        self.rows, self.cols = delta.shape

    def product(self, x):
        return F.linear(x, self.delta)

    def merged(self, weight):
        return weight + self.delta

    def gather(self, ids):
        return F.embedding(ids, self.delta)

    def tensors(self):
        return [self.delta]
