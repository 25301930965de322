"""The whole story, end to end, on a model small enough for a laptop CPU.

1. Build a tiny Llama base and pre-train it for a few steps on one text (the Zen of Python).
2. Fine-tune it for a few steps on another text (the docstrings of the `json` module).
3. Compress the fine-tune against the base with two methods (DARE p=0.9, BitDelta per-row signs).
4. Publish base and deltas: to a local Hub server on 127.0.0.1 with ``--hub`` (started here, the
   same server the tests use), or to a local directory otherwise.
5. Load each delta with ``DeltaModel.from_pretrained``, generate text, and print the sizes and
   the measured error against the fine-tune.

Run:  python examples/publish_and_load.py [--hub] [--out DIR]

With a real pair (any Hub repos or local directories; a causal LM or a sentence-transformers model):

      python examples/publish_and_load.py --base ORG/base --finetune ORG/ft [--out DIR]

compresses the fine-tune with each method of `PAIR_METHODS` and prints, per method: stored size,
bits per weight, a fidelity figure measured on `SAMPLE_TEXTS` (mean per-token KL to the fine-tune
for a language model, mean embedding cosine to the fine-tune for an embedding model), the load
time next to loading the fine-tune itself, and a sample from the fine-tune and from the delta;
then saves a size-vs-fidelity plot (``size_vs_fidelity.png``, needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_tokenizer():
    """A character-level tokenizer built locally (nothing is downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", "<s>", "</s>", *string.printable])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def corpora() -> tuple[str, str]:
    import codecs
    import contextlib
    import io
    import json as json_module

    with contextlib.redirect_stdout(io.StringIO()):
        import this  # noqa: F401  (its text is this.s, rot13-encoded; importing it prints it)
    zen = codecs.decode(sys.modules["this"].s, "rot13")
    docs = "\n".join(filter(None, [json_module.__doc__, json_module.dumps.__doc__, json_module.loads.__doc__]))
    return zen, docs


def train(model, tokenizer, text: str, steps: int, lr: float, seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,))
        batch = torch.stack([ids[s : s + 64] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def start_local_hub(storage: Path):
    """The test suite's Hub server (tests/hubserver), on 127.0.0.1, as a subprocess."""
    token = "hf_example_token"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.hubserver",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--storage",
            str(storage),
            "--token",
            f"user:{token}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    if not line.startswith("HUB_URL="):
        proc.kill()
        raise SystemExit(f"the local Hub server did not start (said {line!r})")
    return proc, line.removeprefix("HUB_URL="), token


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hub", action="store_true", help="publish to a local Hub server on 127.0.0.1")
    parser.add_argument("--out", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--base", help="a real base model: Hub repo id or directory (with --finetune)")
    parser.add_argument("--finetune", help="a real fine-tune of --base: Hub repo id or directory")
    args = parser.parse_args(argv)
    if bool(args.base) != bool(args.finetune):
        parser.error("--base and --finetune go together")
    work = args.out or Path(tempfile.mkdtemp(prefix="delta-format-example-"))
    work.mkdir(parents=True, exist_ok=True)

    server = None
    if args.hub:
        server, url, token = start_local_hub(work / "hub-storage")
        os.environ.update(HF_ENDPOINT=url, HF_TOKEN=token, HF_HUB_DISABLE_XET="1", HF_HOME=str(work / "hf-home"))
        os.environ.pop("HF_HUB_OFFLINE", None)
        print(f"local Hub at {url}")
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")

    try:
        if args.base:
            from real_pair import run_pair  # beside this script

            run_pair(args.base, args.finetune, work)
        else:
            run(work, hub=args.hub)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)


def run(work: Path, hub: bool) -> None:
    # Imported here so HF_ENDPOINT is set before huggingface_hub reads it.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import delta_format
    from delta_format import DeltaModel

    tokenizer = make_tokenizer()
    zen, docs = corpora()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    train(base, tokenizer, zen, steps=200, lr=3e-3)
    base.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    finetune = LlamaForCausalLM.from_pretrained(work / "base")
    train(finetune, tokenizer, docs, steps=100, lr=1e-3, seed=1)
    finetune.save_pretrained(work / "finetune")
    tokenizer.save_pretrained(work / "finetune")
    print("trained a base and a fine-tune:", sum(p.numel() for p in base.parameters()), "parameters")

    base_source = str(work / "base")
    if hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo("user/tiny-base", exist_ok=True)
        api.upload_folder(repo_id="user/tiny-base", folder_path=work / "base")
        base_source = "user/tiny-base"  # the manifests will pin this repo at its commit

    prompt = tokenizer("Beautiful is", return_tensors="pt")
    with torch.no_grad():
        reference = finetune(**prompt).logits
    rows = []
    for label, method, params in [("dare-0.9", "dare", {"p": 0.9, "seed": 0}), ("sign-row", "sign", {"scale": "row"})]:
        out = work / f"delta-{label}"
        start = time.perf_counter()
        delta = delta_format.compress(base_source, work / "finetune", out, method=method, overwrite=True, **params)
        seconds = time.perf_counter() - start
        source = str(out)
        if hub:
            delta.push_to_hub(f"user/tiny-ft-{label}")
            source = f"user/tiny-ft-{label}"
        model = DeltaModel.from_pretrained(source)
        with torch.no_grad():
            mse = float(((model(**prompt).logits - reference) ** 2).mean())
        text = tokenizer.decode(
            model.generate(**prompt, max_new_tokens=24, do_sample=False)[0], skip_special_tokens=True
        )
        stats = delta.manifest.stats
        rows.append(
            (
                label,
                source,
                stats.get("stored_bytes"),
                stats.get("compression_ratio"),
                stats.get("rel_error"),
                mse,
                seconds,
                text,
            )
        )

    print(
        f"\n{'delta':<10} {'stored':>10} {'ratio':>7} {'rel.err':>8} {'logit MSE':>10} {'compress s':>10}  loaded from"
    )
    for label, source, stored, ratio, rel, mse, seconds, _ in rows:
        print(
            f"{label:<10} {stored or 0:>10} {ratio or 0:>7.2f} {rel or 0:>8.4f} {mse:>10.3g} {seconds:>10.2f}  {source}"
        )
    print()
    ft_text = tokenizer.decode(
        finetune.generate(**prompt, max_new_tokens=24, do_sample=False)[0], skip_special_tokens=True
    )
    print(f"fine-tune: {json.dumps(ft_text)}")
    for label, *_, text in rows:
        print(f"{label}: {json.dumps(text)}")


if __name__ == "__main__":
    main()
