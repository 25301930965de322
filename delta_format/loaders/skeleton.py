"""The fine-tune's model, built empty: every parameter on the meta device, buffers real.

accelerate's `init_empty_weights` (not ``torch.device("meta")``) keeps buffers on CPU, so
non-persistent buffers such as rotary ``inv_freq`` are computed exactly as transformers does.
"""

from __future__ import annotations

import torch

from ..io.model_class import model_class_for


def build_skeleton(config, dtype: torch.dtype, trust_remote_code: bool = False):
    """An empty model of the right class for ``config`` in ``dtype``."""
    from accelerate import init_empty_weights

    cls = model_class_for(config, trust_remote_code)
    with init_empty_weights():
        if cls is None:
            from transformers import AutoModel

            model = AutoModel.from_config(config, dtype=dtype, trust_remote_code=True)
        else:
            model = cls._from_config(config, dtype=dtype)
    return model
