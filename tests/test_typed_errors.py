"""Bad input is a `DeltaFormatError` from the API and one clear line with exit status 1 from the
CLI, never another exception or a traceback (issue 16, class 9)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import delta_format
from delta_format import DeltaFormatError, DeltaModel, attach_deltas
from delta_format.cli import main
from delta_format.io.delta import Delta
from delta_format.loaders.apply import apply_delta
from tests.crafting import edit_manifest
from tests.test_outputs import pair  # noqa: F401  (the fixture)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BAD_CALLS = {
    "device_map nonsense": lambda r: DeltaModel.from_pretrained(r / "delta", device_map="nonsense"),
    "alpha x": lambda r: DeltaModel.from_pretrained(r / "delta", alpha="x"),
    "weights 5": lambda r: DeltaModel.from_pretrained(r / "delta", weights=5),
    "delta 5": lambda r: DeltaModel.from_pretrained(5),
    "max_shard_size None": lambda r: delta_format.compress(r / "base", r / "ft", r / "o", max_shard_size=None),
    "max_shard_size float": lambda r: delta_format.compress(r / "base", r / "ft", r / "o", max_shard_size=1.5),
    "include 5": lambda r: delta_format.compress(r / "base", r / "ft", r / "o", include=5),
    "attach a list": lambda r: attach_deltas(__import__("tests.models").models.tiny_llama(), [r / "delta"]),
    "apply alpha x": lambda r: apply_delta(r / "delta", r / "o", alpha="x"),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_arguments_are_delta_format_errors(pair, call):  # noqa: F811
    with pytest.raises(DeltaFormatError):
        call(pair)


def crafted(pair, tmp_path, change):  # noqa: F811
    out = tmp_path / "crafted"
    shutil.copytree(pair / "delta", out)
    edit_manifest(out, change)
    return out


def surrogate_method(raw_dir):
    path = raw_dir / "delta_config.json"
    path.write_text(path.read_text().replace('"name": "sign"', '"name": "\\ud800"'))


HOSTILE_MANIFESTS = {
    "non-numeric stats": lambda m: m.__setitem__("stats", {"rel_error": "x", "compression_ratio": [1]}),
    "invalid repo id": lambda m: m["base"].update(repo_id="../../x", revision="0" * 40),
    "5000-digit integer": lambda m: m["stats"].update(big=10**4000),
}


@pytest.mark.parametrize("change", HOSTILE_MANIFESTS.values(), ids=HOSTILE_MANIFESTS.keys())
def test_hostile_manifests_are_one_line_from_inspect_and_typed_from_save_pretrained(pair, tmp_path, capsys, change):  # noqa: F811
    import sys

    sys.set_int_max_str_digits(0)  # let json.dumps write the 5000-digit integer
    try:
        directory = crafted(pair, tmp_path, change)
    finally:
        sys.set_int_max_str_digits(4300)
    assert main(["inspect", str(directory)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(DeltaFormatError):
        Delta(directory).save_pretrained(tmp_path / "copy")


def test_a_lone_surrogate_in_the_method_name_is_refused(pair, tmp_path, capsys):  # noqa: F811
    directory = tmp_path / "crafted"
    shutil.copytree(pair / "delta", directory)
    surrogate_method(directory)
    assert main(["inspect", str(directory)]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(DeltaFormatError):
        Delta(directory)


def test_an_index_nested_200000_levels_deep_is_one_line_from_verify(pair, tmp_path, capsys):  # noqa: F811
    directory = tmp_path / "nested"
    delta_format.compress(pair / "base", pair / "ft", directory, method="sign", progress=False, max_shard_size=2_000)
    (directory / "delta.safetensors.index.json").write_bytes(
        b'{"weight_map": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    )
    manifest = json.loads((directory / "delta_config.json").read_text())
    manifest["files"].pop("delta.safetensors.index.json")
    (directory / "delta_config.json").write_text(json.dumps(manifest))
    assert main(["verify", str(directory)]) == 1
    assert "nested too deeply" in capsys.readouterr().out


def test_an_unexpected_exception_in_the_cli_is_one_line(monkeypatch, capsys, tmp_path):
    def boom(args):
        raise AttributeError("something internal")

    monkeypatch.setattr("delta_format.cli.commands.run_inspect", boom)
    import delta_format.cli.parser as parser

    monkeypatch.setattr(parser, "run_inspect", boom, raising=False)
    os.makedirs(tmp_path / "x")
    status = main(["inspect", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and "Traceback" not in err
