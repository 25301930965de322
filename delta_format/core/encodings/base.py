"""What every encoding is: a name, a JSON config, stored tensors by role, and decode (SPEC §5).

An encoding knows nothing about edit methods, files or the Hub. It turns arrays into named stored
tensors (``encode``), says which stored tensors it expects for a parameter (``expected``) so a
reader can validate a file before decoding, and rebuilds the parameter's delta (``decode``) on the
requested device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ...errors import CorruptDeltaError, ManifestError


@dataclass(frozen=True)
class Expected:
    """One stored tensor an encoding expects: its allowed safetensors dtypes and exact shape
    (``None`` where the length depends on data and is checked at decode time, e.g. sparse values)."""

    dtypes: tuple[str, ...]
    shape: tuple[int | None, ...]

    def check(self, key: str, dtype: str, shape: tuple[int, ...]) -> None:
        if dtype not in self.dtypes:
            raise CorruptDeltaError(
                f"stored tensor {key!r} has the wrong dtype", expected=" or ".join(self.dtypes), found=dtype,
                fix="the delta's files disagree with its manifest; re-download or re-create it",
            )
        if len(shape) != len(self.shape) or any(e is not None and e != f for e, f in zip(self.shape, shape)):
            want = "[" + ", ".join("n" if e is None else str(e) for e in self.shape) + "]"
            raise CorruptDeltaError(
                f"stored tensor {key!r} has the wrong shape", expected=want, found=list(shape),
                fix="the delta's files disagree with its manifest; re-download or re-create it",
            )


def rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """A parameter viewed as a matrix: ``shape[0]`` rows of ``prod(shape[1:])`` columns."""
    return shape[0], math.prod(shape[1:])


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """`rows_cols`, with a scalar as one row of one column."""
    return rows_cols(tuple(shape)) if len(shape) else (1, 1)


class RowDelta:
    """One parameter's delta (times its alpha), validated, added into an accumulator by row blocks.

    The accumulator is the parameter viewed as a ``rows x cols`` matrix (`matrix_shape`) in the
    compute dtype. `add_rows` is called with consecutive blocks from row 0 to the last row, each
    once, which lets a sparse delta walk its positions front to back; `finish` then reports stored
    data that no row used (an index past the end, more values than positions).
    """

    def add_rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        """``acc += (alpha * delta)[start:stop]`` for ``acc`` the ``[stop - start, cols]`` block."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called after the last block; raises `CorruptDeltaError` for unused stored data."""


def scaled(delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * delta`` rounded in ``delta``'s dtype (SPEC §9), without touching ``delta``."""
    return delta if alpha == 1.0 else delta * alpha


class DecodedRows(RowDelta):
    """A delta decoded whole (encodings without a cheaper row-wise decode, e.g. ``lowrank``)."""

    def __init__(self, delta: torch.Tensor, alpha: float):
        self.delta = delta.reshape(matrix_shape(tuple(delta.shape)))
        self.alpha = alpha

    def add_rows(self, acc, start, stop):
        acc.add_(scaled(self.delta[start:stop].to(acc.dtype), self.alpha))


class Encoding:
    """Base class. Subclasses set ``name`` and implement the four hooks below."""

    name: ClassVar[str]

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "Encoding":
        """Build from the manifest's ``config`` object, validating every field."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``config`` object."""
        raise NotImplementedError

    def expected(self, shape: tuple[int, ...]) -> dict[str, Expected]:
        """Stored tensors by role for a parameter of ``shape``; raises `ManifestError` if the
        encoding cannot apply to that shape."""
        raise NotImplementedError

    def decode(
        self, stored: Mapping[str, torch.Tensor], shape: tuple[int, ...], name: str, dtype: torch.dtype
    ) -> torch.Tensor:
        """Rebuild the delta (or, for ``replace``, the value) of ``shape`` in ``dtype`` on the
        stored tensors' device."""
        raise NotImplementedError

    def rows(
        self, stored: Mapping[str, torch.Tensor], shape: tuple[int, ...], name: str, dtype: torch.dtype, alpha: float = 1.0
    ) -> "RowDelta":
        """The delta times ``alpha`` (SPEC §9: the product rounded in ``dtype``), validated and
        ready to be added into an accumulator a block of rows at a time (`RowDelta`).

        The default decodes the whole delta once; encodings override it to decode only the rows
        asked for (sign, sparse, dense), which keeps a load's temporaries cache-sized."""
        return DecodedRows(self.decode(stored, shape, name, dtype), alpha)

    def accumulate(
        self, target: torch.Tensor, stored: Mapping[str, torch.Tensor], shape: tuple[int, ...], name: str, alpha: float
    ) -> None:
        """``target += alpha * decode(...)`` in place (SPEC §9: the product is rounded first)."""
        rows, cols = matrix_shape(shape)
        delta = self.rows(stored, shape, name, target.dtype, alpha)
        delta.add_rows(target.view(rows, cols), 0, rows)
        delta.finish()

    is_delta: ClassVar[bool] = True
    """False for encodings that store the value itself (``replace``): the base is not added."""


def check_config_keys(name: str, config: Mapping[str, Any], required: set[str], optional: set[str]) -> None:
    """Refuse a config with missing or unknown keys (a typo must not silently mean a default)."""
    if not isinstance(config, Mapping):
        raise ManifestError(f"{name} config is not an object", expected="a JSON object", found=type(config).__name__)
    missing = required - config.keys()
    unknown = config.keys() - required - optional
    if missing or unknown:
        raise ManifestError(
            f"{name} config has the wrong fields",
            expected=f"required {sorted(required)}, optional {sorted(optional)}",
            found=f"missing {sorted(missing)}, unknown {sorted(unknown)}",
            fix="check the delta was written for this spec version",
        )


def config_number(name: str, config: Mapping[str, Any], key: str, default: float | None = None) -> float:
    """A finite JSON number from a config (bools are not numbers here)."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ManifestError(f"{name} config field {key!r} is not a finite number", expected="a number", found=repr(value))
    return float(value)


def config_int(name: str, config: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise ManifestError(
            f"{name} config field {key!r} is out of range", expected=f"an integer in [{low}, {high})", found=repr(value)
        )
    return value


def require_finite(name: str, role: str, tensor: torch.Tensor) -> None:
    """Stored floats must be finite: a NaN or Inf would silently poison the weights."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise CorruptDeltaError(
            f"stored tensor {name}:{role} holds NaN or Inf", expected="finite values", found="non-finite values",
            fix="the delta is corrupt; re-create it",
        )
