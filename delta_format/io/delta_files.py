"""Which files belong to a delta, and how each is opened safely (SPEC §3.5, §8.5).

A delta's files are named by relative POSIX paths (``config.json``, ``1_Pooling/config.json``).
Whatever reads, copies or uploads one goes through `safe_member`, which refuses, before a byte is
read:

* a name that is not a relative POSIX path of plain parts (`is_member_name`);
* a symlink anywhere on the path, except the last part of a huggingface_hub cache snapshot
  (``.../snapshots/<commit>/x`` links to ``../../blobs/<hash>``), which must resolve into that
  repository's ``blobs``; a link that loops is refused the same way;
* anything that is not a regular file (a directory, a FIFO that would block a reader forever,
  a device).

`check_listed` then compares a file with the size and SHA-256 the manifest records for it, so a
side file (config, tokenizer) is as trustworthy as a shard.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.constants import MANIFEST_NAME, WEIGHTS_INDEX_NAME
from ..core.files_table import is_member_name
from ..errors import CorruptDeltaError, InvalidArgumentError, UnsafePathError
from .checksums import file_sha256

HOSTILE_FIX = "do not load this delta; it may be hostile"


def snapshot_blobs(directory: Path) -> Path | None:
    """The ``blobs`` directory of the huggingface_hub cache repository holding ``directory``
    (a ``.../snapshots/<commit>`` directory or a folder below one), else None."""
    for folder in (directory, *directory.parents):
        if folder.parent.name == "snapshots":
            return folder.parent.parent / "blobs"
    return None


def allowed_roots(directory: Path) -> list[Path]:
    """Where a delta's files may live once symlinks are resolved: the directory itself, and for a
    huggingface_hub cache snapshot the repository's ``blobs`` directory."""
    roots = [directory.resolve()]
    blobs = snapshot_blobs(directory)
    if blobs is not None:
        roots.append(blobs.resolve())
    return roots


def _unsafe(what: str, found: object, expected: str = "a plain file inside the delta directory") -> UnsafePathError:
    return UnsafePathError(f"{what} is unsafe", expected=expected, found=str(found)[:200], fix=HOSTILE_FIX)


def safe_member(
    directory: Path, name: object, what: str, *, missing_ok: bool = False, plain: bool = False
) -> Path | None:
    """``directory / name`` after checking that it is a regular file of the delta (see the module
    docstring); None for a missing file when ``missing_ok``, else `CorruptDeltaError`. ``plain``:
    a file at the top level (tensor files and the index, SPEC §8.5), no folder."""
    if not is_member_name(name) or (plain and "/" in name):
        raise _unsafe(f"{what} ({name!r:.100})", repr(name), "a relative POSIX path of plain parts")
    path = directory / name
    parts = name.split("/")
    in_snapshot = snapshot_blobs(directory) is not None
    for depth in range(1, len(parts) + 1):
        current = directory.joinpath(*parts[:depth])
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            if missing_ok:
                return None
            raise CorruptDeltaError(
                f"{what} names a missing file",
                expected=f"{name} in {directory}",
                found="nothing",
                fix="re-download the delta (a file is missing)",
            ) from None
        except OSError as exc:
            raise _unsafe(what, exc) from None
        if stat.S_ISLNK(mode) and not (in_snapshot and depth == len(parts)):
            raise _unsafe(what, f"{current} is a symlink")
    try:
        resolved = path.resolve(strict=True)
        mode = os.stat(resolved).st_mode
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise _unsafe(what, exc) from None
    if not any(resolved == root or root in resolved.parents for root in allowed_roots(directory)):
        raise _unsafe(what, resolved, f"a file inside {directory}")
    if not stat.S_ISREG(mode):
        raise _unsafe(what, f"{path} is not a regular file")
    return path


def is_reserved_name(name: str) -> bool:
    """Names the writer itself writes (manifest, index, tensor files): not side files."""
    return name in (MANIFEST_NAME, WEIGHTS_INDEX_NAME) or (name.startswith("delta") and name.endswith(".safetensors"))


def regular_source(path: str | os.PathLike, what: str) -> Path:
    """A file the writer copies into a delta: a regular file, not a symlink, unless it is a
    huggingface_hub cache file linking into its repository's ``blobs``."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            blobs = snapshot_blobs(path.parent)
            resolved = path.resolve(strict=True)
            if blobs is None or blobs.resolve() not in resolved.parents:
                raise InvalidArgumentError(
                    f"{what} is a symlink", expected="a regular file", found=str(path), fix="copy the file itself"
                )
            mode = os.stat(resolved).st_mode
    except (OSError, RuntimeError) as exc:
        raise InvalidArgumentError(f"cannot read {what}", expected="a readable file", found=str(exc)[:200]) from None
    if not stat.S_ISREG(mode):
        raise InvalidArgumentError(f"{what} is not a regular file", expected="a regular file", found=str(path))
    return path


def check_listed(path: Path, name: str, info: Mapping[str, Any], verify_checksums: bool) -> None:
    """``path`` has the size (and, if asked, the SHA-256) the manifest's ``files`` records."""
    size = path.stat().st_size
    if size != info["size"]:
        raise CorruptDeltaError(
            f"{name} has the wrong size",
            expected=f"{info['size']} bytes",
            found=f"{size} bytes",
            fix="the file is truncated or altered; re-download the delta",
        )
    if verify_checksums and file_sha256(path) != info["sha256"]:
        raise CorruptDeltaError(
            f"{name} fails its checksum",
            expected=f"sha256 {info['sha256'][:16]}...",
            found="other bytes",
            fix="the file is corrupt or altered; re-download the delta",
        )
