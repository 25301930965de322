"""The GPU path in one command: load time, decode throughput and on-the-fly speed on a CUDA device.

Prints, with every baseline measured in the same run on the same device:

* the device's memory bandwidth, measured with a device-to-device copy of 1 GiB (bytes read +
  written per second, best of 5);
* load + first forward with ``device_map="cuda"`` (fresh subprocesses, warm page cache, one
  unmeasured run first) for transformers' own load of the full fine-tune, and for delta loads
  (cache off: decoded on the device from the encoded bytes; and a materialised-cache hit);
* decode throughput: every edited parameter rebuilt on the device from inputs already there
  (base + encoded delta read, result written), in GB/s of those bytes and as a fraction of the
  measured bandwidth (goal >= 50 %);
* on-the-fly forward throughput (sign and DARE attached to the base) against the materialised
  fine-tune, at 8 x 1 and 8 x 128 tokens, with the merged-weight cache at its default budget and off.

Finishes in under 5 minutes on one GPU (0.5B). Without a CUDA device it says why and exits 0.

Run:  python benchmarks/gpu.py [--scale 0.5B] [--repeats 1]
Dry run of the same code on the CPU (checks the script, says nothing of a GPU):
      python benchmarks/gpu.py --device cpu --scale tiny
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DEVICE = "cuda"  # --device; "cpu" only to dry-run the script
VARIANTS = {"sign (row)": ("sign", {"scale": "row"}), "dare p=0.9": ("dare", {"p": 0.9})}


def sync() -> None:
    import torch

    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def child(kind: str, path: str) -> None:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM

    from delta_format import DeltaModel

    torch.zeros(1, device=DEVICE)  # CUDA initialised before the clock, for every variant alike
    start = time.perf_counter()
    if kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=DEVICE)
    else:
        model = DeltaModel.from_pretrained(path, dtype=torch.bfloat16, device_map=DEVICE)
    with torch.no_grad():
        model(input_ids=torch.arange(8, device=DEVICE).unsqueeze(0))
    sync()
    print(json.dumps({"seconds": time.perf_counter() - start}))


def load_seconds(kind: str, path: Path, repeats: int, cache: str) -> float:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DELTA_FORMAT_MATERIALIZED_CACHE": cache,
        "PYTHONPATH": str(HERE.parent),
    }
    runs = []
    for _ in range(repeats + 1):
        out = subprocess.run(
            [sys.executable, __file__, "--device", DEVICE, "--child", kind, str(path)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    return min(runs[1:])


def bandwidth() -> float:
    """Device memory bandwidth, GB/s of bytes read + written by a 1 GiB device-to-device copy."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _best(lambda: dst.copy_(src), 5) / 1e9


def _best(fn, repeats: int) -> float:

    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def decode_throughput(base: Path, delta: Path, repeats: int) -> tuple[float, int]:
    """(GB/s, bytes) of rebuilding every edited parameter on the device from device-resident inputs."""
    import torch

    from delta_format.core.reconstruct import reconstruct_stored
    from delta_format.io.checkpoint import Checkpoint
    from delta_format.io.reader import DeltaReader

    checkpoint, reader = Checkpoint(base), DeltaReader(delta)
    work, moved = [], 0
    for name in reader:
        entry, stored = reader.entry(name), reader.stored(name, DEVICE)
        base_tensor = checkpoint.get_tensor(name, DEVICE)
        out = torch.empty_like(base_tensor)
        moved += 2 * base_tensor.numel() * base_tensor.element_size()
        moved += sum(t.numel() * t.element_size() for t in stored.values())
        work.append((name, entry, stored, base_tensor, out))

    def run():
        for name, entry, stored, base_tensor, out in work:
            reconstruct_stored(name, [(entry, stored, 1.0)], base_tensor, dtype=torch.bfloat16, out=out)

    return moved / _best(run, repeats) / 1e9, moved


def on_the_fly(base: Path, deltas: dict[str, Path], repeats: int) -> list[tuple[str, float, float]]:
    """(label, tokens/s at 8 x 1, tokens/s at 8 x 128) for each delta materialised and on the fly."""
    import torch
    from transformers import AutoModelForCausalLM

    from delta_format import DeltaModel, attach_deltas, set_active_delta

    shapes = [(8, 1), (8, 128)]

    def speeds(model):
        out = []
        for b, s in shapes:
            ids = torch.arange(b * s, device=DEVICE).remainder(1000).view(b, s)
            with torch.no_grad():
                out.append(ids.numel() / _best(lambda: model(input_ids=ids), repeats + 3))
        return out

    rows = []
    shared = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=DEVICE).eval()
    cache = attach_deltas(shared, {label: path for label, path in deltas.items()}).merged_weights
    budget = cache.budget  # the library's default
    for label, path in deltas.items():
        materialised = DeltaModel.from_pretrained(path, dtype=torch.bfloat16, device_map=DEVICE)
        rows.append((f"{label}: materialised", *speeds(materialised)))
        del materialised
        if DEVICE.startswith("cuda"):
            torch.cuda.empty_cache()
        set_active_delta(shared, label)
        rows.append((f"{label}: on the fly", *speeds(shared)))
        cache.resize(0)
        rows.append((f"{label}: on the fly, merged-weight cache off", *speeds(shared)))
        cache.resize(budget)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="0.5B")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu dry-runs the script")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"))
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if args.child:
        return child(*args.child)

    import torch

    print("# GPU: load, decode and on-the-fly throughput\n")
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        print(f"Skipped: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False).")
        return
    from benchmarks.synthetic import build_pair, cached_delta

    started = time.perf_counter()
    root = HERE / "work" / f"llama-{args.scale}"
    base, ft = build_pair(root, args.scale)
    deltas = {}
    for label, (method, params) in VARIANTS.items():
        deltas[label] = cached_delta(base, ft, root / f"delta-{method}", method, **params)
    device = torch.cuda.get_device_name() if DEVICE.startswith("cuda") else "the CPU (dry run, not a GPU figure)"
    print(f"Command: `python benchmarks/gpu.py --scale {args.scale} --repeats {args.repeats}` on {device}\n")
    peak = bandwidth()
    print(f"Device-to-device copy: {peak:.0f} GB/s (bytes read + written).\n")

    reference = load_seconds("hf", ft, args.repeats, "0")
    print(f'| load + first forward, device_map="{DEVICE}" | seconds | ÷ transformers |')
    print("|---|---|---|")
    print(f"| transformers, full fine-tune | {reference:.2f} | 1.00x |")
    for label, path in deltas.items():
        first = load_seconds("delta", path, args.repeats, "0")
        print(f"| {label}: decoded on the device (cache off) | {first:.2f} | {first / reference:.2f}x |")
        with tempfile.TemporaryDirectory(dir=root) as cache:
            env = {**os.environ, "DELTA_FORMAT_MATERIALIZED_CACHE": cache, "PYTHONPATH": str(HERE.parent)}
            fill = "import sys; from delta_format import DeltaModel; DeltaModel.from_pretrained(sys.argv[1])"
            subprocess.run([sys.executable, "-c", fill, str(path)], check=True, env=env, cwd=HERE.parent)
            hit = load_seconds("delta", path, args.repeats, cache)
        print(f"| {label}: materialised-cache hit | {hit:.2f} | {hit / reference:.2f}x |")

    print("\n| decode on the device (inputs resident) | GB moved | GB/s | ÷ copy bandwidth |")
    print("|---|---|---|---|")
    for label, path in deltas.items():
        speed, moved = decode_throughput(base, path, args.repeats)
        print(f"| {label} | {moved / 1e9:.2f} | {speed:.1f} | {speed / peak:.0%} (goal 50 %) |")

    print("\n| forward | tokens/s 8 x 1 | ÷ materialised | tokens/s 8 x 128 | ÷ materialised |")
    print("|---|---|---|---|---|")
    reference_row = None
    for label, step, batch in on_the_fly(base, deltas, args.repeats):
        if label.endswith(": materialised"):
            reference_row, ratio = (step, batch), ("—", "—")
        else:
            ratio = (f"{step / reference_row[0]:.2f}", f"{batch / reference_row[1]:.2f}")
        print(f"| {label} | {step:.0f} | {ratio[0]} | {batch:.0f} | {ratio[1]} |")
    print(f"\nTotal {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
