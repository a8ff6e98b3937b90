"""Plugin configuration is per model, not per thread: changing it while another thread runs the
model through a seam is refused (it would mix configurations within one forward pass)."""

from __future__ import annotations

import threading

import pytest
import torch

import tl_plugins
from tl_plugins import hookimpl


class Gate:
    """A wrapper on the attention seam that holds the first call until released."""

    entered = threading.Event()
    release = threading.Event()

    @staticmethod
    @hookimpl(wrapper=True)
    def tl_plugins_attention(call):
        if not Gate.entered.is_set():
            Gate.entered.set()
            Gate.release.wait(timeout=30)
        return (yield)


def test_enable_and_disable_refused_while_another_thread_runs_the_model(temp_plugin, tokens):
    model = tl_plugins.models.load("tiny-llama")
    temp_plugin(Gate, "test-gate")
    Gate.entered.clear()
    Gate.release.clear()
    tl_plugins.enable(model, "topk", k=3)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("z", model(tokens)))
    worker.start()
    assert Gate.entered.wait(timeout=30)
    try:
        with pytest.raises(RuntimeError, match="another thread .* is running this model"):
            tl_plugins.enable(model, "topk", k=5)
        with pytest.raises(RuntimeError, match="another thread"):
            tl_plugins.disable(model, "topk")
        assert tl_plugins.active(model)["topk"].k == 3
    finally:
        Gate.release.set()
        worker.join(timeout=60)
    with tl_plugins.enabled(model, "topk", k=3):
        pass  # free again once the other thread is done
    tl_plugins.disable(model)
    with tl_plugins.enabled(model, "topk", k=3):
        torch.testing.assert_close(out["z"], model(tokens))
