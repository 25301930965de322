"""Where the compressor's tensors come from: a checkpoint directory, an in-memory model, or a
PEFT LoRA adapter over the base.

Every source answers the same `TensorSource` protocol, so the pipeline never asks what kind of
source it holds. Sources are lazy: a checkpoint reads one tensor at a time from its safetensors
files, and a LoRA adapter computes a target's fine-tuned value only when it is read.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..core.dtypes import CHECKPOINT_DTYPES
from ..core.fingerprint import fingerprint_state_dict
from ..core.manifest import BaseReference
from ..io.checkpoint import Checkpoint
from ..io.key_map import ConvertedCheckpointError, model_names
from ..io.model_class import (
    architecture_names,
    empty_model_from_config,
    head_names,
    lookup_names,
    model_class_for,
    tied_copies,
)
from .carried_files import card_data_of, carried_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""Either one in a directory means a tokenizer can be loaded from it."""

Factors = tuple[torch.Tensor, torch.Tensor]
"""``(u, v)`` with ``u @ v`` a parameter's delta viewed as ``[shape[0], prod(shape[1:])]``."""


@runtime_checkable
class TensorSource(Protocol):
    """A model the compressor reads, as a base or as a fine-tune, one tensor at a time.

    The pipeline only uses these members, so a new kind of source (another adapter format, a
    remote store) is one class. ``dtype`` in `info` is a `torch.dtype`, or the safetensors name
    of a dtype torch cannot hold (e.g. ``"F8_E8M0"``), which the compressor can only compare.
    """

    def names(self) -> list[str]:
        """Every tensor name, in the order the delta lists them."""

    def __contains__(self, name: str) -> bool:
        """Whether the source has a tensor ``name``."""

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        """``(shape, dtype)`` of ``name`` without reading it (schedules and byte counts need no data)."""

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` on the CPU in its own dtype."""

    def read(self, name: str, base: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, Factors | None]:
        """``(fine-tuned value, exact delta or None, factors or None)`` of ``name``, given the base's
        value. A source that knows its delta exactly (a LoRA product) returns it, so the compressor
        does not subtract the rounded fine-tuned value; one that knows it as factors returns them."""

    def changed(self, name: str) -> bool | None:
        """Whether ``name`` differs from the base: True or False where the source knows (an adapter
        changes only its targets), None where it does not (compare the values)."""

    def factor_dtype(self, name: str) -> torch.dtype | None:
        """The dtype ``name``'s factors were stored in (a LoRA adapter's), None without factors."""

    def provides_factors(self) -> bool:
        """Whether `read` can return factors: methods that store an adapter's own factors need it."""

    def adapter_params(self) -> dict[str, Any] | None:
        """What the manifest records about the adapter the fine-tune came from, None for full weights."""

    def architecture_names(self) -> set[str] | None:
        """The tensor names this model's architecture loads from a checkpoint (its state dict:
        parameters and persistent buffers), None where it cannot be told. A base tensor outside
        it (an int64 ``position_ids`` buffer an older transformers saved) is one the fine-tune
        would ignore on loading, as transformers ignores unexpected keys."""

    def lookup_names(self) -> set[str]:
        """The tensors the model reads as lookup tables (`delta_format.io.model_class.lookup_names`:
        embeddings, output embeddings); empty where it cannot be told."""

    def head_names(self) -> set[str]:
        """Of those, the output embeddings and what is tied to them (`delta_format.io.model_class.head_names`)."""

    def fingerprint(self) -> dict:
        """The base fingerprint of these tensors (SPEC §7)."""

    def reference(self) -> BaseReference:
        """How a loader finds this model again when it is the base (repo + commit, or local path)."""

    def side_files(self) -> dict[str, Path | bytes]:
        """Files to copy beside the delta (config, tokenizer, a library's module configs), by POSIX
        path relative to the delta directory (``1_Pooling/config.json``): a path or the bytes."""

    def load_model(self) -> torch.nn.Module:
        """The whole model in float32, for calibration (a private copy: the caller edits it)."""

    def tokenizer(self) -> Any:
        """The model's tokenizer, None if it has none. May raise OSError/ValueError from transformers."""

    def card_data(self) -> dict[str, Any]:
        """What the fine-tune's own model card says that the delta's card carries over (`CARRIED_CARD_KEYS`:
        license, language, datasets, pipeline tag, tags, library), {} without a card."""


class WholeValueSource:
    """The members shared by sources that hold values whole (a checkpoint, a model), not as a
    delta or factors: they cannot say which tensors changed, so the compressor compares them."""

    def read(self, name: str, base: torch.Tensor | None) -> tuple[torch.Tensor, None, None]:
        return self.get(name), None, None

    def changed(self, name: str) -> None:
        return None  # unknown: the compressor compares the values

    def factor_dtype(self, name: str) -> None:
        return None

    def provides_factors(self) -> bool:
        return False

    def adapter_params(self) -> None:
        return None


class CheckpointSource(WholeValueSource):
    """A safetensors checkpoint directory (local, or a resolved Hub snapshot)."""

    def __init__(self, directory: Path, repo_id: str | None = None, commit_sha: str | None = None):
        self.checkpoint = Checkpoint(directory, commit_sha=commit_sha)
        self.directory = Path(directory)
        self.repo_id = repo_id

    def names(self) -> list[str]:
        return list(self.checkpoint)

    def __contains__(self, name: str) -> bool:
        return name in self.checkpoint

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        shape, stored = self.checkpoint.shape_dtype(name)
        return shape, CHECKPOINT_DTYPES.get(stored, stored)

    def get(self, name: str) -> torch.Tensor:
        return self.checkpoint.get_tensor(name)

    def fingerprint(self) -> dict:
        return self.checkpoint.fingerprint()

    def reference(self) -> BaseReference:
        if self.repo_id and self.checkpoint.commit_sha:
            return BaseReference(
                repo_id=self.repo_id, revision=self.checkpoint.commit_sha, fingerprint=self.fingerprint()
            )
        return BaseReference(local_path=str(self.directory.resolve()), fingerprint=self.fingerprint())

    def side_files(self) -> dict[str, Path | bytes]:
        return dict(carried_files(self.directory))

    def architecture_names(self) -> set[str] | None:
        return self._layout()[0]

    def lookup_names(self) -> set[str]:
        return self._layout()[1]

    def head_names(self) -> set[str]:
        return self._layout()[2]

    def tied_copies(self) -> dict[str, str]:
        """``{name: the name it is tied to}`` for the tensors of this checkpoint that its model ties
        to another it also holds (a head saved beside the embedding it shares): transformers loads
        the one it keeps for both, so the other is not part of the fine-tune."""
        return self._layout()[3]

    def _layout(self) -> tuple[set[str] | None, set[str], set[str], dict[str, str]]:
        if not hasattr(self, "_layout_found"):  # one empty build of the architecture answers all four
            model = self.empty_model()
            if model is None:
                self._layout_found = (None, set(), set(), {})
            else:  # the model's names, as this checkpoint names them (`io.key_map`)
                try:
                    back = {new: old for old, new in model_names(model, self.names()).items()}
                    loaded = {back.get(n, n) for n in model.state_dict()}
                except ConvertedCheckpointError:  # merged experts: which keys load cannot be told by name
                    back, loaded = {}, None
                tables = ({back.get(n, n) for n in names} for names in (lookup_names(model), head_names(model)))
                tied = {back.get(t, t): back.get(k, k) for t, k in tied_copies(model).items()}
                held = set(self.names())
                tied = {t: k for t, k in tied.items() if t in held and k in held}
                self._layout_found = (loaded, *tables, tied)
        return self._layout_found

    def empty_model(self):
        """The fine-tune's model built empty from this checkpoint's config, None where it cannot be."""
        if not hasattr(self, "_empty"):
            self._empty = empty_model_from_config(self.directory)
        return self._empty

    def model_names(self, model, names=None) -> dict[str, str]:
        """``{name here: model name}`` where ``model`` loads this checkpoint's tensors (or ``names``)
        under other names; empty where it converts them (merged experts), which a delta does not
        follow: its names stay the checkpoint's."""
        try:
            return model_names(model, self.names() if names is None else names)
        except ConvertedCheckpointError:
            return {}

    def renamed(self, names: dict[str, str]) -> CheckpointSource:
        """This checkpoint with its tensors renamed (`Checkpoint.renamed`), e.g. a base's under the
        names of the fine-tune's checkpoint."""
        view = copy.copy(self)
        view.checkpoint = self.checkpoint.renamed(names)
        return view

    def card_data(self) -> dict[str, Any]:
        return card_data_of(self.directory)

    def load_model(self) -> torch.nn.Module:
        from transformers import AutoConfig

        cls = model_class_for(AutoConfig.from_pretrained(self.directory))
        return cls.from_pretrained(self.directory, dtype=torch.float32)

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.directory)


def aligned_base(base: TensorSource, finetune: TensorSource) -> TensorSource:
    """``base`` with its tensors under the fine-tune checkpoint's names wherever the fine-tune's
    model loads both under one name: a task model's fine-tune of a bare base (``embeddings.…`` in a
    ``BertModel`` base, ``bert.embeddings.…`` in its ``BertForSequenceClassification`` fine-tune),
    or keys transformers renames (`io.key_map`). Without it each such tensor would be stored whole."""
    if not isinstance(base, CheckpointSource) or not isinstance(finetune, CheckpointSource):
        return base
    ft_names = set(finetune.names())
    missing = [n for n in base.names() if n not in ft_names]
    model = finetune.empty_model() if missing else None
    if model is None:
        return base
    ft_map = finetune.model_names(model)
    to_ft = {ft_map.get(n, n): n for n in ft_names}
    base_map = finetune.model_names(model, missing)
    names = {}
    for name in missing:
        ft_name = to_ft.get(base_map.get(name, name))
        if ft_name is not None and ft_name not in base:
            names[name] = ft_name
    return base.renamed(names) if names else base


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` would write: tied parameters (tensors sharing storage) once,
    under the name transformers keeps (the first name in ``state_dict`` order for other modules)."""
    state = dict(model.state_dict())
    try:
        from transformers import PreTrainedModel
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # pragma: no cover - transformers is a dependency, but its internals move
        PreTrainedModel = remove_tied_weights_from_state_dict = None
    if PreTrainedModel is not None and isinstance(model, PreTrainedModel):
        try:
            state = remove_tied_weights_from_state_dict(state, model)
        except (RuntimeError, TypeError, AttributeError):
            pass  # fall through to the storage rule below
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, tensor in state.items():
        if tensor.device.type != "meta" and tensor.numel():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key in seen:
                continue
            seen.add(key)
        out[name] = tensor.detach()
    return out


class ModelSource(WholeValueSource):
    """An in-memory model, read through its (tie-deduplicated) state dict."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.state = model_state_dict(model)

    def names(self) -> list[str]:
        return list(self.state)

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        tensor = self.state[name]
        return tuple(tensor.shape), tensor.dtype

    def get(self, name: str) -> torch.Tensor:
        return self.state[name].to("cpu")

    def fingerprint(self) -> dict:
        return fingerprint_state_dict({name: tensor.cpu() for name, tensor in self.state.items()})

    def reference(self) -> BaseReference:
        """The model's origin if transformers recorded it: a Hub repo at the commit it was loaded
        from, or the directory it was loaded from. Without one, only the fingerprint."""
        config = getattr(self.model, "config", None)
        origin = getattr(config, "_name_or_path", "") or getattr(self.model, "name_or_path", "")
        commit = getattr(config, "_commit_hash", None)
        fingerprint = self.fingerprint()
        if origin and Path(origin).is_dir():
            return BaseReference(local_path=str(Path(origin).resolve()), fingerprint=fingerprint)
        if origin and commit and re.fullmatch(r"[0-9a-f]{40}", str(commit)):
            return BaseReference(repo_id=origin, revision=commit, fingerprint=fingerprint)
        warnings.warn(
            "the in-memory base model does not say where it came from; the delta records only its "
            "fingerprint, so loading it needs base_model= (or --base)",
            stacklevel=3,
        )
        return BaseReference(fingerprint=fingerprint)

    def side_files(self) -> dict[str, Path | bytes]:
        files: dict[str, Path | bytes] = {}
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            files["config.json"] = config.to_json_string().encode()
        generation = getattr(self.model, "generation_config", None)
        can_generate = getattr(self.model, "can_generate", lambda: False)
        if generation is not None and can_generate():
            files["generation_config.json"] = generation.to_json_string().encode()
        return files

    def architecture_names(self) -> set[str] | None:
        """The state dict of an empty model of this model's class and config; None for a model
        that is not a transformers model (its own state dict cannot tell what it would load)."""
        from transformers import PreTrainedModel

        if not isinstance(self.model, PreTrainedModel):
            return None
        return architecture_names(type(self.model), self.model.config)

    def lookup_names(self) -> set[str]:
        return lookup_names(self.model)

    def head_names(self) -> set[str]:
        return head_names(self.model)

    def card_data(self) -> dict[str, Any]:
        origin = getattr(getattr(self.model, "config", None), "_name_or_path", "")
        return card_data_of(Path(origin)) if origin and Path(origin).is_dir() else {}

    def load_model(self) -> torch.nn.Module:
        return copy.deepcopy(self.model)

    def tokenizer(self) -> Any:
        origin = getattr(getattr(self.model, "config", None), "_name_or_path", "")
        if origin and Path(origin).is_dir():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(origin)
        return None
