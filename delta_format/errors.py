"""The error hierarchy. Every error the package raises on bad input is a `DeltaFormatError`.

Messages follow one pattern: what was expected, what was found, and what to do about it.
`DeltaFormatError` subclasses `ValueError` so that callers who already catch bad-input errors
keep working.
"""

from __future__ import annotations


class DeltaFormatError(ValueError):
    """Base class of every error raised for bad input (files, manifests, arguments, bases)."""

    def __init__(self, what: str, *, expected: object = None, found: object = None, fix: str | None = None):
        self.what = what
        self.expected = expected
        self.found = found
        self.fix = fix
        parts = [what]
        if expected is not None:
            parts.append(f"expected {expected}")
        if found is not None:
            parts.append(f"found {found}")
        message = "; ".join(parts)
        if fix:
            message += f". {fix}"
        super().__init__(message)


class ManifestError(DeltaFormatError):
    """The manifest (``delta_config.json``) is missing, unreadable or does not follow the spec."""


class UnsupportedVersionError(ManifestError):
    """The delta was written with a spec major version this reader does not know."""


class UnknownEncodingError(ManifestError):
    """A parameter names an encoding or index coding that the spec does not define."""


class CorruptDeltaError(DeltaFormatError):
    """Stored tensors are missing, truncated, or disagree with the manifest."""


class UnsafePathError(DeltaFormatError):
    """A file name in the delta points outside its directory (``..``, absolute, symlink)."""


class BaseMismatchError(DeltaFormatError):
    """The base model given or resolved is not the one the delta was made against."""


class NumericalError(DeltaFormatError):
    """Decoding produced non-finite values (NaN/Inf), or a cast overflowed the target dtype."""


class OutputExistsError(DeltaFormatError):
    """The output path exists and overwriting was not asked for."""


class OutputError(DeltaFormatError):
    """The output could not be written: no space left, a file too large, a read-only or
    non-directory parent. Nothing partial is left at the output path."""


class InvalidArgumentError(DeltaFormatError):
    """A function or CLI argument is out of range or inconsistent with the others."""


class UnsupportedOnTheFlyError(InvalidArgumentError):
    """A delta edits a parameter in a way that cannot be applied on the fly (a ``replace`` of a
    matrix, a matrix of a module other than ``nn.Linear``/``nn.Embedding``); it can still be
    loaded materialised with `DeltaModel.from_pretrained` or ``swap_delta``."""


class MissingDependencyError(DeltaFormatError, ImportError):
    """An optional package a feature needs is not installed (the message names the extra)."""


class ResolutionError(DeltaFormatError):
    """A delta or base could not be found locally or on the Hub."""


__all__ = [
    "DeltaFormatError",
    "ManifestError",
    "UnsupportedVersionError",
    "UnknownEncodingError",
    "CorruptDeltaError",
    "UnsafePathError",
    "BaseMismatchError",
    "NumericalError",
    "OutputExistsError",
    "OutputError",
    "InvalidArgumentError",
    "UnsupportedOnTheFlyError",
    "MissingDependencyError",
    "ResolutionError",
]
