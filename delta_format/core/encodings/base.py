"""The encoding contract: what every encoding of SPEC §5 is, and the table of them by name.

An encoding is one class in ``encodings/<name>.py`` holding its whole spec section: the name,
the JSON config, the stored tensors by role, and every way the stored tensors are used.
Subclassing registers it (as gguf-py's quant types or zarr's codecs)::

    class SignEncoding(Encoding, name="sign"):
        BITS = "bits"                        # role names, used instead of string literals
        SCALE = "scale"

The contract, closed on both sides (writers call the first two, readers the rest):

* ``encode(delta, *, name="", dtype=None, **given) -> {role: tensor}``: one signature for all.
  ``delta`` is the (edited) delta as a tensor of the parameter's shape (for ``replace``: the new
  value); ``name`` the parameter name (the seeded mask depends on it); ``dtype`` the dtype of
  stored floats (default: ``delta``'s). ``given`` carries what the caller already has and the
  encoding would otherwise compute, by keyword: precomputed role tensors under their role name
  (e.g. sparse ``values``), or hints (sparse ``positions``/``keep``, sign ``scale``, low-rank
  ``u``/``v``). Each encoding documents the keywords it takes; others are a ``TypeError``.
* ``from_dict``/``to_dict``: the manifest's ``config`` object, validated field by field.
* ``expected(shape)``: the stored tensors a parameter of ``shape`` must have (`Expected`), so a
  reader validates a file before decoding anything.
* ``decode``: the delta in a given dtype (for a value encoding, the value; ``bitdiff`` also takes
  the base, see `Encoding.needs_base`); ``rows``: the delta times alpha, added into an
  accumulator a block of rows at a time (`RowDelta`, what loading uses).
* ``factor``: the delta of a matrix kept in stored form for a forward pass (on-the-fly
  adapters, `Factor`). The base method refuses (`UnsupportedOnTheFlyError`), so whether an
  encoding can be applied on the fly is whether it overrides ``factor``.
* ``label()``: a short description for tables (``delta-format inspect``).

An encoding knows nothing about edit methods, files or the Hub.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ...errors import CorruptDeltaError, ManifestError, UnknownEncodingError, UnsupportedOnTheFlyError
from .. import native
from ..registry import Registered, Registry

if TYPE_CHECKING:
    from .factor import Factor


@dataclass(frozen=True)
class Expected:
    """One stored tensor an encoding expects: its allowed safetensors dtypes and exact shape
    (``None`` where the length depends on data and is checked at decode time, e.g. sparse values)."""

    dtypes: tuple[str, ...]
    shape: tuple[int | None, ...]

    def check(self, key: str, dtype: str, shape: tuple[int, ...]) -> None:
        if dtype not in self.dtypes:
            raise CorruptDeltaError(
                f"stored tensor {key!r} has the wrong dtype",
                expected=" or ".join(self.dtypes),
                found=dtype,
                fix="the delta's files disagree with its manifest; re-download or re-create it",
            )
        if len(shape) != len(self.shape) or any(e is not None and e != f for e, f in zip(self.shape, shape)):
            want = "[" + ", ".join("n" if e is None else str(e) for e in self.shape) + "]"
            raise CorruptDeltaError(
                f"stored tensor {key!r} has the wrong shape",
                expected=want,
                found=list(shape),
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

    def native_part(self) -> Any:
        """This delta as the native one-pass loop takes it (a `native.SignPart` or
        `native.SparsePart`, checked as a walk of `add_rows` would be), or None (the default)
        where it has no such form: the parameter is then formed block by block."""
        return None


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


class ComputedRows(RowDelta):
    """A delta computed a block of rows at a time by ``block(start, stop)`` (``[stop - start, cols]``
    in the compute dtype): a load never holds it whole (a vocabulary-sized table's would be 4
    bytes an element in float32)."""

    def __init__(self, block: Callable[[int, int], torch.Tensor], alpha: float):
        self.block, self.alpha = block, alpha

    def add_rows(self, acc, start, stop):
        acc.add_(scaled(self.block(start, stop), self.alpha).to(acc.dtype))


ENCODING_CLASSES: Registry[Encoding] = Registry("encoding")
"""Every registered encoding by manifest name, filled by subclassing `Encoding` with a name."""

MATERIALISE_FIX = "serve this fine-tune materialised: DeltaModel.from_pretrained(...) or model.swap_delta(...)"


class Encoding(Registered):
    """Base class of the encodings (the contract is in this module's docstring).

    ``class X(Encoding, name="x")`` registers ``X`` in `ENCODING_CLASSES`; a name already taken
    is refused (a second class must not silently change how existing files decode). Subclasses
    implement `from_dict`, `to_dict`, `expected`, `encode` and `decode`, and override `rows`,
    `factor` and `label` where they can do better than the defaults.
    """

    registry = ENCODING_CLASSES
    is_delta: ClassVar[bool] = True
    """False for encodings whose decode gives the value itself (``replace``, ``bitdiff``): the
    base is not added, and alpha != 1 follows ``replace``'s rule (SPEC §5.5, §9)."""
    needs_base: ClassVar[bool] = True
    """Whether rebuilding the parameter reads the base tensor: every delta encoding, and value
    encodings stored relative to the base (``bitdiff``), whose ``decode`` then takes the base,
    rounded to the parameter's dtype, as the keyword ``base``. False for ``replace`` alone."""

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> Encoding:
        """Build from the manifest's ``config`` object, validating every field."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``config`` object."""
        raise NotImplementedError

    def expected(self, shape: tuple[int, ...]) -> dict[str, Expected]:
        """Stored tensors by role for a parameter of ``shape``; raises `ManifestError` if the
        encoding cannot apply to that shape."""
        raise NotImplementedError

    def encode(
        self, delta: torch.Tensor, *, name: str = "", dtype: torch.dtype | None = None, **given: Any
    ) -> dict[str, torch.Tensor]:
        """The stored tensors by role for ``delta`` (see the module docstring for ``given``)."""
        raise NotImplementedError

    def decode(
        self, stored: Mapping[str, torch.Tensor], shape: tuple[int, ...], name: str, dtype: torch.dtype
    ) -> torch.Tensor:
        """Rebuild the delta (or, for a value encoding, the value) of ``shape`` in ``dtype`` on
        the stored tensors' device. Value encodings that need the base (``needs_base``) also take
        ``base=``, the base tensor in the parameter's dtype, and decode on its device."""
        raise NotImplementedError

    def rows(
        self,
        stored: Mapping[str, torch.Tensor],
        shape: tuple[int, ...],
        name: str,
        dtype: torch.dtype,
        alpha: float = 1.0,
    ) -> RowDelta:
        """The delta times ``alpha`` (SPEC §9: the product rounded in ``dtype``), validated and
        ready to be added into an accumulator a block of rows at a time (`RowDelta`).

        The default decodes the whole delta once; encodings override it to decode only the rows
        asked for (sign, sparse, dense), which keeps a load's temporaries cache-sized."""
        return DecodedRows(self.decode(stored, shape, name, dtype), alpha)

    def factor(
        self,
        stored: Mapping[str, torch.Tensor],
        shape: tuple[int, int],
        name: str,
        dtype: torch.dtype,
        alpha: float = 1.0,
        *,
        compute: torch.dtype = torch.float32,
    ) -> Factor:
        """``alpha * delta`` of the matrix ``name`` kept in stored form for a forward pass, held in
        ``dtype`` (the weight's), validated as a load validates it, with SPEC §9's product
        ``alpha * delta`` rounded in ``compute``.

        Raises:
            UnsupportedOnTheFlyError: the encoding has no on-the-fly form (this default).
        """
        raise not_on_the_fly(name, self.name)

    @classmethod
    def on_the_fly(cls) -> bool:
        """Whether a matrix stored in this encoding can be applied on the fly (overrides `factor`)."""
        return cls.factor is not Encoding.factor

    def label(self) -> str:
        """A short description for tables, e.g. ``sparse(seeded p=0.9, x10)``; the name by default."""
        return self.name

    def accumulate(
        self, target: torch.Tensor, stored: Mapping[str, torch.Tensor], shape: tuple[int, ...], name: str, alpha: float
    ) -> None:
        """``target += alpha * decode(...)`` in place (SPEC §9: the product is rounded first)."""
        rows, cols = matrix_shape(shape)
        delta = self.rows(stored, shape, name, target.dtype, alpha)
        delta.add_rows(target.view(rows, cols), 0, rows)
        delta.finish()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


def on_the_fly_encodings() -> list[str]:
    """Names of the registered encodings that a matrix may have to be applied on the fly."""
    return sorted(name for name, cls in ENCODING_CLASSES.items() if cls.on_the_fly())


def not_on_the_fly(name: str, encoding: str) -> UnsupportedOnTheFlyError:
    """The error for a matrix ``name`` stored as ``encoding``, which has no on-the-fly form."""
    return UnsupportedOnTheFlyError(
        f"{name!r} is stored as {encoding!r}, which cannot be applied on the fly to a matrix",
        expected=" or ".join(on_the_fly_encodings()),
        found=encoding,
        fix=MATERIALISE_FIX,
    )


def encoding_from_dict(name: str, config: Mapping[str, Any]) -> Encoding:
    """Look an encoding up by its manifest name and build it from its config."""
    cls = ENCODING_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UnknownEncodingError(
            "unknown encoding",
            expected=sorted(ENCODING_CLASSES),
            found=repr(name),
            fix="upgrade delta-format, or re-create the delta with a known encoding",
        )
    return cls.from_dict(config)


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
        raise ManifestError(
            f"{name} config field {key!r} is not a finite number", expected="a number", found=repr(value)
        )
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
    if not tensor.is_floating_point():
        return
    finite = native.all_finite(tensor)
    if finite is None:
        finite = bool(torch.isfinite(tensor).all())
    if not finite:
        raise CorruptDeltaError(
            f"stored tensor {name}:{role} holds NaN or Inf",
            expected="finite values",
            found="non-finite values",
            fix="the delta is corrupt; re-create it",
        )
