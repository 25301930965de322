"""Loading deltas into transformers models (imports transformers and accelerate lazily)."""

from .delta_model import DeltaModel

__all__ = ["DeltaModel"]
