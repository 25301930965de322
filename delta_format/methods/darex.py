"""``darex``: DARE with the rescale ``1/q`` instead of ``1/(1-p)`` (DAREx-q, arXiv 2410.09344).

DARE's ``1/(1-p)`` keeps the edited delta right *in expectation*, but the variance it adds grows
like ``p/(1-p)``, and at ``p = 0.99`` the rescaled survivors swamp the layer outputs. For one
output unit ``y = Σ_j δ_j x_j`` with ``S = Σ_j δ_j x_j`` and ``V = Σ_j δ_j² x_j²``, a rescale
``c`` gives ``E[(ŷ - y)²] = (c(1-p) - 1)² S² + c² p (1-p) V``, minimised by

    c* = S² / ((1-p) S² + p V),   i.e.  q* = 1/c* > 1 - p whenever V > 0.

``q`` is chosen one of four ways:

* a number: by hand (``q = 1 - p`` is DARE);
* ``"auto"`` (the default): per tensor, DARE's ``1/(1-p)`` where DARE's noise is tolerated (the
  budget's prior, `delta_format.methods.priors.noise_price`: a delta small beside its base,
  as in a causal LM's fine-tune, where shrinking only loses the delta: research pair SmolLM2-135M
  kept 49 % of its gain shrunk, 75 % with DARE's rescale), else the rescale under which the kept
  entries move the layer's outputs on the calibration tokens by as much as the whole delta does,
  ``c = ||X Δᵀ|| / ||X (M ⊙ Δ)ᵀ||`` for the realised mask ``M`` (closed form; for parameters whose
  outputs each depend on one entry, ``||Δ|| / ||M ⊙ Δ||``);
* ``"mse"``: per tensor, ``c*`` above, with ``S²`` and ``V`` summed over output units and tokens
  (`ActivationStats.rescale_terms`). Kept for study, not recommended: it is the exact minimiser of
  each layer's expected output MSE, and at high ``p`` that minimiser shrinks the delta toward the
  base (``c*(1-p) ≈ 0.03`` at ``p = 0.99`` on research15's MiniLM pair; the trained Llama kept 7 %
  of its perplexity gain). A layer-output MSE charges DARE's zero-mean noise and the loss of the
  delta's direction alike, but the network tolerates the noise far better: matching the output's
  size (``"auto"``) keeps much more;
* ``"output"``: one ``q`` for the whole model, the point of a geometric grid over
  ``[1 - p, 2]`` (refined once around the best point) with the smallest logit MSE against the
  fine-tune on the calibration texts.

A parameter without statistics falls back to ``1 - p`` and says so in its stats.

The mask is DARE's seeded mask (same seed, same kept entries), so ``darex`` differs from ``dare``
only in the encoding's ``scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..core.constants import INDEX_SEEDED
from ..core.encodings import SparseEncoding
from ..errors import InvalidArgumentError
from .base import (
    Edit,
    EditMethod,
    TensorContext,
    TensorStream,
    check_drop_rate,
    check_positive,
    drop_rate,
    number_or,
    param,
)
from .dare import check_value_bits, seeded_edit, value_bits_param
from .priors import noise_price

if TYPE_CHECKING:
    from .activations import ActivationStats, CalibrationSession

Q_MODES = ("auto", "mse", "output")
parse_q = number_or(*Q_MODES)
"""``q`` from text: a positive number, or one of `Q_MODES`."""


def mse_optimal_rescale(s2: float, v: float, p: float) -> float:
    """DARE's MSE-optimal rescale ``c* = S² / ((1-p) S² + p V)``; DAREx-q's ``q* = 1 / c*``.

    ``c* = 1/(1-p)`` (plain DARE) only when ``V = 0``; with ``V > 0`` it is smaller, and at high
    ``p`` much smaller, which is why DARE's ``1/(1-p)`` blows the output up at ``p = 0.99``.
    Returns 0 when the delta does not move the outputs at all (``S² = 0``).
    """
    denominator = (1.0 - p) * s2 + p * v
    return s2 / denominator if denominator > 0 else 0.0


@dataclass
class DarexMethod(EditMethod, name="darex"):
    """DAREx-q: DARE's seeded mask with rescale ``1/q``; ``q`` a number, ``"auto"`` (per tensor,
    output-norm matching), ``"mse"`` (per tensor, layer-output MSE) or ``"output"`` (global, by
    logit MSE). Default: ``"auto"``.

    Example:
        >>> edit = DarexMethod(p=0.99, q=0.05).edit("w", torch.ones(10_000), TensorContext("w"))
        >>> edit.encoding.scale
        20.0
    """

    summary: ClassVar[str] = "DARE with rescale 1/q"
    tags: ClassVar[tuple[str, ...]] = ("dare", "darex")
    uses_seed: ClassVar[bool] = True
    p: float = drop_rate(0.9)
    q: float | str = param(
        "auto",
        parse=parse_q,
        metavar="Q|auto|mse|output",
        help="DAREx-q: rescale kept entries by 1/Q; 'auto' per tensor so the layer's output change keeps "
        "its size on the calibration texts, 'mse' the layer-MSE-optimal q (shrinks), 'output' one q "
        "minimising the logit error",
    )
    value_bits: int = value_bits_param()
    grid: int = param(16, help="points of the geometric grid searched for q='output'")
    _global_q: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.p = check_drop_rate(self.name, self.p)
        if isinstance(self.q, str):
            try:
                self.q = parse_q(self.q)
            except ValueError:
                raise InvalidArgumentError(
                    "darex: invalid q", expected=f"a number > 0 or one of {Q_MODES}", found=repr(self.q)
                ) from None
        if not isinstance(self.q, str):
            self.q = check_positive(self.name, "q", self.q)
        self.value_bits = check_value_bits(self.name, self.value_bits)
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 3:
            raise InvalidArgumentError("darex: grid must be an integer >= 3", expected=">= 3", found=repr(self.grid))

    def needs_calibration(self) -> bool:
        return isinstance(self.q, str)

    def prepare(self, tensors: TensorStream, calibration: CalibrationSession) -> dict[str, Any]:
        if self.q != "output":
            return {}
        kept, deltas, alphas = {}, {}, {}
        for name, delta, context in tensors():
            if calibration.parameter(name) is None:
                continue
            encoding = SparseEncoding(INDEX_SEEDED, scale=1.0, seed=context.seed, p=self.p)
            positions = encoding.positions(delta.numel(), name)
            values = delta.reshape(-1)[positions].to(context.value_dtype).float()  # as they will be stored
            kept[name], deltas[name], alphas[name] = (positions, values), delta.float(), context.alpha

        def output_mse(q: float) -> float:
            deviation = {}
            for name, (positions, values) in kept.items():
                change = deltas[name].neg().reshape(-1)
                change.index_add_(0, positions, values * (alphas[name] / q))
                deviation[name] = change.view(deltas[name].shape)
            return calibration.output_mse(deviation)

        low, high = 1.0 - self.p, 2.0
        points = [low * (high / low) ** (i / (self.grid - 1)) for i in range(self.grid)]
        curve = {q: output_mse(q) for q in points}
        best = min(curve, key=curve.get)
        i = points.index(best)
        left, right = points[max(i - 1, 0)], points[min(i + 1, len(points) - 1)]
        for j in range(1, self.grid // 2):
            q = left * (right / left) ** (j / (self.grid // 2))
            if q not in curve:
                curve[q] = output_mse(q)
        self._global_q = min(curve, key=curve.get)
        return {
            "q": self._global_q,
            "output_mse": curve[self._global_q],
            "dare_output_mse": curve.get(points[0]),
            "tensors": len(kept),
        }

    def edit(self, name: str, delta: torch.Tensor, context: TensorContext) -> Edit:
        stats: dict[str, Any]
        if isinstance(self.q, float):
            scale, stats = 1.0 / self.q, {"q_source": "given"}
        elif self.q == "output":
            if self._global_q is None:
                raise InvalidArgumentError(
                    "darex q='output' is chosen in prepare(), which has not run",
                    expected="calibration texts",
                    found="no prepared q",
                    fix="pass calibration texts, or give q a number",
                )
            scale, stats = 1.0 / self._global_q, {"q_source": "output search"}
        elif context.activations is None:
            scale, stats = 1.0 / (1.0 - self.p), {"q_source": "no activation statistics: DARE's 1-p"}
        elif self.q == "auto" and noise_tolerated(delta, context.base, self.p):
            scale, stats = 1.0 / (1.0 - self.p), {"q_source": "DARE's 1-p: its noise is small beside the base"}
        elif self.q == "mse":
            s2, v = context.activations.rescale_terms(delta)
            scale, stats = mse_optimal_rescale(s2, v, self.p), {"q_source": f"layer MSE ({context.activations.kind})"}
        else:
            scale = norm_matching_rescale(context.activations, delta, self.kept(name, delta, context), self.p)
            stats = {"q_source": f"output norm ({context.activations.kind})"}
        edit = seeded_edit(name, delta, context, self.p, scale, self.value_bits)
        edit.stats.update(stats, q=1.0 / scale if scale > 0 else None)
        return edit

    def kept(self, name: str, delta: torch.Tensor, context: TensorContext) -> torch.Tensor:
        """The kept entries of the seeded mask, zero elsewhere (what the rescale multiplies)."""
        positions = SparseEncoding(INDEX_SEEDED, seed=context.seed, p=self.p).positions(delta.numel(), name)
        kept = torch.zeros(delta.numel(), dtype=delta.dtype)
        kept[positions] = delta.reshape(-1)[positions]
        return kept.view(delta.shape)


def noise_tolerated(delta: torch.Tensor, base: torch.Tensor | None, p: float) -> bool:
    """Whether DARE's sampling noise at ``p``, priced as the budget prices it (`noise_price`), costs
    less than dropping the delta: then the unbiased rescale ``1/(1-p)`` is the one to keep."""
    price = noise_price(delta, base)
    return price is not None and price * p / (1 - p) < 1.0


def norm_matching_rescale(activations: ActivationStats, delta: torch.Tensor, kept: torch.Tensor, p: float) -> float:
    """``||X Δᵀ|| / ||X Kᵀ||`` (``K`` the kept entries): the rescale under which the kept entries
    change the layer's outputs on the calibration tokens by as much as ``Δ`` does; DARE's
    ``1/(1-p)`` when nothing is kept or the outputs do not move."""
    full, part = activations.output_energy(delta), activations.output_energy(kept)
    return math.sqrt(full / part) if part > 0 and full > 0 else 1.0 / (1.0 - p)
