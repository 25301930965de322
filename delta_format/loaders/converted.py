"""Loading an architecture whose checkpoints transformers converts on loading.

Mixture-of-experts models keep one tensor per expert in their checkpoints and one stacked tensor
per layer in memory (transformers' ``WeightConverter``), so the streaming load, which places each
of the delta's parameters into the model's tensor of the same name, has nowhere to put them
(`io.key_map`). Here the fine-tune is rebuilt in the checkpoint's own names instead (base + delta,
SPEC §9, exactly as ``apply`` writes it), and transformers loads that state dict with its own
conversions. It holds the rebuilt weights and the model at once (about twice the model at the
peak), and the result is not hot-swappable: ``swap_delta`` needs the streaming path's names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import BaseMismatchError
from ..io.checkpoint import Checkpoint
from ..io.delta import Delta
from .apply import fine_tune_tensors


def load_converted(model, base: Checkpoint, deltas: Sequence[tuple[Delta, float]], dtype: torch.dtype):
    """``model``'s class loaded by transformers from the fine-tune's rebuilt state dict (on CPU).

    Raises:
        BaseMismatchError: transformers cannot load it, or would leave a parameter missing (newly
            initialised: a silent wrong weight) or skip one of another shape.
    """
    state = dict(fine_tune_tensors(base, [(d.reader, s) for d, s in deltas], dtype, "loading"))
    fix = "load the base the delta was made against; a delta from a stranger may be hostile"
    try:
        loaded, info = type(model).from_pretrained(
            None, config=model.config, state_dict=state, dtype=dtype, output_loading_info=True
        )
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise BaseMismatchError(
            "transformers cannot load the fine-tune rebuilt from the base and the delta",
            expected="the architecture's checkpoint tensors",
            found=str(exc)[:300],
            fix=fix,
        ) from None
    problems = {k: sorted(info.get(k) or [])[:5] for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if problems or info.get("error_msgs"):
        raise BaseMismatchError(
            "the fine-tune rebuilt from the base and the delta does not fill the model",
            expected="every parameter, with its shape",
            found=problems or info["error_msgs"][:3],
            fix=fix,
        )
    return loaded
