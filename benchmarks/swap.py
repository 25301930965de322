"""Hot-swap cost: swap_delta vs a fresh DeltaModel.from_pretrained vs transformers loading the
full fine-tune, and vs the floor (reading and decoding the delta's bytes), in one run.

Run:  python benchmarks/swap.py [--scale 160M] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="160M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=HERE / "work")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.synthetic import build_pair, cached_delta, machine
    from delta_format import DeltaModel
    from delta_format.io.reader import DeltaReader

    root = args.work / f"llama-{args.scale}"
    base, ft = build_pair(root, args.scale)
    deltas = {}
    for label, method, params in [("sign", "sign", {"scale": "row"}), ("dare", "dare", {"p": 0.9})]:
        deltas[label] = cached_delta(base, ft, root / f"delta-{method}", method, **params)

    model = DeltaModel.from_pretrained(deltas["sign"], dtype=torch.bfloat16)

    def decode_floor(path):
        reader = DeltaReader(path)
        for name in reader:
            reader.decode(name)

    def touch(m):
        with torch.no_grad():
            m(input_ids=torch.arange(8).unsqueeze(0))

    print(f"# Hot-swap ({args.scale}, bf16; {machine()})\n")
    print(f"Command: `python benchmarks/swap.py --scale {args.scale} --repeats {args.repeats}`\n")
    print(
        "| delta | swap s (min / median) | read+decode floor s | swap ÷ floor | fresh from_pretrained s | transformers full fine-tune + forward s |"
    )
    print("|---|---|---|---|---|---|")
    hf = timed(lambda: touch(AutoModelForCausalLM.from_pretrained(ft, dtype=torch.bfloat16)), args.repeats)
    order = {"sign": "dare", "dare": "sign"}
    verdicts = []
    for label, path in deltas.items():
        swap_times = []
        for _ in range(args.repeats):
            model.swap_delta(deltas[order[label]])
            start = time.perf_counter()
            model.swap_delta(path)
            swap_times.append(time.perf_counter() - start)
        floor = timed(lambda: decode_floor(path), args.repeats)
        fresh = timed(lambda: DeltaModel.from_pretrained(path, dtype=torch.bfloat16), args.repeats)
        print(
            f"| {label} | {min(swap_times):.2f} / {statistics.median(swap_times):.2f} | {floor[0]:.2f} | "
            f"{min(swap_times) / floor[0]:.2f}x | {fresh[0]:.2f} | {hf[0]:.2f} |"
        )
        verdicts.append(
            f"- {label}: swap {min(swap_times) / floor[0]:.2f}x the read+decode floor (target 2x: "
            f"{'met' if min(swap_times) / floor[0] <= 2 else 'missed'}), {min(swap_times) / fresh[0]:.2f}x a fresh load."
        )
    print("\n" + "\n".join(verdicts))
    cache = model.delta_swapper.cache
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        f"\nSwap machinery holds {len(cache)} opened deltas ({cache.nbytes / 1e6:.1f} MB of stored tensors, "
        f"memory-mapped) beside a {params / 1e9:.2f} GB model; no copy of the base is kept (it is re-read from its mapped files)."
    )


if __name__ == "__main__":
    main()
