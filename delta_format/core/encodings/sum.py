"""``sum``: a delta stored as the sum of two to four other encodings' deltas (SPEC §5.11, 1.2).

The hybrid the budget measured as the best at a fraction of a bit: the few largest singular
directions of a fine-tune's delta as ``lowrank-q``, the rest by DARE (``sparse-q`` with a seeded
mask). DARE's rescaled random drop is unbiased but noisy; taking the coherent top of the spectrum
out first leaves it less to be noisy about (benchmarks/RESULTS.md, "Hybrids"). The encoding itself
is general: any delta encodings, applied in order.

Config ``{"parts": [{"encoding": NAME, "config": {...}}, ...]}`` with 2 to `MAX_PARTS` parts, each
a delta encoding other than ``sum`` (no nesting; ``replace`` and ``bitdiff`` store values, not
deltas). Part ``i``'s stored tensors take the role ``"<i>.<role>"`` (``0.codes``, ``1.scales``, …):
the key of a stored tensor stays ``<parameter>:<role>``. The delta is the parts' deltas, each
decoded in the compute dtype as its own encoding defines, added left to right in that dtype:
``δ = ((δ_0 + δ_1) + δ_2) + …``. Seeded parts draw their mask from the parameter's name, as they
would alone.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...errors import ManifestError
from ..constants import SUM
from .base import (
    Encoding,
    Expected,
    RowDelta,
    check_config_keys,
    encoding_from_dict,
    matrix_shape,
    scaled,
)
from .factor import Factor

MAX_PARTS = 4


def part_role(index: int, role: str) -> str:
    """The stored role of part ``index``'s ``role``: ``"<index>.<role>"``."""
    return f"{index}.{role}"


class SumEncoding(Encoding, name=SUM):
    """The sum of 2 to 4 delta encodings' deltas, applied left to right.

    Example:
        >>> from delta_format.core.encodings import DenseEncoding, SignEncoding
        >>> enc = SumEncoding([SignEncoding("tensor"), DenseEncoding()])
        >>> delta = torch.tensor([[0.5, -0.25], [1.0, 0.0]])
        >>> sign = SignEncoding("tensor").encode(delta)
        >>> rest = DenseEncoding().encode(delta - SignEncoding("tensor").decode(sign, (2, 2), "w", torch.float32))
        >>> stored = enc.join([sign, rest])
        >>> torch.equal(enc.decode(stored, (2, 2), "w", torch.float32), delta)
        True
    """

    def __init__(self, parts: Sequence[Encoding]):
        parts = list(parts)
        if not 2 <= len(parts) <= MAX_PARTS:
            raise ManifestError(
                "sum needs 2 to 4 parts",
                expected=f"2 to {MAX_PARTS} parts",
                found=f"{len(parts)} parts",
                fix="store a single encoding as itself",
            )
        for part in parts:
            if not isinstance(part, Encoding) or isinstance(part, SumEncoding) or not part.is_delta:
                raise ManifestError(
                    "a sum part must be a delta encoding",
                    expected="dense, sparse, sign, lowrank, dense-q, sparse-q or lowrank-q",
                    found=getattr(part, "name", type(part).__name__),
                    fix="sums do not nest, and replace/bitdiff store values, not deltas",
                )
        self.parts = parts

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> SumEncoding:
        check_config_keys(cls.name, config, {"parts"}, set())
        parts = config["parts"]
        if not isinstance(parts, list) or not 2 <= len(parts) <= MAX_PARTS:
            raise ManifestError(
                "sum parts is not a list of 2 to 4 parts",
                expected='[{"encoding": ..., "config": {...}}, ...] of 2 to 4 parts',
                found=repr(parts)[:200],
            )
        built = []
        for part in parts:
            check_config_keys(f"{cls.name} part", part, {"encoding"}, {"config"})
            if part["encoding"] == cls.name:  # before building it: no recursion on a hostile manifest
                raise ManifestError("sum parts do not nest", expected="a delta encoding other than sum", found="sum")
            built.append(encoding_from_dict(part["encoding"], part.get("config", {})))
        return cls(built)

    def to_dict(self) -> dict[str, Any]:
        return {"parts": [{"encoding": part.name, "config": part.to_dict()} for part in self.parts]}

    def expected(self, shape: tuple[int, ...]) -> dict[str, Expected]:
        return {
            part_role(i, role): exp for i, part in enumerate(self.parts) for role, exp in part.expected(shape).items()
        }

    def join(self, stored: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The stored tensors of the sum from each part's stored tensors, in part order."""
        return {part_role(i, role): tensor for i, part in enumerate(stored) for role, tensor in part.items()}

    def split(self, stored: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Each part's stored tensors by its own role names (the reader has checked the keys)."""
        parts: list[dict[str, torch.Tensor]] = [{} for _ in self.parts]
        for key, tensor in stored.items():
            index, _, role = key.partition(".")
            parts[int(index)][role] = tensor
        return parts

    def encode(
        self,
        delta: torch.Tensor,
        *,
        name: str = "",
        dtype: torch.dtype | None = None,
        parts: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The parts' stored tensors, given (``parts=``, in order): how a sum's parts split a delta
        is the writer's choice (e.g. the budget's low rank then DARE of the residual)."""
        if parts is None or len(parts) != len(self.parts):
            raise ManifestError(
                "sum.encode needs each part's stored tensors",
                expected=f"parts= with {len(self.parts)} dicts of stored tensors",
                found="none" if parts is None else f"{len(parts)}",
                fix="encode each part, then pass them in order",
            )
        return self.join(parts)

    def decode(self, stored, shape, name, dtype):
        total = None
        for part, own in zip(self.parts, self.split(stored)):
            delta = part.decode(own, shape, name, dtype)
            total = delta if total is None else total + delta  # not in place: a part may return its stored tensor
        return total

    def rows(self, stored, shape, name, dtype, alpha=1.0):
        parts = [part.rows(own, shape, name, dtype) for part, own in zip(self.parts, self.split(stored))]
        return SumRows(parts, matrix_shape(tuple(shape))[1], dtype, alpha)

    def factor(self, stored, shape, name, dtype, alpha=1.0, *, compute=torch.float32):
        return SumFactor(
            [
                part.factor(own, shape, name, dtype, alpha, compute=compute)
                for part, own in zip(self.parts, self.split(stored))
            ]
        )

    def label(self) -> str:
        return " + ".join(part.label() for part in self.parts)


class SumRows(RowDelta):
    """The parts' rows summed into a zeroed block (the same bits as `SumEncoding.decode`: adding
    ``δ_0`` to zero is exact), then ``alpha`` times that block added to the accumulator."""

    def __init__(self, parts: list[RowDelta], cols: int, dtype: torch.dtype, alpha: float):
        self.parts, self.cols, self.dtype, self.alpha = parts, cols, dtype, alpha
        self.block: torch.Tensor | None = None

    def add_rows(self, acc, start, stop):
        size = (stop - start) * self.cols
        if self.block is None or self.block.numel() < size:
            self.block = torch.empty(size, dtype=self.dtype, device=acc.device)
        block = self.block[:size].view(stop - start, self.cols).zero_()
        for part in self.parts:
            part.add_rows(block, start, stop)
        acc.add_(scaled(block, self.alpha))

    def finish(self):
        for part in self.parts:
            part.finish()


class SumFactor(Factor):
    """The parts' factors side by side: products and gathers add up, merges apply in order."""

    def __init__(self, parts: list[Factor]):
        self.parts = parts
        self.rows, self.cols = parts[0].rows, parts[0].cols
        self.cache_merged = any(part.cache_merged for part in parts)

    def product(self, x):
        return functools.reduce(operator.add, (part.product(x) for part in self.parts))

    def merged(self, weight):
        for part in self.parts:
            weight = part.merged(weight)
        return weight

    def gather(self, ids):
        return functools.reduce(operator.add, (part.gather(ids) for part in self.parts))

    def apart(self, tokens):
        return all(part.apart(tokens) for part in self.parts)

    def tensors(self):
        return [t for part in self.parts for t in part.tensors()]
