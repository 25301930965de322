"""The budget's ``rows-q`` options (SPEC §5.12): the top rows of a lookup table, by energy.

A fine-tune moves the embedding rows of the tokens it saw (Adam leaves a row without gradient
where it was; weight decay moves it a little): an untied input embedding's delta is row-sparse.
On the MiniLM pair the top 4096 of 30522 rows hold 98.6 % of the word embedding's delta energy;
low rank cannot hold it (full rank) and DARE's noise would reach every token reading a row.
Offered only for tables that are not a head (nor tied to one): a head's rows all weigh in every
token's softmax. SmolLM2's tied table, once mistaken for an input embedding (weight 0.3, rows
offered), lost 1-3 points of the gain at 0.1-0.5 bit (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch

from ..core.quant import group_count, packed_bytes
from .allocation import GROUP, HEADER_BITS, Option, group_absmax, quantized_error, sampled_groups

ROWS_SHARES = (0.5, 0.8, 0.9, 0.95, 0.99)
"""Shares of a lookup table's delta energy at which ``rows-q`` offers to keep the top rows."""
ROWS_BITS = (2, 3, 4, 8)


def top_rows(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices by decreasing energy (ties by index) and their energies (float64)."""
    energy = delta.reshape(delta.shape[0], -1).double().square().sum(1)
    order = torch.argsort(energy, descending=True, stable=True)
    return order, energy[order]


def rows_options(delta: torch.Tensor, header: int = HEADER_BITS) -> list[Option]:
    """``rows-q``: the top ``k`` rows at each of `ROWS_BITS`, for the ``k`` holding each of
    `ROWS_SHARES` of the energy and for every nonzero row (a fine-tune that left the other rows
    alone); ``k`` below the row count. Error: the energy of the rows left out plus the kept rows'
    rounding, measured on `sampled_groups` of them."""
    matrix = delta.reshape(delta.shape[0], -1).float()
    rows, cols = matrix.shape
    order, energy = top_rows(matrix)
    total = float(energy.sum())
    if total == 0:
        return []
    cumulative = energy.cumsum(0)
    counts = {int(torch.searchsorted(cumulative, share * total)) + 1 for share in ROWS_SHARES}
    counts.add(int((energy > 0).sum()))
    options = []
    for k in sorted(c for c in counts if 0 < c < rows):
        kept = matrix[order[:k]].reshape(-1)
        sample, factor = sampled_groups(kept, cols)
        amax = group_absmax(kept)
        left = max(total - float(cumulative[k - 1]), 0.0)
        for bits in ROWS_BITS:
            error, dtype = quantized_error(sample, bits, amax)
            size = 32 * k + 8 * packed_bytes(k * cols, bits) + group_count(k * cols, GROUP) * 8 * dtype.itemsize
            options.append(
                Option(f"rows-q {k} rows {bits}b", size + 3 * header, left + error * factor, ("rows-q", k, bits))
            )
    return options
