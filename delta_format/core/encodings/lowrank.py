"""``lowrank``: the delta as a product of two factors, ``U @ V`` (SPEC §5.4).

Roles ``u`` (``[rows, rank]``) and ``v`` (``[rank, cols]``) with the parameter viewed as a
``rows x cols`` matrix (``shape[0]`` by the product of the rest). A LoRA adapter is exactly this,
with the LoRA scaling folded into ``u``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..constants import LOWRANK, MAX_TENSOR_ELEMENTS
from ...errors import ManifestError
from ..dtypes import FLOAT_STORED
from .base import Encoding, Expected, check_config_keys, config_int, require_finite, rows_cols


class LowRankEncoding(Encoding):
    name = LOWRANK

    def __init__(self, rank: int):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ManifestError("invalid low-rank rank", expected="an integer >= 1", found=repr(rank))
        self.rank = rank

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "LowRankEncoding":
        check_config_keys(cls.name, config, {"rank"}, set())
        return cls(config_int(cls.name, config, "rank", 1, MAX_TENSOR_ELEMENTS))

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def expected(self, shape: tuple[int, ...]) -> dict[str, Expected]:
        if len(shape) < 2:
            raise ManifestError(
                "low-rank encoding needs a matrix", expected="a parameter with 2 or more dimensions",
                found=f"shape {list(shape)}", fix="encode vectors as dense",
            )
        rows, cols = rows_cols(shape)
        return {"u": Expected(FLOAT_STORED, (rows, self.rank)), "v": Expected(FLOAT_STORED, (self.rank, cols))}

    def encode(self, u: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Store given factors (``u @ v`` is the delta)."""
        return {"u": u.contiguous(), "v": v.contiguous()}

    @staticmethod
    def factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncated SVD in float32; the singular values are split evenly between the factors so
        neither factor's range explodes when stored in half precision."""
        rows, cols = rows_cols(tuple(delta.shape))
        u, s, vh = torch.linalg.svd(delta.float().reshape(rows, cols), full_matrices=False)
        root = s[:rank].sqrt()
        return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]

    def decode(self, stored, shape, name, dtype):
        u, v = stored["u"], stored["v"]
        require_finite(name, "u", u)
        require_finite(name, "v", v)
        return (u.to(dtype) @ v.to(dtype)).reshape(shape)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LowRankEncoding) and other.rank == self.rank

    def __repr__(self) -> str:
        return f"LowRankEncoding({self.rank})"
