"""Offline text for the fidelity pairs: the Python standard library's docstrings and source code.

Files are split by a hash of their path into train (80 %), calibration (10 %) and evaluation
(10 %) groups, so no evaluation text is seen by a fine-tune or by calibration.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
import sysconfig
from functools import cache
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SKIP = ("test", "idlelib", "site-packages", "lib2to3", "tkinter", "ensurepip", "turtledemo")


def _group(path: Path) -> str:
    h = int(hashlib.sha1(str(path.relative_to(STDLIB)).encode()).hexdigest(), 16) % 10
    return "eval" if h == 0 else "calib" if h == 1 else "train"


def _paragraphs(path: Path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            for para in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                text = " ".join(para.split())
                if 40 <= len(text) <= 1000 and not text.startswith((">>>", "...")):
                    yield text


@cache
def corpus() -> dict[str, list[str]]:
    """Docstring paragraphs of the standard library by group (deduplicated, in file order)."""
    groups: dict[str, list[str]] = {"train": [], "calib": [], "eval": []}
    for path in sorted(STDLIB.rglob("*.py")):
        rel = str(path.relative_to(STDLIB))
        if any(part in rel.split("/")[0] for part in SKIP) or "/test" in rel:
            continue
        groups[_group(path)].extend(_paragraphs(path))
    return {g: list(dict.fromkeys(texts)) for g, texts in groups.items()}


def texts(group: str, n: int, seed: int) -> list[str]:
    out = list(corpus()[group])
    random.Random(seed).shuffle(out)
    return out[:n]


def _files(group: str):
    for path in sorted(STDLIB.rglob("*.py")):
        rel = str(path.relative_to(STDLIB))
        if not (any(part in rel.split("/")[0] for part in SKIP) or "/test" in rel) and _group(path) == group:
            yield path


def code_chunks(group: str, n: int, chars: int = 600, seed: int = 4) -> list[str]:
    """Source of top-level functions and classes (at least 200 characters, cut at ``chars``) of
    one group's files, shuffled."""
    chunks = []
    for path in _files(group):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                segment = ast.get_source_segment(source, node) or ""
                if len(segment) >= 200:
                    chunks.append(segment[:chars])
    random.Random(seed).shuffle(chunks)
    return chunks[:n]
