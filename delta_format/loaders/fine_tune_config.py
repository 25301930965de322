"""The fine-tune's config, checked before a model is built from it (SPEC §8.8).

The model skeleton is built from the delta's ``config.json`` (its vocabulary may differ from the
base's). That file comes from a stranger, and a skeleton is built before any weight is read: a
``num_hidden_layers`` of 200,000 takes minutes and all the memory, a huge ``head_dim`` or position
count asks for terabytes of buffers. So the delta's config is used only if the manifest vouches
for it (SPEC §3.5), and only if it describes the base's architecture with the base's sizes:

* ``model_type`` equals the base's (``architectures``, the task head, may differ: a classifier
  fine-tuned from a bare encoder; the head's tensors are then the delta's, which `check_base`
  matches against the model built here);
* every integer field, at the top level and in nested sub-configs (``text_config``, ...), equals
  the base's (after transformers fills defaults), except the vocabulary size, token ids and a task
  head's labels, which a fine-tune may change (added tokens: the resized tensors must then be
  ``replace`` or grown entries, SPEC §9.2);
* an integer field the base's config lacks is refused.

Every failure (malformed JSON, a config transformers cannot read, a mismatch) is a typed error.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.constants import MAX_CONFIG_BYTES
from ..core.strict_json import loads_strict
from ..errors import BaseMismatchError, CorruptDeltaError
from ..io.checkpoint import Checkpoint
from ..io.delta import Delta

FREE_INTEGER_FIELDS = ("vocab_size",)
FREE_MAPPINGS = ("label2id", "id2label")
"""A task head's labels: a classifier fine-tuned from a bare base names its own (their count sizes
only the head, which the delta provides)."""
"""Integer fields a fine-tune may change (besides token ids, ``*_token_id``)."""


def _read_config(directory: Path, what: str, config_class: Any, trust_remote_code: bool, **kwargs: Any):
    """``config_class.from_pretrained(directory)`` after a strict parse; every failure typed."""
    name = "generation_config.json" if config_class.__name__ == "GenerationConfig" else "config.json"
    size = (directory / name).stat().st_size
    if size > MAX_CONFIG_BYTES:  # the labels may differ from the base's: their count is bounded here
        raise CorruptDeltaError(
            f"{what} {name} is too large",
            expected=f"at most {MAX_CONFIG_BYTES} bytes",
            found=f"{size} bytes",
            fix="this is not a model's config, or a hostile one",
        )
    loads_strict((directory / name).read_bytes(), f"{what} {name}", CorruptDeltaError)
    try:
        if name == "config.json":
            return config_class.from_pretrained(directory, trust_remote_code=trust_remote_code, **kwargs)
        return config_class.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CorruptDeltaError(
            f"{what} {name} cannot be read",
            expected="a config transformers can load",
            found=str(exc)[:200],
            fix="re-create the delta from a fine-tune whose config loads",
        ) from None


def _free(key: str) -> bool:
    return key in FREE_INTEGER_FIELDS or key.endswith(("_token_id", "_token_ids"))


def _integer_mismatches(delta: Mapping[str, Any], base: Mapping[str, Any], where: str = "") -> list[str]:
    found = []
    for key, value in delta.items():
        path = f"{where}{key}"
        if key in FREE_MAPPINGS:
            continue
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            found += _integer_mismatches(value, base[key], f"{path}.")
        elif isinstance(value, int) and not isinstance(value, bool) and not _free(key):
            if base.get(key) != value:
                found.append(f"{path}={value} (base: {base.get(key, 'absent')})")
    return found


def fine_tune_config(delta: Delta, base: Checkpoint, trust_remote_code: bool, model_kwargs: dict[str, Any]):
    """The config to build the model from: the delta's (vouched for, and checked against the
    base's), else the base's."""
    from transformers import AutoConfig

    delta_file = delta.reader.side_files.get("config.json")
    if delta_file is None:
        return _read_config(base.directory, "the base's", AutoConfig, trust_remote_code, **model_kwargs)
    if not (base.directory / "config.json").is_file():
        raise BaseMismatchError(
            "the base has no config.json to check the delta's config against",
            expected="a base checkpoint with its config.json",
            found=f"none in {base.directory}",
            fix="load the base the delta was made against (a transformers checkpoint directory)",
        )
    base_config = _read_config(base.directory, "the base's", AutoConfig, trust_remote_code).to_dict()
    config = _read_config(delta.directory, "the delta's", AutoConfig, trust_remote_code, **model_kwargs)
    mine = config.to_dict()
    problems = []  # the task head (``architectures``) may differ: a classifier fine-tuned from a bare base
    if base_config.get("model_type") is not None and mine.get("model_type") != base_config.get("model_type"):
        problems.append(f"model_type={mine.get('model_type')!r} (base: {base_config.get('model_type')!r})")
    problems += _integer_mismatches(mine, base_config)
    if problems:
        raise BaseMismatchError(
            "the delta's config.json describes another architecture or other sizes than the base's",
            expected="the base's model type and sizes (only the task head, the vocabulary and token ids may differ)",
            found="; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more" if len(problems) > 5 else ""),
            fix="load the base the delta was made against; do not load this delta if it came from a stranger",
        )
    return config


def fine_tune_generation_config(delta: Delta):
    """The delta's generation config (vouched for), None without one; every failure typed."""
    if "generation_config.json" not in delta.reader.side_files:
        return None
    from transformers import GenerationConfig

    return _read_config(delta.directory, "the delta's", GenerationConfig, False)
