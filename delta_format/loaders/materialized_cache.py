"""The materialised cache: a fine-tune computed once is kept as an ordinary safetensors
checkpoint, and later loads map it as transformers maps a checkpoint.

Most users load the same fine-tune many times. A load that misses writes its weights straight into
a new entry (the model's storage *is* the entry's file, mapped shared: no extra copy), then
re-maps that file privately, so the model ends as a transformers-loaded one does: file-backed,
copy-on-write pages (writes to the model, e.g. ``swap_delta``, never reach the file). A load that
hits reads no delta bytes and computes nothing.

Where: ``$DELTA_FORMAT_MATERIALIZED_CACHE`` if it names a directory, else
``<HF_HOME>/delta-format/materialized/`` beside the Hugging Face hub cache. One directory per
entry, named by the SHA-256 of its key, holding ``model.safetensors`` and ``entry.json``.

Key (`cache_key`): each delta's manifest SHA-256 (the manifest records every delta file's SHA-256,
so it pins the delta's content) and its scale (weight x alpha), the base's fingerprint digest
computed from the base files in hand (SPEC §7; not the one the manifest records, so a wrong base
under ``verify_base=False`` gets its own entry), the dtype, the model's structure (every tensor's
name, dtype and shape, and the tied names) and the package version (a fix to the arithmetic
invalidates old entries). The base is still fingerprint-checked on a hit (`check_base`, cheap).

Integrity, checked on every hit before anything is used; a failed check discards the entry and the
load rebuilds it (a warning says why):

* detected: a missing or extra file, a record that is unreadable or whose key is not this load's
  (stale), a file of another size than recorded (truncated or extended), a safetensors header that
  is unreadable or lists other tensors, dtypes or shapes than the model needs, and any change to
  the sampled bytes of a tensor (the fingerprint of SPEC §7 over the entry's own file: every byte
  of tensors up to 4 KiB, 64 chunks of 64 bytes evenly spread, first and last included, in larger
  ones), which catches a zeroed, overwritten or truncated tensor;
* not detected: a change confined to bytes between the samples of a large tensor (a flipped bit on
  disk, or a page lost when the machine lost power before the kernel wrote it back: entries are
  not fsync'ed, which would cost the first load a full write to disk). Opt out where that risk
  matters more than load time.

Entries are written in a hidden staging directory and renamed into place, so no reader ever sees a
partial entry; two processes filling one entry both succeed (the second rename loses and its copy
is dropped). The total size stays under a limit (``$DELTA_FORMAT_MATERIALIZED_CACHE_LIMIT``:
bytes or ``"20GB"``; default the larger of 20 GB and twice the entry being written) by evicting the
least recently used entries; an entry is written only while the disk keeps 10 % (at least 1 GiB)
free after it. Opt out with ``cache_materialized=False`` or ``DELTA_FORMAT_MATERIALIZED_CACHE=0``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .. import __version__
from ..core.constants import MANIFEST_NAME
from ..core.fingerprint import fingerprint_safetensors
from ..errors import DeltaFormatError, InvalidArgumentError
from ..heap import FreedMemory
from ..io.checkpoint import Checkpoint
from ..io.delta import Delta
from .materialize import fills
from .model_state import tied_parameter_names
from .model_storage import ModelStorage

CACHE_ENV = "DELTA_FORMAT_MATERIALIZED_CACHE"
"""``0``/``false``/``off``/``no``: no cache; a path: the cache's directory; unset: on, by HF_HOME."""
LIMIT_ENV = "DELTA_FORMAT_MATERIALIZED_CACHE_LIMIT"
DEFAULT_LIMIT = 20 * 10**9
ENTRY_FORMAT = "delta-format-materialized-v1"
WEIGHTS = "model.safetensors"
RECORD = "entry.json"
STALE_STAGING_SECONDS = 24 * 3600
"""A staging or trash directory older than this belongs to a process that died: eviction removes it."""

log = logging.getLogger("delta_format")

Planned = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


def cache_directory(cache_materialized: bool | None = None) -> Path | None:
    """The cache's directory, or None when the cache is off (argument first, then environment)."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    if cache_materialized is False or setting.lower() in ("0", "false", "off", "no"):
        return None
    if setting and setting.lower() not in ("1", "true", "on", "yes"):
        return Path(setting)
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "delta-format" / "materialized"


def size_limit(entry_bytes: int) -> int:
    """The cache's size limit in bytes (`LIMIT_ENV`, else the larger of 20 GB and 2 entries)."""
    setting = os.environ.get(LIMIT_ENV, "").strip()
    if not setting:
        return max(DEFAULT_LIMIT, 2 * entry_bytes)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?", setting.lower())
    if not match:
        raise InvalidArgumentError(
            f"{LIMIT_ENV} is unreadable", expected="bytes, or a size such as 20GB or 512MiB", found=repr(setting)
        )
    unit = (match.group(2) or "b").rstrip("b") or "b"
    scale = 1 if unit == "b" else (1024 if unit.endswith("i") else 1000) ** ("kmgt".index(unit[0]) + 1)
    return int(float(match.group(1)) * scale)


class LoadTarget:
    """Where one load's tensors come from and go: ``hit`` (a checked cache entry to place as it
    is), else ``storage`` (where each computed tensor is written: a new cache entry's file, or
    one anonymous block), and `finish` once the model is filled."""

    def __init__(self, hit: Checkpoint | None = None, writer: EntryWriter | None = None, block=None):
        self.hit, self.writer, self.block = hit, writer, block
        self.freed = FreedMemory(every=32 << 20)  # a load's row-block buffers, trimmed every 32 MB of weights

    def storage(self, name: str) -> torch.Tensor | None:
        if self.writer is not None:
            view = self.writer.view(name)
        else:
            view = self.block.view(name) if self.block is not None and name in self.block.layout else None
        if view is not None:
            self.freed(view.numel() * view.element_size())
        return view

    def finish(self, model) -> None:
        if self.writer is not None:
            self.writer.publish(model)
        if self.block is not None:
            self.block.release()
        if self.writer is not None or self.block is not None:
            self.freed.trim()


def prepare_load(
    cache_materialized: bool | None,
    deltas: Sequence[tuple[Delta, float]],
    base: Checkpoint,
    model,
    dtype: torch.dtype,
    device_of,
    *,
    verified: bool,
) -> LoadTarget:
    """Look the load up in the cache; on a miss, verify the deltas' files (unless ``verified``)
    and say where the computed tensors go (a new entry where one can be written: every tensor on
    the CPU and floating; else one anonymous block for the CPU's floating tensors)."""
    readers = [(d.reader, s) for d, s in deltas]
    tensors = {name: (current.dtype, tuple(current.shape)) for name, current, _ in fills(model, base, readers)}
    planned = {n: v for n, v in tensors.items() if device_of(n).type == "cpu" and v[0].is_floating_point}
    root = cache_directory(cache_materialized)
    key = cache_key(deltas, base, tensors, model, dtype) if root is not None else None
    if key is not None:
        hit = find_entry(root, key, tensors)
        if hit is not None:
            return LoadTarget(hit=hit)
    if not verified:
        for delta, _ in deltas:
            Delta(delta.directory)  # opened again, now with every file's SHA-256 checked
    if key is not None and len(planned) == len(tensors):
        writer = start_entry(root, key, planned)
        if writer is not None:
            return LoadTarget(writer=writer)
    return LoadTarget(block=ModelStorage(planned) if planned else None)


def cache_key(
    deltas: Sequence[tuple[Delta, float]], base: Checkpoint, planned: Planned, model, dtype: torch.dtype
) -> dict:
    """Everything the entry's bytes depend on (see the module docstring); JSON-serialisable."""
    structure = [[name, str(planned[name][0]), list(planned[name][1])] for name in sorted(planned)]
    structure.append(sorted(tied_parameter_names(model)))
    return {
        "format": ENTRY_FORMAT,
        "package": __version__,
        "deltas": [
            {"manifest_sha256": hashlib.sha256((d.directory / MANIFEST_NAME).read_bytes()).hexdigest(), "scale": s}
            for d, s in deltas
        ],
        "base_fingerprint": base.fingerprint()["digest"],
        "dtype": str(dtype),
        "model": hashlib.sha256(json.dumps(structure).encode()).hexdigest(),
    }


def key_digest(key: Mapping) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def find_entry(root: Path, key: Mapping, planned: Planned) -> Checkpoint | None:
    """The entry for ``key``, checked (module docstring), as an opened checkpoint; None when
    there is none or it failed a check (then it is discarded, with a warning)."""
    entry = root / key_digest(key)
    if not entry.is_dir():
        return None
    try:
        record = json.loads((entry / RECORD).read_text())
        problem = _entry_problem(entry, record, key, planned)
        checkpoint = None if problem else Checkpoint(entry)
    except (OSError, ValueError, KeyError, TypeError, DeltaFormatError) as exc:
        if not entry.is_dir():
            return None  # evicted by another process meanwhile: a plain miss
        problem, checkpoint = f"unreadable ({str(exc)[:120]})", None
    if checkpoint is None:
        log.warning("materialised cache entry %s is %s: discarded, rebuilding it", entry, problem)
        _discard(entry)
        return None
    os.utime(entry / RECORD)  # least recently used = oldest record
    return checkpoint


def _entry_problem(entry: Path, record: Mapping, key: Mapping, planned: Planned) -> str | None:
    if record.get("key") != key:
        return "stale (its key is not this load's)"
    files = sorted(p.name for p in entry.iterdir())
    if files != sorted([WEIGHTS, RECORD]):
        return f"incomplete or altered (files {files})"
    size = (entry / WEIGHTS).stat().st_size
    if size != record["size"]:
        return f"truncated or altered ({size} bytes, recorded {record['size']})"
    found = fingerprint_safetensors([entry / WEIGHTS])
    want = {name: [_dtype_label(dtype), list(shape)] for name, (dtype, shape) in planned.items()}
    have = {name: [info["dtype"], info["shape"]] for name, info in found["tensors"].items()}
    if have != want:
        return "holding other tensors than this model needs"
    if found["digest"] != record["fingerprint"]:
        return "corrupt (its sampled bytes differ from the recorded ones)"
    return None


def _dtype_label(dtype: torch.dtype) -> str:
    from ..core.dtypes import dtype_name

    return dtype_name(dtype) or str(dtype)


class EntryWriter:
    """A new entry being filled: `storage` is where the load writes each tensor; `publish`
    finishes it. Created by `start_entry` only when the entry can be written."""

    def __init__(self, root: Path, key: Mapping, planned: Planned):
        self.root, self.key, self.planned = root, dict(key), planned
        self.staging = Path(tempfile.mkdtemp(prefix=f".{key_digest(key)}.partial-", dir=root))
        try:
            self.storage = ModelStorage(planned, self.staging / WEIGHTS)
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise

    def view(self, name: str) -> torch.Tensor | None:
        return self.storage.view(name) if name in self.planned else None

    def publish(self, model) -> None:
        """Record the entry, move the model onto a private mapping of it, and rename it into
        place; any failure drops the entry and leaves the model as loaded."""
        try:
            fingerprint = fingerprint_safetensors([self.staging / WEIGHTS])["digest"]
            record = {"key": self.key, "size": self.storage.nbytes, "fingerprint": fingerprint, "created": time.time()}
            (self.staging / RECORD).write_text(json.dumps(record, indent=1))
            remap(model, Checkpoint(self.staging), self.planned)
            self.storage.release()
            try:
                os.rename(self.staging, self.root / key_digest(self.key))
            except OSError:  # another process published it first: theirs is as good
                shutil.rmtree(self.staging, ignore_errors=True)
            evict(self.root, size_limit(self.storage.nbytes), keep=key_digest(self.key))
        except (OSError, DeltaFormatError) as exc:
            log.warning("materialised cache entry not written (%s)", str(exc)[:200])
            self.discard()

    def discard(self) -> None:
        self.storage.release()
        shutil.rmtree(self.staging, ignore_errors=True)


def start_entry(root: Path, key: Mapping, planned: Planned) -> EntryWriter | None:
    """A writer for a new entry, or None where it cannot be written (over the size limit, a disk
    short of space, an unwritable directory)."""
    entry_bytes = sum(dtype.itemsize * math.prod(shape) for dtype, shape in planned.values())
    limit = size_limit(entry_bytes)
    if entry_bytes > limit:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        evict(root, limit - entry_bytes)
        disk = shutil.disk_usage(root)
        if disk.free - entry_bytes < max(2**30, disk.total // 10):
            log.warning("materialised cache entry not written: the disk holding %s is nearly full", root)
            return None
        return EntryWriter(root, key, planned)
    except OSError as exc:
        log.warning("materialised cache entry not written (%s)", str(exc)[:200])
        return None


def remap(model, checkpoint: Checkpoint, names) -> None:
    """Point each of ``names`` in ``model`` at ``checkpoint``'s tensor (a private mapping of its
    file), keeping the parameter objects (so tied parameters stay tied)."""
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        value = checkpoint.get_tensor(name)
        if attr in module._parameters:
            module._parameters[attr].data = value
        else:
            module._buffers[attr] = value
    checkpoint.close()


def evict(root: Path, budget: int, keep: str | None = None) -> None:
    """Remove least recently used entries until the rest fit in ``budget`` bytes (never ``keep``),
    and staging directories of loads that died."""
    entries = []
    for path in root.iterdir() if root.is_dir() else []:
        try:
            if path.name.startswith("."):  # staging or trash of a load that died
                if time.time() - path.stat().st_mtime > STALE_STAGING_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
                continue
            entries.append(((path / RECORD).stat().st_mtime, (path / WEIGHTS).stat().st_size, path))
        except FileNotFoundError:
            _discard(path)  # a broken entry (or one evicted meanwhile)
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= budget:
            break
        if path.name != keep:
            _discard(path)
            total -= size


def _discard(path: Path) -> None:
    """Remove an entry: renamed away first (atomic: no reader sees half of it), then deleted."""
    try:
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=path.parent))
    except OSError:
        return
    try:
        os.rename(path, trash / "entry")
    except OSError:
        pass  # already gone (another process), or not ours to remove
    shutil.rmtree(trash, ignore_errors=True)
