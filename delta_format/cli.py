"""The ``delta-format`` command: compress, inspect, apply, verify, push.

Every subcommand is a thin layer over the library (`compress`, `DeltaReader`, `apply_delta`,
`verify_delta`, `Delta.push_to_hub`). Bad input ends with one ``error: ...`` line on stderr and
exit status 1, never a traceback; ``verify`` exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import DeltaFormatError, InvalidArgumentError
from .io.sizes import format_bytes


def _flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ``ValueError`` becomes a usage error with its message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _rule(text: str) -> tuple[str, str]:
    from .methods import METHODS

    pattern, sep, method = text.rpartition("=")
    if not sep or not pattern or method not in METHODS:
        raise argparse.ArgumentTypeError(f"expected PATTERN=METHOD with METHOD one of {', '.join(METHODS)}, "
                                         f"got {text!r}")
    return pattern, method


def _add_method_options(c: argparse.ArgumentParser) -> None:
    """``--method`` and one flag per method parameter, all from the method registry: a method
    registered anywhere (even by a test) is offered with its own parameters."""
    from .methods import METHODS, method_parameters

    described = ", ".join(f"{name} ({cls.summary})" if cls.summary else name for name, cls in METHODS.items())
    c.add_argument("--method", choices=list(METHODS), default="dare",
                   help=f"edit method for tensors no --rule names: {described}")
    m = c.add_argument_group("method parameters (each goes to every method in use that takes it)")
    for name, (spec, helps) in method_parameters().items():
        text = "; ".join(f"{help_text} [{', '.join(methods)}]" for help_text, methods in helps.items())
        m.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_flag_type(spec.parse), choices=spec.choices,
                       metavar=spec.metavar, default=argparse.SUPPRESS, help=text)  # each method has its default


def _delta_and_base(sub: argparse.ArgumentParser, base_help: str) -> None:
    """DELTA and where it and its base come from (``apply`` and ``verify``)."""
    sub.add_argument("delta", metavar="DELTA", help="delta directory or Hub repo id")
    sub.add_argument("--base", help=base_help)
    sub.add_argument("--revision", help="revision of the delta on the Hub")
    sub.add_argument("--base-revision", help="revision of --base on the Hub")
    sub.add_argument("--token", help="Hugging Face token")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="delta-format",
        description="Publish a fine-tuned model as a compact, verifiable delta against its base.",
        epilog="Run 'delta-format COMMAND --help' for the options of each command.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = commands.add_parser(
        "compress", help="write the delta of a fine-tune against its base",
        description="Write the delta of FINETUNE against BASE to the directory OUT. BASE and FINETUNE are local "
                    "directories or Hub repo ids; FINETUNE may also be a PEFT LoRA adapter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("base", metavar="BASE", help="the base model (directory or Hub repo id)")
    c.add_argument("finetune", metavar="FINETUNE", help="the fine-tuned model, or a LoRA adapter")
    c.add_argument("out", metavar="OUT", help="output directory (published atomically)")
    _add_method_options(c)
    c.add_argument("--alpha", type=float, default=1.0,
                   help="coefficient stored with every delta: >1 extrapolates (EXPO), <1 interpolates")
    c.add_argument("--seed", type=int, default=0, help="seed of DARE's masks")
    c.add_argument("--calibration-file", type=Path, metavar="F",
                   help="UTF-8 text file of calibration texts separated by blank lines; enables q auto/output, "
                        "importance, sign scale distillation, and output-error measurements")
    c.add_argument("--tokenizer", metavar="TOKENIZER",
                   help="tokenizer for the calibration texts (default: the fine-tune's)")
    c.add_argument("--include", action="append", metavar="PATTERN",
                   help="only edit tensors whose name matches this glob (repeatable)")
    c.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="leave tensors whose name matches this glob at the base's value (repeatable)")
    c.add_argument("--rule", action="append", type=_rule, metavar="PATTERN=METHOD",
                   help="use METHOD for tensors whose name matches the glob PATTERN; first match wins "
                        "(repeatable), e.g. --rule '*embed_tokens*=dense' --rule '*norm*=dense'")
    c.add_argument("--value-dtype", choices=("float32", "float16", "bfloat16", "float64"),
                   help="dtype of stored values (default: the fine-tune's)")
    c.add_argument("--max-shard-size", default="2GB", help="largest delta shard (also the in-memory write buffer)")
    c.add_argument("--revision", help="revision of the fine-tune on the Hub")
    c.add_argument("--base-revision", help="revision of the base on the Hub (pinned to its commit in the manifest)")
    c.add_argument("--token", help="Hugging Face token (default: the logged-in one)")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    c.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    c.set_defaults(run=_compress)

    i = commands.add_parser("inspect", help="show a delta's tensors, encodings, sizes and errors",
                            description="Print a delta's manifest as a table: per tensor its encoding, shape, dtype, "
                                        "alpha, stored bytes and measured error, then the totals.")
    i.add_argument("delta", metavar="DELTA", help="delta directory or Hub repo id")
    i.add_argument("--revision", help="revision of the delta on the Hub")
    i.add_argument("--token", help="Hugging Face token")
    i.set_defaults(run=_inspect)

    a = commands.add_parser("apply", help="write base + delta as a full safetensors checkpoint",
                            description="Reconstruct the fine-tune from DELTA and its base and write it to OUT as a "
                                        "normal checkpoint (safetensors + config + tokenizer) that transformers loads.")
    _delta_and_base(a, "base model to use instead of the one the delta names")
    a.add_argument("out", metavar="OUT", help="output checkpoint directory (published atomically)")
    a.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"),
                   help="cast every floating tensor to this dtype (default: keep each tensor's)")
    a.add_argument("--alpha-scale", type=float, default=1.0, help="multiply every stored alpha (EXPO at apply time)")
    a.add_argument("--no-verify-base", action="store_true",
                   help="do not check the base's fingerprint (a wrong base gives wrong weights silently)")
    a.add_argument("--max-shard-size", default="5GB", help="largest checkpoint shard")
    a.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    a.set_defaults(run=_apply)

    v = commands.add_parser("verify", help="check a delta's files, decoding and base",
                            description="Check that DELTA's files match their checksums, that every tensor decodes, "
                                        "and that the base (--base, or the one the delta names, if it can be found) "
                                        "has the recorded fingerprint. Exits 0 if everything checked passes, else 1.")
    _delta_and_base(v, "base model to check (default: the one the delta names)")
    v.set_defaults(run=_verify)

    p = commands.add_parser("push", help="upload a delta to the Hub with its model card",
                            description="Upload the delta directory DELTA to the Hub repo REPO_ID in one commit, "
                                        "with a model card describing the edit.")
    p.add_argument("delta", metavar="DELTA", help="delta directory")
    p.add_argument("repo_id", metavar="REPO_ID", help="target repo, e.g. user/my-ft-delta (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--token", help="Hugging Face token with write access")
    p.add_argument("--revision", help="branch to push to (created if needed)")
    p.add_argument("--commit-message", help="commit message")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.set_defaults(run=_push)
    return parser


def read_calibration_file(path: Path) -> list[str]:
    """Texts separated by blank lines."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"cannot read the calibration file {path}", expected="a UTF-8 text file",
                                   found=str(exc)[:200]) from None
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
        raise InvalidArgumentError(f"the calibration file {path} holds no text", expected="texts separated by blank lines",
                                   found="an empty file")
    return texts


def _compress(args: argparse.Namespace) -> int:
    from .compression.pipeline import compress

    from .methods import method_parameters

    params: dict[str, Any] = {k: getattr(args, k) for k in method_parameters() if hasattr(args, k)}
    texts = read_calibration_file(args.calibration_file) if args.calibration_file else None
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, token=args.token)
    delta = compress(
        args.base, args.finetune, args.out, args.method, rules=args.rule, include=args.include, exclude=args.exclude,
        alpha=args.alpha, seed=args.seed, calibration_texts=texts, tokenizer=tokenizer, value_dtype=args.value_dtype,
        max_shard_size=args.max_shard_size, overwrite=args.overwrite, token=args.token, revision=args.revision,
        base_revision=args.base_revision, progress=not args.no_progress, **params,
    )
    stats = delta.manifest.stats
    print(f"wrote {delta.directory}: {format_bytes(stats.get('stored_bytes', 0))}, "
          f"{stats.get('compression_ratio', 0):.2f}x compression against the fine-tune, "
          f"relative error {stats.get('rel_error', 0):.4g}"
          + (f", logit MSE {stats['output_error']:.4g}" if "output_error" in stats else ""))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .io.resolve import HubOptions, open_delta

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
            rows.append((name, entry.encoding.label(), "x".join(map(str, entry.shape)) or "scalar", entry.dtype,
                         f"{entry.alpha:g}", str(entry.stats.get("stored_bytes", 0)),
                         "-" if err is None else f"{err:.4g}"))
        header = ("tensor", "encoding", "shape", "dtype", "alpha", "bytes", "rel.err")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        right = {4, 5, 6}
        for row in [header, *rows]:
            print("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        stats = manifest.stats
        stored = stats.get("stored_bytes", reader.stored_bytes())
        print()
        print(f"total       {len(manifest.tensors)} tensors, {format_bytes(stored)} stored"
              + (f", fine-tune {format_bytes(stats['finetune_bytes'])}" if "finetune_bytes" in stats else "")
              + (f", {stats['compression_ratio']:.2f}x compression" if stats.get("compression_ratio") else ""))
        if "rel_error" in stats:
            print(f"error       relative weight error {stats['rel_error']:.4g}"
                  + (f", logit MSE {stats['output_error']:.4g}" if "output_error" in stats else "")
                  + (f", first-order loss change {stats['loss_change_estimate']:+.4g}"
                     if "loss_change_estimate" in stats else ""))
    return 0


def _apply(args: argparse.Namespace) -> int:
    from .loaders.apply import apply_delta

    out = apply_delta(args.delta, args.out, base_model=args.base, dtype=args.dtype, overwrite=args.overwrite,
                      alpha=args.alpha_scale, revision=args.revision, base_revision=args.base_revision,
                      token=args.token, verify_base=not args.no_verify_base, max_shard_size=args.max_shard_size)
    print(f"wrote {out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .loaders.apply import verify_delta

    report = verify_delta(args.delta, base_model=args.base, revision=args.revision, base_revision=args.base_revision,
                          token=args.token)
    for line in report.lines:
        print(line)
    print("verified" if report.ok else "verification FAILED")
    return 0 if report.ok else 1


def _push(args: argparse.Namespace) -> int:
    from .io.delta import Delta

    url = Delta(args.delta).push_to_hub(args.repo_id, private=args.private or None, token=args.token,
                                        revision=args.revision, commit_message=args.commit_message,
                                        create_pr=args.create_pr)
    print(url)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except DeltaFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.strerror or exc}" + (f": {exc.filename}" if getattr(exc, "filename", None) else ""),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
