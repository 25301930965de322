"""The active on-the-fly adapter is one per model: concurrent `using_delta` from two threads is
refused with a typed error, never answered with the other thread's adapter."""

from __future__ import annotations

import threading

import pytest
import torch

from delta_format import InvalidArgumentError, attach_deltas, using_delta
from tests.test_shared_checks import base_model, root  # noqa: F401  (the fixture)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
IDS = torch.arange(16).unsqueeze(0)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_two_threads_using_deltas_get_their_own_logits_or_a_typed_error(root):  # noqa: F811
    model = base_model(root)
    attach_deltas(model, {"one": root / "d1", "two": root / "d2"})
    expected = {}
    for name in ("one", "two"):
        with using_delta(model, name):
            expected[name] = logits(model)
    assert not torch.equal(expected["one"], expected["two"])
    outcomes = {"right": 0, "refused": 0, "wrong": 0}
    start = threading.Barrier(2)

    def serve(name):
        start.wait()
        for _ in range(40):
            try:
                with using_delta(model, name):
                    got = logits(model)
            except InvalidArgumentError:
                outcomes["refused"] += 1
                continue
            outcomes["right" if torch.equal(got, expected[name]) else "wrong"] += 1

    threads = [threading.Thread(target=serve, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes["wrong"] == 0, outcomes
    assert outcomes["right"] > 0


def test_a_forward_from_another_thread_inside_using_delta_is_refused(root):  # noqa: F811
    model = base_model(root)
    attach_deltas(model, {"one": root / "d1"})
    errors = []
    with using_delta(model, "one"):
        worker = threading.Thread(target=lambda: errors.append(_try(lambda: logits(model))))
        worker.start()
        worker.join()
    assert isinstance(errors[0], InvalidArgumentError) and "another thread" in str(errors[0])
    assert torch.equal(logits(model), logits(base_model(root)))  # after the block: the base again


def _try(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - returned for the assertion
        return exc
    return None
