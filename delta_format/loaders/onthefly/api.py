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
import warnings
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ...core.dtypes import parse_dtype
from ...core.reconstruct import reconstruct_stored
from ...errors import BaseMismatchError, InvalidArgumentError, UnsupportedOnTheFlyError
from ...io.checkpoint import Checkpoint
from ...io.delta import Delta
from ...io.model_class import model_class_for
from ...core.encodings import build_factor, require_on_the_fly as _require_on_the_fly
from ...core.encodings.base import MATERIALISE_FIX as _MATERIALISE_FIX
from .modules import _ADOPT, DeltaEmbedding, DeltaLinear
from .registry import Adapter, OnTheFlyDeltas, _owners

def _open(delta: Delta | str | os.PathLike, resolve_kwargs: Mapping[str, Any]) -> Delta:
    if isinstance(delta, Delta):
        return delta
    from ..delta_model import DeltaModel

    return DeltaModel.load_delta(delta, **resolve_kwargs)


def _plan(model, deltas: OnTheFlyDeltas, delta: Delta, alpha: float, owners, verify: bool) -> tuple[Adapter, set[str]]:
    """An `Adapter` built from ``delta`` (factors decoded, vectors rebuilt) and the module paths to
    adopt; nothing in the model changes here, so any error leaves it as it was."""
    if verify:
        deltas.check_base(delta)
    state = model.state_dict(keep_vars=True)
    adapter, adopt = Adapter(delta, alpha), set()
    done: dict[int, str] = {}
    for pname, entry in delta.manifest.tensors.items():
        if pname not in state or tuple(state[pname].shape) != tuple(entry.shape):
            raise BaseMismatchError(f"the delta's {pname!r} does not fit the model",
                                    expected=list(entry.shape), found="missing" if pname not in state else list(state[pname].shape),
                                    fix="deltas that add or resize tensors need DeltaModel.from_pretrained")
        tensor = state[pname]
        if id(tensor) in done:
            raise BaseMismatchError(f"the delta edits {pname!r} and {done[id(tensor)]!r}, which are one tied tensor here",
                                    expected="one entry per tied tensor", found="two", fix=_MATERIALISE_FIX)
        done[id(tensor)] = pname
        if tensor.dim() <= 1:
            base = deltas.base_vectors.get(pname, tensor.data)
            stored = delta.reader.stored(pname, tensor.device)
            adapter.vectors[pname] = reconstruct_stored(pname, [(entry, stored, alpha)], base, dtype=tensor.dtype)
            continue
        holders = owners.get(id(tensor), [])
        bad = [(p, type(m).__name__, a) for p, m, a in holders if a != "weight" or type(m) not in _ADOPT
               or getattr(m, "max_norm", None) is not None or not p]  # not p: the model itself
        if bad or not holders:
            path, kind, attr = bad[0] if bad else (pname, "no module", "")
            raise UnsupportedOnTheFlyError(
                f"{pname!r} is a matrix of a {kind} ({path}.{attr}), which on-the-fly deltas do not patch",
                expected="weights of nn.Linear or nn.Embedding modules, or vectors", found=kind, fix=_MATERIALISE_FIX,
            )
        _require_on_the_fly(pname, entry)  # before reading anything
        stored = delta.reader.stored(pname, tensor.device)
        adapter.factors[pname] = build_factor(pname, entry, stored, alpha, tensor.dtype)
        adopt.update(p for p, _, _ in holders)
    return adapter, adopt


def attach_deltas(
    model,
    deltas: Mapping[str, Delta | str | os.PathLike],
    *,
    alpha: float | Mapping[str, float] | None = None,
    base: Checkpoint | str | os.PathLike | None = None,
    verify_base: bool = True,
    **resolve_kwargs: Any,
) -> OnTheFlyDeltas:
    """Attach named deltas to a base model, kept encoded and applied in the forward.

    Args:
        model: the base, a transformers (or any torch) model, already on its device(s).
        deltas: ``{adapter name: delta}``, each a `Delta`, a directory or a Hub repo id.
        alpha: multiplier of every stored coefficient, one for all or ``{name: alpha}``.
        base: the checkpoint ``model`` was loaded from (read on the first attach); its files are
            fingerprinted instead of the model's tensors (needed when the model was loaded in a
            narrower dtype than stored).
        verify_base: check each delta's base fingerprint (on by default).
        **resolve_kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only`` for
            `DeltaModel.load_delta`.

    Returns:
        The registry, also at ``model.on_the_fly_deltas``. No adapter is made active.

    Raises:
        BaseMismatchError: a delta was made against another base, or edits tensors the model lacks.
        UnsupportedOnTheFlyError: a delta edits a parameter that cannot be patched on the fly.
        DeltaFormatError: anything else wrong with the files or the arguments.
    On any error the model is left exactly as it was.
    """
    registry: OnTheFlyDeltas | None = getattr(model, "on_the_fly_deltas", None)
    clash = sorted(set(deltas) & set(registry.adapters)) if registry else []
    if clash or not deltas or not all(isinstance(n, str) and n for n in deltas):
        raise InvalidArgumentError("on-the-fly delta names must be new, non-empty strings",
                                   expected="names not attached yet", found=clash or sorted(map(repr, deltas)) or "none",
                                   fix="detach_deltas(model, [name]) first to replace one")
    alphas = ({n: float(a) for n, a in alpha.items()} if isinstance(alpha, Mapping)
              else {n: 1.0 if alpha is None else float(alpha) for n in deltas})
    if set(alphas) - set(deltas):
        raise InvalidArgumentError("alpha names an unknown delta", expected=sorted(deltas), found=sorted(set(alphas) - set(deltas)))
    opened = {n: _open(d, resolve_kwargs) for n, d in deltas.items()}
    if not verify_base:
        warnings.warn("verify_base=False: the deltas are not checked against the model's base; "
                      "a wrong base gives wrong outputs silently", stacklevel=2)
    if registry is None:
        registry = OnTheFlyDeltas(model, base if base is None or isinstance(base, Checkpoint) else Checkpoint(base))
    owners = _owners(model)
    plans = {n: _plan(model, registry, d, alphas.get(n, 1.0), owners, verify_base) for n, d in opened.items()}

    # Nothing has changed so far; from here on nothing can fail on the deltas' account.
    modules = dict(model.named_modules(remove_duplicate=False))
    adopted: dict[int, nn.Module] = {}
    for path in sorted({p for _, adopt in plans.values() for p in adopt}):
        module = modules[path]
        cls = _ADOPT[type(module)]
        if cls is None:
            continue
        new = adopted.get(id(module)) or cls.adopt(module, registry)
        adopted[id(module)] = new
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        registry.replaced[path] = module
    modules = dict(model.named_modules(remove_duplicate=False))
    state = model.state_dict(keep_vars=True)
    for name, (adapter, _) in plans.items():
        for pname, factor in adapter.factors.items():
            for path, _, _ in owners[id(state[pname])]:
                modules[path].factors[name] = factor
        for pname in adapter.vectors:
            registry.base_vectors.setdefault(pname, state[pname].data)
        registry.adapters[name] = adapter
    model.on_the_fly_deltas = registry
    return registry


def set_active_delta(model, name: str | None) -> None:
    """Make adapter ``name`` the one every forward applies; ``None`` serves the base itself."""
    _registry(model).set_active(name)


@contextlib.contextmanager
def using_delta(model, name: str | None) -> Iterator[None]:
    """``with using_delta(model, "math"): ...``: that adapter inside, the previous one after."""
    registry = _registry(model)
    previous = registry.active
    registry.set_active(name)
    try:
        yield
    finally:
        registry.set_active(previous)


def detach_deltas(model, names: list[str] | None = None) -> None:
    """Remove adapters (all by default); with none left the original modules are put back."""
    registry = _registry(model)
    names = sorted(registry.adapters) if names is None else list(names)
    unknown = [n for n in names if n not in registry.adapters]
    if unknown:
        raise InvalidArgumentError("no such on-the-fly delta", expected=sorted(registry.adapters), found=unknown)
    if registry.active in names:
        registry.set_active(None)
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
        raise InvalidArgumentError("the model has no on-the-fly deltas", expected="a model given to attach_deltas",
                                   found=type(model).__name__, fix="call attach_deltas(model, {...}) first")
    return registry


def load_on_the_fly(
    deltas: Mapping[str, Delta | str | os.PathLike],
    *,
    base_model: str | os.PathLike | None = None,
    base_revision: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    alpha: float | Mapping[str, float] | None = None,
    verify_base: bool = True,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    revision: str | None = None,
):
    """The base the deltas name (or ``base_model``), loaded by transformers, with the deltas
    attached on the fly; no adapter active. The base's files are fingerprinted (`attach_deltas`)."""
    from transformers import AutoConfig

    from .. import base_model as base_checks

    hub = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    opened = {n: _open(d, {**hub, "revision": revision}) for n, d in deltas.items()}
    if not opened:
        raise InvalidArgumentError("no delta given", expected="at least one delta", found="an empty mapping")
    checkpoint = base_checks.resolve_base(next(iter(opened.values())).manifest, base_model, base_revision, **hub)
    cls = model_class_for(AutoConfig.from_pretrained(checkpoint.directory))
    model = cls.from_pretrained(checkpoint.directory, dtype=parse_dtype(dtype, allow_auto=True) or "auto")
    if device is not None:
        model.to(device)
    attach_deltas(model.eval(), opened, alpha=alpha, base=checkpoint, verify_base=verify_base)
    return model
