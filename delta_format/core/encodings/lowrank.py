"""``lowrank``: the delta as a product of two factors, ``U @ V`` (SPEC §5.4).

Roles ``u`` (``[rows, rank]``) and ``v`` (``[rank, cols]``) with the parameter viewed as a
``rows x cols`` matrix (``shape[0]`` by the product of the rest). A LoRA adapter is exactly this,
with the LoRA scaling folded into ``u``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ...errors import ManifestError
from ..constants import LOWRANK, MAX_TENSOR_ELEMENTS
from ..dtypes import FLOAT_STORED
from .base import (
    ComputedRows,
    Encoding,
    Expected,
    check_config_keys,
    config_int,
    require_finite,
    rows_cols,
    scaled,
)
from .factor import Factor


class SVD(NamedTuple):
    """A matrix's singular value decomposition in float32: ``u @ diag(s) @ vh``."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


class LowRankEncoding(Encoding, name=LOWRANK):
    U = "u"
    V = "v"

    def __init__(self, rank: int):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ManifestError("invalid low-rank rank", expected="an integer >= 1", found=repr(rank))
        self.rank = rank

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> LowRankEncoding:
        check_config_keys(cls.name, config, {"rank"}, set())
        return cls(config_int(cls.name, config, "rank", 1, MAX_TENSOR_ELEMENTS))

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def expected(self, shape: tuple[int, ...]) -> dict[str, Expected]:
        if len(shape) < 2:
            raise ManifestError(
                "low-rank encoding needs a matrix",
                expected="a parameter with 2 or more dimensions",
                found=f"shape {list(shape)}",
                fix="encode vectors as dense",
            )
        rows, cols = rows_cols(shape)
        return {self.U: Expected(FLOAT_STORED, (rows, self.rank)), self.V: Expected(FLOAT_STORED, (self.rank, cols))}

    def encode(
        self,
        delta: torch.Tensor,
        *,
        name: str = "",
        dtype: torch.dtype | None = None,
        u: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Factors ``u``, ``v`` of ``delta`` (``u @ v`` is the delta as a matrix), given (a LoRA
        adapter's, or a truncation the caller chose) or `factorize`'s at this rank, stored in
        ``dtype`` (default: ``delta``'s)."""
        if u is None or v is None:
            u, v = self.factorize(delta, self.rank)
        dtype = dtype or delta.dtype
        return {self.U: u.to(dtype).contiguous(), self.V: v.to(dtype).contiguous()}

    @staticmethod
    def svd(delta: torch.Tensor) -> SVD:
        """The SVD of ``delta`` viewed as a matrix, in float32."""
        rows, cols = rows_cols(tuple(delta.shape))
        return SVD(*torch.linalg.svd(delta.float().reshape(rows, cols), full_matrices=False))

    @staticmethod
    def split(svd: SVD, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank-``rank`` truncation as two factors, the singular values split evenly between
        them (``sqrt(s)`` each) so neither factor's range explodes when stored in half precision."""
        root = svd.s[:rank].sqrt()
        return svd.u[:, :rank] * root, root.unsqueeze(1) * svd.vh[:rank]

    @classmethod
    def factorize(cls, delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncated SVD factors of ``delta`` at ``rank`` (`svd`, then `split`)."""
        return cls.split(cls.svd(delta), rank)

    def _checked(self, stored: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        require_finite(name, self.U, stored[self.U])
        require_finite(name, self.V, stored[self.V])
        return stored[self.U], stored[self.V]

    def decode(self, stored, shape, name, dtype):
        u, v = self._checked(stored, name)
        return (u.to(dtype) @ v.to(dtype)).reshape(shape)

    def rows(self, stored, shape, name, dtype, alpha=1.0):
        u, v = self._checked(stored, name)
        v = v.to(dtype)  # a block's product may differ from the whole's rows in the last bits (SPEC §9)
        return ComputedRows(lambda start, stop: u[start:stop].to(dtype) @ v, alpha)

    def factor(self, stored, shape, name, dtype, alpha=1.0, *, compute=torch.float32):
        u, v = self._checked(stored, name)
        return LowRankFactor(scaled(u.to(compute), alpha).to(dtype), v.to(dtype))

    def label(self) -> str:
        return f"{self.name}(r={self.rank})"

    def __repr__(self) -> str:
        return f"LowRankEncoding({self.rank})"


class LowRankFactor(Factor):
    """``delta = u @ v`` (alpha folded into ``u``): always two thin products, ``x @ v.T @ u.T``."""

    cache_merged = False  # the thin products cost little next to a full merged copy

    def __init__(self, u: torch.Tensor, v: torch.Tensor):
        self.u, self.v = u, v
        self.rows, self.cols = u.shape[0], v.shape[1]

    def apart(self, tokens):
        return True

    def product(self, x):
        return F.linear(F.linear(x, self.v), self.u)

    def merged(self, weight):
        return torch.addmm(weight, self.u, self.v)

    def gather(self, ids):
        return F.embedding(ids, self.u) @ self.v

    def tensors(self):
        return [self.u, self.v]
