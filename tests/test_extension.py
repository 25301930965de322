"""Extending delta-format: an encoding and an edit method defined only here, in the test, work
through every layer (compress, load, the command line, the model card, on-the-fly adapters)
without a change to any other file. The registries are what make that true: subclassing
`Encoding` or `EditMethod` with a name is the whole registration.

The toy encoding ``halved`` stores ``delta / 2`` under one role and decodes it times 2 (exact in
binary floating point), and has an on-the-fly factor; the toy method ``toy`` stores
``gain * delta`` with it and declares ``gain`` as a parameter, so the command line grows a
``--gain`` flag."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard

import delta_format
from delta_format import DeltaModel, InvalidArgumentError
from delta_format.cli import main
from delta_format.core.dtypes import FLOAT_STORED
from delta_format.core.encodings import ENCODING_CLASSES, Encoding, Expected, Factor
from delta_format.core.encodings.base import check_config_keys, require_finite, scaled
from delta_format.core.reconstruct import reconstruct
from delta_format.io.delta import Delta
from delta_format.io.reader import DeltaReader
from delta_format.loaders.onthefly import MERGE_MIN_TOKENS, attach_deltas, using_delta
from delta_format.methods import METHODS, Edit, EditMethod, param
from tests.models import save, state_dict_on_disk, structured_perturbation, tiny_llama

IDS = torch.arange(2 * MERGE_MIN_TOKENS).remainder(200).view(2, MERGE_MIN_TOKENS)
RELATIVE_BOUND = 1e-5
"""On-the-fly logits vs the materialised fine-tune's, max |difference| / max |logit| (the bound
of tests/test_onthefly.py: another rounding order where the delta is multiplied separately)."""


class HalvedFactor(Factor):
    """``alpha * delta`` of a matrix held as its half; every use doubles it (exact)."""

    def __init__(self, half: torch.Tensor):
        self.half = half
        self.rows, self.cols = half.shape

    def product(self, x):
        return F.linear(x, self.half).mul_(2)

    def merged(self, weight):
        return torch.add(weight, self.half, alpha=2)

    def gather(self, ids):
        return F.embedding(ids, self.half).mul_(2)

    def tensors(self):
        return [self.half]


@pytest.fixture(scope="module")
def toy():
    """Registers the toy encoding and method for this module's tests, and removes them after."""

    class HalvedEncoding(Encoding, name="halved"):
        HALF = "half"

        @classmethod
        def from_dict(cls, config):
            check_config_keys(cls.name, config, set(), set())
            return cls()

        def to_dict(self):
            return {}

        def expected(self, shape):
            return {self.HALF: Expected(FLOAT_STORED, tuple(shape))}

        def encode(self, delta, *, name="", dtype=None, **given):
            return {self.HALF: (delta / 2).to(dtype or delta.dtype).contiguous()}

        def decode(self, stored, shape, name, dtype):
            require_finite(name, self.HALF, stored[self.HALF])
            return stored[self.HALF].to(dtype) * 2

        def factor(self, stored, shape, name, dtype, alpha=1.0, *, compute=torch.float32):
            require_finite(name, self.HALF, stored[self.HALF])
            return HalvedFactor(scaled(stored[self.HALF].to(compute), alpha).to(dtype))

        def label(self):
            return f"{self.name}(/2)"

    @dataclass
    class ToyMethod(EditMethod, name="toy"):
        summary = "the delta times a gain, halved"
        tags = ("toy-tag",)
        gain: float = param(1.0, help="multiply the delta by this before storing it")

        def edit(self, name, delta, context):
            encoding = HalvedEncoding()
            stored = encoding.encode(delta * self.gain, name=name, dtype=context.value_dtype)
            return Edit(encoding, stored, {"gain": self.gain})

    yield HalvedEncoding, ToyMethod
    del ENCODING_CLASSES["halved"], METHODS["toy"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("extension")
    base = tiny_llama()
    return save(base, root / "base"), save(structured_perturbation(base, 0.05, seed=3), root / "ft")


@pytest.fixture(scope="module")
def toy_delta(toy, pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy-delta") / "d"
    # float32 values: the toy's halving and doubling are then exact (the default stores 16 bits)
    return delta_format.compress(pair[0], pair[1], out, "toy", value_dtype="float32", progress=False).directory


def test_a_method_defined_in_a_test_compresses_with_its_encoding(toy, toy_delta, pair):
    manifest = DeltaReader(toy_delta).manifest
    assert manifest.method == "toy"
    assert {entry.encoding.name for entry in manifest.tensors.values()} == {"halved"}
    base, ft = state_dict_on_disk(pair[0]), state_dict_on_disk(pair[1])
    with DeltaReader(toy_delta) as reader:
        for name in manifest.tensors:
            assert torch.equal(reader.decode(name), ft[name] - base[name])  # halving and doubling are exact


def test_delta_model_loads_the_toy_encoding_exactly(toy, toy_delta, pair):
    model = DeltaModel.from_pretrained(toy_delta)
    base = state_dict_on_disk(pair[0])
    state = model.state_dict()
    with DeltaReader(toy_delta) as reader:
        for name, entry in reader.manifest.tensors.items():
            assert torch.equal(state[name], reconstruct(name, entry, reader.decode(name), base[name]))


def test_the_command_line_offers_the_method_its_flag_and_the_encodings_label(toy, pair, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    compress_help = " ".join(capsys.readouterr().out.split())
    assert "toy (the delta times a gain, halved)" in compress_help
    assert "--gain" in compress_help and "[toy]" in compress_help
    out = tmp_path / "d"
    assert (
        main(
            [
                "compress",
                str(pair[0]),
                str(pair[1]),
                str(out),
                "--no-progress",
                "--method",
                "toy",
                "--gain",
                "0.5",
                "--rule",
                "*norm*=dense",
            ]
        )
        == 0
    )
    manifest = DeltaReader(out).manifest
    assert manifest.method_params["gain"] == 0.5
    assert manifest.tensors["model.layers.0.mlp.up_proj.weight"].stats["gain"] == 0.5
    assert manifest.tensors["model.norm.weight"].encoding.name == "dense"
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "halved(/2)" in capsys.readouterr().out


def test_the_model_card_carries_the_methods_tags(toy, toy_delta):
    data = ModelCard(Delta(toy_delta).model_card()).data.to_dict()
    assert data["tags"] == ["delta-format", "delta-format:toy", "toy-tag"]
    assert set(data["delta_format"]["encodings"]) == {"halved"}


@pytest.mark.parametrize("ids", [IDS, IDS[:1, :3]], ids=["merged", "few-tokens"])
def test_the_toy_encoding_applies_on_the_fly(toy, toy_delta, pair, ids):
    from transformers import AutoModelForCausalLM

    served = AutoModelForCausalLM.from_pretrained(pair[0])
    with torch.no_grad():
        reference = DeltaModel.from_pretrained(toy_delta)(input_ids=ids).logits
        base_gap = float((served(input_ids=ids).logits - reference).abs().max())
        attach_deltas(served, {"toy": toy_delta})
        with using_delta(served, "toy"):
            got = served(input_ids=ids).logits
    assert isinstance(served.model.layers[0].mlp.up_proj.factors["toy"], HalvedFactor)
    scale = float(reference.abs().max())
    assert float((got - reference).abs().max()) <= RELATIVE_BOUND * scale
    assert base_gap >= 1e3 * RELATIVE_BOUND * scale  # the bound tells fine-tune from base


def test_a_registered_name_cannot_be_taken_again(toy):
    with pytest.raises(InvalidArgumentError, match="already registered"):

        class Again(Encoding, name="halved"):
            pass

    with pytest.raises(InvalidArgumentError, match="already registered"):

        class AgainMethod(EditMethod, name="toy"):
            pass

    assert ENCODING_CLASSES["halved"] is toy[0] and METHODS["toy"] is toy[1]
