"""What the ``budget`` method assumes about a network where it cannot measure: how much less a
lookup table's error and DARE's sampling noise cost than a linear layer's coherent error, and how
strongly calibration statistics may move the plan. Each is a number measured on real pairs
(benchmarks/RESULTS.md, "Fidelity at a bit budget"); the budget turns them into the weights and
noise prices it hands to `delta_format.methods.allocation`.
"""

from __future__ import annotations

import math

import torch

NOISE_SLOPE = 2.0
"""`noise_price` of a tensor whose delta is a fraction ``r`` of its base's norm: ``NOISE_SLOPE · r``.
Measured on two real pairs (benchmarks/RESULTS.md, "Fidelity at a bit budget"): a causal LM's bf16
fine-tune (r ≈ 0.002-0.01 per matrix) tolerates DARE's noise about 400x better than a coherent
error of the same energy, and slopes of 0.5 to 4 all keep most of that; a sentence encoder's
fine-tune (r ≈ 0.03) tolerates it only ~50x better, where a slope of 0.5 already over-buys DARE
(cosine 0.976 instead of 0.995 at 1 bit per weight) and 2 buys none."""
LOOKUP_WEIGHT = 0.1
"""Error weight of a vocabulary-sized lookup table (`delta_format.methods.base.TensorContext.lookup`,
at least `LOOKUP_MIN_ROWS` rows) beside a linear layer's: a token reads one row of an embedding
(and weighs a head's rows by their probability), so an error spread over the table reaches each
token diluted. Measured: a tied 49152-row table holding 75 % of a fine-tune's delta energy but
5 % of its gain took half the bits at weight 1 (benchmarks/RESULTS.md)."""
ENERGY_POWER = 0.25
"""Power of a linear layer's relative input energy in its error weight with calibration texts
where no output sensitivity was measured (`SENSITIVITY_POWER`, which replaced it). The full
energy (power 1) over-spends on the few layers with outlier inputs: on the causal LM pair it
kept 84 % of the gain at 0.2 bit per weight where the data-free plan keeps 96 %; at 0.25
calibration is within -0.006 to +0.017 of data-free (cosine or share of the gain) on three
pairs (benchmarks/RESULTS.md)."""
SENSITIVITY_POWER = 0.5
"""Power of a parameter's relative output sensitivity (`TensorContext.sensitivity`, the Fisher
trace per element of the model's output, over the typical matrix's) in its error weight. The
sensitivity spans four orders of magnitude between the matrices of one model (SmolLM2-135M:
layer 0's query 0.02x the typical matrix, its value 78x), more than the weight error can be
trusted to: measured on two real pairs with calibration texts (benchmarks/RESULTS.md, "Output
sensitivity"), power 0.5 keeps MiniLM's cosine 0.9840 / 0.9653 at 0.2 / 0.1 bit (0.75: 0.9811 /
0.9600; 1: 0.9725 at 0.2) and SmolLM's gain 99.65 % at 1 bit (0.75: 99.49 %), where 0.75 keeps
more of SmolLM's at 0.2 bit (98.5 % against 98.2 %)."""
SENSITIVITY_FLOOR = 1e-6
"""Least relative sensitivity: a parameter the output ignores (an attention key's bias, which
the softmax cancels) still has its error priced, at this weight, rather than at zero."""
INPUT_LOOKUP_WEIGHT = 0.3
"""`LOOKUP_WEIGHT` for a table the model only reads (an input embedding, not a head nor tied to
one): its error reaches only the tokens that read a row, and the rows a fine-tune moved are the
ones its data reads. Measured on the MiniLM pair's word embedding (benchmarks/RESULTS.md): at
0.1 the budget dropped it at every size; at 0.3 it keeps its top rows as ``rows-q`` at 1 bit
per weight (cosine 0.9962 → 0.9972; 0.5 / 0.2 bit unchanged); at 1 it bought DARE there and
lost (0.9957)."""
BIAS_WEIGHT = 10.0
"""Error weight of an additive vector (a parameter named ``bias``: a linear layer's or a norm's
shift) beside a linear layer's weights. A bias is a weight column whose input is 1 on every token:
its error is added unchanged to every token's output, where a weight's error is multiplied by
inputs of varying sign and, per feature, usually of energy below 1 (after a norm, after an
activation). Measured on the MiniLM pair (benchmarks/RESULTS.md, "Fidelity at a bit budget"):
at weight 1 the budget dropped every bias and norm shift and lost 0.0013 of cosine at 1 bit per
weight; weights 4 / 10 / 30 kept 0.9957 / 0.9962 / 0.9962 (1 bit) and 0.9922 / 0.9928 / 0.9930
(0.5 bit), 30 cost 0.003 at 0.1 bit. Multiplicative norm weights stay at 1: the same weight on
them cost the tiny Llama pair 4 points of its gain at 1 bit."""
LOOKUP_MIN_ROWS = 4096
"""Rows from which a lookup table is diluted enough for `LOOKUP_WEIGHT`: a vocabulary, not a
character set (a character-level model's head lost 7 % of its gain at the discount) nor a
position or token-type table."""


def error_weight(name: str, delta: torch.Tensor, lookup: bool, head: bool = True) -> float:
    """How much a unit of this tensor's squared error costs beside a linear layer's:
    `LOOKUP_WEIGHT` for a lookup table of at least `LOOKUP_MIN_ROWS` rows that is (or is tied to)
    a head, `INPUT_LOOKUP_WEIGHT` for one that is only read, `BIAS_WEIGHT` for an additive vector
    (a 1-D parameter named ``bias``), 1 otherwise."""
    if lookup and delta.dim() == 2 and delta.shape[0] >= LOOKUP_MIN_ROWS:
        return LOOKUP_WEIGHT if head else INPUT_LOOKUP_WEIGHT
    if delta.dim() == 1 and name.rpartition(".")[2] == "bias":
        return BIAS_WEIGHT
    return 1.0


def sensitivity_weights(sensitivities: dict[str, float], typical_of: set[str]) -> dict[str, float]:
    """Error weights from output sensitivities: each parameter's sensitivity over the geometric
    mean of those named in ``typical_of`` (the matrices), to `SENSITIVITY_POWER`, floored at
    `SENSITIVITY_FLOOR`; empty where no matrix has a positive sensitivity."""
    typical = [math.log(sensitivities[n]) for n in typical_of if sensitivities.get(n, 0.0) > 0]
    if not typical:
        return {}
    mean = math.exp(sum(typical) / len(typical))
    return {n: max(s / mean, SENSITIVITY_FLOOR) ** SENSITIVITY_POWER for n, s in sensitivities.items()}


def noise_price(delta: torch.Tensor, base: torch.Tensor | None, slope: float = NOISE_SLOPE) -> float | None:
    """How much a unit of DARE's sampling noise costs beside a unit of coherent error for this
    tensor: ``min(1, slope · ||Δ|| / ||W_base||)`` (None without a base: DARE not offered).
    Noise that is small beside the weights stays in the range where the loss is quadratic and
    random directions are nearly flat; noise comparable to the weights is not tolerated."""
    if base is None:
        return None
    base_norm = float(base.double().norm())
    if base_norm == 0.0:
        return 1.0
    return min(1.0, slope * float(delta.double().norm()) / base_norm)


def column_weights(delta: torch.Tensor) -> torch.Tensor | None:
    """Per input column ``j`` of a matrix, ``c_j / mean(c)`` with ``c_j = ||Δ[:, j]||²``: how much
    DARE's noise in that column costs. A fine-tune's update is a sum of outer products of output
    gradients and inputs, so its column energy follows its inputs' energy, and noise in the
    columns of large inputs moves the outputs most (data-free; None for vectors or a zero delta)."""
    if delta.dim() < 2:
        return None
    energy = delta.reshape(delta.shape[0], -1).double().square().sum(0)
    mean = energy.mean()
    return (energy / mean).float() if mean > 0 else None
