"""Crafting hostile deltas the way an attacker would: edit the manifest or the files, then
re-compute every size and SHA-256 in ``files`` so the integrity check passes and the deeper logic
(decoding, base checks, swapping, on-the-fly serving) runs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from delta_format.core.constants import MANIFEST_NAME, MODEL_CARD_NAME


def rehash(directory: Path) -> None:
    """Make ``files`` vouch for every regular file now in ``directory`` (but the manifest and the
    card), with its current size and SHA-256. Raw bytes keep whatever the manifest holds."""
    path = directory / MANIFEST_NAME
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except ValueError:
        return  # not JSON any more: nothing to re-hash
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return
    files = {}
    for file in sorted(directory.rglob("*")):
        name = file.relative_to(directory).as_posix()
        if name in (MANIFEST_NAME, MODEL_CARD_NAME) or file.is_symlink() or not file.is_file():
            continue
        data = file.read_bytes()
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["files"] = files
    path.write_text(json.dumps(manifest))


def edit_manifest(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``change`` to the manifest, then `rehash`."""
    path = directory / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    rehash(directory)


def replace_stored(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Rewrite ``delta.safetensors`` with ``tensors``, then `rehash`."""
    save_file(tensors, str(directory / "delta.safetensors"), metadata={"format": "pt"})
    rehash(directory)
