"""The base's tensors under the delta's names, for the paths that work in checkpoint names.

``apply`` and ``verify`` work without a model: they pair each delta entry with the base tensor of
the same name. A classifier fine-tuned from a bare base names its parameters with the model's
prefix (``bert.embeddings.…``) where the base has none (``embeddings.…``): the same parameter to
transformers, which adds or strips the prefix on loading (`io.key_map`). `under_delta_names` asks
the fine-tune's model, built empty from the delta's checked config (SPEC §8.8), only when some
entry has no base tensor of its name, and renames just the base tensors it pairs with entries.
"""

from __future__ import annotations

import torch

from ..io.checkpoint import Checkpoint
from ..io.delta import Delta
from ..io.key_map import ConvertedCheckpointError, model_names
from .fine_tune_config import fine_tune_config
from .skeleton import build_skeleton


def under_delta_names(delta: Delta, base: Checkpoint) -> Checkpoint:
    """``base`` with each tensor that the fine-tune's model loads under the name of a delta entry
    missing from ``base`` renamed to that entry's name; ``base`` itself when nothing pairs."""
    missing = [n for n, e in delta.manifest.tensors.items() if e.encoding.needs_base and n not in base]
    if not missing or "config.json" not in delta.reader.side_files:
        return base
    model = build_skeleton(fine_tune_config(delta, base, False, {}), torch.float32)
    try:
        to_model = model_names(model, missing)
        by_model = {to_model.get(n, n): n for n in missing}
        unpaired = [n for n in base if n not in delta.manifest.tensors]
        names = {n: by_model[m] for n, m in model_names(model, unpaired).items() if m in by_model}
    except ConvertedCheckpointError:  # merged experts: checkpoint names on both sides already
        return base
    return base.renamed(names) if names else base
