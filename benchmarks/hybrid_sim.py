"""Issue 15's hybrids and ImPart, simulated on a real pair (plain PyTorch edits of the weights, not
the product's files): every linear matrix edited the same way, the tied embedding one way per row,
1-D tensors exact; bits count values, 16-bit group scales and factors. Figure: the pair's
(`benchmarks.fidelity_budget`): on SmolLM2-135M the share of the fine-tune's held-out perplexity
gain kept, on MiniLM the cosine of sentence embeddings to the fine-tune's.

Run:  python benchmarks/hybrid_sim.py --cache CACHE [--pair smollm|minilm] [--rows linear|embedding]
      [--only WORDS]
(CACHE as for fidelity_budget.py: the pair in CACHE/<pair>, built there if missing; ~17 s a row.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fidelity_budget import load_state, minilm, smollm  # noqa: E402
from delta_format.core.quant import dequantize, quantize  # noqa: E402

GROUP = 64


def quantised(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    codes, scales = quantize(x.reshape(1, -1) if x.dim() == 1 else x, bits, GROUP)
    return dequantize(codes, scales, bits, GROUP).reshape(x.shape), x.numel() * bits + 16 * scales.numel()


def dare(d: torch.Tensor, p: float, bits: int, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    keep = torch.rand(d.shape, generator=gen) >= p
    values, cost = quantised(d[keep], bits)
    out = torch.zeros_like(d)
    out[keep] = values / (1 - p)
    return out, cost


def lowrank(d: torch.Tensor, rank: int, bits: int) -> tuple[torch.Tensor, float]:
    torch.manual_seed(0)
    u, s, v = torch.svd_lowrank(d, q=min(rank + 16, *d.shape), niter=4)
    a, ca = quantised((u[:, :rank] * s[:rank]).T.contiguous(), bits)
    b, cb = quantised(v[:, :rank].T.contiguous(), bits)
    return a.T @ b, ca + cb


def impart(d: torch.Tensor, bpw: float, q_min: float, bits: int, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """ImPart (ACL 2025): the SVD's vector pairs sparsified, each element of ``u_k`` and ``v_k`` kept
    with probability ``q_k`` proportional to ``σ_k`` (at most 1), rescaled by ``1/q_k`` (unbiased), the
    kept values quantised; as many vectors as keep ``q_k >= q_min`` within ``bpw`` bits per weight.
    Its noise is ``σ_k² (1/q_k² - 1)`` per vector (truncating costs ``σ_k²``): dominated by truncation
    unless noise is cheap, as in a causal LM's small delta."""
    rows, cols = d.shape
    u, s, vh = (t.float() for t in torch.linalg.svd(d.double(), full_matrices=False))
    if float(s[0]) == 0:  # an unchanged matrix (MiniLM's unused pooler)
        return torch.zeros_like(d), 0.0
    budget = bpw * d.numel() / (bits + 16 / GROUP) / (rows + cols)  # Σ q_k

    def shares(count: int) -> torch.Tensor:
        weight = s.clone()
        weight[count:] = 0
        scale = budget / float(weight.sum())
        for _ in range(60):  # q = min(1, c·σ) with Σ q = budget
            q = (scale * weight).clamp(max=1.0)
            short, free = budget - float(q.sum()), float((scale * weight)[q < 1].sum())
            if short < 1e-6 or free == 0:
                break
            scale *= 1 + short / free
        return q

    first = max(1, int(budget))
    q = shares(first)
    for count in range(first + 1, s.numel() + 1):
        wider = shares(count)
        if float(wider[:count].min()) < q_min:
            break
        q = wider
    out, cost = torch.zeros_like(d), 0.0
    for k in torch.nonzero(q > 0).flatten().tolist():
        share = float(q[k])
        parts = []
        for vector in (u[:, k] * s[k], vh[k]):
            keep = torch.rand(vector.numel(), generator=gen) < share
            values, more = quantised(vector[keep], bits)
            full = torch.zeros_like(vector)
            full[keep] = values / share
            parts.append(full)
            cost += more
        out += torch.outer(*parts)
    return out, cost


def sign_row(d: torch.Tensor) -> tuple[torch.Tensor, float]:
    s = d.abs().mean(1, keepdim=True)
    return torch.where(d >= 0, s, -s), d.numel() + 16 * d.shape[0]


def outliers(d: torch.Tensor, fraction: float) -> tuple[torch.Tensor, float]:
    k = max(1, int(fraction * d.numel()))
    index = d.abs().reshape(-1).topk(k).indices
    out = torch.zeros(d.numel())
    out[index] = d.reshape(-1)[index].bfloat16().float()
    return out.view(d.shape), k * 32  # bf16 value + a 16-bit gap


def edit(d: torch.Tensor, recipe: tuple, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    kind, *args = recipe
    if kind == "dare":
        return dare(d, *args, gen)
    if kind == "lr":
        return lowrank(d, *args)
    if kind == "sign":
        return sign_row(d)
    if kind == "impart":
        return impart(d, *args, gen)
    first, second = {
        "lr+dare": (lambda: lowrank(d, args[0], args[1]), lambda r: dare(r, args[2], args[3], gen)),
        "sign+lr": (lambda: sign_row(d), lambda r: lowrank(r, args[0], args[1])),
        "out+lr": (lambda: outliers(d, args[0]), lambda r: lowrank(r, args[1], args[2])),
        "out+dare": (lambda: outliers(d, args[0]), lambda r: dare(r, args[1], args[2], gen)),
    }[kind]
    part, cost = first()
    rest, more = second(d - part)
    return part + rest, cost + more


LINEAR = {  # every linear matrix; the embedding exact and not counted
    "DARE p=0.99, 4-bit values": ("dare", 0.99, 4),
    "DARE p=0.98, 4-bit values": ("dare", 0.98, 4),
    "DARE p=0.95, 4-bit values": ("dare", 0.95, 4),
    "DARE p=0.9, 4-bit values": ("dare", 0.9, 4),
    "low rank r=8, 4-bit": ("lr", 8, 4),
    "low rank r=16, 4-bit": ("lr", 16, 4),
    "low rank r=32, 4-bit": ("lr", 32, 4),
    "top 4 (4-bit) + DARE p=0.98 (4-bit)": ("lr+dare", 4, 4, 0.98, 4),
    "top 8 (4-bit) + DARE p=0.99 (4-bit)": ("lr+dare", 8, 4, 0.99, 4),
    "top 8 (4-bit) + DARE p=0.98 (4-bit)": ("lr+dare", 8, 4, 0.98, 4),
    "top 16 (4-bit) + DARE p=0.98 (4-bit)": ("lr+dare", 16, 4, 0.98, 4),
    "top 8 (4-bit) + DARE p=0.95 (4-bit)": ("lr+dare", 8, 4, 0.95, 4),
    "top 16 (4-bit) + DARE p=0.95 (4-bit)": ("lr+dare", 16, 4, 0.95, 4),
    "sign per row": ("sign",),
    "sign per row + low rank r=16 of the rest (4-bit)": ("sign+lr", 16, 4),
    "sign per row + low rank r=32 of the rest (4-bit)": ("sign+lr", 32, 4),
    "1 % largest (bf16) + low rank r=32 of the rest (4-bit)": ("out+lr", 0.01, 32, 4),
    "1 % largest (bf16) + DARE p=0.95 of the rest (4-bit)": ("out+dare", 0.01, 0.95, 4),
    **{f"ImPart ~0.14 bpw, q >= {q:g} (4-bit)": ("impart", 0.14, q, 4) for q in (0.02, 0.05, 0.1, 0.2, 0.3, 0.6)},
    "ImPart ~0.3 bpw, q >= 0.1 (4-bit)": ("impart", 0.3, 0.1, 4),
}
EMBEDDING = {  # the tied embedding; linear matrices as "top 4 (4-bit) + DARE p=0.98 (4-bit)"
    "dropped": None,
    "DARE p=0.99, 8-bit values": ("dare", 0.99, 8),
    "DARE p=0.98, 4-bit values": ("dare", 0.98, 4),
    "DARE p=0.95, 4-bit values": ("dare", 0.95, 4),
    "DARE p=0.9, 4-bit values": ("dare", 0.9, 4),
    "low rank r=16, 4-bit": ("lr", 16, 4),
    "top 16 (4-bit) + DARE p=0.98 (4-bit)": ("lr+dare", 16, 4, 0.98, 4),
    "exact": "exact",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--pair", choices=("smollm", "minilm"), default="smollm")
    parser.add_argument("--rows", choices=("linear", "embedding"), default="linear")
    parser.add_argument("--only", nargs="*", help="rows whose label contains one of these words")
    args = parser.parse_args()
    pair = (smollm if args.pair == "smollm" else minilm)(args.cache)
    base = {k: v.float() for k, v in load_state(pair.base).items()}
    ft = {k: v.float() for k, v in load_state(pair.ft).items()}
    metric = pair.metric
    rows = LINEAR if args.rows == "linear" else EMBEDDING
    title = "linear matrices (embedding exact, not counted)" if args.rows == "linear" else "the tied embedding"
    print(f"| {title} | bits / weight | {pair.figure} |\n|---|---|---|")
    for label, recipe in rows.items():
        if args.only and not any(word in label for word in args.only):
            continue
        gen = torch.Generator().manual_seed(0)
        state, bits, numel = {}, 0.0, 0
        for name, b in base.items():
            d = ft[name] - b
            is_embedding = "embed" in name
            if d.dim() == 1:
                state[name], bits, numel = ft[name], bits + 16 * d.numel(), numel + d.numel()
                continue
            if args.rows == "linear" and is_embedding:
                state[name] = ft[name]  # exact and not counted: these rows compare the linear matrices
                continue
            if args.rows == "linear":
                choice = recipe
            else:
                choice = recipe if is_embedding else LINEAR["top 4 (4-bit) + DARE p=0.98 (4-bit)"]
            numel += d.numel()
            if choice is None:
                state[name] = b
            elif choice == "exact":
                state[name], bits = ft[name], bits + 16 * d.numel()
            else:
                edited, cost = edit(d, choice, gen)
                state[name], bits = b + edited, bits + cost
        print(f"| {label} | {bits / numel:.4f} | {metric(state):.4f} |", flush=True)


if __name__ == "__main__":
    main()
