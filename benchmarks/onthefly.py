"""On-the-fly serving: forward throughput and memory of fine-tunes kept encoded on one shared base
(`delta_format.attach_deltas`) against the same fine-tunes materialised
(`DeltaModel.from_pretrained`), measured in one run.

Throughput: tokens/s of one forward over a batch (default 8 x 128 tokens, where sign deltas are
merged into each weight per call) and over 8 x 1 tokens (a decoding step's shape, where without the
merged-weight cache sign deltas are multiplied separately), bf16, best of ``--repeats`` rounds in
which every variant of a delta (materialised, on the fly under each cache budget) runs once, so
that other load on the machine falls on all alike; the base alone is timed in the first delta's
rounds (÷ that delta's materialised model). Agreement: the share of the merged weights that differ
from the materialised fine-tune's (bf16 rounds the delta's scale or values before the add; float32
merges are bit-identical, tests/test_onthefly.py).
Merged-weight cache: while one adapter is active its merged weights are kept up to a budget;
each delta is timed under every budget of ``--merged-cache`` (fractions of the model's bytes; by
default the library's default and 0, the cache off: every call decodes again).
Memory: bytes of tensors held by the base plus N attached fine-tunes (``--copies`` of each delta)
plus the merged-weight cache at its fullest under each budget, against N materialised copies
(counted exactly), and the anonymous RSS that attaching them grew by
(measured; resident-set totals say little here, since transformers maps the base checkpoint and the
reader maps the delta files, so their pages count only once touched).

Run:  python benchmarks/onthefly.py [--scale 160M] [--batch 8] [--seq 128] [--repeats 3] [--copies 2]
                                    [--merged-cache FRACTION [FRACTION ...]]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DELTAS = {"sign": ("sign", {"scale": "row"}), "dare": ("dare", {"p": 0.9})}
"""label -> (method, parameters): the deltas benchmarks/swap.py makes, reused when present."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="160M")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--copies", type=int, default=2, help="copies of each delta attached at once (as distinct fine-tunes)"
    )
    parser.add_argument(
        "--merged-cache",
        type=float,
        nargs="+",
        default=None,
        help="merged-weight cache budgets, fractions of the model's bytes (default: the library's, and 0)",
    )
    parser.add_argument("--work", type=Path, default=HERE / "work")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.memory import status_kib
    from benchmarks.swap import timed
    from benchmarks.synthetic import build_pair, cached_delta, machine
    from delta_format import DeltaModel, attach_deltas, set_active_delta

    root = args.work / f"llama-{args.scale}"
    base_dir, ft_dir = build_pair(root, args.scale)
    paths = {}
    for label, (method, params) in DELTAS.items():
        paths[label] = cached_delta(base_dir, ft_dir, root / f"delta-{method}", method, **params)

    vocab = 32000 if args.scale != "tiny" else 8000
    shapes = {"batch": (args.batch, args.seq), "step": (args.batch, 1)}
    inputs = {k: torch.arange(b * s).remainder(vocab).view(b, s) for k, (b, s) in shapes.items()}

    def forward(model, ids):
        with torch.no_grad():
            return model(input_ids=ids).logits

    def interleaved(variants: dict) -> dict:
        """``{name: {shape: tokens/s}}`` for ``{name: (model, setup)}``, timed round by round
        (each round runs every variant once, after its ``setup`` and a warm-up call; a decoding
        step is the best of 5 calls), so that load from other work on the machine falls on every
        variant alike; the best of ``--repeats`` rounds."""
        best = {name: dict.fromkeys(inputs, float("inf")) for name in variants}
        for _ in range(args.repeats):
            for name, (model, setup) in variants.items():
                setup()
                for key, ids in inputs.items():
                    forward(model, ids)
                    calls = 5 if key == "step" else 1
                    best[name][key] = min(best[name][key], timed(lambda: forward(model, ids), calls)[0])
        return {name: {k: inputs[k].numel() / t for k, t in times.items()} for name, times in best.items()}

    def merged_weights_off(model, materialised) -> tuple[float, int]:
        """Fraction of the edited matrices' weights, merged for a call, that differ from the
        materialised fine-tune's (bf16 rounds the delta once more), and the largest difference
        in units in the last place of the larger of the base and fine-tuned weight (where the two
        nearly cancel, the result's own ulp is far finer than either rounding)."""
        state, off, total, ulps = materialised.state_dict(), 0, 0, 0
        with torch.no_grad():
            for path, module in model.named_modules():
                factor = getattr(module, "factors", {}).get(registry.active)
                if factor is not None and isinstance(module, torch.nn.Linear):
                    merged, want = factor.merged(module.weight), state[f"{path}.weight"]
                    off += int((merged != want).sum())
                    total += module.weight.numel()
                    larger = torch.maximum(want.float().abs(), module.weight.float().abs())
                    ulp = torch.pow(2.0, torch.frexp(larger).exponent - 8)  # bf16 spacing (8 significant bits)
                    ulps = max(ulps, float(((merged.float() - want.float()).abs() / ulp).max()))
        return off / total, ulps

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim  # return freed heap, so RSS counts what is held
    trim(0)
    anon = status_kib("RssAnon")
    names = {f"{label}-{i}": path for i in range(args.copies) for label, path in paths.items()}
    count = len(names)
    registry = attach_deltas(base, names)
    fractions = args.merged_cache or [registry.merged_weights.budget / model_bytes, 0.0]
    budgets = {f: int(f * model_bytes) for f in fractions}
    trim(0)
    attached_anon = (status_kib("RssAnon") - anon) * 1024

    rows, cached = [], dict.fromkeys(budgets, 0)
    for label, path in paths.items():
        materialised = DeltaModel.from_pretrained(path, dtype=torch.bfloat16)
        set_active_delta(base, f"{label}-0")
        off, ulps = merged_weights_off(base, materialised)

        def on_the_fly(budget, name=f"{label}-0"):
            def setup():
                set_active_delta(base, name)
                registry.merged_weights.resize(budget)  # emptied: the warm-up call fills it

            return base, setup

        variants = {"materialised": (materialised, lambda: None)}
        if not rows:
            variants["base"] = (base, lambda: set_active_delta(base, None))
        variants.update({fraction: on_the_fly(budget) for fraction, budget in budgets.items()})
        speeds = interleaved(variants)
        for fraction in budgets:  # the cache after a step, one variant at a time
            variants[fraction][1]()
            forward(base, inputs["step"])
            cached[fraction] = max(cached[fraction], registry.merged_weights.nbytes)
        del materialised, variants
        mat = speeds["materialised"]
        if "base" in speeds:
            rows.append(("base alone (no delta active)", speeds["base"], mat, "—"))
        rows.append((f"{label}: materialised", mat, None, "—"))
        for fraction in budgets:
            gap = f"{off:.3%}, at most {ulps:.0f} ulp"
            rows.append((f"{label}: on the fly, merged cache {fraction:.2f} of the model", speeds[fraction], mat, gap))
    set_active_delta(base, None)

    b, s = shapes["batch"]
    print(
        f"# On-the-fly deltas vs materialised fine-tunes (Llama {args.scale}, bf16; {machine()}, "
        f"{torch.get_num_threads()} threads)\n"
    )
    print(
        f"Command: `python benchmarks/onthefly.py --scale {args.scale} --batch {args.batch} --seq {args.seq} "
        f"--repeats {args.repeats} --copies {args.copies}"
        + ("" if args.merged_cache is None else f" --merged-cache {' '.join(map(str, args.merged_cache))}")
        + "`\n"
    )
    print(
        f"| model | tokens/s, {b} x {s} | ÷ materialised | tokens/s, {b} x 1 | ÷ materialised | "
        f"merged weights ≠ materialised |"
    )
    print("|---|---|---|---|---|---|")
    for label, speed, ref, gap in rows:
        ratio = {k: f"{speed[k] / ref[k]:.2f}" if ref else "—" for k in speed}
        print(f"| {label} | {speed['batch']:.0f} | {ratio['batch']} | {speed['step']:.0f} | {ratio['step']} | {gap} |")

    held = {n: a.nbytes for n, a in registry.adapters.items()}
    on_the_fly = model_bytes + sum(held.values())
    copies = count * model_bytes
    per_label = {label: held[f"{label}-0"] for label in DELTAS}
    print(f"\n| memory, {count} fine-tunes ({', '.join(names)}) | bytes | ÷ {count} materialised copies |")
    print("|---|---|---|")
    print(f"| {count} materialised copies ({count} x {model_bytes / 1e6:.0f} MB) | {copies / 1e6:.0f} MB | 1.00 |")
    print(f"| base + {count} on the fly (counted tensors) | {on_the_fly / 1e6:.0f} MB | {on_the_fly / copies:.3f} |")
    for fraction, budget in budgets.items():
        total = on_the_fly + cached[fraction]
        print(
            f"| base + {count} on the fly + merged-weight cache {fraction:.2f} of the model (budget "
            f"{budget / 1e6:.0f} MB, held at most {cached[fraction] / 1e6:.0f} MB) | {total / 1e6:.0f} MB "
            f"| {total / copies:.3f} |"
        )
    print(
        f"| of which per adapter: {', '.join(f'{k} {v / 1e6:.1f} MB ({v / model_bytes:.3f} of the model)' for k, v in per_label.items())} | | |"
    )
    print(
        f"| anonymous RSS grown by attaching the {count} (measured: decoded positions and values; sign bits "
        f"stay memory-mapped from the delta files) | {attached_anon / 1e6:.0f} MB | |"
    )


if __name__ == "__main__":
    main()
