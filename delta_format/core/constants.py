"""Every name, version, bit order and limit of the on-disk format, in one place.

The values here are normative: they are the ones `spec/SPEC.md` states. Change them only
together with the spec (and bump `SPEC_VERSION` when the bytes on disk change meaning).
"""

from __future__ import annotations

FORMAT_NAME = "delta-format"
"""Value of the manifest's ``format`` field (SPEC §3)."""

SPEC_VERSION = (1, 7)
"""(major, minor) written by this implementation. A reader accepts any minor of a major it
knows and refuses a newer major (SPEC §3.1)."""

SUPPORTED_MAJOR_VERSIONS = (1,)

MANIFEST_NAME = "delta_config.json"
WEIGHTS_NAME = "delta.safetensors"
WEIGHTS_INDEX_NAME = "delta.safetensors.index.json"
SHARD_NAME_TEMPLATE = "delta-{index:05d}-of-{total:05d}.safetensors"
MODEL_CARD_NAME = "README.md"

STORED_KEY_SEPARATOR = ":"
"""A stored tensor is named ``<parameter name>:<role>`` (SPEC §4)."""

# Encoding names (SPEC §5).
DENSE = "dense"
SPARSE = "sparse"
SIGN = "sign"
LOWRANK = "lowrank"
REPLACE = "replace"
# Quantised-value encodings (SPEC §5.7-§5.10, spec 1.1).
DENSE_Q = "dense-q"
SPARSE_Q = "sparse-q"
LOWRANK_Q = "lowrank-q"
# Parts of other encodings added up (SPEC §5.11, spec 1.2).
SUM = "sum"
# A few rows of a matrix as codes (SPEC §5.12, spec 1.4).
ROWS_Q = "rows-q"
ENCODINGS = (DENSE, SPARSE, SIGN, LOWRANK, REPLACE, DENSE_Q, SPARSE_Q, LOWRANK_Q, SUM, ROWS_Q)

# Rounding of the reconstructed parameter to a half-precision dtype (SPEC §9.1, spec 1.3).
ROUNDING_NEAREST = "nearest"
ROUNDING_STOCHASTIC = "stochastic"
ROUNDING_WINDOW = "stochastic-window"
"""Stochastic rounding with each row's dither a window of one hashed table per parameter (spec 1.6)."""
ROUNDINGS = (ROUNDING_NEAREST, ROUNDING_STOCHASTIC, ROUNDING_WINDOW)
ROUNDING_SEED = 0x726F756E64
"""Seed of the stochastic rounding's dither stream (``b"round"`` read big-endian, SPEC §9.1)."""
WINDOW_SEED = 0x77696E646F77
"""Seed of ``"stochastic-window"``'s table, one for every parameter (``b"window"`` big-endian, SPEC §9.1)."""
WINDOW_OFFSETS = 1 << 20
"""``"stochastic-window"``: a row's offset into the table is below this (SPEC §9.1)."""

BASE_ROWS = "base_rows"
"""Config key of a delta entry whose parameter has more rows than the base's (a resized
vocabulary): the base, extended with zero rows, is what the delta is added to (SPEC §9.2, 1.5)."""
MAX_ADDED_ROWS = 1 << 16
"""A ``base_rows`` entry adds at most max(base_rows, this) rows (SPEC §8.1): what a load allocates
stays bounded by the base's size, not by a shape that a few stored bytes can declare."""

# Sparse index codings (SPEC §5.2).
INDEX_GAPS = "gaps"
INDEX_BITMASK = "bitmask"
INDEX_SEEDED = "seeded"
INDEX_CODINGS = (INDEX_GAPS, INDEX_BITMASK, INDEX_SEEDED)

BIT_ORDER = "little"
"""Packed bits: element ``i`` of a flattened tensor is bit ``i % 8`` (least significant
first) of byte ``i // 8`` (SPEC §5.3)."""

# dtypes allowed for stored tensors, by safetensors name (SPEC §4.2).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
GAP_DTYPES = ("U8", "U16", "I32", "I64")

# Seeded-mask generator (SPEC §6).
MASK_HASH_NAME = "lowbias32-geometric-v1"
MASK_PROB_BITS = 32

# Base fingerprint (SPEC §7).
FINGERPRINT_ALGORITHM = "sampled-sha256-v1"
FINGERPRINT_FULL_BYTES = 4096
FINGERPRINT_CHUNKS = 64
FINGERPRINT_CHUNK_BYTES = 64

# Limits a reader enforces (SPEC §8).
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_INDEX_BYTES = 64 * 1024 * 1024
MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""A ``config.json`` or ``generation_config.json`` a loader parses (SPEC §8.1): real ones are a
few KB, a classifier's label maps included."""
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSOR_ELEMENTS = 2**40
MAX_RANK_DIMS = 8
MAX_SEEDED_GAP_TABLE = 1 << 18
"""Longest seeded gap table (p up to ~0.99995): bounds the work a hostile manifest can ask for."""
MAX_SEEDED_DROP_THRESHOLD = 4294757041
"""The largest ``P = round(p * 2**32)`` whose gap table has at most `MAX_SEEDED_GAP_TABLE` entries
(p ~ 0.999951): tables grow with ``P``, so comparing ``P`` with it decides the limit in O(1)."""

MAX_ELEMENTS_WITHOUT_BASE = 1 << 28
"""Largest parameter (elements) a reader decodes when no base has vouched for its shape (SPEC §8.7):
1 GiB in float32. A declared shape costs nothing to write, so without a base to compare it with, a
few bytes of sparse or low-rank data could otherwise ask for terabytes."""
