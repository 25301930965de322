"""Stored size per method, against the fine-tune's bytes and against each encoding's limit.

Compresses one synthetic Llama pair (bf16, built from a config) with every method and reports:

* bits per weight over the edited matrices (2-D tensors stored with the method's encoding), and
  the limit of the encoding: 1 bit for sign (its scales are the excess), 16 (1 - p) bits of bf16
  values for a sparse delta (a seeded mask adds nothing, it is a seed; the explicit indices of
  magnitude pruning are its excess), 16 r (m + n) / (m n) for rank r factors in bf16, 16 for dense;
* stored ÷ fine-tune bytes over those matrices, and over the whole checkpoint (every file of the
  delta directory, manifest and card included, ÷ the fine-tune's safetensors files).

Run:  python benchmarks/size.py [--scale 160M]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

METHODS = [
    ("dense", "dense", {}),
    ("dare p=0.5", "dare", {"p": 0.5}),
    ("dare p=0.9", "dare", {"p": 0.9}),
    ("dare p=0.99", "dare", {"p": 0.99}),
    ("darex p=0.99, q=0.05", "darex", {"p": 0.99, "q": 0.05}),
    ("magnitude p=0.9", "magnitude", {"p": 0.9}),
    ("sign per tensor", "sign", {"scale": "tensor"}),
    ("sign per row", "sign", {"scale": "row"}),
    ("lowrank r=16", "lowrank", {"rank": 16}),
]


def limit_bits(method: str, params: dict, shape: tuple[int, int]) -> float:
    """The fewest bits per weight the method's encoding can take for a ``shape`` matrix in bf16."""
    rows, cols = shape
    if method == "sign":
        return 1.0
    if method in ("dare", "darex", "magnitude"):
        return 16 * (1 - params["p"])
    if method == "lowrank":
        return 16 * params["rank"] * (rows + cols) / (rows * cols)
    return 16.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="160M")
    parser.add_argument("--work", type=Path, default=HERE / "work")
    args = parser.parse_args()

    import delta_format
    from benchmarks.synthetic import build_pair, machine

    base, ft = build_pair(args.work / f"llama-{args.scale}", args.scale)
    ft_file_bytes = sum(f.stat().st_size for f in ft.glob("*.safetensors"))
    print(
        f"# Stored size per method ({args.scale} Llama, bf16 fine-tune of {ft_file_bytes / 1e6:.0f} MB; {machine()})\n"
    )
    print(f"Command: `python benchmarks/size.py --scale {args.scale}`\n")
    print(
        "| method | bits / edited weight | encoding limit | ÷ limit | stored ÷ ft bytes (edited matrices) | "
        "delta dir ÷ ft checkpoint |"
    )
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, params in METHODS:
            out = Path(tmp) / label.replace(" ", "_")
            delta = delta_format.compress(base, ft, out, method=method, progress=False, **params)
            stored = weights = limit = 0.0
            for entry in delta.manifest.tensors.values():
                if len(entry.shape) != 2 or entry.encoding.name == "replace":
                    continue
                numel = math.prod(entry.shape)
                stored += entry.stats["stored_bytes"]
                weights += numel
                limit += limit_bits(method, params, tuple(entry.shape)) * numel
            bits = 8 * stored / weights
            whole = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / ft_file_bytes
            print(
                f"| {label} | {bits:.3f} | {limit / weights:.3f} | {bits / (limit / weights):.3f} | "
                f"{stored / (2 * weights):.4f} | {whole:.4f} |"
            )
    print(
        "\nDense is lossless: per tensor the smallest exact form (the zstd-compressed bit difference `bitdiff`, "
        "SPEC §5.6, with zstandard installed), never more than the fine-tune's own 16 bits, its limit here; the "
        "other methods store bf16 values. Sign's excess over 1 bit is its per-tensor or per-row scales; a seeded "
        "sparse delta's excess is the rounding of how many values a tensor keeps; magnitude's is its index gaps."
    )


if __name__ == "__main__":
    main()
