"""Load time and peak memory: DeltaModel.from_pretrained vs transformers loading the full fine-tune.

Every figure is a ratio against a baseline measured in the same run, on the same machine, in
fresh subprocesses (warm page cache: each variant is loaded once before timing). Each child first
imports what a load needs (torch, transformers' model code, accelerate, delta_format), then
starts the clock and the memory baseline, so neither counts import costs (the same for all):

* ``load+fwd``: from_pretrained plus one forward pass of 8 tokens. transformers 5 memory-maps
  safetensors and pages weights in lazily, so its load alone does almost nothing; the first
  forward pass is the honest comparison point;
* ``resident floor``: transformers' load followed by a copy of every weight into process memory:
  the cost of first-touching the model's bytes, the floor of any loader whose result is computed;
* delta loads: ``first load`` with the materialised cache off (``cache_materialized=False``), and
  the same with the native loops turned off (``DELTA_FORMAT_NATIVE=0``: torch ops, the same bits),
  ``first load, filling the cache`` (an empty cache each run: the weights are computed straight
  into the new entry's file) and ``repeat load`` (a cache hit: the entry is mapped, nothing computed);
* ``peak anon``: the child's peak anonymous resident memory (``RssAnon`` sampled every 2 ms) above
  its level after imports, over the final model's bytes; ``peak RSS`` also counts pages of mapped
  files (page cache: a cache entry's weights, transformers' mapped checkpoint).

Then the levers of a first load, each measured alone in this process (see ``levers``).

Run:  python benchmarks/load_time.py [--scale 0.5B 220M] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

VARIANTS = {
    "sign (row)": ("sign", {"scale": "row"}),
    "dare p=0.9": ("dare", {"p": 0.9}),
    "bits=1": (None, {"bits": 1.0}),  # what the allocator picks: low rank + quantised DARE codes
}


FIRST_LOAD_TARGETS = {"sign": 1.15, "dare": 1.3}
"""First load ÷ resident floor that issue 18 sets, by method."""


def child(kind: str, path: str) -> None:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the clock)
    from accelerate.utils import set_module_tensor_to_device  # noqa: F401
    from transformers import AutoModelForCausalLM

    import delta_format.loaders.delta_model  # noqa: F401
    from benchmarks.memory import PeakAnonSampler, status_kib
    from delta_format import DeltaModel

    rss0 = status_kib("VmRSS") * 1024
    with PeakAnonSampler() as memory:
        start = time.perf_counter()
        if kind == "delta":
            model = DeltaModel.from_pretrained(path, dtype=torch.bfloat16)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
            if kind == "hf-resident":  # weights copied out of the mapped file into process memory
                with torch.no_grad():
                    for param in model.parameters():
                        param.data = param.data.clone()
        loaded = time.perf_counter()
        with torch.no_grad():
            model(input_ids=torch.arange(8).unsqueeze(0))
        forward = time.perf_counter()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak, anon = status_kib("VmHWM") * 1024 - rss0, memory.peak - memory.baseline
    print(
        json.dumps({"load": loaded - start, "fwd": forward - start, "peak": peak, "anon": anon, "bytes": model_bytes})
    )


def run_child(kind: str, path: Path, cache: str, native: bool = True) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DELTA_FORMAT_MATERIALIZED_CACHE": cache}
    env["DELTA_FORMAT_NATIVE"] = "1" if native else "0"
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(path)], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(kind: str, path: Path, repeats: int, cache: str = "0", native: bool = True) -> list[dict]:
    """``repeats`` runs after one unmeasured warm-up; ``cache``: ``"0"`` (off), ``"fresh"`` (a new
    empty cache for each run) or a directory; ``native``: False turns the native loops off."""
    runs = []
    for i in range(repeats + 1):
        with tempfile.TemporaryDirectory(dir=HERE / "work") as empty:
            result = run_child(kind, path, empty if cache == "fresh" else cache, native)
        if i:
            runs.append(result)
    return runs


def scale_section(scale: str, repeats: int) -> None:
    from benchmarks.levers import lever_section
    from benchmarks.synthetic import build_pair, cached_delta, machine
    from delta_format.core import native

    root = HERE / "work" / f"llama-{scale}"
    base, ft = build_pair(root, scale)
    deltas = {}
    for label, (method, params) in VARIANTS.items():
        deltas[label] = cached_delta(base, ft, root / f"delta-{method or 'bits'}", method, **params)

    rows = [("transformers, full fine-tune", measure("hf", ft, repeats))]
    rows.append(("transformers, copied into RAM (resident floor)", measure("hf-resident", ft, repeats)))
    for label, path in deltas.items():
        rows.append((f"{label}: first load", measure("delta", path, repeats)))
        if native.available():  # the lever alone: the same load with torch ops instead of the native loops
            rows.append(
                (
                    f"{label}: first load, torch ops (DELTA_FORMAT_NATIVE=0)",
                    measure("delta", path, repeats, native=False),
                )
            )
        rows.append((f"{label}: first load, filling the cache", measure("delta", path, repeats, "fresh")))
        with tempfile.TemporaryDirectory(dir=HERE / "work") as cache:
            run_child("delta", path, cache)  # fills the entry
            rows.append((f"{label}: repeat load (cache hit)", measure("delta", path, repeats, cache)))

    ref, floor = (min(r["fwd"] for r in runs) for _, runs in rows[:2])
    model_bytes = rows[0][1][0]["bytes"]
    print(f"# Load time and memory ({scale}: {model_bytes / 1e9:.2f} GB in bf16; {machine()})\n")
    print(f"Command: `python benchmarks/load_time.py --scale {scale} --repeats {repeats}`\n")
    print(
        "| variant | load+fwd s (min / median) | ÷ transformers | ÷ resident floor | peak anon ÷ model | peak RSS ÷ model |"
    )
    print("|---|---|---|---|---|---|")
    best = {}
    for label, runs in rows:
        fwd = [r["fwd"] for r in runs]
        anon, peak = max(r["anon"] for r in runs) / model_bytes, max(r["peak"] for r in runs) / model_bytes
        best[label] = (min(fwd), anon)
        print(
            f"| {label} | {min(fwd):.2f} / {statistics.median(fwd):.2f} | {min(fwd) / ref:.2f}x "
            f"| {min(fwd) / floor:.2f}x | {anon:.2f} | {peak:.2f} |"
        )
    print()
    for label in VARIANTS:
        first, anon = best[f"{label}: first load"]
        target = FIRST_LOAD_TARGETS.get(VARIANTS[label][0])  # issue 18's, for sign and DARE
        verdict = f"target {target}x: {'met' if first / floor <= target else 'missed'}" if target else "no target"
        hit = best[f"{label}: repeat load (cache hit)"][0]
        print(
            f"- {label}: first load {first / floor:.2f}x the resident floor ({verdict}), "
            f"{first / ref:.2f}x transformers; repeat load "
            f"{hit / ref:.2f}x transformers (target 1.05x: {'met' if hit / ref <= 1.05 else 'missed'}); peak "
            f"anonymous memory of a first load {anon:.2f}x the model (target 1.15x: {'met' if anon <= 1.15 else 'missed'})."
        )
    print()
    lever_section(base, deltas, model_bytes, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", nargs="+", default=["0.5B", "220M"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"))
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    (HERE / "work").mkdir(exist_ok=True)
    for scale in args.scale:
        scale_section(scale, args.repeats)


if __name__ == "__main__":
    main()
