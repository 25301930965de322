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


CARRIED_METADATA = ("license", "license_name", "license_link", "language", "datasets", "pipeline_tag")
"""Keys of the fine-tune's card (``stats.finetune_card``, SPEC §3.6) repeated in the delta's card, so
the Hub's license, language, dataset and task filters find the delta as they find the fine-tune.
Its ``tags`` are merged with the delta's own; its ``library_name`` picks the "How to load" snippet
(the delta's own ``library_name`` stays ``delta-format``: only this package can load it)."""

QUALITY_KEYS = (
    "rel_error",
    "output_error",
    "output_kl",
    "output_cosine",
    "loss_change_estimate",
    "calibration_loss",
    "output_loss",
)
"""Measured errors copied from the manifest's ``stats`` into the card's ``delta_format`` block."""


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
    for key in ("finetune_bytes", "compression_ratio", *QUALITY_KEYS):
        if isinstance(manifest.stats.get(key), (int, float)) and not isinstance(manifest.stats[key], bool):
            meta[key] = manifest.stats[key]
    return meta


def finetune_card(manifest: Manifest) -> dict[str, Any]:
    """The fine-tune card's metadata the compressor recorded (``stats.finetune_card``), {} if none
    or if it is not an object (``stats`` is informative: a wrong value only loses the carry-over)."""
    card = manifest.stats.get("finetune_card")
    return card if isinstance(card, dict) else {}


def card_data(manifest: Manifest) -> Any:
    """The card's YAML metadata as huggingface_hub's `ModelCardData` (SPEC §10.1)."""
    from huggingface_hub import ModelCardData

    carried = finetune_card(manifest)
    theirs = carried.get("tags") if isinstance(carried.get("tags"), list) else []
    tags = [FORMAT_NAME, f"{FORMAT_NAME}:{manifest.method}", *_method_tags(manifest.method)]
    tags += [t for t in theirs if isinstance(t, str)]
    library = carried.get("library_name")
    if isinstance(library, str) and library not in (LIBRARY_NAME, "transformers"):
        tags.append(library)  # e.g. sentence-transformers: the Hub's library filter finds the delta
    return ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=manifest.base.repo_id,
        base_model_relation=BASE_MODEL_RELATION if manifest.base.repo_id else None,
        tags=list(dict.fromkeys(tags)),
        **{key: carried[key] for key in CARRIED_METADATA if key in carried},
        delta_format=card_metadata(manifest),
    )


def how_to_load(manifest: Manifest, name: str) -> list[str]:
    """The "How to load" snippet in the fine-tune's own library: sentence-transformers users get a
    `SentenceTransformer`, everyone else a transformers model; both can write a full checkpoint."""
    library = finetune_card(manifest).get("library_name")
    if library == "sentence-transformers":
        code = [
            "from delta_format.integrations.sentence_transformers import load_sentence_transformer",
            "",
            f'model = load_sentence_transformer("{name}")  # a sentence_transformers.SentenceTransformer',
            'embeddings = model.encode(["A sentence to embed."])',
        ]
    else:
        code = [
            "import torch",
            "from delta_format import DeltaModel",
            "",
            f'model = DeltaModel.from_pretrained("{name}", dtype=torch.bfloat16, device_map="auto")',
        ]
    return [
        "## How to load",
        "",
        "```python",
        *code,
        "```",
        "",
        f"Or write the full fine-tune as an ordinary checkpoint: `delta-format apply {name} fine-tune/`.",
    ]


def _base_sentence(manifest: Manifest) -> str:
    """Which base the delta needs, in words. A local base is never named by its path: the path
    means nothing on another machine and may say things about the author's one."""
    base = manifest.base
    if base.repo_id:
        at = f" at commit `{base.revision[:12]}`" if base.revision else ""
        return f"[`{base.repo_id}`](https://huggingface.co/{base.repo_id}){at}"
    return "a base model that is not on the Hub (pass it with `base_model=` when loading)"


def _quality_rows(meta: dict[str, Any]) -> list[str]:
    rows = []
    if "rel_error" in meta:
        rows.append(f"| relative weight error ‖Δ̂−Δ‖/‖Δ‖ | {meta['rel_error']:.4g} |")
    if "output_kl" in meta:
        rows.append(f"| output KL(fine-tune ‖ delta) per token on calibration texts | {meta['output_kl']:.4g} nats |")
    if "output_cosine" in meta:
        rows.append(f"| embedding cosine to the fine-tune on calibration texts | {meta['output_cosine']:.6f} |")
    if "output_loss" in meta and "calibration_loss" in meta:
        rows.append(
            f"| next-token loss on calibration texts, fine-tune → delta | "
            f"{meta['calibration_loss']:.4f} → {meta['output_loss']:.4f} nats |"
        )
    if "output_error" in meta:
        rows.append(f"| output (logit) MSE on calibration texts | {meta['output_error']:.4g} |")
    return rows


def render_model_card(manifest: Manifest, repo_id: str | None = None, name: str | None = None) -> str:
    """The README.md text: YAML metadata + a human summary and a "How to load" snippet.

    Args:
        manifest: the delta's manifest (its ``stats`` carry the measured errors and the fine-tune
            card's metadata).
        repo_id: the Hub repo the card is published under: the title is its name and the
            snippets load it.
        name: the delta's name without a repo (its directory's name), for a card written locally.
    """
    from huggingface_hub import ModelCard

    meta = card_metadata(manifest)
    title = (repo_id or name or "delta").rstrip("/").split("/")[-1]
    loadable = repo_id or title
    ratio = meta.get("compression_ratio")
    encodings = ", ".join(f"{k}: {v}" for k, v in sorted(meta["encodings"].items()))
    lines = [
        "---",
        card_data(manifest).to_yaml(),
        "---",
        "",
        f"# {title}",
        "",
        f"A fine-tune published as a **{manifest.method}** delta against {_base_sentence(manifest)}, in the "
        f"[delta-format](https://pypi.org/project/delta-format/) v{manifest.spec_version} layout. "
        "It needs its base model to run; the loader "
        + ("fetches the base at the pinned commit and " if manifest.base.repo_id else "")
        + "checks the base's fingerprint.",
        "",
        *how_to_load(manifest, loadable),
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
    lines += _quality_rows(meta)
    lines += ["", f"Base fingerprint: `{meta['base_fingerprint']}`." if meta["base_fingerprint"] else "", ""]
    return ModelCard("\n".join(lines)).content
