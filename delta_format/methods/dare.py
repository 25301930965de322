"""``dare``: drop and rescale (Yu et al., "Language Models are Super Mario").

Each delta entry is kept with probability ``1 - p`` and the kept ones are rescaled by
``k / (1 - p)`` (``k = 1`` is DARE; the unified-view paper's ``k`` is a tuning knob), so the
edited delta equals the delta in expectation. The mask is random, so it is not stored: it is the
seeded mask of SPEC §6, regenerated from ``(seed, p, name)`` on any device, and only the kept
values go to disk, raw, with the rescale in the encoding's ``scale`` (a reader can change the
rescale without touching the tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.constants import INDEX_SEEDED
from ..core.encodings import SparseEncoding
from .base import Edit, EditMethod, TensorContext, check_drop_rate, check_positive, drop_rate, param, scattered


def seeded_edit(name: str, delta: torch.Tensor, context: TensorContext, p: float, scale: float) -> Edit:
    """Keep the seeded mask's entries of ``delta`` (values stored raw) with rescale ``scale``."""
    encoding = SparseEncoding(INDEX_SEEDED, scale=scale, seed=context.seed, p=p)
    # The positions are generated once: encode stores their values, the decoder scatters them back.
    positions = encoding.positions(delta.numel(), name, delta.device)
    stored = encoding.encode(delta, name=name, dtype=context.value_dtype, positions=positions)
    return Edit(
        encoding,
        stored,
        {"kept": int(positions.numel()), "rescale": scale},
        decoder=scattered(encoding, stored[encoding.VALUES], (delta.numel(),), positions),
    )


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

    def __post_init__(self):
        self.p = check_drop_rate(self.name, self.p)
        self.k = check_positive(self.name, "k", self.k)

    def edit(self, name: str, delta: torch.Tensor, context: TensorContext) -> Edit:
        return seeded_edit(name, delta, context, self.p, self.k / (1.0 - self.p))
