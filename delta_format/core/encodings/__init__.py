"""The encoding table: name -> class (SPEC §5). Adding an encoding is one class and one entry."""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import UnknownEncodingError
from .base import Encoding, Expected
from .dense import DenseEncoding
from .lowrank import LowRankEncoding
from .replace import ReplaceEncoding
from .sign import SignEncoding
from .sparse import SparseEncoding, index_coding_bytes

ENCODING_CLASSES: dict[str, type[Encoding]] = {
    cls.name: cls for cls in (DenseEncoding, SparseEncoding, SignEncoding, LowRankEncoding, ReplaceEncoding)
}


def encoding_from_dict(name: str, config: Mapping[str, Any]) -> Encoding:
    """Look an encoding up by its manifest name and build it from its config."""
    cls = ENCODING_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UnknownEncodingError(
            "unknown encoding", expected=sorted(ENCODING_CLASSES), found=repr(name),
            fix="upgrade delta-format, or re-create the delta with a known encoding",
        )
    return cls.from_dict(config)


__all__ = [
    "Encoding", "Expected", "ENCODING_CLASSES", "encoding_from_dict", "DenseEncoding", "SparseEncoding",
    "SignEncoding", "LowRankEncoding", "ReplaceEncoding", "index_coding_bytes",
]
