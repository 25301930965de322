"""The checks every path that applies a delta runs first, in one place: ``from_pretrained``,
``swap_delta``, ``attach_deltas`` / ``load_on_the_fly`` and ``apply``. A path that skipped one
would let a delta through that another refuses, so none of them checks on its own:

* the caller's alpha is a finite number (`scale_from`), and every entry's effective alpha
  (stored alpha times the caller's) is finite in the arithmetic dtype of SPEC §9, where
  ``1e308`` becomes infinity (`NumericalError`, as a non-finite weight is);
* `check_base`: the base's fingerprint, and every edited parameter in the base and the model,
  with its shape, before anything is read or allocated (SPEC §7, §8.7);
* tied parameters: a model that ties ``lm_head.weight`` to the embedding keeps one tensor for
  both, so a delta may edit only the name checkpoints keep (the embedding); an entry for the
  other name would be dropped silently when the weights are tied again, or conflict with the
  embedding's own edit (`BaseMismatchError`). A fresh ``from_pretrained`` builds such a model
  untied instead, as transformers loads a checkpoint whose tied tensors differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..core.dtypes import TORCH_DTYPES, compute_dtype
from ..core.manifest import Manifest
from ..errors import BaseMismatchError, InvalidArgumentError, NumericalError
from ..io.delta import Delta
from .base_model import FingerprintSource, check_base
from .model_state import parameter_shapes


def scale_from(alpha: object, what: str = "alpha") -> float:
    """A caller's alpha (or weight) as a float: a finite real number, else a typed error."""
    try:
        if isinstance(alpha, (bool, str, bytes)):
            raise TypeError
        value = float(alpha)  # also numpy and torch scalars
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgumentError(
            f"{what} is not a number", expected="a finite number", found=repr(alpha)[:80]
        ) from None
    if not math.isfinite(value):
        raise NumericalError(f"{what} is not finite", expected="a finite number", found=repr(value))
    return value


def check_alphas(manifest: Manifest, scale: float) -> None:
    """Every entry's effective alpha is finite once rounded to its arithmetic dtype (SPEC §9)."""
    for name, entry in manifest.tensors.items():
        effective = entry.alpha * scale
        compute = compute_dtype(TORCH_DTYPES[entry.dtype])
        if not math.isfinite(effective) or not math.isfinite(float(torch.tensor(effective, dtype=compute))):
            raise NumericalError(
                f"the effective alpha of {name!r} is not finite in {str(compute).removeprefix('torch.')}",
                expected="a finite alpha",
                found=f"{entry.alpha!r} x {scale!r}",
                fix="lower alpha; a delta from a stranger with such an alpha may be hostile",
            )


def tied_groups(model: nn.Module) -> list[tuple[str, set[str]]]:
    """(the name checkpoints keep, every other name of that tensor) for each tied tensor."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    groups = {names[0]: set(names[1:]) for names in by_tensor.values() if len(names) > 1}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if source in groups or not any(target in others for others in groups.values()):
            groups.setdefault(source, set()).add(target)
    return [(kept, others) for kept, others in groups.items() if others]


def check_tied(manifest: Manifest, model: nn.Module) -> None:
    """A delta edits a tied tensor only under the name checkpoints keep."""
    for kept, others in tied_groups(model):
        edited = sorted(others & manifest.tensors.keys())
        if edited:
            raise BaseMismatchError(
                f"the delta edits {edited[0]!r}, which this model ties to {kept!r}",
                expected=f"edits of the tied tensor under {kept!r} only",
                found=f"entries for {sorted({*edited, *({kept} & manifest.tensors.keys())})}",
                fix="the edit would be dropped when the weights are tied; re-create the delta from the fine-tune's "
                "checkpoint, or load a model whose config unties them (tie_word_embeddings=False)",
            )


def check_delta(
    delta: Delta | Manifest,
    base: FingerprintSource,
    *,
    scale: float = 1.0,
    model: nn.Module | None = None,
    model_shapes: Mapping[str, Sequence[int]] | None = None,
    verify_base: bool = True,
    base_label: str | None = None,
) -> None:
    """Every check above, before anything is read, allocated or changed."""
    manifest = delta.manifest if isinstance(delta, Delta) else delta
    check_alphas(manifest, scale)
    if model is not None:
        check_tied(manifest, model)
        model_shapes = parameter_shapes(model) if model_shapes is None else model_shapes
    check_base(delta, base, verify_base=verify_base, model_shapes=model_shapes, base_label=base_label)
