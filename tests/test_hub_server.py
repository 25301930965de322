"""The test Hub server (tests/hubserver), exercised only through huggingface_hub's and transformers' public API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils.sha import git_hash

from tests.hubserver.fixture import REPO_ROOT, Hub

pytestmark = pytest.mark.hub


def _make_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


FILES_V1 = {"config.json": b'{"answer": 42}\n', "weights/part-0.bin": bytes(range(256)) * 8, "notes.txt": b"v1\n"}


def _create_and_upload(
    hub: Hub, tmp_path: Path, files: dict[str, bytes] = FILES_V1, **create_kwargs
) -> tuple[str, str]:
    """Create a repo, upload ``files`` in one commit and return ``(repo_id, commit sha)``."""
    repo_id = hub.api.create_repo(hub.repo_id(), **create_kwargs).repo_id
    folder = _make_folder(tmp_path / f"upload-{repo_id.split('/')[1]}", files)
    commit = hub.api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="add files")
    return repo_id, commit.oid


def test_whoami(hub: Hub):
    assert hub.api.whoami()["name"] == "user"
    assert HfApi(endpoint=hub.url, token=hub.other_token).whoami()["name"] == "someone"
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi(endpoint=hub.url, token="hf_not_a_valid_token").whoami()
    assert excinfo.value.response.status_code == 401


def test_create_repo(hub: Hub):
    repo_id = hub.repo_id()
    url = hub.api.create_repo(repo_id)
    assert url.repo_id == repo_id and url.startswith(hub.url)
    assert hub.api.create_repo(repo_id, exist_ok=True).repo_id == repo_id
    with pytest.raises(HfHubHTTPError) as excinfo:
        hub.api.create_repo(repo_id)
    assert excinfo.value.response.status_code == 409
    # As on the Hub, a new repository has an initial commit holding a .gitattributes file.
    assert hub.api.list_repo_files(repo_id) == [".gitattributes"]
    # Another user cannot create repositories in the user's namespace.
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi(endpoint=hub.url, token=hub.other_token).create_repo(hub.repo_id())
    assert excinfo.value.response.status_code == 403


def test_upload_folder_then_download(hub: Hub, tmp_path: Path):
    repo_id, sha = _create_and_upload(hub, tmp_path)
    assert len(sha) == 40

    snapshot = Path(snapshot_download(repo_id))  # module-level function: uses the patched default endpoint
    assert snapshot.name == sha
    for name, content in FILES_V1.items():
        assert (snapshot / name).read_bytes() == content
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == sorted(
        [".gitattributes", *FILES_V1]
    )

    hub.fresh_cache()
    path = Path(hf_hub_download(repo_id, "weights/part-0.bin"))
    assert path.read_bytes() == FILES_V1["weights/part-0.bin"]
    assert path.parent.parent.name == sha  # snapshots/<sha>/weights/part-0.bin


def test_old_revision_keeps_old_content(hub: Hub, tmp_path: Path):
    repo_id, first = _create_and_upload(hub, tmp_path)
    second = hub.api.upload_file(repo_id=repo_id, path_or_fileobj=b"v2\n", path_in_repo="notes.txt").oid
    third = hub.api.create_commit(
        repo_id,
        [CommitOperationDelete("weights/"), CommitOperationAdd("extra/new.txt", b"new\n")],
        commit_message="reshuffle",
    ).oid
    assert len({first, second, third}) == 3

    assert Path(hf_hub_download(repo_id, "notes.txt")).read_bytes() == b"v2\n"
    assert Path(hf_hub_download(repo_id, "notes.txt", revision=first)).read_bytes() == b"v1\n"
    assert Path(hf_hub_download(repo_id, "weights/part-0.bin", revision=second)).exists()
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "weights/part-0.bin")  # deleted on main
    assert sorted(hub.api.list_repo_files(repo_id)) == [".gitattributes", "config.json", "extra/new.txt", "notes.txt"]
    assert hub.api.model_info(repo_id, revision=first).sha == first
    assert hub.api.model_info(repo_id, revision=first[:10]).sha == first  # short sha

    commits = hub.api.list_repo_commits(repo_id)
    assert [c.commit_id for c in commits[:3]] == [third, second, first]
    assert commits[0].title == "reshuffle" and commits[-1].title == "initial commit"
    assert commits[0].authors == ["user"]


def test_unchanged_files_are_not_recommitted(hub: Hub, tmp_path: Path):
    repo_id, sha = _create_and_upload(hub, tmp_path)
    folder = _make_folder(tmp_path / "same", FILES_V1)
    assert hub.api.upload_folder(repo_id=repo_id, folder_path=folder).oid == sha  # preupload's oid => no-op


def test_parent_commit_is_enforced(hub: Hub, tmp_path: Path):
    repo_id, first = _create_and_upload(hub, tmp_path)
    second = hub.api.create_commit(
        repo_id, [CommitOperationAdd("a.txt", b"a")], commit_message="a", parent_commit=first
    ).oid
    with pytest.raises(HfHubHTTPError) as excinfo:
        hub.api.create_commit(repo_id, [CommitOperationAdd("b.txt", b"b")], commit_message="b", parent_commit=first)
    assert excinfo.value.response.status_code == 412
    assert hub.api.model_info(repo_id).sha == second


def test_refs_branches_and_tags(hub: Hub, tmp_path: Path):
    repo_id, first = _create_and_upload(hub, tmp_path)
    refs = hub.api.list_repo_refs(repo_id)
    assert [(b.name, b.ref, b.target_commit) for b in refs.branches] == [("main", "refs/heads/main", first)]
    assert refs.tags == [] and refs.converts == []

    hub.api.create_branch(repo_id, branch="feature/x", revision=first)  # a slash: sent URL-encoded as %2F
    with pytest.raises(HfHubHTTPError) as excinfo:
        hub.api.create_branch(repo_id, branch="feature/x")
    assert excinfo.value.response.status_code == 409
    hub.api.create_branch(repo_id, branch="feature/x", exist_ok=True)

    on_branch = hub.api.upload_file(
        repo_id=repo_id, path_or_fileobj=b"branch\n", path_in_repo="notes.txt", revision="feature/x"
    ).oid
    hub.api.create_tag(repo_id, tag="v1.0", revision=first)

    refs = hub.api.list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": first, "feature/x": on_branch}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1.0", first)]
    assert Path(hf_hub_download(repo_id, "notes.txt", revision="feature/x")).read_bytes() == b"branch\n"
    assert Path(hf_hub_download(repo_id, "notes.txt", revision="v1.0")).read_bytes() == b"v1\n"
    assert Path(hf_hub_download(repo_id, "notes.txt")).read_bytes() == b"v1\n"

    hub.api.delete_branch(repo_id, branch="feature/x")
    hub.api.delete_tag(repo_id, tag="v1.0")
    assert [b.name for b in hub.api.list_repo_refs(repo_id).branches] == ["main"]
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "notes.txt", revision="feature/x", force_download=True)


def test_missing_repo_revision_and_file(hub: Hub, tmp_path: Path):
    repo_id, _ = _create_and_upload(hub, tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "does-not-exist.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(hub.repo_id("missing"), "config.json")
    assert hub.api.file_exists(repo_id, "config.json")
    assert not hub.api.file_exists(repo_id, "nope.json")
    assert hub.api.repo_exists(repo_id) and not hub.api.repo_exists(hub.repo_id("missing"))
    assert hub.api.revision_exists(repo_id, "main") and not hub.api.revision_exists(repo_id, "nope")


def test_private_repo(hub: Hub, tmp_path: Path):
    repo_id, sha = _create_and_upload(hub, tmp_path, private=True)
    assert hub.api.model_info(repo_id).private is True

    with pytest.raises(RepositoryNotFoundError):  # anonymous (401 + RepoNotFound)
        hf_hub_download(repo_id, "config.json", token=False)
    with pytest.raises(RepositoryNotFoundError):  # somebody else's token (404 + RepoNotFound)
        hf_hub_download(repo_id, "config.json", token=hub.other_token)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=hub.other_token).model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(repo_id, token=False)

    assert Path(hf_hub_download(repo_id, "config.json", token=hub.token)).read_bytes() == FILES_V1["config.json"]
    hub.login()  # implicit token, from HF_TOKEN
    assert Path(snapshot_download(repo_id, revision=sha)).name == sha

    # Making it public opens it to everybody, still read-only for others.
    hub.api.update_repo_settings(repo_id, private=False)
    other = HfApi(endpoint=hub.url, token=hub.other_token)
    assert other.model_info(repo_id).sha == sha
    with pytest.raises(HfHubHTTPError) as excinfo:
        other.upload_file(repo_id=repo_id, path_or_fileobj=b"x", path_in_repo="x.txt")
    assert excinfo.value.response.status_code == 403


def test_offline_after_download(hub: Hub, tmp_path: Path):
    repo_id, sha = _create_and_upload(hub, tmp_path)
    cached = hf_hub_download(repo_id, "config.json")
    snapshot = snapshot_download(repo_id)

    hub.server.stop()
    try:
        assert hf_hub_download(repo_id, "config.json", local_files_only=True) == cached
        assert hf_hub_download(repo_id, "config.json") == cached  # server unreachable: falls back to the cache
        with pytest.raises(LocalEntryNotFoundError):
            hf_hub_download(repo_id, "notes.txt", revision="v-none", local_files_only=True)
        hub.go_offline()
        assert hf_hub_download(repo_id, "config.json") == cached
        assert snapshot_download(repo_id) == snapshot
        assert hf_hub_download(repo_id, "config.json", revision=sha) == cached
    finally:
        hub.server.start()

    hub.fresh_cache()
    with pytest.raises(LocalEntryNotFoundError):  # offline mode holds even with the server back
        hf_hub_download(repo_id, "config.json")


def test_server_survives_restart(hub: Hub, tmp_path: Path):
    repo_id, sha = _create_and_upload(hub, tmp_path)
    port = hub.server.port
    hub.server.stop()
    hub.server.start()
    assert hub.server.port == port
    assert hub.api.model_info(repo_id).sha == sha
    assert Path(hf_hub_download(repo_id, "notes.txt", revision=sha)).read_bytes() == b"v1\n"


def test_model_info_tree_and_paths_info(hub: Hub, tmp_path: Path):
    repo_id, sha = _create_and_upload(hub, tmp_path)
    info = hub.api.model_info(repo_id, files_metadata=True)
    assert info.id == repo_id and info.sha == sha and info.private is False and info.last_modified is not None
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {".gitattributes", *FILES_V1}
    for name, content in FILES_V1.items():
        assert siblings[name].size == len(content)
        assert siblings[name].blob_id == git_hash(content)
    assert hub.api.model_info(repo_id).siblings[0].size is None  # without files_metadata

    top = {e.path: type(e).__name__ for e in hub.api.list_repo_tree(repo_id)}
    assert top == {
        ".gitattributes": "RepoFile",
        "config.json": "RepoFile",
        "notes.txt": "RepoFile",
        "weights": "RepoFolder",
    }
    everything = {e.path for e in hub.api.list_repo_tree(repo_id, recursive=True, revision=sha)}
    assert everything == {".gitattributes", *FILES_V1, "weights"}
    assert [e.path for e in hub.api.list_repo_tree(repo_id, path_in_repo="weights")] == ["weights/part-0.bin"]
    with pytest.raises(EntryNotFoundError):
        list(hub.api.list_repo_tree(repo_id, path_in_repo="nope"))

    infos = hub.api.get_paths_info(repo_id, ["config.json", "weights", "missing"])
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFile", "config.json"), ("RepoFolder", "weights")]


def test_refuses_non_loopback_host(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "tests.hubserver", "--host", "0.0.0.0", "--storage", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "loopback" in result.stderr


# ---- transformers ---------------------------------------------------------------------------------------------------


def _tiny_gpt2(seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def _assert_same_weights(a, b) -> None:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("max_shard_size", [None, "20KB"], ids=["unsharded", "sharded"])
def test_transformers_push_and_from_pretrained(hub: Hub, tmp_path: Path, max_shard_size: str | None):
    from transformers import AutoModelForCausalLM

    repo_id = hub.repo_id("gpt2")
    first_model, second_model = _tiny_gpt2(seed=0), _tiny_gpt2(seed=1)

    # First version with transformers' own push_to_hub (create_repo, README model card, preupload + commit)...
    push_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    first = first_model.push_to_hub(repo_id, token=hub.token, **push_kwargs).oid
    # ... second version with save_pretrained + upload_folder.
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    second_model.save_pretrained(tmp_path / "second", **save_kwargs)
    second = hub.api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "second").oid

    files = set(hub.api.list_repo_files(repo_id))
    shards = {f for f in files if f.startswith("model-") and f.endswith(".safetensors")}
    if max_shard_size is None:
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files and not shards
    else:
        assert "model.safetensors.index.json" in files and "model.safetensors" not in files and len(shards) > 1

    hub.fresh_cache()
    _assert_same_weights(AutoModelForCausalLM.from_pretrained(repo_id), second_model)
    hub.fresh_cache()
    _assert_same_weights(AutoModelForCausalLM.from_pretrained(repo_id, revision=first), first_model)
    hub.fresh_cache()
    _assert_same_weights(AutoModelForCausalLM.from_pretrained(repo_id, revision=second), second_model)

    # Loads from the cache once offline.
    hub.go_offline()
    _assert_same_weights(AutoModelForCausalLM.from_pretrained(repo_id, revision=second), second_model)


def test_hf_file_system_reads_ranges(hub: Hub, tmp_path: Path):
    from huggingface_hub import HfFileSystem

    repo_id, sha = _create_and_upload(hub, tmp_path)
    fs = HfFileSystem(endpoint=hub.url, token=hub.token)
    content = FILES_V1["weights/part-0.bin"]
    with fs.open(f"{repo_id}/weights/part-0.bin", "rb", block_size=256) as f:
        f.seek(1000)
        assert f.read(300) == content[1000:1300]  # ranged GETs (206)
    assert fs.cat_file(f"{repo_id}@{sha}/config.json") == FILES_V1["config.json"]
    assert sorted(fs.ls(repo_id, detail=False)) == sorted(
        f"{repo_id}/{p}" for p in (".gitattributes", "config.json", "notes.txt", "weights")
    )


def test_other_repo_types_are_not_found(hub: Hub):
    assert not hub.api.repo_exists("user/anything", repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/anything", "data.csv", repo_type="dataset")
