"""``sign``: BitDelta, one sign bit per entry and a scale per tensor or per row.

``Δ̂ = s * sign(Δ)`` with ``s`` initialised to ``mean |Δ|`` over the tensor or over each row, the
L2-optimal scale for fixed signs. Per-row scales follow the rows' different magnitudes, which
fine-tuning produces; they are stored as 8-bit codes with a 16-bit scale per 64 rows (SPEC 1.7,
`DEFAULT_SCALE_BITS`; ``scale_bits=16`` stores them in float16 where every scale is a normal
float16 number, else float32, at 16 / cols bits per weight). A per-tensor scale is one float.

With calibration texts the scales can be fitted layer by layer (``layer_fit=True``): for fixed
signs, the per-row scales minimising the layer's output error on the cached inputs ``X`` have a
closed form, ``s_r = <Δ_r H, σ_r> / <σ_r H, σ_r>`` with ``H = XᵀX`` and ``σ_r`` the row's signs:
one small matrix product per layer instead of many forward and backward passes through the model
(BitDelta's end-to-end distillation took over 20 minutes on a 22 M-parameter encoder on 2 cores;
the layer fit takes seconds). They can also be distilled as BitDelta does: the signs stay fixed
and a few Adam steps minimise the logit MSE between the edited model and the fine-tune. Adam runs on
relative corrections (``s = s_init * (1 + r)``, ``r`` starting at 0), so one learning rate suits
every model whatever its delta magnitudes, and the scales with the lowest calibration MSE seen
are kept: distillation never makes the calibration error worse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..core.encodings import SignEncoding
from ..core.quant import scale_dtype
from ..errors import InvalidArgumentError
from .base import Edit, EditMethod, TensorContext, TensorStream, check_positive, param

if TYPE_CHECKING:
    from .activations import ActivationStats, CalibrationSession

GRANULARITIES = ("tensor", "row")


def parse_bool(text: str) -> bool:
    """``true``/``false`` (any case) from the command line."""
    if text.lower() not in ("true", "false"):
        raise ValueError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


@dataclass
class SignMethod(EditMethod, name="sign"):
    """BitDelta: sign bits with a per-tensor or per-row scale (``mean |Δ|``, optionally distilled).

    Vectors get a per-tensor scale even with ``scale="row"`` (a row of a vector is one entry).

    Example:
        >>> delta = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
        >>> edit = SignMethod(scale="row").edit("w", delta, TensorContext("w"))
        >>> edit.encoding.decode(edit.stored, (2, 2), "w", torch.float32).tolist()
        [[2.0, -2.0], [0.5, 0.5]]
    """

    summary: ClassVar[str] = "BitDelta"
    tags: ClassVar[tuple[str, ...]] = ("bitdelta",)
    scale: str = param("tensor", help="sign scale per tensor or per row", choices=GRANULARITIES)
    scale_bits: int | None = param(
        None,
        parse=int,
        help="bits per row scale: 2-8 codes with a 16-bit scale per 64 rows (spec 1.7), 16 floats; "
        "default 8 for per-row scales",
    )
    distill_steps: int = param(0, help="Adam steps distilling the sign scales on the calibration texts")
    distill_lr: float = param(0.02, help="Adam learning rate of the scale distillation (relative corrections)")
    layer_fit: bool = param(
        False,
        parse=parse_bool,
        help="fit each row's sign scale to the layer's outputs on the calibration texts (closed form)",
        metavar="true|false",
    )
    _scales: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.scale not in GRANULARITIES:
            raise InvalidArgumentError(
                "sign: unknown scale granularity", expected=GRANULARITIES, found=repr(self.scale)
            )
        if isinstance(self.distill_steps, bool) or not isinstance(self.distill_steps, int) or self.distill_steps < 0:
            raise InvalidArgumentError(
                "sign: distill_steps must be an integer >= 0", expected=">= 0", found=repr(self.distill_steps)
            )
        self.distill_lr = check_positive(self.name, "distill_lr", self.distill_lr)
        if self.scale_bits is None:  # defaults that count bits: a row's scale in 8, not 16
            self.scale_bits = DEFAULT_SCALE_BITS if self.scale == "row" else 16
        bits = self.scale_bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not (2 <= bits <= 8 or bits == 16):
            raise InvalidArgumentError(
                "sign: scale_bits must be 2 to 8, or 16", expected="e.g. 8", found=repr(bits), fix="pass scale_bits=8"
            )
        if bits < 16 and self.scale != "row":
            raise InvalidArgumentError(
                "sign: scale_bits codes per-row scales",
                expected="scale='row' with scale_bits below 16",
                found=f"scale={self.scale!r}",
                fix="pass scale='row', or leave scale_bits at 16",
            )

    def encoding_for(self, delta: torch.Tensor) -> SignEncoding:
        if delta.dim() < 2:
            return SignEncoding("tensor")
        if self.scale_bits < 16:
            return SignEncoding(self.scale, self.scale_bits, SCALE_GROUP)
        return SignEncoding(self.scale)

    def needs_calibration(self) -> bool:
        return self.distill_steps > 0 or self.layer_fit

    def prepare(self, tensors: TensorStream, calibration: CalibrationSession) -> dict[str, Any]:
        if not self.distill_steps:
            return {}
        fixed = {}
        for name, delta, context in tensors():
            if calibration.parameter(name) is None:
                continue
            encoding = self.encoding_for(delta)
            broadcast = (-1,) + (1,) * (delta.dim() - 1) if encoding.granularity == "row" else ()
            signs = torch.where(delta >= 0, 1.0, -1.0).to(torch.int8)
            fixed[name] = (encoding.initial_scale(delta), broadcast, signs, delta.float(), context.alpha)
        corrections = {name: torch.zeros_like(init, requires_grad=True) for name, (init, *_) in fixed.items()}

        def scales() -> dict[str, torch.Tensor]:
            return {name: init * (1 + corrections[name]) for name, (init, *_) in fixed.items()}

        def deviation(current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {
                name: alpha * current[name].view(broadcast) * signs - delta
                for name, (_, broadcast, signs, delta, alpha) in fixed.items()
            }

        optimizer = torch.optim.Adam(corrections.values(), lr=self.distill_lr)
        history = []
        best = (float("inf"), None)
        for _ in range(self.distill_steps + 1):
            current = scales()
            loss = calibration.output_mse(deviation(current), grad=True)
            history.append(float(loss.detach()))
            if history[-1] < best[0]:
                best = (history[-1], {n: s.detach().clone() for n, s in current.items()})
            if len(history) > self.distill_steps:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self._scales = best[1] or {}
        return {
            "distill_steps": self.distill_steps,
            "output_mse_initial": history[0],
            "output_mse_distilled": best[0],
            "tensors": len(fixed),
        }

    def edit(self, name: str, delta: torch.Tensor, context: TensorContext) -> Edit:
        encoding = self.encoding_for(delta)
        distilled = self._scales.get(name)
        fitted = layer_fit_scale(delta, context.activations) if self.layer_fit and distilled is None else None
        scale = distilled if distilled is not None else fitted if fitted is not None else encoding.initial_scale(delta)
        stored = encoding.encode(delta, dtype=scale_dtype(scale), scale=scale)
        source = "distilled" if distilled is not None else "layer fit" if fitted is not None else "mean |delta|"
        stats: dict[str, Any] = {"scale_source": source}
        if encoding.granularity != self.scale:
            stats["scale"] = encoding.granularity
        return Edit(encoding, stored, stats)


SCALE_GROUP = 64
"""Row scales per 16-bit group scale when they are stored as codes (``scale_bits``)."""
DEFAULT_SCALE_BITS = 8
"""Per-row scales as 8-bit codes unless asked otherwise: a float16 scale per row cost 4 % of a sign
delta at 384 columns, the codes half that, at the same fidelity (MiniLM, SmolLM2-135M and the
tiny Llama within ±0.02 points; benchmarks/RESULTS.md, "Sign scales as codes")."""


def layer_fit_scale(delta: torch.Tensor, activations: ActivationStats | None) -> torch.Tensor | None:
    """Per-row scales minimising ``||X (s ⊙ sign(Δ) - Δ)ᵀ||²`` on the layer's calibration inputs
    (None for parameters that are not a linear layer's weight, or rows without signal)."""
    if activations is None or activations.kind != "linear" or not len(activations.inputs) or delta.dim() < 2:
        return None
    if activations.input_axis != 1:
        return None  # a Conv1D's rows meet the inputs: its per-row scales are per input feature
    matrix = activations._as_out_in(delta).double()
    x = activations.inputs.double()
    gram = x.T @ x
    signs = torch.where(matrix >= 0, 1.0, -1.0).double()
    numerator = ((matrix @ gram) * signs).sum(1)
    denominator = ((signs @ gram) * signs).sum(1)
    scale = torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300), matrix.abs().mean(1))
    return scale.float()
