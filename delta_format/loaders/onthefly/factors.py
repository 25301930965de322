"""One delta on one matrix, times its alpha, kept in its stored form and ready for a forward:
the product with an input, the merged weight, or rows of an embedding."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from ...core.bits import check_packed, sign_table
from ...core.dtypes import TORCH_DTYPES, compute_dtype
from ...core.encodings import DenseEncoding, LowRankEncoding, SignEncoding, SparseEncoding
from ...core.encodings.base import require_finite
from ...errors import UnsupportedOnTheFlyError

MERGE_MIN_TOKENS = 32
"""From this many tokens in a call, a ``sign``/``dense`` delta is added to the weight for the call
(one elementwise pass over the matrix, then one matmul) instead of multiplied separately (a second
full matmul). Measured on CPU (2 cores, 2816 x 1024, float32 and bfloat16): separate products win
at 1 token, tie near 16, and cost 2x the merge at 1024 tokens, where the merge costs +10-30 %."""

ON_THE_FLY_ENCODINGS = ("sign", "sparse", "lowrank", "dense")
"""Encodings a matrix may have to be applied on the fly (vectors may have any)."""


_MATERIALISE_FIX = "serve this fine-tune materialised: DeltaModel.from_pretrained(...) or model.swap_delta(...)"

class Factor:
    """``alpha * delta`` of one ``rows x cols`` matrix, kept in its stored form on the weight's
    device, in the weight's dtype."""

    rows: int
    cols: int

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ (alpha * delta).T`` for ``x`` of shape ``[..., cols]`` (called where `apart`)."""
        raise NotImplementedError

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + alpha * delta``, a new tensor (``weight`` is not modified)."""
        raise NotImplementedError

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of ``alpha * delta``, shape ``[*ids.shape, cols]`` (embedding lookups)."""
        raise NotImplementedError

    def apart(self, tokens: int) -> bool:
        """Whether `product` is cheaper than `merged` for a call on ``tokens`` input rows."""
        return tokens < MERGE_MIN_TOKENS

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device


def _alpha_times(values: torch.Tensor, alpha: float) -> torch.Tensor:
    """SPEC §9: ``round_c(round_c(alpha) * values)``, skipped for alpha 1 (exact)."""
    return values if alpha == 1.0 else values * alpha


class SignFactor(Factor):
    """Sign bits (1 bit per weight) and a scale per row or per tensor: ``delta = scale * S``.

    The bits are expanded to a ±1 matrix for each call (one gather from a 256 x 8 table, far
    cheaper than the matmul it feeds), then ``x @ S.T * scale`` or ``addcmul(W, S, scale)``."""

    def __init__(self, bits: torch.Tensor, scale: torch.Tensor, rows: int, cols: int, dtype: torch.dtype):
        self.bits, self.rows, self.cols = bits, rows, cols
        self.scale = scale.view(-1, 1) if scale.numel() == rows and rows != 1 else scale.view(1, 1)
        self.scale = self.scale.to(dtype)

    def signs(self, dtype: torch.dtype) -> torch.Tensor:
        table = sign_table(dtype, self.bits.device)
        return torch.index_select(table, 0, self.bits.to(torch.int32)).view(-1)[: self.rows * self.cols].view(self.rows, self.cols)

    def product(self, x):
        return F.linear(x, self.signs(x.dtype)).mul_(self.scale.view(-1))

    def merged(self, weight):
        return torch.addcmul(weight, self.signs(weight.dtype), self.scale)

    def gather(self, ids):
        pos = ids.unsqueeze(-1).to(torch.int64) * self.cols + torch.arange(self.cols, device=ids.device)
        signs = ((self.bits[pos >> 3] >> (pos & 7)) & 1).to(self.scale.dtype).mul_(2).sub_(1)
        scale = self.scale.view(-1)[ids].unsqueeze(-1) if self.scale.numel() > 1 else self.scale.view(())
        return signs.mul_(scale)

    def tensors(self):
        return [self.bits, self.scale]


class SparseFactor(Factor):
    """Kept values at flat positions decoded once (int32 where they fit), added to a copy of the
    base weight for each call (``index_add``), then one matmul.

    Multiplying at the kept entries only (``index_add`` of ``x[:, cols] * values`` into the output)
    was slower than this merge at every batch size measured on CPU (2816 x 1024, p = 0.9: 13 ms
    against 1.2 ms for one token); a CSR ``torch.sparse`` product was 3x slower than the merge at
    1024 tokens and has no bfloat16 kernel on CPU."""

    def __init__(self, positions: torch.Tensor, values: torch.Tensor, rows: int, cols: int):
        self.positions, self.values, self.rows, self.cols = positions, values, rows, cols

    def apart(self, tokens):
        return False

    def merged(self, weight):
        out = weight.clone(memory_format=torch.contiguous_format)
        out.view(-1).index_add_(0, self.positions, self.values)
        return out

    def gather(self, ids):
        flat_ids = ids.reshape(-1).to(self.positions.dtype)
        starts = torch.searchsorted(self.positions, flat_ids * self.cols)
        counts = torch.searchsorted(self.positions, (flat_ids + 1) * self.cols) - starts
        out = self.values.new_zeros(flat_ids.numel(), self.cols)
        total = int(counts.sum())
        if total:
            row = torch.repeat_interleave(torch.arange(flat_ids.numel(), device=ids.device), counts, output_size=total)
            skip = (starts - (torch.cumsum(counts, 0) - counts)).repeat_interleave(counts, output_size=total)
            index = torch.arange(total, device=ids.device) + skip
            out[row, self.positions[index] - flat_ids[row] * self.cols] = self.values[index]
        return out.view(*ids.shape, self.cols)

    def tensors(self):
        return [self.positions, self.values]


class LowRankFactor(Factor):
    """``delta = u @ v`` (alpha folded into ``u``): always two thin products, ``x @ v.T @ u.T``."""

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


def build_factor(name: str, entry, stored: Mapping[str, torch.Tensor], alpha: float, dtype: torch.dtype) -> Factor:
    """The `Factor` of one matrix entry from its stored tensors (validated as a load validates
    them), with ``alpha`` (entry alpha times the caller's) applied as SPEC §9 applies it."""
    encoding, shape = entry.encoding, tuple(entry.shape)
    rows, cols = shape
    compute = compute_dtype(TORCH_DTYPES[entry.dtype])
    alpha = entry.alpha * alpha
    if isinstance(encoding, SignEncoding):
        check_packed(stored["bits"], rows * cols)
        require_finite(name, "scale", stored["scale"])
        # alpha * (scale * sign) == sign * (alpha * scale): multiplying by +-1 is exact.
        scale = _alpha_times(stored["scale"].to(compute), alpha)
        return SignFactor(stored["bits"], scale, rows, cols, dtype)
    if isinstance(encoding, SparseEncoding):
        # Decoded once (every check of a load included), then only the kept entries are held.
        delta = _alpha_times(encoding.decode(stored, shape, name, compute), alpha).view(-1)
        positions = delta.nonzero().view(-1)
        if rows * cols < 2**31:
            positions = positions.to(torch.int32)
        return SparseFactor(positions, delta[positions].to(dtype), rows, cols)
    if isinstance(encoding, LowRankEncoding):
        require_finite(name, "u", stored["u"])
        require_finite(name, "v", stored["v"])
        return LowRankFactor(_alpha_times(stored["u"].to(compute), alpha).to(dtype), stored["v"].to(dtype))
    _require_on_the_fly(name, entry)
    return DenseFactor(_alpha_times(encoding.decode(stored, shape, name, compute), alpha).to(dtype))


def _require_on_the_fly(name: str, entry) -> None:
    if not isinstance(entry.encoding, (SignEncoding, SparseEncoding, LowRankEncoding, DenseEncoding)):
        raise UnsupportedOnTheFlyError(
            f"{name!r} is stored as {entry.encoding.name!r}, which cannot be applied on the fly to a matrix",
            expected=" or ".join(ON_THE_FLY_ENCODINGS), found=entry.encoding.name, fix=_MATERIALISE_FIX,
        )
