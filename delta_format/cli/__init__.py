"""The ``delta-format`` command: compress, inspect, apply, verify, push.

Every subcommand is a thin layer over the library (`compress`, `DeltaReader`, `apply_delta`,
`verify_delta`, `Delta.push_to_hub`). Bad input ends with one ``error: ...`` line on stderr and
exit status 1, never a traceback; ``verify`` exits 1 when a check fails.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..errors import DeltaFormatError
from .commands import read_calibration_file
from .parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except DeltaFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"error: {exc.strerror or exc}" + (f": {exc.filename}" if getattr(exc, "filename", None) else ""),
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


__all__ = ["main", "build_parser", "read_calibration_file"]
