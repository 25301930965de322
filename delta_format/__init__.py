"""delta-format: publish a fine-tuned model as a compact, verifiable delta against its base.

Layers, each a folder, imports pointing one way (see ``delta_format/README.md``):

* ``core``: the format itself (spec constants, manifest, encodings, seeded mask, fingerprint,
  reconstruction arithmetic); torch and the standard library only.
* ``io``: bytes on disk and on the Hub (reader, writer, checkpoints, resolution, the `Delta`
  object and its model card); adds safetensors and huggingface_hub.
* ``methods``: the edit methods (DARE, BitDelta, low rank, ...); they know nothing about files.
* ``compression``: the streaming compressor (sources, plan, pipeline, measurement, calibration).
* ``loaders``: a delta on a base as a transformers model (materialised, swapped, on the fly),
  apply, verify and export as a PEFT LoRA adapter; imports transformers and accelerate lazily.
* ``integrations``: a loaded delta as another library's model (sentence-transformers).
"""

from __future__ import annotations

__version__ = "0.1.0"

import logging  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())  # the library logs; the application shows

from .errors import *  # noqa: E402,F401,F403
from .errors import __all__ as _error_names  # noqa: E402

_LAZY = {
    "DeltaReader": ".io.reader",
    "DeltaWriter": ".io.writer",
    "Manifest": ".core.manifest",
    "TensorEntry": ".core.manifest",
    "BaseReference": ".core.manifest",
    "reconstruct": ".core.reconstruct",
    "compress": ".compression",
    "Delta": ".io.delta",
    "DeltaModel": ".loaders",
    "attach_deltas": ".loaders.onthefly",
    "set_active_delta": ".loaders.onthefly",
    "using_delta": ".loaders.onthefly",
    "detach_deltas": ".loaders.onthefly",
    "load_on_the_fly": ".loaders.onthefly",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'delta_format' has no attribute {name!r}")


__all__ = ["__version__", *_error_names, *_LAZY]
