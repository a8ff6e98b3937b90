"""The weight view against the model's own stacked weights (HookedTransformer expands GQA itself; a
TransformerBridge keeps grouped K/V at the kv-head count and raises for absent biases)."""

from __future__ import annotations

import pytest
import torch

import tl_plugins
from tl_plugins.backends.bridge import is_bridge
from tl_plugins.errors import UnsupportedModelError
from tl_plugins.models import tiny


def _own_stack(model, attr):
    """``model.<attr>``: the model's own stacked weight, grouped K/V repeated to every query head
    (a bridge keeps W_K/W_V at the kv-head count) and an absent bias as zeros (a bridge raises)."""
    try:
        theirs = getattr(model, attr).detach()
    except AttributeError:
        if not (is_bridge(model) and attr.startswith("b_")):
            raise
        return None
    H = model.cfg.n_heads
    if attr in ("W_K", "W_V") and theirs.shape[1] != H:
        theirs = theirs.repeat_interleave(H // theirs.shape[1], dim=1)
    return theirs


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_weights_equal_hookedtransformer_stacks(name):
    model = tl_plugins.models.load(name)
    w = tl_plugins.weights(model)
    L, H, D, dh = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_head
    for attr, shape in [("W_Q", (L, H, D, dh)), ("W_K", (L, H, D, dh)), ("W_V", (L, H, D, dh)),
                        ("W_O", (L, H, dh, D)), ("W_in", (L, D, model.cfg.d_mlp)),
                        ("W_out", (L, model.cfg.d_mlp, D)), ("b_O", (L, D))]:
        mine, theirs = getattr(w, attr), _own_stack(model, attr)
        assert mine.shape == shape, attr
        if theirs is None:  # bias-free bridge
            theirs = torch.zeros(shape)
        assert torch.equal(mine, theirs), attr
    assert torch.equal(w.W_E, model.W_E.detach()) and torch.equal(w.W_U, model.W_U.detach())
    assert w.b_Q.shape == (L, H, dh)


def test_gqa_heads_are_expanded_by_repetition():
    model = tl_plugins.models.load("tiny-llama")
    w = tl_plugins.weights(model)
    assert w.n_kv_heads == 2 and w.n_heads == 4
    attn = model.blocks[0].attn
    raw = (attn.W_K if is_bridge(model) else attn._W_K).detach()  # [kv_heads, d_model, d_head]
    assert raw.shape == (2, 64, 16)
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
    if is_bridge(model):  # TransformerBridge's in-place processing
        model.enable_compatibility_mode(disable_warnings=True, fold_ln=True, center_writing_weights=True,
                                        center_unembed=True)
    else:
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    p = tl_plugins.weights(model).processing
    assert p.fold_ln and p.center_writing_weights and p.center_unembed
    assert p.source.startswith("inferred")


def test_tied_detection():
    model = tiny.build(tiny.TINY_GPT2)  # own W_U (TransformerLens init; on 4.x an untied GPT-2 bridge)
    assert not tl_plugins.weights(model).tied
    with torch.no_grad():
        model.unembed.W_U.copy_(model.embed.W_E.T)
    assert tl_plugins.weights(model).tied


def test_tied_detection_on_a_bridge_tied_by_hugging_face():
    pytest.importorskip("transformer_lens.model_bridge")
    tied = tiny.tiny_bridge("gpt2")  # GPT2LMHeadModel ties lm_head to wte by default
    assert tl_plugins.weights(tied).tied
    assert not tl_plugins.weights(tiny.tiny_bridge("llama")).tied  # the tiny Llama config unties


def test_layer_out_of_range():
    model = tiny.tiny_gpt2()
    w = tl_plugins.weights(model)
    with pytest.raises(IndexError, match=r"layer: got 2; accepted: an int in \[0, 1\]"):
        w.W_Q_layer(2)


@pytest.mark.hooked(reason="attention-only models exist only as HookedTransformerConfig(attn_only=True); "
                           "no Hugging Face architecture the bridge boots lacks MLPs")
def test_attn_only():
    attn_only = tiny.build(tiny.TINY_GPT2, attn_only=True)
    with pytest.raises(UnsupportedModelError, match="attention-only"):
        _ = tl_plugins.weights(attn_only).W_in


@pytest.mark.parametrize("kind", ["gemma3", "gemma2", "llama"])
def test_final_norm_weight_is_the_multiplier_the_norm_applies(kind):
    """Gemma's HF RMSNorm stores ``w - 1`` and multiplies by ``1 + w``; the view gives the multiplier,
    so ``x / rms(x) * ln_final_w`` reproduces the model's own final norm (the oracle)."""
    from tl_plugins import backends

    model = tiny.tiny_bridge(kind)
    be = backends.detect(model)
    w = tl_plugins.weights(model).ln_final_w()
    x = torch.randn(3, model.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        real = be.final_norm(x)
    eps = model.cfg.eps
    ours = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w
    assert torch.allclose(real, ours, atol=1e-5)
