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
from collections.abc import Iterator
from functools import lru_cache

import torch

from ..errors import InvalidArgumentError
from . import native
from .constants import MASK_PROB_BITS, MAX_SEEDED_DROP_THRESHOLD, MAX_SEEDED_GAP_TABLE

_MASK32 = 0xFFFFFFFF
_C1 = 0x7FEB352D
_C2 = 0x846CA68B
_CHUNK = 1 << 22
_BLOCK = {"cpu": 1 << 16}
"""Counters per block when streaming: cache-sized on CPU, one large launch elsewhere."""


def _mulmod32_int(x: int, c: int) -> int:
    return (x * c) & _MASK32


def _mix32_int(x: int) -> int:
    """lowbias32 on a Python int (host side; identical to `_mix32_` below)."""
    x ^= x >> 16
    x = _mulmod32_int(x, _C1)
    x ^= x >> 15
    x = _mulmod32_int(x, _C2)
    x ^= x >> 16
    return x


def _mulmod32_(x: torch.Tensor, c: int, tmp: torch.Tensor) -> torch.Tensor:
    """``x = (x * c) mod 2**32`` in place, for int64 ``x < 2**32``: ``c`` is split into 16-bit
    halves so no product reaches 2**63 (``tmp`` is scratch of ``x``'s shape)."""
    torch.mul(x, c >> 16, out=tmp)
    tmp.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(c & 0xFFFF).add_(tmp).bitwise_and_(_MASK32)


def _mix32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place on int64 values in ``[0, 2**32)``."""
    x.bitwise_xor_(x >> 16)
    _mulmod32_(x, _C1, tmp)
    x.bitwise_xor_(x >> 15)
    _mulmod32_(x, _C2, tmp)
    return x.bitwise_xor_(x >> 16)


def tensor_id(name: str) -> int:
    """First four bytes (big-endian) of SHA-256 of the UTF-8 tensor name."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big")


def stream_key(seed: int, name: str) -> int:
    """The 32-bit key of one tensor's stream: ``mix(mix(mix(seed_lo) ^ seed_hi) ^ tensor_id)``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise InvalidArgumentError("invalid mask seed", expected="an integer in [0, 2**64)", found=repr(seed))
    lo, hi = seed & _MASK32, seed >> 32
    return _mix32_int(_mix32_int(_mix32_int(lo) ^ hi) ^ tensor_id(name))


def _signed32(c: int) -> int:
    """The int32 holding the 32 bits of ``c`` in [0, 2**32)."""
    return c - (1 << 32) if c >= 1 << 31 else c


def _mix32_wrapping_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place on int32 tensors holding 32-bit values (the same bits as `_mix32_`).

    int32 products wrap modulo 2**32 (two's complement, on CPU and CUDA), which is exactly the
    ``mod 2**32`` product the hash wants, and an arithmetic right shift masked to the bits that
    remain is a logical one: half the bytes per element of the int64 form and a third of its
    operations (2.3 vs 8.4 ns per counter for the whole stream on one CPU core)."""
    x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF))
    x.mul_(_signed32(_C1))
    x.bitwise_xor_((x >> 15).bitwise_and_(0x1FFFF))
    x.mul_(_signed32(_C2))
    return x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF))


def _uniform32(key: int, start: int, count: int, device: torch.device | str) -> torch.Tensor:
    """`uniform_stream` as int32 tensors holding the 32 bits of each ``u_k``."""
    if start + count <= 1 << 31:
        k_lo = torch.arange(start, start + count, dtype=torch.int32, device=device)
    else:  # the low 32 bits of each counter, as the int32 holding them
        k = torch.arange(start, start + count, dtype=torch.int64, device=device)
        k_lo = k.bitwise_and(_MASK32).bitwise_xor_(1 << 31).sub_(1 << 31).to(torch.int32)
    x = _mix32_wrapping_(k_lo.bitwise_xor_(_signed32(key)))
    if start + count > 1 << 32:
        x.bitwise_xor_((k >> 32).to(torch.int32))
    return _mix32_wrapping_(x)


def uniform_at(key: int, counters: torch.Tensor) -> torch.Tensor:
    """``u_k`` for each int64 counter ``k`` of ``counters`` (any order, on their device), as int32
    tensors holding the 32 bits of each: `uniform_stream` read at given places."""
    k_lo = counters.bitwise_and(_MASK32).bitwise_xor_(1 << 31).sub_(1 << 31).to(torch.int32)
    x = _mix32_wrapping_(k_lo.bitwise_xor_(_signed32(key)))
    x.bitwise_xor_((counters >> 32).to(torch.int32))  # k_hi is 0 below 2**32: no host check, no wait
    return _mix32_wrapping_(x)


def uniform_stream(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``u_k = mix(mix(key ^ k_lo) ^ k_hi)`` for ``k`` in ``[start, start + count)``, as int64 in [0, 2**32)."""
    return _uniform32(key, start, count, device).to(torch.int64).bitwise_and_(_MASK32)


def drop_threshold(p: float) -> int:
    """``P = round_half_even(p * 2**32)``: the integer drop probability the generator uses."""
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= float(p) < 1.0:
        raise InvalidArgumentError("invalid drop rate", expected="p with 0 <= p < 1", found=repr(p))
    threshold = round(float(p) * (1 << MASK_PROB_BITS))
    if threshold >= 1 << MASK_PROB_BITS:
        raise InvalidArgumentError(
            "drop rate too close to 1",
            expected="p * 2**32 rounding below 2**32",
            found=repr(p),
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
    check_gap_table(p)  # so the loop below ends within the limit
    t = 1 << MASK_PROB_BITS
    while True:
        t = (t * big_p) >> MASK_PROB_BITS
        if t == 0:
            return tuple(table)
        table.append(t)


def check_gap_table(p: float) -> None:
    """Refuse (`InvalidArgumentError`) a p whose gap table would exceed the limit, in O(1).

    Each ``T_g`` is non-decreasing in ``P`` (induction: ``(t * P) >> 32`` grows with both), so the
    table's length is too: it is within the limit exactly when ``P <= MAX_SEEDED_DROP_THRESHOLD``.
    Computing the table to find out costs up to 2**18 steps (~30 ms), which a manifest of
    thousands of seeded entries with distinct p would turn into minutes (SPEC §8.10).
    """
    if drop_threshold(p) > MAX_SEEDED_DROP_THRESHOLD:
        raise InvalidArgumentError(
            "drop rate too close to 1 for a seeded mask",
            expected=f"a gap table of at most {MAX_SEEDED_GAP_TABLE} entries (p <= about 0.99995)",
            found=f"p={p}",
            fix="use a smaller p or an explicit index coding",
        )


_BUCKET_SHIFT = 20
"""Gap lookup buckets: ``u >> 20``, 4096 buckets of 2**20 values of ``u``."""


@lru_cache(maxsize=16)
def _gap_lookup(p: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Tables that count thresholds above ``u`` without a binary search (an implementation detail;
    the result is exactly ``#{g : T_g > u}``).

    For bucket ``b = u >> 20``: ``above[b]`` thresholds lie at or above the bucket's end, so they all
    exceed ``u``; a bucket holding exactly one threshold keeps it in ``inside[b]`` (0 when none). Only
    values of ``u`` below ``exact_below`` can meet a bucket with several thresholds (the table gets
    dense near 0); those few take the binary search.
    """
    ascending = torch.tensor(gap_table(p)[::-1], dtype=torch.int64)
    count = ascending.numel()
    edges = torch.arange((1 << (MASK_PROB_BITS - _BUCKET_SHIFT)) + 1, dtype=torch.int64) << _BUCKET_SHIFT
    at_or_above = count - torch.searchsorted(ascending, edges)  # thresholds >= each edge
    above, n_inside = at_or_above[1:], at_or_above[:-1] - at_or_above[1:]
    first_inside = torch.searchsorted(ascending, edges[:-1]).clamp_(max=max(count - 1, 0))
    inside = torch.where(n_inside == 1, ascending[first_inside], torch.zeros_like(above))
    several = (n_inside > 1).nonzero()
    exact_below = int(edges[int(several.max()) + 1]) if several.numel() else 0
    # int32 tables for the int32 stream: counts as they are, thresholds in flipped order (0 stays
    # "none": its flipped form is the int32 minimum, which no flipped u is below).
    inside32 = inside.sub(1 << 31).to(torch.int32)
    return ascending.to(device), above.to(torch.int32).to(device), inside32.to(device), exact_below


def gaps(p: float, key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Gap ``g_k`` (dropped elements before the k-th kept one) for counters ``[start, start+count)``:
    the number of thresholds ``T_g`` of `gap_table` above ``u_k``."""
    return _gaps(p, key, start, count, torch.device(device)).to(torch.int64)


_FLIP = -(1 << 31)
"""``x ^ _FLIP`` turns the int32 holding ``u`` into the int32 ``u - 2**31``: signed comparisons of
those order the ``u`` as unsigned ones would."""


def _gaps(p: float, key: int, start: int, count: int, device: torch.device) -> torch.Tensor:
    """`gaps` as int32 or int64 (whichever is cheaper to produce)."""
    if not gap_table(p):
        return torch.zeros(count, dtype=torch.int32, device=device)
    ascending, above, inside, exact_below = _gap_lookup(p, device)
    x = _uniform32(key, start, count, device)
    if exact_below > 1 << (MASK_PROB_BITS - 1):  # p near 1: most draws would need the search anyway
        u = x.to(torch.int64).bitwise_and_(_MASK32)
        return ascending.numel() - torch.searchsorted(ascending, u, right=True)
    bucket = (x >> _BUCKET_SHIFT).bitwise_and_((1 << (MASK_PROB_BITS - _BUCKET_SHIFT)) - 1)
    flipped = x.bitwise_xor_(_FLIP)
    out = torch.index_select(above, 0, bucket).add_(flipped < torch.index_select(inside, 0, bucket))
    if exact_below:
        low = (flipped < exact_below - (1 << 31)).nonzero().view(-1)
        if low.numel():
            u = flipped[low].bitwise_xor_(_FLIP).to(torch.int64).bitwise_and_(_MASK32)
            out[low] = (ascending.numel() - torch.searchsorted(ascending, u, right=True)).to(torch.int32)
    return out


def iter_kept_positions(
    numel: int, p: float, seed: int, name: str, device: torch.device | str = "cpu", block: int | None = None
) -> Iterator[torch.Tensor]:
    """The seeded mask's kept positions as consecutive ascending int64 blocks (of at most
    ``block`` positions; all blocks together are `kept_positions`).

    Consumers that walk a tensor front to back (the loader adds a delta a few rows at a time)
    never hold more than one block, and the block stays in cache while it is used.
    """
    key = stream_key(seed, name)
    drop_threshold(p)  # refuse a bad p before using it in arithmetic (and for numel 0 too)
    device = torch.device(device)
    block = block or _BLOCK.get(device.type, _CHUNK)
    start, offset = 0, 0  # offset: the first position not yet covered by a kept element
    while offset < numel:
        # Enough counters to cover the rest in one go on average (capped at a block); a short top-up otherwise.
        count = min(max(int((numel - offset) * (1.0 - p) * 1.01) + 64, 1024), block)
        pos = _positions(p, key, start, count, offset, device)
        last = int(pos[-1])
        if last >= numel:
            yield pos[: int(torch.searchsorted(pos, numel))]
            return
        yield pos
        start += count
        offset = last + 1


def _positions(p: float, key: int, start: int, count: int, offset: int, device: torch.device) -> torch.Tensor:
    """``offset - 1 + cumsum(gap_k + 1)`` for counters ``[start, start + count)``: one native loop
    on the CPU where the extension is built, else torch ops (the same values)."""
    if device.type == "cpu" and gap_table(p):
        pos = native.seeded_positions(native_stream(p, key), start, count, offset)
        if pos is not None:
            return pos
    return torch.cumsum(_gaps(p, key, start, count, device).add_(1), 0, dtype=torch.int64).add_(offset - 1)


def native_stream(p: float, key: int) -> native.Stream:
    """The stream of ``key`` at drop rate ``p`` (a non-empty gap table) as the native loops take it."""
    return native.Stream(key, *_gap_lookup(p, torch.device("cpu")))


def native_walk(numel: int, p: float, seed: int, name: str, count: int) -> tuple[native.Stream, torch.Tensor] | None:
    """The stream and `native.seeded_checkpoints` of a seeded mask that keeps exactly ``count``
    positions of a ``numel``-element tensor (the ``count``-th below ``numel``, the next one not),
    for the native one-pass loop; None where the loop cannot take it or the count is wrong (the
    walk of `iter_kept_positions` then reports it)."""
    if not gap_table(p) or not native.available():
        return None
    stream = native_stream(p, stream_key(seed, name))
    checkpoints = native.seeded_checkpoints(stream, count)
    if checkpoints is None:
        return None
    last = int(checkpoints[-1])  # counter count - 1's position (-1 for none)
    beyond = native.seeded_positions(stream, count, 1, last + 1)
    if beyond is None or last >= numel or int(beyond[0]) < numel:
        return None
    return stream, checkpoints


def kept_positions(numel: int, p: float, seed: int, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sorted flat indices (int64) that a seeded mask keeps in a tensor of ``numel`` elements."""
    blocks = list(iter_kept_positions(numel, p, seed, name, device))
    if not blocks:
        return torch.empty(0, dtype=torch.int64, device=device)
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def kept_mask(numel: int, p: float, seed: int, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The seeded mask as a bool tensor of ``numel`` elements (True = kept)."""
    mask = torch.zeros(numel, dtype=torch.bool, device=device)
    mask[kept_positions(numel, p, seed, name, device)] = True
    return mask
