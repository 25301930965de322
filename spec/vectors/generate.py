"""Write the delta-format test vectors (SPEC §1-§9): ``/work/venv/bin/python spec/vectors/generate.py [OUT]``.

Each vector directory holds a delta written by the real `DeltaWriter`, the ``base.safetensors`` it
was made against and ``expected.safetensors``: every parameter of the fine-tune, reconstructed.
The expected tensors are computed here with numpy, following SPEC §9 step by step (float32
arithmetic, alpha and scales rounded to float32, one cast at the end), not with
`delta_format.core.reconstruct`; ``tests/test_spec_vectors.py`` checks the library and a second,
pure-Python decoder against them.

``seeded_mask.json`` holds known answers of the seeded-mask generator (SPEC §6), taken from the
library and checked in the tests against a reference written from the spec text.

Everything is deterministic: values come from an integer hash, not from an RNG, so running this
again writes the same bytes (the tests check that too). Only the directories and the JSON file
named here are replaced.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from delta_format.core import seeded_mask  # noqa: E402
from delta_format.core.constants import ROUNDING_SEED  # noqa: E402
from delta_format.core.encodings import (  # noqa: E402
    BitdiffEncoding,
    DenseEncoding,
    LowRankEncoding,
    QuantizedDenseEncoding,
    QuantizedLowRankEncoding,
    QuantizedRowsEncoding,
    QuantizedSparseEncoding,
    ReplaceEncoding,
    SignEncoding,
    SparseEncoding,
    SumEncoding,
)
from delta_format.core.fingerprint import fingerprint_safetensors  # noqa: E402
from delta_format.core.manifest import BaseReference, TensorEntry  # noqa: E402
from delta_format.core.quant import pack_codes, quantize  # noqa: E402
from delta_format.io.writer import DeltaWriter  # noqa: E402

VECTORS = (
    "dense",
    "sparse-gaps",
    "sparse-bitmask",
    "sparse-seeded",
    "sign-tensor",
    "sign-row",
    "sign-row-q",
    "lowrank",
    "replace",
    "sharded",
    "bitdiff",
    "dense-q",
    "sparse-q",
    "lowrank-q",
    "sum",
    "rounding",
    "rows-q",
    "grown",
)
SEEDED_P, SEEDED_SEED = 0.9, 0xDEADBEEFCAFEF00D
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


# ---------------------------------------------------------------------------------------------
# Deterministic values and exact casts (numpy has no bfloat16: it is float32's top 16 bits).
# ---------------------------------------------------------------------------------------------


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def values(shape: tuple[int, ...], salt: int, spread: float = 1.0) -> np.ndarray:
    """float32 values in about [-spread, spread) with all 24 mantissa bits in use."""
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.array([splitmix64(salt * 1_000_003 + i) >> 40 for i in range(n)], dtype=np.float64)  # 24 bits
    return ((raw / 2**23 - 1.0) * spread).astype(np.float32).reshape(shape)


def dyadic(shape: tuple[int, ...], salt: int) -> np.ndarray:
    """Small multiples of 1/8 in [-1, 1]: products and short sums of them are exact in every float."""
    n = int(np.prod(shape, dtype=np.int64))
    return np.array([(splitmix64(salt * 7919 + i) % 17 - 8) / 8 for i in range(n)], dtype=np.float32).reshape(shape)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), returned as float32 (inputs are finite)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` and held exactly as float32 (float64 stays float64)."""
    if dtype == "float64":
        return x.astype(np.float64)
    x = x.astype(np.float32)
    if dtype == "bfloat16":
        return bf16_round(x)
    return x.astype(NP_DTYPES[dtype]).astype(np.float32)


def as_torch(x: np.ndarray, dtype: str) -> torch.Tensor:
    """An array already rounded to ``dtype`` as a torch tensor of that dtype (exact)."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(TORCH[dtype])


# ---------------------------------------------------------------------------------------------
# SPEC §9 reconstruction, in numpy.
# ---------------------------------------------------------------------------------------------


def reconstruct(base: np.ndarray, delta: np.ndarray, alpha: float, dtype: str) -> np.ndarray:
    """cast(float32(base) + round32(round32(alpha) * delta), dtype); ``delta`` already decoded in float32."""
    acc = base.astype(np.float32)
    if alpha != 1.0:
        delta = (delta.astype(np.float32) * np.float32(alpha)).astype(np.float32)
    return rounded(acc + delta.astype(np.float32), dtype)


def scatter(numel: int, positions: np.ndarray, kept: np.ndarray, scale: float, shape) -> np.ndarray:
    out = np.zeros(numel, dtype=np.float32)
    out[positions] = kept.astype(np.float32) * np.float32(scale)
    return out.reshape(shape)


class Vector:
    """Collects one vector: base tensors, parameters added to the delta, expected tensors."""

    def __init__(self, root: Path, name: str):
        self.dir = root / name
        self.base: dict[str, tuple[np.ndarray, str]] = {}
        self.expected: dict[str, tuple[np.ndarray, str]] = {}
        self.params: list[tuple[str, TensorEntry, dict[str, torch.Tensor]]] = []
        self.side_files: dict[str, bytes] = {}

    def add_base(self, name: str, shape, dtype: str, salt: int, spread: float = 1.0, exact: bool = False) -> np.ndarray:
        x = rounded(dyadic(shape, salt) if exact else values(shape, salt, spread), dtype)
        self.base[name] = (x, dtype)
        self.expected[name] = (x, dtype)  # absent from the delta = the base's (SPEC §9)
        return x

    def add(self, name: str, entry: TensorEntry, stored: dict[str, torch.Tensor], expected: np.ndarray) -> None:
        self.params.append((name, entry, stored))
        self.expected[name] = (expected, entry.dtype)

    def write(self, method: str, method_params: dict, max_shard_size: int = 2**30) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        staging = self.dir.parent / f".{self.dir.name}.base"
        staging.mkdir(parents=True)
        base_path = staging / "base.safetensors"
        save_file({k: as_torch(v, d) for k, (v, d) in self.base.items()}, str(base_path))
        # The base lies beside the delta, so the reference names no repo or path: only its fingerprint.
        ref = BaseReference(fingerprint=fingerprint_safetensors([base_path]))
        with DeltaWriter(
            self.dir, base=ref, method=method, method_params=method_params, max_shard_size=max_shard_size
        ) as writer:
            for name, entry, stored in self.params:
                writer.add(name, entry, stored)
            for name, content in self.side_files.items():
                writer.add_file(name, content)
        base_path.rename(self.dir / "base.safetensors")
        staging.rmdir()
        save_file({k: as_torch(v, d) for k, (v, d) in self.expected.items()}, str(self.dir / "expected.safetensors"))


def entry(encoding, shape, dtype, alpha=1.0) -> TensorEntry:
    return TensorEntry(encoding, tuple(shape), dtype, alpha)


# ---------------------------------------------------------------------------------------------
# The vectors.
# ---------------------------------------------------------------------------------------------


def vector_dense(root: Path) -> None:
    v = Vector(root, "dense")
    for name, shape, salt in (("w", (4, 6), 1), ("b", (6,), 2), ("empty", (0, 4), 3)):
        base = v.add_base(name, shape, "float32", salt)
        delta = values(shape, salt + 100, 0.01)
        v.add(
            name,
            entry(DenseEncoding(), shape, "float32"),
            {"delta": torch.from_numpy(delta)},
            reconstruct(base, delta, 1.0, "float32"),
        )
    v.write("dense", {})


def vector_sparse_gaps(root: Path) -> None:
    v = Vector(root, "sparse-gaps")
    shape, scale = (8, 40), 2.0
    base = v.add_base("w", shape, "float32", 4)
    positions = np.array([0, 1, 7, 8, 9, 310, 311, 319])  # the gap 9 -> 310 is 300: stored as U16
    kept = values((len(positions),), 5, 0.01)
    enc = SparseEncoding("gaps", scale=scale)
    stored = enc.encode(
        torch.zeros(shape).view(-1).index_put_((torch.from_numpy(positions),), torch.from_numpy(kept)),
        name="w",
        positions=torch.from_numpy(positions),
    )
    assert stored["gaps"].dtype == torch.uint16
    v.add(
        "w",
        entry(enc, shape, "float32"),
        stored,
        reconstruct(base, scatter(320, positions, kept, scale, shape), 1.0, "float32"),
    )
    v.write("magnitude", {"density": 0.025})


def vector_sparse_bitmask(root: Path) -> None:
    v = Vector(root, "sparse-bitmask")
    shape = (5, 13)  # 65 elements: the mask's last byte has 7 padding bits
    base = v.add_base("w", shape, "float16", 6)
    positions = np.array([i for i in range(65) if splitmix64(i + 77) % 3 == 0] + [64])
    positions = np.unique(positions)
    kept = rounded(values((len(positions),), 7, 0.05), "float16")
    enc = SparseEncoding("bitmask")
    full = torch.zeros(65, dtype=torch.float16)
    full[torch.from_numpy(positions)] = as_torch(kept, "float16")
    stored = enc.encode(full.view(shape), name="w", positions=torch.from_numpy(positions))
    v.add(
        "w",
        entry(enc, shape, "float16"),
        stored,
        reconstruct(base, scatter(65, positions, kept, 1.0, shape), 1.0, "float16"),
    )
    v.write("magnitude", {"density": round(len(positions) / 65, 4)})


def vector_sparse_seeded(root: Path) -> None:
    v = Vector(root, "sparse-seeded")
    shape, scale = (16, 32), 1 / (1 - SEEDED_P)
    base = v.add_base("w", shape, "bfloat16", 8)
    delta = rounded(values(shape, 9, 0.01), "bfloat16")
    enc = SparseEncoding("seeded", scale=scale, seed=SEEDED_SEED, p=SEEDED_P)
    stored = enc.encode(as_torch(delta, "bfloat16"), name="w", dtype=torch.bfloat16)
    positions = seeded_mask.kept_positions(512, SEEDED_P, SEEDED_SEED, "w").numpy()
    kept = delta.reshape(-1)[positions]
    v.add(
        "w",
        entry(enc, shape, "bfloat16"),
        stored,
        reconstruct(base, scatter(512, positions, kept, scale, shape), 1.0, "bfloat16"),
    )
    v.write("dare", {"p": SEEDED_P, "seed": SEEDED_SEED})


def _sign_parts(delta: np.ndarray, rows: int, scale: np.ndarray) -> np.ndarray:
    signs = np.where(delta.reshape(rows, -1) >= 0, 1.0, -1.0).astype(np.float32)
    return (signs * scale.astype(np.float32).reshape(-1, 1)).reshape(delta.shape)


def vector_sign_tensor(root: Path) -> None:
    v = Vector(root, "sign-tensor")
    shape = (6, 11)  # 66 bits: 2 padding bits
    base = v.add_base("w", shape, "float32", 10)
    delta = values(shape, 11, 0.01)
    delta.reshape(-1)[5] = 0.0  # zero encodes as +scale (bit 1: delta >= 0)
    scale = rounded(np.abs(delta).mean(keepdims=True).reshape(1), "bfloat16")
    enc = SignEncoding("tensor")
    stored = enc.encode(torch.from_numpy(delta), scale=as_torch(scale, "bfloat16"), dtype=torch.bfloat16)
    v.add("w", entry(enc, shape, "float32"), stored, reconstruct(base, _sign_parts(delta, 1, scale), 1.0, "float32"))
    v.write("bitdelta", {"scale": "tensor"})


def vector_sign_row(root: Path) -> None:
    v = Vector(root, "sign-row")
    enc = SignEncoding("row")
    for name, shape, dtype, salt in (("w", (6, 11), "float16", 12), ("conv", (2, 3, 5), "float32", 14)):
        base = v.add_base(name, shape, dtype, salt)
        delta = values(shape, salt + 1, 0.01)
        scale = np.abs(delta.reshape(shape[0], -1)).mean(axis=1).astype(np.float32)
        stored = enc.encode(torch.from_numpy(delta), scale=torch.from_numpy(scale), dtype=torch.float32)
        v.add(
            name, entry(enc, shape, dtype), stored, reconstruct(base, _sign_parts(delta, shape[0], scale), 1.0, dtype)
        )
    v.write("bitdelta", {"scale": "row"})


def vector_sign_row_q(root: Path) -> None:
    """SPEC §5.3 (1.7): per-row scales as codes. "w": 13 rows at 8 bits in groups of 4 (4 groups, the
    last of one row); "c": a 3-D parameter, 5 rows at 3 bits in one group (15 bits: 1 padding bit)."""
    v = Vector(root, "sign-row-q")
    for name, shape, dtype, bits, group, salt in (
        ("w", (13, 7), "bfloat16", 8, 4, 16),
        ("c", (5, 2, 3), "float32", 3, 8, 18),
    ):
        base = v.add_base(name, shape, dtype, salt)
        delta = values(shape, salt + 1, 0.01)
        scale = np.abs(delta.reshape(shape[0], -1)).mean(axis=1).astype(np.float32)
        enc = SignEncoding("row", bits, group)
        stored = enc.encode(torch.from_numpy(delta), scale=torch.from_numpy(scale))
        codes, scales = quantize(torch.from_numpy(scale), bits, group, "absmax")
        assert torch.equal(stored["scale_codes"], pack_codes(codes, bits))
        decoded = dequantised(codes.numpy().reshape(-1), stored["scale_scales"].float().numpy(), bits, group)
        v.add(
            name, entry(enc, shape, dtype), stored, reconstruct(base, _sign_parts(delta, shape[0], decoded), 1.0, dtype)
        )
    v.write("bitdelta", {"scale": "row", "scale_bits": 8})


def vector_lowrank(root: Path) -> None:
    v = Vector(root, "lowrank")
    # Dyadic factors and base: every product and partial sum is exact, so the result does not
    # depend on the summation order of the matrix product (SPEC §5.4).
    for name, shape, rank, dtype, factor_dtype, salt in (
        ("w", (12, 10), 3, "float32", "float32", 20),
        ("conv", (4, 3, 5), 2, "bfloat16", "bfloat16", 23),
    ):
        base = v.add_base(name, shape, dtype, salt, exact=True)
        rows, cols = shape[0], int(np.prod(shape[1:]))
        u, w = dyadic((rows, rank), salt + 1) / 4, dyadic((rank, cols), salt + 2) / 4
        enc = LowRankEncoding(rank)
        product = (u.astype(np.float64) @ w.astype(np.float64)).astype(np.float32).reshape(shape)
        fu, fw = as_torch(u, factor_dtype), as_torch(w, factor_dtype)
        stored = enc.encode(torch.from_numpy(product), dtype=fu.dtype, u=fu, v=fw)
        v.add(name, entry(enc, shape, dtype), stored, reconstruct(base, product, 1.0, dtype))
    v.write("lowrank", {"rank": "per tensor"})


def vector_replace(root: Path) -> None:
    v = Vector(root, "replace")
    v.add_base("embed", (10, 8), "bfloat16", 30)  # resized to 12 rows by the fine-tune
    v.add_base("kept", (4,), "float32", 31)
    enc = ReplaceEncoding()
    embed = rounded(values((12, 8), 32), "bfloat16")
    head = values((3, 4), 33)
    # alpha 2 is recorded but does not apply to replace (SPEC §5.5), nor does the base.
    v.add("embed", entry(enc, (12, 8), "bfloat16", alpha=2.0), {"value": as_torch(embed, "bfloat16")}, embed)
    v.add("head.new", entry(enc, (3, 4), "float32"), {"value": torch.from_numpy(head)}, head)
    v.write("replace", {})


def vector_sharded(root: Path) -> None:
    v = Vector(root, "sharded")
    # Side files, one in a folder: listed in `files` with size and SHA-256 since 1.1 (SPEC §3.5).
    v.side_files["config.json"] = b'{"model_type": "vector"}\n'
    v.side_files["1_Pooling/config.json"] = b'{"pooling_mode_mean_tokens": true}\n'
    alpha = 0.3  # not a float32 value: SPEC §9 rounds it to float32 before multiplying
    base = v.add_base("layers.0.w", (16, 24), "float32", 40)
    delta = values((16, 24), 41, 0.01)
    v.add(
        "layers.0.w",
        entry(DenseEncoding(), (16, 24), "float32", alpha),
        {"delta": torch.from_numpy(delta)},
        reconstruct(base, delta, alpha, "float32"),
    )

    base = v.add_base("layers.0.b", (24,), "bfloat16", 42)
    delta = values((24,), 43, 0.01)
    v.add(
        "layers.0.b",
        entry(DenseEncoding(), (24,), "bfloat16", alpha),
        {"delta": torch.from_numpy(delta)},
        reconstruct(base, delta, alpha, "bfloat16"),
    )

    base = v.add_base("layers.1.w", (16, 24), "bfloat16", 44)
    positions = np.array([i for i in range(384) if splitmix64(i + 45) % 7 == 0])
    kept = values((len(positions),), 46, 0.01)
    enc = SparseEncoding("gaps", scale=1.25)
    full = torch.zeros(384)
    full[torch.from_numpy(positions)] = torch.from_numpy(kept)
    v.add(
        "layers.1.w",
        entry(enc, (16, 24), "bfloat16", 1.7),
        enc.encode(full, name="layers.1.w", positions=torch.from_numpy(positions)),
        reconstruct(base, scatter(384, positions, kept, 1.25, (16, 24)), 1.7, "bfloat16"),
    )

    base = v.add_base("layers.1.h", (8, 9), "float16", 47)
    delta = values((8, 9), 48, 0.01)
    scale = np.abs(delta).mean(axis=1).astype(np.float32)
    enc = SignEncoding("row")
    v.add(
        "layers.1.h",
        entry(enc, (8, 9), "float16", 0.5),
        enc.encode(torch.from_numpy(delta), scale=torch.from_numpy(scale), dtype=torch.float32),
        reconstruct(base, _sign_parts(delta, 8, scale), 0.5, "float16"),
    )

    base = v.add_base("big", (40, 40), "float32", 49)  # 6400 bytes: its fingerprint samples 64 chunks
    delta = values((40, 40), 50, 0.001)
    v.add(
        "big",
        entry(DenseEncoding(), (40, 40), "float32", alpha),
        {"delta": torch.from_numpy(delta)},
        reconstruct(base, delta, alpha, "float32"),
    )

    v.add_base("frozen", (4,), "float32", 51)  # not in the delta: the base's, unchanged
    v.write("mixed", {"alpha": alpha}, max_shard_size=300)


def from_bits(hex_bits: list[str], dtype: str) -> np.ndarray:
    """Exact values from bit patterns, held as `rounded` holds them (float32; float64 for float64)."""
    raw = np.array([int(h, 16) for h in hex_bits], dtype=np.uint64)
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype == "float16":
        return raw.astype(np.uint16).view(np.float16).astype(np.float32)
    return raw.astype(np.uint32).view(np.float32) if dtype == "float32" else raw.view(np.float64)


BITDIFF_CASES = (  # name, dtype, chunk, base dtype, base bits, fine-tune bits (SPEC §5.6's table for bf16-10)
    ("bf16-10", "bfloat16", 4, "bfloat16",
     "3c4a bf00 3f80 3c00 c050 0000 3a83 3f7f 8002 40f0", "3c4a bf01 3f80 3bff 4050 8000 3a83 3f80 0001 40ee"),
    ("fp32-6", "float32", 4, "float32",
     "3dcccccd bfc00000 3b449ba6 40000000 00000000 c0e00000", "3dccccd0 bfc00000 3b449d53 40000000 00000000 c0e00001"),
    ("fp16-4", "float16", 3, "float16", "3400 bc00 7bff 0001", "3400 bc01 7bff 0000"),
    ("fp64-2", "float64", 1, "float64", "3fd5555555555555 c004000000000000", "3fd5555555555556 c004000000000000"),
    ("bf16-empty", "bfloat16", 4, "bfloat16", "", ""),
    # A float32 base rounds to 3dcd bfc0 3b45 4000 first; a bfloat16 base widens exactly.
    ("bf16-on-fp32-base", "bfloat16", 4, "float32", "3dcccccd bfc00000 3b449ba6 40000000", "3dcd bfc1 3b44 4000"),
    ("fp32-on-bf16-base", "float32", 2, "bfloat16", "3f80 c050", "3f800001 c0500000"),
)  # fmt: skip


def vector_bitdiff(root: Path) -> None:
    v = Vector(root, "bitdiff")
    for name, dtype, chunk, base_dtype, base_bits, ft_bits in BITDIFF_CASES:
        base, ft = from_bits(base_bits.split(), base_dtype), from_bits(ft_bits.split(), dtype)
        v.base[name] = (base, base_dtype)
        enc = BitdiffEncoding(chunk)
        stored = enc.encode(as_torch(ft, dtype), base=as_torch(base, base_dtype))
        v.add(name, entry(enc, ft.shape, dtype), stored, ft)
    planes = bytes(v.params[0][2]["planes"].tolist())
    assert planes.hex() == BF16_10_PLANES, "SPEC §5.6's worked example no longer matches"
    v.write("dense", {})
    text = json.dumps({"note": BITDIFF_REFUSE_NOTE, "cases": bitdiff_must_refuse(planes)}, indent=1)
    (root / "bitdiff_must_refuse.json").write_text(text + "\n", encoding="utf-8")


BF16_10_PLANES = (
    "28b52ffd200421000000020001" "28b52ffd200421000000000000" "28b52ffd2004210000ffff0002"
    "28b52ffd2004210000ffff0000" "28b52ffd2002110000fe03" "28b52ffd2002110000ff00"
)  # fmt: skip
BITDIFF_REFUSE_NOTE = (
    "Stored tensors of the parameter bf16-10 of spec/vectors/bitdiff that a reader MUST refuse (SPEC section 5.6), "
    "each with the rule it breaks. Generated by spec/vectors/generate.py."
)


def _raw_frame(payload: bytes, header: bytes) -> bytes:
    """A zstd frame by hand (RFC 8878): magic, frame header, one raw last block."""
    return bytes.fromhex("28b52ffd") + header + bytes([(len(payload) << 3) | 1, 0, 0]) + payload


def bitdiff_must_refuse(planes: bytes) -> list[dict]:
    """Corruptions of bf16-10 (frames [[13, 13], [13, 13], [11, 11]]), all hand-made frames."""
    frames = [[13, 13], [13, 13], [11, 11]]
    first = bytes.fromhex("00020001")  # chunk 0 plane 0's 4 bytes
    rest = planes[13:]
    rle = ((1 << 17) << 3 | 1 << 1).to_bytes(3, "little") + b"\0"  # an RLE block: 128 KiB of zeros
    last = ((1 << 17) << 3 | 1 << 1 | 1).to_bytes(3, "little") + b"\0"
    bomb = bytes.fromhex("28b52ffd") + bytes([0xA0]) + (1 << 20).to_bytes(4, "little") + rle * 7 + last
    replaced = {
        "a frame declaring one byte more than its chunk": _raw_frame(first + b"\0", bytes([0x20, 5])),
        "a frame without a content size": _raw_frame(first, bytes([0x00, 0x00])),
        "a frame declaring 1 MiB (a decompression bomb): refuse before decompressing": bomb,
        "a frame needing a dictionary": _raw_frame(first, bytes([0x21, 7, 4])),
        "a frame asking for a 16 MiB window": _raw_frame(first, bytes([0x80, 0x70]) + (4).to_bytes(4, "little")),
    }
    cases = [
        {"why": "a byte after the last frame", "planes": planes + b"\0", "frames": frames},
        {"why": "frame boundary moved by one byte", "planes": planes, "frames": [[14, 12], [13, 13], [11, 11]]},
        {"why": "frames of the wrong shape", "planes": planes[:52], "frames": frames[:2]},
        {"why": "a zero frame size", "planes": planes, "frames": [[0, 26], [13, 13], [11, 11]]},
    ]
    cases += [{"why": why, "planes": f + rest, "frames": [[len(f), 13], *frames[1:]]} for why, f in replaced.items()]
    return [{"why": c["why"], "planes_hex": c["planes"].hex(), "frames": c["frames"]} for c in cases]


def dequantised(codes: np.ndarray, scales: np.ndarray, bits: int, group: int) -> np.ndarray:
    """SPEC §5.7 in numpy: float32(scale[j // G]) * (code[j] - (2^b - 1) / 2), one float32 rounding."""
    owner = np.arange(codes.size) // group
    return (scales.astype(np.float32)[owner] * (codes.astype(np.float32) - np.float32((2**bits - 1) / 2))).astype(
        np.float32
    )


def vector_dense_q(root: Path) -> None:
    v = Vector(root, "dense-q")
    # 65 entries at 3 bits: 195 bits, 5 zero padding bits; the last of 5 groups of 16 holds 1 value.
    for name, shape, dtype, bits, group, salt in (
        ("w", (5, 13), "float32", 3, 16, 60),
        ("h", (4, 8), "bfloat16", 2, 8, 62),
        ("b", (7,), "float16", 1, 4, 64),
    ):
        base = v.add_base(name, shape, dtype, salt)
        delta = values(shape, salt + 1, 0.01)
        codes, scales = quantize(torch.from_numpy(delta).reshape(-1), bits, group, "absmax", torch.float16)
        enc = QuantizedDenseEncoding(bits, group)
        stored = {"codes": pack_codes(codes, bits), "scales": scales.reshape(-1)}
        decoded = dequantised(codes.numpy().reshape(-1), scales.float().numpy().reshape(-1), bits, group)
        v.add(name, entry(enc, shape, dtype), stored, reconstruct(base, decoded.reshape(shape), 1.0, dtype))
    v.write("dense-q", {})


def vector_rows_q(root: Path) -> None:
    v = Vector(root, "rows-q")
    # "e": rows 1, 5, 11 of 12 at 4 bits, groups of 8 = one row each; "t": rows of 6 in groups of 4,
    # so groups straddle kept rows (12 values: 3 groups); "z": no row kept (empty stored tensors).
    for name, shape, dtype, bits, group, rows, salt in (
        ("e", (12, 8), "float32", 4, 8, [1, 5, 11], 80),
        ("t", (10, 6), "bfloat16", 2, 4, [0, 9], 82),
        ("z", (3, 4), "float16", 3, 4, [], 84),
    ):
        base = v.add_base(name, shape, dtype, salt)
        kept = values((len(rows), shape[1]), salt + 1, 0.01)
        codes, scales = quantize(torch.from_numpy(kept).reshape(-1), bits, group, "absmax", torch.float16)
        enc = QuantizedRowsEncoding(bits, group, len(rows))
        stored = {
            "rows": torch.tensor(rows, dtype=torch.int32),
            "codes": pack_codes(codes, bits),
            "scales": scales.reshape(-1),
        }
        decoded = dequantised(codes.numpy().reshape(-1), scales.float().numpy().reshape(-1), bits, group)
        delta = np.zeros(shape, dtype=np.float32)
        delta[rows] = decoded.reshape(len(rows), shape[1])
        v.add(name, entry(enc, shape, dtype), stored, reconstruct(base, delta, 1.0, dtype))
    v.write("budget", {"bits": 1.0})


def vector_sparse_q(root: Path) -> None:
    v = Vector(root, "sparse-q")
    shape, scale = (16, 32), 1 / (1 - SEEDED_P)
    base = v.add_base("w", shape, "bfloat16", 70)
    delta = values(shape, 71, 0.01)
    positions = seeded_mask.kept_positions(512, SEEDED_P, SEEDED_SEED, "w").numpy()
    codes, scales = quantize(torch.from_numpy(delta.reshape(-1)[positions]), 2, 8, "mse", torch.float16)
    enc = QuantizedSparseEncoding(
        "seeded", bits=2, group=8, count=len(positions), scale=scale, seed=SEEDED_SEED, p=SEEDED_P
    )
    stored = {"codes": pack_codes(codes, 2), "scales": scales.reshape(-1)}
    kept = dequantised(codes.numpy().reshape(-1), scales.float().numpy().reshape(-1), 2, 8)
    v.add(
        "w",
        entry(enc, shape, "bfloat16"),
        stored,
        reconstruct(base, scatter(512, positions, kept, scale, shape), 1.0, "bfloat16"),
    )
    base = v.add_base("g", (6, 9), "float32", 72)
    positions = np.array([0, 3, 4, 20, 41, 53])
    kept_raw = values((6,), 73, 0.01)
    codes, scales = quantize(torch.from_numpy(kept_raw), 4, 4, "absmax", torch.float16)
    enc = QuantizedSparseEncoding("gaps", bits=4, group=4, count=6, scale=1.5)
    full = torch.zeros(54).index_put_((torch.from_numpy(positions),), torch.from_numpy(kept_raw))
    stored = enc.encode(full, name="g", positions=torch.from_numpy(positions), dtype=torch.float16, clip="absmax")
    kept = dequantised(codes.numpy().reshape(-1), scales.float().numpy().reshape(-1), 4, 4)
    v.add(
        "g",
        entry(enc, (6, 9), "float32"),
        stored,
        reconstruct(base, scatter(54, positions, kept, 1.5, (6, 9)), 1.0, "float32"),
    )
    v.write("dare", {"p": SEEDED_P, "seed": SEEDED_SEED, "value_bits": 2})


def vector_lowrank_q(root: Path) -> None:
    v = Vector(root, "lowrank-q")
    # Codes from a hash and power-of-two scales: every factor is a small dyadic number, so the
    # product is exact in any summation order (SPEC §5.10 leaves the order open).
    for name, shape, dtype, bands, group, salt in (
        ("w", (12, 10), "float32", [(1, 8), (2, 3)], 4, 80),
        ("conv", (4, 3, 5), "bfloat16", [(2, 2)], 64, 83),
    ):
        base = v.add_base(name, shape, dtype, salt, exact=True)
        rows, cols = shape[0], int(np.prod(shape[1:]))
        per_vector = -(-rows // group) + -(-cols // group)
        streams, all_scales, us, vs, i = [], [], [], [], 0
        for count, bits in bands:
            n = count * (rows + cols)
            codes = np.array([splitmix64(salt * 131 + i * 1000 + j) % (2**bits) for j in range(n)], dtype=np.int64)
            scales = np.array([2.0 ** -(3 + (splitmix64(salt + i * 7 + j) % 3)) for j in range(count * per_vector)])
            owner = np.concatenate([np.arange(rows) // group, -(-rows // group) + np.arange(cols) // group])
            for k in range(count):
                vec = scales[k * per_vector + owner] * (
                    codes[k * (rows + cols) : (k + 1) * (rows + cols)] - (2**bits - 1) / 2
                )
                us.append(vec[:rows])
                vs.append(vec[rows:])
            streams.append(pack_codes(torch.from_numpy(codes), bits))
            all_scales.append(torch.from_numpy(scales).to(torch.float16))
            i += count
        enc = QuantizedLowRankEncoding(bands, group)
        product = (np.array(us).T @ np.array(vs)).astype(np.float32).reshape(shape)
        stored = {"codes": torch.cat(streams), "scales": torch.cat(all_scales)}
        v.add(name, entry(enc, shape, dtype), stored, reconstruct(base, product, 1.0, dtype))
    v.write("lowrank-q", {"bits": "per tensor"})


def vector_sum(root: Path) -> None:
    v = Vector(root, "sum")
    # "w": the budget's hybrid, dyadic rank-1 lowrank-q (exact in any order) + DARE of 2-bit values;
    # delta = round32(low + sparse), then SPEC §9 with alpha 0.75.
    shape, scale = (16, 32), 1 / (1 - SEEDED_P)
    base = v.add_base("w", shape, "bfloat16", 90)
    codes = np.array([splitmix64(9100 + j) % 16 for j in range(48)], dtype=np.int64)
    low_scales = np.array([2.0**-7, 2.0**-9])  # one group of u (16 values), one of v (32)
    vec = np.concatenate([low_scales[0] * (codes[:16] - 7.5), low_scales[1] * (codes[16:] - 7.5)])
    low = np.outer(vec[:16], vec[16:]).astype(np.float32)
    low_enc = QuantizedLowRankEncoding([(1, 4)], 32)
    low_stored = {
        "codes": pack_codes(torch.from_numpy(codes), 4),
        "scales": torch.tensor(low_scales, dtype=torch.float16),
    }
    positions = seeded_mask.kept_positions(512, SEEDED_P, SEEDED_SEED, "w").numpy()
    rest = values(shape, 91, 0.01).reshape(-1)[positions]
    sparse_codes, sparse_scales = quantize(torch.from_numpy(rest), 2, 8, "mse", torch.float16)
    sparse_enc = QuantizedSparseEncoding(
        "seeded", bits=2, group=8, count=len(positions), scale=scale, seed=SEEDED_SEED, p=SEEDED_P
    )
    sparse_stored = {"codes": pack_codes(sparse_codes, 2), "scales": sparse_scales.reshape(-1)}
    kept = dequantised(sparse_codes.numpy().reshape(-1), sparse_scales.float().numpy().reshape(-1), 2, 8)
    delta = (low + scatter(512, positions, kept, scale, shape)).astype(np.float32)
    enc = SumEncoding([low_enc, sparse_enc])
    v.add(
        "w",
        entry(enc, shape, "bfloat16", 0.75),
        enc.join([low_stored, sparse_stored]),
        reconstruct(base, delta, 0.75, "bfloat16"),
    )
    # "h": three parts, sign per tensor + dense + sign per row, float32.
    shape = (5, 7)
    base = v.add_base("h", shape, "float32", 92)
    bits = (values(shape, 93) >= 0).reshape(-1)
    tensor_scale, row_scale = np.float32(0.01), values((5,), 94, 0.001).astype(np.float32)
    signs = np.where(bits, np.float32(1), np.float32(-1)).astype(np.float32)
    dense = values(shape, 95, 0.003).astype(np.float32)
    row_bits = (values(shape, 96) >= 0).reshape(-1)
    row_part = (np.where(row_bits, np.float32(1), np.float32(-1)).reshape(shape) * row_scale[:, None]).astype(
        np.float32
    )
    delta = ((signs.reshape(shape) * tensor_scale + dense).astype(np.float32) + row_part).astype(np.float32)
    enc = SumEncoding([SignEncoding("tensor"), DenseEncoding(), SignEncoding("row")])
    parts = [
        {"bits": pack_bits_np(bits), "scale": torch.tensor([tensor_scale])},
        {"delta": torch.from_numpy(dense)},
        {"bits": pack_bits_np(row_bits), "scale": torch.from_numpy(row_scale)},
    ]
    v.add("h", entry(enc, shape, "float32"), enc.join(parts), reconstruct(base, delta, 1.0, "float32"))
    v.write("budget", {"bits": 0.5})


def hashed(key: int, k: int) -> int:
    """SPEC §6's u(key, k), in Python integers."""
    return seeded_mask._mix32_int(seeded_mask._mix32_int(key ^ (k % 2**32)) ^ (k >> 32))


def stochastic_rounded(acc: np.ndarray, dtype: str, name: str, window: bool = False) -> np.ndarray:
    """SPEC §9.1 element by element, in Python integers and binary64 (exact here); float32 out.
    ``window``: the dither of ``"stochastic-window"`` (1.6), rows of ``acc``'s shape, else
    ``"stochastic"``'s (1.3)."""
    cols = math.prod(acc.shape[1:]) if acc.ndim else 1
    acc = np.ascontiguousarray(acc, dtype=np.float32).reshape(-1)
    near = rounded(acc, dtype)
    key = seeded_mask.stream_key(ROUNDING_SEED, name)
    table_key = seeded_mask.stream_key(int.from_bytes(b"window", "big"), "")
    out = near.copy()
    for i, x in enumerate(acc.tolist()):
        toward, away = neighbours_of(x, dtype)
        if not math.isfinite(away):
            continue  # t is the largest finite magnitude (or acc is not finite): nearest
        if window:  # W[o[r] + c]: the shared table's entry at the row's offset plus the column
            d = hashed(table_key, (hashed(key, i // cols) >> 12) + i % cols) >> 16
        else:
            d = hashed(key, i) >> 16
        f = (abs(x) - abs(toward)) / (abs(away) - abs(toward))
        out[i] = away if d < f * 2**16 else toward
    return out


def neighbours_of(x: float, dtype: str) -> tuple[float, float]:
    """The ``dtype`` values toward zero from ``x`` (``x`` itself when it holds it) and the next one
    away from zero, through the 16-bit patterns: a pattern's low 15 bits are the magnitude."""
    if dtype == "float16":
        half = np.float16(x)
        pattern = int(np.array([half]).view(np.uint16)[0])
        if abs(float(half)) > abs(x):
            pattern -= 1  # nearest rounded away: step the magnitude in
        as_float = lambda p: float(np.array([p], dtype=np.uint16).view(np.float16)[0])  # noqa: E731
    else:
        pattern = int(np.array([x], dtype=np.float32).view(np.uint32)[0]) >> 16  # truncation is toward zero
        as_float = lambda p: float(np.array([p << 16], dtype=np.uint32).view(np.float32)[0])  # noqa: E731
    return as_float(pattern), as_float(pattern + 1)


def vector_rounding(root: Path) -> None:
    v = Vector(root, "rounding")
    # "w": bfloat16, per-row signs whose scales lie below the weights' spacing: nearest rounding
    # would drop most of them; stochastic keeps them in expectation (SPEC §9.1). Zeros, negatives.
    shape = (16, 32)
    base = v.add_base("w", shape, "bfloat16", 110)
    base.reshape(-1)[:4] = [0.0, -0.0, 1.0, -1.0]
    v.base["w"] = (base, "bfloat16")
    v.expected["w"] = (base, "bfloat16")
    flags = (values(shape, 111) >= 0).reshape(-1)
    scales = np.abs(values((16,), 112, 0.004)).astype(np.float16).astype(np.float32)
    delta = (np.where(flags, 1.0, -1.0).reshape(shape) * scales[:, None]).astype(np.float32)
    acc = (base.astype(np.float32) + delta).astype(np.float32)
    sign = entry(SignEncoding("row"), shape, "bfloat16")
    sign.rounding = "stochastic"
    stored = {"bits": pack_bits_np(flags), "scale": torch.from_numpy(scales).half()}
    v.add("w", sign, stored, stochastic_rounded(acc, "bfloat16", "w").reshape(shape))
    # "h": float16, dense delta at alpha 0.5: the largest finite value pushed up stays finite, a
    # subnormal sum rounds between subnormals.
    shape = (4, 8)
    base = (v.add_base("h", shape, "float16", 113) * 8).astype(np.float16).astype(np.float32)
    base.reshape(-1)[:3] = [65504.0, 2.0**-24, -(2.0**-14)]
    v.base["h"] = (base, "float16")
    v.expected["h"] = (base, "float16")
    delta = values(shape, 114, 0.003).astype(np.float32)
    delta.reshape(-1)[:3] = [16.0, 2.0**-26, 2.0**-27]
    scaled = (delta * np.float32(0.5)).astype(np.float32)
    acc = (base.astype(np.float32) + scaled).astype(np.float32)
    dense = entry(DenseEncoding(), shape, "float16", 0.5)
    dense.rounding = "stochastic"
    v.add("h", dense, {"delta": torch.from_numpy(delta)}, stochastic_rounded(acc, "float16", "h").reshape(shape))
    # "f": float32: nothing to round, the marking changes no bit.
    shape = (3, 5)
    base = v.add_base("f", shape, "float32", 115)
    delta = values(shape, 116, 0.01)
    dense = entry(DenseEncoding(), shape, "float32")
    dense.rounding = "stochastic"
    v.add("f", dense, {"delta": torch.from_numpy(delta)}, reconstruct(base, delta, 1.0, "float32"))
    v.write("sign", {"scale": "row"})


def vector_rounding_window(root: Path) -> None:
    v = Vector(root, "rounding-window")
    # SPEC §9.1's "stochastic-window" (1.6): each row's dither a window of one hashed table.
    # "w": bfloat16 per-row signs below the weights' spacing, zeros and negatives, as in "rounding".
    shape = (16, 32)
    base = v.add_base("w", shape, "bfloat16", 120)
    base.reshape(-1)[:4] = [0.0, -0.0, 1.0, -1.0]
    v.base["w"] = v.expected["w"] = (base, "bfloat16")
    flags = (values(shape, 121) >= 0).reshape(-1)
    scales = np.abs(values((16,), 122, 0.004)).astype(np.float16).astype(np.float32)
    delta = (np.where(flags, 1.0, -1.0).reshape(shape) * scales[:, None]).astype(np.float32)
    sign = entry(SignEncoding("row"), shape, "bfloat16")
    sign.rounding = "stochastic-window"
    stored = {"bits": pack_bits_np(flags), "scale": torch.from_numpy(scales).half()}
    acc = (base.astype(np.float32) + delta).astype(np.float32)
    v.add("w", sign, stored, stochastic_rounded(acc, "bfloat16", "w", window=True).reshape(shape))
    # "k": float16, 3-D (a row is 4 x 5 elements), dense at alpha 0.5, the largest finite value
    # pushed up stays finite; "b": bfloat16, 1-D (a row per element).
    for name, shape, dtype, alpha, salt in (("k", (3, 4, 5), "float16", 0.5, 123), ("b", (40,), "bfloat16", 1.0, 125)):
        base = v.add_base(name, shape, dtype, salt)
        if dtype == "float16":
            base.reshape(-1)[0] = 65504.0
        v.base[name] = v.expected[name] = (base, dtype)
        delta = values(shape, salt + 1, 0.003).astype(np.float32)
        if dtype == "float16":
            delta.reshape(-1)[0] = 16.0
        scaled = (delta * np.float32(alpha)).astype(np.float32)
        acc = (base.astype(np.float32) + scaled).astype(np.float32)
        dense = entry(DenseEncoding(), shape, dtype, alpha)
        dense.rounding = "stochastic-window"
        expected = stochastic_rounded(acc, dtype, name, window=True).reshape(shape)
        v.add(name, dense, {"delta": torch.from_numpy(delta)}, expected)
    v.write("sign", {"scale": "row"})


def zero_extended(base: np.ndarray, rows: int) -> np.ndarray:
    """SPEC §9.2: the base with zero rows appended up to ``rows``."""
    out = np.zeros((rows, *base.shape[1:]), dtype=base.dtype)
    out[: base.shape[0]] = base
    return out


def vector_grown(root: Path) -> None:
    v = Vector(root, "grown")
    # "e": float32 table of 6 rows grown to 9 (three added tokens), as the compressor writes it:
    # a dense delta of the old rows (zero in the new ones) + the new rows' values as 8-bit rows-q.
    base = v.add_base("e", (6, 4), "float32", 120)
    old = values((9, 4), 121, 0.01)
    old[6:] = 0.0
    new = values((3, 4), 122, 0.5)
    codes, scales = quantize(torch.from_numpy(new).reshape(-1), 8, 4, "absmax", torch.float16)
    rows = QuantizedRowsEncoding(8, 4, 3)
    rows_stored = {
        "rows": torch.tensor([6, 7, 8], dtype=torch.int32),
        "codes": pack_codes(codes, 8),
        "scales": scales.reshape(-1),
    }
    delta = old.copy()
    delta[6:] = dequantised(codes.numpy().reshape(-1), scales.float().numpy().reshape(-1), 8, 4).reshape(3, 4)
    enc = SumEncoding([DenseEncoding(), rows])
    grown = entry(enc, (9, 4), "float32")
    grown.base_rows = 6
    v.add(
        "e",
        grown,
        enc.join([{"delta": torch.from_numpy(old)}, rows_stored]),
        reconstruct(zero_extended(base, 9), delta, 1.0, "float32"),
    )
    # "t": bfloat16, 5 rows grown to 7, one dense delta at alpha 0.5 with stochastic rounding: alpha
    # scales the new rows' values too, and the dither runs on over them (flat indices 40..55).
    base = v.add_base("t", (5, 8), "bfloat16", 123)
    delta = values((7, 8), 124, 0.01)
    delta[5:] = values((2, 8), 125, 1.0)
    acc = (zero_extended(base, 7).astype(np.float32) + (delta * np.float32(0.5)).astype(np.float32)).astype(np.float32)
    dense = entry(DenseEncoding(), (7, 8), "bfloat16", 0.5)
    dense.base_rows, dense.rounding = 5, "stochastic"
    v.add("t", dense, {"delta": torch.from_numpy(delta)}, stochastic_rounded(acc, "bfloat16", "t").reshape(7, 8))
    # "b": a float16 bias of 3 grown to 5, the new entries alone (rows-q rows 3 and 4, one column).
    base = v.add_base("b", (3,), "float16", 126)
    new = values((2,), 127, 0.25)
    codes, scales = quantize(torch.from_numpy(new), 8, 64, "absmax", torch.float16)
    enc = QuantizedRowsEncoding(8, 64, 2)
    stored = {
        "rows": torch.tensor([3, 4], dtype=torch.int32),
        "codes": pack_codes(codes, 8),
        "scales": scales.reshape(-1),
    }
    delta = np.zeros(5, dtype=np.float32)
    delta[3:] = dequantised(codes.numpy().reshape(-1), scales.float().numpy().reshape(-1), 8, 64)
    bias = entry(enc, (5,), "float16")
    bias.base_rows = 3
    v.add("b", bias, stored, reconstruct(zero_extended(base, 5), delta, 1.0, "float16"))
    # "z": a base tensor with no rows at all, grown to 2: the delta is the value.
    base = v.add_base("z", (0, 4), "float32", 128)
    delta = values((2, 4), 129, 1.0)
    empty = entry(DenseEncoding(), (2, 4), "float32")
    empty.base_rows = 0
    v.add("z", empty, {"delta": torch.from_numpy(delta)}, reconstruct(zero_extended(base, 2), delta, 1.0, "float32"))
    v.write("dare", {"p": 0.9})


def pack_bits_np(flags: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.packbits(flags.astype(bool), bitorder="little"))


# ---------------------------------------------------------------------------------------------
# Seeded-mask known answers.
# ---------------------------------------------------------------------------------------------

MASK_CASES = (
    (64, 0.5, 0, "w"),
    (100, 0.0, 7, "bias"),
    (1000, 0.9, 2**40 + 3, "model.layers.0.mlp.up_proj.weight"),
    (512, SEEDED_P, SEEDED_SEED, "w"),
    (2000, 0.99, 2**64 - 1, "lm_head.weight"),
    (300, 0.75, 123456789, "模型.层.0"),
)
STREAM_COUNTERS = (0, 1, 2, 255, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 7, 2**62 + 5)
MIX_INPUTS = (0, 1, 2, 0x12345678, 0xDEADBEEF, 0xFFFFFFFF)


def seeded_known_answers() -> dict:
    cases = []
    for numel, p, seed, name in MASK_CASES:
        key = seeded_mask.stream_key(seed, name)
        table = seeded_mask.gap_table(p)
        cases.append(
            {
                "numel": numel,
                "p": p,
                "seed": seed,
                "name": name,
                "tensor_id": seeded_mask.tensor_id(name),
                "key": key,
                "P": seeded_mask.drop_threshold(p),
                "gap_table_length": len(table),
                "gap_table_head": list(table[:4]),
                "gaps_head": seeded_mask.gaps(p, key, 0, 8).tolist(),
                "kept": seeded_mask.kept_positions(numel, p, seed, name).tolist(),
            }
        )
    key = cases[2]["key"]
    stream = [{"key": key, "k": k, "u": int(seeded_mask.uniform_stream(key, k, 1)[0])} for k in STREAM_COUNTERS]
    mix = [{"x": x, "lowbias32": seeded_mask._mix32_int(x)} for x in MIX_INPUTS]
    return {
        "generator": "lowbias32-geometric-v1",
        "note": "Known answers of the seeded-mask generator, SPEC section 6. Generated by spec/vectors/generate.py.",
        "lowbias32": mix,
        "stream": stream,
        "masks": cases,
    }


def main(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for build in (
        vector_dense,
        vector_sparse_gaps,
        vector_sparse_bitmask,
        vector_sparse_seeded,
        vector_sign_tensor,
        vector_sign_row,
        vector_sign_row_q,
        vector_lowrank,
        vector_replace,
        vector_sharded,
        vector_bitdiff,
        vector_dense_q,
        vector_sparse_q,
        vector_lowrank_q,
        vector_sum,
        vector_rounding,
        vector_rounding_window,
        vector_rows_q,
        vector_grown,
    ):
        build(root)
    text = json.dumps(seeded_known_answers(), indent=1, ensure_ascii=False)
    text = re.sub(
        r"\[\s*([-0-9][-0-9,\s]*?)\s*\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", text
    )
    (root / "seeded_mask.json").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
