"""Measurements that need the model itself, taken once on a few user texts.

A `Calibration` runs the fine-tuned model on the calibration texts and keeps:

* the reference logits, so the output error of any edited model is one forward pass away
  (`Calibration.output_mse`, also differentiable for BitDelta's scale distillation); for an
  encoder (no logits: its output is a hidden state) also its inner layers' hidden states, which
  a refinement fits as well (`layer_targets`);
* each linear layer's inputs (`ActivationStats`), from which DAREx-q's MSE-optimal rescale and
  the activation-aware importance ``|Δ_ij| * ||x_j||`` are computed per tensor;
* the gradient of the language-modelling loss at the fine-tune, for the first-order estimate of
  the loss change an edit causes, ``<∇L(θ_ft), θ̂ - θ_ft>`` (the "unified view" paper's Riemann
  sum with one term);
* each parameter's output sensitivity (`sensitivity.measure_sensitivity`, with
  `SENSITIVITY_PROBES` backward passes on the same texts): how much a unit of random error in
  that parameter moves what the model outputs, wherever in the network the parameter sits.

Unlike the data-free compressor, this holds the model (in float32, for measurement precision),
its gradient and the layer inputs in memory: calibration is for models that fit ~3x in RAM.
The layer inputs are capped at `MAX_ACTIVATION_ROWS` tokens per layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..io.progress import progress_bar
from ..methods.activations import ActivationStats
from .layer_targets import LAYER_TARGET_WEIGHT, LayerTargets
from .sensitivity import Sensitivities, measure_sensitivity, model_output

MAX_ACTIVATION_ROWS = 2048
"""Tokens of input kept per linear layer: enough for stable second moments, bounded memory."""

MAX_TEXT_TOKENS = 512
"""Each calibration text is truncated to this many tokens."""

MAX_TOTAL_TOKENS = 16384
"""Tokens over all calibration texts: the texts past this are not used. Calibration then costs a
bounded number of forward and backward passes whatever the user passes (measured: SmolLM-135M,
16 texts of 512 tokens, 2 busy cores, see benchmarks/RESULTS.md)."""


def _linear_axis(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return 1
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return 0
    return None


def tokenized(texts: Sequence[str], tokenizer: Any, max_tokens: int, max_total_tokens: int) -> list[torch.Tensor]:
    """Each text's ``input_ids`` (truncated to ``max_tokens``), until ``max_total_tokens`` in all."""
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise InvalidArgumentError(
            "calibration_texts must be a non-empty list of non-empty strings",
            expected="e.g. ['first text', 'second text']",
            found=repr(texts)[:100],
        )
    if tokenizer is None:
        raise InvalidArgumentError(
            "calibration texts need a tokenizer",
            expected="tokenizer=...",
            found="None",
            fix="pass tokenizer=, or put the tokenizer files next to the fine-tune",
        )
    batches: list[torch.Tensor] = []
    total = 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"]
        if ids.numel() and total + ids.numel() > max_total_tokens and batches:
            break
        if ids.numel():
            batches.append(ids)
            total += ids.numel()
    return batches


class Calibration:
    """The fine-tune measured on calibration texts.

    Args:
        model: the fine-tuned model (a private copy: the session moves it to the CPU in float32,
            turns off dropout, and `set_parameter` writes edited values into it).
        tokenizer: turns each text into ``input_ids``.
        texts: a few unlabelled texts, representative of what the fine-tune is for.
        parameters: names of the parameters to gather layer inputs for (default: all).
        sensitivity: also measure each parameter's output sensitivity (`SENSITIVITY_PROBES` more
            forward and backward passes over the texts).
        batches: token ids to run instead of texts (``[1, length]`` tensors; ``texts`` and
            ``tokenizer`` are then unused): `probe.DataFreeProbe` runs `probe.probe_batches`.

    Example:
        >>> session = Calibration(copy.deepcopy(ft), tokenizer, ["some text"])  # doctest: +SKIP
        >>> session.output_mse()                                               # doctest: +SKIP
        0.0
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        texts: Sequence[str],
        *,
        parameters: Iterable[str] | None = None,
        max_rows: int = MAX_ACTIVATION_ROWS,
        max_tokens: int = MAX_TEXT_TOKENS,
        max_total_tokens: int = MAX_TOTAL_TOKENS,
        sensitivity: bool = True,
        progress: bool = False,
        batches: Sequence[torch.Tensor] | None = None,
    ):
        self.model = model.to("cpu", torch.float32).eval()  # the compressor streams on the CPU
        self.model.requires_grad_(False)
        self.batches = (
            list(batches) if batches is not None else tokenized(texts, tokenizer, max_tokens, max_total_tokens)
        )
        self.progress = progress
        self.tokens = sum(int(ids.numel()) for ids in self.batches)
        self.params = dict(self.model.named_parameters())
        self.model_names: dict[str, str] = {}  # set by `renamed`
        self.activations: dict[str, ActivationStats] = {}
        wanted = set(self.params) if parameters is None else set(parameters)
        self.layer_targets = LayerTargets()
        self._call = 0  # the first of `_CALLS` the model takes
        self.reference, self.gradients, self.loss = self._measure(wanted, max_rows)
        self.sensitivities: dict[str, float] = {}
        if sensitivity:
            measured = {n: p for n, p in self.params.items() if n in wanted}
            self.sensitivities = measure_sensitivity(self.model, self.batches, measured, progress=progress)

    def _measure(self, wanted: set[str], max_rows: int):
        rows: dict[str, list[torch.Tensor]] = {}
        counts: dict[str, int] = {}
        hooks = []
        for module_name, module in self.model.named_modules():
            weight = f"{module_name}.weight" if module_name else "weight"
            if weight not in wanted or weight not in self.params:
                continue
            axis = _linear_axis(module)
            if axis is not None:
                rows[weight], counts[weight] = [], 0
                self.activations[weight] = ActivationStats("linear", input_axis=axis)
                hooks.append(module.register_forward_hook(self._recorder(weight, rows, counts, max_rows)))
            elif isinstance(module, nn.Embedding):
                self.activations[weight] = ActivationStats("elementwise")
        for name, param in self.params.items():
            if name in wanted and param.dim() == 1:
                self.activations[name] = ActivationStats("elementwise")

        for name, param in self.params.items():  # ∇L of the parameters asked about only
            param.requires_grad_(name in wanted)
        backward = any(name in wanted for name in self.params)
        reference, total_loss, with_loss = [], 0.0, True
        try:
            for ids in progress_bar(self.batches, desc="calibrating", unit="text", enabled=self.progress):
                output, labelled = self._run(ids)
                with_loss = with_loss and labelled
                reference.append(model_output(output).detach())
                self.layer_targets.keep(output)
                loss = getattr(output, "loss", None)
                if loss is None:
                    with_loss = False
                if with_loss:
                    if backward:
                        (loss * ids.numel() / self.tokens).backward()
                    total_loss += float(loss.detach()) * ids.numel() / self.tokens
        finally:
            for hook in hooks:
                hook.remove()
            for param in self.params.values():
                param.requires_grad_(False)
        gradients = None
        if with_loss:
            gradients = {n: p.grad for n, p in self.params.items() if p.grad is not None}
        for param in self.params.values():
            param.grad = None
        self.layer_targets.finish(reference)
        for weight, chunks in rows.items():
            self.activations[weight].inputs = torch.cat(chunks) if chunks else torch.zeros(0, self._fan_in(weight))
        return reference, gradients, (total_loss if with_loss else None)

    def measured_sensitivities(self) -> Sensitivities:
        """The output sensitivities measured on the calibration texts (empty if not asked for)."""
        return Sensitivities(self.sensitivities, "calibration texts", self.tokens)

    _CALLS = ((True, True), (True, False), (False, True), (False, False))
    """``(labels, hidden states)`` the reference pass asks of the model, in order (`_run`)."""

    def _run(self, ids: torch.Tensor) -> tuple[Any, bool]:
        """The model's output on ``ids`` with its loss and hidden states where it takes them (a
        model without a language-modelling loss, or a custom one, may take neither), and whether
        it took the labels. The next text starts from the call the model took."""
        failure: Exception | None = None
        for index in range(self._call, len(self._CALLS)):
            labels, hidden = self._CALLS[index]
            extra = {**({"labels": ids} if labels else {}), **({"output_hidden_states": True} if hidden else {})}
            try:
                output = self.model(input_ids=ids, **extra)
            except (TypeError, ValueError) as error:
                failure = error
                continue
            self._call = index
            return output, labels
        raise failure

    def _fan_in(self, weight: str) -> int:
        stats, shape = self.activations[weight], self.params[weight].shape
        return shape[1] if stats.input_axis == 1 else shape[0]

    @staticmethod
    def _recorder(weight: str, rows: dict, counts: dict, max_rows: int):
        def record(module, args, output):
            if counts[weight] >= max_rows or not args:
                return
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()[: max_rows - counts[weight]]
            rows[weight].append(x)
            counts[weight] += x.shape[0]

        return record

    def renamed(self, names: Mapping[str, str]) -> Calibration:
        """Key the session by the checkpoint's names (``{checkpoint name: model name}``, where
        transformers loads a key under another name: GPT-NeoX's ``embed_out`` is ``lm_head``), as
        the compressor names tensors; in place, returned."""
        self.model_names = dict(names)
        back = {model_name: name for name, model_name in names.items()}
        self.params = {back.get(n, n): p for n, p in self.params.items()}
        self.activations = {back.get(n, n): a for n, a in self.activations.items()}
        self.sensitivities = {back.get(n, n): s for n, s in self.sensitivities.items()}
        if self.gradients is not None:
            self.gradients = {back.get(n, n): g for n, g in self.gradients.items()}
        return self

    def parameter(self, name: str) -> torch.Tensor | None:
        """The session model's current value of ``name`` (float32), or None if it has none."""
        param = self.params.get(name)
        return None if param is None else param.detach()

    def set_parameter(self, name: str, value: torch.Tensor) -> bool:
        """Write an edited value into the session model (tied parameters follow); False if the
        model has no such parameter or another shape."""
        param = self.params.get(name)
        if param is None or tuple(param.shape) != tuple(value.shape):
            return False
        with torch.no_grad():
            param.copy_(value)
        return True

    def gradient(self, name: str) -> torch.Tensor | None:
        """``∇L`` at the fine-tune for ``name`` (None without a language-modelling loss)."""
        return None if self.gradients is None else self.gradients.get(name)

    def loss_change_estimate(self, name: str, change: torch.Tensor) -> float | None:
        """First-order loss change ``<∇L(θ_ft), change>`` of moving ``name`` by ``change``."""
        grad = self.gradient(name)
        if grad is None or grad.shape != change.shape:
            return None
        return float((grad.double() * change.double()).sum())

    def output_agreement(self) -> dict[str, float]:
        """How close the session model's outputs (as edited so far) are to the fine-tune's, in the
        unit users of that model read: ``output_kl``, the mean per-token KL divergence
        KL(fine-tune ‖ edited) in nats, for a model with logits; ``output_cosine``, the mean cosine
        similarity of mean-pooled last hidden states (a sentence embedding), for a bare encoder."""
        with_logits = getattr(self.model(input_ids=self.batches[0][:, :1]), "logits", None) is not None
        total, count = 0.0, 0
        with torch.no_grad():
            for ids, reference in zip(self.batches, self.reference):
                edited = model_output(self.model(input_ids=ids))
                if with_logits:
                    want, got = reference.log_softmax(-1).double(), edited.log_softmax(-1).double()
                    total += float((want.exp() * (want - got)).sum())
                    count += reference[..., 0].numel()
                else:
                    cosine = torch.nn.functional.cosine_similarity(reference.mean(-2), edited.mean(-2), dim=-1)
                    total += float(cosine.double().sum())
                    count += cosine.numel()
        if with_logits:  # a sum of non-negative terms, but rounding can leave -1e-17
            return {"output_kl": max(total / max(count, 1), 0.0)}
        return {"output_cosine": total / max(count, 1)}

    def output_loss(self) -> float | None:
        """The session model's (as edited so far) mean next-token loss on the calibration texts,
        weighted as ``loss`` is (the fine-tune's), or None for a model without a language-modelling
        loss: what a delta adds to the fine-tune's loss where it is meant to be used."""
        if self.loss is None:
            return None
        total = 0.0
        with torch.no_grad():
            for ids in self.batches:
                total += float(self.model(input_ids=ids, labels=ids).loss) * ids.numel() / self.tokens
        return total

    def text_lengths(self) -> list[int]:
        """Tokens of each calibration text kept (after truncation), in order."""
        return [int(ids.numel()) for ids in self.batches]

    def progress_steps(self, total: int, desc: str):
        """``range(total)`` behind a progress bar (with its time estimate) when the session shows one."""
        return progress_bar(range(total), desc=desc, unit="step", enabled=self.progress)

    def output_mse(
        self,
        deviation: Mapping[str, torch.Tensor] | None = None,
        *,
        grad: bool = False,
        texts: Sequence[int] | None = None,
    ):
        """Mean squared logit difference to the fine-tune over the calibration tokens (of the
        texts numbered ``texts``, default all), for the session model with ``deviation[name]``
        added to the named parameters.

        With ``grad=True`` the result is a 0-d tensor differentiable with respect to the
        deviations; otherwise a float.
        """
        return self._output_error(deviation, grad, texts, squared_error)

    def output_divergence(
        self,
        deviation: Mapping[str, torch.Tensor] | None = None,
        *,
        grad: bool = False,
        texts: Sequence[int] | None = None,
    ):
        """As `output_mse`, but for a model with logits over more than one class the mean per-token
        KL divergence KL(fine-tune ‖ edited) in nats (what a language model's loss sees; a logit
        error on a token it never predicts costs nothing), and the squared error per output
        value otherwise (a hidden state, a single regression output). With ``grad=True`` an
        encoder's inner layers' squared errors are added (`LAYER_TARGET_WEIGHT`)."""
        return self._output_error(deviation, grad, texts, divergence, layers=grad)

    def _output_error(self, deviation, grad: bool, texts: Sequence[int] | None, measure, layers: bool = False):
        from torch.func import functional_call

        overrides = {  # functional_call names the model's parameters as the model does
            self.model_names.get(name, name): self.params[name] + change for name, change in (deviation or {}).items()
        }
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        with torch.set_grad_enabled(grad):
            inner = layers and bool(self.layer_targets)
            for i in range(len(self.batches)) if texts is None else texts:
                ids, reference = self.batches[i], self.reference[i]
                kwargs = {"input_ids": ids, **({"output_hidden_states": True} if inner else {})}
                output = (
                    functional_call(self.model, overrides, args=(), kwargs=kwargs, strict=False)
                    if overrides
                    else self.model(**kwargs)
                )
                error, counted = measure(output, reference)
                if inner:
                    error = error + LAYER_TARGET_WEIGHT * self.layer_targets.error(output, i)
                total, count = total + error, count + counted
        mean = total / max(count, 1)
        return mean if grad else float(mean)


def squared_error(output: Any, reference: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed squared difference of the outputs to the reference, and how many values it sums."""
    return (model_output(output) - reference).double().square().sum(), reference.numel()


def divergence(output: Any, reference: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed per-token KL(reference ‖ output) over class logits, and the number of tokens; the
    squared error (`squared_error`) for outputs without class logits."""
    logits = getattr(output, "logits", None)
    if logits is None or logits.shape[-1] < 2:
        return squared_error(output, reference)
    want, got = reference.log_softmax(-1), logits.float().log_softmax(-1)  # float32: a vocabulary per token
    return (want.exp() * (want - got)).sum().double(), reference[..., 0].numel()


__all__ = ["Calibration", "MAX_ACTIVATION_ROWS", "MAX_TEXT_TOKENS"]
