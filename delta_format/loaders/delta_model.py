"""`DeltaModel.from_pretrained`: a delta (or several) plus its base -> an ordinary transformers model.

Composes the small steps, each testable alone:
resolve (huggingface_hub) -> read and validate the delta -> resolve and verify the base ->
build the empty model -> materialize (stream base, decode, add, cast, place) -> tie, finish.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..core.dtypes import parse_dtype
from ..errors import BaseMismatchError, InvalidArgumentError
from ..io.checkpoint import Checkpoint
from ..io.delta import Delta
from ..io.key_map import ConvertedCheckpointError, model_names
from ..io.model_class import tied_copies, untie
from ..io.resolve import HubOptions, open_delta
from .base_model import resolve_base
from .converted import load_converted
from .delta_checks import check_delta, scale_from
from .fine_tune_config import fine_tune_config, fine_tune_generation_config
from .materialize import materialize
from .materialized_cache import cache_directory, prepare_load
from .model_state import parameter_shapes
from .placement import DeviceMap, device_lookup, resolve_device_map
from .skeleton import build_skeleton
from .swap import DeltaSwapper, attach_swapper


class DeltaModel:
    """Load fine-tunes published as deltas. Not instantiated: its class methods return a
    transformers ``PreTrainedModel`` (or a `Delta`).

    Example:
        >>> from delta_format import DeltaModel
        >>> model = DeltaModel.from_pretrained("user/ft-delta", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> model.generate(**inputs)                                                   # doctest: +SKIP
    """

    @staticmethod
    def load_delta(
        delta: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> Delta:
        """Resolve a delta (directory or Hub repo id) and open it, validated, without a base."""
        return open_delta(delta, HubOptions(revision, token, cache_dir, local_files_only))

    @classmethod
    def from_pretrained(
        cls,
        delta: str | os.PathLike | Delta | Sequence[str | os.PathLike | Delta],
        *,
        revision: str | None = None,
        base_model: str | os.PathLike | None = None,
        base_revision: str | None = None,
        device_map: DeviceMap = None,
        dtype: torch.dtype | str | None = None,
        alpha: float | None = None,
        weights: Sequence[float] | None = None,
        verify_base: bool = True,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        max_memory: dict | None = None,
        cache_materialized: bool | None = None,
        **model_kwargs: Any,
    ):
        """Load the fine-tune a delta describes, as a ready transformers model.

        Args:
            delta: a delta directory, a Hub repo id, a `Delta`, or a list of them (task
                arithmetic: all must share one base; see ``weights``).
            revision: branch, tag or commit of the delta repo(s).
            base_model: use this base (directory or repo id) instead of the one the manifest pins.
            base_revision: revision of ``base_model`` (or of the manifest's base repo).
            device_map: ``"cpu"`` (default), ``"cuda"``, ``"cuda:1"``, an index, ``"auto"`` or a
                ``{module: device}`` dict, as in transformers.
            dtype: the model's dtype (default: the fine-tune config's, as transformers does).
            alpha: multiplies every stored coefficient (EXPO: > 1 extrapolates, < 1 interpolates).
            weights: per-delta multipliers when composing several deltas (default 1 each).
            verify_base: check the base against the delta's fingerprint (on by default).
            token, cache_dir, local_files_only: as in huggingface_hub.
            trust_remote_code: allow a model class defined in the repository's own code.
            max_memory: per-device limits for ``device_map="auto"``.
            cache_materialized: keep the computed weights in the materialised cache and map them
                from there on later loads (`materialized_cache`); ``False`` opts out, as does
                ``DELTA_FORMAT_MATERIALIZED_CACHE=0``; default on.
            **model_kwargs: set on the config (e.g. ``attn_implementation="sdpa"``).

        Returns:
            A transformers ``PreTrainedModel`` in eval mode.

        Raises:
            BaseMismatchError: the base is not the one the delta was made against, or lacks (or
                reshapes) a parameter it edits (`check_base`).
            ResolutionError: the delta or base cannot be found (or is not cached offline).
            DeltaFormatError: any other problem with the files or the arguments.
        """
        hub = HubOptions(revision, token, cache_dir, local_files_only)
        cached = cache_directory(cache_materialized) is not None  # a hit reads no delta bytes: check them on a miss
        opened, scales = _open_sources(delta, hub, alpha, weights, verify_checksums=not cached)
        base = resolve_base(opened[0].manifest, base_model, hub.updated(revision=base_revision))
        _check_composable(opened, verify_base)
        model, torch_dtype = _empty_model(opened[0], base, dtype, trust_remote_code, model_kwargs)
        generation = fine_tune_generation_config(opened[0])  # refused (typed) before any weight is read
        try:
            names = model_names(model, {*base, *(n for d in opened for n in d.manifest.tensors)})
        except ConvertedCheckpointError:  # merged experts: rebuilt in the checkpoint's names, loaded by transformers
            for d, s in zip(opened, scales):
                check_delta(d, base, scale=s, verify_base=verify_base)
                if cached:  # opened for a cache hit, which this path never is: every file's SHA-256 now
                    Delta(d.directory)
            model = load_converted(model, base, list(zip(opened, scales)), torch_dtype)
            placement = resolve_device_map(model, device_map, torch_dtype, max_memory)
            return _finish(_placed(model, placement), opened[0], placement, generation)
        if names:  # seen through the names the model loads them under
            base, opened = base.renamed(names), [d.renamed(names) for d in opened]
        shapes = parameter_shapes(model)
        for d, s in zip(opened, scales):
            check_delta(d, base, scale=s, model=model, model_shapes=shapes, verify_base=verify_base)
        placement = resolve_device_map(model, device_map, torch_dtype, max_memory)
        device_of = device_lookup(placement)
        target = prepare_load(
            cache_materialized, list(zip(opened, scales)), base, model, torch_dtype, device_of, verified=not cached
        )
        if target.hit is not None:
            materialize(model, target.hit, [], device_of)
        else:
            readers = [(d.reader, s) for d, s in zip(opened, scales)]
            materialize(model, base, readers, device_of, storage=target.storage)
        target.finish(model)
        model = _finish(model, opened[0], placement, generation)
        swapper = DeltaSwapper(
            model, base, list(zip(opened, scales)), hub.updated(revision=None), verify_base=verify_base
        )
        attach_swapper(model, swapper)
        return model


def _open_sources(
    delta, hub: HubOptions, alpha: float | None, weights: Sequence[float] | None, *, verify_checksums: bool = True
) -> tuple[list[Delta], list[float]]:
    """The deltas to load, opened, and the scale of each (its weight times ``alpha``)."""
    sources = list(delta) if isinstance(delta, (list, tuple)) else [delta]
    if not sources:
        raise InvalidArgumentError("no delta given", expected="at least one delta", found="an empty list")
    if weights is not None and not isinstance(weights, (list, tuple)):
        raise InvalidArgumentError("weights must be a list", expected="one number per delta", found=repr(weights)[:80])
    scales = [1.0] * len(sources) if weights is None else [scale_from(w, "a weight") for w in weights]
    if len(scales) != len(sources):
        raise InvalidArgumentError("weights and deltas differ in number", expected=len(sources), found=len(scales))
    if alpha is not None:
        scales = [s * scale_from(alpha) for s in scales]
    return [open_delta(d, hub, verify_checksums=verify_checksums) for d in sources], scales


def _check_composable(opened: Sequence[Delta], verify_base: bool) -> None:
    """Composed deltas must record one base (checked unless ``verify_base=False``)."""
    first = opened[0].manifest.base
    for d in opened[1:]:
        if verify_base and d.manifest.base.fingerprint != first.fingerprint:
            raise BaseMismatchError(
                "composed deltas were made against different bases",
                expected=first.describe(),
                found=d.manifest.base.describe(),
                fix="compose only deltas of the same base",
            )


def _empty_model(
    delta: Delta, base: Checkpoint, dtype, trust_remote_code: bool, model_kwargs: dict[str, Any]
) -> tuple[Any, torch.dtype]:
    """The fine-tune's model built empty from its config (the delta's, else the base's), and its dtype."""
    config = fine_tune_config(delta, base, trust_remote_code, model_kwargs)
    torch_dtype = parse_dtype(dtype, allow_auto=True) or _config_dtype(config)
    model = build_skeleton(config, torch_dtype, trust_remote_code)
    if set(tied_copies(model)) & delta.manifest.tensors.keys() and untie(config):
        # the fine-tune's checkpoint held both tied tensors with different values, which
        # transformers loads untied: so is the model they are placed in
        model = build_skeleton(config, torch_dtype, trust_remote_code)
    return model, torch_dtype


def _config_dtype(config) -> torch.dtype:
    """The dtype the fine-tune's config names (float32 when it names none), as transformers does."""
    dtype = getattr(config, "dtype", None)
    try:
        return parse_dtype(dtype, what="config dtype", allow_auto=True) or torch.float32
    except InvalidArgumentError:
        return torch.float32  # e.g. an integer-quantised config: the skeleton decides


def _placed(model, placement: dict[str, torch.device]):
    """A model loaded whole on CPU moved to its one device (several are `_finish`'s dispatch)."""
    devices = set(placement.values())
    return model.to(next(iter(devices))) if len(devices) == 1 else model


def _finish(model, delta: Delta, placement: dict[str, torch.device], generation):
    """Dispatched over several devices if the placement asks, generation config from the delta,
    eval mode, names that say where the weights came from."""
    if len(set(placement.values())) > 1:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map={k: str(v) for k, v in placement.items()})
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        model.generation_config = generation
    model.name_or_path = delta.repo_id or str(delta.directory)
    model.config._name_or_path = model.name_or_path
    return model.eval()
