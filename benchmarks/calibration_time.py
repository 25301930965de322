"""How long calibration takes on a 135M-parameter model on this machine's CPUs.

Runs ``delta_format.compress`` with calibration texts twice on SmolLM-135M-class weights (a
``LlamaForCausalLM`` directory given with ``--model``; without one, a randomly initialised
135M Llama of the same shape stands in, which costs the same): once with BitDelta signs whose
per-row scales are fitted layer by layer on the cached inputs (``sign`` with ``layer_fit``), once
with DAREx-q's per-tensor ``q="auto"``. The fine-tune is the model plus a small low-rank-plus-noise
perturbation (the time does not depend on what the delta is). Reports the calibration pass
(forward and backward on the texts, layer inputs cached) and the whole compression.

    python benchmarks/calibration_time.py [--model DIR] [--texts 16] [--tokens 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import delta_format  # noqa: E402
from benchmarks import minilm_pair  # noqa: E402
from benchmarks.synthetic import machine  # noqa: E402
from delta_format.compression import calibration as calibration_module  # noqa: E402


def stand_in(directory: Path) -> None:
    """A random-init Llama shaped like SmolLM-135M (hidden 576, 30 layers, vocab 49152)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    vocab = {chr(i): i for i in range(32, 127)} | {"<unk>": 0}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(directory)


def perturbed(model_dir: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                rows, cols = param.shape
                low = torch.randn(rows, 8, generator=g) @ torch.randn(8, cols, generator=g) / 8**0.5
                param.add_((low + 0.3 * torch.randn(rows, cols, generator=g)) * 1e-3)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, help="a 135M LlamaForCausalLM directory (default: a random stand-in)")
    ap.add_argument("--texts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="calibration-time-"))
    base = args.model
    if base is None:
        base = work / "base"
        stand_in(base)
    perturbed(base, work / "ft")
    texts = [" ".join(minilm_pair.texts("calib", 400, 5)[i :: args.texts]) for i in range(args.texts)]
    timings = {}
    original = calibration_module.Calibration.__init__

    def timed(self, *a, **kw):
        started = time.perf_counter()
        original(self, *a, max_tokens=args.tokens, **{k: v for k, v in kw.items() if k != "max_tokens"})
        timings["calibration"] = time.perf_counter() - started
        timings["tokens"] = self.tokens

    calibration_module.Calibration.__init__ = timed
    rows = []
    for label, params in (
        ("sign, layer-fitted row scales", {"method": "sign", "scale": "row", "layer_fit": True}),
        ("DAREx-q p=0.99, q=auto", {"method": "darex", "p": 0.99, "q": "auto"}),
    ):
        started = time.perf_counter()
        delta_format.compress(base, work / "ft", work / label.split(",")[0], calibration_texts=texts, **params)
        rows.append((label, timings["calibration"], time.perf_counter() - started, timings["tokens"]))
    numel = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(base).parameters())
    print(
        f"### Calibration time, {numel / 1e6:.0f} M parameters\n\n`python benchmarks/calibration_time.py"
        f"{' --model ' + str(args.model) if args.model else ''}` — {machine()}\n"
    )
    print("| run | calibration tokens | calibration pass s | whole compression s |\n|---|---|---|---|")
    for label, cal, total, tokens in rows:
        print(f"| {label} | {tokens} | {cal:.0f} | {total:.0f} |")


if __name__ == "__main__":
    main()
