"""`DeltaModel.from_pretrained`: a delta (or several) plus its base -> an ordinary transformers model.

Composes the small steps, each testable alone:
resolve (huggingface_hub) -> read and validate the delta -> resolve and verify the base ->
build the empty model -> materialize (stream base, decode, add, cast, place) -> tie, finish.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from . import base_model as base_checks
from ..io.checkpoint import CHECKPOINT_PATTERNS, resolve_repo
from ..io.delta import Delta
from ..core.dtypes import parse_dtype
from ..errors import BaseMismatchError, InvalidArgumentError
from .materialize import materialize
from .placement import device_lookup, resolve_device_map
from .skeleton import build_skeleton
from .swap import DeltaSwapper, attach_swapper

DELTA_PATTERNS = CHECKPOINT_PATTERNS
"""A delta repo holds the same kinds of files as a checkpoint: configs, safetensors, tokenizer, card."""


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
        directory, sha = resolve_repo(delta, revision=revision, token=token, cache_dir=cache_dir,
                                      local_files_only=local_files_only, allow_patterns=DELTA_PATTERNS, what="delta")
        repo_id = None if sha is None else str(delta)
        return Delta(directory, repo_id=repo_id, revision=sha)

    @classmethod
    def from_pretrained(
        cls,
        delta: str | os.PathLike | Delta | Sequence[str | os.PathLike | Delta],
        *,
        revision: str | None = None,
        base_model: str | os.PathLike | None = None,
        base_revision: str | None = None,
        device_map: Any = None,
        dtype: torch.dtype | str | None = None,
        alpha: float | None = None,
        weights: Sequence[float] | None = None,
        verify_base: bool = True,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        max_memory: dict | None = None,
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
            **model_kwargs: set on the config (e.g. ``attn_implementation="sdpa"``).

        Returns:
            A transformers ``PreTrainedModel`` in eval mode.

        Raises:
            BaseMismatchError: the base is not the one the delta was made against.
            ResolutionError: the delta or base cannot be found (or is not cached offline).
            DeltaFormatError: any other problem with the files or the arguments.
        """
        from transformers import AutoConfig

        sources = list(delta) if isinstance(delta, (list, tuple)) else [delta]
        if not sources:
            raise InvalidArgumentError("no delta given", expected="at least one delta", found="an empty list")
        scales = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(scales) != len(sources):
            raise InvalidArgumentError("weights and deltas differ in number", expected=len(sources), found=len(scales))
        if alpha is not None:
            scales = [s * float(alpha) for s in scales]
        hub = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        opened = [d if isinstance(d, Delta) else cls.load_delta(d, revision=revision, **hub) for d in sources]

        base = base_checks.resolve_base(opened[0].manifest, base_model, base_revision, **hub)
        for d in opened:
            if d is not opened[0] and d.manifest.base.fingerprint != opened[0].manifest.base.fingerprint and verify_base:
                raise BaseMismatchError("composed deltas were made against different bases",
                                        expected=opened[0].manifest.base.describe(), found=d.manifest.base.describe(),
                                        fix="compose only deltas of the same base")
            base_checks.verify_base(d.manifest, base, verify=verify_base)

        config_dir = opened[0].directory if (opened[0].directory / "config.json").is_file() else base.directory
        config = AutoConfig.from_pretrained(config_dir, trust_remote_code=trust_remote_code, **model_kwargs)
        torch_dtype = parse_dtype(dtype, allow_auto=True) or _config_dtype(config)
        model = build_skeleton(config, torch_dtype, trust_remote_code)
        device_map_resolved = resolve_device_map(model, device_map, torch_dtype, max_memory)
        materialize(model, base, [(d.reader, s) for d, s in zip(opened, scales)], device_lookup(device_map_resolved))
        if len(set(device_map_resolved.values())) > 1:
            from accelerate import dispatch_model

            model = dispatch_model(model, device_map={k: str(v) for k, v in device_map_resolved.items()})
        _finish(model, opened[0], base)
        fingerprint = base.fingerprint() if verify_base else None
        attach_swapper(model, DeltaSwapper(model, base, fingerprint, list(zip(opened, scales)),
                                           lambda d, **kw: cls.load_delta(d, **{**hub, **kw})))
        return model



def _config_dtype(config) -> torch.dtype:
    """The dtype the fine-tune's config names (float32 when it names none), as transformers does."""
    dtype = getattr(config, "dtype", None)
    try:
        return parse_dtype(dtype, what="config dtype", allow_auto=True) or torch.float32
    except InvalidArgumentError:
        return torch.float32  # e.g. an integer-quantised config: the skeleton decides


def _finish(model, delta: Delta, base) -> None:
    """Generation config from the delta, eval mode, names that say where the weights came from."""
    from transformers import GenerationConfig

    if (delta.directory / "generation_config.json").is_file() and getattr(model, "can_generate", lambda: False)():
        model.generation_config = GenerationConfig.from_pretrained(delta.directory)
    model.name_or_path = delta.repo_id or str(delta.directory)
    model.config._name_or_path = model.name_or_path
    model.eval()
