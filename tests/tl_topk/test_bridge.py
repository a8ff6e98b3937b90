"""topk on TransformerBridge (transformer-lens 3.x and 4.x): the guarantees it has on HookedTransformer.

Bridges are booted with TransformerLens's own ``boot_transformers`` on tiny Hugging Face models
(Llama: rotary + grouped K/V; GPT-2: joint QKV; Gemma 2: soft-cap + sliding window; Gemma 3: QK-norm,
one K/V head, local and global layers; Qwen2: q/k/v biases). Oracles: the unmodified bridge, and a
plain TransformerLens hook on ``hook_attn_scores`` that keeps each row's k largest scores.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tl_plugins
from tl_plugins import UnsupportedModelError, hookimpl
from tl_plugins.models import tiny

pytest.importorskip("transformer_lens.model_bridge")

KINDS = ("llama", "gpt2", "gemma2", "gemma3", "qwen2")
N = 12


def _bridge(kind: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny.tiny_bridge(kind, **kw)


@pytest.fixture(scope="module", params=KINDS)
def bridge(request):
    return _bridge(request.param)


def _tokens(model, batch=2, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.cfg.d_vocab, (batch, n), generator=g)


def _keep_topk(k):
    def hook(scores, hook):
        kth = scores.topk(min(k, scores.shape[-1]), dim=-1).values[..., -1:]
        return scores.masked_fill(scores < kth, float("-inf"))
    return hook


def _oracle(model, toks, k, **kw):
    return model.run_with_hooks(toks, fwd_hooks=[(lambda n: n.endswith("attn.hook_attn_scores"), _keep_topk(k))],
                                **kw)


def _snapshot(model, toks=None):
    """Every module's instance attributes after a plain forward: names, and object identities for
    all but bare tensors (the library caches the last pattern on some modules, a new tensor per
    forward). What disable must restore."""
    if toks is not None:
        model(toks)
    return {name: {k: ("tensor" if isinstance(v, torch.Tensor) else id(v)) for k, v in vars(m).items()}
            for name, m in model.named_modules()}


def test_k_covering_every_key_is_bit_exact_and_disable_restores(bridge):
    toks = _tokens(bridge)
    ref = bridge(toks)
    before = _snapshot(bridge, toks)
    with tl_plugins.enabled(bridge, "topk", k=10_000):
        assert torch.equal(bridge(toks), ref)
    tl_plugins.enable(bridge, "topk", k=3, ff_k=None)
    assert not torch.equal(bridge(toks), ref)
    tl_plugins.disable(bridge, "topk")
    assert torch.equal(bridge(toks), ref)
    assert _snapshot(bridge, toks) == before


@pytest.mark.parametrize("backend", ["chunked", "dense"])
def test_topk_equals_a_plain_hook_on_hook_attn_scores(bridge, backend):
    toks = _tokens(bridge)
    oracle = _oracle(bridge, toks, 3)
    with tl_plugins.enabled(bridge, "topk", k=3, backend=backend):
        out = bridge(toks)
    torch.testing.assert_close(out, oracle, atol=2e-5, rtol=1e-5)


def test_padding_left_and_right(bridge):
    toks = _tokens(bridge)
    for side in ("left", "right"):
        am = torch.ones(2, N, dtype=torch.long)
        if side == "left":
            am[1, :4] = 0
        else:
            am[1, -4:] = 0
        ref = bridge(toks, attention_mask=am)
        with tl_plugins.enabled(bridge, "topk", k=10_000):
            assert torch.equal(bridge(toks, attention_mask=am), ref)
        oracle = _oracle(bridge, toks, 3, attention_mask=am)
        with tl_plugins.enabled(bridge, "topk", k=3, backend="chunked"):
            out = bridge(toks, attention_mask=am)
        real = am.bool()
        torch.testing.assert_close(out[real], oracle[real], atol=2e-5, rtol=1e-5)


def test_every_hook_point_fires_as_without_the_plugin(bridge):
    toks = _tokens(bridge)
    _, plain = bridge.run_with_cache(toks)
    with tl_plugins.enabled(bridge, "topk", k=3):
        logits, cache = bridge.run_with_cache(toks)
    assert set(cache.keys()) == set(plain.keys())
    for name in ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z", "q.hook_in",
                 "q.hook_out", "k.hook_in", "v.hook_out", "o.hook_in", "o.hook_out", "hook_out"):
        assert f"blocks.0.attn.{name}" in cache.keys(), name
    # hooked route: the scores hook shows the full masked scores, the pattern the sparse one used
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert int((pattern > 0).sum(-1).max()) == 3
    torch.testing.assert_close(cache["blocks.0.attn.hook_attn_scores"], plain["blocks.0.attn.hook_attn_scores"])
    torch.testing.assert_close(logits, _oracle(bridge, toks, 3), atol=2e-5, rtol=1e-5)


class _NoQuadratic(TorchDispatchMode):
    """Fails on any tensor whose last two sizes are (q_pos, k_pos) = (n, n): the dense scores."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            # bool [.., n, n] is the library's own mask (transformer-lens 4.x always builds one)
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[-2:]) == (self.n, self.n)
                    and t.dtype != torch.bool):
                raise AssertionError(f"{func} made a {tuple(t.shape)} tensor")
        return out


class _GuardAttention:
    """Runs every attention implementation under _NoQuadratic (the seam's own work, not the
    library's mask construction, which transformer-lens 4.x does for every forward)."""

    def __init__(self, n):
        self.n = n
        self.calls = 0

    @hookimpl(wrapper=True)
    def tl_plugins_attention(self, call):
        self.calls += 1
        with _NoQuadratic(self.n):
            return (yield)


def test_linear_memory_route_when_scores_are_not_observed():
    n = 40
    for kind in ("llama", "gpt2", "qwen2", "gemma3"):
        model = _bridge(kind)
        toks = _tokens(model, batch=1, n=n)
        am = torch.ones(1, n, dtype=torch.long)
        am[0, :3] = 0
        guard = _GuardAttention(n)
        tl_plugins.get_plugin_manager().register(guard, name="quadratic-guard")
        try:
            with tl_plugins.enabled(model, "topk", k=4, backend="chunked", chunk_size=8), torch.no_grad():
                model(toks)
                model(toks, attention_mask=am)
                assert guard.calls == 2 * model.cfg.n_layers
                with pytest.raises(AssertionError, match="made a"):  # the guard does catch the dense path
                    with tl_plugins.enabled(model, "topk", k=4, backend="dense"):
                        model(toks)
        finally:
            tl_plugins.get_plugin_manager().unregister(guard)


class _KVShapes:
    """A wrapper plugin recording the K/V head count the seam hands to attention implementations."""

    def __init__(self):
        self.kv_heads = []

    @hookimpl(wrapper=True)
    def tl_plugins_attention(self, call):
        self.kv_heads.append((call.n_heads, call.k.shape[2], call.v.shape[2]))
        return (yield)


def test_grouped_kv_heads_are_never_repeated():
    spy = _KVShapes()
    pm = tl_plugins.get_plugin_manager()
    pm.register(spy, name="kv-spy")
    try:
        for kind, kv in (("llama", 2), ("gemma3", 1)):
            model = _bridge(kind)
            spy.kv_heads.clear()
            with tl_plugins.enabled(model, "topk", k=3, backend="chunked"):
                model(_tokens(model))
            assert spy.kv_heads and all(h == 4 and k == kv and v == kv for h, k, v in spy.kv_heads)
    finally:
        pm.unregister(spy)


def test_sliding_window_layers_take_the_linear_route_with_their_window():
    model = _bridge("gemma3")
    seen = {}

    class Spy:
        @hookimpl(wrapper=True)
        def tl_plugins_attention(self, call):
            seen[call.layer] = (call.window_size, call.custom_mask)
            return (yield)

    spy = Spy()
    tl_plugins.get_plugin_manager().register(spy, name="window-spy")
    try:
        with tl_plugins.enabled(model, "topk", k=3, backend="chunked"):
            model(_tokens(model))
    finally:
        tl_plugins.get_plugin_manager().unregister(spy)
    assert seen == {0: (4, False), 1: (4, False), 2: (None, False)}


def test_kv_cache_generation_equals_generation_without_cache(bridge):
    toks = _tokens(bridge, batch=1, n=6)
    plain = [bridge.generate(toks, max_new_tokens=5, do_sample=False, verbose=False, use_past_kv_cache=c)
             for c in (True, False)]
    if not torch.equal(*plain):  # transformer-lens 4.3 with transformers 5.24 (constraints pin 5.23)
        pytest.skip("this transformer-lens/transformers pair's own cached generation differs from uncached")
    with tl_plugins.enabled(bridge, "topk", k=3):
        cached = bridge.generate(toks, max_new_tokens=5, do_sample=False, verbose=False, use_past_kv_cache=True)
        full = bridge.generate(toks, max_new_tokens=5, do_sample=False, verbose=False, use_past_kv_cache=False)
    assert torch.equal(cached, full)
    with tl_plugins.enabled(bridge, "topk", k=10_000):
        exact = bridge.generate(toks, max_new_tokens=5, do_sample=False, verbose=False)
    assert torch.equal(exact, bridge.generate(toks, max_new_tokens=5, do_sample=False, verbose=False))


def test_gradients_match_the_plain_hook_oracle():
    model = _bridge("llama")
    toks = _tokens(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(fn):
        model.zero_grad(set_to_none=True)
        fn().log_softmax(-1)[..., 5].sum().backward()
        return [p.grad.clone() for p in params]

    with tl_plugins.enabled(model, "topk", k=3, backend="chunked"):
        got = grads(lambda: model(toks))
    want = grads(lambda: _oracle(model, toks, 3))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    model.zero_grad(set_to_none=True)


def test_feed_forward_topk_equals_a_plain_hook_on_hook_post():
    """The paper's rule (keep each token's largest gate pre-activations) against plain hooks: record
    the mask at ``mlp.hook_pre`` (the gate projection), apply it at ``mlp.hook_post``."""
    model = _bridge("llama")
    toks = _tokens(model)
    units = 16
    masks = {}

    def record(pre, hook):
        idx = pre.topk(units, dim=-1).indices
        masks[hook.name.split(".")[1]] = torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, idx, True)

    def apply(post, hook):
        return post * masks[hook.name.split(".")[1]]

    with tl_plugins.enabled(model, "topk", ff_k=units):
        out = model(toks)
    with tl_plugins.enabled(model, "topk", ff_k=model.cfg.d_mlp):
        assert torch.equal(model(toks), model(toks.clone()))
    oracle = model.run_with_hooks(toks, fwd_hooks=[
        (f"blocks.{layer}.mlp.{name}", fn) for layer in range(model.cfg.n_layers)
        for name, fn in (("hook_pre", record), ("hook_post", apply))])
    torch.testing.assert_close(out, oracle, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(out, model(toks), atol=1e-3)


def test_compatibility_mode_bridge():
    model = _bridge("llama", compatibility_mode=True)
    toks = _tokens(model)
    ref = model(toks)
    with tl_plugins.enabled(model, "topk", k=10_000, ff_k=model.cfg.d_mlp):
        assert torch.equal(model(toks), ref)
    with tl_plugins.enabled(model, "topk", k=3, backend="chunked"):
        out = model(toks)
    torch.testing.assert_close(out, _oracle(model, toks, 3), atol=2e-5, rtol=1e-5)
    assert torch.equal(model(toks), ref)


def test_unsupported_attention_is_refused_naming_class_and_plugin():
    from transformers import OPTConfig, OPTForCausalLM

    from tl_plugins.backends.bridge import boot

    hf = OPTForCausalLM(OPTConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                  num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = boot(hf.eval(), tiny.word_tokenizer(97))
    toks = torch.randint(4, 97, (1, 6))
    ref = model(toks)
    before = _snapshot(model, toks)
    cls = type(model.blocks[0].attn).__name__
    with pytest.raises(UnsupportedModelError, match=rf"'topk'.*{cls}"):
        tl_plugins.enable(model, "topk", k=3)
    assert _snapshot(model, toks) == before and tl_plugins.active(model) == {}
    assert torch.equal(model(toks), ref)
