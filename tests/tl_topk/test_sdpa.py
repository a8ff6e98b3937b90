"""The ``sdpa`` plugin: exact dense attention through scaled_dot_product_attention.

Oracles: the unmodified model (HookedTransformer on the 3.x leg, TransformerBridge on both), the dense
brute-force op ``dense_topk_attention`` with every head dense, and the model's own dense path. The
tolerance is fp32 summation order: logits within 1e-5 absolute (SDPA's fused kernel adds in another
order than pattern @ V). Disable is bit-exact.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import tl_plugins
from tl_plugins.backends.bridge import is_bridge
from tl_plugins.models import tiny
from tl_topk.ops.dense import dense_topk_attention
from tl_topk.ops.sdpa import sdpa_attention

ATOL = 1e-5


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Records (q shape, k shape, enable_gqa, is_causal, has mask) of every SDPA call."""
    calls = []
    real = F.scaled_dot_product_attention

    def counting(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append((tuple(q.shape), tuple(k.shape), enable_gqa, is_causal, attn_mask is not None))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


# -- the op against the brute-force oracle ------------------------------------------------------------

@pytest.mark.parametrize("case", ["causal", "kv-offset", "padding", "window", "non-causal", "no-key-rows"])
def test_op_equals_dense_oracle(case):
    g = torch.Generator().manual_seed(3)
    n_q, n_k = (5, 17) if case == "kv-offset" else (17, 17)
    q = torch.randn(2, n_q, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, n_k, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, n_k, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    pad = None
    if case == "padding":
        pad = torch.ones(2, n_k, dtype=torch.bool)
        pad[0, :4] = False
        pad[1, -3:] = False
    if case == "no-key-rows":  # left padding: the first query rows of sequence 0 see no key
        pad = torch.ones(2, n_k, dtype=torch.bool)
        pad[0, :6] = False
    kw = dict(causal=case != "non-causal", key_padding_mask=pad, scale=0.3,
              window=4 if case == "window" else None)
    z = sdpa_attention(q, k, v, **kw)
    ref = dense_topk_attention(q, k, v, (None,) * 6, softcap=None, **kw)
    torch.testing.assert_close(z, ref, atol=1e-10, rtol=1e-10)
    grads = torch.autograd.grad(z.pow(2).sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    if case == "no-key-rows":
        assert (z[0, :6] == 0).all()


# -- the plugin on the tiny models (HookedTransformer on tl39, bridges on tl4) -----------------------

def test_equals_the_unmodified_model_and_disable_is_bit_exact(model, tokens, sdpa_calls):
    ref = model(tokens)
    tl_plugins.enable(model, "sdpa")
    try:
        out = model(tokens)
    finally:
        tl_plugins.disable(model, "sdpa")
    n_layers = model.cfg.n_layers
    assert len(sdpa_calls) == n_layers  # every layer went through SDPA
    assert all(c[3] and not c[4] for c in sdpa_calls)  # the fused causal kernel, no mask tensor
    assert not torch.equal(out, ref)  # another summation order: a real change, within tolerance
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert torch.equal(model(tokens), ref)
    assert tl_plugins.active(model) == {}


def test_grouped_kv_heads_are_not_repeated(llama, tokens, sdpa_calls):
    with tl_plugins.enabled(llama, "sdpa"):
        llama(tokens)
    q_shape, k_shape, gqa, _, _ = sdpa_calls[0]
    assert (q_shape[1], k_shape[1], gqa) == (4, 2, True)


def test_observed_pattern_takes_the_dense_path_bit_exactly(model, tokens, sdpa_calls):
    logits_ref, plain = model.run_with_cache(tokens)
    with tl_plugins.enabled(model, "sdpa"):
        logits, cache = model.run_with_cache(tokens)
    assert sdpa_calls == []
    assert set(cache.keys()) == set(plain.keys())
    assert torch.equal(logits, logits_ref)
    assert torch.equal(cache["pattern", 0], plain["pattern", 0])


def test_other_hook_points_fire_on_the_sdpa_path(model, tokens, sdpa_calls):
    seen = {}
    names = lambda n: n.endswith(("hook_z", "hook_q", "hook_k", "hook_v", "hook_resid_post"))  # noqa: E731

    def record(x, hook):
        seen[hook.name] = x.detach().clone()

    plain_seen = {}
    model.run_with_hooks(tokens, fwd_hooks=[(names, lambda x, hook: plain_seen.__setitem__(hook.name, x.clone()))])
    with tl_plugins.enabled(model, "sdpa"):
        model.run_with_hooks(tokens, fwd_hooks=[(names, record)])
    assert len(sdpa_calls) == model.cfg.n_layers
    assert set(seen) == set(plain_seen) and len(seen) == 5 * model.cfg.n_layers
    for name, x in seen.items():
        torch.testing.assert_close(x, plain_seen[name], atol=ATOL, rtol=0)


def test_an_edit_of_hook_z_applies_on_the_sdpa_path(model, tokens, sdpa_calls):
    def ablate(z, hook):
        z[:, :, 1] = 0
        return z

    hooks = [("blocks.0.attn.hook_z", ablate)]
    ref = model.run_with_hooks(tokens, fwd_hooks=hooks)
    with tl_plugins.enabled(model, "sdpa"):
        out = model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert len(sdpa_calls) == model.cfg.n_layers
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert not torch.allclose(out, model(tokens), atol=1e-3)


def test_gradients_equal_the_unmodified_model(model, tokens):
    def grads():
        model.zero_grad(set_to_none=True)
        model(tokens, return_type="loss").backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    ref = grads()
    with tl_plugins.enabled(model, "sdpa"):
        got = grads()
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equals_the_unmodified_model(model, tokens, side, sdpa_calls):
    mask = torch.ones_like(tokens)
    if side == "left":
        mask[0, :6] = 0
    else:
        mask[1, -6:] = 0
    ref = model(tokens, attention_mask=mask)
    with tl_plugins.enabled(model, "sdpa"):
        out = model(tokens, attention_mask=mask)
    assert len(sdpa_calls) == model.cfg.n_layers and all(c[4] for c in sdpa_calls)  # a boolean mask
    real = mask.bool()  # padded query rows are don't-care (HookedTransformer zeros them, HF does not)
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)


def test_kv_cache_decode_equals_the_unmodified_full_forward(llama, tokens, sdpa_calls):
    ones = lambda n: torch.ones(tokens.shape[0], n, dtype=torch.long)  # noqa: E731
    full = llama(tokens, attention_mask=ones(tokens.shape[1]))
    with tl_plugins.enabled(llama, "sdpa"):
        if is_bridge(llama):
            from transformers import DynamicCache

            cache = DynamicCache()
            outs = [llama(tokens[:, :10], past_key_values=cache, attention_mask=ones(10))]
            for i in range(10, tokens.shape[1]):
                outs.append(llama(tokens[:, i:i + 1], past_key_values=cache, attention_mask=ones(i + 1)))
        else:
            from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

            cache = TransformerLensKeyValueCache.init_cache(llama.cfg, llama.cfg.device, tokens.shape[0])
            outs = [llama(tokens[:, :10], past_kv_cache=cache, attention_mask=ones(10))]
            for i in range(10, tokens.shape[1]):
                outs.append(llama(tokens[:, i:i + 1], past_kv_cache=cache, attention_mask=ones(1)))
    assert len(sdpa_calls) == llama.cfg.n_layers * (1 + tokens.shape[1] - 10)
    assert any(c[0][2] == 1 and c[1][2] > 1 for c in sdpa_calls)  # decode steps: 1 query, many keys
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=ATOL, rtol=0)


def test_generate_equals_the_unmodified_model(llama):
    prompt = torch.tensor([[5, 17, 33, 44, 8, 9]])
    kw = dict(max_new_tokens=6, do_sample=False, use_past_kv_cache=True, verbose=False)
    if not is_bridge(llama):
        kw["stop_at_eos"] = False
    ref = llama.generate(prompt, **kw)
    with tl_plugins.enabled(llama, "sdpa"):
        out = llama.generate(prompt, **kw)
    assert torch.equal(out, ref)


def test_layers_option_and_topk_take_precedence(llama, tokens, sdpa_calls):
    with tl_plugins.enabled(llama, "sdpa", layers=[1]):
        llama(tokens)
    assert len(sdpa_calls) == 1
    sdpa_calls.clear()
    with tl_plugins.enabled(llama, "topk", k={1: 2}, backend="chunked"):
        ref = llama(tokens)
        with tl_plugins.enabled(llama, "sdpa"):
            out = llama(tokens)
    # layer 1 is top-k (same result with or without sdpa), layer 0 (dense under topk) goes to SDPA
    assert len(sdpa_calls) == 1 and sdpa_calls[0][1][2] == tokens.shape[1]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_bad_options_are_refused_and_the_model_is_untouched(llama, tokens):
    ref = llama(tokens)
    with pytest.raises(TypeError, match="layers: got 'ab'"):
        tl_plugins.enable(llama, "sdpa", layers="ab")
    with pytest.raises(ValueError, match=r"layers: unknown layer index\(es\) \[7\]"):
        tl_plugins.enable(llama, "sdpa", layers=[0, 7])
    with pytest.raises(ValueError, match="selects no layer"):
        tl_plugins.enable(llama, "sdpa", layers=[])
    assert tl_plugins.active(llama) == {}
    assert torch.equal(llama(tokens), ref)


# -- bridges of other families: soft-cap (fallback), sliding windows, biases -------------------------

def _bridge(kind):
    pytest.importorskip("transformer_lens.model_bridge")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny.tiny_bridge(kind)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "qwen2", "gpt2"])
def test_bridge_families(kind, sdpa_calls):
    bridge = _bridge(kind)
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(4, bridge.cfg.d_vocab, (2, 12), generator=g)
    ref = bridge(toks)
    with tl_plugins.enabled(bridge, "sdpa"):
        out = bridge(toks)
    if kind == "gemma2":
        # attention soft-cap: SDPA has no score modifier, the model's own dense path runs, bit-exact
        assert sdpa_calls == [] and torch.equal(out, ref)
    else:
        assert len(sdpa_calls) == bridge.cfg.n_layers
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert torch.equal(bridge(toks), ref)


def test_bridge_sliding_window_past_the_window(sdpa_calls):
    bridge = _bridge("gemma3")
    window = bridge.original_model.config.sliding_window
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(4, bridge.cfg.d_vocab, (1, window + 7), generator=g)
    ref = bridge(toks)
    with tl_plugins.enabled(bridge, "sdpa"):
        out = bridge(toks)
    assert len(sdpa_calls) == bridge.cfg.n_layers
    assert any(c[4] for c in sdpa_calls)  # the local layers pass their window as a boolean mask
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_hooked_and_bridge_on_the_same_weights_agree():
    if not tiny.hooked_available():
        pytest.skip("HookedTransformer needs transformer-lens 3.x")
    hooked, bridge = tiny.hf_pair("llama", seed=4)
    toks = torch.randint(4, 90, (2, 16), generator=torch.Generator().manual_seed(5))
    refs = [m(toks) for m in (hooked, bridge)]
    for m, ref in zip((hooked, bridge), refs):
        with tl_plugins.enabled(m, "sdpa"):
            torch.testing.assert_close(m(toks), ref, atol=ATOL, rtol=0)
        assert torch.equal(m(toks), ref)
