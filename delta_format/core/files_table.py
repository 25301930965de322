"""The manifest's ``files`` table (SPEC §3.5): which names a delta's files may have, and the size
and SHA-256 recorded for each, which a reader compares before a file is used, copied or uploaded."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import ManifestError
from .constants import MANIFEST_NAME

MAX_MEMBER_NAME = 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_member_name(name: object) -> bool:
    """Whether ``name`` may name a file of a delta (SPEC §3.5): a relative POSIX path of 1 to 1024
    characters whose parts are non-empty, not ``.`` or ``..``, do not begin with ``.`` (hidden
    files are the writer's own), and hold no backslash or NUL."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_MEMBER_NAME or "\\" in name or "\0" in name:
        return False
    return all(part and not part.startswith(".") for part in name.split("/"))


def parse_files(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, Mapping):
        raise ManifestError("files is not an object", expected="a JSON object", found=type(value).__name__)
    files = value
    for name, info in files.items():
        if not is_member_name(name) or name == MANIFEST_NAME:
            raise ManifestError(
                "files names an unsafe path",
                expected="a relative POSIX path inside the delta, without '..', empty or hidden parts",
                found=repr(name)[:200],
                fix="do not load this delta; it may be hostile",
            )
        ok = (
            isinstance(info, Mapping)
            and isinstance(info.get("size"), int)
            and not isinstance(info.get("size"), bool)
            and info["size"] >= 0
            and isinstance(info.get("sha256"), str)
            and _SHA256.fullmatch(info["sha256"])
        )
        if not ok:
            raise ManifestError(
                f"files entry {name!r} is malformed",
                expected='{"size": bytes, "sha256": 64 hex digits}',
                found=repr(info)[:200],
            )
    return {name: dict(info) for name, info in files.items()}
