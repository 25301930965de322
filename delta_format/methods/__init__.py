"""The edit methods, by name (PEFT-style registry). Adding a method is one module and its import below.

Each method is a dataclass of its parameters with an ``edit(name, delta, context) -> Edit`` hook
(`delta_format.methods.base`); it knows nothing about files or the Hub.

============  ======================================================  ==========================
name          what is stored                                          parameters
============  ======================================================  ==========================
dense         Δ itself, checked bit-exact (or the tensor: replace)    —
dare          kept values of a seeded mask, rescale k/(1-p)           p, k
darex         same, rescale 1/q (hand, per tensor or global)          p, q, grid
magnitude     largest |Δ| and their positions                         p
importance    largest |Δ|·||x|| and their positions                   p
structural    largest rows or columns, as sparse                      p, axis
sign          sign bits + a scale per tensor or row (BitDelta)        scale, distill_steps, distill_lr
lowrank       truncated SVD factors                                   rank | energy
lora          a LoRA adapter's own factors                            —
lowrank-q     truncated SVD, factors in 2-8 bit bands (Delta-CoMe)    rank, schedule
budget        per tensor: drop, float16, dense-q, sign, sparse-q or   bits, noise_weight,
              lowrank-q with per-vector bits, chosen for a size;      refine_steps, refine_lr
              low-rank factors refined on calibration outputs
============  ======================================================  ==========================
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidArgumentError
from .base import METHODS, Edit, EditMethod, Param, TensorContext, method_parameters, param
from .budget import BudgetMethod
from .dare import DareMethod
from .darex import DarexMethod

# Importing a method's module registers it; this order is the order the command line lists them.
from .dense import DenseMethod
from .lowrank import LoraMethod, LowRankMethod
from .lowrank_q import QuantizedLowRankMethod
from .magnitude import ImportanceMethod, MagnitudeMethod
from .sign import SignMethod
from .structural import StructuralMethod


def get_method(name: str, **params: Any) -> EditMethod:
    """The method ``name`` with ``params``; unknown names and parameters are errors (a typo must
    not silently mean a default).

    Example:
        >>> get_method("dare", p=0.99)
        DareMethod(p=0.99, k=1.0, value_bits=16)
    """
    cls = METHODS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise InvalidArgumentError("unknown edit method", expected=sorted(METHODS), found=repr(name))
    unknown = set(params) - cls.param_names()
    if unknown:
        raise InvalidArgumentError(
            f"{name} does not take {sorted(unknown)}",
            expected=f"parameters among {sorted(cls.param_names()) or 'none'}",
            found=sorted(params),
        )
    return cls(**params)


__all__ = [
    "METHODS",
    "get_method",
    "method_parameters",
    "param",
    "Param",
    "Edit",
    "EditMethod",
    "TensorContext",
    "DenseMethod",
    "DareMethod",
    "DarexMethod",
    "MagnitudeMethod",
    "ImportanceMethod",
    "StructuralMethod",
    "SignMethod",
    "LowRankMethod",
    "LoraMethod",
    "BudgetMethod",
    "QuantizedLowRankMethod",
]
