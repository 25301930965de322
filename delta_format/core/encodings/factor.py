"""What an encoding gives for on-the-fly adapters: one delta on one matrix, times its alpha, kept
in its stored form and ready for a forward (the product with an input, the merged weight, or rows
of an embedding). Each encoding's `Factor` lives in its own module (`SignFactor` in ``sign.py``,
...), built by `Encoding.factor`."""

from __future__ import annotations

import torch

MERGE_MIN_TOKENS = 32
"""From this many tokens in a call, a ``sign``/``dense`` delta is added to the weight for the call
(one elementwise pass over the matrix, then one matmul) instead of multiplied separately (a second
full matmul). Measured on CPU (2 cores, 2816 x 1024, float32 and bfloat16): separate products win
at 1 token, tie near 16, and cost 2x the merge at 1024 tokens, where the merge costs +10-30 %."""


class Factor:
    """``alpha * delta`` of one ``rows x cols`` matrix, kept in its stored form on the weight's
    device, in the weight's dtype."""

    rows: int
    cols: int
    cache_merged = True
    """Whether on-the-fly serving may keep ``merged(weight)`` across calls while this factor's
    adapter is active (`MergedWeightCache`): worth it where each call would otherwise decode the
    whole matrix again."""

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ (alpha * delta).T`` for ``x`` of shape ``[..., cols]`` (called where `apart`)."""
        raise NotImplementedError

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + alpha * delta``, a new tensor (``weight`` is not modified)."""
        raise NotImplementedError

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of ``alpha * delta``, shape ``[*ids.shape, cols]`` (embedding lookups)."""
        raise NotImplementedError

    def add_gathered(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``rows`` (the weight's rows ``ids``, modified) plus `gather`'s, in the weight's dtype."""
        return rows.add_(self.gather(ids))

    def apart(self, tokens: int) -> bool:
        """Whether `product` is cheaper than `merged` for a call on ``tokens`` input rows."""
        return tokens < MERGE_MIN_TOKENS

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def sparse(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(flat positions, values)`` where ``alpha * delta`` is zero at every other position, or
        None: lets a dithered merge round only the positions the delta changes."""
        return None

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device
