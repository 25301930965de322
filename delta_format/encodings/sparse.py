"""``sparse``: kept values plus where they go, times a rescale (SPEC §5.2).

Role ``values`` holds the kept delta entries in ascending flat (row-major) position order.
Where they go is one of three index codings:

* ``gaps``: role ``gaps`` (``U8``/``U16``/``I32``/``I64``), the number of skipped elements before
  each kept one, so ``index[0] = gaps[0]`` and ``index[i] = index[i-1] + gaps[i] + 1``;
* ``bitmask``: role ``mask``, one bit per element (`delta_format.bits` order), 1 = kept;
* ``seeded``: nothing stored; positions come from `delta_format.seeded_mask` with the config's
  ``seed`` and ``p`` and the parameter name.

Decoded: ``scale * scatter(values)``, zero elsewhere. DARE stores the raw kept entries and puts
its rescale ``k / (1 - p)`` (or DAREx-q's ``1 / q``) in ``scale``, so the rescale can be
changed without touching the tensors.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..bits import count_bits, pack_bits, packed_length, unpack_bits
from ..constants import GAP_DTYPES, INDEX_BITMASK, INDEX_CODINGS, INDEX_GAPS, INDEX_SEEDED, SPARSE
from ..errors import CorruptDeltaError, InvalidArgumentError, ManifestError, UnknownEncodingError
from ..seeded_mask import drop_threshold, gap_table, kept_positions
from .base import FLOAT_STORED, Encoding, Expected, check_config_keys, config_int, config_number, require_finite

_GAP_TORCH = ((255, torch.uint8), (65535, torch.uint16), (2**31 - 1, torch.int32), (2**63 - 1, torch.int64))


def positions_to_gaps(indices: torch.Tensor) -> torch.Tensor:
    """Sorted unique flat indices -> gaps in the narrowest dtype that holds the largest gap."""
    indices = indices.to(torch.int64)
    if indices.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    prev = torch.cat([indices.new_full((1,), -1), indices[:-1]])
    gaps = indices - prev - 1
    largest = int(gaps.max())
    dtype = next(dt for limit, dt in _GAP_TORCH if largest <= limit)
    return gaps.to(dtype)


def gaps_to_positions(gaps: torch.Tensor, numel: int, name: str) -> torch.Tensor:
    """Inverse of `positions_to_gaps`, refusing negative gaps and positions past the end."""
    wide = gaps.to(torch.int64)
    if wide.numel() and int(wide.min()) < 0:
        raise CorruptDeltaError(
            f"sparse gaps of {name!r} are negative", expected="gaps >= 0 (indices sorted and unique)",
            found=f"minimum gap {int(wide.min())}", fix="the delta is corrupt; re-create it",
        )
    positions = torch.cumsum(wide + 1, 0) - 1
    # A sum past 2**63 wraps negative (huge I64 gaps); every wrapped position is stored, so min < 0 finds it.
    if positions.numel() and (int(positions[-1]) >= numel or int(positions.min()) < 0):
        raise CorruptDeltaError(
            f"sparse indices of {name!r} run past the tensor", expected=f"indices < {numel}",
            found=f"last index {int(positions[-1])}", fix="the delta is corrupt; re-create it",
        )
    return positions


def index_coding_bytes(indices: torch.Tensor, numel: int) -> dict[str, int]:
    """Bytes each explicit index coding would take for these positions (choose the cheaper)."""
    gaps = positions_to_gaps(indices)
    return {INDEX_GAPS: gaps.numel() * gaps.element_size(), INDEX_BITMASK: packed_length(numel)}


class SparseEncoding(Encoding):
    """Kept values with an index coding and a rescale.

    Example:
        >>> enc = SparseEncoding("seeded", scale=2.0, seed=1, p=0.5)
        >>> delta = torch.arange(8.0)
        >>> stored = enc.encode(delta, name="w")
        >>> restored = enc.decode(stored, (8,), "w", torch.float32)
        >>> bool(((restored == 0) | (restored == 2 * delta)).all())
        True
    """

    name = SPARSE

    def __init__(self, index_coding: str, scale: float = 1.0, seed: int | None = None, p: float | None = None):
        if index_coding not in INDEX_CODINGS:
            raise UnknownEncodingError("unknown sparse index coding", expected=INDEX_CODINGS, found=repr(index_coding))
        if not math.isfinite(scale):
            raise ManifestError("sparse scale is not finite", expected="a finite number", found=repr(scale))
        if index_coding == INDEX_SEEDED:
            if seed is None or p is None:
                raise ManifestError("seeded sparse coding needs seed and p", expected="both", found=f"seed={seed}, p={p}")
            drop_threshold(p)
        self.index_coding = index_coding
        self.scale = float(scale)
        self.seed = seed
        self.p = None if p is None else float(p)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "SparseEncoding":
        coding = config.get("index_coding") if isinstance(config, Mapping) else None
        if coding == INDEX_SEEDED:
            check_config_keys(cls.name, config, {"index_coding", "seed", "p"}, {"scale"})
            p = config_number(cls.name, config, "p")
            if not 0.0 <= p < 1.0:
                raise ManifestError("seeded sparse p is out of range", expected="0 <= p < 1", found=repr(p))
            try:
                gap_table(p)
            except InvalidArgumentError as exc:
                raise ManifestError("seeded sparse p cannot be generated", expected=exc.expected, found=exc.found,
                                    fix="re-create the delta with a smaller p or an explicit index coding") from None
            return cls(coding, config_number(cls.name, config, "scale", 1.0), config_int(cls.name, config, "seed", 0, 2**64), p)
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
        roles = {"values": Expected(FLOAT_STORED, (None,))}
        if self.index_coding == INDEX_GAPS:
            roles["gaps"] = Expected(GAP_DTYPES, (None,))
        elif self.index_coding == INDEX_BITMASK:
            roles["mask"] = Expected(("U8",), (packed_length(math.prod(shape)),))
        return roles

    def _check_seeded_count(self, numel: int, count: int, name: str) -> None:
        """Refuse, before generating any position, a value count a seeded mask of this size
        cannot produce (beyond 8 standard deviations): a hostile shape must not make us work."""
        keep = 1.0 - self.p
        mean, sd = numel * keep, math.sqrt(numel * keep * self.p)
        if abs(count - mean) > 8 * sd + 16:
            raise CorruptDeltaError(
                f"sparse values of {name!r} cannot come from a seeded mask of this shape",
                expected=f"about {mean:.0f} values (p={self.p}, {numel} elements)", found=f"{count}",
                fix="the delta is corrupt; re-create it",
            )

    def positions(self, numel: int, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The seeded mask's kept positions (seeded coding only)."""
        return kept_positions(numel, self.p, self.seed, name, device)

    def encode(
        self, delta: torch.Tensor, name: str, indices: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """Store ``delta``'s entries at ``indices`` (sorted, unique; implied by the seed when seeded)."""
        flat = delta.reshape(-1)
        if self.index_coding == INDEX_SEEDED:
            if indices is not None:
                raise ManifestError("seeded coding derives its indices", expected="indices=None", found="indices given")
            indices = self.positions(flat.numel(), name, flat.device)
        elif indices is None:
            raise ManifestError("explicit index codings need indices", expected="a tensor of indices", found="None")
        indices = indices.to(torch.int64)
        stored = {"values": flat[indices].to(dtype or delta.dtype).contiguous()}
        if self.index_coding == INDEX_GAPS:
            stored["gaps"] = positions_to_gaps(indices.cpu()).to(flat.device)
        elif self.index_coding == INDEX_BITMASK:
            mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            mask[indices] = True
            stored["mask"] = pack_bits(mask)
        return stored

    def _kept(self, stored, numel: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat positions, values) after every consistency check."""
        values = stored["values"]
        require_finite(name, "values", values)
        if self.index_coding == INDEX_GAPS:
            positions = gaps_to_positions(stored["gaps"], numel, name)
        elif self.index_coding == INDEX_BITMASK:
            mask = unpack_bits(stored["mask"], numel)
            if count_bits(stored["mask"]) != values.numel():
                raise CorruptDeltaError(
                    f"sparse bitmask of {name!r} disagrees with its values",
                    expected=f"{values.numel()} set bits", found=f"{count_bits(stored['mask'])}",
                    fix="the delta is corrupt; re-create it",
                )
            positions = mask.nonzero().view(-1)
        else:
            self._check_seeded_count(numel, values.numel(), name)
            positions = self.positions(numel, name, values.device)
        if positions.numel() != values.numel():
            raise CorruptDeltaError(
                f"sparse values of {name!r} do not match their indices",
                expected=f"{positions.numel()} values", found=f"{values.numel()}",
                fix="the delta is corrupt or was written with another seed; re-create it",
            )
        return positions, values

    def _scaled(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        values = values.to(dtype)
        return values * self.scale if self.scale != 1.0 else values

    def decode(self, stored, shape, name, dtype):
        numel = math.prod(shape)
        positions, values = self._kept(stored, numel, name)
        out = torch.zeros(numel, dtype=dtype, device=values.device)
        out[positions] = self._scaled(values, dtype)
        return out.view(shape)

    def accumulate(self, target, stored, shape, name, alpha):
        # O(kept): only the kept positions of the accumulator change. Same bits as decode + add
        # except the sign of a base -0.0, which adding +0.0 would flip (SPEC §9 allows either).
        positions, values = self._kept(stored, target.numel(), name)
        kept = self._scaled(values, target.dtype)
        if alpha != 1.0:
            kept = kept * alpha
        target.view(-1).index_add_(0, positions, kept)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SparseEncoding) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        return f"SparseEncoding({self.to_dict()})"
