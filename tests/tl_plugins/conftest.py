"""Fixtures for the host tests: tiny models and a throw-away plugin module."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import tl_plugins
from tl_plugins import hookimpl


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def tiny_model(request):
    return tl_plugins.models.load(request.param)


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 90, (2, 12), generator=g)


@dataclass
class ScaleConfig:
    """Multiply every head's attention mix z by ``factor`` (a visible forward change)."""

    factor: float = 2.0

    def __post_init__(self):
        if not isinstance(self.factor, (int, float)) or self.factor <= 0:
            raise ValueError(f"factor: got {self.factor!r}; accepted: a positive number")


class ScalePlugin:
    """A test plugin: a wrapper on the attention seam and an MLP activation override."""

    calls = 0

    @staticmethod
    @hookimpl
    def tl_plugins_register(register):
        register("scale", config=ScaleConfig, summary="test plugin", changes_forward=True,
                 attention_seam=True, mlp_seam=True)

    @staticmethod
    @hookimpl(wrapper=True)
    def tl_plugins_attention(call):
        z = yield
        cfg = call.config("scale")
        if cfg is None:
            return z
        ScalePlugin.calls += 1
        return z * cfg.factor

    @staticmethod
    @hookimpl
    def tl_plugins_mlp_activation(call):
        cfg = call.config("scale")
        if cfg is None:
            return None
        return call.act_fn(call.pre) * cfg.factor


@pytest.fixture
def temp_plugin():
    """``temp_plugin(obj, name)`` registers a throw-away plugin; teardown unregisters it."""
    names = []

    def register(obj, name):
        names.append(tl_plugins.register_plugin(obj, name=name))
        return obj

    yield register
    for name in reversed(names):
        tl_plugins.unregister_plugin(name=name)


@pytest.fixture
def scale_plugin():
    name = tl_plugins.register_plugin(ScalePlugin, name="test-scale")
    yield ScalePlugin
    tl_plugins.unregister_plugin(name=name)
