"""Seeded stochastic rounding of a reconstructed parameter to half precision (SPEC §9.1, spec 1.3).

A lossy delta on a bfloat16 model is mostly smaller than the spacing of the weights it is added
to: bfloat16 keeps 8 significant bits, so a correction under half a unit in the last place of
its weight is rounded away by the final cast. Rounding to nearest turns that loss into a
coherent error (every small correction lost, in the delta's own direction); rounding up or down
with probability given by the distance keeps the correction in expectation and leaves noise,
which a network tolerates far better (benchmarks/RESULTS.md: SmolLM2-135M, per-row signs kept
67 % of the fine-tune's gain with nearest rounding, 72 % with this, as in float32).

The dither is the seeded-mask hash (SPEC §6) of each element's flat index, so every device and
every order of evaluation gets the same bits, and a value the dtype holds exactly (every
parameter of a lossless delta) is returned unchanged.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .constants import ROUNDING_SEED
from .seeded_mask import _uniform32, stream_key, uniform_at

DITHER_BITS = 16
"""Bits of each element's dither ``d``: the top 16 of its 32-bit hash."""


@lru_cache(maxsize=4096)
def rounding_key(name: str) -> int:
    """The dither stream's key of parameter ``name``: SPEC §6's ``key(ROUNDING_SEED, name)``."""
    return stream_key(ROUNDING_SEED, name)


def stochastic_cast(
    acc: torch.Tensor, dtype: torch.dtype, key: int, offset: int = 0, counters: torch.Tensor | None = None
) -> torch.Tensor:
    """``acc`` (float32) rounded to ``dtype`` (bfloat16 or float16) as SPEC §9.1 says: ``t`` the
    value toward zero, ``a`` the next one away from zero, ``f = (|acc| - |t|) / (|a| - |t|)``;
    ``a`` if ``d < f · 2**16`` (``d`` the dither of the element's flat index ``offset + i``), else
    ``t``; where ``a`` is infinite (``t`` is the largest finite magnitude) or ``acc`` is not finite,
    the nearest value, as without this rule (an overflow stays an infinity, an error for the
    caller; a NaN stays a NaN). ``counters``
    (int64, ``acc``'s shape) gives each element's flat index instead, for rows gathered from a
    parameter (an embedding's lookups)."""
    flat = acc.reshape(-1)
    if counters is None:  # u(key, k), k = offset, offset + 1, ...
        dither = _uniform32(key, offset, flat.numel(), acc.device)
    else:
        dither = uniform_at(key, counters.reshape(-1))
    dither.bitwise_right_shift_(32 - DITHER_BITS).bitwise_and_(0xFFFF)  # the top 16 bits (the shift is arithmetic)
    if dtype == torch.bfloat16:  # bfloat16 is float32's top half: t and f · 2**16 are bit fields of acc
        # a iff d < f·2**16 (acc's low 16 bits), i.e. iff low + (0xFFFF - d) carries into t: one add
        # on the pattern (two's complement addition is the unsigned one; the magnitude grows)
        carried = dither.neg_().add_(0xFFFF).add_(flat.view(torch.int32))
        rounded = carried.bitwise_right_shift_(16).to(torch.int16).view(dtype)
        if _inside_bfloat16(flat):  # no t = ±max (where a is ±inf), no inf, no NaN: the common case
            return rounded.view(acc.shape)
        nearest = flat.to(dtype)
        edge = (flat.view(torch.int32) >> 16).bitwise_and_(0x7FFF) >= 0x7F7F
        return torch.where(edge, nearest, rounded).view(acc.shape)
    nearest = flat.to(dtype)
    toward, away = _toward_and_away(flat, nearest)
    edge = ~torch.isfinite(away)  # t = ±max, or acc is not finite
    f = (flat.abs() - toward.float().abs_()).div_((away.float() - toward.float()).abs_())
    rounded = torch.where(dither.float() < f.mul_(2.0**16), away, toward)
    return torch.where(edge, nearest, rounded).view(acc.shape)


BFLOAT16_EDGE = float(torch.tensor(0x7F7F0000, dtype=torch.int32).view(torch.float32))
"""The smallest magnitude whose value toward zero is bfloat16's largest finite one."""


def _inside_bfloat16(flat: torch.Tensor) -> bool:
    """Whether every element of ``flat`` is finite and below `BFLOAT16_EDGE` in magnitude (one pass;
    a NaN fails every comparison)."""
    if not flat.numel():
        return True
    low, high = torch.aminmax(flat)
    return bool(torch.stack([high < BFLOAT16_EDGE, low > -BFLOAT16_EDGE]).all())


def _toward_and_away(acc: torch.Tensor, nearest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The half-precision neighbours of float32 ``acc`` toward and away from zero, from its nearest
    value (one of them: ``t`` where it is not past ``acc``, an exact ``acc`` included) and the
    pattern one unit of magnitude from it (the low 15 bits; the sign bit is ``acc``'s, -0 too)."""
    bits = nearest.view(torch.int16).to(torch.int32)
    beyond = nearest.float().abs() > acc.abs()  # nearest rounded away from zero: t is one step in
    other = bits.add_(torch.where(beyond, -1, 1)).to(torch.int16).view(nearest.dtype)
    return torch.where(beyond, other, nearest), torch.where(beyond, nearest, other)
