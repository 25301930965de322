"""Which transformers class a checkpoint's config.json asks for: one resolver for the loader's
skeleton, the compressor's calibration model and on-the-fly bases."""

from __future__ import annotations

from pathlib import Path

from ..errors import DeltaFormatError, InvalidArgumentError


def model_class_for(config, trust_remote_code: bool = False):
    """The class named by ``config.architectures`` (e.g. ``LlamaForCausalLM``,
    ``BertForSequenceClassification``), falling back to the bare ``AutoModel`` class."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        # only a model class built from this kind of config: a config.json from a stranger may name
        # any attribute of transformers (a function, a class of another architecture)
        if _builds(cls, config):
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


def _builds(cls, config) -> bool:
    """Whether ``cls`` is a transformers model class whose config class ``config`` is."""
    from transformers import PreTrainedModel

    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        return False
    config_class = getattr(cls, "config_class", None)
    return isinstance(config_class, type) and isinstance(config, config_class)


def architecture_names_from_config(directory: Path) -> set[str] | None:
    """The state-dict names of the model ``directory/config.json`` describes, built empty (no
    memory for weights); None without a config transformers can build without remote code."""
    return _from_config(directory, architecture_names)


def layout_from_config(directory: Path) -> tuple[set[str], set[str], set[str]] | None:
    """``(architecture_names, lookup_names, head_names)`` of the model ``directory/config.json``
    describes, from one empty build; None as `architecture_names_from_config`."""

    model = empty_model_from_config(directory)
    return None if model is None else (set(model.state_dict()), lookup_names(model), head_names(model))


def empty_model_from_config(directory: Path):
    """The model ``directory/config.json`` describes, built empty (meta tensors); None as
    `architecture_names_from_config`."""
    return _from_config(directory, lambda cls, config: None if cls is None else _empty(cls, config))


def _from_config(directory: Path, query):
    if not (directory / "config.json").is_file():
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(directory)
        return query(model_class_for(config), config)
    except (OSError, ValueError, KeyError, TypeError, ImportError, DeltaFormatError):
        return None  # an architecture this install cannot build: every orphan stays an error


def _empty(cls, config):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls._from_config(config)


def lookup_names(model) -> set[str]:
    """The parameters ``model`` reads as lookup tables: every `torch.nn.Embedding`'s weight, the
    output embeddings (a language model's head, whose rows weigh in by each token's probability)
    and every name tied to one of them. A token reads one row of a table, so an error spread over
    a table moves a token's output far less than the same error in a linear layer's weight."""
    from torch import nn

    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(getattr(head, "weight", None), nn.Parameter):
        tables.add(id(head.weight))
    return {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in tables}


def head_names(model) -> set[str]:
    """The names of ``model``'s output embeddings (a language model's head) and of every
    parameter tied to them (a tied input embedding): the lookup tables whose rows also weigh in
    every token's output, through its probabilities."""
    from torch import nn

    head = getattr(model, "get_output_embeddings", lambda: None)()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, nn.Parameter):
        return set()
    weights = {id(weight)}
    if _ties_embeddings(getattr(model, "config", None)):  # an empty build need not tie them yet
        embeddings = getattr(model, "get_input_embeddings", lambda: None)()
        if isinstance(getattr(embeddings, "weight", None), nn.Parameter):
            weights.add(id(embeddings.weight))
    return {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in weights}


def tied_copies(model) -> dict[str, str]:
    """``{name: the name checkpoints keep}`` for every parameter ``model`` ties to another
    (transformers' ``all_tied_weights_keys``, which an empty build already knows; empty in older
    transformers, where ``save_pretrained`` left tied copies out anyway)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    return {str(t): str(k) for t, k in tied.items()} if isinstance(tied, dict) else {}


def untie(config) -> bool:
    """Set ``config`` (and its text config) not to tie the input embeddings to the head; whether it did."""
    found = False
    for part in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)())}.values():
        if part is not None and getattr(part, "tie_word_embeddings", False):
            part.tie_word_embeddings = False
            found = True
    return found


def _ties_embeddings(config) -> bool:
    """Whether ``config`` ties the input embeddings to the head (its text model's, for a composite)."""
    tie = getattr(config, "tie_word_embeddings", None)
    if tie is None and hasattr(config, "get_text_config"):
        tie = getattr(config.get_text_config(), "tie_word_embeddings", None)
    return bool(tie)


def architecture_names(cls, config) -> set[str] | None:
    """The state-dict names (parameters and persistent buffers: what loading reads from a
    checkpoint) of ``cls`` built empty from ``config``; None if ``cls`` is None."""
    if cls is None:
        return None
    return set(_empty(cls, config).state_dict())
