"""Publishing a directory atomically: it is written in a hidden sibling, then renamed into place.

Until `StagingDirectory.publish` returns, nothing exists at the output path; an exception (or a
kill) leaves only a hidden ``.<name>.partial-*`` directory next to it, never a half-written
output. An existing output is replaced only with ``overwrite=True``, and then only once the new
one is complete. Used by the delta writer, `Delta.save_pretrained` and ``apply``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import OutputExistsError


def publish_directory(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Move a complete ``staging`` directory to ``out_dir`` (replacing it only if ``overwrite``)."""
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise OutputExistsError(
                "the output path already exists",
                expected="a path that does not exist",
                found=str(out_dir),
                fix="choose another path, remove it, or pass overwrite=True (--overwrite)",
            )
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / "old")
        os.replace(staging, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


class StagingDirectory:
    """A hidden sibling directory that becomes ``out_dir`` on `publish`, or vanishes on `discard`."""

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False):
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
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
        os.chmod(self.path, 0o777 & ~umask)
        for path in self.path.iterdir():
            if path.is_file():
                os.chmod(path, 0o666 & ~umask)
        publish_directory(self.path, self.out_dir, self.overwrite)
        return self.out_dir

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
