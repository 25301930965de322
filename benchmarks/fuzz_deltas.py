"""Long mutation-fuzz run over delta directories; prints outcomes by class.

Every outcome must be a correct load or a DeltaFormatError subclass (see tests/fuzzing.py).
Modes: plain (mutations as they come: most stop at the integrity check); ``--consistent`` (the
manifest's sizes and hashes recomputed after each mutation, so they reach decoding and the base
checks); ``--limited`` (consistent, each case in a worker under a memory and a time limit, half
of them hot-swapped into a loaded model and served on the fly; see tests/fuzz_limits.py).

Run:  python benchmarks/fuzz_deltas.py --cases 20000 --seed 0 [--consistent | --limited]
"""

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz_limits import run_limited  # noqa: E402
from tests.fuzzing import run_cases  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--consistent", action="store_true", help="recompute sizes and hashes after each mutation")
    mode.add_argument("--limited", action="store_true", help="consistent, under memory/time limits, with a model")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address space per case beyond the worker's")
    parser.add_argument("--seconds", type=float, default=20.0, help="time limit per case")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        if args.limited:
            outcomes = run_limited(Path(work), args.cases, args.seed, memory_mb=args.memory_mb, seconds=args.seconds)
        else:
            outcomes = run_cases(Path(work), args.cases, args.seed, consistent=args.consistent)
    seconds = time.perf_counter() - start
    name = "limited" if args.limited else "consistent" if args.consistent else "plain"
    print(f"{args.cases} cases ({name}), seed {args.seed}, {seconds:.1f} s")
    for outcome, count in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"{count:>7}  {outcome}")
    failures = sum(v for k, v in outcomes.items() if k.startswith(("BUG", "LIMIT")))
    print(f"untyped or wrong: {sum(v for k, v in outcomes.items() if k.startswith('BUG'))}")
    print(f"over the memory/time limits: {sum(v for k, v in outcomes.items() if k.startswith('LIMIT'))}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
