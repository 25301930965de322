"""A fine-tune with added tokens at a bit budget (SPEC 1.5, §9.2): size and fidelity.

Takes the SmolLM2-135M pair of `benchmarks/fidelity_budget.py` (built there when absent), adds
``--added`` tokens to the fine-tune (its tied embedding grown, the new rows the table's mean plus
half its per-column spread, seeded: what a trained new token looks like to the model), and writes a
``bits=`` delta of it against the unchanged base at each budget. Reports bits per weight (8 x the
delta's safetensors bytes / the fine-tune's parameters) and the share of the fine-tune's
held-out perplexity gain kept, both models scoring over their own vocabulary:
``(ppl_base - ppl) / (ppl_base - ppl_ft)``. Stored whole, the grown table alone would cost
16 x its elements / the parameters bits per weight (printed as ``replace would add``).

    python benchmarks/added_tokens.py [--added 16] [--bits 1 0.2] [--cache DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import delta_format  # noqa: E402
from benchmarks import smollm_pair  # noqa: E402
from benchmarks.synthetic import machine  # noqa: E402

HERE = Path(__file__).resolve().parent


def grown_finetune(pair: Path, out: Path, added: int) -> Path:
    """The pair's fine-tune with ``added`` new tokens, saved (with its tokenizer) in ``out``."""
    from transformers import AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    ft = AutoModelForCausalLM.from_pretrained(pair / "ft")
    vocab = ft.config.vocab_size
    ft.resize_token_embeddings(vocab + added, mean_resizing=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        table = ft.get_input_embeddings().weight
        old = table[:vocab].float()
        new = old.mean(0) + 0.5 * old.std(0) * torch.randn(added, table.shape[1], generator=g)
        table[vocab:] = new.to(table.dtype)
    ft.save_pretrained(out)
    smollm_pair.tokenizer(pair / "ft").save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--added", type=int, default=16)
    parser.add_argument("--bits", type=float, nargs="+", default=[1.0, 0.2])
    parser.add_argument("--cache", type=Path, default=HERE / "work" / "fidelity_budget")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    pair = args.cache / "smollm"
    if not (pair / "ft" / "config.json").exists():
        smollm_pair.build(pair)
    ft_dir = grown_finetune(pair, args.cache / f"smollm-added-{args.added}", args.added)
    tok, texts = smollm_pair.tokenizer(pair / "ft"), smollm_pair.eval_texts()

    def ppl(model) -> float:
        return smollm_pair.perplexity(model.float().eval(), tok, texts)

    ppl_base = ppl(AutoModelForCausalLM.from_pretrained(pair / "base"))
    ft = AutoModelForCausalLM.from_pretrained(ft_dir)
    ppl_ft, params = ppl(ft), sum(p.numel() for p in ft.parameters())
    table = ft.get_input_embeddings().weight.numel()
    del ft
    print(machine())
    print(f"{args.added} added tokens: ppl base {ppl_base:.3f}, fine-tune {ppl_ft:.3f}, {params} parameters")
    print(f"replace would add {16 * table / params:.2f} bits per weight (the {table}-element table stored whole)")
    for bits in args.bits:
        out = args.cache / f"smollm-added-{args.added}-delta-{bits}"
        started = time.perf_counter()
        delta = delta_format.compress(pair / "base", ft_dir, out, bits=bits, overwrite=True, progress=False)
        seconds = time.perf_counter() - started
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        grown = {n: e.encoding.label() for n, e in delta.manifest.tensors.items() if e.base_rows is not None}
        kept = (ppl_base - ppl(delta_format.DeltaModel.from_pretrained(out))) / (ppl_base - ppl_ft)
        print(f"bits={bits}: {8 * size / params:.4f} bits per weight, gain kept {kept:.4f} ({seconds:.0f} s); {grown}")


if __name__ == "__main__":
    main()
