"""A model checkpoint on disk (a base or a fine-tune), and how to find one (local or Hub).

`resolve_checkpoint` turns a local directory or a Hub repo id into a local directory, through
huggingface_hub (cache, revision, token, offline mode: nothing re-implemented). `Checkpoint`
reads a safetensors checkpoint lazily, one tensor at a time, so a whole model is never in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CorruptDeltaError, ResolutionError
from ..core.fingerprint import fingerprint_safetensors

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "README.md"]
"""Files fetched from the Hub for a checkpoint: configs, weights, tokenizer files. Never pickles."""


def resolve_repo(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    allow_patterns: list[str] | None = None,
    what: str = "model",
) -> tuple[Path, str | None]:
    """(local directory, commit sha or None for local paths) of a directory or a Hub repo.

    Hub repos are downloaded with `huggingface_hub.snapshot_download` (restricted to
    ``allow_patterns``), so caching, revisions, tokens and ``HF_HUB_OFFLINE`` behave as everywhere
    else in the ecosystem.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path, None
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ResolutionError(f"{what} {name!r} is not a directory", expected="a local directory or a Hub repo id (user/name)",
                              found="a path that is not a directory" if path.exists() else "no such directory",
                              fix="check the path")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    try:
        local = snapshot_download(
            name, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
            allow_patterns=allow_patterns or CHECKPOINT_PATTERNS,
        )
    except RevisionNotFoundError:
        raise ResolutionError(f"{what} {name!r} has no revision {revision!r}", expected="an existing branch, tag or commit",
                              found=revision, fix="check the revision") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise ResolutionError(f"{what} {name!r} was not found on the Hub", expected="an existing repo you can access",
                              found="no such repo, or a private one", fix="check the name, or pass token= (or log in) for a private repo") from None
    except LocalEntryNotFoundError:
        raise ResolutionError(f"{what} {name!r} is not in the local cache", expected="a cached copy (offline mode)",
                              found="nothing cached", fix="connect once without HF_HUB_OFFLINE/local_files_only to download it") from None
    except (HfHubHTTPError, OSError) as exc:
        raise ResolutionError(f"{what} {name!r} could not be downloaded", expected="a reachable Hub", found=str(exc)[:200],
                              fix="check your connection, HF_ENDPOINT, or use local_files_only=True with a cached copy") from None
    local_path = Path(local)
    sha = local_path.name if local_path.parent.name == "snapshots" else None
    return local_path, sha


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
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CorruptDeltaError(f"{index} is unreadable", expected="a weight_map", found=str(exc)[:100]) from None
            self.weight_map = {k: self.directory / v for k, v in weight_map.items()}
        elif single.is_file():
            self.weight_map = {}
            with self._open_file(single) as f:
                self.weight_map = {k: single for k in f.keys()}
        else:
            found = sorted(p.name for p in self.directory.iterdir())[:10] if self.directory.is_dir() else "no directory"
            raise ResolutionError(f"no safetensors checkpoint in {self.directory}",
                                  expected=f"{SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}", found=found,
                                  fix="save the model with save_pretrained(safe_serialization=True); pickled checkpoints are not read")
        self.files = sorted(set(self.weight_map.values()))
        self._handles: dict[tuple[Path, str], object] = {}
        self._fingerprint: dict | None = None

    @staticmethod
    def _open_file(path: Path, device: str = "cpu"):
        try:
            return safe_open(str(path), framework="pt", device=device)
        except (SafetensorError, OSError) as exc:
            raise CorruptDeltaError(f"{path.name} is not a valid safetensors file", expected="a complete file",
                                    found=str(exc)[:200], fix="re-download the checkpoint") from None

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

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype name) without reading the tensor."""
        view = self._handle(self.weight_map[name], "cpu").get_slice(name)
        return tuple(view.get_shape()), view.get_dtype()

    def get_tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, read straight onto ``device``."""
        return self._handle(self.weight_map[name], str(torch.device(device))).get_tensor(name)

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
