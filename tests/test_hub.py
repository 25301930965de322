"""The Hub, for real: publish and load deltas through the local Hub server on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from delta_format import BaseMismatchError, DeltaModel, ResolutionError
from delta_format.core.manifest import spec_version_string
from delta_format.io.delta import Delta
from tests.test_loader import LLAMA, dense, perturbed, sign_or_dense, write_delta

pytestmark = pytest.mark.hub
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-models")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA))
    base.save_pretrained(root / "base")
    for i in range(3):
        perturbed(base, 0.05, seed=i).save_pretrained(root / f"ft{i}")
    return root


def push_base(hub, folder, private=False):
    repo = hub.repo_id("base")
    hub.api.create_repo(repo, private=private)
    sha = hub.api.upload_folder(repo_id=repo, folder_path=folder).oid
    return repo, sha


def publish(hub, models, tmp_path, ft="ft0", encode=dense, private=False, base=None):
    base_repo, base_sha = base or push_base(hub, models / "base")
    out = write_delta(
        tmp_path / f"delta-{ft}", models / "base", models / ft, encode, repo_id=base_repo, revision=base_sha
    )
    delta_repo = hub.repo_id("ft-delta")
    Delta(out).push_to_hub(delta_repo, private=private, token=hub.token)
    return base_repo, base_sha, delta_repo


def assert_same_weights(model, reference):
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_load_from_the_hub_resolves_the_pinned_base_on_an_empty_cache(hub, models, tmp_path):
    _, base_sha, delta_repo = publish(hub, models, tmp_path)
    hub.fresh_cache()
    model = DeltaModel.from_pretrained(delta_repo)
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(models / "ft0"))
    assert model.name_or_path == delta_repo
    assert model.delta_swapper.base.commit_sha == base_sha


def test_revision_loads_an_earlier_version_of_the_delta(hub, models, tmp_path):
    base = push_base(hub, models / "base")
    _, _, repo = publish(hub, models, tmp_path / "a", ft="ft0", base=base)
    first = hub.api.model_info(repo).sha
    Delta(
        write_delta(tmp_path / "second", models / "base", models / "ft1", dense, repo_id=base[0], revision=base[1])
    ).push_to_hub(repo, token=hub.token)
    assert hub.api.model_info(repo).sha != first
    assert_same_weights(DeltaModel.from_pretrained(repo), AutoModelForCausalLM.from_pretrained(models / "ft1"))
    assert_same_weights(
        DeltaModel.from_pretrained(repo, revision=first), AutoModelForCausalLM.from_pretrained(models / "ft0")
    )


def test_private_repo_needs_its_token(hub, models, tmp_path):
    base = push_base(hub, models / "base", private=True)
    _, _, repo = publish(hub, models, tmp_path, private=True, base=base)
    with pytest.raises(ResolutionError, match="token"):
        DeltaModel.from_pretrained(repo)
    with pytest.raises(ResolutionError):
        DeltaModel.from_pretrained(repo, token=hub.other_token)
    model = DeltaModel.from_pretrained(repo, token=hub.token)
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(models / "ft0"))


def test_offline_load_uses_the_cache_with_the_server_stopped(hub, models, tmp_path):
    _, _, repo = publish(hub, models, tmp_path)
    online = DeltaModel.from_pretrained(repo)
    hub.server.stop()
    assert_same_weights(DeltaModel.from_pretrained(repo, local_files_only=True), online)
    hub.go_offline()
    assert_same_weights(DeltaModel.from_pretrained(repo), online)


def test_offline_without_a_cached_copy_says_so(hub, models, tmp_path):
    _, _, repo = publish(hub, models, tmp_path)
    hub.fresh_cache()
    with pytest.raises(ResolutionError, match="not in the local cache"):
        DeltaModel.from_pretrained(repo, local_files_only=True)


def test_base_that_moved_on_is_still_loaded_at_the_pinned_commit(hub, models, tmp_path):
    base_repo, base_sha, repo = publish(hub, models, tmp_path)
    hub.api.upload_folder(repo_id=base_repo, folder_path=models / "ft2", commit_message="new base weights")
    assert hub.api.model_info(base_repo).sha != base_sha
    assert_same_weights(DeltaModel.from_pretrained(repo), AutoModelForCausalLM.from_pretrained(models / "ft0"))
    with pytest.raises(BaseMismatchError, match="other weights"):
        DeltaModel.from_pretrained(repo, base_revision="main")


def test_published_model_card_carries_the_spec_metadata(hub, models, tmp_path):
    base_repo, base_sha, repo = publish(hub, models, tmp_path, encode=sign_or_dense)
    card = ModelCard.load(repo)
    data = card.data.to_dict()
    assert data["base_model"] == base_repo
    assert data["base_model_relation"] == "adapter"
    assert data["library_name"] == "delta-format"
    assert "delta-format" in data["tags"]
    meta = data["delta_format"]
    assert meta["spec_version"] == spec_version_string() and meta["base_revision"] == base_sha
    shapes = [
        AutoModelForCausalLM.from_pretrained(models / "ft0").state_dict()[n].dim()
        for n in Delta(tmp_path / "delta-ft0").manifest.tensors
    ]
    assert meta["encodings"] == {"sign": shapes.count(2), "dense": shapes.count(1)}
    assert f'DeltaModel.from_pretrained("{repo}"' in card.text
    jsonschema.validate(data, json.loads((ROOT / "spec" / "model_card.schema.json").read_text()))


def test_example_runs_the_whole_story_against_the_local_hub(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/publish_and_load.py", "--hub", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dare-0.9" in result.stdout and "sign-row" in result.stdout and "user/tiny-ft-sign-row" in result.stdout


LOAD_AND_PRINT = """
import sys, torch
from delta_format import DeltaModel
model = DeltaModel.from_pretrained(sys.argv[1])
print(float(sum(p.detach().double().sum() for p in model.parameters())))
"""


def test_two_processes_loading_the_same_delta_into_one_cache_both_succeed(hub, models, tmp_path):
    _, _, repo = publish(hub, models, tmp_path)
    hub.fresh_cache()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD_AND_PRINT, repo],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    expected = float(
        sum(p.detach().double().sum() for p in AutoModelForCausalLM.from_pretrained(models / "ft0").parameters())
    )
    assert [float(out.strip().splitlines()[-1]) for out, _ in results] == [expected, expected]


def _attach(repo, tmp_path, models, **hub):
    from delta_format import attach_deltas

    attach_deltas(AutoModelForCausalLM.from_pretrained(models / "base"), {"d": repo}, **hub)


def _verify(repo, tmp_path, models, **hub):
    from delta_format.loaders.apply import verify_delta

    report = verify_delta(repo, **hub)
    assert report.ok, report.lines


def _apply(repo, tmp_path, models, **hub):
    from delta_format.loaders.apply import apply_delta

    apply_delta(repo, tmp_path / "full", **hub)


def _on_the_fly(repo, tmp_path, models, **hub):
    from delta_format import load_on_the_fly

    load_on_the_fly({"d": repo}, **hub)


ENTRY_POINTS = {  # entry point -> (call, how many repos it fetches: the delta, and the base unless given a model)
    "from_pretrained": (lambda repo, tmp_path, models, **hub: DeltaModel.from_pretrained(repo, **hub), 2),
    "swap_delta": (lambda repo, tmp_path, models, **hub: DeltaModel.from_pretrained(repo, **hub).swap_delta(repo), 2),
    "load_on_the_fly": (_on_the_fly, 2),
    "attach_deltas": (_attach, 1),
    "apply_delta": (_apply, 2),
    "verify_delta": (_verify, 2),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_honours_the_token_and_the_cache_directory(hub, models, tmp_path, entry):
    base = push_base(hub, models / "base", private=True)
    _, _, repo = publish(hub, models, tmp_path, private=True, base=base)
    call, repos = ENTRY_POINTS[entry]
    call(repo, tmp_path, models, token=hub.token, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("models--*"))) == repos
