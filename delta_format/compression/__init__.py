"""The streaming compressor: a base and a fine-tune in, a delta directory out.

Tensor sources (checkpoints, in-memory models, LoRA adapters), the method plan (which method
edits which tensor), the pipeline, and the measurement of what was stored.
"""

from .pipeline import compress

__all__ = ["compress"]
