"""The fine-tune's model, built empty: every parameter on the meta device, buffers real.

accelerate's `init_empty_weights` (not ``torch.device("meta")``) keeps buffers on CPU, so
non-persistent buffers such as rotary ``inv_freq`` are computed exactly as transformers does.
The model's weight initialisers are skipped while it is built (on meta tensors they compute
nothing, yet cost ~0.4 ms a call through torch's reference decompositions: 45 ms of a 220M
model's cache-hit load); modules that own non-persistent buffers, which no checkpoint holds,
are then initialised as transformers initialises them after a load.
"""

from __future__ import annotations

import contextlib

import torch

from ..io.model_class import model_class_for


def build_skeleton(config, dtype: torch.dtype, trust_remote_code: bool = False):
    """An empty model of the right class for ``config`` in ``dtype``."""
    from accelerate import init_empty_weights

    cls = model_class_for(config, trust_remote_code)
    with init_empty_weights(), _no_init_weights():
        if cls is None:
            from transformers import AutoModel

            model = AutoModel.from_config(config, dtype=dtype, trust_remote_code=True)
        else:
            model = cls._from_config(config, dtype=dtype)
    _init_non_persistent_buffers(model)
    return model


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # another transformers layout: initialise as before
        return contextlib.nullcontext()
    return no_init_weights()


def _init_non_persistent_buffers(model) -> None:
    init = getattr(model, "_init_weights", None)
    if init is None:
        return
    for module in model.modules():
        if module._non_persistent_buffers_set:
            with torch.no_grad():
                init(module)
