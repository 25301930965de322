"""The streaming compressor: a base and a fine-tune in, a delta directory out, one tensor at a time.

`compress` opens the two models as tensor sources (`delta_format.compression.sources`: local
directories or Hub repos through `resolve_repo`, in-memory models, a LoRA adapter), decides what
happens to each tensor (`delta_format.compression.plan`), and for each parameter of the fine-tune:

1. skips it if ``include``/``exclude`` say so, or if it equals the base bit for bit;
2. stores it whole (``replace``) if the base lacks it or has another shape (added tokens, a
   resized vocabulary, a new head);
3. otherwise hands ``Δ = ft - base`` (float32; float64 for float64 parameters) to the edit
   method its name selects (``rules``, first match wins; ``method`` otherwise), measures what
   was stored by decoding it (`delta_format.compression.measure`: relative error, bytes,
   compression ratio; with calibration texts also the first-order loss change), and gives it to
   the `DeltaWriter`.

Only a few tensors are alive at once (base, fine-tune, delta, stored, decoded), plus the writer's
shard buffer (``max_shard_size``), so compressing needs memory for the largest tensor a few times
over, not for the model (``benchmarks/compress_memory.py`` measures it). Calibration texts are
the exception: they need the fine-tuned model in memory (`delta_format.compression.calibration`).

The manifest pins the base (Hub repo + commit, or absolute local path, plus its fingerprint), and
the fine-tune's ``config.json``, ``generation_config.json`` and tokenizer files are copied beside
the delta so it loads as the fine-tune it is.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.constants import ROUNDINGS
from ..core.dtypes import parse_dtype
from ..errors import InvalidArgumentError
from ..io.resolve import HubOptions, resolve_repo
from ..io.writer import DEFAULT_MAX_SHARD_SIZE, DeltaWriter
from ..methods import EditMethod
from .calibration import Calibration
from .lora import LoraSource, is_lora_adapter
from .plan import Action, MethodPlan, Rule, ignored_base_tensors, ignored_finetune_tensors, schedule
from .probe import DataFreeProbe
from .sensitivity import check_mode, sensitivities_for
from .sources import CheckpointSource, ModelSource, TensorSource, aligned_base
from .steps import TensorCompressor
from .trials import best_of_seeds, check_seed_trials

logger = logging.getLogger(__name__)


@dataclass
class CompressOptions:
    """`compress`'s arguments that shape every entry, checked before any file is opened."""

    plan: MethodPlan
    alpha: float
    seed: int
    value_dtype: torch.dtype | None
    calibration_texts: Sequence[str] | None
    tokenizer: Any
    rounding: str = "auto"
    sensitivity: str = "auto"

    @classmethod
    def check(
        cls,
        method: str | EditMethod,
        method_params: dict[str, Any],
        *,
        rules: Sequence[Rule] | None,
        include: Any,
        exclude: Any,
        alpha: float,
        seed: int,
        value_dtype: str | torch.dtype | None,
        calibration_texts: Sequence[str] | None,
        tokenizer: Any,
        rounding: str = "auto",
        sensitivity: str = "auto",
    ) -> CompressOptions:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise InvalidArgumentError(
                "alpha must be a finite number", expected="e.g. 1.0 (or 1.3 to extrapolate)", found=repr(alpha)
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise InvalidArgumentError("seed must be an integer in [0, 2**64)", expected="e.g. 0", found=repr(seed))
        if not isinstance(rounding, str) or rounding not in ("auto", *ROUNDINGS):
            raise InvalidArgumentError(
                f"rounding is {rounding!r}",
                expected=f"'auto' or one of {list(ROUNDINGS)}",
                found=repr(rounding),
                fix="pass rounding='auto' (stochastic-window for lossy half-precision entries) or 'nearest'",
            )
        check_mode(sensitivity)
        stored_dtype = parse_dtype(value_dtype, what="value_dtype")
        plan = MethodPlan(method, method_params, rules, include, exclude)
        plan.check_calibration(calibration_texts is not None)
        return cls(plan, float(alpha), seed, stored_dtype, calibration_texts, tokenizer, rounding, sensitivity)

    def recorded_params(self, finetune: TensorSource) -> dict[str, Any]:
        """What the manifest records beside the plan: α, the seed if a method draws masks, and
        the adapter the fine-tune came from."""
        params: dict[str, Any] = {"alpha": self.alpha}
        if any(m.uses_seed for m in self.plan.methods()):
            params["seed"] = self.seed
        if finetune.adapter_params() is not None:
            params["source"] = finetune.adapter_params()
        return params

    def calibration(self, finetune: TensorSource, edited: list[str], progress: bool = False) -> Calibration | None:
        """The calibration session on the fine-tuned model, None without calibration texts."""
        if self.calibration_texts is None:
            return None
        model = finetune.load_model()
        tokenizer = self.tokenizer if self.tokenizer is not None else _tokenizer(finetune)
        names = finetune.model_names(model) if isinstance(finetune, CheckpointSource) else {}
        wanted = [names.get(n, n) for n in edited]  # the model's names (`io.key_map`)
        texts, measure = self.calibration_texts, self.sensitivity_mode() != "off"
        session = Calibration(model, tokenizer, texts, parameters=wanted, sensitivity=measure, progress=progress)
        return session.renamed(names) if names else session

    def sensitivity_mode(self) -> str:
        """``sensitivity=``, or ``"off"`` where no method reads the sensitivity."""
        return self.sensitivity if any(m.uses_sensitivity for m in self.plan.methods()) else "off"


def compress(
    base: str | os.PathLike | torch.nn.Module,
    finetune: str | os.PathLike | torch.nn.Module,
    out_dir: str | os.PathLike,
    method: str | EditMethod | None = None,
    *,
    rules: Sequence[Rule] | None = None,
    include: Any = None,
    exclude: Any = None,
    alpha: float = 1.0,
    seed: int = 0,
    seed_trials: int = 1,
    calibration_texts: Sequence[str] | None = None,
    tokenizer: Any = None,
    value_dtype: str | torch.dtype | None = None,
    rounding: str = "auto",
    sensitivity: str = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    token: str | bool | None = None,
    revision: str | None = None,
    base_revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    progress: bool = True,
    **method_params: Any,
):
    """Write the delta of ``finetune`` against ``base`` to ``out_dir`` and return it as a `Delta`.

    Args:
        base: the base model: a local directory, a Hub repo id (pinned in the manifest to the
            commit it resolved to), or an in-memory model.
        finetune: the fine-tuned model, the same ways, or a PEFT LoRA adapter (directory or repo)
            trained on ``base``.
        out_dir: where the delta directory is published (atomically: nothing exists there until
            it is complete).
        method: the edit method for parameters no rule names (see `delta_format.methods`):
            ``dense`` (lossless), ``dare``, ``darex``, ``magnitude``, ``importance``,
            ``structural``, ``sign``, ``lowrank``, ``lowrank-q``, ``lora``, ``budget``; or an
            `EditMethod` instance. Default: ``budget`` when ``bits=`` is given, else ``dare``.
        rules: ``(pattern, method)`` or ``(pattern, method, params)`` pairs; the first whose glob
            pattern (or compiled regex, full match) matches a parameter name picks its method.
        include, exclude: glob patterns (or compiled regexes); parameters not included, or
            excluded, keep the base's value (the delta does not mention them).
        alpha: the coefficient α every delta entry carries (EXPO: α > 1 extrapolates, 0 < α < 1
            interpolates); loaders can change it at load time.
        seed: seed of DARE's masks (SPEC §6).
        seed_trials: compress this many times, with seeds ``seed``, ``seed + 1``, ..., and keep the
            delta whose model does best on ``calibration_texts`` (lowest next-token loss; for a
            bare encoder, the closest sentence embeddings): at small budgets deltas of different
            seeds differ by more than a per-tensor measure sees (`compression.trials`). Needs
            calibration texts; costs that many compressions. The manifest's ``stats.seed_trials``
            lists every trial.
        calibration_texts: a few unlabelled texts. They enable DAREx-q's ``q="auto"`` and
            ``q="output"``, ``importance`` and BitDelta's ``distill_steps``, and add the output
            (logit) error and a first-order loss-change estimate to the stats. They need the
            fine-tune in memory.
        tokenizer: tokenizes the calibration texts (default: the fine-tune's own).
        value_dtype: dtype of stored values (kept entries, factors); default 16 bits: the
            fine-tune's own for 16-bit fine-tunes, else float16 or bfloat16 per tensor, whichever
            rounds the delta less (`delta_format.core.quant.sixteen_bit`).
        rounding: how a reader rounds a lossy half-precision parameter (SPEC §9.1): ``"auto"``
            (default) marks every lossy delta entry of a float16/bfloat16 parameter
            ``"stochastic-window"`` (seeded, unbiased: a delta below the weights' spacing is kept
            in expectation instead of rounded away; spec 1.6) and the rest ``"nearest"``;
            ``"nearest"`` writes a file readers before spec 1.3 accept; ``"stochastic"`` (the
            per-element dither of spec 1.3, which readers of 1.3-1.5 accept and which loads
            slower) or ``"stochastic-window"`` marks every delta entry.
        sensitivity: for the ``budget`` (``bits=``): weigh each parameter's error by the model's
            output sensitivity to it (`delta_format.compression.sensitivity`), measured on the
            calibration texts or, without them, on random tokens: ``"auto"`` (default) where
            transformers can run a fine-tune of at most ``SENSITIVITY_MAX_PARAMS`` parameters,
            ``"on"`` always, ``"off"`` never (the weight error with fixed priors).
        max_shard_size: shard size of the delta files, also the writer's in-memory buffer.
        overwrite: replace an existing ``out_dir`` (only once the new delta is complete).
        token, revision, base_revision: Hub token and revisions of the fine-tune and the base.
        cache_dir, local_files_only: where Hub downloads are cached, and whether to use only the
            cache (as in huggingface_hub).
        progress: show a progress bar.
        **method_params: the methods' parameters (``p``, ``k``, ``q``, ``scale``, ``rank``, ...),
            each given to every method in use that declares it; ``bits=`` (bits per weight)
            alone makes the ``budget`` method choose each tensor's encoding for that size.

    Returns:
        The `delta_format.io.delta.Delta` written.

    Example:
        >>> delta = compress("meta-llama/Llama-3.2-1B", "me/llama-ft", "ft-delta", method="sign",
        ...                  scale="row", rules=[("*embed_tokens*", "dense"), ("*norm*", "dense")])  # doctest: +SKIP
        >>> delta.manifest.stats["compression_ratio"]                                              # doctest: +SKIP
        10.4
    """
    from ..io.card import render_model_card
    from ..io.delta import Delta

    if check_seed_trials(seed_trials, seed, calibration_texts) > 1:

        def one_seed(trial_seed: int, directory: Path) -> Delta:
            return compress(
                base,
                finetune,
                directory,
                method,
                rules=rules,
                include=include,
                exclude=exclude,
                alpha=alpha,
                seed=trial_seed,
                calibration_texts=calibration_texts,
                tokenizer=tokenizer,
                value_dtype=value_dtype,
                rounding=rounding,
                sensitivity=sensitivity,
                max_shard_size=max_shard_size,
                token=token,
                revision=revision,
                base_revision=base_revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                progress=progress,
                **method_params,
            )

        return best_of_seeds(one_seed, out_dir, seed, seed_trials, overwrite, [base, finetune])
    started = time.perf_counter()
    options = CompressOptions.check(
        default_method(method, method_params),
        method_params,
        rules=rules,
        include=include,
        exclude=exclude,
        alpha=alpha,
        seed=seed,
        value_dtype=value_dtype,
        calibration_texts=calibration_texts,
        tokenizer=tokenizer,
        rounding=rounding,
        sensitivity=sensitivity,
    )
    hub = HubOptions(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    base_src = open_source(base, hub.updated(revision=base_revision), what="base model")
    ft_src = open_source(finetune, hub, what="fine-tune", base=base_src)
    base_src = aligned_base(base_src, ft_src)
    options.plan.check_finetune(ft_src)
    actions = schedule(options.plan, base_src, ft_src)

    with DeltaWriter(
        out_dir,
        base=base_src.reference(),
        method=options.plan.default.name,
        method_params=options.plan.describe(),
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        inputs=[getattr(base_src, "directory", None), getattr(ft_src, "directory", None)],
    ) as writer:
        writer.manifest.method_params.update(options.recorded_params(ft_src))
        edited = [name for name, action in actions if action in (Action.EDIT, Action.GROW)]
        session = options.calibration(ft_src, edited, progress)
        tensors = TensorCompressor(
            options.plan,
            base_src,
            ft_src,
            writer,
            session,
            alpha=options.alpha,
            seed=options.seed,
            value_dtype=options.value_dtype,
            rounding=options.rounding,
            sensitivities=sensitivities_for(
                ft_src, edited, session and session.measured_sensitivities(), options.sensitivity_mode(), progress
            ),
            probe=DataFreeProbe(ft_src, progress, options.tokenizer) if session is None else None,
        )
        prepared = tensors.prepare(edited)
        tensors.run(actions, progress)
        stats = tensors.stats(prepared)
        stats["seconds"] = round(time.perf_counter() - started, 3)
        stats.update(source_stats(options.plan, base_src, ft_src))
        write_side_files(writer, ft_src, tokenizer)
        writer.manifest.stats = stats
        writer.add_file("README.md", render_model_card(writer.manifest, name=writer.out_dir.name).encode("utf-8"))
        writer.close(stats=stats)
    logger.info("wrote %s delta of %d tensors to %s", options.plan.default.name, len(actions), writer.out_dir)
    # The writer hashed these very bytes a moment ago: re-hashing them would only compare a hash with
    # itself (a quarter of a dense compression's time). Everything else is validated as on any opening.
    return Delta(writer.out_dir, verify_checksums=False)


def default_method(method: str | EditMethod | None, method_params: dict[str, Any]) -> str | EditMethod:
    """The method when none is named: a size (``bits=``) asks for ``budget``, anything else for ``dare``."""
    if method is not None:
        return method
    return "budget" if "bits" in method_params else "dare"


def open_source(source: Any, hub: HubOptions, *, what: str, base: TensorSource | None = None) -> TensorSource:
    """A tensor source for a directory, a Hub repo id, an in-memory model, or (for the fine-tune,
    when ``base`` is given) a PEFT LoRA adapter directory or repo."""
    if isinstance(source, torch.nn.Module):
        return ModelSource(source)
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"cannot read the {what}",
            expected="a directory, a Hub repo id or a torch model",
            found=type(source).__name__,
        )
    directory, sha = resolve_repo(source, hub, whole_repo=base is not None, what=what)  # a fine-tune: all its files
    if base is not None and is_lora_adapter(directory):
        return LoraSource(directory, base)
    return CheckpointSource(directory, repo_id=None if sha is None else str(source), commit_sha=sha)


def _tokenizer(source: TensorSource) -> Any:
    try:
        found = source.tokenizer()
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(
            "the fine-tune's tokenizer could not be loaded for calibration",
            expected="tokenizer files beside the fine-tune",
            found=str(exc)[:200],
            fix="pass tokenizer=",
        ) from None
    if found is None:
        raise InvalidArgumentError(
            "calibration texts need a tokenizer",
            expected="tokenizer=...",
            found="none",
            fix="pass tokenizer= (the fine-tune has no tokenizer files)",
        )
    return found


def source_stats(plan: MethodPlan, base: TensorSource, finetune: TensorSource) -> dict[str, Any]:
    """What the manifest's ``stats`` records about the pair rather than the edit (SPEC §3.6): the base
    tensors the fine-tune's architecture does not load (ignored, as transformers ignores
    unexpected keys), and the fine-tune card's metadata that the delta's card carries over."""
    out: dict[str, Any] = {}
    ignored = ignored_base_tensors(plan, base, finetune)
    if ignored:
        logger.info("ignoring %d base tensor(s) the fine-tune does not load: %s", len(ignored), ignored[:5])
        out["ignored_base_tensors"] = ignored
    unloaded = ignored_finetune_tensors(finetune)
    if unloaded:
        logger.info("ignoring %d fine-tune tensor(s) its architecture does not load: %s", len(unloaded), unloaded[:5])
        out["ignored_finetune_tensors"] = unloaded
    card = finetune.card_data()
    if "modules.json" in finetune.side_files():  # a sentence-transformers model, card or not
        card.setdefault("library_name", "sentence-transformers")
    if card:
        out["finetune_card"] = card
    return out


def write_side_files(writer: DeltaWriter, finetune: TensorSource, tokenizer: Any) -> None:
    """The fine-tune's config and tokenizer files beside the delta; a ``tokenizer`` given for
    calibration is saved too when the fine-tune has no tokenizer files of its own."""
    side_files = finetune.side_files()
    for side, content in side_files.items():
        writer.add_file(side, content)
    if tokenizer is not None and not any(n.startswith("tokenizer") for n in side_files):
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            for path in sorted(Path(tmp).iterdir()):
                if path.is_file():
                    writer.add_file(path.name, path.read_bytes())
