"""``bitdiff``: the fine-tune's exact bits, as their integer difference from the base's (SPEC §5.6).

A fine-tune moves most weights by a few units in the last place, and leaves many untouched, so
the difference of the two bit patterns (read as w-bit integers, mod 2^w, zigzag-coded so that
"one up" is 2 and "one down" is 1) is mostly tiny numbers whose high bytes are zero. Split into
byte planes (byte p of every element of a chunk, in order) and compressed with Zstandard, a bf16
fine-tune shrinks to about a fifth of its bytes (0.177 on a real MiniLM fine-tune, where zstd of
the file gives 0.78 and ZipNN 0.665; benchmarks/RESULTS.md). The integer difference beats the
XOR of the patterns (9-15 % smaller): a change that carries across bits (0x3c00 -> 0x3bff) flips
many XOR bits but is a difference of one.

It is lossless for every value (NaN payloads, infinities, -0.0 included) and involves no
floating-point arithmetic, but it is a *value*, like ``replace``: it needs the base's exact bits
(in the parameter's dtype; SPEC §5.6 rounds a base of another dtype first), cannot be scaled by
alpha except through ``replace``'s rule (SPEC §9), and has no on-the-fly form.

Chunks of ``chunk_elements`` elements (2^17 by default: zstd picks its best parameters for
128 KiB inputs) are independent: encoding and decoding run on a thread pool (zstd releases the
GIL), and a corrupt frame cannot make a reader allocate more than one chunk, because every frame
header is checked against the declared shape before anything is decompressed.

zstandard is an optional dependency (``pip install 'delta-format[zstd]'``): this module imports
without it, and reading a manifest that names ``bitdiff`` says what to install.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ...errors import (
    BaseMismatchError,
    CorruptDeltaError,
    InvalidArgumentError,
    MissingDependencyError,
    UnknownEncodingError,
)
from .base import Encoding, Expected, check_config_keys, config_int

BITDIFF = "bitdiff"
CODEC = "zstd"
"""The only codec of SPEC 1.1; any other is an unknown encoding."""
DEFAULT_CHUNK_ELEMENTS = 1 << 17
MAX_CHUNK_ELEMENTS = 1 << 22
"""A frame decompresses to at most 4 MiB."""
MAX_WINDOW = 1 << 23
"""Largest zstd window a reader accepts (SPEC §5.6: max(L, 2^23), and L <= 2^22)."""
DEFAULT_LEVEL = 3
"""Level 9 stores 1-8 % less at 2-4x the encoding time, 19 about 8 % less at 1-2 MB/s."""
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_UNKNOWN_SIZE = 1 << 63  # python-zstandard reports ZSTD_CONTENTSIZE_UNKNOWN/ERROR as 2^64 - 1/2
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_FLOAT = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
INSTALL_FIX = "pip install 'delta-format[zstd]' (or: pip install zstandard)"


def zstandard_module():
    """The zstandard package, or `MissingDependencyError` saying how to install it."""
    try:
        import zstandard
    except ImportError:
        raise MissingDependencyError(
            "the lossless 'bitdiff' encoding needs the zstandard package",
            expected="zstandard >= 0.22 installed",
            found="no zstandard",
            fix=INSTALL_FIX,
        ) from None
    return zstandard


def zstd_available() -> bool:
    """Whether `BitdiffEncoding` can encode and decode here."""
    try:
        zstandard_module()
    except MissingDependencyError:
        return False
    return True


def _buffer(t: torch.Tensor) -> memoryview:
    """A contiguous CPU uint8 tensor's bytes, without a copy (the tensor must outlive the view)."""
    return memoryview((ctypes.c_uint8 * t.numel()).from_address(t.data_ptr())) if t.numel() else memoryview(b"")


def _int_bits(t: torch.Tensor) -> torch.Tensor:
    """The flat bit patterns of a float tensor as same-width signed integers (little-endian hosts:
    the format's byte order)."""
    if sys.byteorder != "little":
        raise InvalidArgumentError("bitdiff needs a little-endian host", expected="little", found=sys.byteorder)
    return t.contiguous().view(-1).view(_INT[t.element_size()])


def zigzag(d: torch.Tensor) -> torch.Tensor:
    """Signed w-bit ``d`` -> ``2d`` (d >= 0) or ``-2d - 1`` (d < 0), wrapping mod 2^w."""
    return (d << 1) ^ (d >> (8 * d.element_size() - 1))


def unzigzag(r: torch.Tensor) -> torch.Tensor:
    """Inverse of `zigzag`: ``(r >>> 1) XOR -(r AND 1)`` (a logical shift, by masking the sign)."""
    return ((r >> 1) & torch.iinfo(r.dtype).max) ^ -(r & 1)


def _pool_map(work: Callable[[int], Any], count: int) -> list:
    threads = min(count, os.cpu_count() or 1, 8)
    if threads <= 1:
        return [work(i) for i in range(count)]
    with ThreadPoolExecutor(threads) as pool:  # zstd and torch release the GIL
        return list(pool.map(work, range(count)))


class BitdiffEncoding(Encoding, name=BITDIFF):
    """Roles ``planes`` (U8 ``[n]``: every zstd frame, chunk-major) and ``frames`` (I64
    ``[chunks, k]``: the compressed size of each frame, k the parameter's element size).

    Example:
        >>> base = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
        >>> ft = torch.tensor([1.0078125, 2.0, -3.0], dtype=torch.bfloat16)
        >>> enc = BitdiffEncoding()
        >>> stored = enc.encode(ft, base=base)
        >>> torch.equal(enc.decode(stored, (3,), "w", torch.bfloat16, base=base), ft)
        True
    """

    PLANES = "planes"
    FRAMES = "frames"
    is_delta = False

    def __init__(self, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int):
            raise InvalidArgumentError("bitdiff chunk_elements must be an integer", found=repr(chunk_elements))
        if not 1 <= chunk_elements <= MAX_CHUNK_ELEMENTS:
            raise InvalidArgumentError(
                "bitdiff chunk_elements out of range", expected=f"1 to {MAX_CHUNK_ELEMENTS}", found=chunk_elements
            )
        self.chunk_elements = chunk_elements

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> BitdiffEncoding:
        check_config_keys(cls.name, config, {"codec", "chunk_elements"}, set())
        if config["codec"] != CODEC:
            raise UnknownEncodingError(
                "unknown bitdiff codec",
                expected=repr(CODEC),
                found=repr(config["codec"])[:100],
                fix="upgrade delta-format, or re-create the delta with a known encoding",
            )
        chunk = config_int(cls.name, config, "chunk_elements", 1, MAX_CHUNK_ELEMENTS + 1)
        zstandard_module()  # a delta that needs it fails when opened, before its shards are read
        return cls(chunk)

    def to_dict(self) -> dict[str, Any]:
        return {"codec": CODEC, "chunk_elements": self.chunk_elements}

    def chunks(self, shape: tuple[int, ...]) -> int:
        return -(-math.prod(shape) // self.chunk_elements)

    def expected(self, shape: tuple[int, ...]) -> dict[str, Expected]:
        # k (the parameter's element size) is checked by decode, before any frame is read.
        return {self.PLANES: Expected(("U8",), (None,)), self.FRAMES: Expected(("I64",), (self.chunks(shape), None))}

    def encode(
        self,
        delta: torch.Tensor,
        *,
        name: str = "",
        dtype: torch.dtype | None = None,
        base: torch.Tensor,
        level: int = DEFAULT_LEVEL,
    ) -> dict[str, torch.Tensor]:
        """The stored tensors of ``delta``, here the fine-tuned *value* (cast to ``dtype``, the
        parameter's dtype, when given), against ``base`` (of the same shape, any float dtype,
        rounded to the parameter's dtype as SPEC §5.6 says). ``level`` is zstd's (any level
        decodes the same way).

        Raises:
            InvalidArgumentError: shapes differ, a dtype is not a float a delta can hold, or the
                base holds a NaN while its dtype differs (round_dtype of a NaN is not portable:
                use ``replace``).
            MissingDependencyError: zstandard is not installed.
        """
        zstd = zstandard_module()
        value = delta if dtype is None else delta.to(dtype)
        bd = _base_operand(base, value, name)
        ft_bits, base_bits = _int_bits(value.detach().cpu()), _int_bits(bd.detach().cpu())
        n, k = ft_bits.numel(), ft_bits.element_size()

        def one_chunk(c: int) -> list[bytes]:
            lo, hi = c * self.chunk_elements, min(n, (c + 1) * self.chunk_elements)
            residual = zigzag(ft_bits[lo:hi] - base_bits[lo:hi])
            planes = residual.view(torch.uint8).view(hi - lo, k).t().contiguous()  # [k, L]: byte p of each
            params = zstd.ZstdCompressionParameters.from_level(
                level, source_size=hi - lo, write_content_size=True, write_checksum=False, write_dict_id=False
            )
            compressor = zstd.ZstdCompressor(compression_params=params)
            return [compressor.compress(_buffer(planes[p])) for p in range(k)]

        frames = _pool_map(one_chunk, -(-n // self.chunk_elements))
        sizes = torch.tensor([[len(f) for f in chunk] for chunk in frames], dtype=torch.int64).view(-1, k)
        blob = bytearray(b"".join(f for chunk in frames for f in chunk))
        planes = torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8)
        return {self.PLANES: planes, self.FRAMES: sizes}

    def decode(self, stored, shape, name, dtype, *, base: torch.Tensor | None = None):
        """The fine-tuned value of ``shape`` in ``dtype`` on ``base``'s device, bit for bit before
        the cast. ``base`` is the base tensor already in the parameter's dtype (SPEC §5.6's Bd:
        `reconstruct` rounds it); without it there is nothing to add the stored difference to.

        Raises:
            CorruptDeltaError: any of SPEC §5.6's reader checks fails (frame table, frame headers
                against the chunk lengths, dictionaries, windows, trailing bytes, decoding).
        """
        if base is None or tuple(base.shape) != tuple(shape) or base.dtype not in _FLOAT:
            raise BaseMismatchError(
                f"{name!r} is stored as bitdiff, which needs the base's tensor of its shape",
                expected=f"a floating base tensor of shape {list(shape)}",
                found="none" if base is None else f"{base.dtype} {list(base.shape)}",
                fix="load the delta on its base (DeltaModel.from_pretrained, apply_delta, reconstruct)",
            )
        zstd = zstandard_module()
        n, k = math.prod(shape), base.element_size()
        planes, offsets = self._frame_table(stored, shape, name, k)
        buffer = _buffer(planes)  # planes stays referenced for as long as the view is used
        bits = _int_bits(base)
        on_cpu = bits.device.type == "cpu"
        out = torch.empty(n, dtype=bits.dtype)
        local = threading.local()

        def one_chunk(c: int) -> None:
            if not hasattr(local, "dctx"):
                local.dctx = zstd.ZstdDecompressor(max_window_size=MAX_WINDOW)
            lo, hi = c * self.chunk_elements, min(n, (c + 1) * self.chunk_elements)
            chunk = torch.empty((k, hi - lo), dtype=torch.uint8)
            for p in range(k):
                where = f"{name}: chunk {c} plane {p}"
                frame = buffer[offsets[c * k + p] : offsets[c * k + p + 1]]
                raw = _decompress_frame(zstd, local.dctx, frame, hi - lo, where)
                ctypes.memmove(chunk[p].data_ptr(), raw, hi - lo)
            r = unzigzag(chunk.t().contiguous().view(-1).view(bits.dtype))
            out[lo:hi] = bits[lo:hi] + r if on_cpu else r

        _pool_map(one_chunk, len(offsets) // k)
        if not on_cpu:
            out = bits + out.to(bits.device)
        return out.view(base.dtype).view(shape).to(dtype)

    def _frame_table(
        self, stored: Mapping[str, torch.Tensor], shape: tuple[int, ...], name: str, k: int
    ) -> tuple[torch.Tensor, list[int]]:
        """``planes`` on the CPU and the offset of each frame in them (one more than frames),
        after checking the table: ``[chunks, k]``, every size positive, sizes summing to the length."""
        planes, frames = stored[self.PLANES].cpu().contiguous(), stored[self.FRAMES].cpu()
        want = (self.chunks(shape), k)
        if planes.dtype != torch.uint8 or planes.dim() != 1 or frames.dtype != torch.int64 or frames.shape != want:
            raise CorruptDeltaError(
                f"stored tensors {name}:planes/frames do not fit the parameter",
                expected=f"planes U8 [n], frames I64 {list(want)}",
                found=f"planes {planes.dtype} {list(planes.shape)}, frames {frames.dtype} {list(frames.shape)}",
                fix="the delta is corrupt; re-create it",
            )
        offsets, total = [0], planes.numel()
        for size in frames.view(-1).tolist():
            if size <= 0 or offsets[-1] + size > total:
                break
            offsets.append(offsets[-1] + size)
        if len(offsets) != frames.numel() + 1 or offsets[-1] != total:
            raise CorruptDeltaError(
                f"the frame table of {name!r} does not describe its planes",
                expected=f"{frames.numel()} positive frame sizes summing to {total} bytes",
                found=f"sizes {frames.view(-1).tolist()[:8]}{'...' if frames.numel() > 8 else ''}",
                fix="the delta is corrupt; re-create it",
            )
        return planes, offsets

    def label(self) -> str:
        return f"bitdiff({CODEC})"


def _base_operand(base: torch.Tensor, value: torch.Tensor, name: str) -> torch.Tensor:
    """SPEC §5.6's Bd: the base rounded to the value's dtype, refusing what a writer must not encode."""
    if value.dtype not in _FLOAT or base.dtype not in _FLOAT or tuple(base.shape) != tuple(value.shape):
        raise InvalidArgumentError(
            f"bitdiff cannot encode {name or 'this tensor'} against this base",
            expected="floating tensors of one shape",
            found=f"value {value.dtype} {list(value.shape)}, base {base.dtype} {list(base.shape)}",
            fix="store it as replace",
        )
    if base.dtype == value.dtype:
        return base
    if bool(torch.isnan(base).any()):
        raise InvalidArgumentError(
            f"bitdiff cannot encode {name or 'this tensor'} against a base of another dtype holding NaN",
            expected="a base without NaN, or of the value's dtype",
            found=f"NaN in a {base.dtype} base",
            fix="store it as replace",
        )
    return base.to(value.dtype)


def _decompress_frame(zstd, dctx, frame: memoryview, length: int, where: str) -> bytes:
    """One frame of exactly ``length`` bytes, its header checked before anything is allocated
    (python-zstandard allocates what a header declares, whatever ``max_output_size`` says)."""

    def corrupt(found: object) -> CorruptDeltaError:
        return CorruptDeltaError(
            f"{where} is not a valid bitdiff frame",
            expected=f"one zstd frame declaring {length} bytes, no dictionary, window <= {MAX_WINDOW}",
            found=found,
            fix="the delta is corrupt; re-create it",
        )

    if bytes(frame[:4]) != ZSTD_MAGIC:
        raise corrupt("no zstd frame magic")
    try:
        header = zstd.get_frame_parameters(frame)
    except zstd.ZstdError as exc:
        raise corrupt(str(exc)[:200]) from None
    if header.content_size >= _UNKNOWN_SIZE or header.content_size != length:
        raise corrupt("no content size" if header.content_size >= _UNKNOWN_SIZE else f"{header.content_size} bytes")
    if header.dict_id != 0:
        raise corrupt(f"dictionary {header.dict_id}")
    if header.window_size > max(MAX_WINDOW, length):
        raise corrupt(f"window {header.window_size}")
    try:
        raw = dctx.decompress(frame, max_output_size=length, allow_extra_data=False)
    except zstd.ZstdError as exc:
        raise corrupt(str(exc)[:200]) from None
    if len(raw) != length:
        raise corrupt(f"{len(raw)} decoded bytes")
    return raw
