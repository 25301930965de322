"""Finding and checking the base a delta needs (SPEC §3.2, §7).

The manifest names the base (a Hub repo pinned to a commit, or a local path) and its fingerprint.
`resolve_base` finds it (or the user's override) through `resolve_repo`; `verify_base` compares
fingerprints and raises `BaseMismatchError` naming what differs.
"""

from __future__ import annotations

import os
import warnings

from ..io.checkpoint import Checkpoint, resolve_repo
from ..errors import ResolutionError
from ..core.fingerprint import check_fingerprint
from ..core.manifest import Manifest


def resolve_base(
    manifest: Manifest,
    base_override: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Checkpoint:
    """The base checkpoint: ``base_override`` (a directory or repo id, at ``revision``) if given,
    else the manifest's repo at its pinned commit, else its local path."""
    ref = manifest.base
    if base_override is not None:
        name, rev = base_override, revision
    elif ref.repo_id:
        name, rev = ref.repo_id, revision or ref.revision
    elif ref.local_path:
        name, rev = ref.local_path, None
    else:
        raise ResolutionError("the delta does not say which base it needs", expected="base.repo_id or base.local_path",
                              found="neither", fix="pass base_model= (or --base) explicitly")
    directory, sha = resolve_repo(name, revision=rev, token=token, cache_dir=cache_dir,
                                  local_files_only=local_files_only, what="base model")
    return Checkpoint(directory, commit_sha=sha)


def verify_base(manifest: Manifest, checkpoint: Checkpoint, *, verify: bool = True) -> None:
    """Check the base's fingerprint against the manifest's (``verify=False`` only warns)."""
    expected = manifest.base.fingerprint
    if not verify:
        warnings.warn("verify_base=False: the base model is not checked against the delta's fingerprint; "
                      "a wrong base gives wrong weights silently", stacklevel=3)
        return
    if expected is None:
        warnings.warn("this delta records no base fingerprint; the base cannot be verified", stacklevel=3)
        return
    check_fingerprint(expected, checkpoint.fingerprint(), str(checkpoint.directory))
