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
"""Longest run of digits in a number accepted (a seed below 2**64 has 20; a float as Python
writes it at most 17)."""

_BRACKETS_ONLY = bytes(c for c in range(256) if c not in b"[]{}")
_LONG_DIGITS = re.compile(rb"[0-9]{%d}" % (MAX_INTEGER_DIGITS + 1))
_BIG_EXPONENT = re.compile(rb"[eE][+-]?[0-9]{3,}")
_NUMBER_HEAD = re.compile(rb"-?[0-9.]+$")
_ESCAPE = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|(\\u[dD][89a-fA-F][0-9a-fA-F]{2})"
)


def _outside_strings(raw: bytes) -> bytes:
    """The bytes of ``raw`` outside JSON strings, at C speed: escaped characters removed first so
    every remaining quote delimits a string. (Garbage in, garbage out: malformed JSON is refused
    by the parser afterwards whatever this returns.)"""
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    return b"".join(raw.split(b'"')[::2])


def _max_depth(outside: bytes) -> int:
    """Deepest bracket nesting (no recursion: a running sum over the brackets)."""
    brackets = outside.translate(None, _BRACKETS_ONLY)
    if len(brackets) <= MAX_DEPTH:
        return 0
    codes = torch.frombuffer(bytearray(brackets), dtype=torch.uint8)
    steps = torch.where((codes == ord("[")) | (codes == ord("{")), 1, -1).to(torch.int32)
    return int(torch.cumsum(steps, 0).max())


def _lone_surrogate(raw: bytes) -> bool:
    """Whether an escape ``\\uD800``-``\\uDFFF`` appears outside a high+low pair."""
    if b"\\u" not in raw:
        return False
    return any(match.group(1) for match in _ESCAPE.finditer(raw))


def _number_problem(outside: bytes) -> str | None:
    """An integer too long, or a number that overflows binary64 (``1e400``), outside strings.
    Checked on the text so the parser keeps its C fast path for numbers."""
    long = _LONG_DIGITS.search(outside)
    if long:
        return f"a number of more than {MAX_INTEGER_DIGITS} digits"
    for match in _BIG_EXPONENT.finditer(outside):  # rare: then find the literal's start
        head = _NUMBER_HEAD.search(outside, max(0, match.start() - 2 * MAX_INTEGER_DIGITS - 2), match.start())
        literal = (head.group() if head else b"") + match.group()
        try:
            finite = math.isfinite(float(literal))
        except ValueError:
            continue  # not a number after all: the parser will say so
        if not finite:
            return f"{literal[:40].decode('ascii', 'replace')} (not finite)"
    return None


def loads_strict(raw: bytes, source: str, error: type[DeltaFormatError] = ManifestError) -> Any:
    """Parse ``raw`` (UTF-8 JSON) by the rules above; every refusal is an ``error``."""

    def refuse(what: str, found: object) -> DeltaFormatError:
        return error(f"{source} {what}", expected="strict JSON (SPEC §3)", found=str(found)[:120])

    def parse_constant(name: str) -> float:
        raise refuse("holds a non-JSON number", name)

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            seen: set[str] = set()
            duplicate = next(k for k, _ in items if k in seen or seen.add(k))
            raise refuse("repeats a key", repr(duplicate))
        return out

    outside = _outside_strings(raw)
    depth = _max_depth(outside)
    if depth > MAX_DEPTH:
        raise refuse("is nested too deeply", f"{depth} levels (at most {MAX_DEPTH})")
    problem = _number_problem(outside)
    if problem:
        raise refuse("holds a number outside the spec's range", problem)
    if _lone_surrogate(raw):
        raise refuse("holds an unpaired UTF-16 surrogate escape", "\\uD800-\\uDFFF alone")
    try:
        text = raw.decode("utf-8")
        return json.loads(text, object_pairs_hook=pairs, parse_constant=parse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        if isinstance(exc, DeltaFormatError):
            raise
        raise refuse("is not valid JSON", exc) from None
