"""Turning a delta back into a full checkpoint (``apply``), and checking a delta end to end (``verify``).

`apply_delta` streams the base tensor by tensor, reconstructs every parameter the delta changes
(`DeltaReader.decode` + `reconstruct`, the loader's own arithmetic), and writes an ordinary
safetensors checkpoint with the fine-tune's config and tokenizer files, which
``from_pretrained`` loads like any model. The output is staged in a hidden sibling directory and
published in one rename. `verify_delta` opens a delta (checksums), decodes every parameter and,
when a base is given or can be found, checks its fingerprint and shapes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .base_model import resolve_base, verify_base
from ..io.checkpoint import resolve_repo
from ..core.constants import MANIFEST_NAME, MODEL_CARD_NAME, WEIGHTS_INDEX_NAME
from ..core.dtypes import parse_dtype
from ..errors import DeltaFormatError
from ..io.reader import DeltaReader
from ..core.reconstruct import reconstruct
from ..io.sizes import parse_size
from ..io.writer import StagingDirectory

CHECKPOINT_NAME = "model.safetensors"
CHECKPOINT_INDEX_NAME = "model.safetensors.index.json"
CHECKPOINT_SHARD_TEMPLATE = "model-{index:05d}-of-{total:05d}.safetensors"


def _is_delta_file(name: str) -> bool:
    return name in (MANIFEST_NAME, WEIGHTS_INDEX_NAME, MODEL_CARD_NAME) or (
        name.startswith("delta") and name.endswith(".safetensors"))


class CheckpointShardWriter:
    """Writes tensors into ``model.safetensors`` (or numbered shards plus the index transformers
    reads), holding at most ``max_shard_size`` bytes in memory."""

    def __init__(self, directory: Path, max_shard_size: int | str = "5GB"):
        self.directory = directory
        self.max_shard_size = parse_size(max_shard_size)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_size:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self.total_size += nbytes

    def _flush(self) -> None:
        if self._pending:
            temp = f"shard-{len(self._shards):05d}.tmp"
            save_file(self._pending, str(self.directory / temp), metadata={"format": "pt"})
            self._shards.append((temp, list(self._pending)))
            self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        if len(self._shards) <= 1:
            if self._shards:
                os.replace(self.directory / self._shards[0][0], self.directory / CHECKPOINT_NAME)
            else:
                save_file({}, str(self.directory / CHECKPOINT_NAME), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, (temp, keys) in enumerate(self._shards):
            final = CHECKPOINT_SHARD_TEMPLATE.format(index=i + 1, total=len(self._shards))
            os.replace(self.directory / temp, self.directory / final)
            weight_map.update({key: final for key in keys})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / CHECKPOINT_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _resolve_delta(delta: str | os.PathLike, revision: str | None, token: str | bool | None) -> Path:
    return resolve_repo(delta, revision=revision, token=token, what="delta")[0]


def apply_delta(
    delta: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    alpha_scale: float = 1.0,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    verify: bool = True,
    max_shard_size: int | str = "5GB",
    progress: bool = False,
) -> Path:
    """Write the full fine-tune (base + delta) as a safetensors checkpoint directory.

    Args:
        delta: the delta directory or Hub repo id.
        out_dir: where the checkpoint is published (atomically).
        base: the base to use instead of the one the manifest names.
        dtype: cast every floating tensor to this dtype (default: each tensor's own: the
            fine-tune's for edited tensors, the base's for the others).
        overwrite: replace an existing ``out_dir``.
        alpha_scale: multiplies every entry's α (EXPO at apply time).
        verify: check the base's fingerprint first (a wrong base is an error).

    Returns:
        ``out_dir``, which ``AutoModel*.from_pretrained`` loads.

    Example:
        >>> apply_delta("ft-delta", "ft-full")                      # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained("ft-full")         # doctest: +SKIP
    """
    target = parse_dtype(dtype)
    reader = DeltaReader(_resolve_delta(delta, revision, token))
    manifest = reader.manifest
    checkpoint = resolve_base(manifest, base_override=base, revision=base_revision, token=token)
    verify_base(manifest, checkpoint, verify=verify)
    staging = StagingDirectory(out_dir, overwrite=overwrite)
    try:
        writer = CheckpointShardWriter(staging.path, max_shard_size)
        names = [*checkpoint, *(n for n in manifest.tensors if n not in checkpoint)]
        from huggingface_hub.utils import tqdm

        for name in tqdm(names, desc="applying", unit="tensor", disable=not progress):
            entry = manifest.tensors.get(name)
            if entry is None:
                value = checkpoint.get_tensor(name)
                if target is not None and value.is_floating_point():
                    value = value.to(target)
            else:
                base_tensor = checkpoint.get_tensor(name) if entry.encoding.is_delta and name in checkpoint else None
                value = reconstruct(name, entry, reader.decode(name), base_tensor, alpha_scale=alpha_scale, dtype=target)
            writer.add(name, value)
            del value
        writer.close()
        for path in sorted(reader.directory.iterdir()):
            if path.is_file() and not path.name.startswith(".") and not _is_delta_file(path.name):
                shutil.copyfile(path, staging.path / path.name)
        if target is not None and (staging.path / "config.json").is_file():
            _set_config_dtype(staging.path / "config.json", target)
        return staging.publish()
    except BaseException:
        staging.discard()
        raise
    finally:
        reader.close()
        checkpoint.close()


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    """Record the cast in config.json, so ``from_pretrained`` loads the weights in that dtype."""
    config = json.loads(path.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@dataclass
class VerifyReport:
    """What `verify_delta` checked; ``ok`` is False if anything failed."""

    ok: bool = True
    lines: list[str] = field(default_factory=list)

    def passed(self, line: str) -> None:
        self.lines.append(f"ok    {line}")

    def failed(self, line: str) -> None:
        self.ok = False
        self.lines.append(f"FAIL  {line}")

    def skipped(self, line: str) -> None:
        self.lines.append(f"skip  {line}")


def verify_delta(
    delta: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
) -> VerifyReport:
    """Check a delta end to end: files and checksums, every parameter decodes to finite values,
    and the base (given, or resolvable from the manifest) has the recorded fingerprint and the
    shapes the delta edits. A base that cannot be found is a failure only if it was given.
    """
    report = VerifyReport()
    try:
        reader = DeltaReader(_resolve_delta(delta, revision, token))
    except DeltaFormatError as exc:
        report.failed(f"open: {exc}")
        return report
    manifest = reader.manifest
    report.passed(f"files: {len(manifest.files)} tensor file(s) match their size and SHA-256")
    bad = 0
    for name in reader:
        try:
            reader.decode(name)
        except DeltaFormatError as exc:
            bad += 1
            if bad <= 5:
                report.failed(f"decode {name}: {exc}")
    if not bad:
        report.passed(f"decode: all {len(manifest.tensors)} parameters decode to finite values")
    elif bad > 5:
        report.failed(f"decode: {bad} parameters fail in all")
    try:
        checkpoint = resolve_base(manifest, base_override=base, revision=base_revision, token=token)
    except DeltaFormatError as exc:
        (report.failed if base is not None else report.skipped)(f"base: {exc}")
        reader.close()
        return report
    try:
        verify_base(manifest, checkpoint)
        report.passed(f"base: {checkpoint.directory} has the recorded fingerprint" if manifest.base.fingerprint
                      else f"base: {checkpoint.directory} (the delta records no fingerprint)")
        mismatched = [n for n, e in manifest.tensors.items()
                      if e.encoding.is_delta and (n not in checkpoint or checkpoint.shape_dtype(n)[0] != e.shape)]
        if mismatched:
            report.failed(f"shapes: the base lacks or reshapes {mismatched[:5]}")
        else:
            report.passed("shapes: every edited parameter exists in the base with its shape")
    except DeltaFormatError as exc:
        report.failed(f"base: {exc}")
    finally:
        checkpoint.close()
        reader.close()
    return report


__all__ = ["apply_delta", "verify_delta", "VerifyReport", "CheckpointShardWriter"]
