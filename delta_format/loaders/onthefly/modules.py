"""The patched modules: an ``nn.Linear``/``nn.Embedding`` that shares the original's parameters
and adds the active adapter's delta in its forward."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InvalidArgumentError
from .merged_cache import MergedWeightCache


class ActiveAdapter(Protocol):
    """Who says which adapter a forward applies (`OnTheFlyDeltas`): None for the base itself;
    and where the active adapter's merged weights are kept (`MergedWeightCache`)."""

    active: str | None
    merged_weights: MergedWeightCache

    def check_caller(self) -> None:
        """Raise if another thread holds the model inside ``using_delta``."""


def check_same_device(held: torch.device, weight: torch.Tensor) -> None:
    if held != weight.device:
        raise InvalidArgumentError(
            "an on-the-fly delta is on another device than its weight",
            expected=str(weight.device),
            found=str(held),
            fix="detach_deltas(model), move the model, then attach the deltas again",
        )


class DeltaLinear(nn.Linear):
    """An ``nn.Linear`` that shares the parameters of the one it replaces (same names in the state
    dict) and adds the active adapter's delta in its forward."""

    @classmethod
    def adopt(cls, linear: nn.Linear, deltas: ActiveAdapter) -> DeltaLinear:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias
        module.training = linear.training
        module.deltas, module.factors = deltas, {}
        return module

    def forward(self, x):
        self.deltas.check_caller()
        factor = self.factors.get(self.deltas.active)
        if factor is None:
            return F.linear(x, self.weight, self.bias)
        check_same_device(factor.device, self.weight)
        if not (torch.is_grad_enabled() and self.weight.requires_grad):  # cached weights carry no gradient
            merged = self.deltas.merged_weights.merged(self, factor)
            if merged is not None:
                return F.linear(x, merged, self.bias)
        if factor.apart(x.numel() // max(x.shape[-1], 1)):
            return F.linear(x, self.weight, self.bias).add_(factor.product(x))
        return F.linear(x, factor.merged(self.weight), self.bias)

    def extra_repr(self):
        return f"{super().extra_repr()}, adapters={sorted(self.factors)}"


class DeltaEmbedding(nn.Embedding):
    """An ``nn.Embedding`` sharing the replaced one's parameters; adds the active adapter's rows."""

    @classmethod
    def adopt(cls, embedding: nn.Embedding, deltas: ActiveAdapter) -> DeltaEmbedding:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for attr in (
            "num_embeddings",
            "embedding_dim",
            "padding_idx",
            "max_norm",
            "norm_type",
            "scale_grad_by_freq",
            "sparse",
            "training",
        ):
            setattr(module, attr, getattr(embedding, attr))
        module.weight = embedding.weight
        module.deltas, module.factors = deltas, {}
        return module

    def forward(self, ids):
        self.deltas.check_caller()
        out = super().forward(ids)
        factor = self.factors.get(self.deltas.active)
        if factor is None:
            return out
        check_same_device(factor.device, self.weight)
        return factor.add_gathered(out, ids)

    def extra_repr(self):
        return f"{super().extra_repr()}, adapters={sorted(self.factors)}"


ADOPTERS = {nn.Linear: DeltaLinear, nn.Embedding: DeltaEmbedding, DeltaLinear: None, DeltaEmbedding: None}
"""Module types whose weight can carry an on-the-fly delta (exact types: a subclass may change
what its forward computes). ``None``: already adopted."""
