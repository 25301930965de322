"""delta-format: publish a fine-tuned model as a compact, verifiable delta against its base.

The format core (`encodings`, `manifest`, `reader`, `writer`, `fingerprint`) imports only torch,
safetensors and the standard library; the loader and the Hub pieces import transformers,
accelerate and huggingface_hub lazily, on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import *  # noqa: E402,F401,F403
from .errors import __all__ as _error_names  # noqa: E402

_LAZY = {
    "DeltaReader": ".reader",
    "DeltaWriter": ".writer",
    "Manifest": ".manifest",
    "TensorEntry": ".manifest",
    "BaseReference": ".manifest",
    "reconstruct": ".reconstruct",
    "compress": ".compressor",
    "Delta": ".delta",
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
