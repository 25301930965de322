"""The encodings of SPEC §5, one module each; importing this package registers them.

Adding an encoding is one module with one class, ``class X(Encoding, name="x")``, and its import
below (see `delta_format.core.encodings.base` for the contract).
"""

from __future__ import annotations

from .base import ENCODING_CLASSES, Encoding, Expected, encoding_from_dict, on_the_fly_encodings
from .bitdiff import BitdiffEncoding
from .dense import DenseEncoding
from .dense_q import QuantizedDenseEncoding
from .factor import MERGE_MIN_TOKENS, Factor
from .index_codings import index_coding_bytes
from .lowrank import LowRankEncoding
from .lowrank_q import QuantizedLowRankEncoding, bands_for
from .replace import ReplaceEncoding
from .rows_q import QuantizedRowsEncoding
from .sign import SignEncoding
from .sparse import SparseEncoding
from .sparse_q import QuantizedSparseEncoding
from .sum import SumEncoding

__all__ = [
    "Encoding",
    "Expected",
    "ENCODING_CLASSES",
    "encoding_from_dict",
    "on_the_fly_encodings",
    "Factor",
    "MERGE_MIN_TOKENS",
    "DenseEncoding",
    "SparseEncoding",
    "SignEncoding",
    "LowRankEncoding",
    "ReplaceEncoding",
    "BitdiffEncoding",
    "QuantizedDenseEncoding",
    "QuantizedSparseEncoding",
    "QuantizedLowRankEncoding",
    "QuantizedRowsEncoding",
    "SumEncoding",
    "bands_for",
    "index_coding_bytes",
]
