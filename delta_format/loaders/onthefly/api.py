"""On-the-fly serving: several fine-tunes share one base in memory, each kept encoded.

`attach_deltas` gives a loaded base model any number of named deltas ("adapters") without
materialising them: the weight of every ``nn.Linear`` (and ``nn.Embedding``) a delta edits keeps
the base values, and the module, turned into a `DeltaLinear` (`DeltaEmbedding`) that shares the
same parameters, holds each adapter's *stored* tensors (sign bits and scales, sparse positions and
values, low-rank factors, a dense delta). The forward applies the active adapter:

    y = W_base x + alpha * decode(delta) x  (+ bias)

either as two products (``lowrank`` always; ``sign`` and ``dense`` below `MERGE_MIN_TOKENS` tokens,
where the delta's product is cheaper than touching the whole matrix), or as one product with
``W_base + alpha * decode(delta)`` decoded on the weight's device for this call (``sign`` and
``dense`` on larger batches, where it is cheaper than a second full matmul; ``sparse`` always,
see `SparseFactor`). The merged weight is formed as SPEC §9 forms it, so in float32 such a call
gives the same logits as the materialised fine-tune; the two-product form differs by rounding.
While an adapter stays active, the merged weights of ``sign``, ``dense`` and ``sparse`` matrices
are kept for later calls up to a byte budget (`MergedWeightCache`, ``merged_cache_bytes``), so a
decoding step does not decode them again; those modules then run the merged form at every batch
size.

Vectors (norm scales, biases: every edited parameter of one dimension or none) are small: each
adapter keeps its own copy, rebuilt exactly as `DeltaModel.from_pretrained` does, and
`set_active_delta` points the parameter at it (no copy). Anything else (``replace`` on a matrix,
matrices of other modules such as GPT-2's ``Conv1D``, resized tensors) is refused with a typed
error before the model is touched; `DeltaModel.from_pretrained` and ``swap_delta`` serve those.

Every delta's base fingerprint is checked against the model's (SPEC §7), so a delta of another
base is refused with `BaseMismatchError` and leaves the model as it was.

Example:
    >>> base = AutoModelForCausalLM.from_pretrained("base-dir")                      # doctest: +SKIP
    >>> attach_deltas(base, {"math": "user/math-delta", "code": "user/code-delta"})  # doctest: +SKIP
    >>> set_active_delta(base, "math"); base.generate(...)                           # doctest: +SKIP
    >>> with using_delta(base, "code"): base.generate(...)                           # doctest: +SKIP
    >>> set_active_delta(base, None)   # the base itself, bit for bit                # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ...core.dtypes import parse_dtype
from ...core.encodings.base import MATERIALISE_FIX as _MATERIALISE_FIX
from ...core.reconstruct import reconstruct_stored
from ...errors import BaseMismatchError, InvalidArgumentError, UnsupportedOnTheFlyError
from ...io.checkpoint import Checkpoint
from ...io.delta import Delta
from ...io.key_map import model_names
from ...io.model_class import model_class_for
from ...io.resolve import HubOptions, open_delta
from ..base_model import resolve_base
from ..delta_checks import scale_from
from ..placement import DeviceMap
from .factors import build_factor, check_finite_merge, require_on_the_fly
from .merged_cache import check_budget
from .modules import ADOPTERS, DeltaEmbedding, DeltaLinear
from .registry import Adapter, OnTheFlyDeltas, tensor_owners


def _plan(
    model, deltas: OnTheFlyDeltas, delta: Delta, alpha: float, owners, verify_base: bool
) -> tuple[Adapter, set[str]]:
    """An `Adapter` built from ``delta`` (factors decoded, vectors rebuilt) and the module paths to
    adopt; nothing in the model changes here, so any error leaves it as it was."""
    deltas.check_delta(delta, alpha, verify_base=verify_base)
    state = model.state_dict(keep_vars=True)
    adapter, adopt = Adapter(delta, alpha), set()
    done: dict[int, str] = {}
    for pname, entry in delta.manifest.tensors.items():
        tensor = state[pname]
        if id(tensor) in done:
            raise BaseMismatchError(
                f"the delta edits {pname!r} and {done[id(tensor)]!r}, which are one tied tensor here",
                expected="one entry per tied tensor",
                found="two",
                fix=_MATERIALISE_FIX,
            )
        done[id(tensor)] = pname
        if tensor.dim() <= 1:
            base = deltas.base_vectors.get(pname, tensor.data)
            stored = delta.reader.stored(pname, tensor.device)
            source = delta.reader.source_name(pname)  # the delta's own name seeds its masks and rounding
            adapter.vectors[pname] = reconstruct_stored(source, [(entry, stored, alpha)], base, dtype=tensor.dtype)
            continue
        holders = owners.get(id(tensor), [])
        bad = [
            (p, type(m).__name__, a)
            for p, m, a in holders
            if a != "weight" or type(m) not in ADOPTERS or getattr(m, "max_norm", None) is not None or not p
        ]  # not p: the model itself
        if bad or not holders:
            path, kind, attr = bad[0] if bad else (pname, "no module", "")
            raise UnsupportedOnTheFlyError(
                f"{pname!r} is a matrix of a {kind} ({path}.{attr}), which on-the-fly deltas do not patch",
                expected="weights of nn.Linear or nn.Embedding modules, or vectors",
                found=kind,
                fix=_MATERIALISE_FIX,
            )
        require_on_the_fly(pname, entry)  # before reading anything
        stored = delta.reader.stored(pname, tensor.device)
        factor = build_factor(delta.reader.source_name(pname), entry, stored, alpha, tensor.dtype)
        adapter.factors[pname] = factor
        check_finite_merge(pname, factor, tensor.data)
        adopt.update(p for p, _, _ in holders)
    return adapter, adopt


def attach_deltas(
    model,
    deltas: Mapping[str, Delta | str | os.PathLike],
    *,
    alpha: float | Mapping[str, float] | None = None,
    base_model: Checkpoint | str | os.PathLike | None = None,
    verify_base: bool = True,
    merged_cache_bytes: int | None = None,
    **hub_options: Any,
) -> OnTheFlyDeltas:
    """Attach named deltas to a base model, kept encoded and applied in the forward.

    Args:
        model: the base, a transformers (or any torch) model, already on its device(s).
        deltas: ``{adapter name: delta}``, each a `Delta`, a directory or a Hub repo id.
        alpha: multiplier of every stored coefficient, one for all or ``{name: alpha}``.
        base_model: the checkpoint ``model`` was loaded from (read on the first attach); its
            files are fingerprinted instead of the model's tensors (needed when the model was
            loaded in a narrower dtype than stored).
        verify_base: check each delta's base fingerprint (on by default).
        merged_cache_bytes: bytes the active adapter's merged weights may take
            (`MergedWeightCache`): while one adapter stays active, the edited ``nn.Linear``
            weights that fit are merged once and reused by every call (the speed of the
            materialised model at small batches, the same logits as a merged call). ``None``
            (default): a quarter of the model's parameter bytes on the first attach, unchanged
            on later ones; ``0`` turns the cache off. Emptied whenever the active adapter changes
            or adapters are attached or detached; counted in ``OnTheFlyDeltas.nbytes``; not used
            by calls that may need the weights' gradients (run inference under
            ``torch.no_grad()``/``inference_mode()``, as ``generate`` does).
        **hub_options: ``revision``, ``token``, ``cache_dir``, ``local_files_only`` (`HubOptions`).

    Returns:
        The registry, also at ``model.on_the_fly_deltas``. No adapter is made active.

    Raises:
        BaseMismatchError: a delta was made against another base, or edits tensors the model lacks.
        UnsupportedOnTheFlyError: a delta edits a parameter that cannot be patched on the fly.
        DeltaFormatError: anything else wrong with the files or the arguments.
    On any error the model is left exactly as it was.
    """
    registry: OnTheFlyDeltas | None = getattr(model, "on_the_fly_deltas", None)
    alphas = _alphas(deltas, alpha, registry)
    if merged_cache_bytes is not None:
        check_budget(merged_cache_bytes)
    hub = HubOptions().updated(**hub_options)
    opened = {n: _model_named(model, open_delta(d, hub)) for n, d in deltas.items()}
    if registry is None:
        base = base_model if base_model is None or isinstance(base_model, Checkpoint) else Checkpoint(base_model)
        if base is not None:
            base = base.renamed(model_names(model, base))
        registry = OnTheFlyDeltas(model, base, merged_cache_bytes)
    owners = tensor_owners(model)
    plans = {n: _plan(model, registry, d, alphas[n], owners, verify_base) for n, d in opened.items()}
    # Nothing has changed so far; from here on nothing can fail on the deltas' account.
    _adopt_modules(model, registry, {p for _, adopt in plans.values() for p in adopt})
    modules = dict(model.named_modules(remove_duplicate=False))
    state = model.state_dict(keep_vars=True)
    for name, (adapter, _) in plans.items():
        for pname, factor in adapter.factors.items():
            for path, _, _ in owners[id(state[pname])]:
                modules[path].factors[name] = factor
        for pname in adapter.vectors:
            registry.base_vectors.setdefault(pname, state[pname].data)
        registry.adapters[name] = adapter
    if merged_cache_bytes is not None:
        registry.merged_weights.resize(merged_cache_bytes)
    registry.merged_weights.clear()
    model.on_the_fly_deltas = registry
    return registry


def _model_named(model, delta: Delta) -> Delta:
    """``delta`` seen through the names ``model`` holds its parameters under (`io.key_map`)."""
    names = model_names(model, delta.manifest.tensors)
    return delta.renamed(names) if names else delta


def _alphas(
    deltas: Mapping[str, Any], alpha: float | Mapping[str, float] | None, registry: OnTheFlyDeltas | None
) -> dict[str, float]:
    """Each new adapter's alpha, after checking the names are new, non-empty strings."""
    if not isinstance(deltas, Mapping):
        raise InvalidArgumentError(
            "on-the-fly deltas must be named", expected="a mapping {name: delta}", found=type(deltas).__name__
        )
    clash = sorted(set(deltas) & set(registry.adapters)) if registry else []
    if clash or not deltas or not all(isinstance(n, str) and n for n in deltas):
        raise InvalidArgumentError(
            "on-the-fly delta names must be new, non-empty strings",
            expected="names not attached yet",
            found=clash or sorted(map(repr, deltas)) or "none",
            fix="detach_deltas(model, [name]) first to replace one",
        )
    if not isinstance(alpha, Mapping):
        return {n: 1.0 if alpha is None else scale_from(alpha) for n in deltas}
    if set(alpha) - set(deltas):
        raise InvalidArgumentError(
            "alpha names an unknown delta", expected=sorted(deltas), found=sorted(set(alpha) - set(deltas))
        )
    return {n: scale_from(alpha.get(n, 1.0), f"alpha of {n!r}") for n in deltas}


def _adopt_modules(model, registry: OnTheFlyDeltas, paths: set[str]) -> None:
    """Replace each module at ``paths`` by its adopting subclass (sharing its parameters, and the
    accelerate hook that places its inputs, if any), once per module object."""
    modules = dict(model.named_modules(remove_duplicate=False))
    adopted: dict[int, nn.Module] = {}
    for path in sorted(paths):
        module = modules[path]
        cls = ADOPTERS[type(module)]
        if cls is None:
            continue
        new = adopted.get(id(module))
        if new is None:
            new = adopted[id(module)] = cls.adopt(module, registry)
            if hasattr(module, "_hf_hook"):
                from accelerate.hooks import add_hook_to_module

                add_hook_to_module(new, module._hf_hook)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        registry.replaced[path] = module


def set_active_delta(model, name: str | None) -> None:
    """Make adapter ``name`` the one every forward applies; ``None`` serves the base itself."""
    _registry(model).set_active(name)


@contextlib.contextmanager
def using_delta(model, name: str | None) -> Iterator[None]:
    """``with using_delta(model, "math"): ...``: that adapter inside, the previous one after.

    The active adapter is one per model, not per thread: while one thread is inside
    ``using_delta``, a forward, ``set_active_delta`` or ``using_delta`` from another thread raises
    `InvalidArgumentError` instead of silently serving the other thread's adapter. Give each
    thread its own model (the base weights can be shared), or serialize the calls."""
    registry = _registry(model)
    previous = registry.enter(name)
    try:
        yield
    finally:
        registry.leave(previous)


def detach_deltas(model, names: list[str] | None = None) -> None:
    """Remove adapters (all by default); with none left the original modules are put back."""
    registry = _registry(model)
    names = sorted(registry.adapters) if names is None else list(names)
    unknown = [n for n in names if n not in registry.adapters]
    if unknown:
        raise InvalidArgumentError("no such on-the-fly delta", expected=sorted(registry.adapters), found=unknown)
    if registry.active in names:
        registry.set_active(None)
    registry.merged_weights.clear()
    for name in names:
        del registry.adapters[name]
        for module in model.modules():
            if isinstance(module, (DeltaLinear, DeltaEmbedding)):
                module.factors.pop(name, None)
    if registry.adapters:
        return
    for path, original in sorted(registry.replaced.items()):
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, original)
    del model.on_the_fly_deltas


def _registry(model) -> OnTheFlyDeltas:
    registry = getattr(model, "on_the_fly_deltas", None)
    if registry is None:
        raise InvalidArgumentError(
            "the model has no on-the-fly deltas",
            expected="a model given to attach_deltas",
            found=type(model).__name__,
            fix="call attach_deltas(model, {...}) first",
        )
    return registry


def load_on_the_fly(
    deltas: Mapping[str, Delta | str | os.PathLike],
    *,
    base_model: str | os.PathLike | None = None,
    base_revision: str | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: DeviceMap = None,
    alpha: float | Mapping[str, float] | None = None,
    verify_base: bool = True,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    revision: str | None = None,
    merged_cache_bytes: int | None = None,
):
    """The base the deltas name (or ``base_model``), loaded by transformers, with the deltas
    attached on the fly; no adapter active. The base's files are fingerprinted (`attach_deltas`,
    which also describes ``merged_cache_bytes``: the budget of the active adapter's merged
    weights, ``0`` for none).

    ``device_map`` is handed to transformers' ``from_pretrained``: ``None``/``"cpu"``,
    ``"cuda"``, ``"cuda:1"``, an index, a ``torch.device``, ``"auto"`` or a ``{module: device}``
    dict, as for `DeltaModel.from_pretrained`.
    """
    from transformers import AutoConfig

    hub = HubOptions(revision, token, cache_dir, local_files_only)
    opened = {n: open_delta(d, hub) for n, d in deltas.items()}
    if not opened:
        raise InvalidArgumentError("no delta given", expected="at least one delta", found="an empty mapping")
    checkpoint = resolve_base(next(iter(opened.values())).manifest, base_model, hub.updated(revision=base_revision))
    cls = model_class_for(AutoConfig.from_pretrained(checkpoint.directory))
    model = cls.from_pretrained(
        checkpoint.directory, dtype=parse_dtype(dtype, allow_auto=True) or "auto", device_map=device_map
    )
    attach_deltas(
        model.eval(),
        opened,
        alpha=alpha,
        base_model=checkpoint,
        verify_base=verify_base,
        merged_cache_bytes=merged_cache_bytes,
    )
    return model
