"""DAREx-L2: fine-tune with an L2 pull towards the base, so DARE can drop more of the delta.

1. Pre-train a tiny Llama for a few steps on one text (the Zen of Python): the base.
2. Fine-tune it twice with the transformers ``Trainer`` on another text (the ``json`` module's
   docstrings): once plainly, once with `DeltaL2Callback` (``λ ||θ - θ_base||²``, decoupled
   like AdamW's weight decay, as in DAREx's AdamR-L2).
3. Compress both fine-tunes with DARE at p = 0.9 and p = 0.99, and with DAREx-q (q chosen per
   tensor from activations on calibration texts), and print the delta's size and each edit's
   output (logit) error against its own fine-tune, measured on held-out text.

The regularised fine-tune moves less (smaller ``||Δ||``), so dropping 99% of its delta costs far
less output error; the price is a slightly higher training loss, which the table also shows.

Run:  python examples/darex_l2_finetune.py [--lam 5.0] [--steps 60] [--out DIR]
"""

from __future__ import annotations

import argparse
import codecs
import os
import string
import sys
import tempfile
from pathlib import Path


def make_tokenizer():
    """A character-level tokenizer built locally (nothing is downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", "<s>", "</s>", "<pad>", *string.printable])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def corpora() -> tuple[str, str]:
    import json
    import this  # noqa: F401  (prints the Zen once; its text is this.s, rot13-encoded)

    zen = codecs.decode(sys.modules["this"].s, "rot13")
    docs = "\n".join(filter(None, [json.__doc__, json.dumps.__doc__, json.loads.__doc__, json.JSONDecoder.__doc__]))
    return zen, docs


def blocks(tokenizer, text: str, length: int = 64) -> list[dict]:
    import torch

    ids = torch.tensor(tokenizer(text)["input_ids"])
    return [
        {"input_ids": ids[i : i + length], "labels": ids[i : i + length]}
        for i in range(0, len(ids) - length, length // 2)
    ]


def fine_tune(base_dir: Path, data: list[dict], out: Path, steps: int, lam: float) -> tuple[float, float]:
    """Fine-tune a copy of the base; returns (final training loss, ||θ - θ_base||)."""
    import torch
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    from delta_format.regularization import DeltaL2Callback

    model = LlamaForCausalLM.from_pretrained(base_dir)
    callback = DeltaL2Callback(model, lam) if lam > 0 else None
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        logging_steps=steps,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback] if callback else [])
    result = trainer.train()
    model.save_pretrained(out)
    base = LlamaForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        norm = sum(float((p - q).square().sum()) for p, q in zip(model.parameters(), base.parameters())) ** 0.5
    return result.training_loss, norm


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lam", type=float, default=5.0, help="DAREx-L2 strength λ")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps")
    parser.add_argument("--out", type=Path, default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    import delta_format

    work = args.out or Path(tempfile.mkdtemp(prefix="darex-l2-"))
    tokenizer = make_tokenizer()
    zen, docs = corpora()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    pretrain = TrainingArguments(
        output_dir=str(work / "pretrain"),
        max_steps=60,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    Trainer(model=base, args=pretrain, train_dataset=blocks(tokenizer, zen)).train()
    base.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")

    paragraphs = [p for p in docs.split("\n\n") if len(p.strip()) > 40]
    train_text, held_out = "\n\n".join(paragraphs[::2]), [p.strip() for p in paragraphs[1::2]][:6]
    data = blocks(tokenizer, train_text)

    rows = []
    for label, lam in (("plain", 0.0), (f"DAREx-L2 λ={args.lam:g}", args.lam)):
        ft_dir = work / f"ft-{'l2' if lam else 'plain'}"
        loss, norm = fine_tune(work / "base", data, ft_dir, args.steps, lam)
        tokenizer.save_pretrained(ft_dir)
        for method, params in (("dare", {"p": 0.9}), ("dare", {"p": 0.99}), ("darex", {"p": 0.99, "q": "auto"})):
            delta = delta_format.compress(
                work / "base",
                ft_dir,
                work / f"delta-{ft_dir.name}-{method}-{params['p']}",
                method=method,
                calibration_texts=held_out,
                progress=False,
                overwrite=True,
                **params,
            )
            stats = delta.manifest.stats
            rows.append(
                (
                    label,
                    loss,
                    norm,
                    f"{method} p={params['p']}" + (" q=auto" if "q" in params else ""),
                    stats["stored_bytes"],
                    stats["output_error"],
                )
            )

    print(f"\n{'fine-tune':<16} {'train loss':>10} {'||Δ||':>8}  {'edit':<20} {'stored':>9} {'logit MSE':>10}")
    for label, loss, norm, edit, stored, mse in rows:
        print(f"{label:<16} {loss:>10.3f} {norm:>8.3f}  {edit:<20} {stored:>9} {mse:>10.4g}")
    print(f"\n(work directory: {work})")


if __name__ == "__main__":
    main()
