"""Long mutation-fuzz run over delta directories; prints outcomes by class.

Every outcome must be a correct load or a DeltaFormatError subclass (see tests/fuzzing.py).

Run:  python benchmarks/fuzz_deltas.py --cases 20000 --seed 0
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzzing import run_cases  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        outcomes = run_cases(Path(work), args.cases, args.seed)
    seconds = time.perf_counter() - start
    print(f"{args.cases} cases, seed {args.seed}, {seconds:.1f} s")
    for outcome, count in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"{count:>7}  {outcome}")
    bugs = sum(v for k, v in outcomes.items() if k.startswith("BUG"))
    print(f"bugs: {bugs}")
    return 1 if bugs else 0


if __name__ == "__main__":
    raise SystemExit(main())
