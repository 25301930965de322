"""Prefetching a load's inputs onto the device: same tensors, same order, ready on the current stream."""

from __future__ import annotations

import pytest
import torch

from delta_format.loaders import device_prefetch
from delta_format.loaders.device_prefetch import prefetched, to_device_async


def test_items_for_the_cpu_are_loaded_in_order_when_reached():
    loaded = []

    def load(item, device):
        loaded.append(item)
        return {"value": torch.full((2,), float(item))}

    got = [
        (item, inputs["value"].tolist()) for item, inputs in prefetched([1, 2, 3], load, lambda _: torch.device("cpu"))
    ]
    assert got == [(1, [1.0, 1.0]), (2, [2.0, 2.0]), (3, [3.0, 3.0])]
    assert loaded == [1, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunked_pinned_copies_give_the_host_tensor_on_the_device(monkeypatch):
    monkeypatch.setattr(device_prefetch, "CHUNK_BYTES", 1000)  # many chunks, the last one partial
    host = torch.randn(123, 77).to(torch.bfloat16)
    stream = torch.cuda.Stream()
    moved = to_device_async(host, torch.device("cuda"), stream)
    stream.synchronize()
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), host)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefetched_cuda_inputs_are_ready_for_the_current_stream():
    tensors = {i: torch.randn(1000, 1000) for i in range(6)}

    def load(item, device):
        return {"stored": [{"x": tensors[item].to(device)}], "base": None}

    for item, inputs in prefetched(list(tensors), load, lambda _: torch.device("cuda")):
        value = inputs["stored"][0]["x"]
        assert value.device.type == "cuda"
        assert torch.equal((value * 2).cpu(), tensors[item] * 2)  # used on the current stream at once
