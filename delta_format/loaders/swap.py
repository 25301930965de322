"""Serving many fine-tunes from one loaded base: swap the active delta in place.

A model returned by `DeltaModel.from_pretrained` carries a `DeltaSwapper` (``model.delta_swapper``)
and two bound helpers, ``model.swap_delta(...)`` and ``model.remove_delta()``. A swap rewrites only
the parameters that the old or the new delta touches, in place (no second model in memory), from
the base tensors re-read through the memory-mapped base files: the result is computed exactly as a
fresh load computes it, so weights after any sequence of swaps equal a fresh `from_pretrained`
bit for bit, and rounding cannot drift.

Opened deltas are kept in a small LRU cache bounded by their stored bytes, so switching between a
few fine-tunes costs only decoding.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable

import torch

from ..io.checkpoint import Checkpoint
from ..io.delta import Delta
from ..errors import BaseMismatchError
from ..core.fingerprint import fingerprint_differences
from ..core.reconstruct import reconstruct_stored

DEFAULT_CACHE_BYTES = 1 << 30


class DeltaCache:
    """Opened deltas by source, least recently used evicted beyond ``max_bytes`` of stored data."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Delta] = OrderedDict()

    def get(self, key: str, open_delta: Callable[[], Delta]) -> Delta:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        delta = open_delta()
        self._items[key] = delta
        while len(self._items) > 1 and self.nbytes > self.max_bytes:
            self._items.popitem(last=False)
        return delta

    @property
    def nbytes(self) -> int:
        return sum(d.reader.stored_bytes() for d in self._items.values())

    def __len__(self) -> int:
        return len(self._items)


class DeltaSwapper:
    """The state a loaded model needs to change its delta: its base, the active deltas, a cache."""

    def __init__(self, model, base: Checkpoint, base_fingerprint: dict | None, active: list[tuple[Delta, float]],
                 open_delta: Callable[..., Delta], cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.model = model
        self.base = base
        self.base_fingerprint = base_fingerprint
        self.active = active
        self._open_delta = open_delta
        self.cache = DeltaCache(cache_bytes)

    @property
    def active_deltas(self) -> list[Delta]:
        return [d for d, _ in self.active]

    def _check_base(self, delta: Delta) -> None:
        expected = delta.manifest.base.fingerprint
        if self.base_fingerprint is None or expected is None:
            return
        differences = fingerprint_differences(expected, self.base_fingerprint)
        if differences:
            raise BaseMismatchError(
                "the delta was made against another base than the loaded one",
                expected=f"a delta of base {self.base_fingerprint['digest'][:16]}",
                found=f"{delta.manifest.base.describe()} ({'; '.join(differences)})",
                fix="load that delta with DeltaModel.from_pretrained instead",
            )
        state = self.model.state_dict(keep_vars=True)
        for name, entry in delta.manifest.tensors.items():
            if name not in state or tuple(state[name].shape) != tuple(entry.shape):
                found = "missing" if name not in state else list(state[name].shape)
                raise BaseMismatchError(f"the delta's {name!r} does not fit the loaded model",
                                        expected=list(entry.shape), found=found,
                                        fix="deltas that resize tensors need a fresh from_pretrained")

    def _write(self, names: set[str], deltas: list[tuple[Delta, float]]) -> None:
        state = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name in sorted(names):
                param = state[name]
                parts = [(d.manifest.tensors[name], d.reader.stored(name, param.device), s)
                         for d, s in deltas if name in d.manifest.tensors]
                if parts:  # written straight into the parameter, a block of rows at a time
                    base = self.base.get_tensor(name, param.device) if name in self.base else None
                    reconstruct_stored(name, parts, base, dtype=param.dtype, out=param)
                else:
                    param.copy_(self.base.get_tensor(name, param.device))

    def swap(self, delta: Any, *, alpha: float | None = None, **resolve_kwargs: Any) -> None:
        """Make ``delta`` (directory, repo id or `Delta`) the active fine-tune, in place."""
        if isinstance(delta, Delta):
            new = delta
        else:
            key = f"{os.fspath(delta)}@{resolve_kwargs.get('revision')}"
            new = self.cache.get(key, lambda: self._open_delta(delta, **resolve_kwargs))
        self._check_base(new)
        self._replace([(new, 1.0 if alpha is None else float(alpha))])

    def remove(self) -> None:
        """Back to the plain base model."""
        self._replace([])

    def _replace(self, new: list[tuple[Delta, float]]) -> None:
        touched = {n for d, _ in self.active + new for n in d.manifest.tensors}
        state = self.model.state_dict(keep_vars=True)
        for name in touched - {n for d, _ in new for n in d.manifest.tensors}:
            if name not in self.base or self.base.shape_dtype(name)[0] != tuple(state[name].shape):
                raise BaseMismatchError(f"{name!r} cannot be restored from the base", expected=list(state[name].shape),
                                        found="missing" if name not in self.base else list(self.base.shape_dtype(name)[0]),
                                        fix="deltas that resize or add tensors need a fresh from_pretrained")
        old = self.active
        try:
            self._write(touched, new)
        except BaseException:
            self._write(touched, old)  # put the previous fine-tune back before reporting
            raise
        self.active = new
        self.model.tie_weights()


def attach_swapper(model, swapper: DeltaSwapper) -> None:
    """Give ``model`` its swapper and the ``swap_delta``/``remove_delta`` helpers."""
    model.delta_swapper = swapper
    model.swap_delta = swapper.swap
    model.remove_delta = swapper.remove
