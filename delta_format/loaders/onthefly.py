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
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.bits import check_packed, sign_table
from ..io.checkpoint import Checkpoint
from ..io.delta import Delta
from ..core.dtypes import SAFETENSORS_DTYPES, TORCH_DTYPES, compute_dtype, holds_exactly, parse_dtype
from ..core.encodings import DenseEncoding, LowRankEncoding, SignEncoding, SparseEncoding
from ..core.encodings.base import require_finite
from ..errors import BaseMismatchError, InvalidArgumentError, UnsupportedOnTheFlyError
from ..core.fingerprint import check_fingerprint, fingerprint_state_dict
from ..core.reconstruct import reconstruct_stored
from .materialize import _tied_names

MERGE_MIN_TOKENS = 32
"""From this many tokens in a call, a ``sign``/``dense`` delta is added to the weight for the call
(one elementwise pass over the matrix, then one matmul) instead of multiplied separately (a second
full matmul). Measured on CPU (2 cores, 2816 x 1024, float32 and bfloat16): separate products win
at 1 token, tie near 16, and cost 2x the merge at 1024 tokens, where the merge costs +10-30 %."""

ON_THE_FLY_ENCODINGS = ("sign", "sparse", "lowrank", "dense")
"""Encodings a matrix may have to be applied on the fly (vectors may have any)."""


_MATERIALISE_FIX = "serve this fine-tune materialised: DeltaModel.from_pretrained(...) or model.swap_delta(...)"


# ----------------------------------------------------------------------------------------------
# One delta on one matrix, times its alpha, ready for the forward


class Factor:
    """``alpha * delta`` of one ``rows x cols`` matrix, kept in its stored form on the weight's
    device, in the weight's dtype."""

    rows: int
    cols: int

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ (alpha * delta).T`` for ``x`` of shape ``[..., cols]`` (called where `apart`)."""
        raise NotImplementedError

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + alpha * delta``, a new tensor (``weight`` is not modified)."""
        raise NotImplementedError

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of ``alpha * delta``, shape ``[*ids.shape, cols]`` (embedding lookups)."""
        raise NotImplementedError

    def apart(self, tokens: int) -> bool:
        """Whether `product` is cheaper than `merged` for a call on ``tokens`` input rows."""
        return tokens < MERGE_MIN_TOKENS

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device


def _alpha_times(values: torch.Tensor, alpha: float) -> torch.Tensor:
    """SPEC §9: ``round_c(round_c(alpha) * values)``, skipped for alpha 1 (exact)."""
    return values if alpha == 1.0 else values * alpha


class SignFactor(Factor):
    """Sign bits (1 bit per weight) and a scale per row or per tensor: ``delta = scale * S``.

    The bits are expanded to a ±1 matrix for each call (one gather from a 256 x 8 table, far
    cheaper than the matmul it feeds), then ``x @ S.T * scale`` or ``addcmul(W, S, scale)``."""

    def __init__(self, bits: torch.Tensor, scale: torch.Tensor, rows: int, cols: int, dtype: torch.dtype):
        self.bits, self.rows, self.cols = bits, rows, cols
        self.scale = scale.view(-1, 1) if scale.numel() == rows and rows != 1 else scale.view(1, 1)
        self.scale = self.scale.to(dtype)

    def signs(self, dtype: torch.dtype) -> torch.Tensor:
        table = sign_table(dtype, self.bits.device)
        return torch.index_select(table, 0, self.bits.to(torch.int32)).view(-1)[: self.rows * self.cols].view(self.rows, self.cols)

    def product(self, x):
        return F.linear(x, self.signs(x.dtype)).mul_(self.scale.view(-1))

    def merged(self, weight):
        return torch.addcmul(weight, self.signs(weight.dtype), self.scale)

    def gather(self, ids):
        pos = ids.unsqueeze(-1).to(torch.int64) * self.cols + torch.arange(self.cols, device=ids.device)
        signs = ((self.bits[pos >> 3] >> (pos & 7)) & 1).to(self.scale.dtype).mul_(2).sub_(1)
        scale = self.scale.view(-1)[ids].unsqueeze(-1) if self.scale.numel() > 1 else self.scale.view(())
        return signs.mul_(scale)

    def tensors(self):
        return [self.bits, self.scale]


class SparseFactor(Factor):
    """Kept values at flat positions decoded once (int32 where they fit), added to a copy of the
    base weight for each call (``index_add``), then one matmul.

    Multiplying at the kept entries only (``index_add`` of ``x[:, cols] * values`` into the output)
    was slower than this merge at every batch size measured on CPU (2816 x 1024, p = 0.9: 13 ms
    against 1.2 ms for one token); a CSR ``torch.sparse`` product was 3x slower than the merge at
    1024 tokens and has no bfloat16 kernel on CPU."""

    def __init__(self, positions: torch.Tensor, values: torch.Tensor, rows: int, cols: int):
        self.positions, self.values, self.rows, self.cols = positions, values, rows, cols

    def apart(self, tokens):
        return False

    def merged(self, weight):
        out = weight.clone(memory_format=torch.contiguous_format)
        out.view(-1).index_add_(0, self.positions, self.values)
        return out

    def gather(self, ids):
        flat_ids = ids.reshape(-1).to(self.positions.dtype)
        starts = torch.searchsorted(self.positions, flat_ids * self.cols)
        counts = torch.searchsorted(self.positions, (flat_ids + 1) * self.cols) - starts
        out = self.values.new_zeros(flat_ids.numel(), self.cols)
        total = int(counts.sum())
        if total:
            row = torch.repeat_interleave(torch.arange(flat_ids.numel(), device=ids.device), counts, output_size=total)
            skip = (starts - (torch.cumsum(counts, 0) - counts)).repeat_interleave(counts, output_size=total)
            index = torch.arange(total, device=ids.device) + skip
            out[row, self.positions[index] - flat_ids[row] * self.cols] = self.values[index]
        return out.view(*ids.shape, self.cols)

    def tensors(self):
        return [self.positions, self.values]


class LowRankFactor(Factor):
    """``delta = u @ v`` (alpha folded into ``u``): always two thin products, ``x @ v.T @ u.T``."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor):
        self.u, self.v = u, v
        self.rows, self.cols = u.shape[0], v.shape[1]

    def apart(self, tokens):
        return True

    def product(self, x):
        return F.linear(F.linear(x, self.v), self.u)

    def merged(self, weight):
        return torch.addmm(weight, self.u, self.v)

    def gather(self, ids):
        return F.embedding(ids, self.u) @ self.v

    def tensors(self):
        return [self.u, self.v]


class DenseFactor(Factor):
    """A whole delta matrix (no memory saved, but several adapters still share one base)."""

    def __init__(self, delta: torch.Tensor):
        self.delta = delta
        self.rows, self.cols = delta.shape

    def product(self, x):
        return F.linear(x, self.delta)

    def merged(self, weight):
        return weight + self.delta

    def gather(self, ids):
        return F.embedding(ids, self.delta)

    def tensors(self):
        return [self.delta]


def build_factor(name: str, entry, stored: Mapping[str, torch.Tensor], alpha: float, dtype: torch.dtype) -> Factor:
    """The `Factor` of one matrix entry from its stored tensors (validated as a load validates
    them), with ``alpha`` (entry alpha times the caller's) applied as SPEC §9 applies it."""
    encoding, shape = entry.encoding, tuple(entry.shape)
    rows, cols = shape
    compute = compute_dtype(TORCH_DTYPES[entry.dtype])
    alpha = entry.alpha * alpha
    if isinstance(encoding, SignEncoding):
        check_packed(stored["bits"], rows * cols)
        require_finite(name, "scale", stored["scale"])
        # alpha * (scale * sign) == sign * (alpha * scale): multiplying by +-1 is exact.
        scale = _alpha_times(stored["scale"].to(compute), alpha)
        return SignFactor(stored["bits"], scale, rows, cols, dtype)
    if isinstance(encoding, SparseEncoding):
        # Decoded once (every check of a load included), then only the kept entries are held.
        delta = _alpha_times(encoding.decode(stored, shape, name, compute), alpha).view(-1)
        positions = delta.nonzero().view(-1)
        if rows * cols < 2**31:
            positions = positions.to(torch.int32)
        return SparseFactor(positions, delta[positions].to(dtype), rows, cols)
    if isinstance(encoding, LowRankEncoding):
        require_finite(name, "u", stored["u"])
        require_finite(name, "v", stored["v"])
        return LowRankFactor(_alpha_times(stored["u"].to(compute), alpha).to(dtype), stored["v"].to(dtype))
    _require_on_the_fly(name, entry)
    return DenseFactor(_alpha_times(encoding.decode(stored, shape, name, compute), alpha).to(dtype))


def _require_on_the_fly(name: str, entry) -> None:
    if not isinstance(entry.encoding, (SignEncoding, SparseEncoding, LowRankEncoding, DenseEncoding)):
        raise UnsupportedOnTheFlyError(
            f"{name!r} is stored as {entry.encoding.name!r}, which cannot be applied on the fly to a matrix",
            expected=" or ".join(ON_THE_FLY_ENCODINGS), found=entry.encoding.name, fix=_MATERIALISE_FIX,
        )


# ----------------------------------------------------------------------------------------------
# The modules


def _check_device(held: torch.device, weight: torch.Tensor) -> None:
    if held != weight.device:
        raise InvalidArgumentError(
            "an on-the-fly delta is on another device than its weight", expected=str(weight.device),
            found=str(held), fix="detach_deltas(model), move the model, then attach the deltas again",
        )


class DeltaLinear(nn.Linear):
    """An ``nn.Linear`` that shares the parameters of the one it replaces (same names in the state
    dict) and adds the active adapter's delta in its forward."""

    @classmethod
    def adopt(cls, linear: nn.Linear, deltas: "OnTheFlyDeltas") -> "DeltaLinear":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias
        module.training = linear.training
        module.deltas, module.factors = deltas, {}
        return module

    def forward(self, x):
        factor = self.factors.get(self.deltas.active)
        if factor is None:
            return F.linear(x, self.weight, self.bias)
        _check_device(factor.device, self.weight)
        if factor.apart(x.numel() // max(x.shape[-1], 1)):
            return F.linear(x, self.weight, self.bias).add_(factor.product(x))
        return F.linear(x, factor.merged(self.weight), self.bias)

    def extra_repr(self):
        return f"{super().extra_repr()}, adapters={sorted(self.factors)}"


class DeltaEmbedding(nn.Embedding):
    """An ``nn.Embedding`` sharing the replaced one's parameters; adds the active adapter's rows."""

    @classmethod
    def adopt(cls, embedding: nn.Embedding, deltas: "OnTheFlyDeltas") -> "DeltaEmbedding":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                     "sparse", "training"):
            setattr(module, attr, getattr(embedding, attr))
        module.weight = embedding.weight
        module.deltas, module.factors = deltas, {}
        return module

    def forward(self, ids):
        out = super().forward(ids)
        factor = self.factors.get(self.deltas.active)
        if factor is None:
            return out
        _check_device(factor.device, self.weight)
        return out.add_(factor.gather(ids))

    def extra_repr(self):
        return f"{super().extra_repr()}, adapters={sorted(self.factors)}"


_ADOPT = {nn.Linear: DeltaLinear, nn.Embedding: DeltaEmbedding, DeltaLinear: None, DeltaEmbedding: None}
"""Module types whose weight can carry an on-the-fly delta (exact types: a subclass may change
what its forward computes). ``None``: already adopted."""


# ----------------------------------------------------------------------------------------------
# The registry kept on the model


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
        held = {id(t): t for f in self.factors.values() for t in f.tensors()} | {id(t): t for t in self.vectors.values()}
        return sum(t.numel() * t.element_size() for t in held.values())


class OnTheFlyDeltas:
    """What `attach_deltas` keeps on ``model.on_the_fly_deltas``: adapters by name, the active
    one, the modules it replaced, and the base values of the vectors it swaps."""

    def __init__(self, model, base: Checkpoint | None = None):
        self.model = model
        self.base = base
        """The checkpoint the model was loaded from, when given; else the model's tensors are
        fingerprinted."""
        self.active: str | None = None
        self.adapters: dict[str, Adapter] = {}
        self.replaced: dict[str, nn.Module] = {}  # module path -> the original module
        self.base_vectors: dict[str, torch.Tensor] = {}  # parameter name -> its base tensor
        self._fingerprint: dict | None = None

    def set_active(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            raise InvalidArgumentError("no such on-the-fly delta", expected=sorted(self.adapters) or "an attached name",
                                       found=repr(name), fix="attach it with attach_deltas first, or pass None for the base")
        state = self.model.state_dict(keep_vars=True)
        wanted = self.adapters[name].vectors if name is not None else {}
        for vector, base in self.base_vectors.items():
            value = wanted.get(vector, base)
            _check_device(value.device, state[vector])
            state[vector].data = value
        self.active = name

    def check_base(self, delta: Delta) -> None:
        """`BaseMismatchError` unless ``delta`` was made against this model's base."""
        expected = delta.manifest.base.fingerprint
        if expected is None:
            warnings.warn(f"{delta.directory} records no base fingerprint; its base cannot be verified", stacklevel=4)
            return
        if self._fingerprint is None:  # computed once, from the base values even while an adapter is active
            self._fingerprint = (self.base.fingerprint() if self.base is not None
                                 else _model_fingerprint(self.model, expected, self.base_vectors))
        label = str(self.base.directory) if self.base is not None else "given to attach_deltas"
        check_fingerprint(expected, self._fingerprint, label)

    @property
    def nbytes(self) -> int:
        """Bytes of tensors the adapters hold (besides the shared base)."""
        return sum(a.nbytes for a in self.adapters.values())

    def __repr__(self) -> str:
        return f"OnTheFlyDeltas(adapters={sorted(self.adapters)}, active={self.active!r})"




def _model_fingerprint(model, recorded: Mapping[str, Any], base_vectors: Mapping[str, torch.Tensor]) -> dict:
    """The fingerprint of the base held by ``model`` as it would be saved (tied copies left out,
    swapped vectors at their base values), each tensor cast back to the dtype the recorded
    fingerprint names, which is exact where the model holds a wider dtype; a narrower one cannot be
    checked from memory."""
    tied = _tied_names(model)
    want = recorded["tensors"]
    state = {}
    for name, tensor in model.state_dict().items():
        if name in tied:
            continue
        tensor = base_vectors.get(name, tensor)
        stored = want.get(name, {}).get("dtype")
        if not tensor.is_floating_point() or stored not in SAFETENSORS_DTYPES:
            state[name] = tensor
            continue
        if not holds_exactly(tensor.dtype, stored):
            raise BaseMismatchError(
                f"the model holds {name!r} as {tensor.dtype}, which cannot be checked against the {stored} it was saved as",
                expected=f"{stored} or a wider dtype", found=str(tensor.dtype),
                fix="pass base=<the base checkpoint directory> so its files are fingerprinted, or verify_base=False",
            )
        state[name] = tensor.to(SAFETENSORS_DTYPES[stored])
    return fingerprint_state_dict(state)


def _owners(model) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """For each tensor of the model (by id), every (module path, module, attribute) holding it."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for attr, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None:
                owners.setdefault(id(tensor), []).append((path, module, attr))
    return owners


def _open(delta: Delta | str | os.PathLike, resolve_kwargs: Mapping[str, Any]) -> Delta:
    if isinstance(delta, Delta):
        return delta
    from .delta_model import DeltaModel

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

    from . import base_model as base_checks
    from .skeleton import model_class_for

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


__all__ = [
    "attach_deltas", "set_active_delta", "using_delta", "detach_deltas", "load_on_the_fly", "OnTheFlyDeltas",
    "DeltaLinear", "DeltaEmbedding", "UnsupportedOnTheFlyError", "MERGE_MIN_TOKENS",
]
