"""The manifest, ``delta_config.json`` (SPEC §3): dataclasses that mirror the JSON, with validation.

`Manifest.from_dict` is the one place untrusted JSON becomes typed objects: every field is checked
(type, range, known names) and the spec version is compared with the versions this reader knows.
"""

from __future__ import annotations

import gc
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgumentError, ManifestError, UnsupportedVersionError
from .constants import (
    BASE_ROWS,
    FORMAT_NAME,
    MAX_ADDED_ROWS,
    MAX_MANIFEST_BYTES,
    MAX_RANK_DIMS,
    MAX_TENSOR_ELEMENTS,
    ROUNDING_NEAREST,
    ROUNDINGS,
    SPEC_VERSION,
    STORED_KEY_SEPARATOR,
    SUPPORTED_MAJOR_VERSIONS,
)
from .dtypes import TORCH_DTYPES
from .encodings import Encoding, encoding_from_dict
from .files_table import parse_files
from .strict_json import loads_strict

_VERSION = re.compile(r"^(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_REPO_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"(?!.*(--|\.\.)){_REPO_PART}(?:/{_REPO_PART})?")
NUMERIC_STATS = (
    "stored_bytes",
    "finetune_bytes",
    "compression_ratio",
    "rel_error",
    "relative_error",
    "output_error",
    "loss_change_estimate",
)
"""Stats fields that are read as numbers (inspect, model card); others are free-form."""


def spec_version_string(version: tuple[int, int] = SPEC_VERSION) -> str:
    return f"{version[0]}.{version[1]}"


def parse_spec_version(value: Any) -> tuple[int, int]:
    """``"1.0"`` -> ``(1, 0)``; refuses malformed strings and unknown major versions."""
    match = _VERSION.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise ManifestError("malformed spec_version", expected='"MAJOR.MINOR", e.g. "1.0"', found=repr(value))
    version = (int(match.group(1)), int(match.group(2)))
    if version[0] not in SUPPORTED_MAJOR_VERSIONS:
        newer = version[0] > max(SUPPORTED_MAJOR_VERSIONS)
        raise UnsupportedVersionError(
            "the delta uses a spec version this reader does not support",
            expected=f"major version {' or '.join(map(str, SUPPORTED_MAJOR_VERSIONS))}",
            found=value,
            fix="upgrade delta-format (pip install -U delta-format)" if newer else "re-create the delta",
        )
    return version


def _obj(where: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ManifestError(f"{where} is not an object", expected="a JSON object", found=type(value).__name__)
    return value


def _opt_str(where: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ManifestError(f"{where} is not a string", expected="a string or null", found=repr(value))
    return value


def parse_shape(where: str, value: Any) -> tuple[int, ...]:
    """A shape: at most 8 non-negative ints whose product stays under the element limit."""
    if (
        not isinstance(value, list)
        or len(value) > MAX_RANK_DIMS
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in value)
    ):
        raise ManifestError(
            f"{where} shape is invalid",
            expected=f"a list of at most {MAX_RANK_DIMS} integers >= 0",
            found=repr(value)[:200],
        )
    if math.prod(value) > MAX_TENSOR_ELEMENTS:
        raise ManifestError(
            f"{where} shape is too large", expected=f"at most {MAX_TENSOR_ELEMENTS} elements", found=value
        )
    return tuple(value)


def parse_stats(where: str, value: Any) -> dict[str, Any]:
    """A ``stats`` object: free-form, except that the fields read as numbers are numbers."""
    stats = _obj(where, value)
    for key in NUMERIC_STATS:
        number = stats.get(key)
        if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))):
            raise ManifestError(f"{where}.{key} is not a number", expected="a number", found=repr(number)[:100])
    return dict(stats)


def stored_key(name: str, role: str) -> str:
    """The safetensors key of one stored tensor of parameter ``name``: ``<name>:<role>`` (SPEC §4)."""
    return f"{name}{STORED_KEY_SEPARATOR}{role}"


def rounding_allowed(rounding: Any, encoding: Encoding) -> bool:
    """SPEC §3.4: one of `ROUNDINGS`, and ``"nearest"`` for a value encoding (replace, bitdiff)."""
    return rounding in ROUNDINGS and (rounding == ROUNDING_NEAREST or encoding.is_delta)


def base_rows_problem(base_rows: Any, encoding: Encoding, shape: tuple[int, ...]) -> str | None:
    """What is wrong with a ``base_rows`` value (SPEC §3.4, §9.2), or None: absent, or, for a delta
    encoding of a parameter with at least one dimension, an integer in [0, shape[0])."""
    if base_rows is None:
        return None
    if not encoding.is_delta:
        return f"no base_rows: a {encoding.name} entry is a value, not a delta (SPEC §3.4)"
    if not shape:
        return "no base_rows on a scalar parameter"
    if isinstance(base_rows, bool) or not isinstance(base_rows, int) or not 0 <= base_rows < shape[0]:
        return f"an integer in [0, {shape[0]}): fewer rows than the parameter's {shape[0]}"
    if shape[0] - base_rows > max(base_rows, MAX_ADDED_ROWS):
        return f"at most max(base_rows, {MAX_ADDED_ROWS}) added rows (SPEC §8.1), not {shape[0] - base_rows}"
    return None


@dataclass
class TensorEntry:
    """How one parameter is rebuilt: ``theta = cast(base + alpha * decode(stored), dtype)``."""

    encoding: Encoding
    shape: tuple[int, ...]
    dtype: str
    alpha: float = 1.0
    stats: dict[str, Any] = field(default_factory=dict)
    rounding: str = ROUNDING_NEAREST
    """How the sum is rounded to a half-precision result (SPEC §9.1): stored as the ``rounding``
    key of a delta encoding's config, which readers before 1.3 refuse as unknown."""
    base_rows: int | None = None
    """The base's row count where it has fewer rows than ``shape`` (a resized vocabulary, SPEC
    §9.2): the delta is added to the base extended with zero rows. Stored as the ``base_rows`` key
    of a delta encoding's config, which readers before 1.5 refuse as unknown."""

    def __post_init__(self):
        if not rounding_allowed(self.rounding, self.encoding):
            raise InvalidArgumentError(
                f"a {self.encoding.name} entry cannot have rounding {self.rounding!r}",
                expected=f"one of {list(ROUNDINGS)}, and 'nearest' for a value encoding (replace, bitdiff)",
                found=repr(self.rounding)[:100],
                fix="pass rounding='nearest', 'stochastic' or 'stochastic-window' (SPEC §9.1)",
            )
        problem = base_rows_problem(self.base_rows, self.encoding, self.shape)
        if problem:
            raise InvalidArgumentError(
                f"a {self.encoding.name} entry of shape {list(self.shape)} cannot have base_rows {self.base_rows!r}",
                expected=problem,
                found=repr(self.base_rows)[:100],
                fix="give base_rows only where the base has fewer rows than the fine-tune (SPEC §9.2)",
            )

    @property
    def base_shape(self) -> tuple[int, ...]:
        """The shape the base tensor must have: ``shape``, or fewer rows where ``base_rows`` says so."""
        shape = tuple(self.shape)
        return shape if self.base_rows is None else (self.base_rows, *shape[1:])

    def to_dict(self) -> dict[str, Any]:
        config = self.encoding.to_dict()
        if self.rounding != ROUNDING_NEAREST:
            config = {**config, "rounding": self.rounding}
        if self.base_rows is not None:
            config = {**config, BASE_ROWS: self.base_rows}
        out: dict[str, Any] = {
            "encoding": self.encoding.name,
            "config": config,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "alpha": self.alpha,
        }
        if self.stats:
            out["stats"] = self.stats
        return out

    @classmethod
    def from_dict(cls, name: str, data: Any) -> TensorEntry:
        where = f"tensor {name!r}"
        data = _obj(where, data)
        for key in ("encoding", "shape", "dtype"):
            if key not in data:
                raise ManifestError(f"{where} lacks {key!r}", expected="encoding, shape and dtype", found=sorted(data))
        if not isinstance(data["dtype"], str) or data["dtype"] not in TORCH_DTYPES:
            raise ManifestError(
                f"{where} has an unsupported dtype", expected=sorted(TORCH_DTYPES), found=repr(data["dtype"])
            )
        alpha = data.get("alpha", 1.0)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ManifestError(f"{where} alpha is not a finite number", expected="a number", found=repr(alpha))
        shape = parse_shape(where, data["shape"])
        config = data.get("config", {})
        rounding, base_rows = ROUNDING_NEAREST, None
        if isinstance(config, dict) and ("rounding" in config or BASE_ROWS in config):
            config = dict(config)
            rounding = config.pop("rounding", ROUNDING_NEAREST)
            base_rows = config.pop(BASE_ROWS, None)
            if base_rows is None and BASE_ROWS in data["config"]:
                raise ManifestError(f"{where} has base_rows null", expected="an integer or no such key", found="null")
        encoding = encoding_from_dict(data["encoding"], config)
        if not rounding_allowed(rounding, encoding):
            raise ManifestError(
                f"{where} has an invalid rounding",
                expected=f"one of {list(ROUNDINGS)}"
                if encoding.is_delta
                else f"no rounding key: a {data['encoding']} entry is a value, not a delta (SPEC §3.4)",
                found=repr(rounding)[:100],
                fix="upgrade delta-format if the delta was written for a newer spec; otherwise re-create it",
            )
        encoding.expected(shape)  # refuses encodings that cannot apply to this shape
        problem = base_rows_problem(base_rows, encoding, shape)
        if problem:
            raise ManifestError(
                f"{where} has an invalid base_rows",
                expected=problem,
                found=repr(base_rows)[:100],
                fix="upgrade delta-format if the delta was written for a newer spec; otherwise re-create it",
            )
        stats = parse_stats(f"{where} stats", data.get("stats", {}))
        stored = stats.get("stored_bytes", 0)
        if not isinstance(stored, int) or stored < 0:
            raise ManifestError(
                f"{where} stats.stored_bytes is invalid", expected="an integer >= 0", found=repr(stored)[:100]
            )
        return cls(encoding, shape, data["dtype"], float(alpha), dict(stats), rounding, base_rows)


@dataclass
class BaseReference:
    """Which base the delta needs: a Hub repo pinned to a commit, or a local path, plus its
    fingerprint (SPEC §7) so the loader can check it has the right one."""

    repo_id: str | None = None
    revision: str | None = None
    local_path: str | None = None
    fingerprint: dict[str, Any] | None = None

    def describe(self) -> str:
        if self.repo_id:
            return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id
        return self.local_path or "<unknown base>"

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "local_path": self.local_path,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, data: Any) -> BaseReference:
        data = _obj("base", data)
        ref = cls(
            _opt_str("base.repo_id", data.get("repo_id")),
            _opt_str("base.revision", data.get("revision")),
            _opt_str("base.local_path", data.get("local_path")),
            data.get("fingerprint"),
        )
        for value, pattern, what, expected, fix in (
            (ref.repo_id, _REPO_ID, "base.repo_id is not a Hub repository id",
             "name or namespace/name of letters, digits, '-', '_', '.'",
             "re-create the delta, or pass base_model= explicitly"),
            (ref.revision, _SHA, "base.revision is not a commit", "40 lowercase hex digits (a pinned commit)",
             "re-create the delta against a pinned base commit"),
        ):  # fmt: skip
            if value is not None and not pattern.fullmatch(value):
                raise ManifestError(what, expected=expected, found=repr(value)[:100], fix=fix)
        if ref.fingerprint is not None:
            from .fingerprint import validate_fingerprint

            validate_fingerprint(ref.fingerprint)
        return ref


@dataclass
class Manifest:
    """The whole manifest. ``tensors`` maps a parameter name (as in the fine-tune's checkpoint)
    to its `TensorEntry`; parameters not listed are the base's, unchanged."""

    base: BaseReference
    method: str
    method_params: dict[str, Any]
    tensors: dict[str, TensorEntry]
    stats: dict[str, Any] = field(default_factory=dict)
    spec_version: str = field(default_factory=spec_version_string)
    created_by: str | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Size and SHA-256 of every tensor file (SPEC §3.5): a reader checks them before decoding,
    so a flipped bit in a shard is an error, never a silently wrong weight."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT_NAME,
            "spec_version": self.spec_version,
            "created_by": self.created_by,
            "base": self.base.to_dict(),
            "method": {"name": self.method, "params": self.method_params},
            "tensors": {name: entry.to_dict() for name, entry in self.tensors.items()},
            "files": self.files,
        }
        if self.stats:
            out["stats"] = self.stats
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        data = _obj("manifest", data)
        if data.get("format") != FORMAT_NAME:
            raise ManifestError(
                "not a delta-format manifest",
                expected=f'format "{FORMAT_NAME}"',
                found=repr(data.get("format")),
                fix="point the loader at a directory written by delta-format",
            )
        version = data.get("spec_version")
        parse_spec_version(version)
        method = _obj("method", data.get("method"))
        if not isinstance(method.get("name"), str):
            raise ManifestError("method.name is missing", expected="a string", found=repr(method.get("name")))
        params = _obj("method.params", method.get("params", {}))
        tensors = _obj("tensors", data.get("tensors"))
        entries = {}
        for name, entry in tensors.items():
            if not name or len(name) > 1024:
                raise ManifestError("invalid tensor name", expected="1 to 1024 characters", found=repr(name[:80]))
            entries[name] = TensorEntry.from_dict(name, entry)
        return cls(
            base=BaseReference.from_dict(data.get("base")),
            method=method["name"],
            method_params=dict(params),
            tensors=entries,
            stats=parse_stats("stats", data.get("stats", {})),
            files=parse_files(data.get("files")),
            spec_version=version,
            created_by=_opt_str("created_by", data.get("created_by")),
        )

    @classmethod
    def from_json_bytes(cls, raw: bytes, source: str = "delta_config.json") -> Manifest:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"{source} is too large",
                expected=f"at most {MAX_MANIFEST_BYTES} bytes",
                found=f"{len(raw)} bytes",
                fix="this is not a delta manifest, or a hostile one",
            )
        # Hundreds of thousands of small containers make the cyclic GC rescan them over and over
        # (quadratic-looking time); none of them forms a cycle, so it is paused while parsing.
        paused = gc.isenabled()
        gc.disable()
        try:
            return cls.from_dict(loads_strict(raw, source))
        finally:
            if paused:
                gc.enable()
