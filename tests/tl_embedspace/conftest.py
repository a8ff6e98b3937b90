"""Shared fixtures: tiny random models (GPT-2- and Llama-shaped) and the real SmolLM2 (session scope)."""

from __future__ import annotations

import pytest
import torch

import tl_plugins
from tl_plugins.models import tiny


def tie_by_hand(model):
    """Tie W_U = W_E^T on a tiny model (as GPT-2 is), in place; returns the model."""
    with torch.no_grad():
        model.unembed.W_U.copy_(model.embed.W_E.T)
    return model


@pytest.fixture(scope="module")
def gpt2_tied():
    """Random GPT-2-shaped model, unprocessed, with tied embeddings (the paper's setting)."""
    return tie_by_hand(tiny.build(tiny.TINY_GPT2, n_layers=3, seed=1, d_vocab=50))


@pytest.fixture(scope="module")
def llama():
    return tl_plugins.models.load("tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    return tl_plugins.models.load("smollm2-135m")
