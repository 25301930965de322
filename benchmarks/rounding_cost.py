"""What SPEC §9.1's stochastic rounding costs a load: every parameter of a delta rebuilt on its base
(`reconstruct_stored`, the loader's arithmetic) with the lossy half-precision entries rounded as
written, with the per-element dither of spec 1.3 (``"stochastic"``), with the table windows of
spec 1.6 (``"stochastic-window"``) and to nearest, best of ``--repeat`` passes each, tensors
already in memory (no I/O).

Run:  python benchmarks/rounding_cost.py --delta DELTA_DIR --base BASE_DIR [--repeat 3]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fidelity_budget import load_state  # noqa: E402
from delta_format.core.constants import ROUNDING_NEAREST, ROUNDING_STOCHASTIC, ROUNDING_WINDOW  # noqa: E402
from delta_format.core.dtypes import TORCH_DTYPES  # noqa: E402
from delta_format.core.reconstruct import reconstruct_stored  # noqa: E402
from delta_format.io.reader import DeltaReader  # noqa: E402


def rebuild_all(parts: dict, base: dict[str, torch.Tensor]) -> float:
    started = time.perf_counter()
    for name, (entry, stored) in parts.items():
        reconstruct_stored(name, [(entry, stored, 1.0)], base[name], dtype=TORCH_DTYPES[entry.dtype])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delta", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    base = load_state(args.base)
    with DeltaReader(args.delta) as reader:
        parts = {name: (reader.entry(name), reader.stored(name)) for name in reader.manifest.tensors}
    marked = [entry for entry, _ in parts.values() if entry.rounding != ROUNDING_NEAREST]
    elements = sum(math.prod(entry.shape) for entry, _ in parts.values())
    print(
        f"{len(parts)} parameters ({elements / 1e6:.1f} M elements), {len(marked)} marked "
        f"{sorted({entry.rounding for entry in marked})}, {torch.get_num_threads()} threads"
    )
    seconds = {}
    for rounding in ("as written", ROUNDING_STOCHASTIC, ROUNDING_WINDOW, ROUNDING_NEAREST):
        for entry in marked if rounding != "as written" else ():
            entry.rounding = rounding
        seconds[rounding] = min(rebuild_all(parts, base) for _ in range(args.repeat))
    nearest = seconds[ROUNDING_NEAREST]
    for rounding, took in seconds.items():
        extra = (took - nearest) / elements * 1e9
        print(f"{rounding:>18}: {took:.3f} s  {took / nearest:.2f}x nearest  (+{extra:.2f} ns per element)")


if __name__ == "__main__":
    main()
