"""The fine-tune's model, built empty: every parameter on the meta device, buffers real.

accelerate's `init_empty_weights` (not ``torch.device("meta")``) keeps buffers on CPU, so
non-persistent buffers such as rotary ``inv_freq`` are computed exactly as transformers does.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError


def model_class_for(config, trust_remote_code: bool = False):
    """The class named by ``config.architectures`` (e.g. ``LlamaForCausalLM``,
    ``BertForSequenceClassification``), falling back to the bare ``AutoModel`` class."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if getattr(config, "auto_map", None):
        if not trust_remote_code:
            raise InvalidArgumentError(
                "the model needs code from its repository", expected="trust_remote_code=True to run it",
                found=f"auto_map {config.auto_map}", fix="review the repository's code, then pass trust_remote_code=True",
            )
        return None  # resolved by the Auto class with trust_remote_code
    from transformers import AutoModel

    return AutoModel._model_mapping[type(config)]


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
