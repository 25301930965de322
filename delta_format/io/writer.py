"""Writing a delta directory atomically (SPEC §2, §4).

`DeltaWriter` validates each parameter's stored tensors against its encoding, collects them shard
by shard (`ShardedSafetensorsWriter`: at most ``max_shard_size`` bytes held in memory, each
file's SHA-256 computed while it is written), then publishes the directory in one rename
(`StagingDirectory`): until `DeltaWriter.close` returns, nothing exists at the output path.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..core.constants import MANIFEST_NAME
from ..core.dtypes import dtype_name
from ..core.manifest import BaseReference, Manifest, TensorEntry, stored_key
from ..errors import CorruptDeltaError, InvalidArgumentError, NumericalError
from .checksums import file_sha256
from .shards import DELTA_LAYOUT, ShardedSafetensorsWriter
from .staging import StagingDirectory

DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in a non-empty float tensor: its minimum and maximum are finite (NaN
    propagates through both). One read-only reduction, ~20x faster than ``isfinite().all()``,
    which writes a bool per element."""
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


class DeltaWriter:
    """Write a delta: `add` each edited parameter, `add_file` the fine-tune's config/tokenizer
    files, then `close`. Use it as a context manager so an exception discards everything.

    Example:
        >>> import tempfile, torch
        >>> from delta_format.core.encodings import DenseEncoding
        >>> out = tempfile.mkdtemp() + "/delta"
        >>> with DeltaWriter(out, base=BaseReference(local_path="base"), method="dense") as w:
        ...     enc = DenseEncoding()
        ...     w.add("w", TensorEntry(enc, (2,), "float32"), enc.encode(torch.ones(2)))
        >>> sorted(p.name for p in Path(out).iterdir())
        ['delta.safetensors', 'delta_config.json']
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        base: BaseReference,
        method: str,
        method_params: Mapping[str, Any] | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        overwrite: bool = False,
    ):
        self.manifest = Manifest(
            base=base,
            method=method,
            method_params=dict(method_params or {}),
            tensors={},
            created_by=f"delta-format {__version__}",
        )
        self._staging = StagingDirectory(out_dir, overwrite)
        try:
            self._shards = ShardedSafetensorsWriter(
                self._staging.path, DELTA_LAYOUT, max_shard_size, record_sha256=True
            )
        except BaseException:
            self._staging.discard()
            raise
        self._closed = False

    @property
    def max_shard_size(self) -> int:
        return self._shards.max_shard_size

    @property
    def out_dir(self) -> Path:
        return self._staging.out_dir

    def add(self, name: str, entry: TensorEntry, stored: Mapping[str, torch.Tensor]) -> None:
        """Add one parameter: its manifest entry and its stored tensors by role."""
        if name in self.manifest.tensors:
            raise InvalidArgumentError("parameter added twice", expected="unique names", found=repr(name))
        expected = entry.encoding.expected(entry.shape)
        if set(stored) != set(expected):
            raise CorruptDeltaError(
                f"{name!r}: stored roles do not match {entry.encoding.name}",
                expected=sorted(expected),
                found=sorted(stored),
            )
        for role, tensor in stored.items():
            expected[role].check(stored_key(name, role), dtype_name(tensor.dtype), tuple(tensor.shape))
            if tensor.is_floating_point() and tensor.numel() and not _all_finite(tensor):
                raise NumericalError(
                    f"{name}:{role} holds NaN or Inf",
                    expected="finite values",
                    found="non-finite values",
                    fix="check the fine-tune and base: their difference is not finite",
                )
        nbytes = self._shards.add({stored_key(name, role): tensor for role, tensor in stored.items()})
        entry.stats = {"stored_bytes": nbytes, **entry.stats}
        self.manifest.tensors[name] = entry

    def add_file(self, name: str, content: bytes | str | os.PathLike) -> None:
        """Copy a side file (config.json, tokenizer files, README.md, ``1_Pooling/config.json``)
        into the delta directory; ``name`` is a relative POSIX path that stays inside it."""
        parts = name.split("/") if isinstance(name, str) else [""]
        if any(part in ("", ".", "..") or "\\" in part or "\0" in part for part in parts):
            raise InvalidArgumentError(
                "side file names must be relative POSIX paths inside the delta",
                expected="e.g. config.json or 1_Pooling/config.json",
                found=repr(name),
            )
        target = self._staging.path.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            shutil.copyfile(content, target)

    def close(self, stats: Mapping[str, Any] | None = None) -> Manifest:
        """Write the remaining shard, the index and the manifest, then publish the directory."""
        if self._closed:
            return self.manifest
        staging = self._staging.path
        known = self._shards.close()  # file name -> its hash, when computed while writing
        if stats:
            self.manifest.stats = dict(stats)
        self.manifest.files = {
            p.name: {"size": p.stat().st_size, "sha256": known.get(p.name) or file_sha256(p)}
            for p in sorted(staging.glob("*.safetensors"))
        }
        (staging / MANIFEST_NAME).write_text(self.manifest.to_json())
        self._staging.publish()
        self._closed = True
        return self.manifest

    def abort(self) -> None:
        """Discard everything written so far."""
        self._closed = True
        self._staging.discard()

    def __enter__(self) -> DeltaWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
