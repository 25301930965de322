"""The test vectors of `spec/vectors/` (SPEC §1-§9): the library and a reference written from the
spec text (`tests/spec_reference.py`) both decode every vector to its ``expected.safetensors``,
bit for bit; every manifest follows `spec/manifest.schema.json`; the seeded-mask known answers
hold for the library and the reference."""

from __future__ import annotations

import copy
import filecmp
import importlib.util
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from delta_format.core import seeded_mask
from delta_format.core.fingerprint import fingerprint_safetensors
from delta_format.core.manifest import Manifest, spec_version_string
from delta_format.core.reconstruct import reconstruct_stored
from delta_format.errors import CorruptDeltaError, DeltaFormatError
from delta_format.io.reader import DeltaReader
from tests import spec_reference as ref

SPEC = Path(__file__).resolve().parents[1] / "spec"
VECTORS = SPEC / "vectors"
VECTOR_NAMES = sorted(p.name for p in VECTORS.iterdir() if (p / "delta_config.json").is_file())
KNOWN = json.loads((VECTORS / "seeded_mask.json").read_text(encoding="utf-8"))
SCHEMA = json.loads((SPEC / "manifest.schema.json").read_text())
INT_VIEW = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def manifest_of(name: str) -> dict:
    return json.loads((VECTORS / name / "delta_config.json").read_text(encoding="utf-8"))


def test_every_encoding_and_index_coding_has_a_vector():
    assert VECTOR_NAMES == sorted(
        [
            "dense",
            "sparse-gaps",
            "sparse-bitmask",
            "sparse-seeded",
            "sign-tensor",
            "sign-row",
            "sign-row-q",
            "lowrank",
            "replace",
            "sharded",
            "bitdiff",
            "dense-q",
            "sparse-q",
            "lowrank-q",
            "sum",
            "rounding",
            "rounding-window",
            "rows-q",
            "grown",
        ]
    )


def test_vectors_stay_small():
    total = sum(p.stat().st_size for p in VECTORS.rglob("*") if p.is_file())
    assert total < 200_000


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_library_reconstructs_expected_bit_for_bit(name):
    directory = VECTORS / name
    base = load_file(directory / "base.safetensors")
    expected = load_file(directory / "expected.safetensors")
    with DeltaReader(directory) as reader:
        assert set(reader.manifest.tensors) <= set(expected)
        for param, want in expected.items():
            if param in reader.manifest.tensors:
                got = reconstruct_stored(
                    param, [(reader.entry(param), reader.stored(param), 1.0)], base.get(param), dtype=want.dtype
                )
            else:
                got = base[param]  # SPEC §9: absent parameters are the base's
            assert got.dtype == want.dtype and got.shape == want.shape, param
            assert torch.equal(bits(got), bits(want)), param


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_reference_decoder_reconstructs_expected_bit_for_bit(name):
    directory = VECTORS / name
    manifest, stored = ref.read_delta(directory)
    base = {k: ref.to_array(*v) for k, v in ref.read_safetensors(directory / "base.safetensors").items()}
    expected = ref.read_safetensors(directory / "expected.safetensors")
    implied = {f"{p}:{role}" for p in manifest["tensors"] for role in roles(manifest["tensors"][p])}
    assert set(stored) == implied  # SPEC §4: exactly the stored tensors the manifest implies
    for param, (dtype, shape, raw) in expected.items():
        want = ref.to_array(dtype, shape, raw)
        entry = manifest["tensors"].get(param)
        if entry is None:
            got = base[param]
        else:
            mine = {key.split(":")[-1]: ref.to_array(*v) for key, v in stored.items() if key.rsplit(":", 1)[0] == param}
            got = ref.reconstruct(entry, ref.decode(entry, mine, param, base.get(param)), base.get(param), param)
        assert got.shape == want.shape, param
        assert np.array_equal(
            got.view(np.uint32 if got.dtype == np.float32 else np.uint64),
            want.astype(got.dtype).view(np.uint32 if got.dtype == np.float32 else np.uint64),
        ), param


def roles(entry: dict) -> list[str]:
    """SPEC §4.1, from the table."""
    encoding, config = entry["encoding"], entry.get("config", {})
    if encoding == "sum":
        return [f"{i}.{role}" for i, part in enumerate(config["parts"]) for role in roles(part)]
    if encoding in ("sparse", "sparse-q"):
        values = ["values"] if encoding == "sparse" else ["codes", "scales"]
        return values + {"gaps": ["gaps"], "bitmask": ["mask"], "seeded": []}[config["index_coding"]]
    if encoding == "sign" and "scale_bits" in config:  # 1.7: coded row scales
        return ["bits", "scale_codes", "scale_scales"]
    return {
        "dense": ["delta"],
        "sign": ["bits", "scale"],
        "lowrank": ["u", "v"],
        "replace": ["value"],
        "bitdiff": ["planes", "frames"],
        "dense-q": ["codes", "scales"],
        "lowrank-q": ["codes", "scales"],
        "rows-q": ["rows", "codes", "scales"],
    }[encoding]


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_manifest_fingerprint_is_the_base_files_fingerprint(name):
    base_file = VECTORS / name / "base.safetensors"
    recorded = manifest_of(name)["base"]["fingerprint"]
    assert ref.fingerprint([base_file]) == recorded
    assert fingerprint_safetensors([base_file]) == recorded


def test_sharded_vector_has_several_shards_an_index_and_no_single_file():
    directory = VECTORS / "sharded"
    index = json.loads((directory / "delta.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"delta-{k:05d}-of-00005.safetensors" for k in range(1, 6)]
    assert not (directory / "delta.safetensors").exists()
    side_files = ["1_Pooling/config.json", "config.json", "delta.safetensors.index.json"]
    assert sorted(manifest_of("sharded")["files"]) == sorted([*shards, *side_files])


def test_every_vector_is_written_at_the_current_spec_version():
    assert {manifest_of(name)["spec_version"] for name in VECTOR_NAMES} == {spec_version_string()}


MUST_REFUSE = json.loads((VECTORS / "bitdiff_must_refuse.json").read_text(encoding="utf-8"))["cases"]


def _refused_stored(case: dict) -> dict[str, np.ndarray]:
    return {
        "planes": np.frombuffer(bytes.fromhex(case["planes_hex"]), dtype=np.uint8),
        "frames": np.array(case["frames"], dtype=np.int64).reshape(-1, 2),
    }


@pytest.mark.parametrize("case", MUST_REFUSE, ids=[c["why"] for c in MUST_REFUSE])
def test_library_refuses_the_bitdiff_corruptions(case):
    with DeltaReader(VECTORS / "bitdiff") as reader:
        entry = reader.entry("bf16-10")
    base = load_file(VECTORS / "bitdiff" / "base.safetensors")["bf16-10"]
    stored = {role: torch.from_numpy(a.copy()) for role, a in _refused_stored(case).items()}
    with pytest.raises(CorruptDeltaError):
        reconstruct_stored("bf16-10", [(entry, stored, 1.0)], base, dtype=torch.bfloat16)


@pytest.mark.parametrize("case", MUST_REFUSE, ids=[c["why"] for c in MUST_REFUSE])
def test_reference_decoder_refuses_the_bitdiff_corruptions(case):
    entry = manifest_of("bitdiff")["tensors"]["bf16-10"]
    base = ref.to_array(*ref.read_safetensors(VECTORS / "bitdiff" / "base.safetensors")["bf16-10"])
    with pytest.raises(ref.Refused):
        ref.decode(entry, _refused_stored(case), "bf16-10", base)


def test_vectors_regenerate_to_the_same_bytes(tmp_path):
    spec = importlib.util.spec_from_file_location("generate_vectors", VECTORS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for committed in sorted(p for p in VECTORS.rglob("*") if p.is_file() and p.suffix != ".py"):
        fresh = tmp_path / committed.relative_to(VECTORS)
        if committed.name == "delta_config.json":  # created_by names the package version
            a, b = json.loads(committed.read_text()), json.loads(fresh.read_text())
            a.pop("created_by"), b.pop("created_by")
            assert a == b, committed
        else:
            assert filecmp.cmp(committed, fresh, shallow=False), committed


# ---------------------------------------------------------------------------------------------
# spec/manifest.schema.json
# ---------------------------------------------------------------------------------------------


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_vector_manifest_validates_against_the_schema(name):
    jsonschema.Draft202012Validator(SCHEMA).validate(manifest_of(name))


def _set(path: str, value):
    def mutate(m):
        *parents, last = path.split("/")
        node = m
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


_DELETE = object()

INVALID = {
    "wrong format": ("dense", _set("format", "safetensors")),
    "malformed version": ("dense", _set("spec_version", "1")),
    "leading zero version": ("dense", _set("spec_version", "1.01")),
    "no files": ("dense", _set("files", _DELETE)),
    "no tensors": ("dense", _set("tensors", _DELETE)),
    "bad file hash": ("dense", _set("files/delta.safetensors/sha256", "abc")),
    "revision not a commit": ("dense", _set("base/revision", "main")),
    "unknown fingerprint algorithm": ("dense", _set("base/fingerprint/algorithm", "md5")),
    "method without name": ("dense", _set("method/name", _DELETE)),
    "unknown encoding": ("dense", _set("tensors/w/encoding", "rle")),
    "unknown dtype": ("dense", _set("tensors/w/dtype", "int8")),
    "negative dimension": ("dense", _set("tensors/w/shape", [-1, 6])),
    "nine dimensions": ("dense", _set("tensors/w/shape", [1] * 9)),
    "alpha not a number": ("dense", _set("tensors/w/alpha", "2")),
    "dense config field": ("dense", _set("tensors/w/config", {"scale": 2})),
    "stored_bytes negative": ("dense", _set("tensors/w/stats", {"stored_bytes": -1})),
    "unknown index coding": ("sparse-gaps", _set("tensors/w/config/index_coding", "rle")),
    "seed on gaps coding": ("sparse-gaps", _set("tensors/w/config/seed", 3)),
    "seeded without seed": ("sparse-seeded", _set("tensors/w/config/seed", _DELETE)),
    "seed of 2**64": ("sparse-seeded", _set("tensors/w/config/seed", 2**64)),
    "negative seed": ("sparse-seeded", _set("tensors/w/config/seed", -1)),
    "p of 1": ("sparse-seeded", _set("tensors/w/config/p", 1.0)),
    "sign scale granularity": ("sign-row", _set("tensors/w/config/scale", "column")),
    "sign without config": ("sign-row", _set("tensors/w/config", _DELETE)),
    "row scale on a vector": ("sign-row", _set("tensors/w/shape", [66])),
    "rank zero": ("lowrank", _set("tensors/w/config/rank", 0)),
    "rank as a string": ("lowrank", _set("tensors/w/config/rank", "3")),
    "lowrank on a vector": ("lowrank", _set("tensors/w/shape", [120])),
    "negative base_rows": ("grown", _set("tensors/t/config/base_rows", -1)),
    "base_rows as a string": ("grown", _set("tensors/t/config/base_rows", "5")),
    "base_rows on a sum part": ("grown", _set("tensors/e/config/parts/0/config", {"base_rows": 6})),
    "base_rows on replace": ("replace", _set("tensors/embed/config", {"base_rows": 1})),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_schema_and_library_both_refuse(case):
    name, mutate = INVALID[case]
    manifest = copy.deepcopy(manifest_of(name))
    mutate(manifest)
    assert not jsonschema.Draft202012Validator(SCHEMA).is_valid(manifest)
    with pytest.raises(DeltaFormatError):
        Manifest.from_dict(manifest)


VALID = {
    "newer minor version": ("dense", _set("spec_version", "1.7")),
    "unknown top-level field": ("dense", _set("signature", {"alg": "none"})),
    "unknown entry field": ("dense", _set("tensors/w/note", "from 1.3")),
    "pinned hub base": ("dense", _set("base/revision", "0123456789abcdef0123456789abcdef01234567")),
    "no fingerprint": ("dense", _set("base/fingerprint", None)),
    "alpha omitted": ("dense", _set("tensors/w/alpha", _DELETE)),
    "dense config omitted": ("dense", _set("tensors/w/config", _DELETE)),
    "scale omitted": ("sparse-gaps", _set("tensors/w/config/scale", _DELETE)),
    "largest seed": ("sparse-seeded", _set("tensors/w/config/seed", 2**64 - 1)),
}


@pytest.mark.parametrize("case", sorted(VALID))
def test_schema_and_library_both_accept(case):
    name, mutate = VALID[case]
    manifest = copy.deepcopy(manifest_of(name))
    mutate(manifest)
    jsonschema.Draft202012Validator(SCHEMA).validate(manifest)
    Manifest.from_dict(manifest)


# ---------------------------------------------------------------------------------------------
# Seeded-mask known answers (SPEC §6).
# ---------------------------------------------------------------------------------------------


def test_lowbias32_known_answers():
    for case in KNOWN["lowbias32"]:
        assert ref.mix32(case["x"]) == case["lowbias32"]
        assert seeded_mask._mix32_int(case["x"]) == case["lowbias32"]
        x = torch.tensor([case["x"]], dtype=torch.int64)
        assert int(seeded_mask._mix32_(x, torch.empty_like(x))) == case["lowbias32"]


def test_stream_known_answers_include_counters_past_2_to_32():
    assert any(case["k"] >= 2**32 for case in KNOWN["stream"])
    for case in KNOWN["stream"]:
        assert ref.u(case["key"], case["k"]) == case["u"]
        assert int(seeded_mask.uniform_stream(case["key"], case["k"], 1)[0]) == case["u"]


def test_key_threshold_and_table_known_answers():
    for case in KNOWN["masks"]:
        assert ref.tensor_id(case["name"]) == seeded_mask.tensor_id(case["name"]) == case["tensor_id"]
        assert (
            ref.stream_key(case["seed"], case["name"])
            == seeded_mask.stream_key(case["seed"], case["name"])
            == case["key"]
        )
        assert ref.drop_threshold(case["p"]) == seeded_mask.drop_threshold(case["p"]) == case["P"]
        table = ref.gap_table(case["p"])
        assert len(table) == len(seeded_mask.gap_table(case["p"])) == case["gap_table_length"]
        assert table[:4] == case["gap_table_head"]
        gaps = [sum(1 for t in table if t > ref.u(case["key"], k)) for k in range(8)]
        assert gaps == seeded_mask.gaps(case["p"], case["key"], 0, 8).tolist() == case["gaps_head"]


def test_kept_positions_known_answers_include_seeds_past_2_to_32():
    assert any(case["seed"] >= 2**32 for case in KNOWN["masks"])
    for case in KNOWN["masks"]:
        args = case["numel"], case["p"], case["seed"], case["name"]
        assert ref.kept_positions(*args) == case["kept"], args
        assert seeded_mask.kept_positions(*args).tolist() == case["kept"], args
