"""Byte counts as people write them: ``"2GB"`` in, ``"1.3 GB"`` out (decimal units, as
transformers and the Hub use)."""

from __future__ import annotations

from ..errors import InvalidArgumentError


def parse_size(value: int | str) -> int:
    """``"500MB"`` / ``"2GB"`` / ``123`` -> bytes (decimal units, as transformers uses)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise InvalidArgumentError("unreadable size", expected='bytes or a string like "500MB"', found=repr(value))
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    text = value.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * factor)
    raise InvalidArgumentError("unreadable size", expected='bytes or a string like "500MB"', found=repr(value))


def format_bytes(n: float) -> str:
    """``1_300_000`` -> ``"1.3 MB"``; whole bytes below 1 KB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
