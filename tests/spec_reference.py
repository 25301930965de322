"""A second implementation of the format, written from `spec/SPEC.md` alone, for the tests.

It imports nothing from `delta_format` and no torch: Python integers for the seeded-mask generator
(§6), hashlib and json for fingerprints (§7), a hand-written safetensors parser, numpy float32
/ float64 arithmetic for decoding (§5) and reconstruction (§9), and for ``bitdiff`` (§5.6) a
hand-written zstd frame-header parser (RFC 8878), numpy unsigned integers and, to decompress
a checked frame, the ``zstandard`` package. Where it and the library agree on
the test vectors, the spec is implementable as written and the library follows it.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------
# §6 seeded-mask generator, in Python integers.
# ---------------------------------------------------------------------------------------------

M32 = 2**32


def mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) % M32
    x ^= x >> 15
    x = (x * 0x846CA68B) % M32
    x ^= x >> 16
    return x


def tensor_id(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big")


def stream_key(seed: int, name: str) -> int:
    return mix32(mix32(mix32(seed % M32) ^ (seed >> 32)) ^ tensor_id(name))


def u(key: int, k: int) -> int:
    return mix32(mix32(key ^ (k % M32)) ^ (k >> 32))


def drop_threshold(p: float) -> int:
    return round(p * M32)  # Python's round() on a float is round-half-even; p * 2**32 is exact


def gap_table(p: float) -> list[int]:
    big_p, table, t = drop_threshold(p), [], M32
    while True:
        t = (t * big_p) >> 32
        if t == 0:
            return table
        table.append(t)


def kept_positions(numel: int, p: float, seed: int, name: str) -> list[int]:
    key, table = stream_key(seed, name), gap_table(p)
    out, q, k = [], -1, 0
    while True:
        uk = u(key, k)
        q += sum(1 for t in table if t > uk) + 1  # gap = thresholds above u_k (table is short here)
        k += 1
        if q >= numel:
            return out
        out.append(q)


# ---------------------------------------------------------------------------------------------
# safetensors files, parsed by hand (8-byte little-endian header length, JSON header, data).
# ---------------------------------------------------------------------------------------------

NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "U8": "u1", "U16": "<u2", "I32": "<i4", "I64": "<i8"}


def read_safetensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw little-endian bytes)."""
    raw = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            begin, end = info["data_offsets"]
            out[name] = (info["dtype"], info["shape"], data[begin:end])
    return out


def to_array(dtype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """A stored tensor as numpy: floats widened exactly to float32 (float64 stays), ints as they are."""
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    array = np.frombuffer(raw, dtype=NUMPY[dtype]).reshape(shape)
    return array.astype(np.float32) if dtype in ("F16", "F32") else array


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 (or float64) values to ``dtype``, ties to even; returned in float32/float64."""
    if dtype == "float64":
        return x.astype(np.float64)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        bits = x.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return bits.astype(np.uint32).view(np.float32)
    return x


def bit_of(packed: np.ndarray, i: int) -> int:
    """§5.3: element i is bit i % 8 of byte i // 8, least significant first."""
    return (int(packed[i // 8]) >> (i % 8)) & 1


# ---------------------------------------------------------------------------------------------
# §5 decode and §9 reconstruction.
# ---------------------------------------------------------------------------------------------


def decode(entry: dict, stored: dict[str, np.ndarray], name: str, base: np.ndarray | None = None) -> np.ndarray:
    """δ of SPEC §5 (a value for replace and bitdiff) in the compute dtype (float64 for float64
    parameters, else float32); ``base`` (as `to_array` reads it) is needed by bitdiff only."""
    shape, config = entry["shape"], entry.get("config", {})
    c = np.float64 if entry["dtype"] == "float64" else np.float32
    numel = math.prod(shape)
    encoding = entry["encoding"]
    if encoding == "bitdiff":
        return decode_bitdiff(entry, stored, base)
    if encoding == "dense":
        return stored["delta"].astype(c)
    if encoding == "replace":
        return stored["value"].astype(c)
    if encoding == "sparse":
        values = stored["values"].astype(c)
        coding = config["index_coding"]
        if coding == "gaps":
            positions, q = [], -1
            for g in stored["gaps"].tolist():
                assert g >= 0
                q += g + 1
                positions.append(q)
        elif coding == "bitmask":
            positions = [i for i in range(numel) if bit_of(stored["mask"], i)]
        else:
            positions = kept_positions(numel, config["p"], config["seed"], name)
        assert len(positions) == len(values) and all(0 <= q < numel for q in positions)
        out = np.zeros(numel, dtype=c)
        out[np.array(positions, dtype=np.int64)] = values * c(config.get("scale", 1.0))
        return out.reshape(shape)
    if encoding == "sign":
        if "scale_bits" in config:  # §5.3 (1.7): the row scales as one quantised sequence
            assert config["scale"] == "row" and "scale" not in stored
            coded = {"bits": config["scale_bits"], "group": config["scale_group"]}
            scale = quantised(stored["scale_codes"], stored["scale_scales"], coded, shape[0], c)
        else:
            scale = stored["scale"].astype(c)
        cols = numel // shape[0] if config["scale"] == "row" else max(numel, 1)
        out = np.array([(1 if bit_of(stored["bits"], i) else -1) * scale[i // cols] for i in range(numel)], dtype=c)
        return out.reshape(shape)
    if encoding == "dense-q":
        return quantised(stored["codes"], stored["scales"], config, numel, c).reshape(shape)
    if encoding == "sparse-q":
        values = quantised(stored["codes"], stored["scales"], config, config["count"], c)
        plain = {k: v for k, v in config.items() if k not in ("bits", "group", "count")}
        return decode({**entry, "encoding": "sparse", "config": plain}, {**stored, "values": values}, name)
    if encoding == "lowrank-q":
        return lowrank_q(stored, config, shape, c)
    if encoding == "rows-q":  # §5.12: the kept rows as one dense-q sequence, zeros elsewhere
        rows = stored["rows"].astype(np.int64).tolist()
        cols = numel // shape[0] if shape else 1
        assert len(rows) == config["count"] and all(a < b for a, b in zip(rows, rows[1:]))
        assert all(0 <= r < (shape[0] if shape else 1) for r in rows)
        values = quantised(stored["codes"], stored["scales"], config, config["count"] * cols, c)
        out = np.zeros(((shape[0] if shape else 1), cols), dtype=c)
        for i, r in enumerate(rows):
            out[r] = values[i * cols : (i + 1) * cols]
        return out.reshape(shape)
    if encoding == "sum":  # §5.11: each part decoded as alone, added in order, one rounding each
        total = None
        for i, part in enumerate(config["parts"]):
            own = {key.split(".", 1)[1]: t for key, t in stored.items() if key.split(".", 1)[0] == str(i)}
            delta = decode({**entry, "encoding": part["encoding"], "config": part.get("config", {})}, own, name)
            total = delta if total is None else (total + delta).astype(c)
        return total
    if encoding == "lowrank":
        # The vectors' factors are exact in any order of summation, so float64 then c is exact.
        return (stored["u"].astype(np.float64) @ stored["v"].astype(np.float64)).astype(c).reshape(shape)
    raise AssertionError(f"unknown encoding {encoding}")


def codes_of(stream: np.ndarray, bits: int, count: int, first_byte: int = 0) -> list[int]:
    """§5.7: code j is bits [j*b, (j+1)*b) of the stream, least significant first; padding zero."""
    codes = [sum(bit_of(stream, 8 * first_byte + j * bits + t) << t for t in range(bits)) for j in range(count)]
    end = 8 * first_byte + count * bits
    assert all(bit_of(stream, k) == 0 for k in range(end, 8 * ((end + 7) // 8)))
    return codes


def quantised(stream, scales, config, count, c) -> np.ndarray:
    """§5.7: one sequence of ``count`` values, groups of ``config["group"]``."""
    bits, group = config["bits"], config["group"]
    codes, half = codes_of(stream, bits, count), (2**bits - 1) / 2
    return np.array([c(scales[j // group]) * c(codes[j] - half) for j in range(count)], dtype=c)


def lowrank_q(stored, config, shape, c) -> np.ndarray:
    """§5.10: per band one byte-aligned stream of vectors u[:, i] then v[i, :]; each part has its own
    groups. The product is summed in float64 (exact for the vector's dyadic factors), then c."""
    rows, cols, group = shape[0], math.prod(shape[1:]), config["group"]
    owner = [j // group for j in range(rows)] + [-(-rows // group) + j // group for j in range(cols)]
    per_vector = -(-rows // group) + -(-cols // group)
    us, vs, byte, scale = [], [], 0, 0
    for count, bits in config["bands"]:
        n, half = rows + cols, (2**bits - 1) / 2
        codes = codes_of(stored["codes"], bits, count * n, byte)
        for i in range(count):
            values = [c(stored["scales"][scale + owner[j]]) * c(codes[i * n + j] - half) for j in range(n)]
            us.append(values[:rows])
            vs.append(values[rows:])
            scale += per_vector
        byte += (count * n * bits + 7) // 8
    assert byte == len(stored["codes"]) and scale == len(stored["scales"])
    u, v = np.array(us, dtype=np.float64).T, np.array(vs, dtype=np.float64)
    return (u @ v).astype(c).reshape(shape)


def reconstruct(entry: dict, delta: np.ndarray, base: np.ndarray | None, name: str = "") -> np.ndarray:
    """§9 for one delta part, no user multiplier; result rounded to the entry's dtype (§9.1:
    stochastically when the config says so and the dtype is half precision)."""
    if entry["encoding"] in ("replace", "bitdiff"):
        return round_to(delta, entry["dtype"])
    c = np.float64 if entry["dtype"] == "float64" else np.float32
    rows = entry.get("config", {}).get("base_rows")
    if rows is not None:  # §9.2: fewer rows in the base, the others zero
        assert base.shape[0] == rows and 0 <= rows < entry["shape"][0] and list(base.shape[1:]) == entry["shape"][1:]
        base = np.concatenate([base, np.zeros([entry["shape"][0] - rows, *entry["shape"][1:]], dtype=base.dtype)])
    acc = base.astype(c)
    alpha = entry.get("alpha", 1.0)
    if alpha != 1.0:
        delta = (c(alpha) * delta).astype(c)
    acc = (acc + delta).astype(c)
    rounding = entry.get("config", {}).get("rounding", "nearest")
    if rounding in ("stochastic", "stochastic-window") and entry["dtype"] in ("float16", "bfloat16"):
        return stochastic_round(acc, entry["dtype"], name, window=rounding == "stochastic-window")
    return round_to(acc, entry["dtype"])


ROUNDING_SEED = int.from_bytes(b"round", "big")


def toward_and_away(x: float, dtype: str) -> tuple[float, float]:
    """The ``dtype`` value toward zero from ``x`` (``x`` when it holds it) and the next one away
    from zero, found by search over 16-bit patterns (low 15 bits: the magnitude, bit 15: sign)."""
    sign = 0x8000 if math.copysign(1.0, x) < 0 else 0

    def value(magnitude: int) -> float:
        if dtype == "float16":
            return float(np.array([sign | magnitude], dtype=np.uint16).view(np.float16)[0])
        return float(np.array([(sign | magnitude) << 16], dtype=np.uint32).view(np.float32)[0])

    low, high = 0, 0x7F80 if dtype == "bfloat16" else 0x7C00  # 0 .. the infinity's magnitude
    while high - low > 1:  # the largest magnitude whose value is at most |x|
        mid = (low + high) // 2
        low, high = (mid, high) if abs(value(mid)) <= abs(x) else (low, mid)
    if abs(value(high)) <= abs(x):
        low = high
    return value(low), value(low + 1)


def stochastic_round(acc: np.ndarray, dtype: str, name: str, window: bool = False) -> np.ndarray:
    """§9.1, one element at a time in Python floats (binary64: every step exact); ``window``: the
    dither of "stochastic-window" (1.6), from a table built as the spec builds it."""
    flat = acc.reshape(-1)
    near = round_to(flat, dtype)
    key = stream_key(ROUNDING_SEED, name)
    cols = int(np.prod(acc.shape[1:])) if acc.ndim else 1
    table_key = stream_key(int.from_bytes(b"window", "big"), "")  # W[j] = u(table_key, j) >> 16
    out = near.copy()
    for i in range(flat.size):
        x = float(flat[i])
        if not math.isfinite(x):
            continue
        t, a = toward_and_away(x, dtype)
        if not math.isfinite(a):
            continue  # t is the largest finite magnitude: nearest, as without the rule
        f = (abs(x) - abs(t)) / (abs(a) - abs(t))
        d = u(table_key, (u(key, i // cols) >> 12) + i % cols) >> 16 if window else u(key, i) >> 16
        out[i] = a if d < f * 2**16 else t
    return out.reshape(acc.shape)


# ---------------------------------------------------------------------------------------------
# §5.6 bitdiff: frame headers parsed by hand, residuals in numpy unsigned integers.
# ---------------------------------------------------------------------------------------------

WIDTH = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
UNSIGNED = {2: np.uint16, 4: np.uint32, 8: np.uint64}


class Refused(ValueError):
    """What a reader MUST refuse (§5.7)."""


def zstd_frame_header(frame: bytes) -> tuple[int | None, int, int]:
    """(content size or None, window size, dictionary id) from a frame header (RFC 8878 §3.1.1)."""
    if frame[:4] != bytes.fromhex("28b52ffd") or len(frame) < 6:
        raise Refused("not a zstd frame")
    fhd = frame[4]
    fcs_flag, single, did_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos, window = 5, None
    if not single:
        exponent, mantissa = frame[pos] >> 3, frame[pos] & 7
        window = (1 << (10 + exponent)) + ((1 << (10 + exponent)) >> 3) * mantissa
        pos += 1
    did_size = (0, 1, 2, 4)[did_flag]
    dict_id = int.from_bytes(frame[pos : pos + did_size], "little")
    pos += did_size
    fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    size = int.from_bytes(frame[pos : pos + fcs_size], "little") + (256 if fcs_size == 2 else 0) if fcs_size else None
    return size, size if single else window, dict_id


def decode_bitdiff(entry: dict, stored: dict[str, np.ndarray], base: np.ndarray) -> np.ndarray:
    import zstandard

    config, dtype, shape = entry["config"], entry["dtype"], entry["shape"]
    assert set(config) == {"codec", "chunk_elements"} and config["codec"] == "zstd"
    n, k, chunk = math.prod(shape), WIDTH[dtype], config["chunk_elements"]
    planes, frames = stored["planes"], stored["frames"]
    chunks = -(-n // chunk)
    if planes.dtype != np.uint8 or planes.ndim != 1 or frames.dtype != np.int64 or frames.shape != (chunks, k):
        raise Refused("planes/frames of the wrong dtype or shape")
    sizes = [int(x) for x in frames.reshape(-1)]
    if any(x <= 0 for x in sizes) or sum(sizes) != len(planes):
        raise Refused("frame sizes")
    raw, offset = planes.tobytes(), 0
    u = UNSIGNED[k]
    r = np.zeros(n, dtype=u)
    for c in range(chunks):
        lo, hi = c * chunk, min(n, (c + 1) * chunk)
        for p in range(k):
            frame = raw[offset : offset + sizes[c * k + p]]
            offset += sizes[c * k + p]
            size, window, dict_id = zstd_frame_header(frame)
            if size != hi - lo or dict_id != 0 or window > max(hi - lo, 1 << 23):
                raise Refused("frame header")
            try:
                out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=hi - lo, allow_extra_data=False)
            except zstandard.ZstdError as exc:
                raise Refused(str(exc)) from None
            if len(out) != hi - lo:
                raise Refused("frame length")
            r[lo:hi] |= np.frombuffer(out, dtype=np.uint8).astype(u) << u(8 * p)
    s = (r >> u(1)) ^ (u(0) - (r & u(1)))  # unzigzag, mod 2^w
    bd = round_to(base.reshape(-1), dtype)  # round_dtype(B), held in float32 (float64 for float64)
    if dtype == "bfloat16":
        bits = (bd.view(np.uint32) >> np.uint32(16)).astype(u)
    else:
        bits = bd.astype({2: np.float16, 4: np.float32, 8: np.float64}[k]).view(u)
    value = bits + s  # mod 2^w
    if dtype == "bfloat16":
        return (value.astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(shape)
    as_float = value.view({2: np.float16, 4: np.float32, 8: np.float64}[k])
    return as_float.astype(np.float64 if k == 8 else np.float32).reshape(shape)


def read_delta(directory: Path) -> tuple[dict, dict[str, tuple[str, list[int], bytes]]]:
    """(manifest, stored tensors) of a delta directory, checking §2 and §3.5 on the way."""
    directory = Path(directory)
    manifest = json.loads((directory / "delta_config.json").read_text(encoding="utf-8"))
    index = directory / "delta.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = ["delta.safetensors"]
    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    for file in files:
        assert "/" not in file and file not in (".", "..")
        raw = (directory / file).read_bytes()
        assert manifest["files"][file] == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        tensors.update(read_safetensors(directory / file))
    for name, recorded in manifest["files"].items():  # §3.5 (1.1): side files are vouched for too
        parts = name.split("/")
        assert all(part and not part.startswith(".") and "\\" not in part for part in parts), name
        path = directory.joinpath(*parts)
        if path.exists():
            assert not path.is_symlink() and path.is_file(), name
            raw = path.read_bytes()
            assert recorded == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}, name
    return manifest, tensors


# ---------------------------------------------------------------------------------------------
# §7 fingerprint.
# ---------------------------------------------------------------------------------------------


def fingerprint(files: list[Path]) -> dict:
    records = {}
    for file in files:
        for name, (dtype, shape, raw) in read_safetensors(file).items():
            n = len(raw)
            if n <= 4096:
                sample = raw
            else:
                sample = b"".join(raw[i * (n - 64) // 63 : i * (n - 64) // 63 + 64] for i in range(64))
            records[name] = {"dtype": dtype, "shape": shape, "sample": hashlib.sha256(sample).hexdigest()[:32]}
    canonical = json.dumps(records, sort_keys=True, separators=(",", ":")).encode()
    return {
        "algorithm": "sampled-sha256-v1",
        "digest": hashlib.sha256(canonical).hexdigest(),
        "tensors": dict(sorted(records.items())),
    }
