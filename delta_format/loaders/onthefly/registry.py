"""What `attach_deltas` keeps on the model: the adapters, the active one, the replaced modules,
and the base values of the vectors it swaps."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...core.dtypes import SAFETENSORS_DTYPES, holds_exactly
from ...core.encodings import Factor
from ...core.fingerprint import fingerprint_state_dict
from ...errors import BaseMismatchError, InvalidArgumentError
from ...io.checkpoint import Checkpoint
from ...io.delta import Delta
from ...io.key_map import model_names
from ..delta_checks import check_delta
from ..model_state import tied_parameter_names
from .merged_cache import DEFAULT_BUDGET_FRACTION, MergedWeightCache, check_budget
from .modules import check_same_device


@dataclass
class Adapter:
    """One attached delta: its source, alpha, factors by parameter, rebuilt vectors by name."""

    delta: Delta
    alpha: float
    factors: dict[str, Factor] = field(default_factory=dict)
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of tensors this adapter holds (besides the shared base)."""
        held = {id(t): t for f in self.factors.values() for t in f.tensors()} | {
            id(t): t for t in self.vectors.values()
        }
        return sum(t.numel() * t.element_size() for t in held.values())


class OnTheFlyDeltas:
    """What `attach_deltas` keeps on ``model.on_the_fly_deltas``: adapters by name, the active
    one, the modules it replaced, and the base values of the vectors it swaps."""

    def __init__(self, model, base: Checkpoint | None = None, merged_cache_bytes: int | None = None):
        self.model = model
        self.merged_weights = MergedWeightCache(default_merged_budget(model, merged_cache_bytes))
        """The active adapter's merged weights of some modules (small batches run on them)."""
        self.base = base
        """The checkpoint the model was loaded from, when given; else the model's tensors are
        fingerprinted."""
        self.active: str | None = None
        self.adapters: dict[str, Adapter] = {}
        self.replaced: dict[str, nn.Module] = {}  # module path -> the original module
        self.base_vectors: dict[str, torch.Tensor] = {}  # parameter name -> its base tensor
        self._fingerprint: dict | None = None
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread inside `using_delta`, if any
        self._depth = 0

    def check_caller(self) -> None:
        """Refuse a forward or a switch from another thread while one thread is inside
        `using_delta`: the active adapter is one per model, so it would run with the other
        thread's adapter and return its logits silently."""
        holder = self._holder
        if holder is not None and holder != threading.get_ident():
            raise InvalidArgumentError(
                "the model is serving another on-the-fly delta in another thread (inside using_delta)",
                expected="one thread at a time using a model's on-the-fly deltas",
                found=f"adapter {self.active!r} held by thread {holder}",
                fix="give each thread its own model, or serialize the calls (a lock around using_delta)",
            )

    def enter(self, name: str | None) -> str | None:
        """Start a `using_delta` block in this thread; returns the adapter to restore."""
        with self._lock:
            self.check_caller()
            previous = self.active
            self.set_active(name)
            self._holder, self._depth = threading.get_ident(), self._depth + 1
            return previous

    def leave(self, previous: str | None) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._holder = None
            self.set_active(previous)

    def set_active(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            raise InvalidArgumentError(
                "no such on-the-fly delta",
                expected=sorted(self.adapters) or "an attached name",
                found=repr(name),
                fix="attach it with attach_deltas first, or pass None for the base",
            )
        self.check_caller()
        if name != self.active:
            self.merged_weights.clear()
        state = self.model.state_dict(keep_vars=True)
        wanted = self.adapters[name].vectors if name is not None else {}
        for vector, base in self.base_vectors.items():
            value = wanted.get(vector, base)
            check_same_device(value.device, state[vector])
            state[vector].data = value
        self.active = name

    def check_delta(self, delta: Delta, scale: float, *, verify_base: bool = True) -> None:
        """`check_delta`: ``delta`` was made against this model's base (its checkpoint's files,
        else the model's own tensors at their base values), fits the model's shapes and tied
        tensors, and has finite alphas: the checks every loader runs."""
        base = self.base if self.base is not None else self._model_fingerprint
        label = None if self.base is not None else "given to attach_deltas"
        check_delta(delta, base, scale=scale, model=self.model, verify_base=verify_base, base_label=label)

    def _model_fingerprint(self, recorded: Mapping[str, Any]) -> dict:
        if self._fingerprint is None:  # computed once, from the base values even while an adapter is active
            self._fingerprint = _model_fingerprint(self.model, recorded, self.base_vectors)
        return self._fingerprint

    @property
    def nbytes(self) -> int:
        """Bytes of tensors the adapters and the merged-weight cache hold (besides the shared base)."""
        return sum(a.nbytes for a in self.adapters.values()) + self.merged_weights.nbytes

    def __repr__(self) -> str:
        return f"OnTheFlyDeltas(adapters={sorted(self.adapters)}, active={self.active!r})"


def default_merged_budget(model, merged_cache_bytes: int | None) -> int:
    """``merged_cache_bytes``, or by default `DEFAULT_BUDGET_FRACTION` of the model's parameter bytes."""
    if merged_cache_bytes is not None:
        return check_budget(merged_cache_bytes)
    return int(DEFAULT_BUDGET_FRACTION * sum(p.numel() * p.element_size() for p in model.parameters()))


def _model_fingerprint(model, recorded: Mapping[str, Any], base_vectors: Mapping[str, torch.Tensor]) -> dict:
    """The fingerprint of the base held by ``model`` as it would be saved (tied copies left out,
    swapped vectors at their base values), each tensor cast back to the dtype the recorded
    fingerprint names, which is exact where the model holds a wider dtype; a narrower one cannot be
    checked from memory."""
    tied = tied_parameter_names(model)
    want = recorded["tensors"]
    state = {}
    ckpt = {new: old for old, new in model_names(model, want).items()}
    for name, tensor in model.state_dict().items():
        if name in tied:
            continue
        tensor = base_vectors.get(name, tensor)
        stored = want.get(ckpt.get(name, name), {}).get("dtype")
        if not tensor.is_floating_point() or stored not in SAFETENSORS_DTYPES:
            state[name] = tensor
            continue
        if not holds_exactly(tensor.dtype, stored):
            raise BaseMismatchError(
                f"the model holds {name!r} as {tensor.dtype}, which cannot be checked against the {stored} "
                "it was saved as",
                expected=f"{stored} or a wider dtype",
                found=str(tensor.dtype),
                fix="pass base_model=<the base checkpoint directory> so its files are fingerprinted, "
                "or verify_base=False",
            )
        state[name] = tensor.to(SAFETENSORS_DTYPES[stored])
    return fingerprint_state_dict({ckpt.get(n, n): t for n, t in state.items()})  # under the checkpoint's names


def tensor_owners(model) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """For each tensor of the model (by id), every (module path, module, attribute) holding it."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for attr, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None:
                owners.setdefault(id(tensor), []).append((path, module, attr))
    return owners
