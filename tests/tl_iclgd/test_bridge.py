"""iclgd on TransformerBridge, through the backend interface only (transformer-lens 3.9 and 4.3).

Two kinds of evidence:

* parity with HookedTransformer on the same weights (``tiny.hf_pair``: one random Hugging Face model
  converted both ways), for capture, vanilla GD, layer-causal GD (both readouts), the baselines and
  compare, where HookedTransformer exists (3.x; skipped on 4.x, naming why);
* independent oracles on the bridge alone, on both legs: the prefix KV cache against full sequences,
  ``run_with_cache``, gradient steps against SGD and layer-causal GD written out by hand on the plain
  Hugging Face model (``conftest.HFTwin``), GPT-2's q/k/v tensors perturbed one by one, the scores
  rebuilt from q/k where the scores hook does not hold them, and the bridge left bit-identical
  (parameters, buffers, module attributes, hooks; still deep-copyable) by every call.

Tolerances: measured maxima on the 2-core x86_64 CPU (torch 2.13.0+cpu, float32) are in the comments
next to each bound; the bounds leave about 10x headroom.
"""

import copy
import math

import einops
import pytest
import torch

import tl_plugins
from tl_iclgd import GDConfig, capture, compare, finetune, untrained_like
from tl_iclgd.compare import LAYER_METRICS
from tl_iclgd.tasks import TokenizedTask
from tl_plugins.backends import detect
from tl_plugins.backends.bridge import BridgeBackend
from tl_plugins.models import tiny

HOOKED = tiny.hooked_available()
NO_HOOKED = ("transformer_lens.HookedTransformer cannot be imported (transformer-lens 4.x removed it): "
             "no HookedTransformer to compare the bridge with; the bridge-only oracles below run instead")
needs_hooked = pytest.mark.skipif(not HOOKED, reason=NO_HOOKED)
KINDS = ("llama", "gpt2")

# float32 bounds; measured maxima over both tiny kinds (TL 3.9 and 4.3 alike where both apply):
ACT_ATOL = 2e-6     # capture, bridge vs hooked: attn_in 4.8e-7, logits 1.2e-7, scores 1.9e-8,
#                     attn_out 9.3e-9, demo pattern 1.5e-8; bridge prefix cache vs full forward 3.6e-7;
#                     scores rebuilt from q/k vs the scores hook 7.5e-9
GD_ATOL = 1e-6      # trained tensors after 3-4 SGD steps, bridge vs hooked: GD 1.2e-7, LCGD 7.5e-8
#                     (resid_post) / 6.5e-8 (resid_mid); bridge vs hand-written SGD on the HF model
#                     1.2e-7, vs hand-written LCGD 6.0e-8
METRIC_ATOL = 1e-5  # compare, bridge vs hooked: per-layer metrics 5.2e-7, run-level figures 9.5e-7
#                     (except layer 0 of a rotary model, see _ill_conditioned: 0.096 and 0.0067)


def ids_task(n_demos=4, n_queries=6, seed=0, vocab=90) -> TokenizedTask:
    """A token-copy task on raw ids, separator 5 (3 is Hugging Face's pad id: a zero embedding)."""
    g = torch.Generator().manual_seed(seed)

    def pair(i):
        n = 1 + i % 3
        x = torch.randint(10, vocab, (n,), generator=g).tolist()
        return (x + [5], [x[-1]])
    return TokenizedTask.from_ids([pair(i) for i in range(n_demos)], [pair(i) for i in range(n_queries)])


def to_tl(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """A bridge (nn.Linear) q/k/v weight [(h d), d_model] or bias [(h d)] in TransformerLens layout."""
    if t.dim() == 2:
        return einops.rearrange(t, "(h d) m -> h m d", h=n_heads)
    return einops.rearrange(t, "(h d) -> h d", h=n_heads)


def kv_names(model, weights_only=False):
    """The K/V tensors "kv" selects, in layer order, weights first (the backend's names)."""
    be = detect(model)
    out = [n for layer in range(be.n_layers) for c in "kv" for n in be.attention_parameters(layer, c)]
    return [n for n in out if not weights_only or "W_" in n or n.endswith("weight")]


def max_diff(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


# -- the bridge left exactly as it was ------------------------------------------------------------

def snapshot(model):
    """Everything a call could leave behind: parameters and buffers (objects and values), every module's
    attribute names and tensor attributes, and every hook (torch's and TransformerLens's).

    Taken after one plain forward, as a user's model would have had: the bridge's first forward adds
    its own bookkeeping attributes (``_fired_hook_out``, ``_current_batch_size``, ...), ours must not."""
    with torch.no_grad():
        model(torch.tensor([[10, 11, 12]]))
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)}
    bufs = {n: (b, b.detach().clone()) for n, b in model.named_buffers(remove_duplicate=False)}
    mods = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        mods[name] = ({k: (id(v) if isinstance(v, torch.Tensor) else None) for k, v in vars(mod).items()},
                      len(mod._forward_hooks), len(mod._forward_pre_hooks), len(mod._backward_hooks),
                      len(getattr(mod, "fwd_hooks", ()) or ()), len(getattr(mod, "bwd_hooks", ()) or ()))
    return params, bufs, mods


def no_autograd_graph_left(model) -> None:
    """No tensor attribute of any module holds an autograd graph (what makes ``copy.deepcopy`` fail)."""
    for name, mod in model.named_modules():
        for k, v in vars(mod).items():
            assert not (isinstance(v, torch.Tensor) and v.grad_fn is not None), (name, k)


def assert_untouched(model, snap, deepcopy: bool = True) -> None:
    params, bufs, mods = snap
    now = dict(model.named_parameters(remove_duplicate=False))
    assert set(now) == set(params)
    for n, (obj, value) in params.items():
        assert now[n] is obj and torch.equal(now[n].detach(), value), n
    nowb = dict(model.named_buffers(remove_duplicate=False))
    assert set(nowb) == set(bufs)
    for n, (obj, value) in bufs.items():
        assert nowb[n] is obj and torch.equal(nowb[n], value), n
    now_mods = {name: mod for name, mod in model.named_modules(remove_duplicate=False)}
    assert set(now_mods) == set(mods)
    for name, (attrs, *hooks) in mods.items():
        mod = now_mods[name]
        got = {k: (id(v) if isinstance(v, torch.Tensor) else None) for k, v in vars(mod).items()}
        assert got == attrs, (name, set(got) ^ set(attrs))
        assert [len(mod._forward_hooks), len(mod._forward_pre_hooks), len(mod._backward_hooks),
                len(getattr(mod, "fwd_hooks", ()) or ()), len(getattr(mod, "bwd_hooks", ()) or ())] == hooks, name
    assert not tl_plugins.active(model)
    no_autograd_graph_left(model)
    if deepcopy:
        copy.deepcopy(model)  # fails when a tensor with an autograd graph was left on the model


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=KINDS)
def pair(request):
    """(HookedTransformer, TransformerBridge) on the same random weights."""
    if not HOOKED:
        pytest.skip(NO_HOOKED)
    return tiny.hf_pair(request.param)


@pytest.fixture(scope="module", params=KINDS)
def bridge(request, make_tiny_bridge):
    """A tiny bridge (raw mode) on either leg, warmed up by one plain forward as a user's would be."""
    b = make_tiny_bridge(request.param, seed=4)
    with torch.no_grad():
        b(torch.tensor([[10, 11, 12]]))
    return b


# == parity with HookedTransformer (3.x) ===========================================================

def test_pair_shares_weights_and_backends(pair):
    ht, br = pair
    assert detect(ht).name == "hooked" and detect(br).name == "bridge"
    x = torch.tensor([[10, 11, 12, 5, 13]])
    with torch.no_grad():
        assert max_diff(ht(x), br(x)) < ACT_ATOL


def test_parity_capture(pair):
    ht, br = pair
    snap = snapshot(br)
    ctx = [10, 11, 12, 5, 13, 14, 5, 20]
    queries = [[21, 22, 5], [23, 5], [24, 25, 5], [26, 5]]
    a = capture(ht, ctx, queries, demo_start=1, want_attn_in=True, batch_size=3)
    b = capture(br, ctx, queries, demo_start=1, want_attn_in=True, batch_size=3)
    for field in ("attn_out", "logits", "demo_pattern", "attn_in"):
        assert max_diff(getattr(a, field), getattr(b, field)) < ACT_ATOL, field
    for x, y in zip(a.scores, b.scores):
        assert x.shape == y.shape and max_diff(x, y) < ACT_ATOL
    # zero-shot and with fine-tuned parameters too (the bridge's own names)
    z_a, z_b = capture(ht, [], queries), capture(br, [], queries)
    assert max_diff(z_a.attn_out, z_b.attn_out) < ACT_ATOL and max_diff(z_a.logits, z_b.logits) < ACT_ATOL
    assert_untouched(br, snap)


def _gd_configs(ht, br, **kw):
    """Configs training the same tensors on both: explicit K/V weight names on Llama, whose K/V have
    no biases in Hugging Face (HookedTransformer's "kv" adds its zero-initialised _b_K/_b_V there), "kv"
    on GPT-2 (K/V weights and biases on both)."""
    if any("_b_" in n for n in kv_names(ht)) and not any(n.endswith("bias") for n in kv_names(br)):
        return (GDConfig(params=tuple(kv_names(ht, True)), **kw), GDConfig(params=tuple(kv_names(br, True)), **kw))
    return GDConfig(params="kv", **kw), GDConfig(params="kv", **kw)


@pytest.mark.parametrize("method", ["gd", "lcgd_post", "lcgd_mid"])
def test_parity_finetune(pair, method):
    ht, br = pair
    snap = snapshot(br)
    kw = dict(lr=0.5, layer_causal=method != "gd", readout="resid_mid" if method == "lcgd_mid" else "resid_post")
    cfg_h, cfg_b = _gd_configs(ht, br, **kw)
    task = ids_task(n_demos=4)
    rh = finetune(ht, task, cfg_h, record_inputs=True)
    rb = finetune(br, task, cfg_b, record_inputs=True)
    names_h, names_b = list(rh.params), list(rb.params)
    assert len(names_h) == len(names_b)
    for nh, nb in zip(names_h, names_b):
        h = rh.params[nh]
        assert max_diff(h, to_tl(rb.params[nb], h.shape[0])) < GD_ATOL, (nh, nb)
        assert rh.layers[nh] == rb.layers[nb]
    assert max_diff(rh.trace.loss, rb.trace.loss) < 1e-5
    assert max_diff(rh.trace.grad_norm, rb.trace.grad_norm) < 1e-4
    if method != "gd":
        assert max_diff(rh.trace.layer_loss, rb.trace.layer_loss) < 1e-5
    assert all(max_diff(x, y) < ACT_ATOL for x, y in zip(rh.attn_inputs, rb.attn_inputs))
    assert max_diff(rh.delta_norms(2), rb.delta_norms(2)) < GD_ATOL
    assert_untouched(br, snap)


def test_llama_kv_biases_are_hookedtransformer_only(pair):
    """On Llama HookedTransformer's "kv" also trains its zero K/V biases (b_V's update changes the
    model from step 2 on); the bridge trains the weights only. The first step's weight updates agree."""
    ht, br = pair
    if not any("_b_" in n for n in kv_names(ht)):
        pytest.skip("GPT-2: K/V biases exist on both")
    task = ids_task(n_demos=1)
    rh, rb = finetune(ht, task, GDConfig(lr=0.5)), finetune(br, task, GDConfig(lr=0.5))
    assert len(rh.params) == 2 * len(rb.params)
    for nh, nb in zip(kv_names(ht, True), kv_names(br, True)):
        assert max_diff(rh.deltas[nh], to_tl(rb.deltas[nb], rh.deltas[nh].shape[0])) < GD_ATOL


def test_parity_baselines(pair):
    """What the baselines keep is the same on both; their random rest is each library's own
    initialisation (TransformerLens vs Hugging Face), so the pipeline is compared on the bridge
    baseline's weights converted to HookedTransformer (its HF init is tiny.hf_model(seed))."""
    ht, br = pair
    kind = "llama" if detect(br).gated_mlp else "gpt2"
    snap = snapshot(br)
    e_h, e_b = untrained_like(ht, "embeddings", seed=3), untrained_like(br, "embeddings", seed=3)
    w_h, w_b, w_src = tl_plugins.weights(e_h), tl_plugins.weights(e_b), tl_plugins.weights(br)
    for name in ("W_E", "W_U", "b_U", "W_pos", "ln_final_w"):
        a, b, src = (getattr(w, name) for w in (w_h, w_b, w_src))
        if name == "ln_final_w":
            a, b, src = a(), b(), src()
        if src is None:  # no learned positions (Llama)
            assert a is None and b is None
            continue
        assert max_diff(a, b) < ACT_ATOL and torch.equal(b, src), name
    assert not torch.equal(w_b.W_K[0], w_src.W_K[0]) and not torch.equal(w_b.W_K[0], w_h.W_K[0])
    # the untrained bridge is the HF initialisation of that seed: convert it to HookedTransformer too
    u_b = untrained_like(br, "none", seed=7)
    u_h, u_b2 = tiny.hf_pair(kind, seed=7)
    be_u, be_u2 = detect(u_b), detect(u_b2)
    p1, p2 = be_u.named_parameters(), be_u2.named_parameters()
    assert set(p1) == set(p2) and all(torch.equal(p1[n], p2[n]) for n in p1)
    task = ids_task(n_demos=3, n_queries=4)
    cfg_h, cfg_b = _gd_configs(u_h, u_b, lr=0.3)
    res_h = compare(u_h, task, cfg_h, n_demos=3, n_queries=4)
    res_b = compare(u_b, task, cfg_b, n_demos=3, n_queries=4)
    _assert_same_comparison(res_h, res_b, is_rotary(br))
    assert_untouched(br, snap)


def _ill_conditioned(rotary: bool, layer: int, metric: str) -> bool:
    """Layer 0 of a rotary model: ICL's and ZSL's scores over the query's own tokens are equal in exact
    arithmetic there (the same tokens, relative positions), so m_ICL - m_ZSL is rounding noise and
    SimAM_delta its cosine, and near-uniform patterns over repeated tokens make Kendall tau's ranks
    tie-sensitive: the two backends' 1e-8 differences move these by up to 0.3 (SimAM_delta) and 0.01
    (tau). Everything else agrees to METRIC_ATOL."""
    return rotary and layer == 0 and metric in ("SimAM_delta", "Kendall_tau")


def _assert_same_comparison(res_h, res_b, rotary: bool, variants=("trained",)):
    lh = res_h.layers[res_h.layers.variant.isin(variants)].reset_index(drop=True)
    lb = res_b.layers[res_b.layers.variant.isin(variants)].reset_index(drop=True)
    assert len(lh) == len(lb) > 0
    assert (lh[["variant", "method", "seed", "layer", "metric", "n_nan"]]
            .equals(lb[["variant", "method", "seed", "layer", "metric", "n_nan"]]))
    for x, y, metric, layer in zip(lh.value, lb.value, lh.metric, lh.layer):
        if _ill_conditioned(rotary, layer, metric):
            assert metric == "SimAM_delta" or abs(x - y) < 0.02, (metric, x, y)
            continue
        assert (math.isnan(x) and math.isnan(y)) or abs(x - y) < METRIC_ATOL, (metric, layer, x, y)
    rh = res_h.runs[res_h.runs.variant.isin(variants)].reset_index(drop=True)
    rb = res_b.runs[res_b.runs.variant.isin(variants)].reset_index(drop=True)
    for x, y, metric in zip(rh.value, rb.value, rh.metric):
        assert (math.isnan(x) and math.isnan(y)) or abs(x - y) < METRIC_ATOL, (metric, x, y)


def is_rotary(model) -> bool:
    return getattr(detect(model).cfg, "positional_embedding_type", "") == "rotary"


def test_parity_compare(pair):
    ht, br = pair
    snap = snapshot(br)
    task = ids_task(n_demos=6, n_queries=8)
    cfg_h, cfg_b = _gd_configs(ht, br, lr=0.3)
    kw = dict(methods=("gd", "lcgd"), baselines=("untrained",), n_demos=4, n_queries=6, seeds=(0, 1))
    res_h, res_b = compare(ht, task, cfg_h, **kw), compare(br, task, cfg_b, **kw)
    _assert_same_comparison(res_h, res_b, is_rotary(br))
    # the baseline rows exist on both, but hold different random weights (see test_parity_baselines)
    assert len(res_b.layers) == len(res_h.layers) == 2 * 2 * 2 * 2 * len(LAYER_METRICS)
    assert res_b.settings["n_layers"] == 2
    assert_untouched(br, snap)


@pytest.mark.parametrize("kind", KINDS)
@needs_hooked
def test_parity_processed_weights(kind):
    """Compatibility mode (TransformerLens's weight processing on the bridge) against a HookedTransformer
    processed the same way, with non-trivial norms and biases so that folding and centering matter."""
    from tl_plugins.models.local import hf_to_bridge, hf_to_hooked

    hf = tiny.hf_model(kind, seed=5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if p.dim() == 1:  # norm scales and biases: HF initialises them to 1 and 0
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    tok = tiny.word_tokenizer(hf.config.vocab_size)
    ht = hf_to_hooked(copy.deepcopy(hf), tok, processed=True)
    br = hf_to_bridge(copy.deepcopy(hf), tok, processed=True)
    snap = snapshot(br)
    task = ids_task(n_demos=3)
    with pytest.raises(ValueError, match="processed .*fold_ln"):
        finetune(br, task, GDConfig())
    a = capture(ht, [10, 11, 5, 12], [[20, 21, 5], [22, 5]], demo_start=1, want_attn_in=True)
    b = capture(br, [10, 11, 5, 12], [[20, 21, 5], [22, 5]], demo_start=1, want_attn_in=True)
    for field in ("attn_out", "logits", "demo_pattern", "attn_in"):
        assert max_diff(getattr(a, field), getattr(b, field)) < 1e-5, field
    cfg_h, cfg_b = _gd_configs(ht, br, lr=0.3, allow_processed=True)
    rh, rb = finetune(ht, task, cfg_h), finetune(br, task, cfg_b)
    for nh, nb in zip(rh.params, rb.params):
        assert max_diff(rh.params[nh], to_tl(rb.params[nb], rh.params[nh].shape[0])) < 1e-5, (nh, nb)
    assert_untouched(br, snap)


# == the bridge alone: independent oracles (3.x and 4.x) ===========================================

def test_bridge_prefix_cache_equals_full_forward(bridge):
    snap = snapshot(bridge)
    ctx = [10, 11, 12, 5, 13, 14, 5]
    queries = [[20, 21, 5], [22, 5], [23, 24, 25, 5], [26, 27, 5]]
    a = capture(bridge, ctx, queries, demo_start=1, want_attn_in=True, batch_size=2)
    b = capture(bridge, ctx, queries, demo_start=1, want_attn_in=True, use_prefix_cache=False)
    for field in ("attn_out", "logits", "demo_pattern", "attn_in"):
        assert max_diff(getattr(a, field), getattr(b, field)) < ACT_ATOL, field  # measured <= 3.6e-7
    assert all(max_diff(x, y) < ACT_ATOL for x, y in zip(a.scores, b.scores))
    assert_untouched(bridge, snap)


def test_bridge_capture_equals_run_with_cache(bridge):
    ctx, q = [10, 11, 12, 13], [20, 21, 22]
    cap = capture(bridge, ctx, [q], demo_start=1, predict_offset=-2, want_attn_in=True)
    logits, cache = bridge.run_with_cache(torch.tensor([ctx + q]))
    be = detect(bridge)
    for layer in range(be.n_layers):
        assert max_diff(cap.attn_out[0, layer], cache[be.hook_name("attn_out", layer)][0, -1]) < ACT_ATOL
        scores = cache[be.hook_name("attn_scores", layer)][0, :, -1, len(ctx):]
        assert max_diff(cap.scores[0][layer], scores) < ACT_ATOL
        pat = cache[be.hook_name("pattern", layer)][0, :, -1, 1:len(ctx)].mean(0)
        assert max_diff(cap.demo_pattern[0, layer], pat) < ACT_ATOL
        assert max_diff(cap.attn_in[0, layer], cache[be.attention_input_hook(layer)[0]][0, -1]) < ACT_ATOL
    assert max_diff(cap.logits[0], logits[0, -2]) < ACT_ATOL


def test_backend_run_stops_after_the_last_block(bridge):
    """run(stop_at_layer=n_layers) is the residual stream after the last block (the bridge itself would
    return logits), and readout() of it is the logits."""
    be = detect(bridge)
    x = torch.tensor([[10, 11, 12, 5]])
    with torch.no_grad():
        resid = be.run(x, stop_at_layer=be.n_layers)
        _, cache = bridge.run_with_cache(x)
        logits = bridge(x)
    assert resid.shape == (1, 4, be.d_model)
    assert torch.equal(resid, cache[be.hook_name("resid_post", be.n_layers - 1)])
    assert max_diff(be.readout(resid), logits) < ACT_ATOL


def test_backend_hooks_by_name(bridge):
    """Backend.hooks: aliases and canonical names, an unknown name is an error (TL 3.9's bridge would
    skip it silently), and nothing is left behind, even when the block raises."""
    be = detect(bridge)
    assert be.has_hook(be.hook_name("attn_out", 0)) and be.has_hook("ln_final.hook_in")
    assert not be.has_hook("blocks.0.attn.hook_nope")
    with pytest.raises(KeyError, match="hook_nope"):
        with be.hooks([("blocks.0.attn.hook_nope", lambda x, hook: None)]):
            pass
    seen = []
    x = torch.tensor([[10, 11, 5]])
    with pytest.raises(RuntimeError, match="raised inside"):
        with be.hooks([(be.hook_name("attn_out", 0), lambda t, hook: seen.append(tuple(t.shape)))]):
            with bridge.hooks(fwd_hooks=[(be.hook_name("resid_post", 0), lambda t, hook: seen.append("lib"))]):
                with torch.no_grad():
                    bridge(x)
            raise RuntimeError("raised inside the block")
    assert seen == [(1, 3, be.d_model), "lib"]
    assert all(len(hp.fwd_hooks) == 0 for hp in bridge.hook_dict.values())


def _demo_loss(logits, toks, mask=None):
    lp = torch.log_softmax(logits[..., :-1, :], -1).gather(-1, toks[1:, None].expand(*logits.shape[:-2], -1, 1))[..., 0]
    if mask is None:
        return -lp.mean(-1)
    return -(lp * mask).sum(-1) / mask.sum()


@pytest.mark.parametrize("loss", ["all_tokens", "label_only"])
@pytest.mark.parametrize("params", ["kv", "qo"])
def test_bridge_gd_equals_hand_written_sgd(bridge, make_hf_twin, loss, params):
    snap = snapshot(bridge)
    task = ids_task(n_demos=4)
    res = finetune(bridge, task, GDConfig(lr=0.5, params=params, loss=loss))
    twin = make_hf_twin(bridge)
    for n in res.params:  # the twin starts from the bridge's weights
        assert torch.equal(twin.tensor(n), detect(bridge).named_parameters()[n].detach()), n

    def step(j):
        toks = torch.tensor(task.demo_sequence(j))
        mask = torch.tensor(task.demo_label_mask(j)[1:], dtype=torch.float32) if loss == "label_only" else None
        return lambda t: _demo_loss(t.logits(toks[None])[0], toks, mask)
    oracle = twin.sgd(list(res.params), [step(j) for j in range(4)], 0.5)
    for n in res.params:
        assert max_diff(res.params[n], oracle[n]) < GD_ATOL, n  # measured <= 1.2e-7
    assert all(float(d.abs().max()) > 0 for n, d in res.deltas.items() if n.endswith("weight"))
    assert_untouched(bridge, snap)


@pytest.mark.parametrize("readout", ["resid_post", "resid_mid"])
def test_bridge_lcgd_equals_hand_written_lcgd(bridge, make_hf_twin, readout):
    snap = snapshot(bridge)
    task = ids_task(n_demos=3)
    res = finetune(bridge, task, GDConfig(lr=0.5, layer_causal=True, readout=readout))
    twin = make_hf_twin(bridge)

    def step(j):
        toks = torch.tensor(task.demo_sequence(j))
        return lambda t: _demo_loss(t.layer_causal_logits(toks[None], readout), toks).sum()
    oracle = twin.sgd(list(res.params), [step(j) for j in range(3)], 0.5)
    for n in res.params:
        assert max_diff(res.params[n], oracle[n]) < GD_ATOL, n  # measured <= 6.0e-8
    # and it is not vanilla GD
    gd = finetune(bridge, task, GDConfig(lr=0.5))
    low = [n for n in gd.params if gd.layers[n] == 0 and n.endswith("weight")]
    assert any(max_diff(gd.deltas[n], res.deltas[n]) > 1e-5 for n in low)
    assert_untouched(bridge, snap)


def test_gpt2_bridge_projection_tensors_are_separate_and_used(make_tiny_bridge):
    """GPT-2's fused c_attn: the bridge splits it at boot into q/k/v tensors of their own, and its forward
    uses exactly those; attention_parameters(layer, "k") changes K and nothing else, the fused tensor
    changes nothing, and training "kv" leaves Q bit-identical."""
    br = make_tiny_bridge("gpt2", seed=6)
    be = detect(br)
    x = torch.tensor([[10, 11, 12, 5, 13]])
    names = {c: be.hook_name(c, 0) for c in "qkv"}

    def run(params):
        store = {}
        with torch.no_grad(), be.hooks([(names[c], lambda t, hook, c=c: store.__setitem__(c, t.clone()))
                                        for c in "qkv"]):
            out = be.run(x, params=params)
        return out, store
    base, s0 = run(None)
    attn_names = {n for n in be.named_parameters() if be.layer_of(n) == 0 and ".attn." in n}
    selected = {c: set(be.attention_parameters(0, c)) for c in "qkvo"}
    fused = attn_names - set().union(*selected.values())
    assert fused and all("qkv" in n for n in fused)  # the stale fused c_attn tensors
    g = torch.Generator().manual_seed(0)
    for c in "qkv":
        for n, p in be.attention_parameters(0, c).items():
            out, s = run({n: p.detach() + 0.5 * torch.randn(p.shape, generator=g)})
            assert max_diff(s[c], s0[c]) > 1e-3, n
            assert all(torch.equal(s[o], s0[o]) for o in "qkv" if o != c), n
    for n in fused:
        p = be.named_parameters()[n]
        out, s = run({n: p.detach() + 0.5 * torch.randn(p.shape, generator=g)})
        assert torch.equal(out, base) and all(torch.equal(s[c], s0[c]) for c in "qkv"), n
    res = finetune(br, ids_task(n_demos=3), GDConfig(lr=0.5, params="kv", layers=(0,)))
    assert set(res.params) == selected["k"] | selected["v"]
    _, s_ft = run(res.params)
    assert torch.equal(s_ft["q"], s0["q"]) and max_diff(s_ft["k"], s0["k"]) > 1e-4


def test_scores_rebuilt_from_qk_where_the_scores_hook_holds_the_pattern(bridge, monkeypatch):
    """Some bridge attention classes fire hook_attn_scores on the post-softmax pattern (TL 4.3 note).
    Simulated here by pointing the backend's "attn_scores" name at the pattern hook: "auto" then
    rebuilds the scores from hook_q/hook_k (post-rotary) and gets the honest scores; "hook" raises."""
    ctx, queries = [10, 11, 12, 5], [[20, 21, 5], [22, 23, 24, 5]]
    honest = capture(bridge, ctx, queries)
    rebuilt = capture(bridge, ctx, queries, scores_from="qk")
    assert all(max_diff(x, y) < ACT_ATOL for x, y in zip(honest.scores, rebuilt.scores))  # measured 7.5e-9
    plain = BridgeBackend.hook_name
    monkeypatch.setattr(BridgeBackend, "hook_name", lambda self, kind, layer=None: plain(
        self, "pattern" if kind == "attn_scores" else kind, layer))
    auto = capture(bridge, ctx, queries)
    assert all(max_diff(x, y) < ACT_ATOL for x, y in zip(honest.scores, auto.scores))
    with pytest.raises(RuntimeError, match="softmax\\(hook_attn_scores\\) differs"):
        capture(bridge, ctx, queries, scores_from="hook")


def test_scores_check_still_catches_an_edited_pattern(bridge):
    be = detect(bridge)
    with be.hooks([(be.hook_name("pattern", 1), lambda x, hook: x * 0.5)]):
        with pytest.raises(RuntimeError, match="softmax\\(hook_attn_scores\\) differs.*query/key hooks"):
            capture(bridge, [], [[10, 11, 5]])
    assert all(len(hp.fwd_hooks) == 0 for hp in bridge.hook_dict.values())


def test_bridge_is_never_mutated(bridge):
    snap = snapshot(bridge)
    task = ids_task(n_demos=4, n_queries=5)
    capture(bridge, [10, 11, 5], [[20, 5], [21, 22, 5]], demo_start=1, want_attn_in=True)
    capture(bridge, [10, 11, 5], [[20, 5]], use_prefix_cache=False, scores_from="qk")
    for cfg in (GDConfig(lr=0.3), GDConfig(lr=0.3, layer_causal=True),
                GDConfig(lr=0.3, layer_causal=True, readout="resid_mid", loss="label_only", params="qkvo")):
        finetune(bridge, task, cfg, record_inputs=True)
    untrained_like(bridge, "none", seed=1)
    untrained_like(bridge, "embeddings", seed=1)
    with tl_plugins.enabled(bridge, "iclgd", lr=0.2):
        res = compare(bridge, task, methods=("gd", "lcgd"), baselines=("untrained", "untrained_embeddings"),
                      n_demos=3, n_queries=4)
    assert res.settings["lr"] == 0.2
    assert_untouched(bridge, snap)


def test_bridge_untrained_copies(bridge, make_tiny_bridge):
    """Seeded and deterministic, the global RNG untouched, Hugging Face's initialisation of that seed;
    "embeddings" keeps exactly the embeddings, every norm and the unembedding."""
    be = detect(bridge)
    kind = "llama" if be.gated_mlp else "gpt2"
    state = torch.random.get_rng_state()
    a, b = untrained_like(bridge, "none", seed=3), untrained_like(bridge, "none", seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    pa, pb, src = detect(a).named_parameters(), detect(b).named_parameters(), be.named_parameters()
    ref = detect(make_tiny_bridge(kind, seed=3)).named_parameters()
    assert set(pa) == set(src) and all(torch.equal(pa[n], pb[n]) and torch.equal(pa[n], ref[n]) for n in pa)
    assert detect(a).default_prepend_bos == be.default_prepend_bos and detect(a).n_ctx == be.n_ctx
    e = detect(untrained_like(bridge, "embeddings", seed=3)).named_parameters()
    kept = ("embed", "wte", "wpe", "norm", "layernorm", "ln_", "lm_head")
    for n, p in e.items():
        if any(k in n for k in kept):
            assert torch.equal(p, src[n]), n
        elif n.endswith("weight") and "qkv" not in n:
            assert not torch.equal(p, src[n]), n
    assert not torch.equal(pa[next(n for n in pa if "embed" in n or "wte" in n)],
                           src[next(n for n in pa if "embed" in n or "wte" in n)])


@pytest.mark.parametrize("kind", KINDS)
def test_compatibility_mode_bridge(kind, make_tiny_bridge):
    """Processed weights: GD refused unless allowed; capture works and computes the raw model's function."""
    raw = make_tiny_bridge(kind, seed=4)
    proc = make_tiny_bridge(kind, seed=4, compatibility_mode=True)
    assert tl_plugins.weights(proc).processing.is_processed
    snap = snapshot(proc)
    task = ids_task(n_demos=2, n_queries=3)
    with pytest.raises(ValueError, match="processed .*GDConfig\\(allow_processed=True\\)"):
        finetune(proc, task, GDConfig())
    with pytest.raises(ValueError, match="processed"):
        compare(proc, task, GDConfig(), n_demos=2, n_queries=3)
    a = capture(raw, [10, 11, 5], [[20, 21, 5], [22, 5]])
    b = capture(proc, [10, 11, 5], [[20, 21, 5], [22, 5]])
    # centering the unembedding shifts each position's logits by a constant: compare log-probabilities
    assert max_diff(a.logits.log_softmax(-1), b.logits.log_softmax(-1)) < 1e-5
    assert all(max_diff(x, y) < 1e-5 for x, y in zip(a.scores, b.scores))
    res = finetune(proc, task, GDConfig(lr=0.3, allow_processed=True))
    assert all(float(d.abs().max()) > 0 for n, d in res.deltas.items() if n.endswith("weight"))
    assert_untouched(proc, snap)


# == the real model ================================================================================

@pytest.mark.slow
@needs_hooked
def test_smollm2_bridge_and_hooked_give_the_same_comparison():
    """SmolLM2-135M loaded both ways: the compare aggregate agrees. The same K/V weights are trained
    (Hugging Face's Llama has no K/V biases, so HookedTransformer is given its weight names explicitly).
    Measured (TL 3.9, 2-core x86_64 CPU, float32): aggregate metrics <= 3.4e-4 apart (lcgd SimAM_delta,
    most of it from layer 0, see _ill_conditioned), per layer <= 7.6e-4 elsewhere (SimAM_after),
    fine-tuning losses <= 3.7e-5 relative, accuracies and counts identical."""
    from tl_plugins.models import load

    ht = load("smollm2-135m", backend="hooked")
    br = load("smollm2-135m", backend="bridge")
    assert detect(br).name == "bridge" and detect(ht).name == "hooked"
    snap = snapshot(br)
    cfg_h, cfg_b = _gd_configs(ht, br, lr=0.1)
    assert len(cfg_h.params) == len(cfg_b.params) == 60
    kw = dict(methods=("gd", "lcgd"), n_demos=4, n_queries=6, num_threads=1)
    res_h, res_b = compare(ht, "antonyms", cfg_h, **kw), compare(br, "antonyms", cfg_b, **kw)
    agg_h = res_h.to_frame().set_index(["variant", "method", "metric"])["mean"]
    agg_b = res_b.to_frame().set_index(["variant", "method", "metric"])["mean"]
    assert list(agg_h.index) == list(agg_b.index)
    for key in agg_h.index:
        x, y, metric = agg_h[key], agg_b[key], key[2]
        if math.isnan(x) or math.isnan(y):
            assert math.isnan(x) and math.isnan(y), key
        elif metric in LAYER_METRICS:
            assert abs(x - y) < 2e-3, (key, x, y)
        elif metric.startswith("ft_loss"):
            assert abs(x - y) <= 3e-4 * abs(x), (key, x, y)
        else:  # accuracies, Rec2FTP chance, demonstration counts
            assert x == y, (key, x, y)
    lh, lb = res_h.layers, res_b.layers
    for x, y, metric, layer in zip(lh.value, lb.value, lh.metric, lh.layer):
        if not _ill_conditioned(True, layer, metric) and not (math.isnan(x) and math.isnan(y)):
            assert abs(x - y) < 5e-3, (metric, layer, x, y)
    assert_untouched(br, snap, deepcopy=False)  # a third 135M-parameter copy only to prove a point
    # two real models and a snapshot of one: hand the memory back, later tests measure peak RSS
    del ht, br, snap, res_h, res_b
    _release_memory()


def _release_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages otherwise
    except (OSError, AttributeError):
        pass
