"""Stream the base, decode the deltas, add, cast, place: one parameter at a time.

Each parameter of the empty model is read from the base checkpoint straight onto its target
device (memory-mapped, not copied, on CPU), the deltas that touch it are decoded on that device a
block of rows at a time, each block summed in a small float32 buffer and cast into the new
parameter, which then replaces the meta tensor. Besides the model being filled, only one
parameter's stored delta and a cache-sized buffer exist, so peak memory stays near the model size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..core.reconstruct import reconstruct_stored
from ..errors import BaseMismatchError
from ..io.checkpoint import Checkpoint
from ..io.progress import progress_bar
from ..io.reader import DeltaReader
from .device_prefetch import prefetched
from .model_state import tied_parameter_names

Fill = tuple[str, torch.Tensor, list[tuple[DeltaReader, float]]]
"""One tensor a load places: its state-dict name, the model's current (meta) tensor, the deltas
that edit it with their scales (none: the base's tensor as it is)."""


def fills(model, base: Checkpoint, deltas: Sequence[tuple[DeltaReader, float]]) -> list[Fill]:
    """What `materialize` places, in state-dict order: every tensor of the model that the base or
    a delta provides, except tied copies (`tie_weights` restores them) and buffers the model
    computed itself.

    Raises:
        BaseMismatchError: a parameter neither the base nor a delta provides.
    """
    state = model.state_dict(keep_vars=True)
    tied = tied_parameter_names(model)
    out = []
    for name, current in state.items():
        parts_src = [(reader, scale) for reader, scale in deltas if name in reader.manifest.tensors]
        if not parts_src and name in tied and name not in base:
            continue  # tied to a parameter filled elsewhere; tie_weights() restores it
        if not parts_src and name not in base:
            if current.device.type != "meta":
                continue  # a buffer the model initialised itself (not saved in checkpoints)
            raise BaseMismatchError(
                f"the base has no tensor {name!r} and the delta does not provide it",
                expected="every parameter in the base or the delta",
                found="missing",
                fix="load the base the delta was made against",
            )
        out.append((name, current, parts_src))
    return out


def materialize(
    model,
    base: Checkpoint,
    deltas: Sequence[tuple[DeltaReader, float]],
    device_of: Callable[[str], torch.device],
    *,
    storage: Callable[[str], torch.Tensor | None] | None = None,
) -> None:
    """Fill ``model`` (built empty) with ``base + sum(weight * alpha * delta)`` for each parameter.

    Each delta must have passed `check_base` against ``base`` and ``model``'s shapes (every
    parameter it edits exists with its shape): a misfit is a `BaseMismatchError` raised there.

    Args:
        model: a transformers model from `build_skeleton`.
        base: the base checkpoint (or a materialised-cache entry, with no deltas).
        deltas: (reader, alpha scale) pairs; the scale multiplies each entry's stored alpha.
        device_of: target device of each parameter name.
        storage: where a tensor is written (a view of the right shape, dtype and device, e.g.
            from `ModelStorage`), or None for a tensor of its own; by default every tensor is new.
    """
    from accelerate.utils import set_module_tensor_to_device

    def inputs(fill: Fill, device: torch.device) -> dict:
        """What the fill reads: each delta's stored tensors and, where needed, the base tensor."""
        name, _, parts_src = fill
        if not parts_src:
            return {"base": base.get_tensor(name, device), "stored": []}
        stored = [reader.stored(name, device) for reader, _ in parts_src]
        needs_base = any(
            reader.manifest.tensors[name].encoding.needs_base or reader.manifest.tensors[name].alpha * s != 1.0
            for reader, s in parts_src
        )
        return {"base": base.get_tensor(name, device) if needs_base and name in base else None, "stored": stored}

    todo = fills(model, base, deltas)
    reads = prefetched(todo, inputs, lambda f: device_of(f[0]))
    for (name, current, parts_src), read in progress_bar(reads, desc="loading", unit="tensor", total=len(todo)):
        device = device_of(name)
        target = current.dtype
        out = storage(name) if storage is not None else None
        if not parts_src:
            value = read["base"]
            if tuple(value.shape) != tuple(current.shape):
                raise BaseMismatchError(
                    f"the base's {name!r} has another shape",
                    expected=list(current.shape),
                    found=list(value.shape),
                    fix="load the base the delta was made against",
                )
            if out is not None:
                value = out.copy_(value)
        else:
            parts = [
                (reader.manifest.tensors[name], stored, scale)
                for (reader, scale), stored in zip(parts_src, read["stored"])
            ]
            source = parts_src[0][0].source_name(name)  # the delta's name seeds its masks and rounding
            value = reconstruct_stored(source, parts, read["base"], dtype=target, out=out)
            del parts
        del read
        set_module_tensor_to_device(
            model, name, device, value=value, dtype=target if value.is_floating_point() else None
        )
        del value, out
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise BaseMismatchError(
            "some parameters were found neither in the base nor in the delta",
            expected="a complete model",
            found=left[:5],
            fix="load the base the delta was made against",
        )
