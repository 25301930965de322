"""Long-run memory of hot swaps: anonymous RSS (RssAnon) over thousands of swap_delta calls
between two deltas of one small model. It must stay flat: the library reads stored and base
tensors through paths that keep nothing per call (issue 16, class 10).

Run:  python benchmarks/swap_memory.py [--swaps 2000]
Prints RssAnon after a warm-up and at the end, and the growth per swap.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def swap_growth(swaps: int, warmup: int = 50) -> tuple[int, int, float]:
    """(RssAnon KiB after ``warmup`` swaps, after ``swaps`` more, seconds per swap)."""
    import gc
    import warnings

    import delta_format
    from delta_format import DeltaModel
    from tests.models import save, structured_perturbation, tiny_llama

    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        base = tiny_llama()
        save(base, root / "base")
        for i, method in enumerate(["sign", "dare"]):
            save(structured_perturbation(base, 0.05, seed=i + 1), root / f"ft{i}")
            params = {"p": 0.9} if method == "dare" else {}
            delta_format.compress(
                root / "base", root / f"ft{i}", root / f"d{i}", method=method, progress=False, **params
            )
        model = DeltaModel.from_pretrained(root / "d0")
        paths = [root / "d0", root / "d1"]
        for i in range(warmup):
            model.swap_delta(paths[i % 2])
        gc.collect()
        before = rss_anon_kib()
        start = time.perf_counter()
        for i in range(swaps):
            model.swap_delta(paths[i % 2])
        seconds = (time.perf_counter() - start) / max(swaps, 1)
        gc.collect()
        return before, rss_anon_kib(), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=int, default=2000)
    args = parser.parse_args()
    before, after, seconds = swap_growth(args.swaps)
    per_swap = (after - before) * 1024 / args.swaps
    print(f"{args.swaps} swaps, {seconds * 1000:.1f} ms each")
    print(f"RssAnon {before} KiB -> {after} KiB: {per_swap:+.0f} bytes per swap")
    return 0 if per_swap < 256 else 1


if __name__ == "__main__":
    raise SystemExit(main())
