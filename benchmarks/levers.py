"""The levers of a first load, each measured alone (in-process, min of the repeats), for
benchmarks/load_time.py:

* the arithmetic: decode + add + cast of every edited parameter into memory already touched, by
  the native loops (``delta_format.core.native``) and by torch ops (``DELTA_FORMAT_NATIVE=0``);
* the seeded-mask generator: the int32 stream of the torch path against the same counters computed
  as SPEC §6 words it (int64, every product below 2**63; same bits, tested), and the native
  loop's walk that finds where each thread starts;
* first touch of fresh memory (the resident floor's cost): from the heap, from one private
  anonymous block (`ModelStorage`), from a block populated up front (``MAP_POPULATE``), with
  transparent huge pages (``MADV_HUGEPAGE``), and from a shared file mapping (a cache entry).
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import torch


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def reconstruct_seconds(base: Path, delta: Path, repeats: int, native: bool = True) -> float:
    """The parameters of ``delta`` formed into touched memory; ``native``: False turns the native
    loops off (torch ops, the same bits)."""
    from delta_format.core import native as native_loops
    from delta_format.core.reconstruct import reconstruct_stored
    from delta_format.io.checkpoint import Checkpoint
    from delta_format.io.reader import DeltaReader

    checkpoint, reader = Checkpoint(base), DeltaReader(delta)
    parts = {name: (reader.manifest.tensors[name], reader.stored(name, "cpu")) for name in reader}
    outs = {name: torch.zeros(tuple(entry.shape), dtype=torch.bfloat16) for name, (entry, _) in parts.items()}

    def run():
        for name, (entry, stored) in parts.items():
            reconstruct_stored(
                name, [(entry, stored, 1.0)], checkpoint.get_tensor(name), dtype=torch.bfloat16, out=outs[name]
            )

    with patch.dict(os.environ, {native_loops.ENV_VAR: "1" if native else "0"}):
        return _best(run, repeats)


def generator_seconds(delta: Path, repeats: int) -> tuple[float, float, int]:
    """(int32 stream s, int64 spec-literal stream s, counters) for the kept elements of a seeded delta."""
    from delta_format.core import seeded_mask
    from delta_format.io.reader import DeltaReader

    reader = DeltaReader(delta)
    seeded = [
        n for n in reader if reader.entry(n).encoding.name == "sparse" and "seeded" in str(reader.entry(n).encoding)
    ]
    counts = [reader.stored(n)["values"].numel() for n in seeded]
    key, block = seeded_mask.stream_key(0, "w"), 1 << 16

    def literal(key: int, start: int, count: int) -> torch.Tensor:
        k = torch.arange(start, start + count, dtype=torch.int64)
        tmp = torch.empty_like(k)
        return seeded_mask._mix32_(seeded_mask._mix32_((k & 0xFFFFFFFF) ^ key, tmp) ^ (k >> 32), tmp)

    def walk(stream):
        for count in counts:
            for start in range(0, count, block):
                stream(key, start, min(block, count - start))

    return _best(lambda: walk(seeded_mask.uniform_stream), repeats), _best(lambda: walk(literal), repeats), sum(counts)


def native_walk_seconds(delta: Path, repeats: int) -> float | None:
    """The native loader's own pass over a seeded delta's stream (hash + gap of every counter, on
    threads: `native.seeded_checkpoints`, where each thread's walk starts), or None without it."""
    from delta_format.core import native, seeded_mask
    from delta_format.io.reader import DeltaReader

    reader = DeltaReader(delta)
    walks = []
    for name in reader:
        encoding = reader.entry(name).encoding
        if encoding.name == "sparse" and getattr(encoding, "index_coding", None) == "seeded" and encoding.p:
            stream = seeded_mask.native_stream(encoding.p, seeded_mask.stream_key(encoding.seed, name))
            walks.append((stream, reader.stored(name)["values"].numel()))
    if not walks or not native.available():
        return None
    return _best(lambda: [native.seeded_checkpoints(stream, count) for stream, count in walks], repeats)


def first_touch_seconds(nbytes: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Per way of allocating, (first call, best of ``repeats``): a load touches its memory once per
    process, so the first call is the figure; the best shows what a warm allocator reaches (huge
    pages freed by an earlier call are reused: 0.5 s first, 0.025 s after, for 417 MB)."""
    from delta_format.loaders.model_storage import ModelStorage

    source = torch.ones(nbytes // 2, dtype=torch.bfloat16)

    def block(flags=0, advice=None):
        def run():
            m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | flags)
            if advice is not None:
                m.madvise(advice)
            torch.frombuffer(m, dtype=torch.bfloat16).copy_(source)

        return run

    def shared_file():
        with tempfile.TemporaryDirectory() as d:
            storage = ModelStorage({"w": (torch.bfloat16, (nbytes // 2,))}, Path(d) / "w.safetensors")
            storage.view("w").copy_(source)
            storage.release()

    cases = {
        "heap (torch.empty)": lambda: torch.empty_like(source).copy_(source),
        "one private anonymous block (ModelStorage)": lambda: (
            ModelStorage({"w": (torch.bfloat16, (nbytes // 2,))}).view("w").copy_(source)
        ),
        "block populated up front (MAP_POPULATE)": block(getattr(mmap, "MAP_POPULATE", 0)),
        "transparent huge pages (MADV_HUGEPAGE)": block(0, getattr(mmap, "MADV_HUGEPAGE", None)),
        "shared file mapping (a cache entry being filled)": shared_file,
    }
    return {label: (_best(run, 1), _best(run, repeats)) for label, run in cases.items()}


def lever_section(base: Path, deltas: dict[str, Path], model_bytes: int, repeats: int) -> None:
    gb = model_bytes / 1e9
    print(
        f"Levers of a first load, each alone (in one process, {torch.get_num_threads()} threads, min of {repeats}):\n"
    )
    print("| lever | seconds | per GB of model |")
    print("|---|---|---|")
    from delta_format.core import native

    for label, path in deltas.items():
        seconds = reconstruct_seconds(base, path, repeats)
        if not native.available():
            print(f"| {label}: decode + add + cast into touched memory | {seconds:.2f} | {seconds / gb:.2f} s/GB |")
            continue
        torch_ops = reconstruct_seconds(base, path, repeats, native=False)
        print(
            f"| {label}: decode + add + cast into touched memory: native loops (used) / torch ops | "
            f"{seconds:.2f} / {torch_ops:.2f} ({torch_ops / seconds:.1f}x) | {seconds / gb:.2f} / {torch_ops / gb:.2f} s/GB |"
        )
    for label, path in deltas.items():
        fast, literal, counters = generator_seconds(path, repeats)
        if counters:
            print(
                f"| {label}: seeded-mask stream, {counters / 1e6:.0f} M counters, in torch ops: int32 / int64 as "
                f"SPEC §6 words it | {fast:.2f} / {literal:.2f} ({literal / max(fast, 1e-9):.1f}x) | "
                f"{fast / gb:.2f} / {literal / gb:.2f} s/GB |"
            )
        walk = native_walk_seconds(path, repeats)
        if walk is not None:
            print(
                f"| {label}: the native loop's extra walk of the stream (hash + gap per counter, on threads; the "
                f"loop itself draws the positions again as it adds them) | {walk:.2f} | {walk / gb:.2f} s/GB |"
            )
    touch_bytes = min(model_bytes, 512 << 20)
    for label, (first, best) in first_touch_seconds(touch_bytes, repeats).items():
        gb_touched = touch_bytes / 1e9
        print(
            f"| first touch of {touch_bytes >> 20} MB: {label} (first call / best of {repeats}) | "
            f"{first:.2f} / {best:.2f} | {first / gb_touched:.2f} / {best / gb_touched:.2f} s/GB |"
        )
