"""``rows-q`` (SPEC §5.12): a few rows of a matrix as codes, the other rows' delta zero; and the
budget keeping the rows a fine-tune moved in an input embedding."""

from __future__ import annotations

import pytest
import torch

import delta_format
from delta_format.core.encodings import QuantizedRowsEncoding, encoding_from_dict
from delta_format.errors import CorruptDeltaError, ManifestError
from delta_format.io.reader import DeltaReader
from tests.models import save, tiny_llama


def test_rows_round_trip_and_the_rows_left_out_stay_zero():
    torch.manual_seed(0)
    delta = torch.zeros(40, 24)
    moved = torch.tensor([3, 7, 31, 39])
    delta[moved] = torch.randn(4, 24) * 1e-2
    encoding = QuantizedRowsEncoding(8, 16, 4)
    stored = encoding.encode(delta)  # default: every nonzero row
    assert stored["rows"].dtype == torch.int32 and stored["rows"].tolist() == moved.tolist()
    decoded = encoding.decode(stored, (40, 24), "w", torch.float32)
    others = torch.ones(40, dtype=torch.bool).index_fill_(0, moved, False)
    assert bool((decoded[others] == 0).all())
    assert float((decoded - delta).abs().max()) <= 0.5 * float(delta.abs().max()) / 127.5 * 1.01
    for role, expected in encoding.expected((40, 24)).items():
        expected.check(
            role,
            {torch.int32: "I32", torch.uint8: "U8", torch.float16: "F16"}[stored[role].dtype],
            tuple(stored[role].shape),
        )
    assert encoding_from_dict("rows-q", encoding.to_dict()) == encoding


def test_rows_q_refuses_rows_out_of_order_or_range_and_counts_that_do_not_fit():
    delta = torch.zeros(10, 8)
    delta[[2, 5]] = 1.0
    encoding = QuantizedRowsEncoding(4, 8, 2)
    stored = encoding.encode(delta)
    for bad in ([5, 2], [2, 2], [2, 10], [-1, 5]):
        with pytest.raises(CorruptDeltaError, match="row indices"):
            encoding.decode({**stored, "rows": torch.tensor(bad, dtype=torch.int32)}, (10, 8), "w", torch.float32)
    with pytest.raises(ManifestError, match="more rows than the parameter has"):
        QuantizedRowsEncoding(4, 8, 11).expected((10, 8))
    with pytest.raises(ManifestError, match="do not match the config"):
        QuantizedRowsEncoding(4, 8, 3).encode(delta)
    with pytest.raises(ManifestError, match="count"):
        encoding_from_dict("rows-q", {"bits": 4, "group": 8, "count": -1})
    with pytest.raises(ManifestError):
        encoding_from_dict("rows-q", {"bits": 4, "group": 8})


def test_head_names_are_output_embeddings_and_what_is_tied_to_them(tmp_path):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    from delta_format.io.model_class import head_names

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    assert head_names(gpt2) == {"transformer.wte.weight", "lm_head.weight"}
    assert head_names(tiny_llama()) == {"lm_head.weight"}  # untied: the input embedding is only read
    assert head_names(tiny_llama(tie=True)) == {"lm_head.weight", "model.embed_tokens.weight"}
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    assert head_names(bert) == set()
    # from a checkpoint's config alone (an empty build, where the tie is not made yet)
    from delta_format.io.model_class import layout_from_config

    save(tiny_llama(tie=True), tmp_path / "tied")
    assert layout_from_config(tmp_path / "tied")[2] == {"lm_head.weight", "model.embed_tokens.weight"}


def test_the_budget_keeps_the_moved_rows_of_an_input_embedding(tmp_path):
    base = tiny_llama(vocab=4096)
    ft = tiny_llama(vocab=4096)
    ft.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    moved = torch.randperm(4096, generator=g)[:64].sort().values
    with torch.no_grad():
        table = ft.model.embed_tokens.weight
        table[moved] += torch.randn(64, table.shape[1], generator=g) * 0.05
        for name, p in ft.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    delta = delta_format.compress(
        save(base, tmp_path / "base"), save(ft, tmp_path / "ft"), tmp_path / "d", bits=1.0, progress=False
    )
    entry = delta.manifest.tensors["model.embed_tokens.weight"]
    assert entry.encoding.name == "rows-q"
    with DeltaReader(tmp_path / "d") as reader:
        rows = reader.stored("model.embed_tokens.weight")["rows"]
    assert set(moved.tolist()) <= set(rows.tolist())  # every moved row kept (the plan may keep more)
    assert "input-only x0.3" in delta.manifest.stats["prepare"]["budget"]["weighting"]


def test_rows_are_offered_for_an_input_embedding_not_for_a_head():
    from delta_format.methods import get_method
    from delta_format.methods.base import TensorContext

    g = torch.Generator().manual_seed(2)
    table = torch.zeros(4096, 32)
    table[torch.randperm(4096, generator=g)[:40]] = torch.randn(40, 32, generator=g)
    linear = torch.randn(64, 64, generator=g) * 0.1

    def choice(head: bool) -> str:
        method = get_method("budget", bits=0.05, noise_weight="off")
        tensors = [
            ("embed", table.clone(), TensorContext("embed", lookup=True, head=head)),
            ("linear", linear.clone(), TensorContext("linear")),
        ]
        method.prepare(lambda: iter(tensors), None)
        return method._choices["embed"].label

    assert choice(head=False).startswith("rows-q 40 rows")
    assert not choice(head=True).startswith("rows-q")


def test_a_load_adds_only_the_kept_rows_block_by_block_with_the_bits_of_a_whole_decode():
    g = torch.Generator().manual_seed(3)
    delta = torch.zeros(50, 16)
    delta[[0, 7, 8, 23, 49]] = torch.randn(5, 16, generator=g)
    encoding = QuantizedRowsEncoding(3, 8, 5)
    stored = encoding.encode(delta)
    base = torch.randn(50, 16, generator=g)
    whole = base + encoding.decode(stored, (50, 16), "w", torch.float32) * 1.5
    rows = encoding.rows(stored, (50, 16), "w", torch.float32, alpha=1.5)
    acc = base.clone()
    for start in range(0, 50, 7):  # blocks that cut between and around kept rows
        rows.add_rows(acc[start : start + 7], start, min(start + 7, 50))
    rows.finish()
    assert torch.equal(acc, whole)
