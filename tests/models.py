"""Tiny, deterministic models for the tests: built from configs with random weights, fine-tuned for
real (a few optimizer steps) or by a structured perturbation. Nothing here touches the network.

Typical use::

    from tests.models import byte_tokenizer, finetune_by_training, save, tiny_llama

    base = tiny_llama()
    ft = finetune_by_training(base, steps=20, text=TRAIN_TEXT)
    save(base, tmp_path / "base"); save(ft, tmp_path / "ft", tokenizer=byte_tokenizer())

Every builder seeds its own generator, so two calls return bit-identical models, and the sizes
stay small enough that a forward pass takes milliseconds on one CPU core. Matrices are still big
enough (64 x 64 and up) for statistics over their entries (kept fractions, error ratios) to mean
something.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

VOCAB_SIZE = 260
"""256 byte tokens + pad, bos, eos, unk: what `byte_tokenizer` produces."""

TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. A delta is the difference between a fine-tuned model "
    "and its base; publishing the delta instead of the model saves storage and bandwidth. "
    "Sparse deltas keep a few entries, sign deltas keep one bit per weight, low-rank deltas keep two factors. "
)
"""Text the fine-tunes are trained on (deterministic, ASCII: one token per character)."""

CALIBRATION_TEXTS = [
    "A delta is what fine-tuning added to the base model.",
    "The quick brown fox jumps over the lazy dog, twice.",
    "Sign deltas keep one bit per weight and a scale per row.",
    "Publishing the delta saves storage and bandwidth.",
]
"""A few unlabelled texts close to the fine-tune's data, as a user would pass for calibration."""


def byte_tokenizer():
    """A byte-level fast tokenizer (ids 0-255 are bytes; 256-259 are pad, bos, eos, unk), built
    in memory with the `tokenizers` library so no download is needed. It round-trips through
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like any Hub tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: byte for byte, symbol in _bytes_to_unicode().items()}
    for i, special in enumerate(["<pad>", "<s>", "</s>", "<unk>"]):
        vocab[special] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer emits."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _seeded(build, seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = build()
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def tiny_llama(
    seed: int = 0,
    *,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = VOCAB_SIZE,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """A 2-layer Llama (hidden 64, MLP 128, GQA 4/2 heads) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=257,
        eos_token_id=258,
        pad_token_id=256,
    )
    return _seeded(lambda: LlamaForCausalLM(config), seed).to(dtype)


def tiny_gpt2(seed: int = 0, *, hidden: int = 64, layers: int = 2, vocab: int = VOCAB_SIZE):
    """A 2-layer GPT-2 (Conv1D projections, tied input/output embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        bos_token_id=257,
        eos_token_id=258,
        pad_token_id=256,
    )
    return _seeded(lambda: GPT2LMHeadModel(config), seed)


def tiny_bert(seed: int = 0, *, hidden: int = 64, layers: int = 2, vocab: int = VOCAB_SIZE):
    """A 2-layer BERT masked LM (biases, LayerNorms, position and type embeddings)."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=256,
        pad_token_id=256,
    )
    return _seeded(lambda: BertForMaskedLM(config), seed)


def clone(model):
    """An independent copy (own storage, same tying)."""
    return copy.deepcopy(model)


def encode(text: str, vocab: int = VOCAB_SIZE) -> torch.Tensor:
    """Token ids of ``text`` as `byte_tokenizer` would produce them (UTF-8 bytes), shape [1, n]."""
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    return (ids % vocab).unsqueeze(0)


def finetune_by_training(
    model,
    steps: int = 20,
    text: str = TRAIN_TEXT,
    *,
    lr: float = 3e-3,
    seed: int = 1,
    block: int = 64,
    regularizer=None,
):
    """A real fine-tune: a copy of ``model`` trained for ``steps`` AdamW steps on next-token (or,
    for masked LMs, same-token) prediction over ``text`` in blocks of ``block`` tokens.

    ``regularizer`` (a `delta_format.regularization.DeltaL2Regularizer` factory taking the copy)
    is stepped after each optimizer step, to test DAREx-L2. Deterministic for a given seed.
    """
    ft = clone(model).train()
    ids = encode(text, ft.config.vocab_size)[0]
    blocks = [ids[i : i + block] for i in range(0, max(len(ids) - block, 1), block // 2)]
    g = torch.Generator().manual_seed(seed)
    reg = regularizer(ft) if regularizer is not None else None
    optimizer = torch.optim.AdamW(ft.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        batch = blocks[int(torch.randint(len(blocks), (1,), generator=g))].unsqueeze(0)
        loss = ft(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        if reg is not None:
            reg.step(lr)
        optimizer.zero_grad(set_to_none=True)
    return ft.eval()


def structured_perturbation(model, rel: float = 1e-2, seed: int = 0, *, low_rank: int | None = None):
    """A synthetic fine-tune: each floating parameter moves by Gaussian noise of ``rel`` times its
    mean |value| (row-scaled, so rows differ in magnitude as real deltas do); with ``low_rank``
    the matrix deltas are exactly of that rank. Tied parameters move once (they share storage)."""
    ft = clone(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in ft.parameters():  # parameters() yields a tied parameter once
            if not param.is_floating_point():
                continue
            magnitude = rel * (param.float().abs().mean() + 1e-3)
            if low_rank and param.dim() == 2:
                rows, cols = param.shape
                u = torch.randn(rows, low_rank, generator=g)
                v = torch.randn(low_rank, cols, generator=g)
                noise = (u @ v) / low_rank**0.5
            else:
                noise = torch.randn(param.shape, generator=g)
                if param.dim() == 2:
                    noise *= torch.rand(param.shape[0], 1, generator=g) * 2
            param.add_((noise * magnitude).to(param.dtype))
    return ft


def save(model, directory: str | Path, tokenizer=None) -> Path:
    """``save_pretrained`` (safetensors) plus the tokenizer when given; returns the directory."""
    directory = Path(directory)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def trained_pair(root: Path, *, steps: int = 20, lr: float = 1e-3) -> dict[str, Path]:
    """A tiny Llama and a fine-tune of it trained ``steps`` steps, saved under ``root`` (the
    fine-tune with the byte tokenizer, for calibration texts): ``{"base": dir, "ft": dir}``."""
    base = tiny_llama()
    ft = finetune_by_training(base, steps=steps, lr=lr)
    return {"base": save(base, root / "base"), "ft": save(ft, root / "ft", tokenizer=byte_tokenizer())}


def state_dict_on_disk(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint (single file or shards), by name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(path))
    return out


def logits(model, texts=CALIBRATION_TEXTS) -> torch.Tensor:
    """Concatenated logits of ``model`` on ``texts`` (float32), for comparing two models."""
    with torch.no_grad():
        return torch.cat([model(input_ids=encode(t, model.config.vocab_size)).logits[0].float() for t in texts])


def logit_mse(model, reference, texts=CALIBRATION_TEXTS) -> float:
    """Mean squared difference of the logits of two models on ``texts``."""
    return float(((logits(model, texts) - logits(reference, texts)) ** 2).mean())


def fresh_memory(model):
    """``model`` with every tensor moved to a new allocation. CPU kernels may round differently
    depending on where a weight starts in memory (seen: oneDNN's small GEMMs, by address modulo
    16 bytes), and transformers memory-maps safetensors at any 8-byte offset while fresh
    allocations are 64-byte aligned; so the outputs of bit-identical weights are compared only
    once both models hold them at the allocator's alignment."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    return model


def tiny_sentence_transformer(directory: str | Path, seed: int = 0, *, hidden: int = 32, card: dict | None = None):
    """A sentence-transformers model saved as its users publish one: a 2-layer `BertModel` with the
    byte tokenizer, mean pooling and L2 normalisation (``modules.json``, ``1_Pooling/``,
    ``2_Normalize/``, ``sentence_bert_config.json``, ``config_sentence_transformers.json``, and the
    model card sentence-transformers writes), ``card`` merged into that card's metadata."""
    from huggingface_hub import ModelCard
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        pad_token_id=256,
    )
    directory = Path(directory)
    save(_seeded(lambda: BertModel(config), seed), directory / "transformer", tokenizer=byte_tokenizer())
    modules = [Transformer(str(directory / "transformer"), max_seq_length=64), Pooling(hidden, "mean"), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(directory / "model"))
    if card:
        readme = ModelCard.load(directory / "model" / "README.md")
        for key, value in card.items():
            setattr(readme.data, key, value)
        readme.save(directory / "model" / "README.md")
    return directory / "model"


def perturb_checkpoint(directory: str | Path, rel: float = 0.05, seed: int = 1) -> None:
    """Move every floating tensor of ``directory/model.safetensors`` by ``rel`` of its scale, in
    place: a fine-tune of a saved model that keeps every other file of its directory."""
    from safetensors.torch import load_file, save_file

    path = Path(directory) / "model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=g) * rel * (tensor.abs().mean() + 1e-3)
            tensors[name] = tensor + noise.to(tensor.dtype)
    save_file(tensors, path, metadata={"format": "pt"})
