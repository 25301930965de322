"""What each subcommand does: a thin layer over the library, printing a short report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from ..io.sizes import format_bytes


def read_calibration_file(path: Path) -> list[str]:
    """Texts separated by blank lines."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(
            f"cannot read the calibration file {path}", expected="a UTF-8 text file", found=str(exc)[:200]
        ) from None
    texts, current = [], []
    for line in raw.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            texts.append("\n".join(current))
            current = []
    if current:
        texts.append("\n".join(current))
    if not texts:
        raise InvalidArgumentError(
            f"the calibration file {path} holds no text",
            expected="texts separated by blank lines",
            found="an empty file",
        )
    return texts


def run_compress(args: argparse.Namespace) -> int:
    from ..compression.pipeline import compress
    from ..methods import method_parameters

    params: dict[str, Any] = {k: getattr(args, k) for k in method_parameters() if hasattr(args, k)}
    texts = read_calibration_file(args.calibration_file) if args.calibration_file else None
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, token=args.token)
    delta = compress(
        args.base,
        args.finetune,
        args.out,
        args.method,
        rules=args.rule,
        include=args.include,
        exclude=args.exclude,
        alpha=args.alpha,
        seed=args.seed,
        seed_trials=args.seed_trials,
        calibration_texts=texts,
        tokenizer=tokenizer,
        value_dtype=args.value_dtype,
        rounding=args.rounding,
        sensitivity=args.sensitivity,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        token=args.token,
        revision=args.revision,
        base_revision=args.base_revision,
        progress=not args.no_progress,
        **params,
    )
    stats = delta.manifest.stats
    print(
        f"wrote {delta.directory}: {format_bytes(stats.get('stored_bytes', 0))}, "
        f"{stats.get('compression_ratio', 0):.2f}x compression against the fine-tune, "
        f"relative error {stats.get('rel_error', 0):.4g}"
        + (f", logit MSE {stats['output_error']:.4g}" if "output_error" in stats else "")
    )
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from ..io.resolve import HubOptions, open_delta

    delta = open_delta(args.delta, HubOptions(revision=args.revision, token=args.token))
    directory = delta.directory
    with delta.reader as reader:
        manifest = reader.manifest
        params = ", ".join(f"{k}={v}" for k, v in manifest.method_params.items())
        print(f"delta       {directory}")
        print(f"format      delta-format {manifest.spec_version} ({manifest.created_by or 'unknown writer'})")
        print(f"method      {manifest.method}" + (f" ({params})" if params else ""))
        fingerprint = (manifest.base.fingerprint or {}).get("digest")
        print(f"base        {manifest.base.describe()}" + (f", fingerprint {fingerprint[:16]}" if fingerprint else ""))
        print()
        rows = []
        for name, entry in manifest.tensors.items():
            err = entry.stats.get("rel_error")
            rows.append(
                (
                    name,
                    entry.encoding.label(),
                    ("x".join(map(str, entry.shape)) or "scalar")
                    + (f" (base {entry.base_rows} rows)" if entry.base_rows is not None else ""),
                    entry.dtype + (f" ({entry.rounding})" if entry.rounding != "nearest" else ""),
                    f"{entry.alpha:g}",
                    str(entry.stats.get("stored_bytes", 0)),
                    "-" if err is None else f"{err:.4g}",
                )
            )
        header = ("tensor", "encoding", "shape", "dtype", "alpha", "bytes", "rel.err")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        right = {4, 5, 6}
        for row in [header, *rows]:
            print(
                "  ".join(
                    c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
                ).rstrip()
            )
        stats = manifest.stats
        stored = stats.get("stored_bytes", reader.stored_bytes())
        print()
        print(
            f"total       {len(manifest.tensors)} tensors, {format_bytes(stored)} stored"
            + (f", fine-tune {format_bytes(stats['finetune_bytes'])}" if "finetune_bytes" in stats else "")
            + (f", {stats['compression_ratio']:.2f}x compression" if stats.get("compression_ratio") else "")
        )
        if "rel_error" in stats:
            print(
                f"error       relative weight error {stats['rel_error']:.4g}"
                + (f", logit MSE {stats['output_error']:.4g}" if "output_error" in stats else "")
                + (
                    f", first-order loss change {stats['loss_change_estimate']:+.4g}"
                    if "loss_change_estimate" in stats
                    else ""
                )
            )
    return 0


def run_apply(args: argparse.Namespace) -> int:
    from ..loaders.apply import apply_delta

    out = apply_delta(
        args.delta,
        args.out,
        base_model=args.base,
        dtype=args.dtype,
        overwrite=args.overwrite,
        alpha=args.alpha_scale,
        revision=args.revision,
        base_revision=args.base_revision,
        token=args.token,
        verify_base=not args.no_verify_base,
        max_shard_size=args.max_shard_size,
        progress=True,  # huggingface_hub's bar: HF_HUB_DISABLE_PROGRESS_BARS=1 hides it
    )
    print(f"wrote {out}")
    return 0


def run_export_lora(args: argparse.Namespace) -> int:
    from ..loaders.export_lora import export_lora

    where = {"base_model": args.base, "revision": args.revision, "base_revision": args.base_revision}
    report = export_lora(
        args.delta, args.out, rank=args.rank, dtype=args.dtype, overwrite=args.overwrite, token=args.token, **where
    )
    print(report.summary())
    for name, error in sorted(report.fitted.items(), key=lambda item: -item[1])[:10]:
        print(f"  fitted {name}: relative error {error:.4g}")
    print(f"wrote {report.directory}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from ..loaders.apply import verify_delta

    report = verify_delta(
        args.delta, base_model=args.base, revision=args.revision, base_revision=args.base_revision, token=args.token
    )
    for line in report.lines:
        print(line)
    print("verified" if report.ok else "verification FAILED")
    return 0 if report.ok else 1


def run_push(args: argparse.Namespace) -> int:
    from ..io.delta import Delta

    url = Delta(args.delta).push_to_hub(
        args.repo_id,
        private=args.private or None,
        token=args.token,
        revision=args.revision,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
    )
    print(url)
    return 0
