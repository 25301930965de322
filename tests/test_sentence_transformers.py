"""A sentence-transformers fine-tune, as its users publish it, through the delta and back: with the
real sentence-transformers package (the ``st`` extra)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import delta_format
from delta_format import DeltaModel
from delta_format.integrations.sentence_transformers import load_sentence_transformer
from delta_format.loaders.apply import apply_delta
from tests.models import CALIBRATION_TEXTS, perturb_checkpoint, tiny_sentence_transformer

sentence_transformers = pytest.importorskip("sentence_transformers", reason="the st extra is not installed")
SentenceTransformer = sentence_transformers.SentenceTransformer

MODULE_FILES = {
    "modules.json",
    "1_Pooling/config.json",
    "2_Normalize/config.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
"""What sentence-transformers needs beside the weights to load the model."""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(base, fine-tune): a tiny sentence-transformers model and a copy whose transformer moved,
    the fine-tune's card carrying a license and a dataset as published fine-tunes do."""
    root = tmp_path_factory.mktemp("st-pair")
    base = tiny_sentence_transformer(root / "base")
    ft = root / "ft"
    shutil.copytree(base, ft)
    perturb_checkpoint(ft, rel=0.05)
    card = tiny_sentence_transformer(root / "card", card={"license": "mit", "datasets": ["sentence-transformers/stsb"]})
    shutil.copyfile(card / "README.md", ft / "README.md")
    return base, ft


def embed(model, texts=CALIBRATION_TEXTS) -> torch.Tensor:
    return model.encode(list(texts), convert_to_tensor=True, batch_size=1).float()


def files_under(directory) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def test_the_delta_carries_every_file_sentence_transformers_needs_and_no_weights(pair, tmp_path):
    base, ft = pair
    delta = delta_format.compress(base, ft, tmp_path / "d", method="dense", progress=False)
    files = files_under(delta.directory)
    assert MODULE_FILES <= files
    assert "model.safetensors" not in files
    card = (delta.directory / "README.md").read_text()
    assert "This is a [sentence-transformers]" not in card and "library_name: delta-format" in card  # its own card


def test_apply_writes_a_directory_sentence_transformers_loads_as_the_fine_tune(pair, tmp_path):
    base, ft = pair
    delta = delta_format.compress(base, ft, tmp_path / "d", method="dense", progress=False)
    out = apply_delta(delta.directory, tmp_path / "full")
    assert MODULE_FILES <= files_under(out)
    assert torch.equal(embed(SentenceTransformer(str(out), device="cpu")), embed(SentenceTransformer(str(ft))))


def test_a_base_saved_with_a_stray_buffer_is_ignored_and_reported(pair, tmp_path):
    """An older transformers saved ``embeddings.position_ids`` (int64) as a persistent buffer; the
    fine-tune, saved by a newer one, lacks it. transformers ignores it on loading; so does the delta."""
    base, ft = pair
    old = tmp_path / "old-base"
    shutil.copytree(base, old)
    tensors = load_file(old / "model.safetensors")
    tensors["embeddings.position_ids"] = torch.arange(128).unsqueeze(0)
    save_file(tensors, old / "model.safetensors", metadata={"format": "pt"})

    delta = delta_format.compress(old, ft, tmp_path / "d", method="dense", progress=False)
    assert delta.manifest.stats["ignored_base_tensors"] == ["embeddings.position_ids"]
    reference = SentenceTransformer(str(ft), device="cpu")
    loaded = DeltaModel.from_pretrained(delta.directory)
    want = reference[0].auto_model.state_dict()
    assert all(torch.equal(loaded.state_dict()[n], want[n]) for n in want)
    assert "embeddings.position_ids" not in load_file(
        apply_delta(delta.directory, tmp_path / "full") / "model.safetensors"
    )


def test_a_lossless_delta_round_trips_through_the_hub_to_the_fine_tunes_embeddings(hub, pair, tmp_path):
    base, ft = pair
    base_repo = hub.repo_id("st-base")
    hub.api.create_repo(base_repo)
    hub.api.upload_folder(repo_id=base_repo, folder_path=base)
    delta = delta_format.compress(base_repo, ft, tmp_path / "d", method="dense", progress=False)
    repo = hub.repo_id("st-ft-delta")
    delta.push_to_hub(repo, token=hub.token)

    model = load_sentence_transformer(repo, device="cpu")
    assert torch.equal(embed(model), embed(SentenceTransformer(str(ft), device="cpu")))


def test_a_lossy_delta_loads_within_the_embedding_cosine_it_states(pair, tmp_path):
    """The compressor measures the mean embedding cosine to the fine-tune on the calibration texts
    (``stats.output_cosine``); the loaded model reproduces that figure, and it is what the card says."""
    base, ft = pair
    delta = delta_format.compress(
        base, ft, tmp_path / "d", method="sign", calibration_texts=CALIBRATION_TEXTS, progress=False
    )
    stated = delta.manifest.stats["output_cosine"]
    got = torch.nn.functional.cosine_similarity(
        embed(load_sentence_transformer(delta.directory, device="cpu")), embed(SentenceTransformer(str(ft)))
    )
    assert 0.5 < stated < 1.0
    assert float(got.mean()) == pytest.approx(stated, abs=1e-5)
    assert f"{stated:.6f}" in delta.model_card()
