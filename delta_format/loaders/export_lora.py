"""A delta as a PEFT LoRA adapter, for serving engines that take adapters (vLLM, TGI, LoRAX) and
for ``PeftModel.from_pretrained``.

Each delta matrix of an ``nn.Linear`` or ``nn.Embedding`` becomes a LoRA pair at one rank ``r``
for the whole adapter (engines want one rank): a ``lowrank`` delta of rank ≤ r exactly (its
factors, zero-padded to ``r``; above ``r``, its best rank-``r`` truncation), any other encoding
by the truncated SVD of its decoded delta, with the relative error ‖Δ − Δ_r‖/‖Δ‖ of each fit
reported. ``lora_alpha = r``, so PEFT's scaling is 1 and the coefficient α is folded into ``B``.

What a LoRA pair cannot hold is still exported exactly (from the base + delta), as PEFT saves
trained extras: changed biases whole (``bias="all"``), other changed tensors (norms, a replaced
matrix) as their modules in ``modules_to_save``. Engines differ in what they take beyond LoRA
pairs (vLLM: neither), so `LoraExport` lists both. A tied output layer gets the embedding's pair.
A resized vocabulary and GPT-2's ``Conv1D`` layers are refused, saying what to do instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.dtypes import TORCH_DTYPES, parse_dtype
from ..core.encodings import LowRankEncoding
from ..core.reconstruct import reconstruct_stored
from ..errors import InvalidArgumentError
from ..io.checkpoint import Checkpoint
from ..io.key_map import model_names
from ..io.reader import DeltaReader
from ..io.resolve import HubOptions, open_delta
from ..io.staging import StagingDirectory
from .base_model import check_base, resolve_base
from .skeleton import build_skeleton

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix of every key of a saved adapter

TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}
"""PEFT's task type by the suffix of the model class (none: a bare model, ``PeftModel``)."""


@dataclass
class LoraExport:
    """What `export_lora` wrote and how exact it is."""

    directory: Path
    rank: int
    exact: list[str] = field(default_factory=list)
    """Parameters whose LoRA pair is their delta exactly (a ``lowrank`` delta of rank ≤ ``rank``)."""
    fitted: dict[str, float] = field(default_factory=dict)
    """Parameters fitted by a truncated SVD, with the relative error ‖Δ − Δ_r‖/‖Δ‖ of each."""
    biases: list[str] = field(default_factory=list)
    """Changed biases (of modules with no other change), exported whole (``bias="all"``)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules exported whole with their fine-tuned values."""
    err_sq: float = 0.0
    delta_sq: float = 0.0

    @property
    def rel_error(self) -> float:
        """‖Δ − Δ_LoRA‖/‖Δ‖ over every matrix the LoRA pairs hold (0 where all are exact)."""
        return math.sqrt(self.err_sq / self.delta_sq) if self.delta_sq else 0.0

    def summary(self) -> str:
        fitted = f", {len(self.fitted)} fitted by SVD" if self.fitted else ""
        extras = f"; {len(self.biases)} biases, {len(self.modules_to_save)} modules_to_save"
        return f"LoRA rank {self.rank}: {len(self.exact)} exact{fitted}, relative error {self.rel_error:.4g}{extras}"


def export_lora(
    delta: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    rank: int = 16,
    dtype: str | torch.dtype | None = "float32",
    base_model: str | os.PathLike | None = None,
    overwrite: bool = False,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> LoraExport:
    """Write ``delta`` as a PEFT LoRA adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors`` + a short card) at ``out_dir``, atomically.

    Args:
        delta: the delta directory or Hub repo id.
        out_dir: the adapter directory to write.
        rank: the adapter's LoRA rank (every pair; exact for ``lowrank`` deltas up to this rank).
        dtype: dtype of the stored adapter tensors (float32 keeps the export exact).
        base_model: the base to add deltas to for ``modules_to_save`` (default: the manifest's).
        overwrite: replace an existing ``out_dir``.
        revision, base_revision, token, cache_dir, local_files_only: as in huggingface_hub.

    Returns:
        A `LoraExport` listing what is exact, what was fitted and with which error.

    Example:
        >>> report = export_lora("user/ft-delta", "ft-lora", rank=16)      # doctest: +SKIP
        >>> PeftModel.from_pretrained(base_model, "ft-lora")                # doctest: +SKIP
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidArgumentError("rank must be a positive integer", expected="e.g. 16", found=repr(rank))
    hub = HubOptions(revision, token, cache_dir, local_files_only)
    plan = AdapterPlan(open_delta(delta, hub).reader)
    reader = plan.reader  # under the model's names (`io.key_map`): PEFT targets modules by them
    base = resolve_base(reader.manifest, base_model, hub.updated(revision=base_revision)) if plan.needs_base else None
    if base is not None:
        base = base.renamed(model_names(plan.model, base))
    try:
        if base is not None:
            check_base(reader.manifest, base)
        staging = StagingDirectory(out_dir, overwrite=overwrite)
        try:
            report = LoraExport(Path(out_dir), rank)
            tensors = plan.tensors(reader, base, rank, parse_dtype(dtype, what="dtype") or torch.float32, report)
            save_file(tensors, str(staging.path / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
            config = plan.adapter_config(rank)
            (staging.path / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            (staging.path / "README.md").write_text(_card(reader, report), encoding="utf-8")
            report.directory = staging.publish()
        except BaseException:
            staging.discard()
            raise
    finally:
        reader.close()
        if base is not None:
            base.close()
    logger.info("%s -> %s", report.summary(), report.directory)
    return report


class AdapterPlan:
    """Which parameter of the delta goes where in the adapter, decided from the fine-tune's
    architecture (an empty model built from the delta's config) before anything is computed."""

    def __init__(self, reader: DeltaReader):
        from transformers import AutoConfig

        try:
            self.config = AutoConfig.from_pretrained(reader.directory)
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(
                "exporting a LoRA adapter needs the fine-tune's config.json beside the delta",
                expected="config.json in the delta",
                found=str(exc)[:200],
            ) from None
        self.model = model = build_skeleton(self.config, torch.float32)
        self.reader = reader.renamed(model_names(model, reader.manifest.tensors))
        self.manifest = self.reader.manifest
        modules = dict(model.named_modules())
        self.task_type = next((t for s, t in TASK_TYPES.items() if type(model).__name__.endswith(s)), None)
        self.targets: dict[str, str] = {}  # LoRA module -> its kind ("linear" / "embedding")
        self.pairs: dict[str, list[str]] = {}  # delta parameter -> the LoRA modules it feeds
        self.whole: dict[str, list[str]] = {}  # module saved whole -> its changed parameters
        self.biases: list[str] = []  # changed biases of Linear layers, saved whole (bias="all")
        tied = _tied_output(model, modules)
        for name, entry in self.manifest.tensors.items():
            self._place(name, entry.encoding.is_delta, modules, tied)
        for module_name, names in list(self.whole.items()):
            if all(n.endswith(".bias") for n in names):  # PEFT's bias="all": saved whole, loaded into the model
                self.biases.extend(self.whole.pop(module_name))
            else:
                _check_not_around_a_target(module_name, self.targets)
        self.needs_base = bool(self.biases or self.whole)  # full values: base + delta (and shape checks)

    def _place(self, name: str, is_delta: bool, modules: dict[str, torch.nn.Module], tied: dict[str, str]) -> None:
        """A delta of a Linear or Embedding weight feeds a LoRA pair (and the tied output layer's);
        anything else is saved whole with its module (biases are sorted out afterwards)."""
        module_name, _, param = name.rpartition(".")
        module = modules.get(module_name)
        if type(module).__name__ == "Conv1D":
            raise InvalidArgumentError(
                f"{module_name!r} is a Conv1D layer (GPT-2 style): PEFT's fan_in_fan_out is one switch for all layers",
                expected="nn.Linear and nn.Embedding layers",
                found="Conv1D",
                fix="apply the delta (delta-format apply) and serve the full fine-tune",
            )
        kind = _kind(module)
        if param != "weight" or kind is None or not is_delta:
            self.whole.setdefault(module_name, []).append(name)
            return
        self.pairs[name] = [module_name]
        self.targets[module_name] = kind
        if kind == "embedding" and module_name in tied:
            self.pairs[name].append(tied[module_name])
            self.targets[tied[module_name]] = "linear"

    def adapter_config(self, rank: int) -> dict:
        """PEFT's ``adapter_config.json`` (a `LoraConfig` as PEFT saves it)."""
        base = self.manifest.base
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": base.repo_id,  # never a local path: it means nothing elsewhere
            "revision": base.revision,
            "r": rank,
            "lora_alpha": rank,  # scaling = lora_alpha / r = 1: the factors hold the delta as it is
            "lora_dropout": 0.0,
            "target_modules": sorted(self.targets),
            "modules_to_save": sorted(self.whole) or None,
            "bias": "all" if self.biases else "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
        }

    def tensors(
        self, reader: DeltaReader, base: Checkpoint | None, rank: int, dtype: torch.dtype, report: LoraExport
    ) -> dict[str, torch.Tensor]:
        """Every tensor of ``adapter_model.safetensors``, filling ``report`` as it goes."""
        out: dict[str, torch.Tensor] = {}
        for name, modules in self.pairs.items():
            u, v = _factors(name, reader, rank, report)
            for module in modules:
                out.update(_pair_keys(module, self.targets[module], u, v, dtype))
        for name in self.biases:
            module, _, param = name.rpartition(".")
            key = f"{module}.base_layer.{param}" if module in self.targets else name  # PEFT wraps a LoRA layer
            out[PREFIX + key] = _fine_tuned(name, self.manifest.tensors[name], reader, base)
            report.biases.append(name)
        for module, names in self.whole.items():
            for name in names:
                out[PREFIX + name] = _fine_tuned(name, self.manifest.tensors[name], reader, base)
            report.modules_to_save.append(module)
        return {key: value.to(dtype) if value.is_floating_point() else value for key, value in out.items()}


def _fine_tuned(name: str, entry, reader: DeltaReader, base: Checkpoint | None) -> torch.Tensor:
    """The fine-tuned value of ``name`` (base + α·Δ, or the replaced value), as a full tensor."""
    if base is not None and name in base and base.shape_dtype(name)[0] != tuple(entry.shape):
        raise InvalidArgumentError(
            f"{name!r} changes shape (a resized vocabulary?): PEFT copies the base's module",
            expected=f"the base's shape {list(base.shape_dtype(name)[0])}",
            found=list(entry.shape),
            fix="resize the base model's embeddings before loading, or apply the delta (delta-format apply)",
        )
    base_tensor = base.get_tensor(name) if entry.encoding.needs_base and base is not None and name in base else None
    parts = [(entry, reader.stored(name), 1.0)]
    source = reader.source_name(name)  # seeds masks and rounding
    return reconstruct_stored(source, parts, base_tensor, dtype=TORCH_DTYPES[entry.dtype]).contiguous()


def _check_not_around_a_target(module: str, targets: dict[str, str]) -> None:
    """A module saved whole is a copy PEFT swaps in: it cannot contain (or be) a LoRA layer."""
    inside = [t for t in targets if t == module or t.startswith(module + ".") or module == ""]
    if inside:
        raise InvalidArgumentError(
            f"the module {module or '(the model)'!r} has changed tensors a LoRA layer cannot hold and contains "
            "LoRA layers",
            expected="modules_to_save apart from the LoRA target modules",
            found=inside[:3],
            fix="apply the delta (delta-format apply) and serve the full fine-tune",
        )


def _kind(module: torch.nn.Module | None) -> str | None:
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    return None


def _tied_output(model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> dict[str, str]:
    """``{input embedding module: output projection module}`` when the config ties them: the
    fine-tune changes both, so the adapter gives the projection the same delta."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in modules.items()}
    if inputs is None or outputs is None or id(inputs) not in names or id(outputs) not in names:
        return {}
    return {names[id(inputs)]: names[id(outputs)]}


def _delta_with_alpha(reader: DeltaReader, name: str) -> torch.Tensor:
    entry = reader.entry(name)
    return reader.decode(name, dtype=torch.float32) * float(entry.alpha)


def _factors(name: str, reader: DeltaReader, rank: int, report: LoraExport) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, v)`` of rank ``rank`` in float32 with ``u @ v`` ≈ α·Δ of ``name`` as a matrix."""
    entry = reader.entry(name)
    if isinstance(entry.encoding, LowRankEncoding):
        stored = reader.stored(name)
        u = stored[LowRankEncoding.U].float() * float(entry.alpha)
        v = stored[LowRankEncoding.V].float()
        if u.shape[1] <= rank:
            report.exact.append(name)
            report.delta_sq += float((u @ v).square().sum())
            return _padded(u, v, rank)
        return _truncated(name, u, v, rank, report)
    delta = _delta_with_alpha(reader, name).reshape(entry.shape[0], -1)
    u, v = LowRankEncoding.factorize(delta, rank)
    err_sq, delta_sq = float((delta - u @ v).square().sum()), float(delta.square().sum())
    report.fitted[name] = math.sqrt(err_sq / delta_sq) if delta_sq else 0.0
    report.err_sq, report.delta_sq = report.err_sq + err_sq, report.delta_sq + delta_sq
    return _padded(u, v, rank)


def _truncated(name: str, u: torch.Tensor, v: torch.Tensor, rank: int, report: LoraExport):
    """The best rank-``rank`` approximation of ``u @ v`` from QR of both factors and the SVD of
    the small core, never forming the full matrix."""
    qu, ru = torch.linalg.qr(u)
    qv, rv = torch.linalg.qr(v.T)
    core_u, s, core_vh = torch.linalg.svd(ru @ rv.T, full_matrices=False)
    err_sq, delta_sq = float(s[rank:].square().sum()), float(s.square().sum())
    report.fitted[name] = math.sqrt(err_sq / delta_sq) if delta_sq else 0.0
    report.err_sq, report.delta_sq = report.err_sq + err_sq, report.delta_sq + delta_sq
    root = s[:rank].sqrt()
    return (qu @ core_u[:, :rank]) * root, root.unsqueeze(1) * (core_vh[:rank] @ qv.T)


def _padded(u: torch.Tensor, v: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of a lower rank with zero columns/rows added: the same product at ``rank``."""
    missing = rank - u.shape[1]
    if missing <= 0:
        return u, v
    return torch.cat([u, u.new_zeros(u.shape[0], missing)], 1), torch.cat([v, v.new_zeros(missing, v.shape[1])], 0)


def _pair_keys(module: str, kind: str, u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's keys: a Linear's delta is ``lora_B @ lora_A`` ([out, r] @ [r, in]); an Embedding's
    is ``(lora_embedding_B @ lora_embedding_A).T`` with A [r, num_embeddings], B [dim, r]."""
    if kind == "embedding":
        return {
            f"{PREFIX}{module}.lora_embedding_A": u.T.to(dtype).contiguous(),
            f"{PREFIX}{module}.lora_embedding_B": v.T.to(dtype).contiguous(),
        }
    return {
        f"{PREFIX}{module}.lora_A.weight": v.to(dtype).contiguous(),
        f"{PREFIX}{module}.lora_B.weight": u.to(dtype).contiguous(),
    }


def _card(reader: DeltaReader, report: LoraExport) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="peft", base_model=reader.manifest.base.repo_id, tags=["lora", "delta-format"])
    return ModelCard(
        f"---\n{data.to_yaml()}\n---\n\n# LoRA adapter exported from a `{reader.manifest.method}` delta\n\n"
        f"`delta-format export-lora`: {report.summary()}. The relative error is ‖Δ − Δ_LoRA‖/‖Δ‖ over the "
        "matrices the LoRA pairs hold; biases and `modules_to_save` are exact. With tied embeddings, serve "
        "it unmerged: the input and output layers each carry the shared delta.\n"
    ).content


__all__ = ["export_lora", "LoraExport"]
