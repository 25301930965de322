"""The model's output sensitivity to each parameter: the trace of the Fisher information of its
output per element, how much a unit of random error in that parameter moves what the model
outputs, wherever in the network the parameter sits. The ``budget`` weighs each tensor's error
by it (`delta_format.methods.priors.SENSITIVITY_POWER`).

It is measured on the calibration texts when there are any (`calibration.Calibration`), else on
`random_tokens`: a model's relative sensitivities barely depend on what it reads
(benchmarks/RESULTS.md, "Output sensitivity"), so no user data is needed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..io.progress import progress_bar
from .sources import CheckpointSource, TensorSource

logger = logging.getLogger(__name__)

SENSITIVITY_MODES = ("auto", "on", "off")
"""`compress`'s ``sensitivity=``: measure the model's output sensitivity for the methods that read
it (the ``budget``) where it can be run (auto), always (on), or never (off)."""

SENSITIVITY_MAX_PARAMS = 1_000_000_000
"""Largest fine-tune whose output sensitivity ``sensitivity="auto"`` measures on random tokens:
measuring holds the model and its gradient in float32 (8 bytes a parameter) and runs
`SENSITIVITY_PROBES` x `PROBE_SEQUENCES` forward and backward passes
(SmolLM2-135M on 2 CPU cores: ~30 s; a 943M-parameter Llama: 169 s of a 416 s ``bits=0.5``
compression, peak RSS 8.8 GB; benchmarks/RESULTS.md, "Output sensitivity")."""


PROBE_SEQUENCES = 16
"""Sequences of random tokens the output sensitivity is measured on without calibration texts."""

PROBE_LENGTH = 128
"""Tokens in each of them (or half the model's positions, if fewer: `probe_length`)."""

SENSITIVITY_PROBES = 2
"""Backward passes per text for the output sensitivities. One pass estimates a large matrix's
Fisher trace within ~16 % (relative standard deviation measured on SmolLM2-135M, 16 texts; a
norm's few elements within ~100 %); the budget takes its square root (`priors.SENSITIVITY_POWER`),
so two passes leave ~6 % of noise on a matrix's weight."""


def model_output(output: Any) -> torch.Tensor:
    """What a model outputs, as float32: its logits, else its last hidden state."""
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state
    return logits.float()


def _probe(output: Any, generator: torch.Generator) -> torch.Tensor:
    """A scalar whose gradient's expected square is the Fisher information of the model's output:
    for a model with class or token logits, the log-probability of labels drawn from its own
    prediction (the Fisher of its output distribution: KL(fine-tune ‖ edited) ≈ ½ δᵀFδ); for an
    encoder (hidden states, or a single regression output), a random Gaussian projection of its
    mean-pooled, normalised output (the Fisher of the cosine its embeddings are compared by)."""
    logits = getattr(output, "logits", None)
    if logits is not None and logits.shape[-1] > 1:
        flat = logits.float().reshape(-1, logits.shape[-1])
        logp = flat.log_softmax(-1)
        with torch.no_grad():
            labels = torch.multinomial(logp.exp(), 1, generator=generator)
        return logp.gather(-1, labels).sum()
    values = model_output(output)
    pooled = values.mean(-2) if values.dim() >= 3 else values
    if pooled.shape[-1] > 1:  # the direction of an embedding; a single regression output as it is
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return (pooled * torch.randn(pooled.shape, generator=generator)).sum()


def measure_sensitivity(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    params: Mapping[str, nn.Parameter],
    *,
    probes: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Each named parameter's output sensitivity: ``E ||∂probe/∂θ||²`` per element (`_probe`),
    summed over the batches (each batch's gradient squared on its own: no cross terms between
    texts), averaged over ``probes`` (default `SENSITIVITY_PROBES`) draws of the probe's labels or
    projection. Deterministic (a fixed-seed generator); the model is left as it was, without
    gradients."""
    probes = SENSITIVITY_PROBES if probes is None else probes
    generator = torch.Generator().manual_seed(0)
    totals = dict.fromkeys(params, 0.0)
    passes = [ids for _ in range(probes) for ids in batches]
    every = list(model.parameters())
    # an encoder-decoder (T5, BART) reads the sequence on both sides: its decoder's parameters too
    both_sides = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    for param in every:
        param.requires_grad_(True)
    try:
        for ids in progress_bar(passes, desc="measuring sensitivity", unit="pass", enabled=progress):
            output = model(input_ids=ids, decoder_input_ids=ids) if both_sides else model(input_ids=ids)
            _probe(output, generator).backward()
            for name, param in params.items():
                if param.grad is not None:
                    totals[name] += squared_sum(param.grad)
            for param in every:
                if param.grad is not None:  # zeroed, not freed: the next pass reuses the memory
                    param.grad.zero_()
    finally:
        for param in every:
            param.requires_grad_(False)
            param.grad = None
    return {name: totals[name] / max(probes, 1) / max(params[name].numel(), 1) for name in params}


SQUARED_SUM_BLOCK = 1 << 18
"""Elements per float64 block of `squared_sum` (2 MiB: the block stays in cache)."""


def squared_sum(tensor: torch.Tensor) -> float:
    """``Σ x²`` accumulated in float64, a block at a time as a dot product: 20x faster than
    converting the whole tensor to float64 and squaring it (SmolLM2-135M's gradient: 0.55 s a pass),
    and no full-size float64 temporary (8 bytes a parameter)."""
    flat = tensor.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), SQUARED_SUM_BLOCK):
        block = flat[start : start + SQUARED_SUM_BLOCK].double()
        total += torch.dot(block, block)
    return float(total)


@dataclass
class Sensitivities:
    """Output sensitivities by checkpoint name (`measure_sensitivity`) and what they were measured
    on, for the manifest (``stats.sensitivity``)."""

    values: dict[str, float]
    measured_on: str
    """``"calibration texts"``, ``"random tokens"``, or ``"nothing (why)"`` (then ``values`` is empty)."""
    tokens: int

    def stats(self) -> dict[str, Any]:
        if not self.values:
            return {"measured_on": self.measured_on, "tokens": 0}
        return {"measured_on": self.measured_on, "tokens": self.tokens, "probes": SENSITIVITY_PROBES}


def probe_length(model: nn.Module) -> int:
    """`PROBE_LENGTH`, or half the model's positions if fewer (some models start their positions
    past a padding offset: RoBERTa's at 2)."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(PROBE_LENGTH, positions // 2) if isinstance(positions, int) and positions > 1 else PROBE_LENGTH


def random_tokens(model: nn.Module, count: int = PROBE_SEQUENCES) -> list[torch.Tensor]:
    """``count`` sequences of token ids drawn uniformly from the model's input vocabulary (fixed
    seed), each `probe_length` long: what the output sensitivity is measured on without
    calibration texts. A model's relative sensitivities barely depend on what it reads
    (benchmarks/RESULTS.md, "Output sensitivity": the budget's plans from random tokens keep as
    much as from real text, on an encoder and a causal LM; measuring them on the built-in text of
    `probe_texts` instead moved MiniLM by 0.0001 and SmolLM2-135M by -0.4 to +0.02 points)."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, probe_length(model)), generator=generator) for _ in range(count)]


def check_mode(mode: object) -> str:
    """``mode`` if it is one of `SENSITIVITY_MODES`, else an `InvalidArgumentError`."""
    if not isinstance(mode, str) or mode not in SENSITIVITY_MODES:
        raise InvalidArgumentError(
            f"sensitivity is {mode!r}",
            expected=f"one of {list(SENSITIVITY_MODES)}",
            found=repr(mode),
            fix="pass sensitivity='auto' (measured where the model can be run), 'on' or 'off'",
        )
    return mode


def sensitivities_for(
    finetune: TensorSource, edited: list[str], calibrated: Sensitivities | None, mode: str, progress: bool = False
) -> Sensitivities | None:
    """The output sensitivities of the ``edited`` parameters: None with ``mode="off"``; those
    measured on the calibration texts (``calibrated``) if any; else measured on `random_tokens`:
    always with ``"on"``, with ``"auto"`` where the fine-tune has at most `SENSITIVITY_MAX_PARAMS`
    parameters and transformers can run it (else none, said in the log and in
    `Sensitivities.measured_on`).
    Measuring holds the model in float32 and its gradient."""
    if mode == "off":
        return None
    if calibrated is not None:
        return calibrated
    numel = sum(math.prod(finetune.info(n)[0]) for n in finetune.names())
    if mode == "auto" and numel > SENSITIVITY_MAX_PARAMS:
        why = f"{numel:,} parameters, more than the {SENSITIVITY_MAX_PARAMS:,} measured by default"
        logger.info("output sensitivity not measured (%s): pass sensitivity='on' to measure it", why)
        return Sensitivities({}, f"nothing ({why})", 0)
    try:
        model = finetune.load_model().to("cpu", torch.float32).eval()
        names = finetune.model_names(model) if isinstance(finetune, CheckpointSource) else {}
        wanted = {names.get(n, n): n for n in edited}
        params = {wanted[n]: p for n, p in model.named_parameters() if n in wanted}
        batches = random_tokens(model)
        values = measure_sensitivity(model, batches, params, progress=progress)
    # a model transformers cannot load or run on token ids (remote code, no config, no token
    # input such as ViT's): DeltaFormatError is a ValueError
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as error:
        if mode == "on":
            raise InvalidArgumentError(
                "the output sensitivity could not be measured: transformers could not run the fine-tune",
                expected="a fine-tune transformers loads and runs on token ids",
                found=f"{type(error).__name__}: {error}",
                fix="pass sensitivity='off' (the weight error alone), or calibration_texts=",
            ) from error
        why = f"the model could not be run: {type(error).__name__}"
        logger.warning("output sensitivity not measured (%s: %s); the budget weighs the weight error", why, error)
        return Sensitivities({}, f"nothing ({why})", 0)
    return Sensitivities(values, "random tokens", sum(int(ids.numel()) for ids in batches))
