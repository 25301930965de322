"""Best of several seeds: the same compression with K seeds of its random edits (DARE's masks),
keeping the delta whose model does best on the calibration texts.

At a small budget a delta's behaviour varies from seed to seed more than any per-tensor measure
tells: on SmolLM2-135M at 0.2 bit per weight, four seeds kept 96.0-97.5 % of the fine-tune's
perplexity gain on held-out text, and no group of parameters alone carried the spread (the
head's error meets the body's). The calibration texts' next-token loss ranked the four deltas as
the held-out figure did (benchmarks/RESULTS.md); the output KL to the fine-tune did not. So a
trial is scored by ``stats.output_loss`` (the edited model's loss on the calibration texts), or,
for a bare encoder, by ``stats.output_cosine`` (its sentence embeddings against the fine-tune's).
Every trial is a whole compression, so K trials cost K times the time (and K times the
calibration); only the winner is published, its manifest recording every trial (SPEC §3.6).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..core.constants import MANIFEST_NAME, MODEL_CARD_NAME
from ..errors import InvalidArgumentError
from ..io.card import render_model_card
from ..io.delta import Delta
from ..io.staging import StagingDirectory, output_guard

MAX_SEED_TRIALS = 64
"""More trials than this is a mistake, not a search."""


def check_seed_trials(seed_trials: Any, seed: int, calibration_texts: Sequence[str] | None) -> int:
    """``seed_trials``: an integer in [1, `MAX_SEED_TRIALS`]; more than one needs calibration texts
    to score the trials and room for ``seed + seed_trials - 1`` below 2**64."""
    if isinstance(seed_trials, bool) or not isinstance(seed_trials, int) or not 1 <= seed_trials <= MAX_SEED_TRIALS:
        raise InvalidArgumentError(
            "invalid seed_trials", expected=f"an integer in [1, {MAX_SEED_TRIALS}]", found=repr(seed_trials)[:100]
        )
    if seed_trials > 1 and not calibration_texts:
        raise InvalidArgumentError(
            "seed_trials needs calibration texts",
            expected="calibration_texts=[...] to score each seed's delta on",
            found="no calibration texts",
            fix="pass calibration_texts, or leave seed_trials=1",
        )
    if isinstance(seed, int) and not isinstance(seed, bool) and seed + seed_trials > 2**64:
        raise InvalidArgumentError(
            "seed_trials runs past the largest seed",
            expected=f"seed + seed_trials <= 2**64 (seeds {seed} ... {seed + seed_trials - 1})",
            found=f"seed={seed}, seed_trials={seed_trials}",
        )
    return seed_trials


def trial_score(stats: dict[str, Any]) -> tuple[str, float]:
    """The measure a trial is judged by and its value, lower better: the calibration loss, or
    minus the embedding cosine for a model without a language-modelling loss."""
    if stats.get("output_loss") is not None:
        return "output_loss", float(stats["output_loss"])
    if stats.get("output_cosine") is not None:
        return "output_cosine", -float(stats["output_cosine"])
    raise InvalidArgumentError(
        "seed_trials cannot score this model",
        expected="a model with a language-modelling loss or a bare encoder (sentence embeddings)",
        found="neither measure in the calibration stats",
        fix="leave seed_trials=1",
    )


def best_of_seeds(
    compress_one: Callable[[int, Path], Delta],
    out_dir: str | os.PathLike,
    seed: int,
    trials: int,
    overwrite: bool,
    inputs: Sequence[Any],
) -> Delta:
    """``compress_one(seed + k, directory)`` for k < ``trials``, each into a hidden sibling of
    ``out_dir``; the best-scored delta (`trial_score`; the first on a tie) is published at
    ``out_dir`` (atomically, as any delta), its ``stats.seed_trials`` listing every trial."""
    local = [p for p in inputs if isinstance(p, (str, os.PathLike)) and Path(p).exists()]
    staging = StagingDirectory(out_dir, overwrite, inputs=local)  # refuses a taken path before any work
    try:
        with tempfile.TemporaryDirectory(prefix=f".{staging.out_dir.name}.trials-", dir=staging.out_dir.parent) as tmp:
            record, best = [], None
            for k in range(trials):
                directory = Path(tmp) / f"seed-{seed + k}"
                stats = compress_one(seed + k, directory).manifest.stats
                key, score = trial_score(stats)
                record.append({"seed": seed + k, key: stats[key]})
                if best is None or score < best[0]:
                    best = (score, directory)
            chosen = Delta(best[1], verify_checksums=False).manifest
            chosen.stats = {**chosen.stats, "seed_trials": record}
            with output_guard(staging.out_dir):
                (best[1] / MANIFEST_NAME).write_text(chosen.to_json())
                card = render_model_card(chosen, name=staging.out_dir.name)
                (best[1] / MODEL_CARD_NAME).write_text(card, encoding="utf-8")
                os.rmdir(staging.path)
                shutil.move(str(best[1]), staging.path)
        staging.publish()
    except BaseException:
        staging.discard()
        raise
    return Delta(staging.out_dir, verify_checksums=False)
