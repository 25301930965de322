"""The streaming compressor: a base and a fine-tune in, a delta directory out.

``sources`` reads the models (the `TensorSource` protocol: checkpoints, in-memory models; ``lora``
adds PEFT adapters; ``carried_files`` which of the fine-tune's other files and card metadata
travel with the delta), ``plan`` decides which method edits which tensor and what happens to the
rest, ``steps`` is the per-tensor step, ``measure`` what is recorded about what was stored, and
``pipeline`` holds `compress`, which drives them. ``calibration`` is the optional in-memory
session on calibration texts.
"""

from .pipeline import compress

__all__ = ["compress"]
