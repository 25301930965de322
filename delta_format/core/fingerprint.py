"""Base fingerprints (SPEC §7): cheap evidence that a base is the one a delta was made against.

For every tensor of the base checkpoint: its name, safetensors dtype, shape, and a SHA-256 of a
sample of its bytes (all bytes up to 4 KiB; otherwise 64 chunks of 64 bytes at evenly spaced
offsets). Computing it reads ~4 KiB per tensor, straight from the safetensors files, so it costs
milliseconds even for large models, and catches another architecture, another size, or the same
shapes with other weights (another revision, another fine-tune).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import BaseMismatchError, CorruptDeltaError, ManifestError
from .constants import (
    FINGERPRINT_ALGORITHM,
    FINGERPRINT_CHUNK_BYTES,
    FINGERPRINT_CHUNKS,
    FINGERPRINT_FULL_BYTES,
    MAX_SAFETENSORS_HEADER_BYTES,
)
from .dtypes import dtype_name


def sample_ranges(nbytes: int) -> list[tuple[int, int]]:
    """(offset, length) of the sampled byte ranges of a tensor of ``nbytes`` bytes."""
    if nbytes <= FINGERPRINT_FULL_BYTES:
        return [(0, nbytes)]
    last = nbytes - FINGERPRINT_CHUNK_BYTES
    return [(i * last // (FINGERPRINT_CHUNKS - 1), FINGERPRINT_CHUNK_BYTES) for i in range(FINGERPRINT_CHUNKS)]


def _entry(dtype: str, shape: list[int], sample: bytes) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "sample": hashlib.sha256(sample).hexdigest()[:32]}


def _finish(tensors: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ordered = dict(sorted(tensors.items()))
    canonical = json.dumps(ordered, sort_keys=True, separators=(",", ":")).encode()
    return {"algorithm": FINGERPRINT_ALGORITHM, "digest": hashlib.sha256(canonical).hexdigest(), "tensors": ordered}


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, header dict) of a safetensors file, with the size limits of SPEC §8."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CorruptDeltaError(
                f"{path.name} is not a safetensors file", expected="an 8-byte header length", found=f"{size} bytes"
            )
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_SAFETENSORS_HEADER_BYTES or 8 + length > size:
            raise CorruptDeltaError(
                f"{path.name} has an impossible header length",
                expected=f"at most {min(MAX_SAFETENSORS_HEADER_BYTES, size - 8)} bytes",
                found=f"{length}",
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptDeltaError(
                f"{path.name} has an unreadable header", expected="JSON", found=str(exc)[:100]
            ) from None
    if not isinstance(header, dict):
        raise CorruptDeltaError(
            f"{path.name} has an unreadable header", expected="a JSON object", found=type(header).__name__
        )
    return 8 + length, header


def fingerprint_safetensors(files: Iterable[str | os.PathLike]) -> dict[str, Any]:
    """Fingerprint of a checkpoint stored as safetensors files (reads only the sampled bytes)."""
    tensors: dict[str, dict[str, Any]] = {}
    for file in files:
        path = Path(file)
        start, header = read_safetensors_header(path)
        with open(path, "rb") as f:
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                try:
                    begin, end = info["data_offsets"]
                    dtype, shape = info["dtype"], info["shape"]
                except (TypeError, KeyError, ValueError):
                    raise CorruptDeltaError(
                        f"{path.name}: entry {name!r} is malformed",
                        expected="dtype, shape, data_offsets",
                        found=repr(info)[:100],
                    ) from None
                if not (type(begin) is int and type(end) is int and 0 <= begin <= end):
                    raise CorruptDeltaError(
                        f"{path.name}: entry {name!r} has impossible data offsets",
                        expected="two integers 0 <= begin <= end",
                        found=repr(info.get("data_offsets"))[:100],
                    )
                at = start + begin
                sample = b"".join(_read_at(f, at + offset, length) for offset, length in sample_ranges(end - begin))
                tensors[name] = _entry(dtype, shape, sample)
    return _finish(tensors)


def _read_at(f, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` (fewer at the end of the file): one ``pread`` where the
    platform has it (a seek and a read otherwise)."""
    if hasattr(os, "pread"):
        return os.pread(f.fileno(), length, offset)
    f.seek(offset)
    return f.read(length)


def fingerprint_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Fingerprint of in-memory tensors; equal to `fingerprint_safetensors` of the same tensors
    saved with safetensors (little-endian bytes, row-major)."""
    tensors: dict[str, dict[str, Any]] = {}
    for name, tensor in state.items():
        flat = tensor.detach().reshape(-1)
        raw = flat.contiguous().view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
        sample = b"".join(bytes(raw[o : o + n].cpu().numpy().tobytes()) for o, n in sample_ranges(raw.numel()))
        tensors[name] = _entry(dtype_name(tensor.dtype) or str(tensor.dtype), list(tensor.shape), sample)
    return _finish(tensors)


def validate_fingerprint(fp: Any) -> None:
    """Structure check of a fingerprint read from an untrusted manifest."""
    ok = (
        isinstance(fp, Mapping)
        and isinstance(fp.get("algorithm"), str)
        and isinstance(fp.get("digest"), str)
        and isinstance(fp.get("tensors"), Mapping)
        and all(
            isinstance(v, Mapping)
            and isinstance(v.get("dtype"), str)
            and isinstance(v.get("shape"), list)
            and isinstance(v.get("sample"), str)
            for v in fp["tensors"].values()
        )
    )
    if not ok:
        raise ManifestError(
            "base.fingerprint is malformed",
            expected="algorithm, digest and tensors{dtype, shape, sample}",
            found=repr(fp)[:200],
        )
    if fp["algorithm"] != FINGERPRINT_ALGORITHM:
        raise ManifestError(
            "unknown fingerprint algorithm",
            expected=FINGERPRINT_ALGORITHM,
            found=repr(fp["algorithm"]),
            fix="upgrade delta-format",
        )


def fingerprint_differences(expected: Mapping[str, Any], found: Mapping[str, Any], limit: int = 5) -> list[str]:
    """Human-readable differences, most telling first (missing, extra, shape/dtype, content)."""
    if expected["digest"] == found["digest"]:
        return []
    want, have = expected["tensors"], found["tensors"]
    out = [f"missing tensor {n!r}" for n in sorted(want.keys() - have.keys())]
    out += [f"unexpected tensor {n!r}" for n in sorted(have.keys() - want.keys())]
    for name in sorted(want.keys() & have.keys()):
        w, h = want[name], have[name]
        if (w["dtype"], w["shape"]) != (h["dtype"], h["shape"]):
            out.append(f"{name!r} is {h['dtype']}{h['shape']}, expected {w['dtype']}{w['shape']}")
        elif w["sample"] != h["sample"]:
            out.append(f"{name!r} has other weights")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out or ["digest differs"]


def check_fingerprint(expected: Mapping[str, Any], found: Mapping[str, Any], base: str) -> None:
    """Raise `BaseMismatchError` if the base's fingerprint is not the recorded one."""
    differences = fingerprint_differences(expected, found)
    if differences:
        raise BaseMismatchError(
            f"the base model {base} is not the one this delta was made against",
            expected=f"fingerprint {expected['digest'][:16]}",
            found=f"{found['digest'][:16]} ({'; '.join(differences)})",
            fix="load the base the delta names, or pass verify_base=False if you know better",
        )
