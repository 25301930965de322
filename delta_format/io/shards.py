"""Writing tensors as one safetensors file or as numbered shards plus an index: the one sharded
writer behind the delta writer (``delta.safetensors``) and ``apply`` (``model.safetensors``).

Tensors are added in groups (one parameter's stored tensors, or one checkpoint tensor) that always
land in the same shard. The flush rule is transformers' and huggingface_hub's
(``split_torch_state_dict_into_shards``): a shard is closed *before* a group that would take it
over ``max_shard_size``, and a group larger than the limit gets a shard of its own. So no shard
exceeds the limit unless one group does, and at most ``max_shard_size`` bytes wait in memory.

Shards are written under temporary names and renamed once their number is known: a single shard
becomes ``layout.single``, several become ``layout.shard_template`` files listed in
``layout.index``, whose ``metadata.total_size`` is the sum of the shard file sizes (SPEC §2;
informative: transformers and our reader use only ``weight_map``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.constants import SHARD_NAME_TEMPLATE, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from ..errors import InvalidArgumentError
from .checksums import SAFETENSORS_METADATA, save_hashed
from .sizes import parse_size


@dataclass(frozen=True)
class ShardLayout:
    """The file names of a (possibly sharded) safetensors set."""

    single: str
    """The one file written when everything fits in one shard."""
    index: str
    """The JSON index (``weight_map``) written next to several shards."""
    shard_template: str
    """``str.format`` template of shard ``index`` of ``total`` (1-based)."""


DELTA_LAYOUT = ShardLayout(WEIGHTS_NAME, WEIGHTS_INDEX_NAME, SHARD_NAME_TEMPLATE)
"""A delta's tensor files (SPEC §2)."""


class ShardedSafetensorsWriter:
    """Collects groups of tensors into shards of at most ``max_shard_size`` bytes in ``directory``.

    Example:
        >>> writer = ShardedSafetensorsWriter(directory, DELTA_LAYOUT, "2GB")   # doctest: +SKIP
        >>> writer.add({"w:delta": torch.ones(2)})                               # doctest: +SKIP
        >>> writer.close()                                                       # doctest: +SKIP
        {'delta.safetensors': '3b1f...'}
    """

    def __init__(self, directory: Path, layout: ShardLayout, max_shard_size: int | str, *, record_sha256: bool = False):
        self.directory = Path(directory)
        self.layout = layout
        self.max_shard_size = parse_size(max_shard_size)
        if self.max_shard_size <= 0:
            raise InvalidArgumentError("max_shard_size must be positive", expected="> 0", found=self.max_shard_size)
        self.record_sha256 = record_sha256
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str], str | None]] = []  # (temporary name, keys, sha256 if known)

    def add(self, group: Mapping[str, torch.Tensor]) -> int:
        """Queue ``group`` (kept together in one shard); returns its bytes."""
        tensors = {key: t.detach().to("cpu").contiguous() for key, t in group.items()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._pending and self._pending_bytes + nbytes > self.max_shard_size:
            self._flush()
        self._pending.update(tensors)
        self._pending_bytes += nbytes
        return nbytes

    def _flush(self) -> None:
        temp = f"shard-{len(self._shards):05d}.tmp"
        path = self.directory / temp
        if self.record_sha256:
            sha256 = save_hashed(self._pending, path)
        else:
            save_file(self._pending, str(path), metadata=SAFETENSORS_METADATA)
            sha256 = None
        self._shards.append((temp, list(self._pending), sha256))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> dict[str, str | None]:
        """Write the last shard (an empty file if nothing was added) and the index.

        Returns:
            ``{final file name: its SHA-256 if computed while writing, else None}``.
        """
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            temp, _, sha256 = self._shards[0]
            os.replace(self.directory / temp, self.directory / self.layout.single)
            return {self.layout.single: sha256}
        written, weight_map, total = {}, {}, 0
        for i, (temp, keys, sha256) in enumerate(self._shards):
            final = self.layout.shard_template.format(index=i + 1, total=len(self._shards))
            total += (self.directory / temp).stat().st_size
            os.replace(self.directory / temp, self.directory / final)
            written[final] = sha256
            weight_map.update({key: final for key in keys})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / self.layout.index).write_text(json.dumps(index, indent=2) + "\n")
        return written
