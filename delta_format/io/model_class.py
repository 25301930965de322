"""Which transformers class a checkpoint's config.json asks for: one resolver for the loader's
skeleton, the compressor's calibration model and on-the-fly bases."""

from __future__ import annotations

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
                "the model needs code from its repository",
                expected="trust_remote_code=True to run it",
                found=f"auto_map {config.auto_map}",
                fix="review the repository's code, then pass trust_remote_code=True",
            )
        return None  # resolved by the Auto class with trust_remote_code
    from transformers import AutoModel

    return AutoModel._model_mapping[type(config)]
