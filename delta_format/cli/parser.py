"""The command line's arguments. The method choices and the method-parameter flags are derived
from the method registry, so a new method needs no change here."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .commands import run_apply, run_compress, run_export_lora, run_inspect, run_push, run_verify


def _flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ``ValueError`` becomes a usage error with its message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _rule(text: str) -> tuple[str, str]:
    from ..methods import METHODS

    pattern, sep, method = text.rpartition("=")
    if not sep or not pattern or method not in METHODS:
        raise argparse.ArgumentTypeError(
            f"expected PATTERN=METHOD with METHOD one of {', '.join(METHODS)}, got {text!r}"
        )
    return pattern, method


def _add_method_options(c: argparse.ArgumentParser) -> None:
    """``--method`` and one flag per method parameter, all from the method registry: a method
    registered anywhere (even by a test) is offered with its own parameters."""
    from ..methods import METHODS, method_parameters

    described = ", ".join(f"{name} ({cls.summary})" if cls.summary else name for name, cls in METHODS.items())
    c.add_argument(
        "--method",
        choices=list(METHODS),
        default=None,
        help=f"edit method for tensors no --rule names (default: budget with --bits, else dare): {described}",
    )
    m = c.add_argument_group("method parameters (each goes to every method in use that takes it)")
    for name, (spec, helps) in method_parameters().items():
        text = "; ".join(f"{help_text} [{', '.join(methods)}]" for help_text, methods in helps.items())
        m.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=_flag_type(spec.parse),
            choices=spec.choices,
            metavar=spec.metavar,
            default=argparse.SUPPRESS,
            help=text,
        )  # each method has its default


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
        "compress",
        help="write the delta of a fine-tune against its base",
        description="Write the delta of FINETUNE against BASE to the directory OUT. BASE and FINETUNE are local "
        "directories or Hub repo ids; FINETUNE may also be a PEFT LoRA adapter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("base", metavar="BASE", help="the base model (directory or Hub repo id)")
    c.add_argument("finetune", metavar="FINETUNE", help="the fine-tuned model, or a LoRA adapter")
    c.add_argument("out", metavar="OUT", help="output directory (published atomically)")
    _add_method_options(c)
    c.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="coefficient stored with every delta: >1 extrapolates (EXPO), <1 interpolates",
    )
    c.add_argument("--seed", type=int, default=0, help="seed of DARE's masks")
    c.add_argument(
        "--seed-trials",
        type=int,
        default=1,
        help="compress with this many seeds (--seed, --seed + 1, ...) and keep the delta that does best on "
        "the calibration texts (needs --calibration-file; costs that many compressions)",
    )
    c.add_argument(
        "--calibration-file",
        type=Path,
        metavar="F",
        help="UTF-8 text file of calibration texts separated by blank lines; enables q auto/output, "
        "importance, sign scale distillation, and output-error measurements",
    )
    c.add_argument(
        "--tokenizer", metavar="TOKENIZER", help="tokenizer for the calibration texts (default: the fine-tune's)"
    )
    c.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        help="only edit tensors whose name matches this glob (repeatable)",
    )
    c.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="leave tensors whose name matches this glob at the base's value (repeatable)",
    )
    c.add_argument(
        "--rule",
        action="append",
        type=_rule,
        metavar="PATTERN=METHOD",
        help="use METHOD for tensors whose name matches the glob PATTERN; first match wins "
        "(repeatable), e.g. --rule '*embed_tokens*=dense' --rule '*norm*=dense'",
    )
    c.add_argument(
        "--value-dtype",
        choices=("float32", "float16", "bfloat16", "float64"),
        help="dtype of stored values (default: the fine-tune's)",
    )
    c.add_argument(
        "--rounding",
        choices=("auto", "nearest", "stochastic", "stochastic-window"),
        default="auto",
        help="how readers round a lossy float16/bfloat16 parameter (SPEC §9.1): 'auto' "
        "('stochastic-window' for lossy half-precision entries), 'stochastic' (the per-element "
        "dither readers of spec 1.3-1.5 accept, slower to load), 'nearest' (any reader)",
    )
    c.add_argument(
        "--sensitivity",
        choices=("auto", "on", "off"),
        default="auto",
        help="with --bits: weigh each tensor's error by the model's measured output sensitivity to it, "
        "on the calibration texts or on random tokens: 'auto' (where transformers can run a model of "
        "at most 1e9 parameters), 'on' (always), 'off' (the weight error with fixed priors)",
    )
    c.add_argument("--max-shard-size", default="2GB", help="largest delta shard (also the in-memory write buffer)")
    c.add_argument("--revision", help="revision of the fine-tune on the Hub")
    c.add_argument("--base-revision", help="revision of the base on the Hub (pinned to its commit in the manifest)")
    c.add_argument("--token", help="Hugging Face token (default: the logged-in one)")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    c.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    c.set_defaults(run=run_compress)

    i = commands.add_parser(
        "inspect",
        help="show a delta's tensors, encodings, sizes and errors",
        description="Print a delta's manifest as a table: per tensor its encoding, shape, dtype, "
        "alpha, stored bytes and measured error, then the totals.",
    )
    i.add_argument("delta", metavar="DELTA", help="delta directory or Hub repo id")
    i.add_argument("--revision", help="revision of the delta on the Hub")
    i.add_argument("--token", help="Hugging Face token")
    i.set_defaults(run=run_inspect)

    a = commands.add_parser(
        "apply",
        help="write base + delta as a full safetensors checkpoint",
        description="Reconstruct the fine-tune from DELTA and its base and write it to OUT as a "
        "normal checkpoint (safetensors + config + tokenizer) that transformers loads.",
    )
    _delta_and_base(a, "base model to use instead of the one the delta names")
    a.add_argument("out", metavar="OUT", help="output checkpoint directory (published atomically)")
    a.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16", "float64"),
        help="cast every floating tensor to this dtype (default: keep each tensor's)",
    )
    a.add_argument("--alpha-scale", type=float, default=1.0, help="multiply every stored alpha (EXPO at apply time)")
    a.add_argument(
        "--no-verify-base",
        action="store_true",
        help="do not check the base's fingerprint (a wrong base gives wrong weights silently)",
    )
    a.add_argument("--max-shard-size", default="5GB", help="largest checkpoint shard")
    a.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    a.set_defaults(run=run_apply)

    v = commands.add_parser(
        "verify",
        help="check a delta's files, decoding and base",
        description="Check that DELTA's files match their checksums, that every tensor decodes, "
        "and that the base (--base, or the one the delta names, if it can be found) "
        "has the recorded fingerprint. Exits 0 if everything checked passes, else 1.",
    )
    _delta_and_base(v, "base model to check (default: the one the delta names)")
    v.set_defaults(run=run_verify)

    p = commands.add_parser(
        "push",
        help="upload a delta to the Hub with its model card",
        description="Upload the delta directory DELTA to the Hub repo REPO_ID in one commit, "
        "with a model card describing the edit.",
    )
    p.add_argument("delta", metavar="DELTA", help="delta directory")
    p.add_argument("repo_id", metavar="REPO_ID", help="target repo, e.g. user/my-ft-delta (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--token", help="Hugging Face token with write access")
    p.add_argument("--revision", help="branch to push to (created if needed)")
    p.add_argument("--commit-message", help="commit message")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.set_defaults(run=run_push)
    _add_export_lora(commands)
    return parser


def _add_export_lora(commands) -> None:
    e = commands.add_parser(
        "export-lora",
        help="write a delta as a PEFT LoRA adapter (for vLLM, TGI, LoRAX, PeftModel)",
        description="Write DELTA as a PEFT LoRA adapter in OUT: exact for a lowrank delta of rank <= R, "
        "a truncated SVD of each delta otherwise (its relative error is printed). Biases of LoRA layers "
        "become lora_B biases and other changed tensors modules_to_save, both exact.",
    )
    _delta_and_base(e, "base model for modules_to_save values (default: the one the delta names)")
    e.add_argument("out", metavar="OUT", help="adapter directory (published atomically)")
    e.add_argument("--rank", type=int, default=16, metavar="R", help="LoRA rank of every pair")
    e.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="adapter dtype")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.set_defaults(run=run_export_lora)
