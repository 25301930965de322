"""The seeded-mask generator (SPEC §6): the same kept positions on every device and torch version.

A DARE mask keeps each element with probability ``1 - p``. Storing the kept positions costs more
than the values; storing only a seed is enough if the mask can be regenerated exactly. torch's RNG
differs between CPU and CUDA, so the spec defines its own generator with integer-only arithmetic:

* a counter-based hash ``u_k = H(key, k)`` (``lowbias32`` finaliser, every product kept below
  2**63 so int64 tensor ops give the same bits everywhere), where ``key`` mixes the seed and a
  hash of the tensor name;
* each ``u_k`` becomes a geometric gap (the number of dropped elements before the k-th kept one)
  by counting how many thresholds of an integer table exceed it; the table is an exact integer
  recurrence, so no floating-point ``log`` is involved;
* kept positions are ``k + gap_0 + ... + gap_k``: the work is O(kept), not O(numel).

Example:
    >>> idx = kept_positions(1000, p=0.9, seed=7, name="w")
    >>> bool((idx[1:] > idx[:-1]).all())
    True
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import torch

from .constants import MASK_PROB_BITS, MAX_SEEDED_GAP_TABLE
from .errors import InvalidArgumentError

_MASK32 = 0xFFFFFFFF
_C1 = 0x7FEB352D
_C2 = 0x846CA68B
_CHUNK = 1 << 22


def _mulmod32_int(x: int, c: int) -> int:
    return (x * c) & _MASK32


def _mix32_int(x: int) -> int:
    """lowbias32 on a Python int (host side; identical to `_mix32` below)."""
    x ^= x >> 16
    x = _mulmod32_int(x, _C1)
    x ^= x >> 15
    x = _mulmod32_int(x, _C2)
    x ^= x >> 16
    return x


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 with x < 2**32 in int64 without overflow: split c into 16-bit halves.
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mulmod32(x, _C1)
    x = x ^ (x >> 15)
    x = _mulmod32(x, _C2)
    return x ^ (x >> 16)


def tensor_id(name: str) -> int:
    """First four bytes (big-endian) of SHA-256 of the UTF-8 tensor name."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big")


def stream_key(seed: int, name: str) -> int:
    """The 32-bit key of one tensor's stream: ``mix(mix(mix(seed_lo) ^ seed_hi) ^ tensor_id)``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise InvalidArgumentError("invalid mask seed", expected="an integer in [0, 2**64)", found=repr(seed))
    lo, hi = seed & _MASK32, seed >> 32
    return _mix32_int(_mix32_int(_mix32_int(lo) ^ hi) ^ tensor_id(name))


def uniform_stream(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``u_k = mix(mix(key ^ k_lo) ^ k_hi)`` for ``k`` in ``[start, start + count)``, as int64 in [0, 2**32)."""
    k = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x = _mix32((k & _MASK32) ^ key)
    return _mix32(x ^ (k >> 32))


def drop_threshold(p: float) -> int:
    """``P = round_half_even(p * 2**32)``: the integer drop probability the generator uses."""
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= float(p) < 1.0:
        raise InvalidArgumentError("invalid drop rate", expected="p with 0 <= p < 1", found=repr(p))
    threshold = round(float(p) * (1 << MASK_PROB_BITS))
    if threshold >= 1 << MASK_PROB_BITS:
        raise InvalidArgumentError(
            "drop rate too close to 1", expected=f"p * 2**32 rounding below 2**32", found=repr(p),
            fix="use a smaller p",
        )
    return threshold


@lru_cache(maxsize=16)
def gap_table(p: float) -> tuple[int, ...]:
    """Thresholds ``T_1 > T_2 > ... > T_G > 0`` with ``T_0 = 2**32`` and ``T_{g+1} = (T_g * P) >> 32``.

    ``P(u < T_g) = T_g / 2**32 ~ p**g``, so counting the thresholds above ``u`` draws a geometric gap.
    """
    big_p = drop_threshold(p)
    table = []
    t = 1 << MASK_PROB_BITS
    while True:
        t = (t * big_p) >> MASK_PROB_BITS
        if t == 0:
            return tuple(table)
        table.append(t)
        if len(table) > MAX_SEEDED_GAP_TABLE:
            raise InvalidArgumentError(
                "drop rate too close to 1 for a seeded mask",
                expected=f"a gap table of at most {MAX_SEEDED_GAP_TABLE} entries",
                found=f"p={p}", fix="use a smaller p or an explicit index coding",
            )


@lru_cache(maxsize=16)
def _ascending_table(p: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(gap_table(p)[::-1], dtype=torch.int64, device=device)


def gaps(p: float, key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Gap ``g_k`` (dropped elements before the k-th kept one) for counters ``[start, start+count)``."""
    table = gap_table(p)
    if not table:
        return torch.zeros(count, dtype=torch.int64, device=device)
    ascending = _ascending_table(p, torch.device(device))
    u = uniform_stream(key, start, count, device)
    return len(table) - torch.searchsorted(ascending, u, right=True)


def kept_positions(numel: int, p: float, seed: int, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sorted flat indices (int64) that a seeded mask keeps in a tensor of ``numel`` elements."""
    key = stream_key(seed, name)
    drop_threshold(p)  # refuse a bad p before using it in arithmetic (and for numel 0 too)
    device = torch.device(device)
    chunks = []
    start, offset = 0, 0  # offset: the first position not yet covered by a kept element
    while offset < numel:
        # Enough counters to cover the rest in one go on average; a short top-up otherwise.
        count = min(max(int((numel - offset) * (1.0 - p) * 1.01) + 64, 1024), _CHUNK)
        pos = torch.cumsum(gaps(p, key, start, count, device) + 1, 0) + (offset - 1)
        last = int(pos[-1])
        if last >= numel:
            chunks.append(pos[: int(torch.searchsorted(pos, numel))])
            break
        chunks.append(pos)
        start += count
        offset = last + 1
    if not chunks:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat(chunks)


def kept_mask(numel: int, p: float, seed: int, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The seeded mask as a bool tensor of ``numel`` elements (True = kept)."""
    mask = torch.zeros(numel, dtype=torch.bool, device=device)
    mask[kept_positions(numel, p, seed, name, device)] = True
    return mask
