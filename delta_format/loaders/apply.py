"""Turning a delta back into a full checkpoint (``apply``), and checking a delta end to end (``verify``).

`apply_delta` streams the base tensor by tensor, reconstructs every parameter the delta changes
(`reconstruct_stored`, the loader's own arithmetic), and writes an ordinary
safetensors checkpoint with the fine-tune's config and tokenizer files, which
``from_pretrained`` loads like any model. The output is staged in a hidden sibling directory and
published in one rename. `verify_delta` opens a delta (checksums), decodes every parameter and,
when a base is given or can be found, checks its fingerprint and shapes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.constants import MAX_ELEMENTS_WITHOUT_BASE
from ..core.dtypes import TORCH_DTYPES, parse_dtype
from ..core.reconstruct import reconstruct_stored
from ..errors import DeltaFormatError
from ..io.checkpoint import CHECKPOINT_LAYOUT, Checkpoint
from ..io.model_class import architecture_names_from_config
from ..io.progress import progress_bar
from ..io.reader import DeltaReader
from ..io.resolve import HubOptions, open_delta
from ..io.shards import ShardedSafetensorsWriter
from ..io.staging import StagingDirectory, output_guard
from .base_model import check_base, resolve_base
from .base_names import under_delta_names
from .delta_checks import check_delta, scale_from


def apply_delta(
    delta: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    alpha: float = 1.0,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    verify_base: bool = True,
    max_shard_size: int | str = "5GB",
    progress: bool = False,
) -> Path:
    """Write the full fine-tune (base + delta) as a safetensors checkpoint directory.

    Args:
        delta: the delta directory or Hub repo id.
        out_dir: where the checkpoint is published (atomically).
        base_model: the base to use instead of the one the manifest names.
        dtype: cast every floating tensor to this dtype (default: each tensor's own: the
            fine-tune's for edited tensors, the base's for the others).
        overwrite: replace an existing ``out_dir``.
        alpha: multiplies every entry's stored alpha (EXPO at apply time).
        revision, token, cache_dir, local_files_only: as in huggingface_hub (``base_revision``
            for the base).
        verify_base: check the base's fingerprint first (a wrong base is an error).
        max_shard_size: largest checkpoint shard (transformers' rule, see `ShardedSafetensorsWriter`).

    Returns:
        ``out_dir``, which ``AutoModel*.from_pretrained`` loads.

    Example:
        >>> apply_delta("ft-delta", "ft-full")                      # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained("ft-full")         # doctest: +SKIP
    """
    hub = HubOptions(revision, token, cache_dir, local_files_only)
    opened = open_delta(delta, hub)
    reader = opened.reader
    checkpoint = resolve_base(reader.manifest, base_model, hub.updated(revision=base_revision))
    try:
        checkpoint = under_delta_names(opened, checkpoint)
        check_delta(reader.manifest, checkpoint, scale=scale_from(alpha), verify_base=verify_base)
        staging = StagingDirectory(out_dir, overwrite=overwrite, inputs=[reader.directory, checkpoint.directory])
        try:
            with output_guard(staging.out_dir):
                _write_checkpoint(staging.path, reader, checkpoint, parse_dtype(dtype), alpha, max_shard_size, progress)
            return staging.publish()
        except BaseException:
            staging.discard()
            raise
    finally:
        reader.close()
        checkpoint.close()


def _write_checkpoint(
    directory: Path,
    reader: DeltaReader,
    checkpoint: Checkpoint,
    target: torch.dtype | None,
    alpha: float,
    max_shard_size: int | str,
    progress: bool,
) -> None:
    """Every tensor of the fine-tune (base order, then tensors only the delta has) into shards,
    then the fine-tune's side files (config, tokenizer), with ``target`` recorded in config.json."""
    writer = ShardedSafetensorsWriter(directory, CHECKPOINT_LAYOUT, max_shard_size)
    for name, value in fine_tune_tensors(checkpoint, [(reader, alpha)], target, "applying", progress):
        writer.add({name: value})
        del value
    writer.close()
    for name, path in reader.side_files.items():  # vouched for by the manifest (SPEC §3.5)
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, directory / name)
    if target is not None and (directory / "config.json").is_file():
        _set_config_dtype(directory / "config.json", target)


def fine_tune_tensors(
    base: Checkpoint,
    deltas: Sequence[tuple[DeltaReader, float]],
    dtype: torch.dtype | None,
    desc: str,
    progress: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the fine-tune under its checkpoint name, one at a time: the base's tensors
    in its order (floating ones cast to ``dtype`` when given), each delta's entries added (SPEC
    §9, in ``dtype`` or the entry's), then the tensors only a delta has. Base tensors the fine-tune
    does not load are left out (`_ignored_base_tensors`). Shapes must have passed `check_base`."""
    ignored = _ignored_base_tensors(deltas[0][0])
    names = [n for n in base if n not in ignored]
    names += list(dict.fromkeys(n for reader, _ in deltas for n in reader.manifest.tensors if n not in base))
    for name in progress_bar(names, desc=desc, unit="tensor", enabled=progress):
        editing = [(reader, s) for reader, s in deltas if name in reader.manifest.tensors]
        if not editing:
            value = base.get_tensor(name)
            yield name, value.to(dtype) if dtype is not None and value.is_floating_point() else value
            continue
        parts = [(reader.manifest.tensors[name], reader.stored(name), s) for reader, s in editing]
        reads_base = any(entry.encoding.needs_base or entry.alpha * s != 1.0 for entry, _, s in parts)
        source = base.get_tensor(name) if reads_base and name in base else None
        yield name, reconstruct_stored(name, parts, source, dtype=dtype or TORCH_DTYPES[parts[0][0].dtype])


def _ignored_base_tensors(reader: DeltaReader) -> set[str]:
    """Base tensors the fine-tune does not have and does not load (``stats.ignored_base_tensors``,
    SPEC §3.6), left out of the checkpoint as they were out of the fine-tune. The list is only
    informative, so a name is left out only if the fine-tune's architecture (built empty from the
    delta's config) indeed does not load it: a wrong list can never drop a weight."""
    listed = reader.manifest.stats.get("ignored_base_tensors")
    if not listed or not isinstance(listed, list):
        return set()
    loaded = architecture_names_from_config(reader.directory)
    return set() if loaded is None else {n for n in listed if isinstance(n, str) and n not in loaded}


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
    base_model: str | os.PathLike | None = None,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> VerifyReport:
    """Check a delta end to end: files and checksums, every parameter decodes to finite values,
    and the base (``base_model``, or the one the manifest names if it can be found) passes
    `check_base`: the recorded fingerprint, and every edited parameter with its shape. A base
    that cannot be found is a failure only if it was given.
    """
    report = VerifyReport()
    hub = HubOptions(revision, token, cache_dir, local_files_only)
    try:
        opened = open_delta(delta, hub)
    except DeltaFormatError as exc:
        report.failed(f"open: {exc}")
        return report
    reader = opened.reader
    try:
        report.passed(f"files: {len(reader.manifest.files)} file(s) match their size and SHA-256")
        shapes_checked = _verify_base(opened, base_model, hub.updated(revision=base_revision), report)
        if shapes_checked is False:  # a shape that misfits the base is never decoded (SPEC §8.7)
            report.skipped("decode: not attempted, the base check failed")
        else:
            _verify_decoding(reader, report, max_elements=None if shapes_checked else MAX_ELEMENTS_WITHOUT_BASE)
    finally:
        reader.close()
    return report


def _verify_decoding(reader: DeltaReader, report: VerifyReport, *, max_elements: int | None, shown: int = 5) -> None:
    bad = 0
    for name in progress_bar(list(reader), desc="verifying", unit="tensor"):
        entry = reader.entry(name)
        try:
            if entry.encoding.needs_base and not entry.encoding.is_delta:  # bitdiff: a value relative to the base
                reader.check_elements(name, max_elements)
                zeros = torch.zeros(entry.shape, dtype=TORCH_DTYPES[entry.dtype])  # every frame checked, none kept
                entry.encoding.decode(reader.stored(name), entry.shape, name, zeros.dtype, base=zeros)
            else:
                reader.decode(name, max_elements=max_elements)
        except DeltaFormatError as exc:
            bad += 1
            if bad <= shown:
                report.failed(f"decode {name}: {exc}")
    if not bad:
        report.passed(f"decode: all {len(reader.manifest.tensors)} parameters decode to finite values")
    elif bad > shown:
        report.failed(f"decode: {bad} parameters fail in all")


def _verify_base(delta, base_model, hub: HubOptions, report: VerifyReport) -> bool | None:
    """Fingerprint and shapes against the base: True if they pass, False if not, None without a base."""
    manifest = delta.manifest
    try:
        checkpoint = resolve_base(manifest, base_model, hub)
    except DeltaFormatError as exc:
        (report.failed if base_model is not None else report.skipped)(f"base: {exc}")
        return None
    try:
        check_base(manifest, under_delta_names(delta, checkpoint))
        report.passed(
            f"base: {checkpoint.directory} has the recorded fingerprint"
            if manifest.base.fingerprint
            else f"base: {checkpoint.directory} (the delta records no fingerprint)"
        )
        report.passed("shapes: every edited parameter exists in the base with its shape")
        return True
    except DeltaFormatError as exc:
        report.failed(f"base: {exc}")
        return False
    finally:
        checkpoint.close()


__all__ = ["apply_delta", "verify_delta", "VerifyReport"]
