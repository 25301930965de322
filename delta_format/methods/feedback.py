"""Error feedback from calibration inputs: the budget's quantised codes chosen for the layer's
outputs, not for the weights (used only when calibration texts are given).

A weight error ``E`` of a linear layer moves its outputs by ``E x``; over the calibration tokens
that costs ``tr(E H Eᵀ)`` with ``H = E[x xᵀ]``. Two closed-form remedies, both encoder-side only
(the stored bytes are ordinary ``dense-q`` / ``lowrank-q`` codes; readers see nothing new):

* `dense_codes`: GPTQ (Frantar et al., 2023). Input features are quantised one at a time, and
  each one's rounding error is pushed onto the features not yet quantised through ``H⁻¹`` (the
  Cholesky form, in blocks). Scales are those of `delta_format.core.quant.quantize` (same clipping
  rule), taken from the compensated values when a group starts.
* `refit_outputs`: low rank with its input-side vectors quantised first, then the output-side
  vectors refitted by ``H``-weighted least squares before they are quantised (the closed-form step
  of research15's low-rank GPTQ; the refit alone did as much there).

Measured on the MiniLM pair (benchmarks/RESULTS.md, `compress(..., bits=b, calibration_texts=…)`,
16 texts): cosine to the fine-tune 0.9964 / 0.9921 / 0.9758 / 0.9508 without feedback, 0.9971 /
0.9930 / 0.9790 / 0.9584 with it, at 1 / 0.5 / 0.2 / 0.1 bit per weight (64 texts: 0.9973 /
- / 0.9799 / 0.9601). Each is kept only where it lowers the calibration output error.
"""

from __future__ import annotations

import torch

from ..core.encodings import QuantizedLowRankEncoding
from ..core.quant import dequantize, half_range, quantize, scale_dtype
from .activations import ActivationStats

DAMPING = 0.01
"""Added to ``H``'s diagonal, times its mean: GPTQ's usual damping (a well-conditioned inverse)."""
BLOCK = 128
"""Input features per GPTQ block (a multiple of every group used)."""


def hessian(stats: ActivationStats | None, features: int) -> torch.Tensor | None:
    """``H = E[x xᵀ]`` (float64) of a linear layer's calibration inputs, or None when there is none
    (not a linear layer, no tokens, or a fan-in other than ``features``)."""
    if stats is None or stats.kind != "linear" or stats.inputs is None or not len(stats.inputs):
        return None
    x = stats.inputs.double()
    if x.shape[1] != features:
        return None
    return x.T @ x / x.shape[0]


def damped(h: torch.Tensor) -> torch.Tensor:
    """``H + DAMPING · mean(diag H) · I``: the calibration tokens' ``H`` with a share of the plain
    weight error added, so that a few tokens (fewer than the layer has inputs, on a small model)
    cannot steer the codes into directions they never saw."""
    return h + torch.eye(h.shape[0], dtype=h.dtype) * (DAMPING * float(h.diagonal().mean()))


def output_error(error: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(E H Eᵀ)`` for ``E`` as ``[out, in]``."""
    e = error.double()
    return float(((e @ h) * e).sum())


def as_out_in(matrix: torch.Tensor, input_axis: int) -> torch.Tensor:
    """A stored 2-D weight as ``[out, in]`` (GPT-2's ``Conv1D`` stores ``[in, out]``)."""
    return matrix if input_axis == 1 else matrix.T


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damping)⁻¹``, dead inputs (zero variance) made inert."""
    h = h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped(h))), upper=True)


def dense_codes(
    matrix: torch.Tensor, stats: ActivationStats, bits: int, group: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """GPTQ codes and scales of a 2-D ``matrix`` (as stored) in `quantize`'s layout for its
    flattened values (``dense-q``'s), or None where they would not be better than plain rounding
    or the layout does not allow them (a row whose length is not a multiple of ``group``, so that
    groups would straddle rows; no calibration inputs)."""
    if matrix.dim() != 2 or matrix.shape[1] % group or BLOCK % group:
        return None
    w = as_out_in(matrix.double(), stats.input_axis)
    h = hessian(stats, w.shape[1])
    if h is None:
        return None
    plain_codes, plain_scales = quantize(matrix.reshape(-1), bits, group)
    dtype = plain_scales.dtype
    along_input = stats.input_axis == 1  # groups run along the input features, else along outputs
    codes, q, scales = _gptq(w, _inverse_cholesky(h), bits, group, dtype, along_input)
    if dtype == torch.float16 and scale_dtype(scales.float()) != dtype:
        return None  # a compensated scale left float16's normal range: keep the plain codes
    plain = dequantize(plain_codes, plain_scales, bits, group, torch.float64).view(matrix.shape)
    h = damped(h)
    if output_error(q - w, h) >= output_error(as_out_in(plain, stats.input_axis) - w, h):
        return None
    return as_out_in(codes, stats.input_axis).reshape(-1), scales.reshape(-1).contiguous()


def _gptq(
    w: torch.Tensor, inverse: torch.Tensor, bits: int, group: int, dtype: torch.dtype, along_input: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes of ``w`` ``[out, in]`` (int64), their values (float64) and their scales, in the stored
    layout: ``[out, in/group]`` when groups run along the inputs, ``[in, out/group]`` when along
    the outputs (``out`` a multiple of ``group`` then)."""
    rows, cols = w.shape
    w = w.clone()
    q = torch.zeros_like(w)
    codes = torch.zeros(rows, cols, dtype=torch.int64)
    half = half_range(bits)
    scales = []
    step = None
    for start in range(0, cols, BLOCK):
        end = min(start + BLOCK, cols)
        block, errors = w[:, start:end].clone(), torch.zeros(rows, end - start, dtype=w.dtype)
        for j in range(end - start):
            column = block[:, j]
            if along_input and (start + j) % group == 0:
                _, s = quantize(block[:, j : j + group].float(), bits, group, None, dtype)
                scales.append(s)
                step = s.float().double().view(-1)
            elif not along_input:
                _, s = quantize(column.float().view(1, -1), bits, group, None, dtype)
                scales.append(s)
                step = s.float().double().view(-1).repeat_interleave(group)
            code = torch.round(column / step.masked_fill(step == 0, 1.0) + half).clamp(0, 2 * half)
            code = code.masked_fill(step == 0, int(half))  # an all-zero group: `quantize`'s code
            value = (code - half) * step
            codes[:, start + j], q[:, start + j] = code.to(torch.int64), value
            error = (column - value) / inverse[start + j, start + j]
            block[:, j + 1 :] -= error[:, None] * inverse[start + j, start + j + 1 : end][None, :]
            errors[:, j] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return codes, q, torch.cat(scales, 1 if along_input else 0)


def refit_outputs(delta: torch.Tensor, inputs_side: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The output-side factor ``A`` ``[out, r]`` minimising ``tr((A B̂ - Δ) H (A B̂ - Δ)ᵀ)`` for the
    quantised input-side factor ``B̂`` ``[r, in]`` (``delta`` as ``[out, in]``, ``h`` damped)."""
    b = inputs_side.double()
    gram = b @ h @ b.T
    gram.diagonal().add_(1e-9 * max(float(gram.diagonal().mean()), 1e-300))
    return torch.linalg.solve(gram, b @ h @ delta.double().T).T


def refit_lowrank(
    delta: torch.Tensor,
    encoding: QuantizedLowRankEncoding,
    stored: dict[str, torch.Tensor],
    factors: tuple[torch.Tensor, torch.Tensor],
    stats: ActivationStats | None,
) -> dict[str, torch.Tensor]:
    """``stored`` (``encoding`` of ``factors`` ``(u, v)`` of a 2-D ``delta``) with its output-side
    factor refitted by `refit_outputs` for the quantised input side, when that lowers the
    calibration output error; else ``stored`` unchanged."""
    if delta.dim() != 2 or stats is None or stats.kind != "linear":
        return stored
    u, v = factors
    shape = tuple(delta.shape)
    u_hat, v_hat = encoding.factors(stored, shape, "", torch.float64)
    axis = stats.input_axis
    exact = as_out_in(delta.double(), axis)
    h = hessian(stats, exact.shape[1])
    if h is None:
        return stored
    h = damped(h)
    refit = refit_outputs(exact, v_hat if axis == 1 else u_hat.T, h)
    if axis == 1:
        candidate = encoding.encode(delta, u=refit.float(), v=v)
    else:
        candidate = encoding.encode(delta, u=u, v=refit.T.float())

    def error(codes: dict[str, torch.Tensor]) -> float:
        a, b = encoding.factors(codes, shape, "", torch.float64)
        return output_error(as_out_in(a @ b, axis) - exact, h)

    return candidate if error(candidate) < error(stored) else stored
