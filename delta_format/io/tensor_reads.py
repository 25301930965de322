"""Reading one tensor of a safetensors file by its byte range, with nothing kept per call.

safetensors' ``safe_open(...).get_tensor`` on a handle kept open leaks about 3 KB per call
(measured: 2000 hot swaps grew anonymous RSS by ~7 MB), and a server swapping deltas for days
calls it millions of times. The library therefore keeps safetensors handles only for what they
validate (the header: keys, dtypes, shapes, offsets, checked when a file is opened) and reads
tensor bytes itself: one ``pread`` into a fresh buffer that becomes the tensor (no second copy),
then a move to the target device. Memory then stays flat (``benchmarks/swap_memory.py``).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch

from ..core.dtypes import CHECKPOINT_DTYPES
from ..core.strict_json import loads_strict
from ..errors import CorruptDeltaError

TensorRange = tuple[str, tuple[int, ...], int, int]
"""(safetensors dtype, shape, first byte, end byte) of one tensor, absolute in the file."""


def tensor_ranges(path: Path) -> dict[str, TensorRange]:
    """Every tensor's dtype, shape and absolute byte range, from the header of a file that
    safetensors has already validated (offsets in bounds and contiguous, SPEC §8.2)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = loads_strict(f.read(length), path.name, CorruptDeltaError)
    start = 8 + length
    return {
        key: (info["dtype"], tuple(info["shape"]), start + info["data_offsets"][0], start + info["data_offsets"][1])
        for key, info in header.items()
        if key != "__metadata__"
    }


def read_range(path: Path, where: TensorRange, device: str | torch.device = "cpu") -> torch.Tensor:
    """The tensor at ``where`` in ``path``, on ``device``."""
    dtype_name, shape, begin, end = where
    dtype = CHECKPOINT_DTYPES[dtype_name]
    buffer = bytearray(end - begin)
    if buffer:
        fd = os.open(path, os.O_RDONLY)
        try:
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                got = os.preadv(fd, [view[done:]], begin + done)
                if got <= 0:
                    raise CorruptDeltaError(
                        f"{path.name} ends early",
                        expected=f"{end} bytes",
                        found=f"{begin + done}",
                        fix="re-download it",
                    )
                done += got
        finally:
            os.close(fd)
        tensor = torch.frombuffer(buffer, dtype=dtype).reshape(shape)
    else:
        tensor = torch.empty(shape, dtype=dtype)
    return tensor if torch.device(device).type == "cpu" else tensor.to(device)
