"""The ``sum`` encoding (SPEC §5.11) and the budget's hybrid that writes it: parts added in order with
the same bits on every path, configs validated part by part (no nesting, no value encodings), and
the hybrid's error estimate what its encoded form measures."""

from __future__ import annotations

import pytest
import torch

import delta_format
from delta_format.core import native
from delta_format.core.encodings import (
    MERGE_MIN_TOKENS,
    DenseEncoding,
    QuantizedLowRankEncoding,
    SignEncoding,
    SumEncoding,
    encoding_from_dict,
)
from delta_format.core.manifest import BaseReference, TensorEntry
from delta_format.core.reconstruct import reconstruct, reconstruct_stored
from delta_format.errors import CorruptDeltaError, ManifestError, UnknownEncodingError
from delta_format.io.reader import DeltaReader
from delta_format.io.writer import DeltaWriter
from delta_format.methods import get_method
from delta_format.methods.allocation import rounding_error, truncated_svd
from delta_format.methods.base import TensorContext
from delta_format.methods.hybrid import dare_q, hybrid_encode, hybrid_options, low_rank_part
from delta_format.methods.priors import column_weights
from tests.crafting import replace_stored
from tests.models import save, tiny_llama


def structured(rows=96, cols=80, seed=0):
    """A delta with a strong rank-3 part and a full-rank rest, as fine-tunes have."""
    g = torch.Generator().manual_seed(seed)
    top = torch.randn(rows, 3, generator=g) @ torch.randn(3, cols, generator=g)
    return (top * 0.05 + torch.randn(rows, cols, generator=g) * 0.01) * 1e-2


def hybrid(delta, name="w", rank=4, p=0.9, bits=4):
    svd = truncated_svd(delta, min(delta.shape))
    return hybrid_encode(name, delta, svd, 7, rank, p, bits)


def test_rows_and_decode_give_the_same_bits_at_any_alpha():
    delta = structured()
    encoding, stored = hybrid(delta)
    base = torch.randn(96, 80).to(torch.bfloat16)
    for alpha in (1.0, 0.7, -1.3):
        entry = TensorEntry(encoding, (96, 80), "bfloat16", alpha)
        rows = reconstruct_stored("w", [(entry, stored, 1.0)], base, dtype=torch.bfloat16)
        whole = reconstruct("w", entry, encoding.decode(stored, (96, 80), "w", torch.float32), base)
        assert torch.equal(rows.view(torch.int16), whole.view(torch.int16))


def test_the_sum_is_each_part_decoded_then_added_in_order():
    delta = structured()
    encoding, stored = hybrid(delta)
    parts = encoding.split(stored)
    want = encoding.parts[0].decode(parts[0], (96, 80), "w", torch.float32)
    want = want + encoding.parts[1].decode(parts[1], (96, 80), "w", torch.float32)
    assert torch.equal(encoding.decode(stored, (96, 80), "w", torch.float32), want)
    assert sorted(stored) == ["0.codes", "0.scales", "1.codes", "1.scales"]


def test_a_hybrid_is_closer_to_its_delta_than_its_dare_part_alone():
    delta = structured()
    encoding, stored = hybrid(delta, p=0.9, bits=8)
    error = float((encoding.decode(stored, (96, 80), "w", torch.float32) - delta).square().sum())
    dare, dare_stored = dare_q("w", delta, 7, 0.9, 8)
    alone = float((dare.decode(dare_stored, (96, 80), "w", torch.float32) - delta).square().sum())
    assert error < 0.5 * alone


def test_a_written_sum_reads_back_through_the_reader(tmp_path):
    delta = structured()
    encoding, stored = hybrid(delta)
    with DeltaWriter(tmp_path / "d", base=BaseReference(local_path="base"), method="budget") as writer:
        writer.add("w", TensorEntry(encoding, (96, 80), "float32"), stored)
    reader = DeltaReader(tmp_path / "d")
    assert reader.entry("w").encoding == encoding
    got = reader.entry("w").encoding.decode(reader.stored("w"), (96, 80), "w", torch.float32)
    assert torch.equal(got, encoding.decode(stored, (96, 80), "w", torch.float32))


def test_config_round_trips_and_labels_its_parts():
    encoding = SumEncoding([SignEncoding("row"), DenseEncoding()])
    assert encoding_from_dict("sum", encoding.to_dict()) == encoding
    assert encoding.label() == "sign(row) + dense"


@pytest.mark.parametrize(
    "config, error",
    [
        ({"parts": [{"encoding": "dense"}]}, ManifestError),  # one part
        ({"parts": [{"encoding": "dense"}] * 5}, ManifestError),  # five parts
        ({"parts": [{"encoding": "dense"}, {"encoding": "sum", "config": {"parts": []}}]}, ManifestError),  # nesting
        ({"parts": [{"encoding": "dense"}, {"encoding": "replace"}]}, ManifestError),  # a value, not a delta
        ({"parts": [{"encoding": "dense"}, {"encoding": "nope"}]}, UnknownEncodingError),
        ({"parts": [{"encoding": "dense"}, {"encoding": "dense", "extra": 1}]}, ManifestError),
        ({"parts": [{"encoding": "dense"}, ["dense"]]}, ManifestError),
        ({"parts": {"encoding": "dense"}}, ManifestError),
        ({"parts": [{"encoding": "dense"}, {"encoding": "dense"}], "more": 1}, ManifestError),
        ({"parts": [{"encoding": "dense"}, {"encoding": "sign", "config": {"scale": "column"}}]}, ManifestError),
    ],
)
def test_a_bad_config_is_refused(config, error):
    with pytest.raises(error):
        encoding_from_dict("sum", config)


def test_a_part_that_cannot_apply_to_the_shape_is_refused():
    encoding = SumEncoding([DenseEncoding(), QuantizedLowRankEncoding([(1, 4)], 64)])
    with pytest.raises(ManifestError, match="matrix"):
        encoding.expected((12,))


def test_stored_tensors_of_a_part_must_all_be_there(tmp_path):
    delta = structured()
    encoding, stored = hybrid(delta)
    with pytest.raises(CorruptDeltaError, match="roles"):  # the writer refuses a part's missing role
        with DeltaWriter(tmp_path / "w", base=BaseReference(local_path="base"), method="budget") as writer:
            writer.add(
                "w", TensorEntry(encoding, (96, 80), "float32"), {k: v for k, v in stored.items() if k != "1.scales"}
            )
    assert not (tmp_path / "w").exists()
    with DeltaWriter(tmp_path / "d", base=BaseReference(local_path="base"), method="budget") as writer:
        writer.add("w", TensorEntry(encoding, (96, 80), "float32"), stored)
    for change in ({"w:1.scales": None}, {"w:2.scales": stored["1.scales"].clone()}):  # a reader refuses them too
        tensors = {f"w:{role}": t for role, t in stored.items()}
        tensors.update(change)
        replace_stored(tmp_path / "d", {k: v for k, v in tensors.items() if v is not None})
        with pytest.raises(CorruptDeltaError):
            DeltaReader(tmp_path / "d")


def test_on_the_fly_factor_matches_the_decoded_delta(monkeypatch):
    delta = structured()
    encoding, stored = hybrid(delta)
    factor = encoding.factor(stored, (96, 80), "w", torch.float32, 0.5)
    weight = torch.randn(96, 80)
    decoded = encoding.decode(stored, (96, 80), "w", torch.float32)
    assert torch.allclose(factor.merged(weight), weight + 0.5 * decoded, atol=1e-6)
    ids = torch.tensor([[0, 5], [95, 3]])
    assert torch.allclose(factor.gather(ids), 0.5 * decoded[ids], atol=1e-6)
    # Apart (products with the input) only where every part is: the DARE part multiplies at its kept
    # entries natively (a few tokens), else merges, and the sum follows it.
    assert factor.apart(1) == native.available() and not factor.apart(MERGE_MIN_TOKENS)
    x = torch.randn(3, 80)
    exact = x.double() @ (0.5 * decoded.double()).T
    if factor.apart(3):
        assert torch.allclose(factor.product(x).double(), exact, atol=1e-5)
    with monkeypatch.context() as m:
        m.setenv(native.ENV_VAR, "0")
        assert not factor.apart(1)


def test_rounding_is_priced_in_full_along_the_value_and_as_noise_across_it():
    value = torch.tensor([1.0, 2.0, 0.0, 0.0])
    along, across = 0.1 * value, torch.tensor([0.0, 0.0, 0.3, 0.4])
    assert rounding_error(along, value, 0.01) == pytest.approx(float(along.square().sum()))
    assert rounding_error(across, value, 0.01) == pytest.approx(0.01 * 0.25)


def test_column_weights_follow_the_delta_s_column_energy():
    delta = torch.ones(4, 3) * torch.tensor([1.0, 1.0, 2.0])
    weights = column_weights(delta)
    assert weights.tolist() == pytest.approx([0.5, 0.5, 2.0])
    assert column_weights(torch.zeros(4, 3)) is None and column_weights(torch.ones(5)) is None


def test_the_hybrid_error_estimate_is_what_its_encoding_measures():
    delta = structured()
    svd = truncated_svd(delta, min(delta.shape))
    options = {o.spec: o for o in hybrid_options("w", delta, svd, 7, noise_weight=1.0)}
    for spec in [("sum", 4, 0.9, 8), ("sum", 4, 0.95, 8)]:
        encoding, stored = hybrid_encode("w", delta, svd, 7, *spec[1:])
        measured = float((encoding.decode(stored, (96, 80), "w", torch.float32) - delta).double().square().sum())
        assert options[spec].error == pytest.approx(measured, rel=0.01)  # all priced in full at weight 1
        assert options[spec].bits >= 8 * sum(t.numel() * t.element_size() for t in stored.values())


def test_the_low_rank_part_decodes_as_a_reader_decodes_it():
    delta = structured()
    encoding, stored, low = low_rank_part(delta, truncated_svd(delta, 16), 4)
    assert torch.equal(low, encoding.decode(stored, (96, 80), "", torch.float32))


def test_the_budget_plans_a_hybrid_for_a_few_strong_directions_over_noise():
    torch.manual_seed(0)
    base = torch.randn(256, 256)
    delta = (torch.randn(256, 3) @ torch.randn(3, 256) * 0.05 + torch.randn(256, 256) * 0.05) * 1e-2
    context = TensorContext("w", base=base)
    for bits in (0.25, 0.5):
        method = get_method("budget", bits=bits)
        method.prepare(lambda: iter([("w", delta, context)]), None)
        assert method._choices["w"].spec[0] == "sum", bits
    off = get_method("budget", bits=0.25, noise_weight="off")  # no DARE: no hybrid either
    off.prepare(lambda: iter([("w", delta, context)]), None)
    assert off._choices["w"].spec[0] != "sum"


def test_a_compressed_hybrid_loads_as_the_plan_says(tmp_path):
    base = tiny_llama(hidden=256, layers=1)
    ft = tiny_llama(hidden=256, layers=1)
    ft.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                rows, cols = p.shape
                top = torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g)
                p.add_((top * 0.05 + torch.randn(rows, cols, generator=g) * 0.05) * p.abs().mean() * 0.05)
    out = tmp_path / "delta"
    delta_format.compress(save(base, tmp_path / "base"), save(ft, tmp_path / "ft"), out, bits=0.25, progress=False)
    reader = DeltaReader(out)
    sums = [name for name in reader if reader.entry(name).encoding.name == "sum"]
    assert sums, "structured matrix deltas at a small budget should get hybrids"
    loaded = delta_format.DeltaModel.from_pretrained(out).state_dict()
    for name in sums:
        entry = reader.entry(name)
        want = reconstruct_stored(
            name, [(entry, reader.stored(name), 1.0)], base.state_dict()[name], dtype=torch.float32
        )
        assert torch.equal(loaded[name], want)
        moved = float((want - base.state_dict()[name]).norm())
        error = float((want - ft.state_dict()[name]).norm())
        assert error < moved  # closer to the fine-tune than the base is


def test_decoding_leaves_the_stored_tensors_untouched():
    encoding = SumEncoding([DenseEncoding(), DenseEncoding()])
    first, second = torch.ones(3, 2), torch.full((3, 2), 0.5)
    stored = encoding.join([{"delta": first}, {"delta": second}])
    assert torch.equal(encoding.decode(stored, (3, 2), "w", torch.float32), torch.full((3, 2), 1.5))
    assert torch.equal(first, torch.ones(3, 2))  # a dense part decodes to its own stored tensor
