"""Mutation fuzzing of delta directories (issue: hostile inputs).

A valid delta with every encoding is written once; each case copies it, applies one random
mutation (bytes of a shard's header or body, truncation, manifest fields, index entries, files
removed or replaced by symlinks), then loads it the way the loader does (validate, check shapes
against the base, decode, reconstruct). Every outcome must be one of:

* ``ok``: loaded, and the weights equal the unmutated delta's (the mutation was harmless);
* ``ok-manifest-changed``: the manifest was edited into another *valid* manifest (a different
  alpha, scale or seed is a different delta, not corruption: only a signature could tell);
* a `DeltaFormatError` subclass.

Anything else (another exception, different weights from a shard mutation, a hang, a memory
blow-up) is a bug and is reported as ``BUG:<what>``.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from delta_format.core.dtypes import TORCH_DTYPES
from delta_format.core.encodings import (
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
from delta_format.core.manifest import BaseReference, TensorEntry
from delta_format.core.reconstruct import reconstruct_stored
from delta_format.errors import DeltaFormatError
from delta_format.io.reader import DeltaReader
from delta_format.io.writer import DeltaWriter
from tests.crafting import rehash

JUNK_VALUES = [
    None,
    -1,
    0,
    2**70,
    1e308,
    -0.5,
    "x",
    "../../etc/passwd",
    "/abs/path",
    [],
    {},
    [2**40, 2**40],
    [1] * 20,
    {"a": 1},
    True,
    "9.0",
    "1.999",
    "",
    "\u0000",
    "sparse",
    "seeded",
    0.999999999,
]


def make_base(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "dense.w": torch.randn(8, 6, generator=g),
        "seeded.w": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "gaps.w": torch.randn(12, 10, generator=g),
        "bitmask.w": torch.randn(10, 9, generator=g).to(torch.float16),
        "sign.w": torch.randn(9, 7, generator=g),
        "lowrank.w": torch.randn(10, 8, generator=g),
        "bias": torch.randn(13, generator=g),
        "dense_q.w": torch.randn(7, 9, generator=g),
        "sparse_q.w": torch.randn(12, 8, generator=g).to(torch.bfloat16),
        "lowrank_q.w": torch.randn(11, 6, generator=g),
        "bitdiff.w": torch.randn(5, 6, generator=g).to(torch.bfloat16),
        "sum.w": torch.randn(10, 12, generator=g),
        "rows_q.w": torch.randn(9, 5, generator=g).to(torch.bfloat16),
        "grown.w": torch.randn(6, 5, generator=g).to(torch.float16),
        "sign_q.w": torch.randn(11, 6, generator=g).to(torch.bfloat16),
    }


def write_valid_delta(out: Path, base: dict[str, torch.Tensor]) -> None:
    """A small sharded delta that uses every encoding and index coding."""
    g = torch.Generator().manual_seed(1)
    ref = BaseReference(local_path="in-memory")
    with DeltaWriter(out, base=ref, method="mixed", max_shard_size=400) as w:

        def add(name, enc, stored, dtype="float32", alpha=1.0, rounding="nearest", shape=None, base_rows=None):
            shape = shape or (tuple(base[name].shape) if name in base else tuple(stored["value"].shape))
            w.add(
                name,
                TensorEntry(enc, shape, dtype, alpha, rounding=rounding, base_rows=base_rows),
                stored,
            )

        add("dense.w", DenseEncoding(), DenseEncoding().encode(torch.randn(8, 6, generator=g)))
        enc = SparseEncoding("seeded", scale=10.0, seed=2**40 + 3, p=0.9)
        add(
            "seeded.w",
            enc,
            enc.encode(torch.randn(16, 16, generator=g), name="seeded.w", dtype=torch.bfloat16),
            "bfloat16",
        )
        idx = torch.tensor([0, 3, 17, 64, 119])
        add(
            "gaps.w",
            SparseEncoding("gaps", scale=2.0),
            SparseEncoding("gaps", scale=2.0).encode(torch.randn(12, 10, generator=g), name="gaps.w", positions=idx),
        )
        add(
            "bitmask.w",
            SparseEncoding("bitmask"),
            SparseEncoding("bitmask").encode(torch.randn(10, 9, generator=g), name="bitmask.w", positions=idx[:4]),
            "float16",
        )
        add("sign.w", SignEncoding("row"), SignEncoding("row").encode(torch.randn(9, 7, generator=g)), alpha=1.5)
        add("lowrank.w", LowRankEncoding(2), LowRankEncoding(2).encode(torch.randn(10, 8, generator=g)))
        add("new.head", ReplaceEncoding(), ReplaceEncoding().encode(torch.randn(3, 4, generator=g)))
        enc = QuantizedDenseEncoding(3, 16)  # the quantised values and bitdiff of SPEC 1.1
        add("dense_q.w", enc, enc.encode(torch.randn(7, 9, generator=g)))
        enc = QuantizedSparseEncoding("seeded", bits=2, group=8, count=0, scale=4.0, seed=5, p=0.75)
        enc = enc.with_count(len(enc.positions(96, "sparse_q.w")))
        stored = enc.encode(torch.randn(12, 8, generator=g), name="sparse_q.w")
        add("sparse_q.w", enc, stored, "bfloat16", rounding="stochastic")  # SPEC 1.3's rounding
        enc = QuantizedLowRankEncoding([(1, 8), (2, 3)], 4)
        add("lowrank_q.w", enc, enc.encode(torch.randn(11, 6, generator=g)))
        ft = (base["bitdiff.w"].float() + 0.01 * torch.randn(5, 6, generator=g)).to(torch.bfloat16)
        add("bitdiff.w", BitdiffEncoding(8), BitdiffEncoding(8).encode(ft, base=base["bitdiff.w"]), "bfloat16")
        low = QuantizedLowRankEncoding([(1, 4)], 8)  # SPEC 1.2's sum: low rank + seeded DARE codes
        dare = QuantizedSparseEncoding("seeded", bits=4, group=8, count=0, scale=2.0, seed=9, p=0.5)
        dare = dare.with_count(len(dare.positions(120, "sum.w")))
        parts = [
            low.encode(torch.randn(10, 12, generator=g)),
            dare.encode(torch.randn(10, 12, generator=g), name="sum.w"),
        ]
        enc = SumEncoding([low, dare])
        add("sum.w", enc, enc.encode(torch.zeros(10, 12), parts=parts), alpha=0.5)
        enc = QuantizedRowsEncoding(4, 4, 3)  # SPEC 1.4's rows-q: rows 1, 4, 8; groups span rows
        rows = torch.zeros(9, 5)
        rows[[1, 4, 8]] = torch.randn(3, 5, generator=g)
        add("rows_q.w", enc, enc.encode(rows), "bfloat16", rounding="stochastic-window")  # and SPEC 1.6's
        old, new = QuantizedDenseEncoding(4, 8), QuantizedRowsEncoding(8, 64, 2)  # SPEC 1.5: 6 rows grown to 8
        grown = torch.zeros(8, 5)
        grown[6:] = torch.randn(2, 5, generator=g)
        enc = SumEncoding([old, new])
        stored = enc.join(
            [old.encode(torch.randn(8, 5, generator=g) * (torch.arange(8) < 6)[:, None]), new.encode(grown)]
        )
        add("grown.w", enc, stored, "float16", rounding="stochastic", shape=(8, 5), base_rows=6)
        enc = SignEncoding("row", 4, 4)  # SPEC 1.7: row scales as codes, 11 rows in 3 groups
        add("sign_q.w", enc, enc.encode(torch.randn(11, 6, generator=g)), "bfloat16", rounding="stochastic-window")


def load_all(directory: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the loader does, without a model: validate, check shapes against the base first, decode, add."""
    reader = DeltaReader(directory)
    out = {}
    for name, entry in reader.manifest.tensors.items():
        if entry.encoding.is_delta and (name not in base or tuple(base[name].shape) != entry.base_shape):
            from delta_format.errors import BaseMismatchError

            raise BaseMismatchError(
                f"{name!r} does not fit the base",
                expected=list(base[name].shape) if name in base else "a base tensor",
                found=list(entry.shape),
            )
        parts = [(entry, reader.stored(name), 1.0)]
        out[name] = reconstruct_stored(name, parts, base.get(name), dtype=TORCH_DTYPES[entry.dtype])
    reader.close()
    return out


def _json_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_paths(v, prefix + (i,))


def _set_path(obj, path, value):
    for key in path[:-1]:
        obj = obj[key]
    if value is _DELETE:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


_DELETE = object()


KINDS = ["shard-header", "shard-body", "truncate", "append", "manifest", "manifest-bytes", "index", "remove", "symlink"]
DEEP_KINDS = ["stored-values", "manifest", "manifest", "shard-body", "side-file"]
"""Extra weight for mutations that reach decoding once the hashes are made consistent again."""
JUNK_TENSORS = [
    lambda t: torch.full_like(t, float("nan")) if t.is_floating_point() else t + 1,
    lambda t: t * 1e30 if t.is_floating_point() else t * 255,
    lambda t: t.reshape(-1)[:-1] if t.numel() else torch.ones(3, dtype=t.dtype),
    lambda t: torch.zeros(0, dtype=t.dtype),
    lambda t: t.to(torch.int64) if t.is_floating_point() else t.to(torch.float32),
    lambda t: t.flip(0) if t.dim() else t,
]


def mutate_deep(directory: Path, rng: random.Random) -> str:
    """A mutation meant for the consistent-hash mode: a stored tensor replaced by junk values,
    shape or dtype, or a side file added."""
    kind = rng.choice(["stored-values", "side-file"])
    if kind == "side-file":
        name = rng.choice(["config.json", "generation_config.json", "sub/tokenizer.json"])
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(rng.choice([b"{", b'{"a": 1, "a": 2}', b"[" * 5000, b'{"x": 1e400}', b"{}"]))
        return kind
    path = rng.choice(sorted(directory.glob("*.safetensors")))
    tensors = load_file(str(path))
    if tensors:
        key = rng.choice(sorted(tensors))
        tensors[key] = rng.choice(JUNK_TENSORS)(tensors[key]).contiguous()
    save_file(tensors, str(path))
    return kind


def mutate(directory: Path, rng: random.Random, deep: bool = False) -> str:
    """Apply one random mutation in place; returns its category."""
    shards = sorted(directory.glob("*.safetensors"))
    kind = rng.choice(KINDS + (DEEP_KINDS if deep else []))
    if kind in ("stored-values", "side-file"):
        return mutate_deep(directory, rng)
    if kind in ("shard-header", "shard-body", "truncate", "append"):
        path = rng.choice(shards)
        data = bytearray(path.read_bytes())
        header_end = 8 + int.from_bytes(data[:8], "little")
        if kind == "shard-header":
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(0, header_end)] = rng.randrange(256)
        elif kind == "shard-body" and len(data) > header_end:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(header_end, len(data))] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            data = data[: rng.randrange(0, len(data))]
        else:
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        path.write_bytes(bytes(data))
    elif kind == "manifest":
        path = directory / "delta_config.json"
        manifest = json.loads(path.read_text())
        target = rng.choice([p for p in _json_paths(manifest) if p])
        _set_path(manifest, target, _DELETE if rng.random() < 0.2 else rng.choice(JUNK_VALUES))
        path.write_text(json.dumps(manifest))
        return "manifest:" + "/".join(str(p) for p in target[:1] + target[2:3])
    elif kind == "manifest-bytes":
        path = directory / "delta_config.json"
        data = bytearray(path.read_bytes())
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
    elif kind == "index":
        path = directory / "delta.safetensors.index.json"
        index = json.loads(path.read_text())
        key = rng.choice(sorted(index["weight_map"]))
        index["weight_map"][key] = rng.choice(
            [
                "../outside.safetensors",
                "/etc/passwd",
                "missing.safetensors",
                "",
                7,
                rng.choice(shards).name,
                "delta_config.json",
            ]
        )
        path.write_text(json.dumps(index))
    elif kind == "remove":
        rng.choice(shards + [directory / "delta.safetensors.index.json"]).unlink()
    else:
        victim = rng.choice(shards)
        outside = directory.parent / f"outside-{rng.randrange(10**9)}.safetensors"
        shutil.copyfile(victim, outside)
        victim.unlink()
        victim.symlink_to(outside)
    return kind


def classify(kind: str, got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], consistent: bool) -> str:
    """The outcome of a load that raised nothing."""
    if got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got):
        return "ok"
    if not all(torch.isfinite(t).all() for t in got.values() if t.is_floating_point()):
        return f"BUG:{kind}:non-finite weights returned"
    if kind.startswith("manifest"):
        return "ok-manifest-changed"
    if consistent:  # the manifest vouches for the new bytes: another valid delta, not corruption
        return "ok-content-changed"
    return f"BUG:{kind}:silently different weights"


def run_cases(workdir: Path, cases: int, seed: int = 0, *, consistent: bool = False) -> Counter:
    """Run ``cases`` mutations; returns outcome counts (keys starting with ``BUG`` are failures).

    ``consistent``: after each mutation the manifest's sizes and hashes are recomputed
    (`tests.crafting.rehash`), as an attacker who publishes a crafted delta would, so mutations
    reach safetensors validation, decoding and the base checks instead of the integrity check;
    tensors replaced by junk values, shapes or dtypes and hostile side files join the mutations.
    (`tests.fuzz_limits` runs this mode under memory and time limits, with a model target.)"""
    base = make_base()
    valid = workdir / "valid"
    write_valid_delta(valid, base)
    expected = load_all(valid, base)
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    for i in range(cases):
        case = workdir / f"case-{i}"
        shutil.copytree(valid, case)
        kind = mutate(case, rng, deep=consistent)
        if consistent:
            rehash(case)
        try:
            got = load_all(case, base)
        except DeltaFormatError as exc:
            outcomes[type(exc).__name__] += 1
        except Exception as exc:  # noqa: BLE001 - the point is to catch everything else
            outcomes[f"BUG:{kind}:{type(exc).__name__}:{str(exc)[:80]}"] += 1
        else:
            outcomes[classify(kind, got, expected, consistent)] += 1
        shutil.rmtree(case, ignore_errors=True)
        for stray in workdir.glob("outside-*"):
            stray.unlink()
    return outcomes
