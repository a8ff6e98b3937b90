"""Shared fixtures for tl_topk tests: tiny random models (fast) and SmolLM2 (slow, session scope).

``tiny.build`` gives HookedTransformers on transformer-lens 3.x and the equivalent TransformerBridges
on 4.x, so every test below that is not marked ``hooked`` runs on a bridge there.
"""

from __future__ import annotations

import pytest
import torch

import tl_plugins
from tl_plugins.models import tiny


@pytest.fixture
def gpt2():
    """2-layer GPT-2-like model, 4 heads, learned positions, LayerNorm, GELU."""
    return tiny.build(tiny.TINY_GPT2, seed=1)


@pytest.fixture
def llama():
    """2-layer Llama-like model: 4 query heads over 2 K/V heads, rotary, RMSNorm, gated SiLU MLP."""
    return tiny.build(tiny.TINY_LLAMA, seed=2)


@pytest.fixture(params=["gpt2", "llama"])
def model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def tokens():
    # ids 0-3 are the tiny bridges' special tokens: a Hugging Face embedding zeroes the pad row, whose
    # all-zero query scores every key alike (exact ties), and the oracles here assume no ties
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, 90, (2, 24), generator=g)


@pytest.fixture(scope="session")
def smollm2():
    return tl_plugins.models.load("smollm2-135m")


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv("TL_TOPK_BACKEND", raising=False)
