"""A model checkpoint on disk (a base or a fine-tune): its file names, and `Checkpoint`, which
reads a safetensors checkpoint lazily, one tensor at a time, so a whole model is never in memory.

Finding one (a local directory or a Hub repo id) is `delta_format.io.resolve.resolve_repo`,
re-exported here for the callers that import it from this module.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..core.fingerprint import fingerprint_safetensors
from ..core.strict_json import loads_strict
from ..errors import CorruptDeltaError, ResolutionError
from .key_map import check_unique
from .resolve import CHECKPOINT_PATTERNS, resolve_repo  # noqa: F401  (re-exported)
from .shards import ShardLayout
from .tensor_reads import read_range, tensor_ranges

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

CHECKPOINT_SHARD_TEMPLATE = "model-{index:05d}-of-{total:05d}.safetensors"
CHECKPOINT_LAYOUT = ShardLayout(SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, CHECKPOINT_SHARD_TEMPLATE)
"""A transformers checkpoint's weight files (what ``save_pretrained`` writes and ``apply`` writes)."""


class Checkpoint:
    """A safetensors checkpoint directory (``model.safetensors`` or shards + index).

    Example:
        >>> ckpt = Checkpoint("path/to/model")          # doctest: +SKIP
        >>> for name in ckpt: tensor = ckpt.get_tensor(name)  # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike, commit_sha: str | None = None):
        self.directory = Path(directory)
        self.commit_sha = commit_sha
        """The Hub commit the files came from (None for a local directory)."""
        index = self.directory / SAFE_WEIGHTS_INDEX_NAME
        single = self.directory / SAFE_WEIGHTS_NAME
        if index.is_file():
            weight_map = loads_strict(index.read_bytes(), str(index), CorruptDeltaError)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CorruptDeltaError(f"{index} is unreadable", expected="a weight_map", found=repr(weight_map)[:100])
            self.weight_map = {k: self.directory / v for k, v in weight_map.items()}
        elif single.is_file():
            self.weight_map = {}
            with self._open_file(single) as f:
                self.weight_map = {k: single for k in f.keys()}
        else:
            found = sorted(p.name for p in self.directory.iterdir())[:10] if self.directory.is_dir() else "no directory"
            raise ResolutionError(
                f"no safetensors checkpoint in {self.directory}",
                expected=f"{SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}",
                found=found,
                fix="save the model with save_pretrained(safe_serialization=True); pickled checkpoints are not read",
            )
        self.files = sorted(set(self.weight_map.values()))
        self._sources: dict[str, str] = {}
        self._handles: dict[tuple[Path, str], object] = {}
        self._ranges: dict[Path, dict] = {}
        self._fingerprint: dict | None = None

    @staticmethod
    def _open_file(path: Path, device: str = "cpu"):
        try:
            return safe_open(str(path), framework="pt", device=device)
        except (SafetensorError, OSError) as exc:
            raise CorruptDeltaError(
                f"{path.name} is not a valid safetensors file",
                expected="a complete file",
                found=str(exc)[:200],
                fix="re-download the checkpoint",
            ) from None

    def _handle(self, path: Path, device: str):
        key = (path, device)
        if key not in self._handles:
            self._handles[key] = self._open_file(path, device)
        return self._handles[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self.weight_map

    def __len__(self) -> int:
        return len(self.weight_map)

    def renamed(self, names: dict[str, str]) -> Checkpoint:
        """A view of this checkpoint whose tensors carry other names (``{name in the files: new
        name}``, e.g. the model's names transformers maps a checkpoint's keys to), sharing its
        open files; its fingerprint is still that of the files (SPEC §7)."""
        check_unique(names, self.weight_map, f"the checkpoint at {self.directory}")
        view = copy.copy(self)
        view.weight_map = {names.get(n, n): path for n, path in self.weight_map.items()}
        view._sources = {names.get(n, n): self._source(n) for n in self.weight_map if names.get(n, n) != n}
        return view

    def _source(self, name: str) -> str:
        return self._sources.get(name, name)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype name) without reading the tensor."""
        view = self._handle(self.weight_map[name], "cpu").get_slice(self._source(name))
        return tuple(view.get_shape()), view.get_dtype()

    def get_tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, read straight onto ``device``."""
        return self._handle(self.weight_map[name], str(torch.device(device))).get_tensor(self._source(name))

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """`get_tensor` for repeated reads (hot swaps): through `read_range`, which keeps nothing
        per call where safetensors' ``get_tensor`` on a kept handle leaks a few KB."""
        path = self.weight_map[name]
        if path not in self._ranges:
            self._handle(path, "cpu")  # safetensors validates the header first
            self._ranges[path] = tensor_ranges(path)
        return read_range(path, self._ranges[path][self._source(name)], device)

    def config(self) -> dict:
        path = self.directory / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def fingerprint(self) -> dict:
        """The base fingerprint of these files (SPEC §7), computed once."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_safetensors(self.files)
        return self._fingerprint

    def close(self) -> None:
        self._handles.clear()
