"""On-the-fly serving: several fine-tunes share one base in memory, each kept encoded
(see `delta_format.loaders.onthefly.api`)."""

from ...core.encodings import MERGE_MIN_TOKENS
from ...errors import UnsupportedOnTheFlyError
from .api import attach_deltas, detach_deltas, load_on_the_fly, set_active_delta, using_delta
from .merged_cache import MergedWeightCache
from .modules import DeltaEmbedding, DeltaLinear
from .registry import OnTheFlyDeltas

__all__ = [
    "attach_deltas",
    "set_active_delta",
    "using_delta",
    "detach_deltas",
    "load_on_the_fly",
    "OnTheFlyDeltas",
    "MergedWeightCache",
    "DeltaLinear",
    "DeltaEmbedding",
    "UnsupportedOnTheFlyError",
    "MERGE_MIN_TOKENS",
]
