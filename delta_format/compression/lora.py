"""Reading a PEFT LoRA adapter directory as a low-rank delta, without importing peft.

A LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) adds to each target
weight ``W`` the product ``B @ A * scaling`` with ``scaling = lora_alpha / r`` (``/ sqrt(r)``
with ``use_rslora``), transposed for ``fan_in_fan_out`` layers (GPT-2's ``Conv1D``) and for
embeddings. `LoraAdapter.factors` returns that delta as ``(u, v)`` factors over the parameter's
matrix view (``shape[0]`` rows), with the scaling folded into ``u``: exactly what the ``lowrank``
encoding stores. Per-module ranks and alphas (``rank_pattern``, ``alpha_pattern``) are matched the
way PEFT matches them. Tensors the adapter saves whole (``modules_to_save``, trained biases) are
fine-tuned values of their own.

Adapters whose delta is not a plain product (DoRA's magnitude vectors, other PEFT types) are
refused with a clear error rather than imported wrongly. `LoraSource` is the adapter as the
compressor's fine-tune (a `delta_format.compression.sources.TensorSource`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..core.dtypes import CHECKPOINT_DTYPES, compute_dtype
from ..core.manifest import BaseReference
from ..errors import CorruptDeltaError, InvalidArgumentError
from ..io.checkpoint import SAFE_WEIGHTS_NAME
from .carried_files import TOKENIZER_SIDE_FILES, card_data_of
from .sources import TOKENIZER_FILES, Factors, TensorSource

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<which>A|B)(?:\.[^.]+)?$")


def is_lora_adapter(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a PEFT adapter (and no full checkpoint)."""
    directory = Path(directory)
    return (
        (directory / ADAPTER_CONFIG_NAME).is_file()
        and not (directory / SAFE_WEIGHTS_NAME).is_file()
        and not (directory / "model.safetensors.index.json").is_file()
    )


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class LoraAdapter:
    """A PEFT LoRA adapter directory, read with safetensors.

    Example:
        >>> adapter = LoraAdapter("path/to/adapter")                          # doctest: +SKIP
        >>> u, v = adapter.factors("model.layers.0.self_attn.q_proj.weight")  # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        config_path, weights_path = self.directory / ADAPTER_CONFIG_NAME, self.directory / ADAPTER_WEIGHTS_NAME
        try:
            self.config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(
                f"{config_path} is unreadable", expected="a PEFT adapter_config.json", found=str(exc)[:200]
            ) from None
        peft_type = str(self.config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise InvalidArgumentError(
                "only LoRA adapters can be imported",
                expected="peft_type LORA",
                found=peft_type,
                fix="merge the adapter into the model (peft merge_and_unload) and compress that",
            )
        if self.config.get("use_dora"):
            raise InvalidArgumentError(
                "DoRA adapters are not a plain low-rank delta",
                expected="use_dora false",
                found="use_dora true",
                fix="merge the adapter into the model (peft merge_and_unload) and compress that",
            )
        if not weights_path.is_file():
            raise InvalidArgumentError(
                f"no {ADAPTER_WEIGHTS_NAME} in {self.directory}",
                expected="safetensors adapter weights",
                found="none",
                fix="save the adapter with safe_serialization=True; pickles are not read",
            )
        try:
            self._file = safe_open(str(weights_path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CorruptDeltaError(
                f"{weights_path.name} is not a valid safetensors file", expected="a complete file", found=str(exc)[:200]
            ) from None
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        self._pairs: dict[str, dict[str, str]] = {}
        self._kinds: dict[str, str] = {}
        self.full: dict[str, str] = {}
        """Parameter name -> key of tensors the adapter stores whole (not LoRA factors)."""
        for key in self._file.keys():
            name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
            match = _LORA_KEY.match(name) or _EMBEDDING_KEY.match(name)
            if "lora_magnitude_vector" in name:
                raise InvalidArgumentError(
                    "DoRA adapters are not a plain low-rank delta",
                    expected="no magnitude vectors",
                    found=key,
                    fix="merge the adapter into the model and compress that",
                )
            if match is None:
                self.full[name] = key
                continue
            module = match["module"]
            self._pairs.setdefault(module, {})[match["which"]] = key
            self._kinds[module] = "embedding" if "lora_embedding_" in name else "linear"
        for module, pair in self._pairs.items():
            if set(pair) != {"A", "B"}:
                raise CorruptDeltaError(
                    f"the adapter has an incomplete LoRA pair for {module!r}",
                    expected="lora_A and lora_B",
                    found=sorted(pair),
                )
        self._targets = {f"{module}.weight": module for module in self._pairs}

    @property
    def targets(self) -> list[str]:
        """Names of the parameters the adapter's LoRA pairs change (``<module>.weight``)."""
        return list(self._targets)

    def rename(self, names: Iterable[str]) -> None:
        """Match target names to a checkpoint's names: exactly, or with the checkpoint's model
        prefix dropped (``transformer.h.0...`` in the model, ``h.0...`` on disk)."""
        names = set(names)
        renamed = {}
        for target, module in self._targets.items():
            if target not in names:
                shorter = target.split(".", 1)[-1]
                candidates = [n for n in names if n == shorter or n.endswith("." + target)]
                if len(candidates) == 1:
                    target = candidates[0]
            renamed[target] = module
        self._targets = renamed

    def scaling(self, module: str, rank: int) -> float:
        alpha = pattern_value(self.config.get("alpha_pattern"), module, self.config.get("lora_alpha", 8))
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def factors(self, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, v)`` in float32 with ``u @ v`` the delta of parameter ``name`` viewed as
        ``[shape[0], prod(shape[1:])]``."""
        module = self._targets[name]
        a = self._file.get_tensor(self._pairs[module]["A"]).float()
        b = self._file.get_tensor(self._pairs[module]["B"]).float()
        if self._kinds[module] == "embedding":  # A [r, num_embeddings], B [dim, r]; delta = (B @ A).T
            rank = a.shape[0]
            u, v = a.T, b.T * self.scaling(module, rank)
        else:  # A [r, in, ...], B [out, r, 1...]; delta = B @ A, transposed for fan_in_fan_out
            rank = a.shape[0]
            a, b = a.reshape(rank, -1), b.reshape(b.shape[0], rank)
            scaled_b = b * self.scaling(module, rank)
            u, v = (a.T, scaled_b.T) if self.fan_in_fan_out else (scaled_b, a)
        rows = shape[0] if shape else 1
        if tuple(u.shape) != (rows, rank) or u.shape[0] * v.shape[1] != math.prod(shape):
            raise InvalidArgumentError(
                f"the adapter's LoRA factors for {name!r} do not fit the base",
                expected=f"a delta of shape {list(shape)}",
                found=f"factors {list(u.shape)} @ {list(v.shape)}",
                fix="check the adapter belongs to this base (and fan_in_fan_out)",
            )
        return u.contiguous(), v.contiguous()

    def factor_dtype(self, name: str) -> torch.dtype:
        """The dtype the adapter stores ``name``'s factors in."""
        stored = self._file.get_slice(self._pairs[self._targets[name]]["A"]).get_dtype()
        return CHECKPOINT_DTYPES.get(stored, torch.float32)

    def full_tensor(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(self.full[name])


class LoraSource:
    """A fine-tune given as a PEFT LoRA adapter over the base: ``ft = base + B @ A * scaling``.

    Its deltas are exact (computed from the factors, not by subtracting a rounded fine-tune), and
    it knows which tensors it changes, so the compressor never compares untouched ones."""

    def __init__(self, directory: Path, base: TensorSource):
        self.adapter = LoraAdapter(directory)
        self.adapter.rename(base.names())
        self.base = base
        self.directory = Path(directory)
        missing = [name for name in self.adapter.targets if name not in base]
        if missing:
            raise InvalidArgumentError(
                "the LoRA adapter targets parameters the base does not have",
                expected="names of the base's parameters",
                found=missing[:5],
                fix="check the adapter was trained on this base",
            )
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

    def read(self, name: str, base: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, Factors | None]:
        if name in self.adapter.full:
            return self.adapter.full_tensor(name), None, None
        if name not in self.targets:
            return base, None, None
        u, v = self.adapter.factors(name, tuple(base.shape))
        arithmetic = compute_dtype(base.dtype)
        delta = (u @ v).to(arithmetic).view(base.shape)
        finetune = base.to(arithmetic, copy=True).add_(delta).to(base.dtype)
        return finetune, delta, (u, v)

    def factor_dtype(self, name: str) -> torch.dtype | None:
        return self.adapter.factor_dtype(name) if name in self.targets else None

    def provides_factors(self) -> bool:
        return True

    def adapter_params(self) -> dict[str, Any]:
        return {
            "type": "peft-lora",
            "r": self.adapter.config.get("r"),
            "lora_alpha": self.adapter.config.get("lora_alpha"),
        }

    def architecture_names(self) -> set[str] | None:
        return self.base.architecture_names()

    def lookup_names(self) -> set[str]:
        return self.base.lookup_names()

    def head_names(self) -> set[str]:
        return self.base.head_names()

    def card_data(self) -> dict[str, Any]:
        """The adapter's card (its license and tags), without PEFT's own library name."""
        data = card_data_of(self.directory)
        if data.get("library_name") == "peft":
            del data["library_name"]
        return data

    def fingerprint(self) -> dict:
        raise NotImplementedError("a LoRA adapter is only ever a fine-tune; the base is fingerprinted")

    def reference(self) -> BaseReference:
        raise NotImplementedError("a LoRA adapter is only ever a fine-tune; the base is referenced")

    def side_files(self) -> dict[str, Path | bytes]:
        """The base's files (the adapted model is the base's model), with the adapter's own
        tokenizer files over them (an adapter trained with added tokens saves its tokenizer)."""
        files = dict(self.base.side_files())
        files.update(
            {name: self.directory / name for name in TOKENIZER_SIDE_FILES if (self.directory / name).is_file()}
        )
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

    def tokenizer(self) -> Any:
        """The adapter's own tokenizer (saved with added tokens), else the base's."""
        if any((self.directory / f).is_file() for f in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.directory)
        return self.base.tokenizer()
