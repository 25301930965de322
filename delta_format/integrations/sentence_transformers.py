"""sentence-transformers: a delta of a sentence-embedding fine-tune, loaded as a `SentenceTransformer`
in one line.

A sentence-transformers repo is a transformers model plus module folders (``modules.json``,
``1_Pooling/config.json``, ``2_Normalize/``, ``sentence_bert_config.json``), all of which the delta
carries beside its tensors. `load_sentence_transformer` materialises the transformer with
`DeltaModel.from_pretrained` (base fingerprint-checked, in memory: nothing is written to disk) and
lets sentence-transformers build every module from the delta's own files, handing its
``Transformer`` module that model instead of reading weights that the delta does not have.

Example:
    >>> from delta_format.integrations.sentence_transformers import load_sentence_transformer
    >>> model = load_sentence_transformer("user/minilm-ft-delta")         # doctest: +SKIP
    >>> model.encode(["A sentence to embed."]).shape                      # doctest: +SKIP
    (1, 384)
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError
from ..io.resolve import HubOptions, open_delta
from ..loaders import DeltaModel

MODULES_NAME = "modules.json"
"""sentence-transformers' list of modules: its presence is what makes a directory one of its models."""

_HANDOVER = threading.Lock()
"""Serialises the moment the ``Transformer`` module class is told which model to hand over."""


def load_sentence_transformer(
    delta: str | os.PathLike,
    *,
    revision: str | None = None,
    base_model: str | os.PathLike | None = None,
    base_revision: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    verify_base: bool = True,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    **sentence_transformer_kwargs: Any,
):
    """The sentence-transformers fine-tune a delta describes, as a ready `SentenceTransformer`.

    Args:
        delta: a delta directory or Hub repo id, compressed from a sentence-transformers model
            (its ``modules.json`` and module folders travel with the delta).
        revision, base_model, base_revision, verify_base, token, cache_dir, local_files_only: as in
            `DeltaModel.from_pretrained`.
        device: where the model runs (sentence-transformers' ``device``; default: its choice).
        dtype: the transformer's dtype (default: the fine-tune config's).
        **sentence_transformer_kwargs: passed on to ``SentenceTransformer`` (e.g. ``prompts``,
            ``truncate_dim``).

    Returns:
        A ``sentence_transformers.SentenceTransformer`` whose embeddings are the fine-tune's
        (exactly, for a lossless delta; within the delta's measured error otherwise).

    Raises:
        InvalidArgumentError: the delta is not of a sentence-transformers model, or its modules
            have no ``Transformer`` module to hand the model to.
    """
    try:
        from sentence_transformers import SentenceTransformer

        try:
            from sentence_transformers.sentence_transformer.modules import Transformer
        except ImportError:  # sentence-transformers < 6
            from sentence_transformers.models import Transformer
    except ImportError:
        raise InvalidArgumentError(
            "loading a delta as a SentenceTransformer needs the sentence-transformers package",
            expected="sentence-transformers installed",
            found="not installed",
            fix='pip install "delta-format[st]"',
        ) from None
    hub = HubOptions(revision, token, cache_dir, local_files_only)
    opened = open_delta(delta, hub)
    _check_modules(opened.directory)
    base = {"base_model": base_model, "base_revision": base_revision, "verify_base": verify_base}
    hub_options = {"token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
    model = DeltaModel.from_pretrained(opened, dtype=dtype, **base, **hub_options)
    with _handing_over(Transformer, opened.directory, _bare_model(model)):
        return SentenceTransformer(
            str(opened.directory), device=device, local_files_only=True, **sentence_transformer_kwargs
        )


def _check_modules(directory: Path) -> None:
    if not (directory / MODULES_NAME).is_file():
        raise InvalidArgumentError(
            "this delta is not of a sentence-transformers model",
            expected=f"{MODULES_NAME} beside the delta (carried from the fine-tune)",
            found="no modules.json",
            fix="load it with DeltaModel.from_pretrained, or re-compress the fine-tune with this version",
        )


def _bare_model(model: Any) -> Any:
    """The model sentence-transformers' ``Transformer`` module would have loaded: the bare
    ``AutoModel`` (a checkpoint saved with a head, ``BertForMaskedLM``, gives its ``bert``)."""
    from transformers import AutoModel

    bare = AutoModel._model_mapping.get(type(model.config), None)
    if bare is not None and not isinstance(model, bare) and isinstance(model.base_model, bare):
        return model.base_model
    return model


@contextlib.contextmanager
def _handing_over(transformer_class: type, directory: Path, model: Any) -> Iterator[None]:
    """While open, ``transformer_class`` (sentence-transformers' ``Transformer`` module) given
    ``directory`` returns ``model`` from its model-loading step instead of reading weights;
    any other directory loads as usual. The class attribute is restored on exit."""
    original = transformer_class._load_model
    target = Path(directory).resolve()

    def load_model(self, model_name_or_path, *args, **kwargs):
        if Path(model_name_or_path).resolve() == target:
            return model
        return original(self, model_name_or_path, *args, **kwargs)

    with _HANDOVER:
        transformer_class._load_model = load_model
        try:
            yield
        finally:
            transformer_class._load_model = original


__all__ = ["load_sentence_transformer"]
