"""The ``delta-format`` command: compress, inspect, apply, verify, push.

Every subcommand is a thin layer over the library (`compress`, `DeltaReader`, `apply_delta`,
`verify_delta`, `Delta.push_to_hub`). Bad input ends with one ``error: ...`` line on stderr and
exit status 1, never a traceback; ``verify`` exits 1 when a check fails.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import DeltaFormatError
from ..io.staging import output_error
from .commands import read_calibration_file
from .parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except DeltaFormatError as exc:
        return _fail(str(exc))
    except OSError as exc:
        typed = output_error(exc, Path(getattr(args, "out", None) or "."))
        if typed is not None:
            return _fail(str(typed))
        return _fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if getattr(exc, "filename", None) else ""))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a command line prints one line, never a traceback
        return _fail(f"unexpected {type(exc).__name__}: {exc} (please report this as a bug)")


def _fail(message: str) -> int:
    """One line on stderr (no newline or control character from a hostile file breaks it)."""
    line = " ".join(message.split())
    print(f"error: {line.encode('utf-8', 'backslashreplace').decode('utf-8')}", file=sys.stderr)
    return 1


__all__ = ["main", "build_parser", "read_calibration_file"]
