"""``budget``: a size instead of a method. ``compress(base, ft, out, bits=0.5)`` chooses, tensor by
tensor, the encoding and its parameters that minimise the measured error for the total size.

One method and one rate for every tensor wastes bits: a fine-tune's tensors differ (embedding
tables move little per token, norms and biases are tiny, attention and MLP matrices have different
spectra). The method first streams every tensor once, builds its menu of options with their sizes
and errors (`delta_format.methods.allocation`), allocates the budget across all of them
(Lagrangian rate-distortion, the standard remedy in codec design), then edits each tensor as
chosen: nothing (the base's value), float16, ``dense-q``, ``sign``, ``sparse-q`` (DARE's seeded
mask with 2-, 4- or 8-bit values), ``rows-q`` (an input embedding's top rows,
`delta_format.methods.rows`), ``lowrank-q`` with a bit width per singular vector
(Delta-CoMe's bands, chosen by data), or the hybrid of `delta_format.methods.hybrid` (a few
singular directions plus DARE of the rest, one ``sum`` entry).

Errors are weight errors ``||Δ̂ - Δ||²`` (data-free), with priors measured on real pairs:
vocabulary-sized lookup tables (embeddings, a language model's head) weigh `LOOKUP_WEIGHT` of a
linear layer and get no DARE (their rows feed every token's logits through a tied head: noise
there cost more than dropping the table's delta), biases weigh `BIAS_WEIGHT` (an error added
unchanged to every token); DARE's sampling noise weighs `noise_price` of
a coherent error (small where the delta is small beside its base, as in a causal LM's
fine-tune; nothing gained where it is not, as in a heavily trained encoder), per element
weighted by its column's share of the delta (`column_weights`), and the rounding of DARE's kept
values is priced in full only along the values (`allocation.rounding_error`). Until spec 1.3
the hybrid plan was kept to budgets up to 0.25 bit per weight, because above it the bfloat16
cast rounded its low-rank parts away; with stochastic rounding (SPEC §9.1) it is the better
plan at every budget measured (SmolLM2-135M at 0.5 / 1 bit: 98.9 / 99.7 % of the fine-tune's
gain against 97.5 / 99.2 %; MiniLM and the tiny Llama unchanged; benchmarks/RESULTS.md). Where
the model's output sensitivity was measured (`TensorContext.sensitivity`, the Fisher trace per
element of its output, on the calibration texts or, without them, on random tokens; the
default), each parameter's weight is instead its sensitivity over that of the typical matrix
(geometric mean), to the power `SENSITIVITY_POWER`: where in the network an error lands, not
only how large it is, decides what it costs (SmolLM2-135M: layer 0's value matrix 78x the
typical matrix, its query 0.02x; an attention key's bias, which the softmax cancels, ~0).
Vocabulary-sized lookup tables keep their prior; with calibration texts but no sensitivity
(``sensitivity="off"``), a linear layer's input energy to the power `ENERGY_POWER` stands in.
With calibration texts the chosen ``dense-q`` and ``lowrank-q`` codes of a linear layer are
fitted to its outputs on those texts instead of its weights (`delta_format.methods.feedback`:
GPTQ, a weighted refit; an entry's ``stats.feedback`` says which), and at budgets up to
`refine.REFINE_MAX_BITS` the chosen ``lowrank-q`` factors of the matrices are then refined on the
whole model's outputs (`delta_format.methods.refine`; ``refine_steps``; ``stats.feedback``
``"refined"``, the manifest's ``stats.prepare.budget.refined`` what it did); without calibration
texts the factors are refined on a built-in text read by the fine-tune's tokenizer
(`delta_format.compression.probe`; an encoder without one on random token ids). The manifest's
``stats.prepare.budget`` records the plan (bits planned, the price per bit, how many tensors
chose what, the dropped ones), and each entry's stats its choice.

The budget counts every stored byte of the edited parameters (codes, scales, factors, an upper
bound on each stored tensor's safetensors header entry and on the file's fixed header): the size
of the delta's tensor files divided by the number of parameters the delta edits is at most
``bits`` (a delta sharded into several files adds ~50 bytes a file).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..core.encodings import (
    DenseEncoding,
    QuantizedDenseEncoding,
    QuantizedLowRankEncoding,
    QuantizedRowsEncoding,
    SignEncoding,
)
from ..errors import InvalidArgumentError
from .allocation import (
    FILE_BITS,
    GROUP,
    Menu,
    Option,
    allocate,
    menu_for,
    menu_rank,
    truncated_svd,
    weighted,
)
from .base import Edit, EditMethod, TensorContext, TensorStream, check_positive, param
from .feedback import dense_codes, refit_lowrank
from .hybrid import dare_q, hybrid_encode, hybrid_options
from .priors import (
    BIAS_WEIGHT,
    ENERGY_POWER,
    INPUT_LOOKUP_WEIGHT,
    LOOKUP_WEIGHT,
    SENSITIVITY_POWER,
    column_weights,
    error_weight,
    noise_price,
    sensitivity_weights,
)
from .refine import REFINE_LR, REFINE_MAX_BITS, REFINE_STEPS, Factors, auto_steps, refine_factors
from .rows import rows_options, top_rows
from .sign import DEFAULT_SCALE_BITS, SCALE_GROUP

if TYPE_CHECKING:
    from .activations import ActivationStats, CalibrationSession


def input_energy(activations: ActivationStats | None) -> float | None:
    """Mean squared input per feature of a linear layer on the calibration tokens (None for other
    parameters or without calibration): the factor by which a weight error of that layer becomes
    an output error, for inputs without a preferred direction."""
    if activations is None or activations.kind != "linear" or not len(activations.inputs):
        return None
    return float(activations.inputs.double().square().mean())


@dataclass
class BudgetMethod(EditMethod, name="budget"):
    """Per-tensor encodings chosen to minimise the error at ``bits`` per weight.

    Example:
        >>> import delta_format
        >>> delta_format.compress("base", "ft", "out", bits=0.5)  # doctest: +SKIP
    """

    summary: ClassVar[str] = "a size in bits per weight; the encoding of each tensor chosen for it"
    tags: ClassVar[tuple[str, ...]] = ("budget", "low-rank", "quantized")
    uses_seed: ClassVar[bool] = True
    plans_whole_model: ClassVar[bool] = True
    uses_sensitivity: ClassVar[bool] = True
    fits_outputs_data_free: ClassVar[bool] = True
    bits: float = param(1.0, help="size of the delta in bits per edited weight (budget)")
    noise_weight: float | str | None = param(
        "auto",
        parse=lambda text: text if text in ("auto", "off") else float(text),
        help="price of DARE's sampling noise beside a coherent error: 'auto' (from each delta's size "
        "relative to its base), a number in (0, 1], or 'off' (DARE not offered)",
    )
    refine_steps: int | str = param(
        "auto",
        parse=lambda text: text if text == "auto" else int(text),
        help="Adam steps refining the low-rank factors on the model's outputs (on the calibration texts, else "
        "a built-in text) "
        f"('auto': up to {REFINE_STEPS} at budgets up to {REFINE_MAX_BITS:g} bit, fewer for larger models; 0: off)",
    )
    refine_lr: float = param(REFINE_LR, help="Adam step of the refinement, relative to each factor's size")
    _choices: dict[str, Option] = field(default_factory=dict, init=False, repr=False)
    _refined: dict[str, Factors] = field(default_factory=dict, init=False, repr=False)
    _edits: dict[str, Edit] = field(default_factory=dict, init=False, repr=False)
    """The edits `_refine` already made, handed out once by `edit` instead of made again."""

    def __post_init__(self):
        self.bits = check_positive(self.name, "bits", self.bits)
        if self.noise_weight is None:
            self.noise_weight = "off"
        if self.noise_weight not in ("auto", "off"):
            if isinstance(self.noise_weight, (str, bool)) or not 0 < self.noise_weight <= 1:
                raise InvalidArgumentError(
                    f"budget's noise_weight is {self.noise_weight!r}",
                    expected="'auto', 'off' or a number in (0, 1]",
                    found=repr(self.noise_weight),
                    fix="pass noise_weight='auto' (the default), 'off', or e.g. 0.05",
                )
        steps = self.refine_steps
        if steps != "auto" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise InvalidArgumentError(
                "budget: refine_steps must be an integer >= 0 or 'auto'",
                expected="'auto' (as many as `refine.REFINE_COMPUTE` allows), 0 (off) or a number of steps",
                found=repr(steps),
            )
        self.refine_lr = check_positive(self.name, "refine_lr", self.refine_lr)

    def prepare(self, tensors: TensorStream, calibration: CalibrationSession | None) -> dict[str, Any]:
        menus: list[Menu] = []
        energies: dict[str, float] = {}
        sensitivities: dict[str, float] = {}
        matrices: set[str] = set()  # the typical tensors sensitivities are relative to
        priors: dict[str, float] = {}
        fixed = 0
        self._refined, self._edits = {}, {}
        body = 0  # parameters outside the lookup tables: what a refinement step costs
        tables: set[str] = set()
        for name, delta, context in tensors():
            fixed += context.fixed_bits
            if context.lookup or context.head:
                tables.add(name)
            else:
                body += delta.numel()
            weight = error_weight(name, delta, context.lookup, context.head)
            priors[name] = weight
            noise = noise_price(delta, context.base) if self.noise_weight == "auto" else self.noise_weight
            noise = None if noise == "off" or weight < 1 else noise  # no DARE on lookup tables
            masks: dict[float, torch.Tensor] = {}
            columns = column_weights(delta)
            menu, svd = menu_for(
                name,
                delta,
                weight=weight,
                seed=context.seed,
                noise_weight=noise,
                masks=masks,
                columns=columns,
                split_rounding=True,
            )
            if weight < 1 and not context.head:  # an input embedding: the rows its fine-tune moved
                menu.options.extend(weighted(option, weight) for option in rows_options(delta, menu.header))
            if noise is not None and svd is not None:  # top singular directions + DARE on the rest
                for option in hybrid_options(name, delta, svd, context.seed, noise, masks, columns):
                    menu.options.append(weighted(option, weight))
            menus.append(menu)
            energy = input_energy(context.activations)
            if energy is not None and energy > 0:
                energies[name] = energy
            if context.sensitivity is not None and weight >= 1:  # lookup tables keep their prior
                sensitivities[name] = context.sensitivity
                if delta.dim() >= 2 and not context.lookup:
                    matrices.add(name)
        weights = sensitivity_weights(sensitivities, matrices)
        if weights:  # the measured sensitivity replaces the prior (and the input energy it includes)
            for menu in menus:
                if menu.name in weights:
                    menu.scale(weights[menu.name] / priors[menu.name])
        elif energies:  # relative to the typical linear layer: the other tensors keep their data-free weights
            typical = math.exp(sum(math.log(e) for e in energies.values()) / len(energies))
            for menu in menus:
                if menu.name in energies:
                    menu.scale((energies[menu.name] / typical) ** ENERGY_POWER)
        numel = sum(m.numel for m in menus)
        self._choices, price = allocate(menus, max(self.bits * numel - FILE_BITS - fixed, 0.0))
        planned = sum(o.bits for o in self._choices.values())
        families = Counter(o.label.split(" ")[0] for o in self._choices.values())
        refinable = {
            n for n, o in self._choices.items() if o.spec[0] == "lowrank-q"
        } - tables  # few table rows are read
        steps = self.refine_steps
        if steps == "auto":
            held = sum(m.numel for m in menus if m.name in refinable)
            steps = auto_steps(body, held) if self.bits <= REFINE_MAX_BITS else 0
        refined = None
        if calibration is not None and refinable and steps:
            refined = self._refine(tensors, calibration, refinable, steps)
        return {
            "bits_per_weight_target": self.bits,
            "bits_per_weight_planned": planned / numel if numel else 0.0,
            "price_per_bit": price,
            "weighting": self._weighting(bool(weights), bool(energies)),
            "noise_weight": self.noise_weight,
            "choices": dict(sorted(families.items())),
            "dropped": sorted(name for name, o in self._choices.items() if o.spec[0] == "drop"),
            **({"refined": refined} if refined else {}),
        }

    def _refine(
        self, tensors: TensorStream, calibration: CalibrationSession, refinable: set[str], steps: int
    ) -> dict[str, Any] | None:
        """Put every planned edit but the low-rank ones into the calibration model as it will be
        stored, then refine the low-rank factors on its outputs (`delta_format.methods.refine`)."""
        factors: dict[str, Factors] = {}
        for name, delta, context in tensors():
            if calibration.parameter(name) is None:
                continue
            option = self._choices[name]
            if name in refinable:
                order, bands = torch.tensor(option.spec[1]), option.spec[2]
                u, s, vh = truncated_svd(delta, menu_rank(delta))
                encoding = QuantizedLowRankEncoding([list(b) for b in bands], GROUP)
                factors[name] = Factors.from_svd(encoding, u[:, order], s[order], vh[order], delta, context.alpha)
                continue
            edit = self._edits[name] = self.edit(name, delta, context)
            change = torch.zeros_like(delta) if edit.dropped else edit.decode(tuple(delta.shape), name, torch.float32)
            calibration.set_parameter(name, calibration.parameter(name) + context.alpha * change - delta.float())
        if not factors:
            return None
        found = refine_factors(calibration, factors, steps, self.refine_lr, seed=0)
        found["on"] = getattr(calibration, "source", "calibration texts")
        self._refined = factors
        return found

    @staticmethod
    def _weighting(sensitivity: bool, energy: bool) -> str:
        lookups = f"vocabulary-sized lookup tables x{LOOKUP_WEIGHT:g} (input-only x{INPUT_LOOKUP_WEIGHT:g})"
        if sensitivity:
            return f"output sensitivity^{SENSITIVITY_POWER:g} relative to the typical matrix; {lookups}"
        measure = f"input energy^{ENERGY_POWER:g} relative to the typical linear layer" if energy else "weight error"
        return f"{measure}; {lookups}; biases x{BIAS_WEIGHT:g}"

    def edit(self, name: str, delta: torch.Tensor, context: TensorContext) -> Edit:
        option = self._choices.get(name)
        if option is None:
            raise InvalidArgumentError(
                f"budget has no plan for {name!r}",
                expected="prepare() to have seen every tensor the method edits",
                found="a tensor it did not see",
                fix="compress with compress(..., bits=...), which plans before editing",
            )
        made = self._edits.pop(name, None)
        if made is not None:
            return made
        stats = {"choice": option.label, "planned_bits": option.bits}
        kind = option.spec[0]
        if kind == "drop":
            return Edit.nothing(stats)
        if kind == "dense":
            encoding = DenseEncoding()
            return Edit(encoding, encoding.encode(delta, dtype=option.spec[1]), stats)
        if kind == "dense-q":
            encoding = QuantizedDenseEncoding(option.spec[1], GROUP)
            codes = dense_codes(delta, context.activations, option.spec[1], GROUP) if context.activations else None
            if codes is not None:
                stats["feedback"] = "gptq"
            return Edit(encoding, encoding.encode(delta, quantized=codes), stats)
        if kind == "rows-q":
            encoding = QuantizedRowsEncoding(option.spec[2], GROUP, option.spec[1])
            rows = top_rows(delta)[0][: option.spec[1]]
            return Edit(encoding, encoding.encode(delta, rows=rows), stats)
        if kind == "sign":
            encoding = SignEncoding("row", DEFAULT_SCALE_BITS, SCALE_GROUP)
            return Edit(encoding, encoding.encode(delta), stats)
        if kind == "sparse-q":
            return Edit(*dare_q(name, delta, context.seed, *option.spec[1:]), stats)
        refined = self._refined.get(name)
        if refined is not None:
            stored = refined.encoding.encode(delta, u=refined.a, v=refined.b)
            return Edit(refined.encoding, stored, {**stats, "feedback": "refined"})
        u, s, vh = truncated_svd(delta, menu_rank(delta))  # the vectors prepare() measured
        if kind == "sum":
            return Edit(*hybrid_encode(name, delta, (u, s, vh), context.seed, *option.spec[1:]), stats)
        order, bands = option.spec[1], option.spec[2]
        index = torch.tensor(order)
        encoding = QuantizedLowRankEncoding([list(b) for b in bands], GROUP)
        factors = ((u * s)[:, index], vh[index])
        stored = encoding.encode(delta, u=factors[0], v=factors[1])
        if context.activations is not None:
            refitted = refit_lowrank(delta, encoding, stored, factors, context.activations)
            if refitted is not stored:
                stats["feedback"] = "refit"
            stored = refitted
        return Edit(encoding, stored, stats)
