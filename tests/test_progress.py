"""Progress bars and quiet: huggingface_hub's bars, silenced the way the Hub's are; no prints."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

import delta_format
from delta_format.loaders.apply import apply_delta, verify_delta
from tests.models import CALIBRATION_TEXTS, byte_tokenizer, save, structured_perturbation, tiny_llama


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress-pair")
    base = tiny_llama()
    save(base, root / "base")
    save(structured_perturbation(base, 0.05), root / "ft", tokenizer=byte_tokenizer())
    return root


def run_every_long_step(pair, out):
    delta = delta_format.compress(
        pair / "base", pair / "ft", out / "d", method="sign", calibration_texts=CALIBRATION_TEXTS
    )
    delta_format.DeltaModel.from_pretrained(delta.directory)
    apply_delta(delta.directory, out / "full", progress=True)
    verify_delta(delta.directory)


def test_every_long_step_shows_a_progress_bar_and_prints_nothing(pair, tmp_path, capsys):
    run_every_long_step(pair, tmp_path)
    out, err = capsys.readouterr()
    assert out == ""
    for step in ("compressing", "calibrating", "loading", "applying", "verifying"):
        assert step in err


def test_hf_hub_disable_progress_bars_silences_every_bar(pair, tmp_path):
    """The environment variable, read at import as huggingface_hub and transformers read it: a
    fresh process that runs every long step writes nothing to stdout or stderr."""
    script = (
        "import sys; from pathlib import Path; from tests.test_progress import run_every_long_step; "
        "run_every_long_step(Path(sys.argv[1]), Path(sys.argv[2]))"
    )
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(pair), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (done.stdout, done.stderr) == ("", "")


def test_this_packages_bars_can_be_silenced_alone(pair, tmp_path, capsys):
    disable_progress_bars("delta_format")
    try:
        delta = delta_format.compress(pair / "base", pair / "ft", tmp_path / "d", method="sign")
        apply_delta(delta.directory, tmp_path / "full", progress=True)
    finally:
        enable_progress_bars("delta_format")
    assert capsys.readouterr() == ("", "")


def test_the_library_reports_through_logging(pair, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="delta_format"):
        delta_format.compress(pair / "base", pair / "ft", tmp_path / "d", method="sign", progress=False)
    assert any(r.name.startswith("delta_format.") and "wrote sign delta" in r.getMessage() for r in caplog.records)
