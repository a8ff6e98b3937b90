"""A community plugin whose disable hook raises never strands its seams, or another plugin, on the model.

Oracle: the model's outputs and every module's instance attributes before anything was enabled.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import tl_plugins
from tl_plugins import hookimpl


@dataclass
class _Cfg:
    factor: float = 3.0


class BrokenDisable:
    """Scales z on the attention seam; its disable hook raises."""

    @staticmethod
    @hookimpl
    def tl_plugins_register(register):
        register("broken-disable", config=_Cfg, summary="test", changes_forward=True, attention_seam=True)

    @staticmethod
    @hookimpl(wrapper=True)
    def tl_plugins_attention(call):
        z = yield
        cfg = call.config("broken-disable")
        return z if cfg is None else z * cfg.factor

    @staticmethod
    @hookimpl
    def tl_plugins_disable(model, name, backend):
        if name == "broken-disable":
            raise RuntimeError("broken disable hook")
        return None


def _attrs(model):
    return {n: sorted(k for k, v in vars(m).items() if not isinstance(v, torch.Tensor))
            for n, m in model.named_modules()}


@pytest.fixture
def broken(temp_plugin):
    temp_plugin(BrokenDisable, "test-broken-disable")


def test_disable_removes_everything_then_reraises(broken, tiny_model, tokens):
    ref, before = tiny_model(tokens), _attrs(tiny_model)
    tl_plugins.enable(tiny_model, "broken-disable")
    assert not torch.allclose(tiny_model(tokens), ref)
    with pytest.raises(RuntimeError, match="broken disable hook"):
        tl_plugins.disable(tiny_model, "broken-disable")
    assert tl_plugins.active(tiny_model) == {}
    assert torch.equal(tiny_model(tokens), ref) and _attrs(tiny_model) == before


def test_disable_all_takes_every_other_plugin_off_too(broken, tiny_model, tokens):
    ref, before = tiny_model(tokens), _attrs(tiny_model)
    tl_plugins.enable(tiny_model, "topk", k=2)
    tl_plugins.enable(tiny_model, "broken-disable")
    tl_plugins.enable(tiny_model, "embedspace")
    with pytest.raises(RuntimeError, match="broken disable hook"):
        tl_plugins.disable(tiny_model)
    assert tl_plugins.active(tiny_model) == {}
    assert torch.equal(tiny_model(tokens), ref) and _attrs(tiny_model) == before


def test_enabled_context_restores_despite_the_broken_hook(broken, tiny_model, tokens):
    ref = tiny_model(tokens)
    with pytest.raises(RuntimeError, match="broken disable hook"):
        with tl_plugins.enabled(tiny_model, "broken-disable", factor=2.0):
            pass
    assert tl_plugins.active(tiny_model) == {} and torch.equal(tiny_model(tokens), ref)
