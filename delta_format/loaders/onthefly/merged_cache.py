"""A bounded cache of the active adapter's merged weights, for small batches.

At a decoding step (a few tokens) an on-the-fly forward is bound by re-decoding every edited
weight: expanding a sign matrix, or copying a weight to add sparse values into it, costs several
times the matmul it feeds (8 x 1 tokens: about 0.3x the materialised model's speed on CPU). Most
serving keeps one adapter active for many steps, so the merged weight ``W + alpha * delta`` of a
module, once formed, can serve every later call until the active adapter changes. The cache holds
such weights up to a byte budget (first come, first kept: every module runs once per step, so
which ones does not matter for speed, only how many bytes).

It is emptied when the active adapter changes and when adapters are attached or detached (the
only way an adapter's alpha changes). Each entry also remembers the factor and the base weight's
storage and version counter it was formed from, so a weight changed in place (an optimizer step,
``load_state_dict``) or a factor replaced is never served stale; a weight given new storage (a cast,
accelerate's offloading, which places it anew for each call) is no longer cached until the next
change of adapter. Calls that may need the weight's gradient (grad enabled and ``requires_grad``)
do not use the cache.

A cached weight is exactly what the merge path forms for a large batch (`Factor.merged`), so a
cached module computes as the materialised fine-tune does at any batch size (bit for bit in
float32). Factors whose separate product is already cheap (``lowrank``: two thin matmuls) are not
cached (`Factor.cache_merged`). The budget trades memory for speed: the default,
`DEFAULT_BUDGET_FRACTION` of the model's parameter bytes, keeps a base serving 4 fine-tunes
(1 x model + 4 encoded adapters + the cache) under 0.4x the memory of 4 materialised copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import InvalidArgumentError

DEFAULT_BUDGET_FRACTION = 0.25
"""Default budget, as a fraction of the bytes of the model's parameters."""


@dataclass
class _Entry:
    merged: torch.Tensor
    factor: object  # the Factor it was formed with (held, so its id cannot be reused)
    storage: int  # the base weight's data_ptr and version counter when merged
    version: int


def check_budget(budget: int) -> int:
    """``budget`` as bytes, refusing anything but a non-negative integer."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise InvalidArgumentError(
            "merged_cache_bytes must be a number of bytes",
            expected="an integer >= 0 (0 turns the cache off) or None for the default",
            found=repr(budget),
        )
    return budget


class MergedWeightCache:
    """``module -> merged weight`` for the active adapter, at most ``budget`` bytes in all."""

    def __init__(self, budget: int):
        self.budget = check_budget(budget)
        self.used = 0
        self._entries: dict[int, _Entry] = {}
        self._full: set[int] = set()  # modules seen while the budget was spent: not asked again

    def merged(self, module, factor) -> torch.Tensor | None:
        """The merged weight of ``module`` (its ``weight``) under ``factor``: the cached one, or a
        new one if it fits the budget, else None (the caller applies the factor itself)."""
        key, weight = id(module), module.weight
        entry = self._entries.get(key)
        if entry is not None:
            if entry.factor is factor and entry.storage == weight.data_ptr() and entry.version == weight._version:
                return entry.merged
            self._drop(key)  # formed from another factor or another base: form it again,
            if entry.storage != weight.data_ptr():  # unless the weight moves between calls (offloading)
                self._full.add(key)
        if key in self._full or not factor.cache_merged:
            return None
        size = weight.numel() * weight.element_size()
        if self.used + size > self.budget:
            self._full.add(key)
            return None
        with torch.no_grad():
            merged = factor.merged(weight)
        self._entries[key] = _Entry(merged, factor, weight.data_ptr(), weight._version)
        self.used += merged.numel() * merged.element_size()
        return merged

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.used -= entry.merged.numel() * entry.merged.element_size()

    def clear(self) -> None:
        """Forget every merged weight (the active adapter or the attached ones changed)."""
        self._entries.clear()
        self._full.clear()
        self.used = 0

    def resize(self, budget: int) -> None:
        """A new budget; the cache starts empty."""
        self.budget = check_budget(budget)
        self.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of the merged weights held now (at most ``budget``)."""
        return self.used

    def __repr__(self) -> str:
        return f"MergedWeightCache({len(self)} weights, {self.used} of {self.budget} bytes)"
