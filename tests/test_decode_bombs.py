"""A few bytes of sparse or low-rank data can declare a terabyte tensor: every path checks the
declared shape against the base (or, with none, a documented budget) before it allocates anything
(SPEC §8.7)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from delta_format import BaseMismatchError, CorruptDeltaError
from delta_format.core.encodings import SparseEncoding
from delta_format.core.manifest import BaseReference, TensorEntry
from delta_format.io.reader import DeltaReader
from delta_format.io.writer import DeltaWriter
from delta_format.loaders.apply import apply_delta, verify_delta

HUGE = (1 << 17, 1 << 17)  # 2**34 elements: 64 GiB in float32


@pytest.fixture
def sparse_bomb(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_file({"w": torch.zeros(4, 4)}, str(base / "model.safetensors"))
    gaps = SparseEncoding("gaps")
    with DeltaWriter(tmp_path / "bomb", base=BaseReference(local_path=str(base)), method="x") as w:
        w.add(
            "w",
            TensorEntry(gaps, HUGE, "float32"),
            {"values": torch.ones(1), "gaps": torch.zeros(1, dtype=torch.uint8)},
        )
    assert sum(p.stat().st_size for p in (tmp_path / "bomb").iterdir()) < 2048
    return tmp_path


pytestmark = pytest.mark.filterwarnings("ignore:the delta records no base fingerprint")


def test_verify_checks_shapes_against_the_base_before_decoding(sparse_bomb):
    report = verify_delta(sparse_bomb / "bomb", base_model=sparse_bomb / "base")
    assert not report.ok
    assert any("another shape" in line for line in report.lines)
    assert any(line.startswith("skip  decode") for line in report.lines)


def test_verify_without_a_base_refuses_shapes_over_the_budget(sparse_bomb):
    (sparse_bomb / "base" / "model.safetensors").unlink()  # the manifest's base cannot be found
    report = verify_delta(sparse_bomb / "bomb")
    assert not report.ok
    assert any("without a base" in line for line in report.lines)


def test_apply_refuses_a_shape_that_misfits_the_base_before_decoding(sparse_bomb, tmp_path):
    with pytest.raises(BaseMismatchError):
        apply_delta(sparse_bomb / "bomb", tmp_path / "out", base_model=sparse_bomb / "base")
    assert not (tmp_path / "out").exists()


def test_decode_refuses_a_declared_shape_over_the_budget(sparse_bomb):
    with DeltaReader(sparse_bomb / "bomb") as reader:
        with pytest.raises(CorruptDeltaError, match="without a base"):
            reader.decode("w")
