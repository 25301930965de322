"""The materialised cache: a repeat load maps the weights a first load computed, bit for bit, and
never uses an entry that is corrupt, truncated or stale."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import delta_format
from delta_format import DeltaModel
from delta_format.loaders import materialize as materialize_module
from delta_format.loaders.materialized_cache import CACHE_ENV, LIMIT_ENV, RECORD, WEIGHTS
from delta_format.loaders.model_storage import ModelStorage
from tests.models import save, structured_perturbation, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A bf16 base, a fine-tune, and a sign delta and a DARE delta of it."""
    root = tmp_path_factory.mktemp("cache-pair")
    base = tiny_llama(0, dtype=torch.bfloat16)
    save(base, root / "base")
    save(structured_perturbation(base, 0.05, seed=1), root / "ft")
    delta_format.compress(root / "base", root / "ft", root / "sign", method="sign", scale="row", progress=False)
    delta_format.compress(root / "base", root / "ft", root / "dare", method="dare", p=0.5, seed=3, progress=False)
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "materialized"
    monkeypatch.setenv(CACHE_ENV, str(directory))
    monkeypatch.delenv(LIMIT_ENV, raising=False)
    return directory


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith(".")) if cache.is_dir() else []


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def computing_forbidden(monkeypatch):
    """Make any reconstruction fail: what loads now must come from the cache."""

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was computed")

    monkeypatch.setattr(materialize_module, "reconstruct_stored", refuse)


@pytest.mark.parametrize("method", ["sign", "dare"])
def test_a_cache_hit_is_bit_identical_to_a_fresh_load_and_computes_nothing(pair, cache, monkeypatch, method):
    fresh = state(DeltaModel.from_pretrained(pair / method, cache_materialized=False))
    assert entries(cache) == []
    first = state(DeltaModel.from_pretrained(pair / method))
    assert len(entries(cache)) == 1
    computing_forbidden(monkeypatch)
    hit = DeltaModel.from_pretrained(pair / method)
    assert_same(state(hit), fresh)
    assert_same(first, fresh)


def test_an_entry_is_an_ordinary_safetensors_checkpoint_of_the_fine_tune(pair, cache):
    model = DeltaModel.from_pretrained(pair / "sign")
    (entry,) = entries(cache)
    assert sorted(p.name for p in entry.iterdir()) == [RECORD, WEIGHTS]
    assert_same(load_file(entry / WEIGHTS), state(model))


def test_writes_to_a_loaded_model_never_reach_its_entry(pair, cache, monkeypatch):
    fresh = state(DeltaModel.from_pretrained(pair / "sign", cache_materialized=False))
    model = DeltaModel.from_pretrained(pair / "sign")
    model.swap_delta(pair / "dare")  # writes into the live parameters
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    computing_forbidden(monkeypatch)
    assert_same(state(DeltaModel.from_pretrained(pair / "sign")), fresh)


def corrupt_first_tensor(entry: Path) -> None:
    header_len = int.from_bytes((entry / WEIGHTS).read_bytes()[:8], "little")
    with open(entry / WEIGHTS, "r+b") as f:
        f.seek(8 + header_len)
        first = f.read(16)
        f.seek(8 + header_len)
        f.write(bytes(b ^ 0xFF for b in first))


def truncate(entry: Path) -> None:
    os.truncate(entry / WEIGHTS, (entry / WEIGHTS).stat().st_size - 64)


def make_stale(entry: Path) -> None:
    record = json.loads((entry / RECORD).read_text())
    record["key"]["package"] = "0.0.0"
    (entry / RECORD).write_text(json.dumps(record))


def drop_record(entry: Path) -> None:
    (entry / RECORD).unlink()


@pytest.mark.parametrize("damage", [corrupt_first_tensor, truncate, make_stale, drop_record])
def test_a_damaged_entry_is_detected_discarded_and_rebuilt(pair, cache, caplog, damage):
    fresh = state(DeltaModel.from_pretrained(pair / "dare", cache_materialized=False))
    DeltaModel.from_pretrained(pair / "dare")
    (entry,) = entries(cache)
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="delta_format"):
        rebuilt = DeltaModel.from_pretrained(pair / "dare")
    assert_same(state(rebuilt), fresh)
    assert "discarded" in caplog.text
    (entry,) = entries(cache)
    assert_same(load_file(entry / WEIGHTS), fresh)


def test_the_size_limit_evicts_the_least_recently_used_entries(pair, cache, monkeypatch):
    model = DeltaModel.from_pretrained(pair / "sign", alpha=1.0)
    entry_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setenv(LIMIT_ENV, str(int(2.5 * entry_bytes)))  # room for two entries
    (first,) = entries(cache)
    DeltaModel.from_pretrained(pair / "sign", alpha=0.5)
    os.utime(first / RECORD, (1, 1))  # the alpha=1 entry becomes the least recently used ...
    DeltaModel.from_pretrained(pair / "sign", alpha=1.0)  # ... until this hit uses it again
    DeltaModel.from_pretrained(pair / "sign", alpha=0.25)  # a third entry: the alpha=0.5 one goes
    kept = entries(cache)
    assert len(kept) == 2 and first in kept
    assert sum((e / WEIGHTS).stat().st_size for e in kept) <= 2.5 * entry_bytes


def test_an_entry_larger_than_the_limit_is_not_written(pair, cache, monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "1kB")
    DeltaModel.from_pretrained(pair / "sign")
    assert entries(cache) == []


def test_two_processes_filling_one_entry_at_once_both_succeed(pair, cache):
    script = (
        "import sys, torch; from delta_format import DeltaModel\n"
        "m = DeltaModel.from_pretrained(sys.argv[1])\n"
        "print(sum(float(p.double().sum()) for p in m.parameters()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), CACHE_ENV: str(cache), "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(pair / "dare")], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1]
    assert len(entries(cache)) == 1
    assert [p for p in cache.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_cache_materialized_false_writes_nothing(pair, cache):
    DeltaModel.from_pretrained(pair / "sign", cache_materialized=False)
    assert not cache.exists()


def test_the_environment_variable_turns_the_cache_off(pair, cache, monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    DeltaModel.from_pretrained(pair / "sign")
    assert not (tmp_path / "hf-home").exists() and not cache.exists()


def test_a_hit_still_checks_the_base(pair, cache, tmp_path):
    DeltaModel.from_pretrained(pair / "sign")
    other = tmp_path / "other-base"
    save(tiny_llama(5, dtype=torch.bfloat16), other)
    with pytest.raises(delta_format.BaseMismatchError):
        DeltaModel.from_pretrained(pair / "sign", base_model=other)


def test_a_miss_still_checks_the_delta_files(pair, cache, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(pair / "sign", broken)
    weights = broken / "delta.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(delta_format.CorruptDeltaError):
        DeltaModel.from_pretrained(broken)


def test_model_storage_gives_each_tensor_its_own_aligned_bytes():
    storage = ModelStorage({"a": (torch.bfloat16, (3,)), "b": (torch.float32, (4, 16)), "c": (torch.bfloat16, (64,))})
    views = {name: storage.view(name) for name in "abc"}
    for value, view in enumerate(views.values()):
        view.fill_(value)
    assert [float(v.float().mean()) for v in views.values()] == [0.0, 1.0, 2.0]
    assert views["b"].data_ptr() % 64 == 0 and views["c"].data_ptr() % 64 == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cache_hit_on_cuda_equals_the_cpu_load(pair, cache):
    cpu = state(DeltaModel.from_pretrained(pair / "sign"))
    gpu = DeltaModel.from_pretrained(pair / "sign", device_map="cuda")
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    assert_same({k: v.cpu() for k, v in gpu.state_dict().items()}, cpu)
