"""``tl_plugins.enable(model, "topk", ...)`` on TransformerLens models, against the unmodified model."""

from __future__ import annotations

import copy

import pytest
import torch

import tl_plugins
from tl_plugins.backends.bridge import attention_family, is_bridge
from tl_plugins.models import tiny
from tl_topk.ops.dense import dense_topk_attention


def _seam_methods(model):
    """The methods the attention seam overrides per instance on every attention module."""
    if is_bridge(model):
        family, _ = attention_family(model.blocks[0].attn)
        return (family.catch, "_update_kv_cache")  # catch point, throw point
    return ("forward",)


def _act_fn(model, layer):
    """The MLP activation of ``layer`` as the model applies it to hook_pre (a bridge's is its Hugging
    Face module's: ``act_fn`` for Llama, ``act`` for GPT-2)."""
    mlp = model.blocks[layer].mlp
    if not is_bridge(model):
        return mlp.act_fn
    hf = mlp.original_component
    return getattr(hf, "act_fn", None) or hf.act


def _attn_scale(model, layer):
    """The factor the model multiplies q.k by."""
    attn = model.blocks[layer].attn
    return attn.original_component.scaling if is_bridge(model) else attn.attn_scale ** -1


def test_k_covering_all_keys_is_bit_exact(model, tokens):
    ref = model(tokens)
    with tl_plugins.enabled(model, "topk", k=tokens.shape[1]):
        assert torch.equal(model(tokens), ref)
        _, cache = model.run_with_cache(tokens)  # the hooked route
        assert torch.equal(model.run_with_cache(tokens)[0], ref)
    with tl_plugins.enabled(model, "topk", k=1.0):
        assert torch.equal(model(tokens), ref)


def test_chunked_route_at_k_n_matches_within_1e6(model, tokens):
    # k = n with padding: rows with fewer valid keys go through the chunked op, not the pass
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0
    z0 = "blocks.0.attn.hook_z"
    ref, ref_cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=z0)
    with tl_plugins.enabled(model, "topk", k=tokens.shape[1] - 1, backend="chunked"):
        # k = n - 1 >= n_valid for every row of sequence 0 past the padding, not for sequence 1
        out, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=z0)
    torch.testing.assert_close(cache[z0][0, 5:], ref_cache[z0][0, 5:], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 5:], ref[0, 5:], atol=1e-5, rtol=0)
    assert not torch.isnan(out).any()


def test_sparse_model_chunked_equals_hooked_dense_route(model, tokens):
    with tl_plugins.enabled(model, "topk", k=3, ff_k=5, backend="chunked"):
        fast = model(tokens)
        hooked, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(fast, hooked, atol=1e-5, rtol=0)
    assert (fast - model(tokens)).abs().max() > 1e-3  # top-k really changed the model


@pytest.mark.parametrize("backend", ["dense", "chunked"])
def test_plugin_equals_plain_transformerlens_hook(model, tokens, backend):
    """Independent oracle: the unmodified model with a plain TransformerLens hook that keeps each
    row's k largest entries of hook_attn_scores (random scores: no ties)."""
    k = 4

    def keep_top_k(scores, hook):
        kth = scores.topk(min(k, scores.shape[-1]), dim=-1).values[..., -1:]
        return scores.masked_fill(scores < kth, float("-inf"))

    with torch.no_grad():
        ref = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_attn_scores"), keep_top_k)])
        with tl_plugins.enabled(model, "topk", k=k, backend=backend):
            out = model(tokens)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (out - model(tokens)).abs().max() > 1e-3


def test_ff_topk_equals_plain_transformerlens_hooks(model, tokens):
    """Independent oracle for ff_k: one hook records each token's k largest hook_pre indices (the gate
    for gated MLPs), another multiplies hook_post by that mask."""
    k = 5
    store = {}

    def record(pre, hook):
        store[hook.layer()] = pre.topk(k, dim=-1).indices

    def mask_post(post, hook):
        return post * torch.zeros_like(post, dtype=torch.bool).scatter_(-1, store[hook.layer()], True)

    with torch.no_grad():
        ref = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("mlp.hook_pre"), record),
                                                      (lambda n: n.endswith("mlp.hook_post"), mask_post)])
        with tl_plugins.enabled(model, "topk", ff_k=k):
            out = model(tokens)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (out - model(tokens)).abs().max() > 1e-3


def _gpt_neo_like():
    """A GPT-Neo-like model: layer 0 global, layer 1 local attention with a window of 5."""
    model = tiny.build(tiny.TINY_GPT2, seed=3, use_local_attn=True, attn_types=["global", "local"], window_size=5)
    assert model.blocks[1].attn.attn_type == "local"
    return model


def _gemma2_bridge():
    """Gemma 2 on a bridge: layer 0 a sliding window of 4, layer 1 global; attention soft-cap."""
    pytest.importorskip("transformer_lens.model_bridge")
    model = tiny.tiny_bridge("gemma2", seed=3)
    assert model.original_model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert model.original_model.config.sliding_window == 4
    return model


@pytest.mark.parametrize("build, local_layer, window", [
    pytest.param(_gpt_neo_like, 1, 5, id="hooked-gpt-neo", marks=pytest.mark.hooked(
        reason="local attention through HookedTransformerConfig(use_local_attn=True, attn_types=...); "
               "the bridge case is bridge-gemma2")),
    pytest.param(_gemma2_bridge, 0, 4, id="bridge-gemma2"),
])
def test_local_attention_layers_take_the_fast_route_and_match_oracles(tokens, build, local_layer, window):
    """A model with a local (sliding-window) layer: the chunked route equals the hooked route and a
    plain hook on hook_attn_scores (which already carries the window); k below the window changes the
    local layer, k equal to the window is dense again."""
    model = build()
    ref = model(tokens)

    def keep_top3(scores, hook):
        return scores.masked_fill(scores < scores.topk(3, dim=-1).values[..., -1:], float("-inf"))

    with torch.no_grad():
        oracle = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_attn_scores"), keep_top3)])
        with tl_plugins.enabled(model, "topk", k=3, backend="chunked"):
            fast = model(tokens)
            hooked, cache = model.run_with_cache(tokens)
        with tl_plugins.enabled(model, "topk", k=window - 1, layers=[local_layer], backend="chunked"):
            window_covered = model(tokens)  # k < n, but the window keeps at most `window` keys per row
    torch.testing.assert_close(fast, hooked, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast, oracle, atol=1e-5, rtol=0)
    assert int((cache["pattern", local_layer] > 0).sum(-1).max()) <= 3
    assert (window_covered - ref).abs().max() > 1e-4  # `window` keys in the window, one fewer kept: it changes
    with tl_plugins.enabled(model, "topk", k=window, layers=[local_layer], backend="chunked"):
        torch.testing.assert_close(model(tokens), ref, atol=1e-5, rtol=0)  # k = window: dense again


def test_hook_contract_under_run_with_cache(model, tokens):
    _, dense_cache = model.run_with_cache(tokens)
    with tl_plugins.enabled(model, "topk", k=3):
        _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        scores = cache["attn_scores", layer]
        pattern = cache["pattern", layer]
        assert ((pattern > 0).sum(-1) <= 3).all()
        torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
        # full masked scores: finite wherever causal attention allows, and the kept keys are the top 3
        n = tokens.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        assert torch.isfinite(scores[..., causal]).all()
        top3 = scores.topk(3, dim=-1).indices
        assert torch.gather(pattern[..., 2:, :], -1, top3[..., 2:, :]).gt(0).all()
    torch.testing.assert_close(cache["attn_scores", 0], dense_cache["attn_scores", 0])
    for name in ["hook_q", "hook_k", "hook_v"]:
        assert torch.equal(cache[f"blocks.0.attn.{name}"], dense_cache[f"blocks.0.attn.{name}"])
    assert {"blocks.1.attn.hook_z", "blocks.1.hook_attn_out"} <= set(cache.keys())


def test_model_attention_matches_functional_oracle(llama, tokens):
    """Layer 0 z from the plugin equals the dense oracle applied to the cached post-rotary q, k, v."""
    with tl_plugins.enabled(llama, "topk", k=4):
        _, cache = llama.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.0.attn.hook_"))
    q, k, v = cache["blocks.0.attn.hook_rot_q"], cache["blocks.0.attn.hook_rot_k"], cache["blocks.0.attn.hook_v"]
    z = dense_topk_attention(q, k, v, (4,) * 4, causal=True, scale=_attn_scale(llama, 0))
    torch.testing.assert_close(cache["blocks.0.attn.hook_z"], z, atol=1e-5, rtol=0)


def test_editing_scores_changes_the_selection(gpt2, tokens):
    def boost_key0(scores, hook):
        scores[..., 0] = scores[..., 0] + 1e4
        return scores

    with tl_plugins.enabled(gpt2, "topk", k=1):
        _, cache = gpt2.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
        with gpt2.hooks([("blocks.0.attn.hook_attn_scores", boost_key0)]):
            _, edited = gpt2.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    p = edited["blocks.0.attn.hook_pattern"]
    assert torch.equal(p[..., 0], torch.ones_like(p[..., 0]))
    assert not torch.equal(cache["blocks.0.attn.hook_pattern"], p)


def test_activation_patching_still_works(gpt2, tokens):
    clean, corrupt = tokens[:1], tokens[1:]
    with tl_plugins.enabled(gpt2, "topk", k=3):
        clean_logits, clean_cache = gpt2.run_with_cache(clean)
        name = "blocks.1.attn.hook_z"

        def patch(z, hook):
            return clean_cache[name]

        patched = gpt2.run_with_hooks(corrupt, fwd_hooks=[(name, patch)])
        # patching every head's z of the last layer and the resid before it reproduces the clean run
        def patch_resid(x, hook):
            return clean_cache["blocks.1.hook_resid_pre"]

        full = gpt2.run_with_hooks(corrupt, fwd_hooks=[("blocks.1.hook_resid_pre", patch_resid)])
        corrupt_logits = gpt2(corrupt)
    torch.testing.assert_close(full, clean_logits, atol=1e-5, rtol=0)
    assert not torch.allclose(patched, corrupt_logits)


def test_disable_restores_bit_exactly(model, tokens):
    ref = model(tokens)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tl_plugins.enable(model, "topk", k=2, ff_k=3)
    assert not torch.equal(model(tokens), ref)
    tl_plugins.disable(model, "topk")
    assert torch.equal(model(tokens), ref)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "_tl_plugins_state" not in model.__dict__
    assert all(m not in b.attn.__dict__ for b in model.blocks for m in _seam_methods(model))


def test_kv_cache_decode_equals_full_forward(llama, tokens):
    ones = lambda n: torch.ones(tokens.shape[0], n, dtype=torch.long)  # noqa: E731
    with tl_plugins.enabled(llama, "topk", k=3, backend="chunked"):
        full = llama(tokens, attention_mask=ones(tokens.shape[1]))
        if is_bridge(llama):
            # the bridge hands Hugging Face its own cache; the mask spans the cached prefix too
            from transformers import DynamicCache

            cache = DynamicCache()
            outs = [llama(tokens[:, :10], past_key_values=cache, attention_mask=ones(10))]
            for i in range(10, tokens.shape[1]):
                outs.append(llama(tokens[:, i:i + 1], past_key_values=cache, attention_mask=ones(i + 1)))
            assert cache.get_seq_length() == tokens.shape[1]
        else:
            from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

            cache = TransformerLensKeyValueCache.init_cache(llama.cfg, llama.cfg.device, tokens.shape[0])
            outs = [llama(tokens[:, :10], past_kv_cache=cache, attention_mask=ones(10))]
            for i in range(10, tokens.shape[1]):
                outs.append(llama(tokens[:, i:i + 1], past_kv_cache=cache, attention_mask=ones(1)))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)


def test_generate_matches_greedy_full_forward(llama):
    prompt = torch.tensor([[5, 17, 3, 44, 8, 9]])
    with tl_plugins.enabled(llama, "topk", k=2, backend="chunked"):
        out = llama.generate(prompt, max_new_tokens=6, do_sample=False, use_past_kv_cache=True, verbose=False,
                           stop_at_eos=False)
        seq = prompt
        for _ in range(6):
            nxt = llama(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_chunked_equals_hooked_route(model, tokens, side):
    mask = torch.ones_like(tokens)
    if side == "left":
        mask[0, :6] = 0
    else:
        mask[1, -6:] = 0
    with tl_plugins.enabled(model, "topk", k=3, backend="chunked"):
        fast = model(tokens, attention_mask=mask)
        hooked, _ = model.run_with_cache(tokens, attention_mask=mask)
    assert not torch.isnan(fast).any()
    real = mask.bool()
    torch.testing.assert_close(fast[real], hooked[real], atol=1e-5, rtol=0)


def test_per_layer_per_head_and_layers_limit(llama, tokens):
    ref = llama(tokens)
    with tl_plugins.enabled(llama, "topk", k={1: 2}):
        _, c = llama.run_with_cache(tokens)
        assert ((c["pattern", 0] > 0).sum(-1).max() == tokens.shape[1])
        assert ((c["pattern", 1] > 0).sum(-1).max() == 2)
    with tl_plugins.enabled(llama, "topk", k={(0, 1): 1, (1, 3): 0.25}):
        _, c = llama.run_with_cache(tokens)
        nnz0, nnz1 = (c["pattern", 0] > 0).sum(-1), (c["pattern", 1] > 0).sum(-1)
        assert nnz0[:, 1].max() == 1 and nnz0[:, 0].max() == tokens.shape[1]
        assert nnz1[:, 3, -1].max() == 6 and nnz1[:, 2].max() == tokens.shape[1]
    with tl_plugins.enabled(llama, "topk", k={0: [1, None, 2, 3]}):
        _, c = llama.run_with_cache(tokens)
        assert (c["pattern", 0] > 0).sum(-1).amax(dim=(0, 2)).tolist() == [1, tokens.shape[1], 2, 3]
    with tl_plugins.enabled(llama, "topk", k=2, layers=[1]):
        _, c = llama.run_with_cache(tokens)
        assert (c["pattern", 0] > 0).sum(-1).max() == tokens.shape[1]
    assert torch.equal(llama(tokens), ref)


def test_ff_topk_identity_at_d_mlp_and_sparsity_below(model, tokens):
    ref = model(tokens)
    d_mlp = model.cfg.d_mlp
    with tl_plugins.enabled(model, "topk", ff_k=d_mlp):
        assert torch.equal(model(tokens), ref)
    with tl_plugins.enabled(model, "topk", ff_k=7):
        _, cache = model.run_with_cache(tokens)
        pre = cache["pre", 0]
        post = cache["post", 0]
    gated = model.cfg.gated_mlp
    act = (post / cache["blocks.0.mlp.hook_pre_linear"]) if gated else post
    assert ((post != 0).sum(-1) <= 7).all()
    kept = pre.topk(7, dim=-1).indices
    expect = _act_fn(model, 0)(pre).gather(-1, kept)
    torch.testing.assert_close(act.gather(-1, kept), expect, atol=1e-4, rtol=1e-4)


def test_composes_with_saelens(tokens):
    pytest.importorskip("sae_lens")
    from sae_lens import HookedSAETransformer, StandardSAE, StandardSAEConfig

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = HookedSAETransformer(tiny.build(tiny.TINY_GPT2, seed=1).cfg)
        model.load_state_dict(tiny.build(tiny.TINY_GPT2, seed=1).state_dict())
        cfg = StandardSAEConfig(d_in=64, d_sae=96, reshape_activations="hook_z")
        cfg.metadata.hook_name = "blocks.1.attn.hook_z"
        sae = StandardSAE(cfg)
        for p in sae.parameters():
            torch.nn.init.normal_(p, std=0.1)
    model.eval()
    tl_plugins.enable(model, "topk", k=3)
    plain = model(tokens)
    z = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")[1]["blocks.1.attn.hook_z"]
    model.add_sae(sae, use_error_term=True)
    out, cache = model.run_with_cache(tokens, names_filter=lambda n: "sae" in n)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)  # error term: exact reconstruction
    acts = cache["blocks.1.attn.hook_z.hook_sae_acts_post"]
    torch.testing.assert_close(acts, sae.encode(z), atol=1e-5, rtol=1e-5)
    model.reset_saes()
    model.add_sae(sae, use_error_term=False)
    assert not torch.allclose(model(tokens), plain, atol=1e-3)  # the SAE's reconstruction is used
    model.reset_saes()
    torch.testing.assert_close(model(tokens), plain, atol=0, rtol=0)
    tl_plugins.disable(model, "topk")


@pytest.mark.parametrize("cpp_built", [True, False])
def test_auto_backend_dense_for_short_cpp_or_chunked_for_long(monkeypatch, cpp_built):
    """auto on the CPU: dense while its score matrices fit the budget, then the compiled cpp kernels,
    or chunked (with one warning naming the reason) where the extension cannot be built."""
    import tl_topk.ops.attention as att
    from tl_topk.ops import cpp_backend

    if cpp_built and not cpp_backend.available():
        pytest.skip(f"the cpp extension does not build here: {cpp_backend.availability()}")
    seen = []
    real_chunked, real_cpp = att.chunked_topk_attention, cpp_backend.cpp_topk_attention
    monkeypatch.setattr(att, "chunked_topk_attention", lambda *a, **kw: seen.append("chunked") or real_chunked(*a, **kw))
    monkeypatch.setattr(cpp_backend, "cpp_topk_attention", lambda *a, **kw: seen.append("cpp") or real_cpp(*a, **kw))
    if not cpp_built:
        monkeypatch.setattr(cpp_backend.EXTENSION, "failure", "no compiler (simulated)")
        monkeypatch.setattr(cpp_backend.EXTENSION, "module", None)
        monkeypatch.setattr(cpp_backend.EXTENSION, "warned", False)
    q = torch.randn(1, 64, 2, 8)
    short = att.topk_attention(q, q[:, :, :1], q[:, :, :1], 4, causal=True)
    assert seen == []
    if cpp_built:
        long = att.topk_attention(q, q[:, :, :1], q[:, :, :1], 4, causal=True, memory_budget=1024)
        assert seen == ["cpp"]
    else:
        with pytest.warns(RuntimeWarning, match="no compiler \\(simulated\\).*runs 'chunked'"):
            long = att.topk_attention(q, q[:, :, :1], q[:, :, :1], 4, causal=True, memory_budget=1024)
        assert seen == ["chunked"]
        with pytest.raises(RuntimeError, match="backend='cpp'.*no compiler"):
            att.topk_attention(q, q[:, :, :1], q[:, :, :1], 4, causal=True, backend="cpp")
    torch.testing.assert_close(short, long, atol=1e-6, rtol=0)


def test_deepcopy_of_enabled_model(gpt2, tokens):
    tl_plugins.enable(gpt2, "topk", k=2)
    twin = copy.deepcopy(gpt2)
    torch.testing.assert_close(twin(tokens), gpt2(tokens), atol=0, rtol=0)


@pytest.mark.parametrize("options, exc, match", [
    (dict(k=0), ValueError, "k"),
    (dict(k=-1), ValueError, "k"),
    (dict(k=2.5), ValueError, "fraction"),
    (dict(k=1.01), ValueError, r"\(0, 1\]"),
    (dict(k="4"), TypeError, "k"),
    (dict(), ValueError, "ff_k"),
    (dict(k={9: 2}), ValueError, "unknown layer"),
    (dict(k={(0, 7): 2}), ValueError, "unknown head"),
    (dict(k=2, layers=[5]), ValueError, "layers"),
    (dict(ff_k=0), ValueError, "ff_k"),
    (dict(k=2, backend="cuda"), ValueError, "backend"),
    (dict(k=2, chunk_size=0), ValueError, "chunk_size"),
    (dict(q=2), TypeError, "unknown option"),
])
def test_bad_options_leave_model_untouched(gpt2, tokens, options, exc, match):
    ref = gpt2(tokens)
    with pytest.raises(exc, match=match):
        tl_plugins.enable(gpt2, "topk", **options)
    assert tl_plugins.active(gpt2) == {}
    assert torch.equal(gpt2(tokens), ref)


@pytest.mark.hooked(reason="ALiBi and SoLU exist only as HookedTransformerConfig options (tiny.build refuses them "
                           "on 4.x: tests/tl_plugins/test_models.py); a bridge's unsupported attention is refused in "
                           "tests/tl_topk/test_bridge.py::test_unsupported_attention_is_refused_naming_class_and_plugin")
def test_unsupported_models_refused():
    alibi = tiny.build(tiny.TINY_GPT2, positional_embedding_type="alibi")
    with pytest.raises(tl_plugins.UnsupportedModelError, match="alibi"):
        tl_plugins.enable(alibi, "topk", k=2)
    solu = tiny.build(tiny.TINY_GPT2, act_fn="solu_ln")
    with pytest.raises(ValueError, match="solu_ln"):
        tl_plugins.enable(solu, "topk", ff_k=4)
    assert tl_plugins.active(solu) == {} and tl_plugins.active(alibi) == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_triton_backend_on_cpu_model_refused(gpt2, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA"):
        tl_plugins.enable(gpt2, "topk", k=2, backend="triton")
    assert tl_plugins.active(gpt2) == {}
