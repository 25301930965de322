"""Loading deltas into transformers models (imports transformers and accelerate lazily)."""

from .delta_model import DeltaModel
from .onthefly import (
    UnsupportedOnTheFlyError,
    attach_deltas,
    detach_deltas,
    load_on_the_fly,
    set_active_delta,
    using_delta,
)

__all__ = [
    "DeltaModel",
    "attach_deltas",
    "set_active_delta",
    "using_delta",
    "detach_deltas",
    "load_on_the_fly",
    "UnsupportedOnTheFlyError",
]
