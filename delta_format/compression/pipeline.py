"""The streaming compressor: a base and a fine-tune in, a delta directory out, one tensor at a time.

`compress` reads the two checkpoints lazily (local directories or Hub repos through
`resolve_repo`, or in-memory models), and for each parameter of the fine-tune:

1. skips it if ``include``/``exclude`` say so, or if it equals the base bit for bit;
2. stores it whole (``replace``) if the base lacks it or has another shape (added tokens, a
   resized vocabulary, a new head);
3. otherwise hands ``Δ = ft - base`` (float32; float64 for float64 parameters) to the edit
   method its name selects (``rules``, first match wins; ``method`` otherwise), measures what
   was stored by decoding it (relative error, bytes, compression ratio; with calibration texts
   also the first-order loss change), and gives it to the `DeltaWriter`.

Only a few tensors are alive at once (base, fine-tune, delta, stored, decoded), plus the writer's
shard buffer (``max_shard_size``), so compressing needs memory for the largest tensor a few times
over, not for the model (``benchmarks/compress_memory.py`` measures it). Calibration texts are
the exception: they need the fine-tuned model in memory (`delta_format.compression.calibration`).

The manifest pins the base (Hub repo + commit, or absolute local path, plus its fingerprint), and
the fine-tune's ``config.json``, ``generation_config.json`` and tokenizer files are copied beside
the delta so it loads as the fine-tune it is.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..io.checkpoint import Checkpoint, resolve_repo
from ..io.model_class import model_class_for
from ..core.dtypes import CHECKPOINT_DTYPES, TORCH_DTYPES, compute_dtype, parse_dtype, torch_dtype_name
from ..core.encodings import ReplaceEncoding, SparseEncoding
from ..errors import InvalidArgumentError
from ..core.fingerprint import fingerprint_state_dict
from .heap import FreedMemory
from .lora import LoraAdapter, is_lora_adapter
from ..core.manifest import BaseReference, TensorEntry
from ..methods import EditMethod, TensorContext, get_method
from ..methods.base import Edit
from ..methods.dense import same_bits
from ..io.writer import DEFAULT_MAX_SHARD_SIZE, DeltaWriter

SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "tiktoken.model", "chat_template.jinja", "chat_template.json",
)
"""The fine-tune's files copied into the delta: its config and everything its tokenizer needs."""

_CONFIG_FILES = ("config.json", "generation_config.json")

Rule = tuple
"""``(pattern, method)`` or ``(pattern, method, params)``: a glob or compiled regex, a method
name or `EditMethod`, and that rule's own parameters."""


# ----------------------------------------------------------------------------------------------
# Where tensors come from


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` would write: tied parameters (tensors sharing storage) once,
    under the name transformers keeps (the first name in ``state_dict`` order for other modules)."""
    state = dict(model.state_dict())
    try:
        from transformers import PreTrainedModel
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # pragma: no cover - transformers is a dependency, but its internals move
        PreTrainedModel = remove_tied_weights_from_state_dict = None
    if PreTrainedModel is not None and isinstance(model, PreTrainedModel):
        try:
            state = remove_tied_weights_from_state_dict(state, model)
        except (RuntimeError, TypeError, AttributeError):
            pass  # fall through to the storage rule below
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, tensor in state.items():
        if tensor.device.type != "meta" and tensor.numel():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key in seen:
                continue
            seen.add(key)
        out[name] = tensor.detach()
    return out


class CheckpointSource:
    """A safetensors checkpoint directory (local, or a resolved Hub snapshot)."""

    def __init__(self, directory: Path, repo_id: str | None = None, commit_sha: str | None = None):
        self.checkpoint = Checkpoint(directory, commit_sha=commit_sha)
        self.directory = Path(directory)
        self.repo_id = repo_id

    def names(self) -> list[str]:
        return list(self.checkpoint)

    def __contains__(self, name: str) -> bool:
        return name in self.checkpoint

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        shape, stored = self.checkpoint.shape_dtype(name)
        return shape, CHECKPOINT_DTYPES.get(stored, stored)

    def get(self, name: str) -> torch.Tensor:
        return self.checkpoint.get_tensor(name)

    def read(self, name: str, base: torch.Tensor | None):
        """(fine-tuned tensor, its exact delta or None, LoRA factors or None)."""
        return self.get(name), None, None

    def fingerprint(self) -> dict:
        return self.checkpoint.fingerprint()

    def reference(self) -> BaseReference:
        if self.repo_id and self.checkpoint.commit_sha:
            return BaseReference(repo_id=self.repo_id, revision=self.checkpoint.commit_sha, fingerprint=self.fingerprint())
        return BaseReference(local_path=str(self.directory.resolve()), fingerprint=self.fingerprint())

    def side_files(self) -> dict[str, Path | bytes]:
        return {name: self.directory / name for name in SIDE_FILES if (self.directory / name).is_file()}

    def load_model(self) -> torch.nn.Module:
        from transformers import AutoConfig

        cls = model_class_for(AutoConfig.from_pretrained(self.directory))
        return cls.from_pretrained(self.directory, dtype=torch.float32)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.directory)


class ModelSource:
    """An in-memory model, read through its (tie-deduplicated) state dict."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.state = model_state_dict(model)
        self.directory = None

    def names(self) -> list[str]:
        return list(self.state)

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        tensor = self.state[name]
        return tuple(tensor.shape), tensor.dtype

    def get(self, name: str) -> torch.Tensor:
        return self.state[name].to("cpu")

    def read(self, name: str, base: torch.Tensor | None):
        return self.get(name), None, None

    def fingerprint(self) -> dict:
        return fingerprint_state_dict({name: tensor.cpu() for name, tensor in self.state.items()})

    def reference(self) -> BaseReference:
        """The model's origin if transformers recorded it: a Hub repo at the commit it was loaded
        from, or the directory it was loaded from. Without one, only the fingerprint."""
        config = getattr(self.model, "config", None)
        origin = getattr(config, "_name_or_path", "") or getattr(self.model, "name_or_path", "")
        commit = getattr(config, "_commit_hash", None)
        fingerprint = self.fingerprint()
        if origin and Path(origin).is_dir():
            return BaseReference(local_path=str(Path(origin).resolve()), fingerprint=fingerprint)
        if origin and commit and re.fullmatch(r"[0-9a-f]{40}", str(commit)):
            return BaseReference(repo_id=origin, revision=commit, fingerprint=fingerprint)
        warnings.warn("the in-memory base model does not say where it came from; the delta records only its "
                      "fingerprint, so loading it needs base_model= (or --base)", stacklevel=3)
        return BaseReference(fingerprint=fingerprint)

    def side_files(self) -> dict[str, Path | bytes]:
        files: dict[str, Path | bytes] = {}
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            files["config.json"] = config.to_json_string().encode()
        generation = getattr(self.model, "generation_config", None)
        can_generate = getattr(self.model, "can_generate", lambda: False)
        if generation is not None and can_generate():
            files["generation_config.json"] = generation.to_json_string().encode()
        return files

    def load_model(self) -> torch.nn.Module:
        return copy.deepcopy(self.model)

    def tokenizer(self):
        origin = getattr(getattr(self.model, "config", None), "_name_or_path", "")
        if origin and Path(origin).is_dir():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(origin)
        return None


class LoraSource:
    """A fine-tune given as a PEFT LoRA adapter over the base: ``ft = base + B @ A * scaling``."""

    def __init__(self, directory: Path, base: CheckpointSource | ModelSource):
        self.adapter = LoraAdapter(directory)
        self.adapter.rename(base.names())
        self.base = base
        self.directory = Path(directory)
        missing = [name for name in self.adapter.targets if name not in base]
        if missing:
            raise InvalidArgumentError("the LoRA adapter targets parameters the base does not have",
                                       expected="names of the base's parameters", found=missing[:5],
                                       fix="check the adapter was trained on this base")
        self.targets = set(self.adapter.targets)

    def names(self) -> list[str]:
        return [*self.base.names(), *(n for n in self.adapter.full if n not in self.base)]

    def __contains__(self, name: str) -> bool:
        return name in self.base or name in self.adapter.full

    def changed(self, name: str) -> bool:
        return name in self.targets or name in self.adapter.full

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        if name in self.adapter.full:
            tensor = self.adapter.full_tensor(name)
            return tuple(tensor.shape), tensor.dtype
        return self.base.info(name)

    def get(self, name: str) -> torch.Tensor:
        return self.read(name, self.base.get(name) if name in self.base else None)[0]

    def read(self, name: str, base: torch.Tensor | None):
        if name in self.adapter.full:
            return self.adapter.full_tensor(name), None, None
        if name not in self.targets:
            return base, None, None
        u, v = self.adapter.factors(name, tuple(base.shape))
        arithmetic = compute_dtype(base.dtype)
        delta = (u @ v).to(arithmetic).view(base.shape)
        finetune = base.to(arithmetic, copy=True).add_(delta).to(base.dtype)
        return finetune, delta, (u, v)

    def side_files(self) -> dict[str, Path | bytes]:
        files = dict(self.base.side_files())
        files.update({name: self.directory / name for name in SIDE_FILES
                      if name not in _CONFIG_FILES and (self.directory / name).is_file()})
        return files

    def load_model(self) -> torch.nn.Module:
        model = self.base.load_model()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in [*self.targets, *self.adapter.full]:
                if name in params:
                    base = params[name].detach().clone()
                    params[name].copy_(self.read(name, base)[0])
        return model

    def tokenizer(self):
        from transformers import AutoTokenizer

        for directory in (self.directory, getattr(self.base, "directory", None)):
            if directory is not None and any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
                return AutoTokenizer.from_pretrained(directory)
        return self.base.tokenizer()


def open_source(source: Any, *, what: str, revision: str | None = None, token: str | bool | None = None,
                base: CheckpointSource | ModelSource | None = None):
    """A tensor source for a directory, a Hub repo id, an in-memory model, or (for the fine-tune)
    a PEFT LoRA adapter directory or repo."""
    if isinstance(source, torch.nn.Module):
        return ModelSource(source)
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidArgumentError(f"cannot read the {what}", expected="a directory, a Hub repo id or a torch model",
                                   found=type(source).__name__)
    directory, sha = resolve_repo(source, revision=revision, token=token, what=what)
    if base is not None and is_lora_adapter(directory):
        return LoraSource(directory, base)
    return CheckpointSource(directory, repo_id=None if sha is None else str(source), commit_sha=sha)


# ----------------------------------------------------------------------------------------------
# Which method edits which tensor


def _matches(pattern: Any, name: str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _check_patterns(what: str, patterns: Any) -> list:
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    patterns = list(patterns)
    if not all(isinstance(p, (str, re.Pattern)) for p in patterns):
        raise InvalidArgumentError(f"{what} must be glob patterns or compiled regular expressions",
                                   expected='e.g. ["*embed_tokens*"]', found=repr(patterns)[:200])
    return patterns


class MethodPlan:
    """The default method, per-name rules (first match wins) and include/exclude patterns.

    The shared ``method_params`` go to every method that declares them (``p`` to ``dare`` and
    ``magnitude`` alike); a parameter no method in use declares is an error.
    """

    def __init__(self, method: str | EditMethod, method_params: Mapping[str, Any], rules: Sequence[Rule] | None,
                 include: Any, exclude: Any):
        self.include = _check_patterns("include", include)
        self.exclude = _check_patterns("exclude", exclude)
        used: set[str] = set()
        self._instances: dict[tuple, EditMethod] = {}
        self.default = self._build(method, {}, method_params, used)
        self.rules: list[tuple[Any, EditMethod]] = []
        for rule in rules or []:
            if not isinstance(rule, (tuple, list)) or len(rule) not in (2, 3) or not isinstance(rule[0], (str, re.Pattern)):
                raise InvalidArgumentError("a rule is (pattern, method) or (pattern, method, params)",
                                           expected='e.g. ("*norm*", "dense")', found=repr(rule)[:200])
            own = dict(rule[2]) if len(rule) == 3 else {}
            self.rules.append((rule[0], self._build(rule[1], own, method_params, used)))
        unused = set(method_params) - used
        if unused:
            names = sorted({m.name for m in self.methods()})
            raise InvalidArgumentError(f"{sorted(unused)} is not a parameter of {', '.join(names)}",
                                       expected=f"parameters of the methods in use: "
                                                f"{sorted(set().union(*(type(m).param_names() for m in self.methods())))}",
                                       found=sorted(unused), fix="check the spelling, or the method name")

    def _build(self, method: str | EditMethod, own: Mapping[str, Any], shared: Mapping[str, Any],
               used: set[str]) -> EditMethod:
        if isinstance(method, EditMethod):
            if own:
                raise InvalidArgumentError("a rule with a method instance takes no params", expected="(pattern, instance)",
                                           found=f"params {sorted(own)}")
            return method
        if not isinstance(method, str):
            raise InvalidArgumentError("a method is a name or an EditMethod", expected="e.g. 'dare'", found=repr(method))
        from ..methods import METHODS

        cls = METHODS.get(method)
        accepted = cls.param_names() if cls is not None else set()
        params = {k: v for k, v in shared.items() if k in accepted}
        used.update(params)
        params.update(own)
        key = (method, tuple(sorted((k, repr(v)) for k, v in params.items())))
        if key not in self._instances:
            self._instances[key] = get_method(method, **params)
        return self._instances[key]

    def methods(self) -> list[EditMethod]:
        return list({id(m): m for m in [self.default, *(m for _, m in self.rules)]}.values())

    def included(self, name: str) -> bool:
        if self.include and not any(_matches(p, name) for p in self.include):
            return False
        return not any(_matches(p, name) for p in self.exclude)

    def method_for(self, name: str) -> EditMethod:
        for pattern, method in self.rules:
            if _matches(pattern, name):
                return method
        return self.default

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.default.params())
        if self.rules:
            out["rules"] = [[p.pattern if isinstance(p, re.Pattern) else p, m.name, m.params()] for p, m in self.rules]
        if self.include:
            out["include"] = [p.pattern if isinstance(p, re.Pattern) else p for p in self.include]
        if self.exclude:
            out["exclude"] = [p.pattern if isinstance(p, re.Pattern) else p for p in self.exclude]
        return out


# ----------------------------------------------------------------------------------------------
# compress


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def compress(
    base: str | os.PathLike | torch.nn.Module,
    finetune: str | os.PathLike | torch.nn.Module,
    out_dir: str | os.PathLike,
    method: str | EditMethod = "dare",
    *,
    rules: Sequence[Rule] | None = None,
    include: Any = None,
    exclude: Any = None,
    alpha: float = 1.0,
    seed: int = 0,
    calibration_texts: Sequence[str] | None = None,
    tokenizer: Any = None,
    value_dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    token: str | bool | None = None,
    revision: str | None = None,
    base_revision: str | None = None,
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
            ``structural``, ``sign``, ``lowrank``, ``lora``; or an `EditMethod` instance.
        rules: ``(pattern, method)`` or ``(pattern, method, params)`` pairs; the first whose glob
            pattern (or compiled regex, full match) matches a parameter name picks its method.
        include, exclude: glob patterns (or compiled regexes); parameters not included, or
            excluded, keep the base's value (the delta does not mention them).
        alpha: the coefficient α every delta entry carries (EXPO: α > 1 extrapolates, 0 < α < 1
            interpolates); loaders can change it at load time.
        seed: seed of DARE's masks (SPEC §6).
        calibration_texts: a few unlabelled texts. They enable DAREx-q's ``q="auto"`` and
            ``q="output"``, ``importance`` and BitDelta's ``distill_steps``, and add the output
            (logit) error and a first-order loss-change estimate to the stats. They need the
            fine-tune in memory.
        tokenizer: tokenizes the calibration texts (default: the fine-tune's own).
        value_dtype: dtype of stored values (kept entries, factors); default the fine-tune's.
        max_shard_size: shard size of the delta files, also the writer's in-memory buffer.
        overwrite: replace an existing ``out_dir`` (only once the new delta is complete).
        token, revision, base_revision: Hub token and revisions of the fine-tune and the base.
        progress: show a progress bar.
        **method_params: the methods' parameters (``p``, ``k``, ``q``, ``scale``, ``rank``, ...),
            each given to every method in use that declares it.

    Returns:
        The `delta_format.io.delta.Delta` written.

    Example:
        >>> delta = compress("meta-llama/Llama-3.2-1B", "me/llama-ft", "ft-delta", method="sign",
        ...                  scale="row", rules=[("*embed_tokens*", "dense"), ("*norm*", "dense")])  # doctest: +SKIP
        >>> delta.manifest.stats["compression_ratio"]                                              # doctest: +SKIP
        10.4
    """
    from ..io.delta import Delta

    started = time.perf_counter()
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidArgumentError("alpha must be a finite number", expected="e.g. 1.0 (or 1.3 to extrapolate)",
                                   found=repr(alpha))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InvalidArgumentError("seed must be an integer in [0, 2**64)", expected="e.g. 0", found=repr(seed))
    stored_dtype = parse_dtype(value_dtype, what="value_dtype")
    plan = MethodPlan(method, method_params, rules, include, exclude)
    if calibration_texts is None:
        needing = sorted({m.name for m in plan.methods() if m.needs_calibration()})
        if needing:
            raise InvalidArgumentError(f"{', '.join(needing)} with these parameters needs calibration texts",
                                       expected="calibration_texts=[...] (a few representative texts)", found="none",
                                       fix="pass calibration texts, or a data-free setting (e.g. a number for q)")

    base_src = open_source(base, what="base model", revision=base_revision, token=token)
    ft_src = open_source(finetune, what="fine-tune", revision=revision, token=token, base=base_src)

    if not isinstance(ft_src, LoraSource) and any(m.needs_adapter_factors for m in plan.methods()):
        raise InvalidArgumentError("the lora method stores a LoRA adapter's factors", expected="a PEFT adapter "
                                   "(adapter_config.json + adapter_model.safetensors) as the fine-tune",
                                   found="a full checkpoint", fix="use lowrank with rank= or energy=")
    schedule = _schedule(plan, base_src, ft_src)
    edited = [name for name, action in schedule if action == "edit"]

    params = {"method": plan.describe(), "alpha": float(alpha)}
    if any(m.uses_seed for m in plan.methods()):
        params["seed"] = seed
    if isinstance(ft_src, LoraSource):
        params["source"] = {"type": "peft-lora", "r": ft_src.adapter.config.get("r"),
                            "lora_alpha": ft_src.adapter.config.get("lora_alpha")}
    with DeltaWriter(out_dir, base=base_src.reference(), method=plan.default.name, method_params=params["method"],
                     max_shard_size=max_shard_size, overwrite=overwrite) as writer:
        writer.manifest.method_params.update({k: v for k, v in params.items() if k != "method"})
        session = None
        if calibration_texts is not None:
            from .calibration import Calibration

            session = Calibration(ft_src.load_model(), tokenizer if tokenizer is not None else _tokenizer(ft_src),
                                  calibration_texts, parameters=edited)
        context_for = _ContextFactory(stored_dtype, seed, float(alpha), session)
        prepared = {}
        if session is not None:
            for m in plan.methods():
                names = [n for n in edited if plan.method_for(n) is m]
                found = m.prepare(_stream(names, base_src, ft_src, context_for), session)
                if found:
                    prepared[m.name] = found
        totals = _Totals()
        from huggingface_hub.utils import tqdm

        bar = tqdm(total=sum(_info_bytes(ft_src, n) for n, _ in schedule), unit="B", unit_scale=True,
                   desc="compressing", disable=not progress)
        release = FreedMemory()
        with bar:
            for name, action in schedule:
                totals.finetune_bytes += _info_bytes(ft_src, name)
                if action == "edit":
                    _edit_one(name, plan.method_for(name), base_src, ft_src, context_for, writer, totals, session)
                elif action == "replace":
                    value = ft_src.get(name)
                    entry = TensorEntry(ReplaceEncoding(), tuple(value.shape), torch_dtype_name(value.dtype),
                                        stats={"lossless": True, "rel_error": 0.0, "reason": _why_replace(name, base_src)})
                    _add(writer, name, entry, {"value": value.contiguous()}, totals, "replaced")
                elif action == "excluded":
                    totals.counts["excluded"] += 1
                    if session is not None and name in base_src:
                        session.set_parameter(name, base_src.get(name).float())
                else:
                    totals.counts[action] += 1
                nbytes = _info_bytes(ft_src, name)
                release(nbytes)
                bar.update(nbytes)

        stats = totals.summary()
        if prepared:
            stats["prepare"] = prepared
        if session is not None:
            stats.update(output_error=session.output_mse(), calibration_texts=len(session.batches),
                         calibration_tokens=session.tokens)
            if session.loss is not None:
                stats.update(calibration_loss=session.loss, loss_change_estimate=totals.loss_change)
        stats["seconds"] = round(time.perf_counter() - started, 3)
        for side, content in ft_src.side_files().items():
            writer.add_file(side, content)
        if tokenizer is not None and not any(n.startswith("tokenizer") for n in ft_src.side_files()):
            _add_tokenizer_files(writer, tokenizer)
        writer.manifest.stats = stats
        from ..io.card import render_model_card

        writer.add_file("README.md", render_model_card(writer.manifest).encode("utf-8"))
        writer.close(stats=stats)
    # The writer hashed these very bytes a moment ago: re-hashing them would only compare a hash with
    # itself (a quarter of a dense compression's time). Everything else is validated as on any opening.
    return Delta(writer.out_dir, verify_checksums=False)


def _info_bytes(source, name: str) -> int:
    shape, dtype = source.info(name)
    size = dtype.itemsize if isinstance(dtype, torch.dtype) else 0
    return math.prod(shape) * size


def _why_replace(name: str, base_src) -> str:
    return "the base has another shape" if name in base_src else "the base has no such tensor"


def _tokenizer(source):
    try:
        found = source.tokenizer()
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError("the fine-tune's tokenizer could not be loaded for calibration",
                                   expected="tokenizer files beside the fine-tune", found=str(exc)[:200],
                                   fix="pass tokenizer=") from None
    if found is None:
        raise InvalidArgumentError("calibration texts need a tokenizer", expected="tokenizer=...", found="none",
                                   fix="pass tokenizer= (the fine-tune has no tokenizer files)")
    return found


def _add_tokenizer_files(writer: DeltaWriter, tokenizer) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            if path.is_file():
                writer.add_file(path.name, path.read_bytes())


def _schedule(plan: MethodPlan, base_src, ft_src) -> list[tuple[str, str]]:
    """(name, action) for every fine-tune tensor: ``edit``, ``replace``, ``unchanged`` or ``excluded``.

    Refuses base tensors the fine-tune lacks (a delta cannot delete a parameter) unless excluded,
    and non-float tensors that changed (no encoding stores them)."""
    schedule = []
    for name in ft_src.names():
        if not plan.included(name):
            schedule.append((name, "excluded"))
            continue
        shape, dtype = ft_src.info(name)
        in_base = name in base_src
        if in_base and base_src.info(name)[0] == shape and hasattr(ft_src, "changed") and not ft_src.changed(name):
            schedule.append((name, "unchanged"))
            continue
        is_float = isinstance(dtype, torch.dtype) and torch_dtype_name(dtype) is not None
        if not is_float:
            if in_base and base_src.info(name) == (shape, dtype) and same_bits(base_src.get(name), ft_src.get(name)):
                schedule.append((name, "unchanged"))
                continue
            raise InvalidArgumentError(f"{name!r} is a {dtype} tensor that differs from the base",
                                       expected="changed tensors in float64, float32, float16 or bfloat16",
                                       found=str(dtype), fix=f"exclude it (exclude=[{name!r}]) to keep the base's value")
        if not in_base or base_src.info(name)[0] != shape:
            schedule.append((name, "replace"))
        else:
            schedule.append((name, "edit"))
    ft_names = set(ft_src.names())
    orphans = [n for n in base_src.names() if n not in ft_names and plan.included(n)]
    if orphans:
        raise InvalidArgumentError(
            "the base has tensors the fine-tune lacks, and a delta cannot delete a parameter",
            expected="every base tensor in the fine-tune", found=orphans[:5],
            fix="if the fine-tune's architecture drops them, pass exclude=[...] with their names: the loader "
                "builds the fine-tune's architecture and ignores base tensors it does not have")
    return schedule


class _ContextFactory:
    def __init__(self, value_dtype: torch.dtype | None, seed: int, alpha: float, session):
        self.value_dtype, self.seed, self.alpha, self.session = value_dtype, seed, alpha, session

    def __call__(self, name, base, finetune, factors, value_dtype=None) -> TensorContext:
        activations = self.session.activations.get(name) if self.session is not None else None
        if activations is not None and activations.kind == "linear" and not len(activations.inputs):
            activations = None  # the layer never ran on the calibration texts
        return TensorContext(name, base=base, finetune=finetune,
                             value_dtype=self.value_dtype or value_dtype or finetune.dtype, seed=self.seed,
                             alpha=self.alpha, activations=activations, factors=factors)


def _read_pair(name: str, base_src, ft_src, context_for: _ContextFactory):
    """(delta, context), or None when the fine-tune equals the base bit for bit."""
    base = base_src.get(name)
    finetune, delta, factors = ft_src.read(name, base)
    if delta is None and finetune.dtype == base.dtype and same_bits(finetune, base):
        return None
    arithmetic = compute_dtype(finetune.dtype)
    if delta is None:  # narrower bases are widened on the fly (exactly), without a full-size copy
        delta = finetune.to(arithmetic, copy=True)
        delta.sub_(base if base.dtype.itemsize <= arithmetic.itemsize else base.to(arithmetic))
    factor_dtype = ft_src.adapter.factor_dtype(name) if factors is not None else None
    return delta, context_for(name, base, finetune, factors, factor_dtype)


def _stream(names: list[str], base_src, ft_src, context_for) -> Callable[[], Iterator]:
    def stream():
        for name in names:
            pair = _read_pair(name, base_src, ft_src, context_for)
            if pair is not None:
                yield name, pair[0], pair[1]

    return stream


class _Totals:
    def __init__(self):
        self.stored_bytes = 0
        self.finetune_bytes = 0
        self.err_sq = 0.0
        self.delta_sq = 0.0
        self.loss_change = 0.0
        self.counts = {"edited": 0, "replaced": 0, "unchanged": 0, "excluded": 0}
        self.encodings: dict[str, int] = {}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stored_bytes": self.stored_bytes, "finetune_bytes": self.finetune_bytes}
        if self.stored_bytes:
            out["compression_ratio"] = self.finetune_bytes / self.stored_bytes
        out["rel_error"] = math.sqrt(self.err_sq / self.delta_sq) if self.delta_sq > 0 else 0.0
        out["tensors"] = dict(self.counts)
        return out


def _add(writer: DeltaWriter, name: str, entry: TensorEntry, stored: Mapping[str, torch.Tensor], totals: _Totals,
         kind: str) -> None:
    nbytes = _nbytes(stored)
    finetune_bytes = math.prod(entry.shape) * TORCH_DTYPES[entry.dtype].itemsize
    entry.stats["compression_ratio"] = finetune_bytes / nbytes if nbytes else None
    writer.add(name, entry, stored)
    totals.stored_bytes += nbytes
    totals.counts[kind] += 1


def _edit_one(name: str, method: EditMethod, base_src, ft_src, context_for: _ContextFactory, writer: DeltaWriter,
              totals: _Totals, session) -> None:
    pair = _read_pair(name, base_src, ft_src, context_for)
    if pair is None:
        totals.counts["unchanged"] += 1
        return
    delta, context = pair
    dtype = torch_dtype_name(context.finetune.dtype)
    if context.finetune.dtype != context.base.dtype and not bool(delta.any()):
        # equal values in another dtype: a zero-byte entry records the dtype
        encoding = SparseEncoding("gaps")
        edit = Edit(encoding, encoding.encode(delta, name=name, positions=torch.empty(0, dtype=torch.int64),
                                              dtype=context.value_dtype), {"reason": "dtype change only"}, lossless=True)
    else:
        edit = method.edit(name, delta, context)
    alpha = context.alpha if edit.encoding.is_delta else 1.0
    entry = TensorEntry(edit.encoding, tuple(delta.shape), dtype, alpha, {"method": method.name, **edit.stats})
    decoded = None
    if session is not None or not edit.lossless:  # measured on what was stored: decoded as a reader will
        decoded = edit.decode(tuple(delta.shape), name, delta.dtype)
    if session is not None:
        _measure_on_model(name, entry, decoded, delta, context, session, totals)
    error_sq = 0.0
    if not edit.lossless:
        if any(decoded.data_ptr() == t.data_ptr() for t in edit.stored.values()):
            decoded = decoded.clone()  # decode may hand back a stored tensor itself
        error_sq = float(torch.linalg.vector_norm(decoded.sub_(delta))) ** 2
    del decoded
    delta_sq = float(torch.linalg.vector_norm(delta)) ** 2
    entry.stats["rel_error"] = math.sqrt(error_sq / delta_sq) if delta_sq > 0 else 0.0
    _add(writer, name, entry, edit.stored, totals, "edited")
    if edit.encoding.is_delta:
        totals.err_sq += error_sq
        totals.delta_sq += delta_sq


def _measure_on_model(name, entry, decoded, delta, context, session, totals) -> None:
    """Put the reconstructed parameter into the calibration model, and record the first-order
    loss change ``<∇L(θ_ft), θ̂ - θ_ft>`` of this tensor's edit."""
    from ..core.reconstruct import reconstruct

    if session.parameter(name) is None:
        return
    value = reconstruct(name, entry, decoded, context.base)
    change = value.float() - context.finetune.float()
    estimate = session.loss_change_estimate(name, change)
    if estimate is not None:
        entry.stats["loss_change_estimate"] = estimate
        totals.loss_change += estimate
    session.set_parameter(name, value.float())
