"""Best of several seeds (`delta_format.compression.trials`): ``compress(..., seed_trials=K)``
compresses with seeds ``seed`` ... ``seed + K - 1``, publishes the one whose model has the lowest
loss on the calibration texts, and records every trial; wrong uses are refused before any work."""

from __future__ import annotations

import pytest
import torch

import delta_format
from delta_format.errors import InvalidArgumentError, OutputExistsError
from delta_format.io.reader import DeltaReader
from tests.models import CALIBRATION_TEXTS, byte_tokenizer, finetune_by_training, save, tiny_llama


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("trials")
    base = tiny_llama()
    ft = finetune_by_training(base, steps=20, lr=1e-3)
    return save(base, root / "base"), save(ft, root / "ft", tokenizer=byte_tokenizer())


def _compress(pair, out, **kwargs):
    return delta_format.compress(
        *pair, out, method="dare", p=0.9, calibration_texts=CALIBRATION_TEXTS, progress=False, **kwargs
    )


def test_the_published_delta_is_the_trial_with_the_lowest_calibration_loss(pair, tmp_path):
    best = _compress(pair, tmp_path / "best", seed=5, seed_trials=3)
    trials = best.manifest.stats["seed_trials"]
    assert [t["seed"] for t in trials] == [5, 6, 7]
    chosen = min(trials, key=lambda t: t["output_loss"])
    assert best.manifest.method_params["seed"] == chosen["seed"]
    assert best.manifest.stats["output_loss"] == chosen["output_loss"]
    # each trial is the delta compress writes with that seed alone, bit for bit
    alone = _compress(pair, tmp_path / "alone", seed=chosen["seed"])
    assert alone.manifest.stats["output_loss"] == chosen["output_loss"]
    with DeltaReader(best.directory) as a, DeltaReader(alone.directory) as b:
        for name in a.manifest.tensors:
            for role, tensor in a.stored(name).items():
                assert torch.equal(tensor, b.stored(name)[role]), (name, role)
    assert "seed_trials" not in alone.manifest.stats
    assert len({t["output_loss"] for t in trials}) == 3  # the seeds did give different deltas
    card = (best.directory / "README.md").read_text()
    assert best.directory.name in card and "seed-" not in card  # the card names the published delta
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the other trials are gone


def test_wrong_uses_are_refused_before_any_work(pair, tmp_path):
    for bad in (0, -1, 1.5, True, 65):
        with pytest.raises(InvalidArgumentError, match="seed_trials"):
            _compress(pair, tmp_path / "bad", seed_trials=bad)
    with pytest.raises(InvalidArgumentError, match="calibration texts"):
        delta_format.compress(*pair, tmp_path / "bad", method="dare", p=0.9, seed_trials=2, progress=False)
    with pytest.raises(InvalidArgumentError, match="largest seed"):
        _compress(pair, tmp_path / "bad", seed=2**64 - 1, seed_trials=2)
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError):
        _compress(pair, tmp_path / "taken", seed_trials=2)
    assert not (tmp_path / "bad").exists() and list((tmp_path / "taken").iterdir()) == []


def test_the_cli_passes_seed_trials_through(pair, tmp_path):
    from delta_format.cli import main

    texts = tmp_path / "texts.txt"
    texts.write_text("\n\n".join(CALIBRATION_TEXTS))
    out = tmp_path / "d"
    argv = ["compress", *map(str, pair), str(out), "--no-progress", "--method", "dare", "--seed-trials", "2"]
    assert main([*argv, "--calibration-file", str(texts)]) == 0
    assert [t["seed"] for t in delta_format.Delta(out).manifest.stats["seed_trials"]] == [0, 1]
