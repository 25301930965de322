"""The budget's hybrid: a matrix's few largest singular directions as ``lowrank-q``, DARE on the rest,
stored as one ``sum`` entry (SPEC §5.11).

Why: DARE's rescaled random drop is unbiased, but its noise grows with the energy it is applied to,
and a fine-tune's delta concentrates a large share of its energy in a few directions (SmolLM2-135M:
the top 4 hold 9-69 % of a matrix's). Taking those out first, at 4 bits per value, leaves DARE a
residual with less energy to be noisy about: on that pair, every linear matrix as top-4 + DARE
(p = 0.98, 4-bit values) kept 98.6 % of the fine-tune's gain at 0.14 bit per weight, DARE alone
94.8 % at 0.09 and 97.8 % at 0.22 (benchmarks/RESULTS.md, "Hybrids"). The allocator prices each
hybrid like any option: its size, and DARE's error measured on the residual (the low-rank part's
own rounding is part of that residual, so DARE carries it too).
"""

from __future__ import annotations

import torch

from ..core.encodings import QuantizedLowRankEncoding, QuantizedSparseEncoding, SumEncoding
from ..core.encodings.base import matrix_shape
from .allocation import GROUP, Option, dare_options, header_bits

HYBRID_RANKS = (4, 16)
"""Singular directions taken out before DARE (a few: the share of energy they hold falls fast)."""
HYBRID_BITS = 4
"""Bits per value of those directions' factors (research15: 4-bit factors match fp16)."""
ROLE_PREFIX_BITS = 8 * len("0.")
"""What a part's role prefix adds to each stored tensor's header entry."""


def low_rank_part(
    delta: torch.Tensor, svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rank: int
) -> tuple[QuantizedLowRankEncoding, dict[str, torch.Tensor], torch.Tensor]:
    """The top ``rank`` triplets of ``svd`` (``delta``'s, as the budget measured it) as ``lowrank-q``:
    the encoding, its stored tensors and its decoded delta (float32, as a reader computes it)."""
    u, s, vh = svd
    encoding = QuantizedLowRankEncoding([[rank, HYBRID_BITS]], GROUP)
    stored = encoding.encode(delta, u=u[:, :rank] * s[:rank], v=vh[:rank])
    decoded = encoding.decode(stored, matrix_shape(tuple(delta.shape)), "", torch.float32)
    return encoding, stored, decoded.view(delta.shape)


def hybrid_options(
    name: str,
    delta: torch.Tensor,
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    seed: int,
    noise_weight: float,
    masks: dict[float, torch.Tensor] | None = None,
    columns: torch.Tensor | None = None,
) -> list[Option]:
    """Top ``r`` of `HYBRID_RANKS` as ``lowrank-q`` plus each DARE option on the residual, its
    rounding split as `allocation.rounding_error` prices it. Offered where ``r`` is at most an
    eighth of the smaller side (in a smaller matrix those directions are most of it, which plain
    ``lowrank-q`` covers)."""
    rows, cols = matrix_shape(tuple(delta.shape))
    options = []
    for rank in HYBRID_RANKS:
        if 8 * rank > min(rows, cols) or svd[1].numel() < rank:
            continue
        _, stored, low = low_rank_part(delta, svd, rank)
        size = sum(8 * t.numel() * t.element_size() for t in stored.values()) + 2 * header_bits(name)
        size += 4 * ROLE_PREFIX_BITS
        for dare in dare_options(name, delta.float() - low, seed, noise_weight, masks, columns, split_rounding=True):
            p, bits = dare.spec[1:]
            label = f"lowrank-q+dare r={rank} {HYBRID_BITS}b p={p:g} {bits}b"
            options.append(Option(label, dare.bits + size, dare.error, ("sum", rank, p, bits)))
    return options


def hybrid_encode(
    name: str,
    delta: torch.Tensor,
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    seed: int,
    rank: int,
    p: float,
    bits: int,
) -> tuple[SumEncoding, dict[str, torch.Tensor]]:
    """The ``sum`` entry `hybrid_options` measured: the low-rank part, then `dare_q` of the residual."""
    low_encoding, low_stored, low = low_rank_part(delta, svd, rank)
    dare_encoding, dare_stored = dare_q(name, delta.float() - low, seed, p, bits)
    encoding = SumEncoding([low_encoding, dare_encoding])
    return encoding, encoding.encode(delta, parts=[low_stored, dare_stored])


def dare_q(name: str, delta: torch.Tensor, seed: int, p: float, bits: int):
    """DARE's seeded mask at drop rate ``p``, kept values as ``bits``-bit codes, rescale ``1/(1-p)``."""
    encoding = QuantizedSparseEncoding("seeded", bits=bits, group=GROUP, count=0, scale=1 / (1 - p), seed=seed, p=p)
    positions = encoding.positions(delta.numel(), name, delta.device)
    encoding = encoding.with_count(int(positions.numel()))
    return encoding, encoding.encode(delta, name=name, positions=positions)
