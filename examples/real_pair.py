"""`publish_and_load.py --base B --finetune F`: a real pair, every method, measured side by side.

For each method: compress (with `SAMPLE_TEXTS` as calibration texts, so the compressor measures
the fidelity figure itself: ``stats.output_kl`` for a language model, ``stats.output_cosine`` for
an embedding model), load the delta as its users would (``DeltaModel.from_pretrained``, or
``load_sentence_transformer`` for a sentence-transformers model) and time it against loading the
fine-tune itself in the same run, and show a sample from both. Ends with a size-vs-fidelity plot.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

PAIR_METHODS = [
    ("dense (lossless)", "dense", {}),
    ("sign, row scales", "sign", {"scale": "row"}),
    ("DAREx-q p=0.9", "darex", {"p": 0.9, "q": "auto"}),
    ("DARE p=0.9", "dare", {"p": 0.9}),
    ("low rank r=16", "lowrank", {"rank": 16}),
    ("low rank r=64", "lowrank", {"rank": 64}),
]
"""(label, method, parameters) compressed for a real pair; vectors stay dense (``--rule``-style rules)."""

RULES = [("*norm*", "dense"), ("*LayerNorm*", "dense"), ("*bias", "dense")]

SAMPLE_TEXTS = [
    "A delta is what fine-tuning added to the base model.",
    "The weather today is sunny with a light breeze from the west.",
    "How do I reset my password if I no longer have access to my email?",
    "Python's json module encodes and decodes JSON documents.",
    "The committee approved the budget after a long debate.",
    "Photosynthesis converts light energy into chemical energy in plants.",
]
"""Calibration texts (and the sample inputs): short, varied, in English."""

PROMPT = "The most important thing to know about fine-tuning is"
QUERY, DOCUMENTS = "How do plants make energy?", SAMPLE_TEXTS[3:]


def run_pair(base: str, finetune: str, work: Path) -> None:
    import delta_format
    from delta_format.io.resolve import resolve_repo

    ft_dir, _ = resolve_repo(finetune, whole_repo=True, what="fine-tune")
    embedding = (ft_dir / "modules.json").is_file()
    reference, load_ft = _load_finetune(ft_dir, embedding)
    weights = _weight_count(ft_dir)
    print(
        f"fine-tune: {finetune} ({weights / 1e6:.1f} M weights), base: {base}, "
        f"{'sentence-transformers' if embedding else 'transformers'} model; loaded in {load_ft:.2f} s"
    )
    print(f"fine-tune sample: {_sample(reference, embedding, ft_dir)}\n")
    rows = []
    for label, method, params in PAIR_METHODS:
        start = time.perf_counter()
        delta = delta_format.compress(
            base,
            finetune,
            work / f"delta-{method}-{len(rows)}",
            method=method,
            rules=RULES,
            calibration_texts=SAMPLE_TEXTS,
            overwrite=True,
            progress=False,
            **params,
        )
        compress_s = time.perf_counter() - start
        model, load_s = _load_delta(delta.directory, embedding)
        stats = delta.manifest.stats
        fidelity = stats["output_cosine"] if embedding else stats["output_kl"]
        rows.append((label, stats["stored_bytes"], 8 * stats["stored_bytes"] / weights, fidelity, load_s, compress_s))
        print(f"{label}: {_sample(model, embedding, delta.directory)}")
        del model
    unit = "embedding cosine" if embedding else "KL nats/token"
    print(f"\n| method | size | bits/weight | {unit} | load s (fine-tune {load_ft:.2f}) | compress s |")
    print("|---|---|---|---|---|---|")
    for label, size, bits, fidelity, load_s, compress_s in rows:
        print(f"| {label} | {size / 1e6:.2f} MB | {bits:.3f} | {fidelity:.5g} | {load_s:.2f} | {compress_s:.1f} |")
    _plot(rows, unit, work / "size_vs_fidelity.png", embedding)


def _weight_count(directory: Path) -> int:
    from delta_format.io.checkpoint import Checkpoint

    checkpoint = Checkpoint(directory)
    return sum(math.prod(checkpoint.shape_dtype(name)[0]) for name in checkpoint)


def _load_finetune(directory: Path, embedding: bool):
    """The fine-tune as its users load it, timed without the library's import (paid once)."""
    if embedding:
        from sentence_transformers import SentenceTransformer

        start = time.perf_counter()
        model = SentenceTransformer(str(directory), device="cpu")
    else:
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(directory)
    return model, time.perf_counter() - start


def _load_delta(directory: Path, embedding: bool):
    if embedding:
        from delta_format.integrations.sentence_transformers import load_sentence_transformer

        start = time.perf_counter()
        model = load_sentence_transformer(directory, device="cpu")
    else:
        from delta_format import DeltaModel

        start = time.perf_counter()
        model = DeltaModel.from_pretrained(directory)
    return model, time.perf_counter() - start


def _sample(model, embedding: bool, tokenizer_dir: Path) -> str:
    """A greedy continuation of `PROMPT`, or the similarities of `QUERY` to `DOCUMENTS`."""
    import torch

    if embedding:
        scores = model.similarity(model.encode([QUERY]), model.encode(DOCUMENTS))[0]
        return json.dumps([round(float(s), 3) for s in scores])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    return json.dumps(tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True))


def _plot(rows, unit: str, path: Path, embedding: bool) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install 'delta-format[bench]')")
        return
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, _, bits, fidelity, *_ in rows:
        axes.scatter(bits, 1 - fidelity if embedding else fidelity)
        axes.annotate(label, (bits, 1 - fidelity if embedding else fidelity), fontsize=8)
    axes.set_xscale("log")
    axes.set_yscale("symlog", linthresh=1e-6)
    axes.set_ylim(bottom=0)  # a lossless delta sits at 0
    axes.set_xlabel("bits per weight")
    axes.set_ylabel(f"1 - {unit}" if embedding else unit)
    axes.set_title("size vs fidelity to the fine-tune (lower is better)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"\nplot: {path}")
