"""Finding a delta or a checkpoint by name: a local directory or a Hub repo id.

The Hub options (revision, token, cache directory, offline mode) are one value, `HubOptions`,
written once and handed down, so every entry point honours all of them the same way. Resolution
itself is delegated to huggingface_hub's ``snapshot_download`` (cache, revisions, tokens,
``HF_HUB_OFFLINE``: nothing re-implemented); its errors become `ResolutionError`.

`open_delta` is the one way the package opens a delta by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..errors import InvalidArgumentError, ResolutionError
from .delta import Delta

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "README.md"]
"""Files fetched from the Hub for a base checkpoint: its weights, config and tokenizer. Never pickles."""

PICKLE_SUFFIXES = (
    *(".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"),
    *(".h5", ".msgpack", ".ot"),  # TensorFlow, Flax and Rust weights: read by other frameworks, never here
)
"""Files that may run code when read (pickles), or hold weights in a framework this package never
reads: never fetched for a whole repo, never carried into a delta."""

OTHER_WEIGHT_SUFFIXES = (".onnx", ".onnx_data", ".gguf", ".tflite", ".mlmodel", ".engine", ".plan")
OTHER_WEIGHT_FOLDERS = ("onnx", "openvino", "coreml", "runs")
"""Copies of a model's weights in other runtimes' formats (and training logs): a delta replaces
the weights, so a stale full copy beside it would defeat it."""

WHOLE_REPO_IGNORED = [
    *(f"*{suffix}" for suffix in PICKLE_SUFFIXES + OTHER_WEIGHT_SUFFIXES),
    *(f"{folder}/*" for folder in OTHER_WEIGHT_FOLDERS),
    "checkpoint-*/*",
]
"""What fetching a whole repo leaves out (``ignore_patterns``), for a fine-tune whose every other
file the delta carries (sentence-transformers' ``1_Pooling/config.json``, chat templates, ...),
and for a delta, which holds only such files."""


@dataclass(frozen=True)
class HubOptions:
    """How to fetch from the Hub; the same four keywords as huggingface_hub's.

    Frozen (and hashable), so a value can key a cache of opened deltas.
    """

    revision: str | None = None
    """Branch, tag or commit (None: the default branch; ignored for local directories)."""
    token: str | bool | None = None
    """A token for private repos (None: the logged-in one)."""
    cache_dir: str | os.PathLike | None = None
    """Where downloads are cached (None: huggingface_hub's default)."""
    local_files_only: bool = False
    """Use only the cache; never touch the network."""

    def updated(self, **changes: object) -> HubOptions:
        """A copy with ``changes`` applied; unknown names are an `InvalidArgumentError`."""
        unknown = sorted(changes.keys() - {f.name for f in fields(self)})
        if unknown:
            raise InvalidArgumentError("unknown Hub option", expected=[f.name for f in fields(self)], found=unknown)
        return replace(self, **changes)


def resolve_repo(
    name_or_path: str | os.PathLike,
    hub: HubOptions | None = None,
    *,
    allow_patterns: list[str] | None = None,
    whole_repo: bool = False,
    what: str = "model",
    **hub_options: object,
) -> tuple[Path, str | None]:
    """(local directory, commit sha or None for local paths) of a directory or a Hub repo.

    Args:
        name_or_path: a local directory, or a Hub repo id (``user/name``).
        hub: the Hub options; ``**hub_options`` (``revision=``, ``token=``, ...) override them.
        allow_patterns: the files to download (default `CHECKPOINT_PATTERNS`).
        whole_repo: download every file but `WHOLE_REPO_IGNORED` instead (a fine-tune or a delta).
        what: what is resolved, for error messages ("delta", "base model").
    """
    hub = (hub or HubOptions()).updated(**hub_options)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"cannot resolve the {what}",
            expected="a local directory or a Hub repo id (user/name)",
            found=type(name_or_path).__name__,
        )
    path = Path(name_or_path)
    if path.is_dir():
        return path, None
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ResolutionError(
            f"{what} {name!r} is not a directory",
            expected="a local directory or a Hub repo id (user/name)",
            found="a path that is not a directory" if path.exists() else "no such directory",
            fix="check the path",
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        local = snapshot_download(
            name,
            revision=hub.revision,
            token=hub.token,
            cache_dir=hub.cache_dir,
            local_files_only=hub.local_files_only,
            allow_patterns=None if whole_repo else allow_patterns or CHECKPOINT_PATTERNS,
            ignore_patterns=WHOLE_REPO_IGNORED if whole_repo else None,
        )
    except RevisionNotFoundError:
        raise ResolutionError(
            f"{what} {name!r} has no revision {hub.revision!r}",
            expected="an existing branch, tag or commit",
            found=hub.revision,
            fix="check the revision",
        ) from None
    except HFValidationError as exc:
        raise ResolutionError(
            f"{what} {name!r} is not a valid Hub repo id",
            expected="user/name of letters, digits, '-', '_', '.'",
            found=str(exc)[:200],
            fix="check the name",
        ) from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise ResolutionError(
            f"{what} {name!r} was not found on the Hub",
            expected="an existing repo you can access",
            found="no such repo, or a private one",
            fix="check the name, or pass token= (or log in) for a private repo",
        ) from None
    except LocalEntryNotFoundError:
        raise ResolutionError(
            f"{what} {name!r} is not in the local cache",
            expected="a cached copy (offline mode)",
            found="nothing cached",
            fix="connect once without HF_HUB_OFFLINE/local_files_only to download it",
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ResolutionError(
            f"{what} {name!r} could not be downloaded",
            expected="a reachable Hub",
            found=str(exc)[:200],
            fix="check your connection, HF_ENDPOINT, or use local_files_only=True with a cached copy",
        ) from None
    local_path = Path(local)
    sha = local_path.name if local_path.parent.name == "snapshots" else None
    return local_path, sha


def open_delta(
    source: str | os.PathLike | Delta,
    hub: HubOptions | None = None,
    *,
    verify_checksums: bool = True,
) -> Delta:
    """Open a delta, validated: a `Delta` is returned as it is; a directory or a Hub repo id is
    resolved with ``hub`` (every option honoured) and opened.

    Example:
        >>> delta = open_delta("user/ft-delta", HubOptions(revision="v1"))   # doctest: +SKIP
        >>> delta.manifest.method                                           # doctest: +SKIP
        'dare'
    """
    if isinstance(source, Delta):
        return source
    directory, sha = resolve_repo(source, hub, whole_repo=True, what="delta")
    return Delta(
        directory, repo_id=None if sha is None else str(source), revision=sha, verify_checksums=verify_checksums
    )
