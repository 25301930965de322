"""A checkpoint's tensor names against the model's: what transformers renames on loading.

Transformers 5 loads some architectures under other names than their checkpoints keep (GPT-NeoX's
``embed_out`` is the model's ``lm_head``; ViT, CLIP, LLaVA-style and Gemma-3 multimodal
checkpoints are renamed wholesale), and adds or strips the base model's prefix (a ``BertModel``
base under a ``BertForSequenceClassification`` fine-tune: ``embeddings.…`` is
``bert.embeddings.…``). A delta names its parameters as the fine-tune's checkpoint does (SPEC §3.4)
and a base checkpoint its tensors as it was saved, so a loader that places tensor by tensor must
see both through the model's names: `model_names` asks transformers' own rules
(``get_model_conversion_mapping``, ``rename_source_key``) for the names it would load each key
under, and the loader then reads the delta and the base through renamed views
(`DeltaReader.renamed`, `Checkpoint.renamed`). The delta's own names still seed its masks and
rounding (`DeltaReader.source_name`).

Architectures whose checkpoints are *converted* on loading (several tensors merged into one, as
mixture-of-experts models stack their experts) cannot be placed tensor by tensor: they are refused
with the way out (``delta-format apply``, then transformers' own ``from_pretrained``).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import CorruptDeltaError, InvalidArgumentError


class ConvertedCheckpointError(InvalidArgumentError):
    """The model's loader converts checkpoint tensors (merges, splits) that a delta edits one by one."""


def model_names(model, names: Iterable[str]) -> dict[str, str]:
    """``{checkpoint name: model name}`` for the ``names`` transformers would load under another
    name into ``model`` (built empty); names it keeps are left out (an empty dict: no renaming).

    Raises:
        ConvertedCheckpointError: a name transformers would convert (merge or split), not rename.
    """
    expected = model.state_dict(keep_vars=True)
    pending = [name for name in names if name not in expected]  # the others load as they are named
    rules = _rules(model) if pending else None
    if rules is None:
        return {}
    renamings, converters, rename = rules
    prefix = getattr(model, "base_model_prefix", None) or None
    out, converted = {}, []
    for name in pending:
        new, pattern = rename(name, renamings, converters, prefix, expected)
        if pattern is not None:
            converted.append(name)
        elif new != name:
            out[name] = new
    if converted:
        raise ConvertedCheckpointError(
            f"{type(model).__name__} converts its checkpoint's tensors on loading (e.g. {converted[0]!r}), "
            "which a delta edits one by one",
            expected="an architecture whose checkpoint tensors load as they are, or renamed",
            found=f"{len(converted)} converted tensors",
            fix="write the full fine-tune with `delta-format apply DELTA OUT` and load OUT with transformers",
        )
    return out


def check_unique(names: dict[str, str], present: Iterable[str], where: str) -> None:
    """Refuse a renaming under which two of ``present`` would take one name (one would be dropped
    silently): e.g. a delta with entries for both ``embed_out.weight`` and ``lm_head.weight``."""
    seen: dict[str, str] = {}
    for name in present:
        new = names.get(name, name)
        if new in seen:
            raise CorruptDeltaError(
                f"{where} has two tensors that load as {new!r}: {seen[new]!r} and {name!r}",
                expected="one tensor per parameter of the model",
                found=f"{seen[new]!r} and {name!r}",
                fix="keep one of them (the checkpoint's own name); a file from a stranger may be hostile",
            )
        seen[new] = name


def _rules(model):
    """Transformers' renaming and conversion rules for ``model``, None where it has none (an older
    transformers, or a model that is not a ``PreTrainedModel``)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return None
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # a custom model transformers cannot map: its names are its checkpoint's
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters, rename_source_key
