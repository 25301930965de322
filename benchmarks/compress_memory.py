"""Compressor memory and throughput.

Memory: compress Llama-shaped pairs (hidden 512) of 2, 4 and 8 layers, each in a fresh
subprocess, and report the compressor's peak anonymous RSS (sampled from ``RssAnon`` in
/proc/self/status every 2 ms, minus the process's RSS after imports) divided by the bytes of the
largest tensor, and the peak total RSS (``VmHWM``). Streaming means the ratio does not grow with
depth: only a few tensors are alive at once, plus the writer's shard buffer, which is set to a
fixed ``--shard-size`` here (the default of 2 GB would buffer a small delta whole).

Throughput: compress a ~110M-parameter bf16 pair with each data-free method and report MB/s of
fine-tune weights (wall time of `delta_format.compress`, which includes reading both
checkpoints, the base fingerprint, encoding, measuring the error, writing and hashing the shards,
and re-opening the result). ``--profile METHOD`` prints where the time goes.

    python benchmarks/compress_memory.py                 # both tables
    python benchmarks/compress_memory.py --profile dare  # cProfile of one run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.memory import PeakAnonSampler, status_kib  # noqa: E402

METHODS = {
    "dense": {},
    "dare": {"p": 0.9},
    "darex": {"p": 0.99, "q": 0.05},
    "magnitude": {"p": 0.9},
    "structural": {"p": 0.5},
    "sign": {"scale": "row"},
    "lowrank": {"rank": 16},
}


def build_pair(root: Path, layers: int, hidden: int, intermediate: int, vocab: int, rel: float = 1e-3):
    """``root/base`` and ``root/finetune`` in bf16: random weights, and the same plus a delta of
    ``rel`` times each tensor's mean |w| (built once, reused)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {"layers": layers, "hidden": hidden, "intermediate": intermediate, "vocab": vocab, "rel": rel}
    marker = root / "pair.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root / "base", root / "finetune"
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g) * torch.rand(p.shape[0], *([1] * (p.dim() - 1)), generator=g)
            p.copy_((p.float() + noise * rel * p.float().abs().mean()).to(p.dtype))
    model.save_pretrained(root / "finetune")
    marker.write_text(json.dumps(spec))
    return root / "base", root / "finetune"


def child(method: str, base: str, ft: str, out: str, shard_size: str) -> None:
    """One compression in this (fresh) process; prints a JSON line."""
    import huggingface_hub.utils  # noqa: F401
    import torch  # noqa: F401  (imports count as the baseline, not as compressor memory)
    from huggingface_hub import ModelCard  # noqa: F401

    import delta_format
    import delta_format.compression.pipeline  # noqa: F401
    import delta_format.io.card  # noqa: F401
    import delta_format.io.delta  # noqa: F401
    from delta_format.io.checkpoint import Checkpoint

    with PeakAnonSampler() as memory:
        start = time.perf_counter()
        delta = delta_format.compress(
            base, ft, out, method=method, progress=False, overwrite=True, max_shard_size=shard_size, **METHODS[method]
        )
        seconds = time.perf_counter() - start
    ckpt = Checkpoint(ft)
    largest = max(math_prod(ckpt.shape_dtype(n)[0]) * 2 for n in ckpt)  # bf16
    print(
        json.dumps(
            {
                "method": method,
                "seconds": seconds,
                "baseline_anon": memory.baseline,
                "peak_anon": memory.peak,
                "vm_hwm": status_kib("VmHWM") * 1024,
                "largest_tensor": largest,
                "finetune_bytes": delta.manifest.stats["finetune_bytes"],
                "stored_bytes": delta.manifest.stats["stored_bytes"],
            }
        )
    )


def math_prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def run_child(method: str, base: Path, ft: Path, out: Path, shard_size: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, __file__, "--child", method, str(base), str(ft), str(out), shard_size],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_table(work: Path, methods: list[str], shard_size: str) -> None:
    print(f"## Peak memory of the compressor (hidden 512, bf16; shard buffer {shard_size})\n")
    print("| layers | params | largest tensor | method | peak anon RSS - baseline | ÷ largest tensor | VmHWM |")
    print("|---|---|---|---|---|---|---|")
    for layers in (2, 4, 8):
        base, ft = build_pair(work / f"mem-{layers}", layers, 512, 1376, 4096)
        for method in methods:
            r = run_child(method, base, ft, work / f"mem-{layers}" / f"delta-{method}", shard_size)
            grown = r["peak_anon"] - r["baseline_anon"]
            print(
                f"| {layers} | {r['finetune_bytes'] / 2 / 1e6:.1f}M | {r['largest_tensor'] / 1e6:.1f} MB | {method} "
                f"| {grown / 1e6:.1f} MB | {grown / r['largest_tensor']:.1f} | {r['vm_hwm'] / 1e6:.0f} MB |"
            )
    print()


def throughput_table(work: Path, methods: list[str], repeats: int) -> None:
    base, ft = build_pair(work / "throughput", 12, 768, 2048, 16000)
    rows = []
    for method in methods:
        runs = [run_child(method, base, ft, work / "throughput" / f"delta-{method}", "2GB") for _ in range(repeats)]
        rows.append(min(runs, key=lambda r: r["seconds"]))
    size = rows[0]["finetune_bytes"]
    print(
        f"## Compressor throughput ({size / 2 / 1e6:.0f}M parameters, {size / 1e6:.0f} MB bf16; "
        f"best of {repeats} runs, page cache warm)\n"
    )
    print("| method | params | seconds | MB/s of fine-tune | stored | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {METHODS[r['method']]} | {r['seconds']:.2f} | {size / 1e6 / r['seconds']:.0f} "
            f"| {r['stored_bytes'] / 1e6:.1f} MB | {size / r['stored_bytes']:.1f}x |"
        )
    print()


def profile(work: Path, method: str) -> None:
    import cProfile
    import pstats

    import delta_format

    base, ft = build_pair(work / "throughput", 12, 768, 2048, 16000)
    profiler = cProfile.Profile()
    profiler.enable()
    delta_format.compress(
        base,
        ft,
        work / "throughput" / f"delta-{method}",
        method=method,
        progress=False,
        overwrite=True,
        **METHODS[method],
    )
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=HERE / "work", help="where the model pairs are built")
    parser.add_argument("--memory-methods", default="dense,dare,sign")
    parser.add_argument("--throughput-methods", default=",".join(METHODS))
    parser.add_argument("--shard-size", default="16MB", help="writer shard buffer for the memory runs")
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs per method (the best counts)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--profile", metavar="METHOD")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    if args.profile:
        return profile(args.work, args.profile)
    print(
        f"# Compressor benchmarks ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)\n"
    )
    if not args.skip_memory:
        memory_table(args.work, args.memory_methods.split(","), args.shard_size)
    if not args.skip_throughput:
        throughput_table(args.work, args.throughput_methods.split(","), args.repeats)


if __name__ == "__main__":
    main()
