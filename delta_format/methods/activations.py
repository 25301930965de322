"""What a parameter's layer saw on calibration texts: the statistics data-aware methods use.

The compressor's calibration session (`delta_format.compression.calibration`) records them; a
method receives them in its `TensorContext` and never runs a model itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class ActivationStats:
    """What one parameter's layer saw on the calibration texts.

    ``kind`` is ``"linear"`` for a weight that multiplies the layer input (``inputs`` holds one
    row per token; ``input_axis`` is the weight's axis that meets the input: 1 for `nn.Linear`'s
    ``[out, in]``, 0 for GPT-2's ``Conv1D`` ``[in, out]``), or ``"elementwise"`` for parameters
    where each output depends on a single entry (biases, norm scales, embedding rows).
    """

    kind: str
    inputs: torch.Tensor | None = None
    input_axis: int = 1

    def _as_out_in(self, delta: torch.Tensor) -> torch.Tensor:
        matrix = delta.reshape(delta.shape[0], -1).float()
        return matrix if self.input_axis == 1 else matrix.T

    def outputs(self, delta: torch.Tensor) -> torch.Tensor:
        """The layer's output change ``x @ delta^T`` on every calibration token, ``[tokens, out]``."""
        return self.inputs @ self._as_out_in(delta).T

    def input_norms(self) -> torch.Tensor:
        """``||x_j||`` over calibration tokens, for each input feature ``j``."""
        return self.inputs.square().sum(0).sqrt()

    def importance(self, delta: torch.Tensor) -> torch.Tensor | None:
        """``|δ_ij| * ||x_j||`` in ``delta``'s shape (Wanda-style), or None for elementwise parameters."""
        if self.kind != "linear":
            return None
        norms = self.input_norms()
        shape = (1, -1) if self.input_axis == 1 else (-1, 1)
        return (delta.reshape(delta.shape[0], -1).abs().float() * norms.view(shape)).view(delta.shape)

    def rescale_terms(self, delta: torch.Tensor) -> tuple[float, float]:
        """``(ΣS², ΣV)`` summed over output units and tokens, with ``S = Σ_j δ_j x_j`` and
        ``V = Σ_j δ_j² x_j²`` (DESIGN.md's DAREx derivation)."""
        if self.kind == "elementwise":
            energy = float(delta.double().square().sum())  # S² = V for every output: one entry each
            return energy, energy
        s2 = float(self.outputs(delta).double().square().sum())
        d = self._as_out_in(delta).double()
        v = float(self.inputs.double().square().sum(0) @ d.square().sum(0))
        return s2, v

    def output_energy(self, delta: torch.Tensor) -> float:
        """``Σ_tokens ||x deltaᵀ||²`` (``||delta||²`` for elementwise parameters): how much the
        layer's outputs move on the calibration tokens."""
        if self.kind == "elementwise":
            return float(delta.double().square().sum())
        return float(self.outputs(delta).double().square().sum())

    def output_sq_error(self, approx: torch.Tensor, exact: torch.Tensor) -> float:
        """``Σ_tokens ||x (approx - exact)^T||²``: the layer-output error an edit causes."""
        if self.kind == "elementwise":
            return float((approx.double() - exact.double()).square().sum())
        return float(self.outputs(approx.float() - exact.float()).double().square().sum())


class CalibrationSession(Protocol):
    """What a method may ask of the compressor's calibration session in `EditMethod.prepare`
    (implemented by `delta_format.compression.calibration.Calibration`)."""

    def parameter(self, name: str) -> torch.Tensor | None:
        """The fine-tuned model's parameter ``name`` (None if the model has no such parameter)."""

    def output_mse(
        self,
        deviation: Mapping[str, torch.Tensor] | None = None,
        *,
        grad: bool = False,
        texts: Sequence[int] | None = None,
    ):
        """Mean squared logit error against the fine-tune (on the texts numbered ``texts``, default
        all) when each named parameter moves by ``deviation[name]``; a differentiable tensor with
        ``grad=True``, else a float."""

    def output_divergence(
        self,
        deviation: Mapping[str, torch.Tensor] | None = None,
        *,
        grad: bool = False,
        texts: Sequence[int] | None = None,
    ):
        """As `output_mse`, but the per-token KL divergence for a model with class logits."""

    def set_parameter(self, name: str, value: torch.Tensor) -> bool:
        """Write an edited value of ``name`` into the calibration model (False if it has none)."""

    def text_lengths(self) -> list[int]:
        """Tokens of each calibration text."""

    def progress_steps(self, total: int, desc: str) -> Iterable[int]:
        """``range(total)``, with a progress bar where the session shows one."""
