"""The weight view against HookedTransformer's own stacked weights (GQA expanded by TL itself)."""

from __future__ import annotations

import pytest
import torch

import tl_plugins
from tl_plugins.errors import UnsupportedModelError
from tl_plugins.models import tiny


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_weights_equal_hookedtransformer_stacks(name):
    model = tl_plugins.models.load(name)
    w = tl_plugins.weights(model)
    L, H, D, dh = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_head
    for attr, shape in [("W_Q", (L, H, D, dh)), ("W_K", (L, H, D, dh)), ("W_V", (L, H, D, dh)),
                        ("W_O", (L, H, dh, D)), ("W_in", (L, D, model.cfg.d_mlp)),
                        ("W_out", (L, model.cfg.d_mlp, D)), ("b_O", (L, D))]:
        mine, theirs = getattr(w, attr), getattr(model, attr)
        assert mine.shape == shape, attr
        assert torch.equal(mine, theirs.detach()), attr
    assert torch.equal(w.W_E, model.W_E.detach()) and torch.equal(w.W_U, model.W_U.detach())
    assert w.b_Q.shape == (L, H, dh)


def test_gqa_heads_are_expanded_by_repetition():
    model = tl_plugins.models.load("tiny-llama")
    w = tl_plugins.weights(model)
    assert w.n_kv_heads == 2 and w.n_heads == 4
    raw = model.blocks[0].attn._W_K.detach()  # [kv_heads, d_model, d_head]
    for h in range(4):
        assert torch.equal(w.W_K[0, h], raw[h // 2])
    assert w.gated_mlp and w.W_gate.shape == (2, 64, 128)
    assert w.W_pos is None


def test_view_is_read_only():
    model = tl_plugins.models.load("tiny-gpt2")
    w = tl_plugins.weights(model)
    W_Q = w.W_Q
    W_Q.zero_()
    assert not torch.equal(model.W_Q, W_Q)
    assert not w.W_E.requires_grad


def test_processing_recorded_and_inferred():
    model = tl_plugins.models.load("tiny-gpt2")
    p = tl_plugins.weights(model).processing
    assert not p.is_processed and p.source == "recorded"
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    p = tl_plugins.weights(model).processing
    assert p.fold_ln and p.center_writing_weights and p.center_unembed
    assert p.source.startswith("inferred")


def test_tied_detection():
    model = tiny.tiny_gpt2()
    assert not tl_plugins.weights(model).tied
    with torch.no_grad():
        model.unembed.W_U.copy_(model.embed.W_E.T)
    assert tl_plugins.weights(model).tied


def test_layer_out_of_range_and_attn_only():
    model = tiny.tiny_gpt2()
    w = tl_plugins.weights(model)
    with pytest.raises(IndexError, match=r"layer: got 2; accepted: an int in \[0, 1\]"):
        w.W_Q_layer(2)
    attn_only = tiny.build(tiny.TINY_GPT2, attn_only=True)
    with pytest.raises(UnsupportedModelError, match="attention-only"):
        _ = tl_plugins.weights(attn_only).W_in
