"""``dense``: the delta stored as is (SPEC §5.1). Role ``delta``, same shape as the parameter."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..constants import DENSE
from ..dtypes import FLOAT_STORED
from .base import DecodedRows, Encoding, Expected, check_config_keys, require_finite


class DenseEncoding(Encoding):
    """The delta, unedited. Lossless when the writer checks that ``base + delta`` rounds back to
    the fine-tune (the compressor does; see `delta_format.methods.dense`)."""

    name = DENSE

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "DenseEncoding":
        check_config_keys(cls.name, config, set(), set())
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return {}

    def expected(self, shape: tuple[int, ...]) -> dict[str, Expected]:
        return {"delta": Expected(FLOAT_STORED, tuple(shape))}

    def encode(self, delta: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {"delta": delta.to(dtype).contiguous()}

    def decode(self, stored, shape, name, dtype):
        delta = stored["delta"]
        require_finite(name, "delta", delta)
        return delta.to(dtype)

    def rows(self, stored, shape, name, dtype, alpha=1.0):
        require_finite(name, "delta", stored["delta"])
        return DecodedRows(stored["delta"], alpha)  # converted a block at a time, not whole

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DenseEncoding)

    def __repr__(self) -> str:
        return "DenseEncoding()"
