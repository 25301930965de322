"""``sparse``: kept values plus where they go, times a rescale (SPEC §5.2).

Role ``values`` holds the kept delta entries in ascending flat (row-major) position order.
Where they go is one of three index codings:

* ``gaps``: role ``gaps`` (``U8``/``U16``/``I32``/``I64``), the number of skipped elements before
  each kept one, so ``index[0] = gaps[0]`` and ``index[i] = index[i-1] + gaps[i] + 1``;
* ``bitmask``: role ``mask``, one bit per element (`delta_format.core.bits` order), 1 = kept;
* ``seeded``: nothing stored; positions come from `delta_format.core.seeded_mask` with the config's
  ``seed`` and ``p`` and the parameter name.

Decoded: ``scale * scatter(values)``, zero elsewhere. DARE stores the raw kept entries and puts
its rescale ``k / (1 - p)`` (or DAREx-q's ``1 / q``) in ``scale``, so the rescale can be
changed without touching the tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import CorruptDeltaError, InvalidArgumentError, ManifestError, UnknownEncodingError
from .. import native
from ..bits import check_packed, count_bits, pack_bits, packed_length
from ..constants import GAP_DTYPES, INDEX_BITMASK, INDEX_CODINGS, INDEX_GAPS, INDEX_SEEDED, SPARSE
from ..dtypes import FLOAT_STORED
from ..seeded_mask import check_gap_table, drop_threshold, iter_kept_positions, kept_positions, native_walk
from .base import (
    Encoding,
    Expected,
    RowDelta,
    check_config_keys,
    config_int,
    config_number,
    matrix_shape,
    require_finite,
    scaled,
)
from .factor import MERGE_MIN_TOKENS, Factor
from .index_codings import bitmask_blocks, gap_blocks, positions_to_gaps, run_past


class SparseEncoding(Encoding, name=SPARSE):
    """Kept values with an index coding and a rescale.

    Example:
        >>> enc = SparseEncoding("seeded", scale=2.0, seed=1, p=0.5)
        >>> delta = torch.arange(8.0)
        >>> stored = enc.encode(delta, name="w")
        >>> restored = enc.decode(stored, (8,), "w", torch.float32)
        >>> bool(((restored == 0) | (restored == 2 * delta)).all())
        True
    """

    VALUES = "values"
    GAPS = "gaps"
    MASK = "mask"

    def __init__(self, index_coding: str, scale: float = 1.0, seed: int | None = None, p: float | None = None):
        if index_coding not in INDEX_CODINGS:
            raise UnknownEncodingError("unknown sparse index coding", expected=INDEX_CODINGS, found=repr(index_coding))
        if not math.isfinite(scale):
            raise ManifestError("sparse scale is not finite", expected="a finite number", found=repr(scale))
        if index_coding == INDEX_SEEDED:
            if seed is None or p is None:
                raise ManifestError(
                    "seeded sparse coding needs seed and p", expected="both", found=f"seed={seed}, p={p}"
                )
            drop_threshold(p)
        self.index_coding = index_coding
        self.scale = float(scale)
        self.seed = seed
        self.p = None if p is None else float(p)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> SparseEncoding:
        coding = config.get("index_coding") if isinstance(config, Mapping) else None
        if coding == INDEX_SEEDED:
            check_config_keys(cls.name, config, {"index_coding", "seed", "p"}, {"scale"})
            p = config_number(cls.name, config, "p")
            if not 0.0 <= p < 1.0:
                raise ManifestError("seeded sparse p is out of range", expected="0 <= p < 1", found=repr(p))
            try:
                check_gap_table(p)
            except InvalidArgumentError as exc:
                raise ManifestError(
                    "seeded sparse p cannot be generated",
                    expected=exc.expected,
                    found=exc.found,
                    fix="re-create the delta with a smaller p or an explicit index coding",
                ) from None
            return cls(
                coding, config_number(cls.name, config, "scale", 1.0), config_int(cls.name, config, "seed", 0, 2**64), p
            )
        check_config_keys(cls.name, config, {"index_coding"}, {"scale"})
        if coding not in INDEX_CODINGS:
            raise UnknownEncodingError("unknown sparse index coding", expected=INDEX_CODINGS, found=repr(coding))
        return cls(coding, config_number(cls.name, config, "scale", 1.0))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index_coding": self.index_coding, "scale": self.scale}
        if self.index_coding == INDEX_SEEDED:
            out.update(seed=self.seed, p=self.p)
        return out

    def expected(self, shape: tuple[int, ...]) -> dict[str, Expected]:
        roles = {self.VALUES: Expected(FLOAT_STORED, (None,))}
        if self.index_coding == INDEX_GAPS:
            roles[self.GAPS] = Expected(GAP_DTYPES, (None,))
        elif self.index_coding == INDEX_BITMASK:
            roles[self.MASK] = Expected(("U8",), (packed_length(math.prod(shape)),))
        return roles

    def _check_seeded_count(self, numel: int, count: int, name: str) -> None:
        """Refuse, before generating any position, a value count a seeded mask of this size
        cannot produce (beyond 8 standard deviations): a hostile shape must not make us work."""
        keep = 1.0 - self.p
        mean, sd = numel * keep, math.sqrt(numel * keep * self.p)
        if abs(count - mean) > 8 * sd + 16:
            raise CorruptDeltaError(
                f"sparse values of {name!r} cannot come from a seeded mask of this shape",
                expected=f"about {mean:.0f} values (p={self.p}, {numel} elements)",
                found=f"{count}",
                fix="the delta is corrupt; re-create it",
            )

    def positions(self, numel: int, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The seeded mask's kept positions (seeded coding only)."""
        return kept_positions(numel, self.p, self.seed, name, device)

    def encode(
        self,
        delta: torch.Tensor,
        *,
        name: str = "",
        dtype: torch.dtype | None = None,
        positions: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Store ``delta``'s kept entries, values in ``dtype`` (default: ``delta``'s).

        Which entries are kept: for the seeded coding, the seeded mask of ``name``; for the
        explicit codings, ``positions`` (sorted, unique flat positions) or ``keep`` (a bool tensor
        of ``delta``'s size), whichever the caller has. What the caller already holds spares
        computing it again: the seeded mask's positions (from `positions`), ``keep`` besides
        ``positions`` (the bitmask is packed from it), the kept ``values`` in position order."""
        flat = delta.reshape(-1)
        if positions is None and (
            values is None or self.index_coding == INDEX_GAPS or (self.index_coding == INDEX_BITMASK and keep is None)
        ):
            positions = self._kept(flat, name, keep)
        if values is None:
            values = flat[positions.to(torch.int64)]
        stored = {self.VALUES: values.to(dtype or delta.dtype).contiguous()}
        if self.index_coding == INDEX_GAPS:
            stored[self.GAPS] = positions_to_gaps(positions.cpu()).to(flat.device)
        elif self.index_coding == INDEX_BITMASK:
            if keep is None:
                keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
                keep[positions.to(torch.int64)] = True
            stored[self.MASK] = pack_bits(keep)
        return stored

    def _kept(self, flat: torch.Tensor, name: str, keep: torch.Tensor | None) -> torch.Tensor:
        """The kept positions when the caller gave none: the seeded mask's, or those of ``keep``."""
        if self.index_coding == INDEX_SEEDED:
            return self.positions(flat.numel(), name, flat.device)
        if keep is None:
            raise ManifestError(
                "explicit index codings need the kept entries", expected="positions or keep", found="neither"
            )
        return keep.reshape(-1).nonzero().view(-1)

    def _blocks(self, stored, numel: int, name: str) -> Iterator[torch.Tensor]:
        """The kept positions as ascending blocks, after the checks that need no walk: finite
        values, a bitmask's bit count, a plausible seeded count (before generating anything)."""
        values = stored[self.VALUES]
        require_finite(name, self.VALUES, values)
        if self.index_coding == INDEX_GAPS:
            return gap_blocks(stored[self.GAPS], numel, name)
        if self.index_coding == INDEX_BITMASK:
            mask = stored[self.MASK]
            check_packed(mask, numel)
            if count_bits(mask) != values.numel():
                raise CorruptDeltaError(
                    f"sparse bitmask of {name!r} disagrees with its values",
                    expected=f"{values.numel()} set bits",
                    found=f"{count_bits(mask)}",
                    fix="the delta is corrupt; re-create it",
                )
            return bitmask_blocks(mask, numel)
        self._check_seeded_count(numel, values.numel(), name)
        return iter_kept_positions(numel, self.p, self.seed, name, values.device)

    def scaled_values(self, values: torch.Tensor, dtype: torch.dtype, alpha: float = 1.0) -> torch.Tensor:
        """Stored ``values`` as they decode: ``alpha * (scale * values)`` in ``dtype``, each
        product rounded (SPEC §5.2, §9). A writer that knows where its values go builds the
        decoded delta with this, without re-deriving the positions."""
        values = values.to(dtype)
        if self.scale != 1.0:
            values = values * self.scale
        return scaled(values, alpha)

    def decode(self, stored, shape, name, dtype):
        numel = math.prod(shape)
        values = stored[self.VALUES]
        positions = torch.cat(
            [*self._blocks(stored, numel, name), torch.empty(0, dtype=torch.int64, device=values.device)]
        )
        if positions.numel() and int(positions[-1]) >= numel:
            raise run_past(name, numel, int(positions[-1]))
        check_value_count(name, positions.numel(), values.numel())
        out = torch.zeros(numel, dtype=dtype, device=values.device)
        out[positions] = self.scaled_values(values, dtype)
        return out.view(shape)

    def rows(self, stored, shape, name, dtype, alpha=1.0):
        # O(kept): only the kept positions of the accumulator change. Same bits as decode + add
        # except the sign of a base -0.0, which adding +0.0 would flip (SPEC §9 allows either).
        numel = math.prod(shape)
        return SparseRows(
            self._blocks(stored, numel, name),
            stored[self.VALUES],
            matrix_shape(tuple(shape))[1],
            numel,
            name,
            lambda v: self.scaled_values(v, dtype, alpha),
            (float(self.scale), float(alpha)) if dtype == torch.float32 else None,
            (self.p, self.seed) if self.index_coding == INDEX_SEEDED else None,
        )

    def factor(self, stored, shape, name, dtype, alpha=1.0, *, compute=torch.float32):
        # Decoded once (every check of a load included), then only the kept entries are held.
        rows, cols = shape
        delta = scaled(self.decode(stored, shape, name, compute), alpha).view(-1)
        positions = delta.nonzero().view(-1)
        if rows * cols < 2**31:
            positions = positions.to(torch.int32)
        return SparseFactor(positions, delta[positions].to(dtype), rows, cols)

    def label(self) -> str:
        detail = f"{self.index_coding} p={self.p:g}" if self.index_coding == INDEX_SEEDED else self.index_coding
        return f"{self.name}({detail}, x{self.scale:.4g})"

    def __repr__(self) -> str:
        return f"SparseEncoding({self.to_dict()})"


def check_value_count(name: str, positions: int, values: int) -> None:
    if positions != values:
        raise CorruptDeltaError(
            f"sparse values of {name!r} do not match their indices",
            expected=f"{positions} values",
            found=f"{values}",
            fix="the delta is corrupt or was written with another seed; re-create it",
        )


class SparseRows(RowDelta):
    """Kept values added a block of rows at a time, walking the positions front to back."""

    def __init__(
        self,
        blocks: Iterator[torch.Tensor],
        values: torch.Tensor,
        cols: int,
        numel: int,
        name: str,
        scaled,
        multipliers: tuple[float, float] | None = None,
        seeded: tuple[float, int] | None = None,
    ):
        """``scaled(values)``: the values as they are added; ``multipliers``: the (scale, alpha)
        that `scaled` applies in float32, for the native loop, or None where it cannot;
        ``seeded``: the (p, seed) of a seeded mask's positions, which that loop draws itself."""
        self.blocks, self.values, self.cols, self.numel = blocks, values, cols, numel
        self.name, self.scaled, self.multipliers, self.seeded = name, scaled, multipliers, seeded
        self.pending = torch.empty(0, dtype=torch.int64, device=values.device)
        self.used = 0  # values consumed so far
        self.next_row = 0

    def _take(self, end: int) -> torch.Tensor:
        """The positions below ``end`` not yet taken."""
        taken = []
        while True:
            if self.pending.numel():
                if int(self.pending[-1]) >= end:
                    cut = int(torch.searchsorted(self.pending, end))
                    taken.append(self.pending[:cut])
                    self.pending = self.pending[cut:]
                    break
                taken.append(self.pending)
            self.pending = next(self.blocks, None)
            if self.pending is None:
                self.pending = self.values.new_empty(0, dtype=torch.int64)
                break
        return taken[0] if len(taken) == 1 else torch.cat([*taken, self.pending[:0]])

    def add_rows(self, acc, start, stop):
        if start != self.next_row:
            raise InvalidArgumentError(
                "sparse row blocks out of order",
                expected=f"a block starting at row {self.next_row}",
                found=f"row {start}",
                fix="add row blocks front to back",
            )
        self.next_row = stop
        first = start * self.cols
        positions = self._take(stop * self.cols)
        count = positions.numel()
        if self.used + count > self.values.numel():
            check_value_count(self.name, self.used + count + sum(b.numel() for b in self._rest()), self.values.numel())
        kept = self.scaled(self.values[self.used : self.used + count])
        self.used += count
        acc.view(-1).index_add_(0, positions.sub_(first) if first else positions, kept)

    def native_part(self):
        if self.multipliers is None or self.values.dtype not in (torch.bfloat16, torch.float32) or self.used:
            return None
        if self.seeded is not None:  # no positions held: the loop draws them
            walk = native_walk(self.numel, *self.seeded, self.name, self.values.numel())
            if walk is not None:
                self.used = self.values.numel()
                return native.SeededPart(*walk, self.values, *self.multipliers)
        positions = self._take(self.numel)
        if self.pending.numel() or next(self.blocks, None) is not None:  # as `finish`: nothing past the end
            raise run_past(self.name, self.numel, int(self.pending[0]) if self.pending.numel() else self.numel)
        check_value_count(self.name, positions.numel(), self.values.numel())
        self.used = positions.numel()
        return native.SparsePart(positions, self.values, *self.multipliers)

    def _rest(self) -> Iterator[torch.Tensor]:
        yield self._take(self.numel)
        yield from self.blocks  # positions past the end (gaps only)

    def finish(self):
        rest = self._take(self.numel)
        if self.pending.numel() or next(self.blocks, None) is not None:
            raise run_past(self.name, self.numel, int(self.pending[0]) if self.pending.numel() else self.numel)
        check_value_count(self.name, self.used + rest.numel(), self.values.numel())


class SparseFactor(Factor):
    """Kept values at flat positions decoded once (int32 where they fit). Under 32 tokens on the CPU
    with the native extension: multiplied at the kept entries only (`native.sparse_product`, one
    multiply-add of a token vector per kept value: 2816 x 1024, p = 0.9, 8 tokens, 0.4-0.9 ms
    against 1.7-2.5 ms for the merge). Otherwise added to a copy of the base weight for each call
    (``index_add``), then one matmul: in torch ops, the product at the kept entries was slower than
    this merge at every batch size (13 ms against 1.2 ms for one token), and a CSR ``torch.sparse``
    product was 3x slower than the merge at 1024 tokens and has no bfloat16 kernel on CPU."""

    def __init__(self, positions: torch.Tensor, values: torch.Tensor, rows: int, cols: int):
        self.positions, self.values, self.rows, self.cols = positions, values, rows, cols

    def apart(self, tokens):
        # A few tokens: one multiply-add per kept value (native), not a copy of the weight to merge into.
        return self.positions.device.type == "cpu" and tokens < MERGE_MIN_TOKENS and native.available()

    def product(self, x):
        product = native.sparse_product(x, self.positions, self.values, self.rows, self.cols)
        if product is None:  # not for this input: the delta as a matrix, then a matmul
            zeros = torch.zeros(self.rows, self.cols, dtype=self.values.dtype, device=self.values.device)
            return F.linear(x, self.merged(zeros).to(x.dtype))
        return product

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

    def sparse(self):
        return self.positions, self.values
