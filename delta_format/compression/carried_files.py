"""What of the fine-tune's repository travels with its delta (SPEC §2.1): every file but the
weights the delta stands for, pickles and other runtimes' weight copies; and which metadata of the
fine-tune's model card the delta's card repeats (SPEC §3.6, §10.1).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from ..io.resolve import OTHER_WEIGHT_FOLDERS, OTHER_WEIGHT_SUFFIXES, PICKLE_SUFFIXES

logger = logging.getLogger(__name__)

REPLACED_WEIGHTS = re.compile(r".*\.safetensors(\.index\.json)?")
"""The top-level weight files the delta stands for (``model.safetensors``, its shards, its index,
variants such as ``model.fp16.safetensors``). Safetensors in subfolders (a sentence-transformers
``2_Dense/`` head) are modules the delta does not cover: carried."""

TRAINER_FOLDERS = re.compile(r"checkpoint-\d+")
"""A Trainer's intermediate checkpoints: whole models of their own, not part of the fine-tune."""

TOKENIZER_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tiktoken.model",
    "chat_template.jinja",
    "chat_template.json",
)
"""What a tokenizer (and its chat template) may need: a LoRA adapter carries these of its own."""


def carried_file(relative: str) -> bool:
    """Whether the fine-tune's file at ``relative`` (a POSIX path inside its directory) is copied
    into the delta: every file except the weights the delta replaces, pickles, other formats'
    copies of the weights, the fine-tune's own card (the delta gets its own) and hidden files.

    Carrying everything else (sentence-transformers' ``modules.json`` and ``1_Pooling/``, chat
    templates, generation config, a ``2_Dense/model.safetensors`` head the delta does not cover)
    is what makes `apply`'s output load in every library exactly like the fine-tune.
    """
    parts = relative.split("/")
    name = parts[-1]
    if any(part.startswith(".") for part in parts) or relative == "README.md":
        return False
    if len(parts) == 1 and (REPLACED_WEIGHTS.fullmatch(name) or name.startswith("adapter_")):
        return False
    if any(part in OTHER_WEIGHT_FOLDERS or TRAINER_FOLDERS.fullmatch(part) for part in parts[:-1]):
        return False
    return not name.lower().endswith(PICKLE_SUFFIXES + OTHER_WEIGHT_SUFFIXES)


def carried_files(directory: Path) -> dict[str, Path]:
    """The fine-tune's files `carried_file` keeps, by POSIX path relative to ``directory``
    (subfolders included; symlinked folders are not followed, so a link cannot loop or escape)."""
    found: dict[str, Path] = {}
    for root, folders, files in os.walk(directory):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            relative = path.relative_to(directory).as_posix()
            if path.is_file() and carried_file(relative):
                found[relative] = path
    return found


CARRIED_CARD_KEYS = (
    "license",
    "license_name",
    "license_link",
    "language",
    "datasets",
    "pipeline_tag",
    "tags",
    "library_name",
)
"""The fine-tune card's metadata a delta's card repeats, so the Hub's filters and widgets treat the
delta as the model it is (SPEC §10.1)."""


def card_data_of(directory: Path | None) -> dict[str, Any]:
    """`CARRIED_CARD_KEYS` from ``directory/README.md`` (huggingface_hub's `ModelCard` parses it);
    {} without a readable card: a card is informative, never a reason to fail."""
    path = directory / "README.md" if directory is not None else None
    if path is None or not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(path).data.to_dict()
    except (ValueError, TypeError, OSError, UnicodeDecodeError) as exc:  # a hand-written card may be broken
        logger.warning("ignoring the fine-tune's model card %s: %s", path, str(exc)[:200])
        return {}
    return {key: data[key] for key in CARRIED_CARD_KEYS if data.get(key) not in (None, "", [])}
