"""A fine-tune with added tokens (SPEC §9.2, 1.5): its embedding and head tables have more rows
than the base's; the entry records the base's row count and is added to the base extended with
zero rows, the new rows carried by a ``rows-q`` part, so the table is not stored whole."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import delta_format
from delta_format import DeltaModel
from delta_format.core import reconstruct as reconstruct_module
from delta_format.core.encodings import DenseEncoding, QuantizedRowsEncoding, SparseEncoding
from delta_format.core.manifest import TensorEntry
from delta_format.core.reconstruct import reconstruct_stored
from delta_format.errors import BaseMismatchError, InvalidArgumentError, ManifestError
from delta_format.io.reader import DeltaReader
from delta_format.loaders.apply import apply_delta, verify_delta
from tests.models import finetune_by_training, logit_mse, logits, save, tiny_llama

TABLES = ("model.embed_tokens.weight", "lm_head.weight")
ADDED = 3


def with_added_tokens(model, seed: int = 5):
    """``model`` with `ADDED` new tokens whose rows look trained (each the mean of two existing
    rows plus noise: in the model's distribution, not zeros)."""
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + ADDED, mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            if table.shape[0] == vocab + ADDED:
                pairs = torch.randint(0, vocab, (ADDED, 2), generator=g)
                noise = torch.randn(ADDED, table.shape[1], generator=g) * table[:vocab].float().std() * 0.1
                table[vocab:] = (table[pairs].float().mean(1) + noise).to(table.dtype)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("grown")
    base = tiny_llama()
    plain = finetune_by_training(tiny_llama(), steps=20)
    save(plain, root / "plain")
    ft = with_added_tokens(plain)
    return save(base, root / "base"), save(ft, root / "ft"), ft


def file_bits(directory) -> int:
    return 8 * sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@pytest.mark.parametrize("bits", [1.0, 0.5])
def test_a_budget_delta_of_a_resized_vocabulary_stays_within_its_budget(pair, tmp_path, bits):
    base_dir, ft_dir, ft = pair
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing is stored whole any more
        delta = delta_format.compress(base_dir, ft_dir, tmp_path / "d", bits=bits, progress=False)
    vocab = ft.config.vocab_size - ADDED
    for name in TABLES:
        entry = delta.manifest.tensors[name]
        assert entry.base_rows == vocab and entry.base_shape == (vocab, 64) and entry.shape == (vocab + ADDED, 64)
        assert entry.encoding.name in ("rows-q", "sum") and entry.stats["new_rows"] == ADDED
    params = sum(p.numel() for p in ft.parameters())
    assert file_bits(tmp_path / "d") <= bits * params  # the new rows are counted in the budget
    model = DeltaModel.from_pretrained(tmp_path / "d")
    for name in TABLES:
        got, want = model.state_dict()[name][vocab:], ft.state_dict()[name][vocab:]
        assert float((got - want).abs().max()) <= float(want.abs().max()) / 127  # 8-bit codes of each group
    # far closer to the fine-tune than the base is (the old rows' plan is the budget's, as without
    # the added tokens; the base is given the new rows so that the two can be compared)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(vocab + ADDED)
    base.load_state_dict({n: model.state_dict()[n] if n in TABLES else v for n, v in base.state_dict().items()})
    assert logit_mse(model, ft) < 0.1 * logit_mse(base, ft)  # measured: 0.002 / 0.005 of it


def test_the_old_rows_get_the_edit_they_get_without_the_added_tokens(pair, tmp_path):
    base_dir, ft_dir, ft = pair
    vocab = ft.config.vocab_size - ADDED
    delta_format.compress(base_dir, ft_dir, tmp_path / "grown", method="dare", p=0.9, progress=False)
    delta_format.compress(base_dir, base_dir.parent / "plain", tmp_path / "plain", method="dare", p=0.9, progress=False)
    grown, plain = (DeltaModel.from_pretrained(tmp_path / n).state_dict() for n in ("grown", "plain"))
    for name, value in plain.items():
        assert torch.equal(grown[name][:vocab] if name in TABLES else grown[name], value), name


def test_every_load_path_gives_the_same_bits_for_a_grown_entry(pair, tmp_path, capsys):
    base_dir, ft_dir, ft = pair
    from delta_format.cli import main

    assert main(["compress", str(base_dir), str(ft_dir), str(tmp_path / "d"), "--method", "dare", "--p", "0.9"]) == 0
    assert main(["inspect", str(tmp_path / "d")]) == 0
    vocab = ft.config.vocab_size - ADDED
    assert f"{vocab + ADDED}x64 (base {vocab} rows)" in capsys.readouterr().out
    delta = delta_format.Delta(tmp_path / "d")
    entry = delta.manifest.tensors["lm_head.weight"]
    assert entry.encoding.label().endswith(f"rows-q({ADDED} rows, 8b, g64)") and entry.encoding.name == "sum"
    loaded = DeltaModel.from_pretrained(tmp_path / "d")
    apply_delta(tmp_path / "d", tmp_path / "applied", base_model=base_dir, progress=False)
    applied = AutoModelForCausalLM.from_pretrained(tmp_path / "applied")
    for name, value in applied.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    assert torch.equal(logits(loaded), logits(applied))
    report = verify_delta(tmp_path / "d", base_model=base_dir)
    assert report.ok, report.lines


def test_row_blocks_that_straddle_the_base_rows_give_the_same_bits(monkeypatch):
    torch.manual_seed(0)
    base = torch.randn(10, 6).to(torch.bfloat16)
    delta = torch.randn(13, 6) * 1e-2
    delta[10:] = torch.randn(3, 6)  # new rows: values
    entry = TensorEntry(DenseEncoding(), (13, 6), "bfloat16", 0.5, rounding="stochastic", base_rows=10)
    parts = [(entry, DenseEncoding().encode(delta), 1.0)]
    whole = reconstruct_stored("w", parts, base, dtype=torch.bfloat16)
    monkeypatch.setitem(reconstruct_module.ROW_BLOCK_ELEMENTS, "cpu", 4 * 6)  # blocks of 4 rows: 8-11 straddles
    assert torch.equal(reconstruct_stored("w", parts, base, dtype=torch.bfloat16), whole)
    extended = torch.cat([base.float(), torch.zeros(3, 6)])
    expected = extended + (0.5 * delta)  # the float32 sum; stochastic rounding picks a neighbour
    assert float((whole.float() - expected).abs().max()) <= float(expected.abs().max()) * 2**-7
    # a sparse part adds only its kept positions, a rows-q part only its rows: the same rule
    rows = QuantizedRowsEncoding(8, 6, 3)
    stored = rows.encode(delta[10:], rows=torch.arange(3))
    stored["rows"] = torch.arange(10, 13, dtype=torch.int32)
    grown = TensorEntry(rows, (13, 6), "float32", base_rows=10)
    value = reconstruct_stored("w", [(grown, stored, 1.0)], base.float(), dtype=torch.float32)
    assert torch.equal(value[:10], base.float()) and float((value[10:] - delta[10:]).abs().max()) < 0.02


def test_the_base_must_have_the_recorded_rows():
    entry = TensorEntry(SparseEncoding("gaps"), (12, 4), "float32", base_rows=10)
    stored = SparseEncoding("gaps").encode(torch.zeros(12, 4), positions=torch.empty(0, dtype=torch.int64))
    for wrong in (torch.zeros(12, 4), torch.zeros(11, 4), torch.zeros(10, 5)):
        with pytest.raises(BaseMismatchError, match="another shape") as caught:
            reconstruct_stored("w", [(entry, stored, 1.0)], wrong, dtype=torch.float32)
        assert "[10, 4]" in str(caught.value)


def manifest_entry(config: dict) -> dict:
    return {"encoding": "dense", "config": config, "shape": [12, 4], "dtype": "float32"}


@pytest.mark.parametrize(
    "config, match",
    [
        ({"base_rows": 12}, "fewer rows"),
        ({"base_rows": -1}, "fewer rows"),
        ({"base_rows": 3.0}, "fewer rows"),
        ({"base_rows": True}, "fewer rows"),
        ({"base_rows": None}, "null"),
    ],
)
def test_invalid_base_rows_are_refused(config, match):
    with pytest.raises(ManifestError, match=match):
        TensorEntry.from_dict("w", manifest_entry(config))


def test_a_few_stored_bytes_cannot_declare_a_huge_grown_table():
    """SPEC §8.1: at most max(base_rows, 2^16) added rows, checked when the manifest is read."""
    huge = {"encoding": "rows-q", "config": {"bits": 8, "group": 64, "count": 0, "base_rows": 10}, "dtype": "float32"}
    with pytest.raises(ManifestError, match="added rows"):
        TensorEntry.from_dict("w", {**huge, "shape": [10 + 2**16 + 1, 4096]})
    assert TensorEntry.from_dict("w", {**huge, "shape": [10 + 2**16, 4096]}).base_rows == 10
    big = {**huge, "config": {**huge["config"], "base_rows": 2**17}}
    assert TensorEntry.from_dict("w", {**big, "shape": [2**18, 64]}).base_shape == (2**17, 64)  # doubled
    with pytest.raises(ManifestError, match="added rows"):
        TensorEntry.from_dict("w", {**big, "shape": [2**18 + 1, 64]})


def test_the_writer_grows_only_what_readers_accept():
    from delta_format.compression.grown import grown_rows

    assert grown_rows((10, 4), (12, 4)) == 10 and grown_rows((10,), (11,)) == 10
    assert grown_rows((10, 4), (10 + 2**16, 4)) == 10 and grown_rows((10, 4), (11 + 2**16, 4)) is None
    for base, shape in (((10, 4), (10, 4)), ((10, 4), (9, 4)), ((10, 4), (12, 5)), ((4,), (2, 2)), ((), ())):
        assert grown_rows(base, shape) is None  # stored whole (or not grown at all)


def test_base_rows_belong_to_delta_encodings_of_tensors_with_rows():
    with pytest.raises(ManifestError, match="value, not a delta"):
        TensorEntry.from_dict(
            "w", {"encoding": "replace", "config": {"base_rows": 3}, "shape": [4], "dtype": "float32"}
        )
    with pytest.raises(ManifestError, match="scalar"):
        TensorEntry.from_dict("w", {"encoding": "dense", "config": {"base_rows": 0}, "shape": [], "dtype": "float32"})
    with pytest.raises(InvalidArgumentError, match="base_rows"):
        TensorEntry(DenseEncoding(), (4, 2), "float32", base_rows=4)
    entry = TensorEntry.from_dict("w", manifest_entry({"base_rows": 10, "rounding": "stochastic"}))
    assert entry.base_rows == 10 and entry.rounding == "stochastic"
    assert json.loads(json.dumps(entry.to_dict()))["config"] == {"base_rows": 10, "rounding": "stochastic"}


def test_a_model_of_the_base_shape_is_refused_clearly(pair, tmp_path):
    """Hot-swapping into, or serving on the fly from, a model with the base's vocabulary cannot
    hold the new rows: refused before anything changes, saying what to do."""
    base_dir, ft_dir, _ = pair
    plain = delta_format.compress(
        base_dir, save(finetune_by_training(tiny_llama(), steps=5), tmp_path / "ft0"), tmp_path / "plain", bits=1.0
    )
    delta_format.compress(base_dir, ft_dir, tmp_path / "grown", bits=1.0, progress=False)
    model = DeltaModel.from_pretrained(plain.directory)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(BaseMismatchError, match="built from its own config.json"):
        model.swap_delta(tmp_path / "grown")
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in before.items())
    from delta_format import attach_deltas

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with pytest.raises(BaseMismatchError, match="built from its own config.json"):
        attach_deltas(base, {"grown": tmp_path / "grown"}, base_model=base_dir)


def test_a_lossless_delta_still_stores_the_resized_tables_whole(pair, tmp_path):
    base_dir, ft_dir, ft = pair
    delta = delta_format.compress(base_dir, ft_dir, tmp_path / "d", method="dense", progress=False)
    assert {delta.manifest.tensors[n].encoding.name for n in TABLES} == {"replace"}
    model = DeltaModel.from_pretrained(tmp_path / "d")
    assert all(torch.equal(v, model.state_dict()[n]) for n, v in ft.state_dict().items())
    assert DeltaReader(tmp_path / "d").manifest.tensors[TABLES[0]].base_rows is None


def test_calibrated_compression_of_a_resized_vocabulary(tmp_path):
    """With calibration texts each edit is put into the calibration model (base + delta, SPEC
    §9.2's padding included) before the next tensor is measured."""
    from tests.models import CALIBRATION_TEXTS, byte_tokenizer

    tokenizer = byte_tokenizer()
    save(tiny_llama(), tmp_path / "base", tokenizer)
    save(with_added_tokens(finetune_by_training(tiny_llama(), steps=5)), tmp_path / "ft", tokenizer)
    for label, kw in (("budget", dict(bits=0.5)), ("darex", dict(method="darex", p=0.9, q="auto"))):
        delta = delta_format.compress(
            tmp_path / "base", tmp_path / "ft", tmp_path / label, calibration_texts=CALIBRATION_TEXTS[:4], **kw
        )
        assert {n for n, e in delta.manifest.tensors.items() if e.base_rows is not None} == set(TABLES)
        assert DeltaModel.from_pretrained(tmp_path / label).get_input_embeddings().weight.shape[0] == 263
