"""An encoder's inner hidden states on the calibration texts, kept for a refinement to fit beside
its output (`delta_format.methods.refine` through `Calibration.output_divergence`).

A language model's outputs are compared as next-token distributions; an encoder's output is itself
a hidden state, and so are its inner layers', in the same space. Fitting what every layer hands
on, not only what the last one outputs, gives a refinement on a few texts more to go by (the
intermediate targets of layer-wise distillation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

LAYER_TARGET_WEIGHT = 1.0
"""Weight of the inner layers' error beside the output's in a refinement's gradient steps (their
mean, each layer scaled to the output's energy). Measured on MiniLM (all-MiniLM-L6-v2 and a
contrastive fine-tune, `bits=` on the built-in text, held-out cosine to the fine-tune): 0.2 /
0.1 bit 0.9883 / 0.9754 without, 0.9888 / 0.9766 with; weight 4 gave 0.9892 at 0.2 bit against
0.9891 at weight 1 unscaled (benchmarks/RESULTS.md, "Inner layers")."""

MAX_LAYER_TARGET_VALUES = 1 << 27
"""Values of inner hidden states kept at most (512 MB in float32): past it a refinement fits the
encoder's output only."""


def mean_square(tensors: Sequence[torch.Tensor]) -> float:
    """The mean square of every value of ``tensors``."""
    return float(sum(t.double().square().sum() for t in tensors)) / max(sum(t.numel() for t in tensors), 1)


class LayerTargets:
    """Per calibration text, the fine-tune's hidden states between its embeddings and its output;
    empty (false) for a model with logits, one that does not return its hidden states, one with no
    inner layer, or past `MAX_LAYER_TARGET_VALUES`."""

    def __init__(self) -> None:
        self.texts: list[list[torch.Tensor]] = []
        self.scales: list[float] = []  # the output's mean square over each inner layer's
        self.values = 0

    def __bool__(self) -> bool:
        return bool(self.scales)

    def keep(self, output: Any) -> None:
        """Keep the inner hidden states of the next text's ``output`` (see the class)."""
        hidden = getattr(output, "hidden_states", None)
        if getattr(output, "logits", None) is not None or not isinstance(hidden, (tuple, list)) or len(hidden) < 3:
            return
        inner = [h.detach().float() for h in hidden[1:-1]]
        self.values += sum(h.numel() for h in inner)
        if self.values <= MAX_LAYER_TARGET_VALUES:
            self.texts.append(inner)

    def finish(self, reference: Sequence[torch.Tensor]) -> None:
        """Scale each layer to the output's energy (``reference``: the outputs, one per text); keep
        nothing unless every text's layers were kept."""
        if not self.texts or len(self.texts) != len(reference):
            self.texts = []
            return
        out = mean_square(reference)
        self.scales = [out / max(mean_square(layer), 1e-30) for layer in zip(*self.texts)]

    def error(self, output: Any, text: int) -> torch.Tensor:
        """Summed squared error of ``output``'s inner hidden states to text ``text``'s, each layer's
        scaled to the output's energy (a pre-norm encoder's inner layers grow with depth), mean
        over the layers."""
        pairs = zip(output.hidden_states[1:-1], self.texts[text], self.scales)
        total = sum((h.float() - r).double().square().sum() * scale for h, r, scale in pairs)
        return total / len(self.scales)


__all__ = ["LAYER_TARGET_WEIGHT", "LayerTargets", "MAX_LAYER_TARGET_VALUES"]
