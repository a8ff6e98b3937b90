"""Tensors a plugin makes inside the forward pass come from the model's own tensors' devices.

A model split over devices (HookedTransformer's ``n_devices``, a bridge with a device map) breaks any
plugin code that creates a tensor with the *default* device instead of its input's. This machine has
one device, but the default device can be made wrong: under ``with torch.device("meta")`` every
factory call without an explicit device makes a meta tensor, which cannot meet the model's CPU
tensors. So a forward pass that still gives the plugin's CPU output, bit for bit, made every tensor
on its inputs' device. The probe itself is checked on a hook that makes a device-less tensor.
"""

from __future__ import annotations

import pytest
import torch

import tl_plugins

CONFIGS = [
    ("topk", dict(k=3, backend="dense")),
    ("topk", dict(k=3, backend="chunked")),
    ("topk", dict(ff_k=8)),
    ("topk", dict(k=2, ff_k=8, layers=[1])),
    ("steer", dict(interventions=[dict(layer=1, unit=0, op="set", value=2.0),
                                  dict(layer=0, unit=3, op="scale", value=-1.0, positions=[1, 2])])),
]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def model(request):
    return tl_plugins.models.load(request.param)


def _tokens(model):
    return torch.randint(0, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def test_the_probe_catches_a_tensor_made_on_the_default_device(model):
    def careless(x, hook):
        return x + torch.zeros(x.shape[-1])  # no device=: the default device

    with pytest.raises(RuntimeError, match="meta"):
        with torch.device("meta"):
            model.run_with_hooks(_tokens(model), fwd_hooks=[("blocks.0.hook_resid_post", careless)])


@pytest.mark.parametrize("name,config", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_plugins_make_their_tensors_on_the_inputs_device(model, name, config):
    tokens = _tokens(model)
    with torch.no_grad():
        plain = model(tokens)
    with torch.no_grad(), tl_plugins.enabled(model, name, **config):
        ref = model(tokens)
        with torch.device("meta"):
            out = model(tokens)
    assert not torch.equal(ref, plain)  # the plugin's own code ran
    assert out.device == tokens.device and torch.equal(out, ref)
    assert tl_plugins.active(model) == {}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_weight_readouts_meet_on_the_models_device_when_layers_are_split(name):
    """Layer 1 on another device (meta stands in for a second accelerator): every readout, stacked
    ones included, lands on cfg.device, and the view still reads the layer that stayed put."""
    from tl_plugins.models import tiny

    if not tiny.hooked_available():
        pytest.skip("TransformerLens 4.x bridges refuse to read weights on the meta device, which this test "
                    "uses as the second device; the view's code path is the same for both backends")
    m = tl_plugins.models.load(name, backend="hooked")
    ref = tl_plugins.weights(m).W_Q_layer(0)
    m.blocks[1].to("meta")
    m.cfg.device = "meta"  # the device the embedding would sit on after a split
    try:
        W = tl_plugins.weights(m)
        for t in (W.W_Q, W.W_O, W.W_in, W.W_E, W.W_U):
            assert t.device.type == "meta"
        assert W.W_Q.shape == (m.cfg.n_layers, m.cfg.n_heads, m.cfg.d_model, m.cfg.d_head)
        with pytest.raises((RuntimeError, NotImplementedError)):
            torch.stack([m.blocks[0].attn.W_Q, m.blocks[1].attn.W_Q])  # what the view avoids
    finally:
        m.cfg.device = "cpu"
    assert torch.equal(tl_plugins.weights(m).W_Q_layer(0), ref)
