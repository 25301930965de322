"""Finding and checking the base a delta needs (SPEC §3.2, §7): one resolver, one check.

The manifest names the base (a Hub repo pinned to a commit, or a local path) and its fingerprint.
`resolve_base` finds it (or the user's ``base_model``). `check_base` is what every loader
(``from_pretrained``, ``swap_delta``, on-the-fly, ``apply``, ``verify``) runs before touching a
weight, with one error type per fault:

* the base's fingerprint is not the recorded one: `BaseMismatchError`;
* a parameter the delta edits is missing from the base or the model, or has another shape:
  `BaseMismatchError` (the delta cannot be added to that base, whichever side is at fault);
* ``verify_base=False``, or a delta that records no fingerprint: a `UserWarning`, the same text
  everywhere; shapes are still checked (a misfit cannot be loaded at all).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..core.fingerprint import check_fingerprint
from ..core.manifest import Manifest, TensorEntry
from ..errors import BaseMismatchError, ResolutionError
from ..io.checkpoint import Checkpoint
from ..io.delta import Delta
from ..io.resolve import HubOptions, resolve_repo

NOT_VERIFIED_WARNING = (
    "verify_base=False: the base model is not checked against the delta's fingerprint; "
    "a wrong base gives wrong weights silently"
)

FingerprintSource = Checkpoint | Callable[[Mapping[str, Any]], Mapping[str, Any]]
"""Where a base's fingerprint comes from: its checkpoint files, or a function of the recorded
fingerprint (a model in memory is fingerprinted in the dtypes the record names)."""


def resolve_base(
    manifest: Manifest, base_model: str | os.PathLike | None = None, hub: HubOptions | None = None
) -> Checkpoint:
    """The base checkpoint: ``base_model`` (a directory or repo id) if given, else the manifest's
    repo (at ``hub.revision`` if given, else its pinned commit), else its local path.

    ``hub`` holds the options for the *base*: its ``revision`` is the base's revision.
    """
    hub = hub or HubOptions()
    ref = manifest.base
    if base_model is not None:
        name = base_model
    elif ref.repo_id:
        name, hub = ref.repo_id, hub.updated(revision=hub.revision or ref.revision)
    elif ref.local_path:
        name, hub = ref.local_path, hub.updated(revision=None)
    else:
        raise ResolutionError(
            "the delta does not say which base it needs",
            expected="base.repo_id or base.local_path",
            found="neither",
            fix="pass base_model= (or --base) explicitly",
        )
    directory, sha = resolve_repo(name, hub, what="base model")
    return Checkpoint(directory, commit_sha=sha)


def check_base(
    delta: Delta | Manifest,
    base: FingerprintSource,
    *,
    verify_base: bool = True,
    model_shapes: Mapping[str, Sequence[int]] | None = None,
    base_label: str | None = None,
) -> None:
    """Check that ``delta`` can be added to ``base`` (and to the model that will hold it).

    Args:
        delta: the delta (or its manifest).
        base: the base checkpoint, or a function computing the base's fingerprint from the
            recorded one (for a base held in memory).
        verify_base: compare fingerprints; ``False`` warns instead (`NOT_VERIFIED_WARNING`).
        model_shapes: ``{parameter: shape}`` of the model that will hold the result; every
            parameter the delta edits must be there with the shape the delta records.
        base_label: how to name the base in errors (default: the checkpoint's directory).

    Raises:
        BaseMismatchError: another base (fingerprint), or a parameter the delta edits that the
            base or model lacks or holds in another shape.
    """
    manifest = delta.manifest if isinstance(delta, Delta) else delta
    label = base_label or (str(base.directory) if isinstance(base, Checkpoint) else "in memory")
    expected = manifest.base.fingerprint
    if not verify_base:
        _warn(NOT_VERIFIED_WARNING)
    elif expected is None:
        where = f" at {delta.directory}" if isinstance(delta, Delta) else ""
        _warn(f"the delta{where} records no base fingerprint; its base cannot be verified")
    else:
        check_fingerprint(expected, base.fingerprint() if isinstance(base, Checkpoint) else base(expected), label)
    if isinstance(base, Checkpoint):  # a delta (or a bitdiff value) needs a base tensor of its shape
        edits = {n: e for n, e in manifest.tensors.items() if e.encoding.needs_base}
        _check_shapes(
            edits,
            _checkpoint_shapes(base, edits),
            f"the base model {label}",
            "load the base the delta was made against",
            base_side=True,
        )
    if model_shapes is not None:
        _check_shapes(
            manifest.tensors,
            model_shapes,
            "the model",
            "a delta that adds or resizes parameters needs a model built from its own config.json: load it "
            "with a fresh from_pretrained (if that fails too, its config.json does not match its tensors)",
        )


def _checkpoint_shapes(checkpoint: Checkpoint, names) -> dict[str, tuple[int, ...]]:
    return {n: checkpoint.shape_dtype(n)[0] for n in names if n in checkpoint}


def _check_shapes(
    entries: Mapping[str, TensorEntry],
    shapes: Mapping[str, Sequence[int]],
    holder: str,
    fix: str,
    *,
    base_side: bool = False,
) -> None:
    """Every entry's parameter in ``shapes``: with the base's shape (`TensorEntry.base_shape`, fewer
    rows for a resized vocabulary) where ``base_side``, the fine-tune's (``shape``) otherwise."""
    wanted = {name: entry.base_shape if base_side else tuple(entry.shape) for name, entry in entries.items()}
    misfits = [
        f"{name!r} {list(shape)} vs {list(shapes[name]) if name in shapes else 'missing'}"
        for name, shape in wanted.items()
        if name not in shapes or tuple(shapes[name]) != shape
    ]
    if misfits:
        raise BaseMismatchError(
            f"the delta edits parameters that {holder} lacks or holds in another shape",
            expected="every edited parameter, with the shape the delta records",
            found="; ".join(misfits[:5]) + (f"; ... and {len(misfits) - 5} more" if len(misfits) > 5 else ""),
            fix=fix,
        )


def _warn(message: str) -> None:
    """A `UserWarning` attributed to the first caller outside this package (the user's line)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
