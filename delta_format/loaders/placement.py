"""Where each parameter goes: a device map as transformers/accelerate users already write it."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..errors import InvalidArgumentError

DeviceMap = str | int | torch.device | Mapping[str, str | int | torch.device] | None


def _device(value) -> torch.device:
    if value == "disk":
        raise InvalidArgumentError(
            "disk offload is not supported by the delta loader",
            expected="cpu or cuda devices",
            found="'disk'",
            fix="give the model enough cpu/cuda memory (max_memory=...)",
        )
    try:
        return torch.device(f"cuda:{value}" if isinstance(value, int) and not isinstance(value, bool) else value)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            "unreadable device in device_map",
            expected='"cpu", "cuda", "cuda:1", an index, "auto" or a {module: device} dict',
            found=repr(value)[:80],
            fix=str(exc)[:120],
        ) from None


def resolve_device_map(model, device_map: DeviceMap, dtype: torch.dtype, max_memory=None) -> dict[str, torch.device]:
    """A ``{module prefix: device}`` map: ``None``/``"cpu"``/``"cuda"``/an index/a dict, or
    ``"auto"``/``"balanced"``/``"sequential"`` computed by accelerate."""
    if device_map is None:
        return {"": torch.device("cpu")}
    if isinstance(device_map, (int, torch.device)) or (
        isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential")
    ):
        device = _device(device_map)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidArgumentError(
                "CUDA was asked for but is not available",
                expected="a CUDA device",
                found="none",
                fix='use device_map="cpu"',
            )
        return {"": device}
    if isinstance(device_map, str):
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        no_split = getattr(model, "_no_split_modules", None) or []
        if device_map != "sequential":
            max_memory = get_balanced_memory(
                model,
                max_memory=max_memory,
                no_split_module_classes=no_split,
                dtype=dtype,
                low_zero=device_map == "balanced_low_0",
            )
        computed = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
        return {k: _device(v) for k, v in computed.items()}
    if isinstance(device_map, Mapping):
        return {k: _device(v) for k, v in device_map.items()}
    raise InvalidArgumentError(
        "unreadable device_map", expected='"cpu", "cuda", "auto", an index or a dict', found=repr(device_map)
    )


def device_lookup(device_map: Mapping[str, torch.device]) -> Callable[[str], torch.device]:
    """``name -> device`` by the longest module prefix of ``name`` in ``device_map``."""

    def lookup(name: str) -> torch.device:
        parts = name.split(".")
        for i in range(len(parts), -1, -1):
            prefix = ".".join(parts[:i])
            if prefix in device_map:
                return device_map[prefix]
        raise InvalidArgumentError(
            "the device_map does not cover a parameter",
            expected="a device for every module",
            found=f"none for {name!r}",
            fix='add it, or use device_map="auto"',
        )

    return lookup
