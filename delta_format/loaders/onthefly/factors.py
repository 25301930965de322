"""From a manifest entry to the `Factor` its encoding keeps for the forward."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...core.dtypes import TORCH_DTYPES, compute_dtype
from ...core.encodings import Factor
from ...core.encodings.base import not_on_the_fly
from ...core.manifest import TensorEntry
from ...core.reconstruct import parameter_dither
from ...core.rounding import Dither, stochastic_cast
from ...errors import NumericalError


def require_on_the_fly(name: str, entry: TensorEntry) -> None:
    """Refuse, before anything is read, a matrix whose encoding has no on-the-fly form."""
    if not entry.encoding.on_the_fly():
        raise not_on_the_fly(name, entry.encoding.name)


def build_factor(
    name: str, entry: TensorEntry, stored: Mapping[str, torch.Tensor], alpha: float, dtype: torch.dtype
) -> Factor:
    """The `Factor` of one matrix entry from its stored tensors, held in ``dtype`` (the weight's),
    with ``alpha`` (entry alpha times the caller's) applied as SPEC §9 applies it: the product
    rounded in the compute dtype of the entry's dtype."""
    compute = compute_dtype(TORCH_DTYPES[entry.dtype])
    factor = entry.encoding.factor(stored, tuple(entry.shape), name, dtype, entry.alpha * alpha, compute=compute)
    dither = parameter_dither(name, [entry], dtype)
    return factor if dither is None else RoundedFactor(factor, dither)


class RoundedFactor(Factor):
    """A factor of an entry with stochastic rounding (SPEC §9.1) on a half-precision weight: where
    the forward forms ``W + alpha * delta`` in the weight's dtype (a merged weight, an embedding's
    rows), the sum is formed in float32 and rounded stochastically with the parameter's dither, as
    a load rounds it, instead of to nearest, which drops every correction under half the weight's
    spacing. Products with an input (`apart`) never round the weight. The dither's row offsets
    are dropped after each use: an adapter holds only its encoded bytes."""

    def __init__(self, inner: Factor, dither: Dither):
        self.inner, self.dither = inner, dither
        self.rows, self.cols, self.cache_merged = inner.rows, inner.cols, inner.cache_merged

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.product(x)

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        sparse = self.inner.sparse()
        if sparse is not None:  # the weight's own values elsewhere are exact: only the kept positions round
            positions, values = sparse
            out = weight.clone(memory_format=torch.contiguous_format)
            flat = out.view(-1)
            acc = flat.index_select(0, positions).float().add_(values.float())
            flat[positions] = stochastic_cast(acc, weight.dtype, self.dither.at(positions.to(torch.int64)))
            self.dither.forget()
            return out
        delta = self.inner.merged(torch.zeros_like(weight)).float()
        dither = self.dither.rows(0, self.rows, weight.device)
        self.dither.forget()
        return stochastic_cast(delta.add_(weight.float()), weight.dtype, dither)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.gather(ids)

    def add_gathered(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``rows`` (the weight's rows ``ids``) plus this delta's, rounded as `merged` rounds them:
        each element's dither is that of its flat index in the parameter."""
        flat = ids.unsqueeze(-1).to(torch.int64) * self.cols + torch.arange(self.cols, device=ids.device)
        acc = self.inner.gather(ids).float().add_(rows.float())
        dither = self.dither.at(flat)
        self.dither.forget()
        return stochastic_cast(acc, rows.dtype, dither)

    def apart(self, tokens: int) -> bool:
        return self.inner.apart(tokens)

    def tensors(self) -> list[torch.Tensor]:
        return self.inner.tensors()


def check_finite_merge(name: str, factor: Factor, weight: torch.Tensor) -> None:
    """The merged weight ``W + alpha * decode(delta)`` is finite wherever ``W`` is, as a load
    requires of every weight (SPEC §9): computed once here, so a delta whose alpha or values
    overflow is refused before it is attached (`NumericalError`), not served as NaN logits."""
    merged = factor.merged(weight)
    bad = ~torch.isfinite(merged)
    if weight.is_floating_point():
        bad &= torch.isfinite(weight)
    if bool(bad.any()):
        raise NumericalError(
            f"{name!r} overflows {str(weight.dtype).removeprefix('torch.')} with this delta",
            expected="finite weights",
            found=f"{int(bad.sum())} non-finite values after adding the delta",
            fix="lower alpha, or load in a wider dtype",
        )
