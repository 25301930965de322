"""Publishing a directory atomically: it is written in a hidden sibling, then renamed into place.

Until `StagingDirectory.publish` returns, nothing exists at the output path; an exception (or a
kill) leaves only a hidden ``.<name>.partial-*`` directory next to it, never a half-written
output. Used by the delta writer, `Delta.save_pretrained` and ``apply``. Three more promises:

* an output never replaces, contains or lies inside one of the inputs it is computed from
  (``compress(base, ft, out=base, overwrite=True)`` would delete the base);
* an existing output is replaced (``overwrite=True``) in one atomic exchange where Linux offers
  ``renameat2(RENAME_EXCHANGE)``; elsewhere by two renames, and a kill between them leaves the old
  output in a hidden ``.<name>.old-*`` sibling that the next `StagingDirectory` for that path puts
  back (so the path is never left empty for good);
* a full disk, a file too large, a read-only or non-directory parent is an `OutputError`, and
  nothing partial is left behind (`output_guard`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import DeltaFormatError, InvalidArgumentError, OutputError, OutputExistsError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_OUTPUT_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "a file is too large for the file system",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a parent of the output is not a directory",
    errno.EEXIST: "a parent of the output is not a directory",
}


def output_error(exc: BaseException, out_dir: Path) -> DeltaFormatError | None:
    """The typed error for an OS failure to write ``out_dir``, None if it is not one."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code is None and type(exc).__name__ == "SafetensorError":  # safetensors reports OS errors as text
        code = next((c for c in (errno.ENOSPC, errno.EFBIG) if f"code: {c}," in text or f"os error {c})" in text), None)
    if code not in _OUTPUT_ERRNOS:
        return None
    return OutputError(
        f"cannot write {out_dir}: {_OUTPUT_ERRNOS[code]}",
        expected="a writable directory with room for the output",
        found=text[:200],
        fix="free some space or choose another output path; nothing was written there",
    )


@contextlib.contextmanager
def output_guard(out_dir: Path) -> Iterator[None]:
    """Turn an OS failure to write the output (disk full, ...) into an `OutputError`."""
    try:
        yield
    except DeltaFormatError:
        raise
    except Exception as exc:
        typed = output_error(exc, out_dir)
        if typed is None:
            raise
        raise typed from None


def check_apart(out_dir: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs``."""
    out = Path(out_dir).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if out == source or out in source.parents or source in out.parents:
            raise InvalidArgumentError(
                "the output overlaps an input",
                expected="an output path apart from every input (not it, not a folder above it or inside it)",
                found=f"output {out}, input {source}",
                fix="choose another output path",
            )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with ``renameat2(RENAME_EXCHANGE)``; False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _old_siblings(out_dir: Path) -> list[Path]:
    return sorted(out_dir.parent.glob(f".{out_dir.name}.old-*"))


def recover_interrupted_overwrite(out_dir: Path) -> None:
    """Put back the old output an interrupted two-rename overwrite left hidden, if the path is
    empty; remove such leftovers once the path holds an output again."""
    for trash in _old_siblings(out_dir):
        old = trash / "old"
        if old.exists() and not (out_dir.exists() or out_dir.is_symlink()):
            os.replace(old, out_dir)
        shutil.rmtree(trash, ignore_errors=True)


def publish_directory(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Move a complete ``staging`` directory to ``out_dir`` (replacing it only if ``overwrite``)."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.replace(staging, out_dir)
        return
    if not overwrite:
        raise OutputExistsError(
            "the output path already exists",
            expected="a path that does not exist",
            found=str(out_dir),
            fix="choose another path, remove it, or pass overwrite=True (--overwrite)",
        )
    if _exchange(staging, out_dir):  # staging now holds the old output
        shutil.rmtree(staging, ignore_errors=True)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, trash / "old")
    os.replace(staging, out_dir)  # a kill before this line: recover_interrupted_overwrite undoes it
    shutil.rmtree(trash, ignore_errors=True)


class StagingDirectory:
    """A hidden sibling directory that becomes ``out_dir`` on `publish`, or vanishes on `discard`."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        overwrite: bool = False,
        *,
        inputs: Iterable[str | os.PathLike | None] = (),
    ):
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
        check_apart(self.out_dir, inputs)
        with output_guard(self.out_dir):
            if self.out_dir.parent.is_dir():
                recover_interrupted_overwrite(self.out_dir)
            if (self.out_dir.exists() or self.out_dir.is_symlink()) and not overwrite:
                raise OutputExistsError(
                    "the output path already exists",
                    expected="a path that does not exist",
                    found=str(self.out_dir),
                    fix="choose another path, remove it, or pass overwrite=True (--overwrite)",
                )
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-", dir=self.out_dir.parent))

    def publish(self) -> Path:
        # mkdtemp and safetensors create owner-only modes; a published delta is readable like any file.
        umask = os.umask(0)
        os.umask(umask)
        with output_guard(self.out_dir):
            os.chmod(self.path, 0o777 & ~umask)
            for path in self.path.rglob("*"):
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
            publish_directory(self.path, self.out_dir, self.overwrite)
        return self.out_dir

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
