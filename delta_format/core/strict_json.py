"""Untrusted JSON (manifest, index, a delta's config files) parsed into plain values, or refused
with a typed error (SPEC §3, §8): never a ``ValueError``, ``RecursionError`` or a value that later
crashes a print.

Python's ``json`` accepts more than the spec allows, and some of what it accepts breaks later:

* ``NaN``/``Infinity`` and numbers that overflow to infinity (``1e400``): refused (numbers are
  finite, SPEC §3);
* integers of thousands of digits: ``int()`` raises ``ValueError`` past 4300 digits and is slow
  before; refused beyond `MAX_INTEGER_DIGITS` (a seed needs 20);
* duplicate keys: ``json`` keeps the last silently, so two readers could see two manifests;
  refused;
* nesting 200,000 levels deep: the C scanner raises ``RecursionError``; refused up front by a
  linear pre-scan (`MAX_DEPTH`), so no recursive code ever sees deep input;
* escaped lone surrogates (``"\\ud800"``): valid JSON, but the string cannot be encoded as UTF-8,
  so printing it or writing a model card fails; refused.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import torch

from ..errors import DeltaFormatError, ManifestError

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects accepted (a manifest needs 6)."""
MAX_INTEGER_DIGITS = 40
"""Longest integer literal accepted (a seed below 2**64 has 20 digits)."""
MAX_NUMBER_CHARS = 100
"""Longest non-integer number literal accepted (shortest round-trip floats take at most 24)."""

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_ESCAPE = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|(\\u[dD][89a-fA-F][0-9a-fA-F]{2})"
)
_OPEN = {ord("["), ord("{")}


def _max_depth(raw: bytes) -> int:
    """Deepest bracket nesting outside strings, in a few passes at C speed (no recursion)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return 0
    brackets = re.sub(rb"[^\[\]{}]+", b"", _STRING.sub(b"", raw))
    if not brackets:
        return 0
    codes = torch.frombuffer(bytearray(brackets), dtype=torch.uint8)
    steps = torch.where((codes == ord("[")) | (codes == ord("{")), 1, -1).to(torch.int32)
    return int(torch.cumsum(steps, 0).max())


def _lone_surrogate(raw: bytes) -> bool:
    """Whether an escape ``\\uD800``-``\\uDFFF`` appears outside a high+low pair."""
    if b"\\u" not in raw and b"\\U" not in raw:
        return False
    return any(match.group(1) for match in _ESCAPE.finditer(raw))


def loads_strict(raw: bytes, source: str, error: type[DeltaFormatError] = ManifestError) -> Any:
    """Parse ``raw`` (UTF-8 JSON) by the rules above; every refusal is an ``error``."""

    def refuse(what: str, found: object) -> DeltaFormatError:
        return error(f"{source} {what}", expected="strict JSON (SPEC §3)", found=str(found)[:120])

    def parse_int(text: str) -> int:
        if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
            raise refuse("holds an integer too long to be a size or seed", f"{len(text)} digits")
        return int(text)

    def parse_float(text: str) -> float:
        value = float(text) if len(text) <= MAX_NUMBER_CHARS else math.inf
        if not math.isfinite(value):
            raise refuse("holds a number that is not finite", text[:40])
        return value

    def parse_constant(name: str) -> float:
        raise refuse("holds a non-JSON number", name)

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            seen: set[str] = set()
            duplicate = next(k for k, _ in items if k in seen or seen.add(k))
            raise refuse("repeats a key", repr(duplicate))
        return out

    depth = _max_depth(raw)
    if depth > MAX_DEPTH:
        raise refuse("is nested too deeply", f"{depth} levels (at most {MAX_DEPTH})")
    if _lone_surrogate(raw):
        raise refuse("holds an unpaired UTF-16 surrogate escape", "\\uD800-\\uDFFF alone")
    try:
        text = raw.decode("utf-8")
        return json.loads(
            text, object_pairs_hook=pairs, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        if isinstance(exc, DeltaFormatError):
            raise
        raise refuse("is not valid JSON", exc) from None
