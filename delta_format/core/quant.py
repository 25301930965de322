"""Quantised values (SPEC §5.7): b-bit codes in a little-endian bit stream plus one scale per group.

A sequence of values is cut into groups of ``G`` consecutive values (the last group may be
shorter); each group has one scale ``s`` and each value one ``b``-bit code ``c`` (1 <= b <= 8), and

    value = s * (c - (2^b - 1) / 2)                   (a "midrise" grid, symmetric about 0)

rounded once in the compute dtype. Code ``i`` of a stream occupies bits ``[i*b, (i+1)*b)``; bit
``k`` of the stream is bit ``k % 8`` (least significant first) of byte ``k // 8``, as the sign bits
of SPEC §5.3; the padding bits of the last byte are zero.

Why this shape: deltas of fine-tunes are smooth enough that 2-4 bits per value with a 16-bit
scale per 64 values (0.25 bit of scale per value) keep almost all of what 16-bit values keep
(research15: DARE values at 2 bits beat bf16 values; low-rank factors at 4 bits match fp16), and a
uniform grid decodes with one multiply. Scales are stored in float16 when every scale is a
normal float16 number, else in float32 (`scale_dtype`): exactness of the decode, not the 2 bytes,
decides.

The encoder picks each group's scale by ``absmax`` (the largest magnitude lands on the outermost
level) or ``mse`` (the clip ratio on a grid minimising the group's squared error: clipping the few
largest values of a DARE survivor set acts as shrinkage of its noise). Scales are rounded to their
stored dtype before the codes are computed, so decoding gives exactly what the encoder measured.
"""

from __future__ import annotations

import torch

from ..errors import CorruptDeltaError, InvalidArgumentError

MAX_BITS = 8
CLIPS = ("absmax", "mse")
_FP16_NORMAL = (2.0**-14, 65504.0)


def half_range(bits: int) -> float:
    """``(2^b - 1) / 2``: the code that decodes to 0 would be this (it is a half-integer)."""
    return (2**bits - 1) / 2


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of a stream of ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


def group_count(length: int, group: int) -> int:
    """Groups (scales) of a sequence of ``length`` values cut every ``group`` values."""
    return (length + group - 1) // group


def check_bits_group(bits: object, group: object) -> tuple[int, int]:
    """``bits`` in [1, 8] and ``group`` >= 1, both integers (bools are not)."""
    for what, value, low, high in (("bits", bits, 1, MAX_BITS), ("group", group, 1, 2**30)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidArgumentError(
                f"invalid quantisation {what}", expected=f"an integer in [{low}, {high}]", found=repr(value)
            )
    return bits, group


def default_clip(bits: int) -> str:
    """MSE-clipped scales at 2 bits or fewer (they shrink the few outliers that would waste the
    grid), absmax above (research15 measured no gain from clipping at 3-4 bits)."""
    return "mse" if bits <= 2 else "absmax"


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (integers in ``[0, 2^bits)``, any shape, flattened) as a little-endian bit stream of
    ``packed_bytes(n, bits)`` uint8."""
    flat = codes.reshape(-1).to(torch.int64)
    shifts = torch.arange(bits, dtype=torch.int64, device=flat.device)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = 1 << torch.arange(8, dtype=torch.int64, device=flat.device)
    return (stream.view(-1, 8) * weights).sum(1).to(torch.uint8)


UNPACK_GROUPS = 1 << 16
"""Groups of 8 codes unpacked at once (temporaries of ~6 MiB)."""


def unpack_codes(packed: torch.Tensor, bits: int, count: int, name: str = "") -> torch.Tensor:
    """``count`` codes of ``bits`` bits from a stream, as uint8 (at 8 bits, ``packed`` itself),
    refusing a stream of the wrong length or with nonzero padding bits (a corrupt or foreign
    file, never a silent wrong value)."""
    want = packed_bytes(count, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != want:
        raise CorruptDeltaError(
            f"quantised codes of {name!r} have the wrong layout",
            expected=f"{want} uint8 bytes for {count} codes of {bits} bits",
            found=f"{tuple(packed.shape)} {packed.dtype}",
            fix="the delta is corrupt; re-create it",
        )
    used = count * bits % 8
    if used and int(packed[-1]) >> used:
        raise CorruptDeltaError(
            f"quantised codes of {name!r} have nonzero padding bits",
            expected="zero bits after the last code",
            found=f"last byte {int(packed[-1]):#04x}",
            fix="the delta is corrupt; re-create it",
        )
    if bits == 8:
        return packed
    # Every 8 codes fill exactly ``bits`` bytes: read each such group as one little-endian word and
    # shift the 8 codes out of it, a chunk of groups at a time, so the temporaries stay a few MiB
    # whatever the stream's length (one int64 per bit, as before, was 16 bytes a bit).
    groups = (count + 7) // 8
    padded = packed
    if groups * bits > packed.numel():
        padded = torch.cat([packed, packed.new_zeros(groups * bits - packed.numel())])
    padded = padded.view(groups, bits)
    byte_weights = 1 << (8 * torch.arange(bits, dtype=torch.int64, device=packed.device))
    code_shifts = bits * torch.arange(8, dtype=torch.int64, device=packed.device)
    out = torch.empty(groups * 8, dtype=torch.uint8, device=packed.device)
    for start in range(0, groups, UNPACK_GROUPS):
        chunk = padded[start : start + UNPACK_GROUPS].to(torch.int64)
        words = (chunk * byte_weights).sum(1, keepdim=True)
        codes = (words >> code_shifts).bitwise_and_((1 << bits) - 1)
        out[start * 8 : start * 8 + codes.numel()] = codes.view(-1)
    return out[:count]


def scale_dtype(scales: torch.Tensor) -> torch.dtype:
    """float16 when every nonzero scale is a normal float16 number (no precision lost to
    subnormals, nothing overflows), else float32."""
    magnitude = scales.abs()
    nonzero = magnitude[magnitude > 0]
    low, high = _FP16_NORMAL
    fits = not nonzero.numel() or (float(nonzero.min()) >= low and float(nonzero.max()) <= high)
    return torch.float16 if fits else torch.float32


def sixteen_bit(values: torch.Tensor) -> torch.dtype:
    """The 16-bit float to store ``values`` in: float16 (11 significant bits) where every value fits
    and its rounding error is no larger than bfloat16's (8 bits, float32's range), else bfloat16.
    The rounding of both is measured on the values themselves, so tiny deltas that would lose
    their precision to float16 subnormals go to bfloat16."""
    flat = values.reshape(-1).float()
    if not flat.numel():
        return torch.float16
    if float(flat.abs().max()) > _FP16_NORMAL[1]:
        return torch.bfloat16
    error = {
        dtype: float((flat.to(dtype).float() - flat).double().square().sum())
        for dtype in (torch.float16, torch.bfloat16)
    }
    return torch.float16 if error[torch.float16] <= error[torch.bfloat16] else torch.bfloat16


def quantize(
    rows: torch.Tensor, bits: int, group: int, clip: str | None = None, stored: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of each row of ``rows`` (``[m, L]``), groups of ``group`` along a row.

    Returns ``(codes [m, L] int64, scales [m, ceil(L / group)])``, the scales in ``stored`` (default
    `scale_dtype`'s choice). A 1-D input is one row. ``clip`` defaults to `default_clip`."""
    check_bits_group(bits, group)
    clip = clip or default_clip(bits)
    if clip not in CLIPS:
        raise InvalidArgumentError("unknown clipping rule", expected=CLIPS, found=repr(clip))
    x = rows.reshape(1, -1) if rows.dim() == 1 else rows
    m, length = x.shape
    pad = (-length) % group
    padded = torch.cat([x.float(), x.new_zeros(m, pad, dtype=torch.float32)], 1) if pad else x.float()
    grouped = padded.reshape(m, -1, group)
    half = half_range(bits)
    amax = grouped.abs().amax(2)
    scales = amax / half
    if bits == 1:  # two levels +-s/2: the L2-optimal s/2 is the mean magnitude (BitDelta's scale)
        counts = torch.full_like(amax, group)
        if pad:
            counts[:, -1] = group - pad
        scales = 2 * grouped.abs().sum(2) / counts
    elif clip == "mse":
        scales = _mse_scales(grouped, scales, half, length)
    scales = scales.to(stored or scale_dtype(scales))
    safe = scales.float().masked_fill(scales == 0, 1.0).unsqueeze(2)
    codes = torch.clamp(torch.round(grouped / safe + half), 0, 2 * half).to(torch.int64)
    codes = codes.masked_fill((scales == 0).unsqueeze(2), int(half))  # round toward 0 in an all-zero group
    return codes.reshape(m, -1)[:, :length], scales


def _mse_scales(grouped: torch.Tensor, absmax: torch.Tensor, half: float, length: int) -> torch.Tensor:
    """Per group, the scale of smaller squared error between absmax's and two Lloyd steps (assign
    codes, then the least-squares scale for them) from a clipped start: within 1 % of a 15-point
    grid search at 2-3 bits on Gaussian data, at a sixth of its time."""
    valid = (torch.arange(grouped.shape[1] * grouped.shape[2], device=grouped.device) < length).view(
        1, *grouped.shape[1:]
    )

    def levels(scale: torch.Tensor) -> torch.Tensor:
        safe = scale.clamp(min=1e-30).unsqueeze(2)
        return (torch.clamp(torch.round(grouped / safe + half), 0, 2 * half) - half) * valid

    def error(scale: torch.Tensor) -> torch.Tensor:
        return (levels(scale) * scale.unsqueeze(2) - grouped).square().sum(2)

    scale = absmax * (0.6 if half < 2 else 0.8)
    for _ in range(2):
        lv = levels(scale)
        scale = (grouped * lv).sum(2) / lv.square().sum(2).clamp(min=1e-30)
    return torch.where(error(scale) < error(absmax), scale, absmax)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, group: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Values of codes ``[m, L]`` with scales ``[m, ceil(L / group)]``: ``s * (c - (2^b - 1) / 2)``
    computed in ``dtype`` (one rounding per value)."""
    x = codes.reshape(1, -1) if codes.dim() == 1 else codes
    m, length = x.shape
    per_value = scales.to(dtype).reshape(m, -1).repeat_interleave(group, dim=1)[:, :length]
    out = (x.to(dtype) - half_range(bits)) * per_value
    return out.reshape(codes.shape)


def dequantize_range(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, group: int, start: int, stop: int, dtype: torch.dtype
) -> torch.Tensor:
    """`dequantize` of ``codes[..., start:stop]`` only (the same values), for a decode a block at a
    time: from the first whole group the range touches, the leading values then dropped."""
    first, end = start // group, (stop + group - 1) // group
    values = dequantize(codes[..., first * group : stop], scales[..., first:end], bits, group, dtype)
    return values[..., start - first * group :]
