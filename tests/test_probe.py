"""The data-free probe (`compression.probe`): the built-in text read by the fine-tune's tokenizer,
random token ids where no tokenizer reads it."""

from __future__ import annotations

import pytest
import torch

from delta_format.compression import sensitivity
from delta_format.compression.probe import BUILT_IN_TEXT, PROBE_MAX_TOKENS, probe_batches
from tests.models import byte_tokenizer, tiny_llama


def test_without_texts_a_model_is_probed_on_the_built_in_text_its_tokenizer_reads():
    from delta_format.compression.probe_texts import PROBE_TEXTS

    model = tiny_llama()
    length = sensitivity.probe_length(model)
    batches, source = probe_batches(model, byte_tokenizer())
    assert source == BUILT_IN_TEXT
    assert 16 <= len(batches) <= len(PROBE_TEXTS)
    assert all(ids.shape[0] == 1 and 0 < ids.shape[1] <= length for ids in batches)
    assert sum(ids.numel() for ids in batches) <= PROBE_MAX_TOKENS
    tok = byte_tokenizer()
    assert torch.equal(
        batches[0], tok(PROBE_TEXTS[0], return_tensors="pt", truncation=True, max_length=length)["input_ids"]
    )


class _Fixed:
    """A stand-in tokenizer that gives the same ids for every text, or fails."""

    unk_token_id = 0

    def __init__(self, ids: list[int] | None):
        self.ids = ids

    def __call__(self, text, **kwargs):
        if self.ids is None:
            raise ValueError("cannot tokenize")
        return {"input_ids": torch.tensor([self.ids])}


@pytest.mark.parametrize(
    "tokenizer",
    [
        None,  # no tokenizer beside the fine-tune
        _Fixed(None),  # one that fails
        _Fixed(list(range(1, 40)) + [10_000]),  # ids past the model's vocabulary
        _Fixed([1, 2, 0, 0]),  # transformers' tokenizer built from a bare config: a few ids, mostly unknown
        _Fixed([0] * 30 + list(range(1, 40))),  # many ids, but nearly half the unknown token
    ],
)
def test_a_tokenizer_that_cannot_read_the_built_in_text_gives_random_tokens(tokenizer):
    model = tiny_llama()
    batches, source = probe_batches(model, tokenizer)
    assert source == "random tokens"
    length = sensitivity.probe_length(model)
    assert [ids.shape for ids in batches] == [(1, length)] * sensitivity.PROBE_SEQUENCES
    assert all(torch.equal(a, b) for a, b in zip(batches, sensitivity.random_tokens(model)))
