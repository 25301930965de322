"""What SPEC 1.3's stochastic rounding costs a load: every parameter of a delta rebuilt on its base
(`reconstruct_stored`, the loader's arithmetic) with each entry's rounding as written and with
rounding to nearest, best of ``--repeat`` passes each, tensors already in memory (no I/O).

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
from delta_format.core.constants import ROUNDING_NEAREST  # noqa: E402
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
    marked = sum(entry.rounding != ROUNDING_NEAREST for entry, _ in parts.values())
    elements = sum(math.prod(entry.shape) for entry, _ in parts.values())
    as_written = min(rebuild_all(parts, base) for _ in range(args.repeat))
    for entry, _ in parts.values():
        entry.rounding = ROUNDING_NEAREST
    nearest = min(rebuild_all(parts, base) for _ in range(args.repeat))
    print(
        f"{len(parts)} parameters ({elements / 1e6:.1f} M elements), {marked} marked stochastic, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"as written: {as_written:.2f} s   nearest: {nearest:.2f} s   ratio {as_written / nearest:.2f}x")


if __name__ == "__main__":
    main()
