"""Decode throughput per encoding, on CPU (and on CUDA when there is one), against a copy baseline.

For one ``rows x cols`` bf16 parameter and each encoding, two paths are timed:

* ``decode``: `Encoding.decode` to a float32 delta (what `DeltaReader.decode` returns);
* ``load path``: `reconstruct_stored` into an allocated bf16 parameter: base + delta summed in
  float32 by row blocks and cast, which is what `DeltaModel.from_pretrained` and swaps run.

Both are reported as GB/s of bf16 parameter produced (2 bytes per element) and divided by the
baseline measured in the same run: copying the bf16 base into the same parameter (the memory
traffic any load path pays, with no delta arithmetic).

Run:  python benchmarks/decode.py [--rows 4096] [--cols 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best_seconds(fn, repeats: int, device) -> float:
    import torch

    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def encoded(rows: int, cols: int, device):
    """(label, encoding, stored) for each encoding, from one synthetic delta."""
    import torch

    from delta_format.core.encodings import DenseEncoding, LowRankEncoding, SignEncoding, SparseEncoding
    from delta_format.core.seeded_mask import kept_positions

    delta = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 1e-3
    explicit = kept_positions(rows * cols, 0.9, 1, "w")  # the same 10 % for every sparse coding
    cases = [
        ("dense bf16", DenseEncoding(), DenseEncoding().encode(delta, dtype=torch.bfloat16)),
        ("sparse seeded p=0.9", SparseEncoding("seeded", scale=10.0, seed=1, p=0.9), None),
        ("sparse gaps 10 %", SparseEncoding("gaps", scale=10.0), None),
        ("sparse bitmask 10 %", SparseEncoding("bitmask", scale=10.0), None),
        ("sign per tensor", SignEncoding("tensor"), SignEncoding("tensor").encode(delta)),
        ("sign per row", SignEncoding("row"), SignEncoding("row").encode(delta)),
        ("lowrank r=16", LowRankEncoding(16), LowRankEncoding(16).encode(delta)),
    ]
    for label, enc, stored in cases:
        if stored is None:
            positions = None if enc.index_coding == "seeded" else explicit
            stored = enc.encode(delta, name="w", positions=positions, dtype=torch.bfloat16)
        yield label, enc, {key: value.to(device) for key, value in stored.items()}


def run(device_name: str, rows: int, cols: int, repeats: int) -> None:
    import torch

    from delta_format.core.manifest import TensorEntry
    from delta_format.core.reconstruct import reconstruct_stored

    device = torch.device(device_name)
    base = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16).to(device)
    out = torch.empty_like(base)
    gigabytes = base.numel() * 2 / 1e9
    copy = best_seconds(lambda: out.copy_(base), repeats, device)
    print(
        f"\n{device.type}: {rows} x {cols} bf16 parameter ({gigabytes * 1e3:.0f} MB); baseline: bf16 copy of the "
        f"base into it, {gigabytes / copy:.2f} GB/s\n"
    )
    print("| encoding | stored bits/param | decode GB/s | ÷ copy | load path GB/s | ÷ copy |")
    print("|---|---|---|---|---|---|")
    for label, enc, stored in encoded(rows, cols, device):
        bits = sum(t.numel() * t.element_size() for t in stored.values()) * 8 / base.numel()
        shape = (rows, cols)
        decode = best_seconds(lambda: enc.decode(stored, shape, "w", torch.float32), repeats, device)
        parts = [(TensorEntry(enc, shape, "bfloat16", 1.0), stored, 1.0)]
        load = best_seconds(
            lambda: reconstruct_stored("w", parts, base, dtype=torch.bfloat16, out=out), repeats, device
        )
        print(
            f"| {label} | {bits:.2f} | {gigabytes / decode:.2f} | {copy / decode:.2f} | {gigabytes / load:.2f} | "
            f"{copy / load:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from benchmarks.synthetic import machine

    print(f"# Decode throughput per encoding ({machine()})\n")
    print(
        f"Command: `python benchmarks/decode.py --rows {args.rows} --cols {args.cols} --repeats {args.repeats}` "
        "(GB/s of bf16 parameter produced, min over the repeats; ÷ copy: the fraction of the plain copy's speed)"
    )
    run("cpu", args.rows, args.cols, args.repeats)
    if torch.cuda.is_available():
        run("cuda", args.rows, args.cols, args.repeats)
    else:
        print("\nNo CUDA device on this machine: the GPU rows were not measured.")


if __name__ == "__main__":
    main()
