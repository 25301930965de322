"""Reading the next parameter's bytes onto an accelerator while the current one is decoded.

On CUDA a load is bound by host-to-device copies of the base (2 bytes per weight in bf16) and of the
encoded delta (far less), not by the decode, which runs at device memory speed. So a worker thread
copies the next parameter's base tensor and stored delta tensors (never a decoded delta: that is
only ever formed on the device) from the memory-mapped files through pinned staging buffers, in
chunks of `CHUNK_BYTES`, on a side stream, while the main thread's decode kernels run on the
default stream; the main stream waits for the copy's event before using the tensors. On CPU the
inputs are memory-mapped views and reading them is the decode's own first pass: nothing to overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

CHUNK_BYTES = 32 << 20
"""Bytes per pinned staging copy: large enough to run at full PCIe speed, small enough that the
pinned buffers (cached by torch's host allocator, reused once their copy is done) stay small."""

Item = TypeVar("Item")
Inputs = dict


def to_device_async(tensor: torch.Tensor, device: torch.device, stream) -> torch.Tensor:
    """``tensor`` (on the host) copied to ``device`` on ``stream``, through pinned chunks."""
    flat = tensor.reshape(-1)
    step = max(1, CHUNK_BYTES // max(tensor.element_size(), 1))
    with torch.cuda.stream(stream):  # allocated on the side stream: its memory is free of pending default-stream work
        out = torch.empty(flat.shape, dtype=tensor.dtype, device=device)
        for start in range(0, flat.numel(), step):
            chunk = flat[start : start + step]
            pinned = torch.empty(chunk.shape, dtype=chunk.dtype, pin_memory=True)
            pinned.copy_(chunk)
            out[start : start + chunk.numel()].copy_(pinned, non_blocking=True)  # the allocator keeps pinned until done
    return out.view(tensor.shape)


def prefetched(
    items: Sequence[Item], load: Callable[[Item, torch.device], Inputs], device_of: Callable[[Item], torch.device]
) -> Iterator[tuple[Item, Inputs]]:
    """``(item, load(item, device))`` for each item, in order. Items bound for a CUDA device are
    loaded one ahead on a worker thread (host reads, pinned copies on a side stream); the
    tensors returned are ready for the current stream. Others are loaded when reached."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="delta-format-prefetch") as pool:
        pending = None
        for index, item in enumerate(items):
            future, pending = pending, None
            if index + 1 < len(items) and device_of(items[index + 1]).type == "cuda":
                pending = pool.submit(_copied, items[index + 1], load, device_of(items[index + 1]))
            if future is None:
                yield item, load(item, device_of(item))
                continue
            inputs, event = future.result()
            stream = torch.cuda.current_stream(device_of(item))
            stream.wait_event(event)
            for tensor in _tensors(inputs):
                tensor.record_stream(stream)
            yield item, inputs


def _copied(item, load, device: torch.device):
    """``load(item)`` read on the host, then copied to ``device`` on a side stream; and the event
    that marks the end of the copies."""
    with torch.cuda.device(device):
        stream = _side_stream(device)
        host = load(item, torch.device("cpu"))
        moved = _map(host, lambda t: to_device_async(t, device, stream))
        event = torch.cuda.Event()
        event.record(stream)
    return moved, event


_STREAMS: dict[torch.device, object] = {}


def _side_stream(device: torch.device):
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device=device)
    return _STREAMS[device]


def _map(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    return value


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
