"""What a model (loaded, or built empty) holds, as the loaders need to know it: the shape of
every state-dict entry, and which names `tie_weights` fills from another."""

from __future__ import annotations

from torch import nn


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{state-dict name: shape}``, tied copies included; reads no tensor data (meta is fine)."""
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict(keep_vars=True).items()}


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Parameter names that `tie_weights` fills from another one (tied embeddings and the like):
    the targets transformers declares, and names sharing a parameter with an earlier name.
    A checkpoint saves only one of each tied group, so these are not expected in it."""
    seen: dict[int, str] = {}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        else:
            seen[id(param)] = name
    return tied
