"""What a data-free compression fits to the fine-tune's outputs on (the budget's refined factors,
`delta_format.methods.refine`): the built-in text of `probe_texts`, read by the fine-tune's
tokenizer, or random token ids where there is no tokenizer that reads it."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .calibration import Calibration, tokenized
from .probe_texts import PROBE_TEXTS
from .sensitivity import PROBE_LENGTH, PROBE_SEQUENCES, probe_length, random_tokens
from .sources import CheckpointSource, TensorSource

logger = logging.getLogger(__name__)

BUILT_IN_TEXT = "built-in text"
"""What a refinement's report (``stats.prepare.budget.refined.on``) says for `PROBE_TEXTS`."""

PROBE_MAX_TOKENS = 2 * PROBE_SEQUENCES * PROBE_LENGTH
"""Tokens of built-in text at most: its 64 passages are ~3,000 tokens for WordPiece or BPE
vocabularies; a character-level one would read ~9,000."""

PROBE_MIN_DISTINCT = 32
"""Distinct token ids the built-in text must give at least: fewer means a tokenizer without a real
vocabulary (transformers builds one from a bare ``config.json``: every word its unknown token)."""


def probe_batches(model: nn.Module, tokenizer: Any) -> tuple[list[torch.Tensor], str]:
    """What a compression without calibration texts runs the fine-tune on, and what that is: the
    built-in text (each passage its own sequence of at most `sensitivity.probe_length` tokens,
    `PROBE_MAX_TOKENS` in all) read by ``tokenizer``, `BUILT_IN_TEXT`; else, where there is no
    tokenizer, it fails, or what it gives is no text for this model (`_unreadable`),
    `sensitivity.random_tokens` (said in the log)."""
    if tokenizer is not None:
        try:
            batches = tokenized(PROBE_TEXTS, tokenizer, probe_length(model), PROBE_MAX_TOKENS)
        except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as error:
            why = f"{type(error).__name__}: {error}"
        else:
            vocab = model.get_input_embeddings().num_embeddings
            why = _unreadable(batches, vocab, getattr(tokenizer, "unk_token_id", None))
        if why is None:
            return batches, BUILT_IN_TEXT
        logger.info("the tokenizer does not read the built-in text (%s): random token ids instead", why)
    return random_tokens(model), "random tokens"


def _unreadable(batches: list[torch.Tensor], vocab: int, unknown: Any) -> str | None:
    """Why the tokenized built-in text is no probe for this model, None if it is one."""
    if not batches or any(ids.dim() != 2 for ids in batches):
        return "no token ids"
    ids = torch.cat([b.reshape(-1) for b in batches])
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        return f"ids up to {int(ids.max())} for the model's {vocab} embeddings"
    distinct = int(ids.unique().numel())
    if distinct < PROBE_MIN_DISTINCT:
        return f"{distinct} distinct ids, fewer than {PROBE_MIN_DISTINCT}: a tokenizer without a vocabulary"
    if isinstance(unknown, int) and float((ids == unknown).float().mean()) > 0.25:
        return "more than a quarter of it is the unknown token"
    return None


def source_tokenizer(finetune: TensorSource) -> Any:
    """The fine-tune's own tokenizer, None where it has none or transformers cannot load it."""
    try:
        return finetune.tokenizer()
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError, RuntimeError) as error:
        logger.info("no tokenizer beside the fine-tune (%s: %s)", type(error).__name__, error)
        return None


class DataFreeProbe:
    """A calibration session on `probe_batches` (the built-in text read by ``tokenizer``, default
    the fine-tune's own; random token ids without one), for what a data-free compression may fit
    to the fine-tune's outputs (the budget's refinement, `delta_format.methods.refine`): built on
    first use, so a compression that needs none never loads the model. On the built-in text the
    factors gained as much as on 16 of a fine-tune's own calibration texts (MiniLM 0.2 bit: 0.9840
    → 0.9883; benchmarks/RESULTS.md, "Built-in probe text"). A language model is fitted only on
    text: its next-token distributions on random tokens are not what it does on text (fitting them
    cost the trained tiny Llama 25.6 → 15.5 % at 0.2 bit, the built-in text gained → 56.8 %); so
    without a tokenizer a language model, like one transformers cannot load or run, gives a
    session with no parameters (nothing is refined; said in the log). It records no layer inputs,
    gradients or sensitivities. ``source`` says what it ran on."""

    def __init__(self, finetune: TensorSource, progress: bool = False, tokenizer: Any = None):
        self.finetune, self.progress, self.tokenizer, self._session = finetune, progress, tokenizer, None
        self.source = "nothing"

    def session(self) -> Calibration | None:
        if self._session is None:
            self._session = False
            try:
                model = self.finetune.load_model()
                names = self.finetune.model_names(model) if isinstance(self.finetune, CheckpointSource) else {}
                tokenizer = self.tokenizer if self.tokenizer is not None else source_tokenizer(self.finetune)
                batches, self.source = probe_batches(model, tokenizer)
                session = Calibration(
                    model, None, (), parameters=(), sensitivity=False, progress=self.progress, batches=batches
                )
                if session.loss is None or self.source == BUILT_IN_TEXT:
                    self._session = session.renamed(names) if names else session
                else:
                    logger.info("a language model is fitted to its outputs on text only, not on random tokens")
            except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as error:
                logger.warning(
                    "nothing fitted to the outputs (the model could not be run: %s: %s)", type(error).__name__, error
                )
        return self._session or None

    def parameter(self, name: str) -> torch.Tensor | None:
        session = self.session()
        return None if session is None else session.parameter(name)

    def __getattr__(self, name: str) -> Any:  # the rest of the session, once it exists
        if name.startswith("_"):
            raise AttributeError(name)
        session = self.session()
        if session is None:
            raise AttributeError(name)
        return getattr(session, name)


__all__ = ["BUILT_IN_TEXT", "DataFreeProbe", "probe_batches"]
