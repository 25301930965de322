"""The ``delta-format`` command line, through ``main([...])`` and one real subprocess."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from delta_format.cli import build_parser, main
from delta_format.io.reader import DeltaReader
from tests.models import CALIBRATION_TEXTS, byte_tokenizer, finetune_by_training, save, state_dict_on_disk, tiny_llama


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = tiny_llama()
    ft = finetune_by_training(base, steps=10, lr=1e-3)
    tokenizer = byte_tokenizer()
    return save(base, root / "base", tokenizer), save(ft, root / "ft", tokenizer)


def run(*argv: str) -> int:
    return main([str(a) for a in argv])


def compress(pair, out, *flags) -> int:
    return run("compress", pair[0], pair[1], out, "--no-progress", *flags)


def test_help_runs_as_a_module_in_a_subprocess():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "delta_format.cli", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for command in ("compress", "inspect", "apply", "verify", "push"):
        assert command in result.stdout


def test_every_option_of_every_command_is_explained():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.dest} has no help"


def test_compress_writes_a_delta_and_reports_it(pair, tmp_path, capsys):
    assert compress(pair, tmp_path / "d", "--method", "dare", "--p", "0.9", "--seed", "7", "--alpha", "1.2") == 0
    manifest = DeltaReader(tmp_path / "d").manifest
    assert manifest.method == "dare" and manifest.method_params["seed"] == 7
    assert {e.alpha for e in manifest.tensors.values()} == {1.2}
    assert "compression against the fine-tune" in capsys.readouterr().out


def test_compress_rules_include_and_exclude_flags(pair, tmp_path):
    assert (
        compress(
            pair,
            tmp_path / "d",
            "--method",
            "sign",
            "--scale",
            "row",
            "--rule",
            "*norm*=dense",
            "--rule",
            "*mlp*=lowrank",
            "--rank",
            "2",
            "--exclude",
            "lm_head*",
            "--include",
            "model.*",
        )
        == 0
    )
    tensors = DeltaReader(tmp_path / "d").manifest.tensors
    assert "lm_head.weight" not in tensors
    assert tensors["model.norm.weight"].stats["method"] == "dense"
    assert tensors["model.layers.0.mlp.up_proj.weight"].encoding.name == "lowrank"
    assert tensors["model.layers.0.self_attn.q_proj.weight"].encoding.to_dict() == {
        "scale": "row",
        "scale_bits": 8,
        "scale_group": 64,
    }


def test_compress_with_a_calibration_file_chooses_q_and_measures_the_output(pair, tmp_path):
    texts = tmp_path / "calibration.txt"
    texts.write_text("\n\n".join(CALIBRATION_TEXTS) + "\n")
    assert (
        compress(pair, tmp_path / "d", "--method", "darex", "--p", "0.9", "--q", "auto", "--calibration-file", texts)
        == 0
    )
    manifest = DeltaReader(tmp_path / "d").manifest
    assert manifest.stats["calibration_texts"] == len(CALIBRATION_TEXTS)
    assert "output_error" in manifest.stats
    assert manifest.tensors["model.layers.0.mlp.up_proj.weight"].stats["q_source"].startswith("output norm")


def test_inspect_prints_one_row_per_tensor_and_the_totals(pair, tmp_path, capsys):
    compress(pair, tmp_path / "d", "--method", "sign", "--scale", "row")
    capsys.readouterr()
    assert run("inspect", tmp_path / "d") == 0
    out = capsys.readouterr().out
    manifest = DeltaReader(tmp_path / "d").manifest
    for name in manifest.tensors:
        assert name in out
    assert "sign(row, 8-bit scales)" in out and "rel.err" in out and "total" in out and "compression" in out


def test_apply_writes_a_checkpoint_that_transformers_loads(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    compress(pair, tmp_path / "d", "--method", "dense")
    assert run("apply", tmp_path / "d", tmp_path / "full", "--dtype", "bfloat16") == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    expected = state_dict_on_disk(pair[1])
    for name, param in model.state_dict().items():
        assert param.dtype == torch.bfloat16
        assert torch.equal(param, expected[name].to(torch.bfloat16))


def test_apply_refuses_an_existing_output_without_overwrite(pair, tmp_path, capsys):
    compress(pair, tmp_path / "d", "--method", "sign")
    (tmp_path / "full").mkdir()
    assert run("apply", tmp_path / "d", tmp_path / "full") == 1
    assert capsys.readouterr().err.startswith("error: the output path already exists")
    assert run("apply", tmp_path / "d", tmp_path / "full", "--overwrite") == 0


def test_apply_against_the_wrong_base_fails_before_writing(pair, tmp_path, capsys):
    compress(pair, tmp_path / "d", "--method", "sign")
    assert run("apply", tmp_path / "d", tmp_path / "full", "--base", pair[1]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the base model") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "full").exists()


def test_verify_passes_with_the_recorded_base(pair, tmp_path, capsys):
    compress(pair, tmp_path / "d", "--method", "dare", "--p", "0.9")
    assert run("verify", tmp_path / "d") == 0
    out = capsys.readouterr().out
    assert "has the recorded fingerprint" in out and out.rstrip().endswith("verified")


def test_verify_fails_with_another_base(pair, tmp_path, capsys):
    compress(pair, tmp_path / "d", "--method", "dare", "--p", "0.9")
    assert run("verify", tmp_path / "d", "--base", pair[1]) == 1
    assert "FAIL  base" in capsys.readouterr().out


def test_verify_fails_on_a_corrupted_shard(pair, tmp_path, capsys):
    compress(pair, tmp_path / "d", "--method", "sign")
    shard = tmp_path / "d" / "delta.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert run("verify", tmp_path / "d") == 1
    assert "checksum" in capsys.readouterr().out


def test_verify_skips_a_base_it_cannot_find(pair, tmp_path, capsys):
    import shutil

    base_copy = tmp_path / "base-copy"
    shutil.copytree(pair[0], base_copy)
    compress((base_copy, pair[1]), tmp_path / "d", "--method", "sign")
    shutil.rmtree(base_copy)
    assert run("verify", tmp_path / "d") == 0
    assert "skip  base" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "no/such/dir/x", "also-missing", "out"], "error: base model"),
        (["inspect", "/nonexistent/delta"], "error: delta"),
    ],
)
def test_bad_input_is_one_error_line_and_status_1(argv, message, capsys, tmp_path):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_a_parameter_the_method_does_not_take_is_an_error(pair, tmp_path, capsys):
    assert compress(pair, tmp_path / "d", "--method", "dare", "--scale", "row") == 1
    assert "['scale'] is not a parameter of dare" in capsys.readouterr().err


def test_malformed_rules_and_q_are_usage_errors(pair, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        compress(pair, tmp_path / "d", "--rule", "*norm*")
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        compress(pair, tmp_path / "d", "--method", "darex", "--q", "sometimes")


def test_push_hands_the_delta_to_delta_push_to_hub(pair, tmp_path, monkeypatch, capsys):
    from delta_format.io.delta import Delta

    calls = []
    monkeypatch.setattr(
        Delta,
        "push_to_hub",
        lambda self, repo_id, **kw: calls.append((self.directory, repo_id, kw)) or "https://hub/commit/abc",
    )
    compress(pair, tmp_path / "d", "--method", "sign")
    assert run("push", tmp_path / "d", "user/ft-delta", "--private", "--token", "t0k", "--commit-message", "hi") == 0
    ((directory, repo_id, kwargs),) = calls
    assert directory == tmp_path / "d" and repo_id == "user/ft-delta"
    assert kwargs == {"private": True, "token": "t0k", "revision": None, "commit_message": "hi", "create_pr": False}
    assert "https://hub/commit/abc" in capsys.readouterr().out
