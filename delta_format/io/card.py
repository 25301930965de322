"""The model card (README.md) of a published delta (SPEC §10).

Written with huggingface_hub's `ModelCard`/`ModelCardData`, so the Hub shows the base model, the
relation, the library and the tags; the edit itself (method, parameters, sizes, measured error)
goes under the ``delta_format`` metadata key, which `spec/model_card.schema.json` specifies.
"""

from __future__ import annotations

from typing import Any

from ..core.constants import FORMAT_NAME
from ..core.manifest import Manifest
from .sizes import format_bytes

BASE_MODEL_RELATION = "adapter"
"""A delta cannot run without its base, which is what the Hub's ``adapter`` relation means
(``finetune`` would claim full weights). See SPEC §10."""

LIBRARY_NAME = "delta-format"


def _method_tags(method: str) -> tuple[str, ...]:
    """The tags a registered method declares (none for a method this install does not know)."""
    from ..methods import METHODS

    cls = METHODS.get(method)
    return cls.tags if cls is not None else ()


def card_metadata(manifest: Manifest) -> dict[str, Any]:
    """The ``delta_format`` metadata block: what the edit is and what it cost."""
    stored = sum(int(e.stats.get("stored_bytes", 0)) for e in manifest.tensors.values())
    encodings: dict[str, int] = {}
    for entry in manifest.tensors.values():
        encodings[entry.encoding.name] = encodings.get(entry.encoding.name, 0) + 1
    meta: dict[str, Any] = {
        "spec_version": manifest.spec_version,
        "method": manifest.method,
        "method_params": manifest.method_params,
        "base_revision": manifest.base.revision,
        "base_fingerprint": (manifest.base.fingerprint or {}).get("digest"),
        "tensors": len(manifest.tensors),
        "encodings": encodings,
        "stored_bytes": stored,
    }
    for key in ("finetune_bytes", "compression_ratio", "rel_error", "output_error", "loss_change_estimate"):
        if key in manifest.stats:
            meta[key] = manifest.stats[key]
    return meta


def render_model_card(manifest: Manifest, repo_id: str | None = None) -> str:
    """The README.md text: YAML metadata + a human summary and a "How to load" snippet."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = card_metadata(manifest)
    tags = [FORMAT_NAME, f"{FORMAT_NAME}:{manifest.method}", *_method_tags(manifest.method)]
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=manifest.base.repo_id,
        base_model_relation=BASE_MODEL_RELATION if manifest.base.repo_id else None,
        tags=list(dict.fromkeys(tags)),
        delta_format=meta,
    )
    name = repo_id or "path/to/this-delta"
    base = manifest.base.describe()
    ratio = meta.get("compression_ratio")
    encodings = ", ".join(f"{k}: {v}" for k, v in sorted(meta["encodings"].items()))
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {name.split('/')[-1]}",
        "",
        f"A fine-tune published as a **{manifest.method}** delta against "
        + (f"[`{base}`](https://huggingface.co/{manifest.base.repo_id})" if manifest.base.repo_id else f"`{base}`")
        + f", in the [delta-format](https://pypi.org/project/delta-format/) v{manifest.spec_version} layout. "
        "It needs its base model to run; the loader fetches the base at the pinned commit and checks its fingerprint.",
        "",
        "## How to load",
        "",
        "```python",
        "import torch",
        "from delta_format import DeltaModel",
        "",
        f'model = DeltaModel.from_pretrained("{name}", dtype=torch.bfloat16, device_map="auto")',
        "```",
        "",
        "## The edit",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{manifest.method}` |",
        f"| parameters | `{meta['method_params']}` |",
        f"| edited tensors | {meta['tensors']} ({encodings}) |",
        f"| stored size | {format_bytes(meta['stored_bytes'])} |",
    ]
    if ratio is not None:
        lines.append(f"| compression vs the full fine-tune | {ratio:.2f}x |")
    if "rel_error" in meta:
        lines.append(f"| relative weight error ‖Δ̂−Δ‖/‖Δ‖ | {meta['rel_error']:.4g} |")
    if "output_error" in meta:
        lines.append(f"| output (logit) error on calibration text | {meta['output_error']} |")
    lines += ["", f"Base fingerprint: `{meta['base_fingerprint']}`." if meta["base_fingerprint"] else "", ""]
    return ModelCard("\n".join(lines)).content
