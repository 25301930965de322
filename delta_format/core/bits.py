"""Bit packing shared by the ``sign`` encoding and the ``bitmask`` index coding (SPEC §5.3).

Element ``i`` of the flattened tensor is bit ``i % 8`` of byte ``i // 8``, least significant bit
first (numpy's ``bitorder="little"``). Padding bits of the last byte are zero.
"""

from __future__ import annotations

import torch

from ..errors import CorruptDeltaError

_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def packed_length(numel: int) -> int:
    """Bytes needed for ``numel`` bits."""
    return (numel + 7) // 8


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (any shape, flattened row-major) into uint8, 8 flags per byte."""
    flat = flags.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def check_packed(packed: torch.Tensor, numel: int) -> None:
    """Refuse a packed tensor of the wrong length or with non-zero padding bits."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_length(numel):
        raise CorruptDeltaError(
            "packed bits have the wrong layout",
            expected=f"a 1-D uint8 tensor of {packed_length(numel)} bytes for {numel} elements",
            found=f"{tuple(packed.shape)} {packed.dtype}",
            fix="re-create the delta; its bit tensors do not match the declared shape",
        )
    if numel % 8 and packed.numel() and int(packed[-1]) >> (numel % 8):
        raise CorruptDeltaError(
            "packed bits have non-zero padding",
            expected="zero bits after the last element",
            found=f"last byte {int(packed[-1]):#04x}",
            fix="re-create the delta with a conforming writer",
        )


def bit_range(packed: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """Flags ``first`` to ``last - 1`` of packed bits as a uint8 tensor of 0s and 1s (no checks)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[first // 8 : (last + 7) // 8].unsqueeze(1) >> shifts) & 1
    return bits.view(-1)[first % 8 : first % 8 + last - first]


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first ``numel`` flags as a bool tensor on ``packed``'s device."""
    check_packed(packed, numel)
    return bit_range(packed, 0, numel).bool()


def count_bits(packed: torch.Tensor) -> int:
    """Number of set bits (population count) of a uint8 tensor."""
    table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64, device=packed.device)
    return int(table[packed.long()].sum())


_SIGN_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[256, 8]`` table: row ``b`` holds ``+1``/``-1`` for the 8 bits of byte ``b`` (LSB first)."""
    key = (dtype, torch.device(device))
    if key not in _SIGN_TABLES:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _SIGN_TABLES[key] = (bits * 2 - 1).to(dtype=dtype, device=device)
    return _SIGN_TABLES[key]


def expand_signs(bits: torch.Tensor, first: int, last: int, table: torch.Tensor) -> torch.Tensor:
    """Elements ``first`` to ``last - 1`` of packed sign bits as ``+1``/``-1`` (bit 1 is ``+``),
    flat, taken from the 256 x 8 ``table`` (`sign_table`, optionally times a per-tensor scale
    folded in). The one sign expansion that decoding, row-wise loading and on-the-fly products
    share.

    On the CPU one gather of a table row per byte, far cheaper than per-bit shifts. Elsewhere bit
    tests and a select: a GPU gathers 8-element rows far below its bandwidth (161 us for a
    2.9 MB tensor on an H200, benchmarks/RESULTS.md). Both give the table's own entries, so the
    same bits."""
    chunk = bits[first // 8 : (last + 7) // 8]
    if chunk.device.type == "cpu":
        signs = torch.index_select(table, 0, chunk.to(torch.int32))
    else:
        signs = _select_signs(chunk, table)
    return signs.view(-1)[first % 8 : first % 8 + last - first]


_BIT_MASKS: dict[torch.device, torch.Tensor] = {}


def _select_signs(chunk: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[chunk]`` for a sign table (every ``+`` entry equal, every ``-`` entry equal), elementwise."""
    masks = _BIT_MASKS.get(chunk.device)
    if masks is None:  # once per device, as `sign_table`: no host-to-device copy per row block
        masks = _BIT_MASKS[chunk.device] = torch.tensor(_WEIGHTS, dtype=torch.uint8, device=chunk.device)
    return torch.where(chunk.unsqueeze(1).bitwise_and(masks).bool(), table[255, 0], table[0, 0])


def signs_at(bits: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``+1``/``-1`` at arbitrary flat ``positions`` (random access, e.g. embedding rows)."""
    return ((bits[positions >> 3] >> (positions & 7)) & 1).to(dtype).mul_(2).sub_(1)
