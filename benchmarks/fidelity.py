"""Fidelity of delta edits on a really-trained tiny character-level Llama.

Base trained on stdlib docstrings (corpus A), fine-tuned on Zen of Python + json/argparse docs
(corpus B); every edit method is compressed with ``delta_format.compress`` and loaded back with
``DeltaModel.from_pretrained``; we measure size, weight error, logit MSE / KL vs the fine-tune
and perplexity on held-out A and B. Also the DARE vs DAREx-q curve over p.

    python benchmarks/fidelity.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import inspect
import io
import math
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import delta_format  # noqa: E402
from benchmarks.synthetic import machine  # noqa: E402
from delta_format import DeltaModel  # noqa: E402

SEQ = 128


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    chars = sorted(set(string.printable))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def docs(names):
    out = []
    for n in names:
        mod = importlib.import_module(n)
        for obj in [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]:
            d = inspect.getdoc(obj)
            if d and (obj is mod or getattr(obj, "__module__", None) == n):
                out.append(d)
    return "\n\n".join(out)


def corpora():
    a = docs(["collections", "itertools", "functools", "os.path", "textwrap", "string", "random", "heapq", "bisect"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        import this  # noqa: F401
    zen = "".join(this.d.get(c, c) for c in this.s)
    b = "\n\n".join([zen] * 3) + "\n\n" + docs(["json", "argparse"])
    return a, b


def split(ids):
    n = int(len(ids) * 0.9)
    return ids[:n], ids[n:]


def batches(ids, bs, gen):
    starts = torch.randint(0, len(ids) - SEQ - 1, (bs,), generator=gen)
    return torch.stack([ids[s : s + SEQ] for s in starts])


def train(model, ids, steps, lr, seed):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        x = batches(ids, 16, gen)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def eval_chunks(ids, limit):
    n = min((len(ids) - 1) // SEQ, limit)
    return torch.stack([ids[i * SEQ : (i + 1) * SEQ] for i in range(n)])


@torch.no_grad()
def ppl(model, chunks):
    return math.exp(model(input_ids=chunks, labels=chunks).loss.item())


@torch.no_grad()
def logits(model, chunks):
    return model(input_ids=chunks).logits.float()


def compare(ref_logits, lg):
    mse = (lg - ref_logits).pow(2).mean().item()
    lp, lq = ref_logits.log_softmax(-1), lg.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return mse, kl


@torch.no_grad()
def weight_error(model, base, ft):
    """||theta_loaded - theta_ft|| / ||theta_ft - theta_base|| over every parameter, as loaded
    (so a load-time alpha counts, unlike the stored delta's own error in the manifest)."""
    got, b, f = model.state_dict(), base.state_dict(), ft.state_dict()
    err = sum((got[k].double() - f[k].double()).pow(2).sum() for k in f)
    norm = sum((f[k].double() - b[k].double()).pow(2).sum() for k in f)
    return math.sqrt(err / norm)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    a, b = corpora()
    ida = torch.tensor(tok(a)["input_ids"])
    idb = torch.tensor(tok(b)["input_ids"])
    (a_tr, a_ho), (b_tr, b_ho) = split(ida), split(idb)
    hidden, layers = (64, 2) if args.quick else (128, 4)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(cfg)
    nparams = sum(p.numel() for p in base.parameters())
    base_steps, ft_steps = (120, 60) if args.quick else (400, 150)
    train(base, a_tr, base_steps, 3e-3, 1)
    ft = LlamaForCausalLM(cfg)
    ft.load_state_dict(base.state_dict())
    train(ft, b_tr, ft_steps, 1e-3, 2)
    lim = 8 if args.quick else 24
    ca, cb = eval_chunks(a_ho, lim), eval_chunks(b_ho, lim)
    ref = logits(ft, cb)
    b_text = tok.decode(b_tr.tolist())
    calib = [b_text[i * 512 : (i + 1) * 512] for i in range(8 if args.quick else 16)]

    work = Path(tempfile.mkdtemp(prefix="fidelity-"))
    base_dir, ft_dir = work / "base", work / "ft"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    ft.save_pretrained(ft_dir)
    tok.save_pretrained(ft_dir)

    def run(label, method, alpha=None, **params):
        out = work / f"d{len(rows)}"
        delta = delta_format.compress(
            base_dir, ft_dir, out, method=method, progress=False, calibration_texts=calib, tokenizer=tok, **params
        )
        st = delta.manifest.stats
        kw = {} if alpha is None else {"alpha": alpha}
        m = DeltaModel.from_pretrained(out, base_model=str(base_dir), **kw)
        m.eval()
        mse, kl = compare(ref, logits(m, cb))
        row = dict(
            label=label,
            ratio=st["stored_bytes"] / st["finetune_bytes"],
            rel=weight_error(m, base, ft),
            mse=mse,
            kl=kl,
            ppl_a=ppl(m, ca),
            ppl_b=ppl(m, cb),
        )
        rows.append(row)
        print(f"  {label}: {row}", file=sys.stderr, flush=True)
        return row

    rows: list[dict] = []
    pa_base, pb_base, pa_ft, pb_ft = ppl(base, ca), ppl(base, cb), ppl(ft, ca), ppl(ft, cb)
    bmse, bkl = compare(ref, logits(base, cb))
    ps = [0.5, 0.9, 0.95, 0.99]
    run("dense", "dense")
    for p in ps:
        run(f"dare p={p}", "dare", p=p)
    for p in ps:
        run(f"darex q=auto p={p}", "darex", p=p, q="auto")
    for p in [0.9] if args.quick else ps:
        run(f"darex q=output p={p}", "darex", p=p, q="output")
    run("magnitude p=0.9", "magnitude", p=0.9)
    run("sign per-tensor", "sign", scale="tensor")
    run("sign per-row", "sign", scale="row")
    run("sign per-row distilled", "sign", scale="row", distill_steps=20 if args.quick else 60)
    for r in (4, 16):
        run(f"lowrank rank={r}", "lowrank", rank=r)
    for al in (0.5, 1.5):
        run(f"dense EXPO alpha={al}", "dense", alpha=al)

    curve_p = [0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99]
    curve = {"dare": [], "darex": []}
    for p in curve_p:
        done = {r["label"]: r for r in rows}
        curve["dare"].append(done.get(f"dare p={p}") or run(f"curve dare p={p}", "dare", p=p))
        curve["darex"].append(done.get(f"darex q=auto p={p}") or run(f"curve darex p={p}", "darex", p=p, q="auto"))
    table_rows = [r for r in rows if not r["label"].startswith("curve")]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=80)
    for key, lab in (("dare", "DARE (1/(1-p))"), ("darex", "DAREx-q (auto)")):
        ax1.plot(curve_p, [r["ppl_b"] for r in curve[key]], "o-", label=lab)
        ax2.plot(curve_p, [r["mse"] for r in curve[key]], "o-", label=lab)
    ax1.axhline(pb_ft, ls="--", c="gray", label="fine-tune")
    ax1.axhline(pb_base, ls=":", c="k", label="base")
    ax1.set_xlabel("drop rate p")
    ax1.set_ylabel("perplexity, held-out B")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("drop rate p")
    ax2.set_ylabel("logit MSE vs fine-tune")
    ax2.set_yscale("log")
    ax2.axhline(bmse, ls=":", c="k", label="base")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(__file__).with_name("fidelity_dare_vs_darexq.png"))

    cmd = "python benchmarks/fidelity.py" + (" --quick" if args.quick else "")
    print(
        f"### Fidelity on a trained tiny Llama\n\n`{cmd}` — {machine()} — "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
    )
    print(
        f"Model: {nparams:,} params (hidden {hidden}, {layers} layers, char vocab {len(tok)}); base {base_steps} steps on "
        f"corpus A ({len(a_tr):,} train chars), fine-tune {ft_steps} steps on corpus B ({len(b_tr):,} train chars); "
        f"eval on {len(ca)}×{SEQ} held-out A and {len(cb)}×{SEQ} held-out B tokens.\n"
    )
    print("| method | stored/ft bytes | rel. weight err | logit MSE | KL(ft‖edit) | ppl A | ppl B |")
    print("|---|---|---|---|---|---|---|")
    print(f"| base | – | 1 | {bmse:.4g} | {bkl:.4g} | {pa_base:.3f} | {pb_base:.3f} |")
    print(f"| fine-tune | 1 | 0 | 0 | 0 | {pa_ft:.3f} | {pb_ft:.3f} |")
    for r in table_rows:
        print(
            f"| {r['label']} | {r['ratio']:.4f} | {r['rel']:.4g} | {r['mse']:.4g} | {r['kl']:.4g} | "
            f"{r['ppl_a']:.3f} | {r['ppl_b']:.3f} |"
        )
    print(
        "\nrel. weight err: ‖θ_loaded − θ_ft‖ / ‖θ_ft − θ_base‖ over all parameters of the model as loaded (load-time "
        "alpha included); stored/ft bytes: the delta's stored tensors ÷ the fine-tune's."
    )
    print("\nDARE vs DAREx-q (auto) over p (`benchmarks/fidelity_dare_vs_darexq.png`):\n")
    print("| p | DARE ppl B | DAREx-q ppl B | DARE logit MSE | DAREx-q logit MSE |")
    print("|---|---|---|---|---|")
    for p, d, x in zip(curve_p, curve["dare"], curve["darex"]):
        print(f"| {p} | {d['ppl_b']:.3f} | {x['ppl_b']:.3f} | {d['mse']:.4g} | {x['mse']:.4g} |")
    print(f"\nRuntime {time.time() - t0:.0f} s.")


if __name__ == "__main__":
    main()
