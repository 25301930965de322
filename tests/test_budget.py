"""A size instead of a method: ``compress(..., bits=)`` allocates the budget across tensors
(`delta_format.methods.allocation`), meets it on disk, records what it chose, and spends bits where
they buy the most; DARE's kept values as codes (``value_bits``)."""

from __future__ import annotations

import pytest
import torch

import delta_format
from delta_format.io.reader import DeltaReader
from delta_format.methods import get_method
from delta_format.methods.allocation import Menu, Option, allocate, menu_for, vector_tables
from delta_format.methods.base import TensorContext
from tests.models import finetune_by_training, save, tiny_llama


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    base = tiny_llama()
    ft = finetune_by_training(base, steps=20, lr=1e-3)
    numel = sum(p.numel() for p in ft.parameters())
    return {"base": save(base, root / "base"), "ft": save(ft, root / "ft"), "numel": numel}


def tensor_bytes(directory) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@pytest.mark.parametrize("bits", [1.0, 0.2])
def test_bits_meets_the_budget_on_disk(pair, tmp_path, bits):
    delta = delta_format.compress(pair["base"], pair["ft"], tmp_path / "d", bits=bits, progress=False)
    assert delta.manifest.method == "budget"
    on_disk = 8 * tensor_bytes(tmp_path / "d") / pair["numel"]
    assert bits * 0.7 < on_disk <= bits  # headers included: an upper bound is planned for each entry


def test_header_bits_bound_the_written_header_entries(pair, tmp_path):
    import json
    import struct

    from delta_format.methods.allocation import FILE_BITS, header_bits

    delta_format.compress(pair["base"], pair["ft"], tmp_path / "d", bits=0.5, progress=False)
    for path in (tmp_path / "d").glob("*.safetensors"):
        raw = path.read_bytes()
        length = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + length])
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        planned = sum(header_bits(k.split(":")[0]) for k in entries) + FILE_BITS
        assert 8 * (8 + length) <= planned
        for key, value in entries.items():
            assert 8 * (len(json.dumps({key: value}, separators=(",", ":"))) - 1) <= header_bits(key.split(":")[0])


def test_a_bigger_budget_gives_a_smaller_error(pair, tmp_path):
    errors = [
        delta_format.compress(pair["base"], pair["ft"], tmp_path / f"d{b}", bits=b, progress=False).manifest.stats[
            "rel_error"
        ]
        for b in (0.1, 0.5, 2.0)
    ]
    assert errors[0] > errors[1] > errors[2]


def test_the_manifest_records_the_plan_and_each_choice(pair, tmp_path):
    delta = delta_format.compress(pair["base"], pair["ft"], tmp_path / "d", bits=0.3, progress=False)
    plan = delta.manifest.stats["prepare"]["budget"]
    assert plan["bits_per_weight_target"] == 0.3 and plan["bits_per_weight_planned"] <= 0.3
    assert sum(plan["choices"].values()) == delta.manifest.stats["tensors"]["edited"] + len(plan["dropped"])
    with DeltaReader(tmp_path / "d") as reader:
        for name, entry in reader.manifest.tensors.items():
            assert entry.stats["method"] == "budget" and entry.stats["choice"] and name not in plan["dropped"]


def test_dropped_tensors_keep_the_base_value(pair, tmp_path):
    delta = delta_format.compress(pair["base"], pair["ft"], tmp_path / "d", bits=0.05, progress=False)
    dropped = delta.manifest.stats["prepare"]["budget"]["dropped"]
    assert dropped and not set(dropped) & set(delta.manifest.tensors)


def test_low_rank_vectors_get_more_bits_for_larger_singular_values():
    u, v = torch.linalg.qr(torch.randn(96, 96))[0], torch.linalg.qr(torch.randn(80, 80))[0]
    delta = (u[:, :80] * (0.9 ** torch.arange(80.0))) @ v.T
    cost, error, _ = vector_tables(delta)
    menu = Menu("w", delta.numel(), [Option("drop", 0, float(error[:, 0].sum()), ("drop",))], cost, error)
    option = menu.best(price=error[0, 0].item() / cost[0, -1].item() * 1e-3)
    widths = [b for count, b in option.spec[2] for _ in range(count)]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]


def test_the_vector_error_estimate_matches_the_encoded_error():
    from delta_format.core.encodings import QuantizedLowRankEncoding

    delta = torch.randn(64, 8) @ torch.randn(8, 48) * 0.01
    cost, error, (u, s, vh) = vector_tables(delta)
    estimate = float(error[:8, 3].sum() + error[8:, 0].sum())  # 3 bits on the top 8 vectors
    enc = QuantizedLowRankEncoding([(8, 3)], 64)
    stored = enc.encode(delta, u=(u * s)[:, :8], v=vh[:8])
    measured = float((enc.decode(stored, (64, 48), "w", torch.float32) - delta).double().square().sum())
    assert measured == pytest.approx(estimate, rel=0.2)


def test_allocation_spends_where_the_error_drops_most():
    steep = Menu("steep", 100, [Option("drop", 0, 100.0, ("drop",)), Option("keep", 800, 1.0, ("x",))])
    flat = Menu("flat", 100, [Option("drop", 0, 10.0, ("drop",)), Option("keep", 800, 9.0, ("x",))])
    choice, _ = allocate([steep, flat], 1000)
    assert choice["steep"].label == "keep" and choice["flat"].label == "drop"


def test_vectors_are_stored_in_16_bits_and_dropped_when_the_budget_is_small():
    menu, _ = menu_for("b", torch.full((64,), 1e-3))
    assert {o.label for o in menu.options} == {"drop", "dense float16"}
    assert allocate([menu], 100)[0]["b"].label == "drop"


def test_bits_must_be_positive():
    with pytest.raises(delta_format.InvalidArgumentError):
        get_method("budget", bits=0)


# --- DARE with quantised values ------------------------------------------------------------------


def test_dare_value_bits_store_codes_at_a_fraction_of_the_size():
    delta = torch.randn(256, 256) * 0.01
    ctx = TensorContext("w", seed=1, value_dtype=torch.bfloat16)
    floats, codes = (get_method("dare", p=0.9, value_bits=b).edit("w", delta, ctx) for b in (16, 2))
    size = {e.encoding.name: sum(t.numel() * t.element_size() for t in e.stored.values()) for e in (floats, codes)}
    assert size["sparse-q"] * 16 / 2.25 == pytest.approx(size["sparse"], rel=0.02)
    kept = floats.decode((256, 256), "w", torch.float32) != 0
    error = codes.decode((256, 256), "w", torch.float32)[kept] - floats.decode((256, 256), "w", torch.float32)[kept]
    assert float(error.norm() / floats.decode((256, 256), "w", torch.float32)[kept].norm()) < 0.5


def test_dare_value_bits_decode_as_a_reader_does(pair, tmp_path):
    delta = delta_format.compress(pair["base"], pair["ft"], tmp_path / "d", "dare", p=0.9, value_bits=2, progress=False)
    assert 2.5 < delta.manifest.stats["rel_error"] < 3.6  # DARE's sqrt(p / (1 - p)) = 3, plus rounding
    with DeltaReader(tmp_path / "d") as reader:
        assert {e.encoding.name for e in reader.manifest.tensors.values()} == {"sparse-q"}
