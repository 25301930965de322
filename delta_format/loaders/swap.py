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

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch

from ..core.constants import MANIFEST_NAME, MAX_MANIFEST_BYTES
from ..core.reconstruct import reconstruct_stored
from ..errors import BaseMismatchError
from ..io.checkpoint import Checkpoint
from ..io.delta import Delta
from ..io.delta_files import safe_member
from ..io.key_map import model_names
from ..io.reader import read_bounded
from ..io.resolve import HubOptions, open_delta, resolve_repo
from .delta_checks import check_delta, scale_from

DEFAULT_CACHE_BYTES = 1 << 30


def manifest_digest(directory: Path) -> str:
    """SHA-256 of a delta's manifest: it records the size and SHA-256 of every other file, so it
    names the delta's content (a cache key that cannot serve a stale delta)."""
    path = safe_member(directory, MANIFEST_NAME, "the manifest")
    return hashlib.sha256(read_bounded(path, MAX_MANIFEST_BYTES, MANIFEST_NAME)).hexdigest()


class DeltaCache:
    """Opened deltas by source, least recently used evicted beyond ``max_bytes`` of stored data."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, Delta] = OrderedDict()

    def get(self, key: Hashable, open_delta: Callable[[], Delta]) -> Delta:
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

    def __init__(
        self,
        model,
        base: Checkpoint,
        active: list[tuple[Delta, float]],
        hub: HubOptions | None = None,
        *,
        verify_base: bool = True,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        self.model = model
        self.base = base
        self.active = active
        self.hub = hub or HubOptions()
        """How deltas named in `swap` are fetched (each option can be overridden per swap)."""
        self.verify_base = verify_base
        """Check each new delta's base fingerprint, as `DeltaModel.from_pretrained` was asked to."""
        self.cache = DeltaCache(cache_bytes)

    @property
    def active_deltas(self) -> list[Delta]:
        return [d for d, _ in self.active]

    def _check(self, delta: Delta, scale: float) -> None:
        """`check_delta` against the loaded base and the model, before anything changes."""
        check_delta(delta, self.base, scale=scale, model=self.model, verify_base=self.verify_base)

    def _write(self, names: set[str], deltas: list[tuple[Delta, float]]) -> None:
        state = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name in sorted(names):
                param = state[name]
                editing = [(d, s) for d, s in deltas if name in d.manifest.tensors]
                parts = [(d.manifest.tensors[name], d.reader.stored(name, param.device), s) for d, s in editing]
                if parts:  # written straight into the parameter, a block of rows at a time
                    base = self.base.read(name, param.device) if name in self.base else None
                    source = editing[0][0].reader.source_name(name)  # seeds masks and rounding
                    reconstruct_stored(source, parts, base, dtype=param.dtype, out=param)
                else:
                    param.copy_(self.base.read(name, param.device))

    def swap(self, delta: Delta | str | os.PathLike, *, alpha: float | None = None, **hub_options: Any) -> None:
        """Make ``delta`` (directory, repo id or `Delta`) the active fine-tune, in place.

        ``hub_options`` (``revision=``, ``token=``, ...) override the Hub options the model was
        loaded with, for this delta.
        """
        scale = 1.0 if alpha is None else scale_from(alpha)
        if isinstance(delta, Delta):
            new = delta
        else:
            hub = self.hub.updated(**hub_options)
            directory, _ = resolve_repo(delta, hub, what="delta")
            # Keyed by content: a delta published again at the same path is another delta.
            key = (directory.resolve(), manifest_digest(directory))
            new = self.cache.get(key, lambda: open_delta(delta, hub))
        names = model_names(self.model, new.manifest.tensors)
        if names:  # the names the model holds them under, as the first load saw them
            new = new.renamed(names)
        self._check(new, scale)
        self._replace([(new, scale)])

    def remove(self) -> None:
        """Back to the plain base model."""
        self._replace([])

    def _replace(self, new: list[tuple[Delta, float]]) -> None:
        touched = {n for d, _ in self.active + new for n in d.manifest.tensors}
        state = self.model.state_dict(keep_vars=True)
        for name in touched - {n for d, _ in new for n in d.manifest.tensors}:
            if name not in self.base or self.base.shape_dtype(name)[0] != tuple(state[name].shape):
                raise BaseMismatchError(
                    f"{name!r} cannot be restored from the base",
                    expected=list(state[name].shape),
                    found="missing" if name not in self.base else list(self.base.shape_dtype(name)[0]),
                    fix="deltas that resize or add tensors need a fresh from_pretrained",
                )
        old = self.active
        try:
            self._write(touched, new)
        except BaseException as exc:
            try:
                self._write(touched, old)  # put the previous fine-tune back before reporting
            except Exception as failed:  # never hide the error that matters behind this one
                exc.add_note(f"the previous fine-tune could not be restored ({failed!r}); reload the model")
            raise
        self.active = new
        self.model.tie_weights()


def attach_swapper(model, swapper: DeltaSwapper) -> None:
    """Give ``model`` its swapper and the ``swap_delta``/``remove_delta`` helpers."""
    model.delta_swapper = swapper
    model.swap_delta = swapper.swap
    model.remove_delta = swapper.remove
