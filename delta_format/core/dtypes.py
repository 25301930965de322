"""Every dtype the format names, in one table (SPEC §3.4, §4.2), and the one parser of dtype
arguments.

Three vocabularies meet here: a manifest names a parameter's dtype as torch spells it without the
prefix (``"bfloat16"``), safetensors names a stored tensor's dtype (``"BF16"``), and users pass
either a ``torch.dtype`` or a string (``"bfloat16"``, ``"torch.bfloat16"``, ``"auto"``).
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""Parameter dtypes a manifest may name (SPEC §3.4): the floating dtypes a delta can edit."""

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "I32": torch.int32,
    "I64": torch.int64,
}
"""dtypes a delta's stored tensors may have, by their safetensors names (SPEC §4.2)."""

FLOAT_STORED = ("F64", "F32", "F16", "BF16")
"""Stored dtypes of floating values (kept entries, factors, scales, whole values)."""

CHECKPOINT_DTYPES: dict[str, torch.dtype] = {
    **SAFETENSORS_DTYPES,
    "I16": torch.int16,
    "I8": torch.int8,
    "BOOL": torch.bool,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
"""Every safetensors dtype a model checkpoint (base or fine-tune) may hold that torch can read."""

_SAFETENSORS_NAMES = {dtype: name for name, dtype in CHECKPOINT_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str | None:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``), or None."""
    return _SAFETENSORS_NAMES.get(dtype)


def torch_dtype_name(dtype: torch.dtype) -> str | None:
    """The manifest name of a parameter dtype (``torch.bfloat16`` -> ``"bfloat16"``), or None
    for dtypes a delta cannot edit."""
    name = str(dtype).removeprefix("torch.")
    return name if TORCH_DTYPES.get(name) == dtype else None


def compute_dtype(target: torch.dtype) -> torch.dtype:
    """Arithmetic precision of reconstruction (SPEC §9): float64 for float64 targets, else float32."""
    return torch.float64 if target == torch.float64 else torch.float32


def holds_exactly(dtype: torch.dtype, stored: str) -> bool:
    """Whether a tensor of ``dtype`` holds every value of the safetensors dtype ``stored`` (so
    casting back gives the stored bits): the same dtype, or a wider float."""
    wider = {torch.float64: FLOAT_STORED, torch.float32: ("F32", "F16", "BF16")}
    return stored == dtype_name(dtype) or stored in wider.get(dtype, ())


def parse_dtype(value: object, *, what: str = "dtype", allow_auto: bool = False) -> torch.dtype | None:
    """A user's dtype argument as a torch dtype: ``None`` (and ``"auto"`` where allowed) stay
    None, meaning "the checkpoint's own"; anything but a floating dtype a delta can hold is an
    `InvalidArgumentError`."""
    if value is None or (allow_auto and value == "auto"):
        return None
    if isinstance(value, torch.dtype) and torch_dtype_name(value):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in TORCH_DTYPES:
        return TORCH_DTYPES[value.removeprefix("torch.")]
    choices = sorted(TORCH_DTYPES) + (["auto"] if allow_auto else [])
    raise InvalidArgumentError(f"invalid {what}", expected=" or ".join(choices), found=repr(value)[:100])


__all__ = [
    "TORCH_DTYPES",
    "SAFETENSORS_DTYPES",
    "FLOAT_STORED",
    "CHECKPOINT_DTYPES",
    "dtype_name",
    "torch_dtype_name",
    "compute_dtype",
    "holds_exactly",
    "parse_dtype",
]
