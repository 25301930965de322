"""``dare``: drop and rescale (Yu et al., "Language Models are Super Mario").

Each delta entry is kept with probability ``1 - p`` and the kept ones are rescaled by
``k / (1 - p)`` (``k = 1`` is DARE; the unified-view paper's ``k`` is a tuning knob), so the
edited delta equals the delta in expectation. The mask is random, so it is not stored: it is the
seeded mask of SPEC §6, regenerated from ``(seed, p, name)`` on any device, and only the kept
values go to disk, raw, with the rescale in the encoding's ``scale`` (a reader can change the
rescale without touching the tensors). With ``value_bits`` of 1-8 the kept values are stored as
codes (``sparse-q``): at 2 bits with clipped scales DARE keeps as much as with 16-bit values
(research15), for a seventh of the size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..core.constants import INDEX_SEEDED
from ..core.encodings import QuantizedSparseEncoding, SparseEncoding
from ..errors import InvalidArgumentError
from .base import Edit, EditMethod, TensorContext, check_drop_rate, check_positive, drop_rate, param, scattered


def seeded_edit(
    name: str, delta: torch.Tensor, context: TensorContext, p: float, scale: float, value_bits: int = 16
) -> Edit:
    """Keep the seeded mask's entries of ``delta`` with rescale ``scale`` (`stored_sparse`)."""
    encoding = SparseEncoding(INDEX_SEEDED, scale=scale, seed=context.seed, p=p)
    # The positions are generated once: encode stores their values, the decoder scatters them back.
    positions = encoding.positions(delta.numel(), name, delta.device)
    stats = {"kept": int(positions.numel()), "rescale": scale}
    return stored_sparse(encoding, name, delta, positions, context, stats, value_bits)


def stored_sparse(
    encoding: SparseEncoding,
    name: str,
    delta: torch.Tensor,
    positions: torch.Tensor,
    context: TensorContext,
    stats: dict[str, Any],
    value_bits: int = 16,
    keep: torch.Tensor | None = None,
) -> Edit:
    """``delta`` at ``positions`` under ``encoding``: values raw in ``context.value_dtype``, or, with
    ``value_bits`` below 16, as codes of that many bits with a 16-bit scale per `VALUE_GROUP`
    values (``sparse-q`` with the same index coding). ``keep``, the positions as a bool tensor of
    ``delta``'s size if the caller has it, spares the bitmask coding building it again."""
    if value_bits < 16:
        coded = QuantizedSparseEncoding(
            encoding.index_coding,
            bits=value_bits,
            group=VALUE_GROUP,
            count=int(positions.numel()),
            scale=encoding.scale,
            seed=encoding.seed,
            p=encoding.p,
        )
        stored = coded.encode(delta, name=name, positions=positions, keep=keep)
        values = coded.kept_values(stored, name, torch.float32)
        return Edit(coded, stored, stats, decoder=scattered(encoding, values, (delta.numel(),), positions))
    stored = encoding.encode(delta, name=name, dtype=context.value_dtype, positions=positions, keep=keep)
    return Edit(
        encoding, stored, stats, decoder=scattered(encoding, stored[encoding.VALUES], (delta.numel(),), positions)
    )


VALUE_GROUP = 64
"""Kept values per 16-bit scale when they are stored as codes: 0.25 bit of scale per value."""


def value_bits_param() -> Any:
    return param(16, help="bits per kept value: 16 stores floats, 1-8 codes with a 16-bit scale per 64 values")


def check_value_bits(method: str, bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not (1 <= bits <= 8 or bits == 16):
        raise InvalidArgumentError(f"{method}: value_bits must be 1 to 8, or 16", expected="e.g. 2", found=repr(bits))
    return bits


@dataclass
class DareMethod(EditMethod, name="dare"):
    """DARE: keep each entry with probability ``1 - p``, rescale by ``k / (1 - p)``.

    Example:
        >>> delta = torch.ones(10_000)
        >>> edit = DareMethod(p=0.75).edit("w", delta, TensorContext("w", seed=0))
        >>> edit.encoding.scale, 2300 < edit.stats["kept"] < 2700
        (4.0, True)
    """

    summary: ClassVar[str] = "drop and rescale"
    tags: ClassVar[tuple[str, ...]] = ("dare",)
    uses_seed: ClassVar[bool] = True
    p: float = drop_rate(0.9)
    k: float = param(1.0, help="DARE rescale factor k: kept entries are scaled by k/(1-p)")
    value_bits: int = value_bits_param()

    def __post_init__(self):
        self.p = check_drop_rate(self.name, self.p)
        self.k = check_positive(self.name, "k", self.k)
        self.value_bits = check_value_bits(self.name, self.value_bits)

    def edit(self, name: str, delta: torch.Tensor, context: TensorContext) -> Edit:
        return seeded_edit(name, delta, context, self.p, self.k / (1.0 - self.p), self.value_bits)
