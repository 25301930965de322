"""``replace``: the parameter's new value, not a delta (SPEC §5.5).

For tensors the base lacks or whose shape changed (added tokens, resized embeddings, a new head),
and as the lossless fallback where no float32 delta rounds back to the fine-tune. The base is not
read and the coefficient alpha does not apply. No on-the-fly form: a value is not an adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..constants import REPLACE
from ..dtypes import FLOAT_STORED
from .base import Encoding, Expected, check_config_keys, require_finite


class ReplaceEncoding(Encoding, name=REPLACE):
    VALUE = "value"
    is_delta = False
    needs_base = False

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ReplaceEncoding:
        check_config_keys(cls.name, config, set(), set())
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return {}

    def expected(self, shape: tuple[int, ...]) -> dict[str, Expected]:
        return {self.VALUE: Expected(FLOAT_STORED, tuple(shape))}

    def encode(
        self, delta: torch.Tensor, *, name: str = "", dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """``delta`` is the new value here, stored in ``dtype`` (default: its own)."""
        return {self.VALUE: delta.to(dtype or delta.dtype).contiguous()}

    def decode(self, stored, shape, name, dtype):
        value = stored[self.VALUE]
        require_finite(name, self.VALUE, value)
        return value.to(dtype)
