"""``trace`` against brute-force dense computations: coefficients are ``hook_post``, scores and
direct effects recomputed from the cache, the direct effects of every component add up to the
target logit, promoted tokens equal a dense argsort, the lens equals the backend's readout, and a
HookedTransformer and a TransformerBridge of the same weights give the same trace."""

from __future__ import annotations

import pytest
import torch

import tl_plugins
from tl_embedspace import debugger
from tl_plugins import backends

PROMPT = "w5 w9 w13 w7 w22 w31"


def _cache(model, text):
    be = backends.detect(model)
    toks = be.to_tokens(text)
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks)
    return be, toks, logits[0], cache


def test_columns_and_brute_force(llama):
    t = debugger.trace(llama, PROMPT, position=3, k=4)
    be, toks, logits, cache = _cache(llama, PROMPT)
    W = tl_plugins.weights(llama)
    for col in ("layer", "unit", "coefficient", "norm", "score", "direct_effect", "rank", "top_tokens"):
        assert col in t.sub_updates.columns
    assert len(t.sub_updates) == 4 * be.n_layers
    x = cache[be.hook_name("resid_post", be.n_layers - 1)][0, 3]
    sigma = (x.pow(2).mean() + be.cfg.eps).sqrt()
    tid = int(logits[3].argmax())
    d = W.ln_final_w() * W.W_U[:, tid] / sigma
    for l in range(be.n_layers):
        post = cache[be.hook_name("mlp_post", l)][0, 3]
        score = post.abs() * W.W_out[l].norm(dim=-1)
        de = post * (W.W_out[l] @ d)
        rows = t.sub_updates[t.sub_updates.layer == l]
        assert rows.unit.tolist() == torch.argsort(-score, stable=True)[:4].tolist()
        for r in rows.itertuples():
            assert r.coefficient == pytest.approx(float(post[r.unit]), abs=1e-6)
            assert r.score == pytest.approx(float(score[r.unit]), rel=1e-5)
            assert r.direct_effect == pytest.approx(float(de[r.unit]), rel=1e-4, abs=1e-7)
            v = W.W_out[l, r.unit] * (1 if r.coefficient >= 0 else -1)
            dense = (v * W.ln_final_w()) @ W.W_U
            assert r.top_tokens == be.tokenizer.convert_ids_to_tokens(dense.topk(5).indices.tolist()) or \
                r.top_tokens == [be.tokenizer.decode([i]) for i in dense.topk(5).indices.tolist()]
        byde = t.by_direct_effect[t.by_direct_effect.layer == l]
        assert byde.unit.tolist() == torch.argsort(-de.abs(), stable=True)[:4].tolist()


def test_direct_effects_sum_to_the_logit(llama):
    """Embedding + every head + b_O + every sub-update + b_out, through the frozen norm = logit."""
    t = debugger.trace(llama, PROMPT, position=-1, k=10_000)
    be, toks, logits, cache = _cache(llama, PROMPT)
    W = tl_plugins.weights(llama)
    pos = toks.shape[1] - 1
    tid = int(t.targets.target_id[0])
    sigma = float(t.targets.sigma_final[0])
    d = W.ln_final_w() * W.W_U[:, tid] / sigma
    total = float(cache[be.hook_name("resid_pre", 0)][0, pos] @ d)
    total += float(t.heads.direct_effect.sum()) + float(t.sub_updates.direct_effect.sum())
    total += float(W.b_O.sum(0) @ d) + float(W.b_out.sum(0) @ d)
    assert total + float(W.b_U[tid]) == pytest.approx(float(logits[pos, tid]), abs=1e-4)


def test_lens_target_and_contrast(llama):
    t = debugger.trace(llama, PROMPT, target="w7", contrast="w9", k=3)
    be, toks, logits, cache = _cache(llama, PROMPT)
    pos = toks.shape[1] - 1
    tid = be.tokenizer.encode("w7", add_special_tokens=False)[0]
    for r in t.layers.itertuples():
        lens = be.readout(cache[be.hook_name("resid_post", r.layer)][0, pos])
        assert r.post_rank == int((lens > lens[tid]).sum()) + 1
        assert r.post_prob == pytest.approx(float(lens.softmax(-1)[tid]), rel=1e-4)
        assert r.post_top[0] == be.tokenizer.decode([int(lens.argmax())])
    assert t.targets.contrast[0] == "w9"
    assert "<table>" in t._repr_html_()


def test_batch_and_positions(llama):
    t = debugger.trace(llama, [PROMPT, "w4 w8"], position=[0, -1], k=2)
    assert sorted(set(zip(t.targets.prompt, t.targets.position))) == [(0, 0), (0, 5), (1, 0), (1, 1)]
    single = debugger.trace(llama, "w4 w8", position=0, k=2)
    a = t.sub_updates[(t.sub_updates.prompt == 1) & (t.sub_updates.position == 0)].reset_index(drop=True)
    assert a.unit.tolist() == single.sub_updates.unit.tolist()


def test_hooked_and_bridge_agree(llama_models):
    if len(llama_models) < 2:
        pytest.skip("parity needs HookedTransformer (transformer-lens 3.x)")
    a = debugger.trace(llama_models["hooked"], PROMPT, k=5)
    b = debugger.trace(llama_models["bridge"], PROMPT, k=5)
    assert a.sub_updates.label.tolist() == b.sub_updates.label.tolist()
    assert torch.allclose(torch.tensor(a.sub_updates.direct_effect.values),
                          torch.tensor(b.sub_updates.direct_effect.values), atol=1e-5)
    assert a.layers.post_rank.tolist() == b.layers.post_rank.tolist()


def test_layernorm_model_sums_to_the_logit(gpt2):
    t = debugger.trace(gpt2, torch.tensor([[5, 6, 7, 8]]), k=10_000)
    be, W = backends.detect(gpt2), tl_plugins.weights(gpt2)
    with torch.no_grad():
        logits, cache = gpt2.run_with_cache(torch.tensor([[5, 6, 7, 8]]))
    tid, sigma = int(t.targets.target_id[0]), float(t.targets.sigma_final[0])
    lw = W.ln_final_w()
    d = (lw if lw is not None else 1) * W.W_U[:, tid]
    d = (d - d.mean()) / sigma
    total = float(cache[be.hook_name("resid_pre", 0)][0, 3] @ d) + float(t.heads.direct_effect.sum())
    total += float(t.sub_updates.direct_effect.sum()) + float(W.b_O.sum(0) @ d) + float(W.b_out.sum(0) @ d)
    # the LayerNorm bias contributes b_ln . W_U[:, t], which no component owns
    b_ln = gpt2.ln_final.b if hasattr(gpt2, "ln_final") and hasattr(gpt2.ln_final, "b") else None
    if b_ln is None:
        pytest.skip("no LayerNorm bias to account for on this backend")
    total += float(b_ln @ W.W_U[:, tid]) + float(W.b_U[tid])
    assert total == pytest.approx(float(logits[0, 3, tid]), abs=1e-4)


def test_bad_input(llama):
    with pytest.raises(ValueError, match=r"target: 'w5 w6' is not a single token.*2 tokens"):
        debugger.trace(llama, PROMPT, target="w5 w6")
    with pytest.raises(ValueError, match="unknown to the tokenizer"):
        debugger.trace(llama, PROMPT, target="zebra")
    with pytest.raises(IndexError, match="position: got 99"):
        debugger.trace(llama, PROMPT, position=99)
    with pytest.raises(IndexError, match="target: got token id 100000"):
        debugger.trace(llama, PROMPT, target=100000)
    with pytest.raises(ValueError, match="k: got 0"):
        debugger.trace(llama, PROMPT, k=0)
    with pytest.raises(IndexError, match="layer: got 7"):
        debugger.coefficients(llama, PROMPT, 7)


def test_unsupported_mlps():
    from tl_plugins.errors import UnsupportedModelError
    from tl_plugins.models import tiny

    if not tiny.hooked_available():
        pytest.skip("SoLU configs need HookedTransformerConfig (transformer-lens 3.x)")
    solu = tiny.build(tiny.TINY_GPT2, act_fn="solu_ln")
    with pytest.raises(UnsupportedModelError, match="SoLU"):
        debugger.trace(solu, torch.tensor([[1, 2]]))
    with pytest.raises(UnsupportedModelError, match="SoLU"):
        tl_plugins.enable(solu, "steer", interventions=[{"layer": 0, "unit": 0}])
    assert tl_plugins.active(solu) == {}


@pytest.fixture(scope="module")
def gemma3_bridge():
    from tl_plugins.models import tiny

    return tiny.tiny_bridge("gemma3")  # norms after attention and MLP (ln1_post, ln2_post), QK-norm


def test_post_norm_model_sums_to_the_logit(gemma3_bridge):
    """Gemma 3's post norms: every component through its frozen post norm adds up to the logit, and
    each sub-update's direct effect equals a brute-force one from the cache and the norm modules."""
    model = gemma3_bridge
    text = "w5 w9 w13 w7 w22"
    t = debugger.trace(model, text, position=-1, k=10_000)
    be, toks, logits, cache = _cache(model, text)
    W = tl_plugins.weights(model)
    pos = toks.shape[1] - 1
    tid = int(t.targets.target_id[0])
    sigma = float(t.targets.sigma_final[0])
    d = W.ln_final_w() * W.W_U[:, tid] / sigma
    total = float(cache[be.hook_name("resid_pre", 0)][0, pos] @ d)
    for l in range(be.n_layers):
        # brute force: the post norm applied to the MLP output with its scale frozen, unit by unit
        post = cache[be.hook_name("mlp_post", l)][0, pos]
        raw = post @ W.W_out[l] + W.b_out[l]
        norm = model.blocks[l].ln2_post
        s2 = float((raw.double().pow(2).mean() + model.cfg.eps).sqrt())
        w2 = norm(torch.full((1, raw.numel()), 1e3))[0] * (1e6 + model.cfg.eps) ** 0.5 / 1e3
        assert torch.allclose(norm(raw[None])[0], w2 * raw / s2, atol=1e-5)
        de = post * ((W.W_out[l] * w2) @ d) / s2
        rows = t.sub_updates[t.sub_updates.layer == l]
        assert rows.post_norm_scale.iloc[0] == pytest.approx(s2, rel=1e-5)
        for r in rows.head(5).itertuples():
            assert r.direct_effect == pytest.approx(float(de[r.unit]), rel=1e-4, abs=1e-6)
            assert r.coefficient == pytest.approx(float(post[r.unit]), abs=1e-6)  # still hook_post
        total += float(rows.direct_effect.sum()) + float((w2 * W.b_out[l] / s2) @ d)
        hrows = t.heads[t.heads.layer == l]
        s1 = float(hrows.post_norm_scale.iloc[0])
        w1 = model.blocks[l].ln1_post(torch.full((1, raw.numel()), 1e3))[0] * (1e6 + model.cfg.eps) ** 0.5 / 1e3
        total += float(hrows.direct_effect.sum()) + float((w1 * W.b_O[l] / s1) @ d)
    assert total + float(W.b_U[tid]) == pytest.approx(float(logits[pos, tid]), abs=1e-4)


def test_post_norm_values_are_read_as_written(gemma3_bridge, tmp_path):
    """The index ranks ``w2 * W_out[i]`` (the value as the post norm writes it), not the raw row."""
    from tl_embedspace.debugger.index import ValueIndex
    from tl_embedspace.debugger.model import debug_weights

    model = gemma3_bridge
    W = tl_plugins.weights(model)
    dw = debug_weights(model)
    w2 = model.blocks[0].ln2_post(torch.full((1, W.W_out.shape[-1]), 1e3))[0] * (1e6 + model.cfg.eps) ** 0.5 / 1e3
    assert torch.allclose(dw.W_out[0], W.W_out[0] * w2, atol=1e-6)
    idx = ValueIndex.build(model, n_tokens=5, folder=tmp_path, progress=False)
    dense = (W.W_out[0, 3] * w2 * W.ln_final_w()) @ W.W_U
    assert idx.promoted(0, 3, 1.0, 5) == torch.argsort(-dense, stable=True)[:5].tolist()
