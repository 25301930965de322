"""The SHA-256 of every tensor file a manifest lists (SPEC §3.4), computed by reading the file
(`file_sha256`, what a reader checks) or while writing it (`save_hashed`, what a writer records).

Both reader and writer import this module, so neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..core.dtypes import dtype_name


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


SAFETENSORS_METADATA = {"format": "pt"}
_SAFETENSORS_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "I8", "U8", "BOOL")
"""How safetensors lays tensors out in a file: by dtype in this order, then by name."""


def _expected_layout(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, list[torch.Tensor], int] | None:
    """(header bytes, tensors in file order, file size) that ``save_file`` is expected to write."""
    dtypes = {key: dtype_name(tensor.dtype) for key, tensor in tensors.items()}
    if not all(d in _SAFETENSORS_ORDER for d in dtypes.values()):
        return None
    header: dict[str, Any] = {"__metadata__": SAFETENSORS_METADATA}
    ordered, offset = [], 0
    for key in sorted(tensors, key=lambda k: (_SAFETENSORS_ORDER.index(dtypes[k]), k)):
        tensor = tensors[key]
        end = offset + tensor.numel() * tensor.element_size()
        header[key] = {"dtype": dtypes[key], "shape": list(tensor.shape), "data_offsets": [offset, end]}
        ordered.append(tensor)
        offset = end
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, ordered, 8 + len(text) + offset


def save_hashed(tensors: Mapping[str, torch.Tensor], path: Path) -> str | None:
    """``save_file(tensors, path)``, and the hex SHA-256 of the file it wrote, or None if unknown.

    The hash is computed from the tensors in memory while the file is being written (both
    release the GIL), rather than by reading the file back afterwards; it covers the header
    safetensors is expected to write (`_expected_layout`), so it counts only if the file starts
    with exactly that header and has the expected size (else None: hash the file).
    """
    layout = _expected_layout(tensors)
    if layout is None:
        save_file(dict(tensors), str(path), metadata=SAFETENSORS_METADATA)
        return None
    prefix, ordered, size = layout
    digest, failed = hashlib.sha256(prefix), []

    def hash_tensors() -> None:
        try:
            for tensor in ordered:
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        except Exception as exc:  # pragma: no cover - then the file is hashed instead
            failed.append(exc)

    worker = threading.Thread(target=hash_tensors, name="delta-format-sha256", daemon=True)
    worker.start()
    try:
        save_file(dict(tensors), str(path), metadata=SAFETENSORS_METADATA)
    finally:
        worker.join()
    with open(path, "rb") as f:
        written = f.read(len(prefix))
    if failed or written != prefix or path.stat().st_size != size:
        return None
    return digest.hexdigest()
