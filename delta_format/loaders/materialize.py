"""Stream the base, decode the deltas, add, cast, place: one parameter at a time.

Each parameter of the empty model is read from the base checkpoint straight onto its target
device (memory-mapped, not copied, on CPU), the deltas that touch it are decoded on that device a
block of rows at a time, each block summed in a small float32 buffer and cast into the new
parameter, which then replaces the meta tensor. Besides the model being filled, only one
parameter's stored delta and a cache-sized buffer exist, so peak memory stays near the model size.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..io.checkpoint import Checkpoint
from ..errors import BaseMismatchError, CorruptDeltaError
from ..io.reader import DeltaReader
from ..core.reconstruct import reconstruct_stored


def _tied_names(model) -> set[str]:
    """Parameter names that `tie_weights` fills from another one (tied embeddings and the like):
    the targets transformers declares, and names sharing a parameter with an earlier name."""
    seen: dict[int, str] = {}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        else:
            seen[id(param)] = name
    return tied


def materialize(
    model,
    base: Checkpoint,
    deltas: Sequence[tuple[DeltaReader, float]],
    device_of: Callable[[str], torch.device],
) -> None:
    """Fill ``model`` (built empty) with ``base + sum(weight * alpha * delta)`` for each parameter.

    Args:
        model: a transformers model from `build_skeleton`.
        base: the base checkpoint.
        deltas: (reader, alpha scale) pairs; the scale multiplies each entry's stored alpha.
        device_of: target device of each parameter name.
    """
    from accelerate.utils import set_module_tensor_to_device

    state = model.state_dict(keep_vars=True)
    tied = _tied_names(model)
    for reader, _ in deltas:
        unknown = [n for n in reader.manifest.tensors if n not in state]
        if unknown:
            raise BaseMismatchError(
                "the delta edits parameters this model does not have", expected="names of the fine-tune's architecture",
                found=unknown[:5], fix="check the delta's config.json matches its tensors",
            )
    for name, current in state.items():
        parts_src = [(reader, scale) for reader, scale in deltas if name in reader.manifest.tensors]
        if not parts_src and name in tied and name not in base:
            continue  # tied to a parameter filled elsewhere; tie_weights() restores it
        if not parts_src and name not in base:
            if current.device.type != "meta":
                continue  # a buffer the model initialised itself (not saved in checkpoints)
            raise BaseMismatchError(f"the base has no tensor {name!r} and the delta does not provide it",
                                    expected="every parameter in the base or the delta", found="missing",
                                    fix="load the base the delta was made against")
        device = device_of(name)
        target = current.dtype
        if not parts_src:
            value = base.get_tensor(name, device)
            if tuple(value.shape) != tuple(current.shape):
                raise BaseMismatchError(f"the base's {name!r} has another shape", expected=list(current.shape),
                                        found=list(value.shape), fix="load the base the delta was made against")
        else:
            for reader, _ in parts_src:  # before decoding: a shape must be justified by the model
                if tuple(reader.manifest.tensors[name].shape) != tuple(current.shape):
                    raise CorruptDeltaError(f"the delta's {name!r} does not fit the model", expected=list(current.shape),
                                            found=list(reader.manifest.tensors[name].shape), fix="check the delta's config.json")
            parts = [(reader.manifest.tensors[name], reader.stored(name, device), scale) for reader, scale in parts_src]
            needs_base = any(e.encoding.is_delta or e.alpha * s != 1.0 for e, _, s in parts)
            base_tensor = base.get_tensor(name, device) if needs_base and name in base else None
            value = reconstruct_stored(name, parts, base_tensor, dtype=target)
            del parts, base_tensor
        set_module_tensor_to_device(model, name, device, value=value, dtype=target if value.is_floating_point() else None)
        del value
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise BaseMismatchError("some parameters were found neither in the base nor in the delta",
                                expected="a complete model", found=left[:5], fix="load the base the delta was made against")
