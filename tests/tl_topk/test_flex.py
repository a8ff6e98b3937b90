"""The flex backend (threshold pass + FlexAttention) against the dense oracle and the selection rule.

On CPU FlexAttention runs its unfused reference and has no backward, so the forward is compared
with ``dense`` here and the gradients only where CUDA exists. Pass 1 (``row_thresholds``) is
checked on its own against ``topk_keep_mask`` on scores full of exact ties.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tl_plugins
from tl_topk import topk_attention, topk_keep_mask
from tl_topk.ops import flex
from tl_topk.ops.attention import resolve_backend
from tl_topk.ops.selection import count_valid, k_per_row, per_head_spec
from tl_topk.ops.threshold import keep_from_thresholds, row_thresholds

pytestmark = [
    pytest.mark.skipif(not flex.available(), reason="torch has no FlexAttention"),
    pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pad(kind, b, n_k):
    if kind is None:
        return None
    pad = torch.ones(b, n_k, dtype=torch.bool, device=DEVICE)
    if kind == "left":
        pad[0, : n_k // 2] = False  # with causal and n_q = n_k: fully masked leading rows
    elif kind == "right":
        pad[-1, -3:] = False
    else:
        pad[:, 1::3] = False
    return pad


@st.composite
def flex_cases(draw):
    b = draw(st.integers(1, 2))
    h_kv = draw(st.integers(1, 2))
    h = h_kv * draw(st.integers(1, 3))
    n_k = draw(st.integers(1, 40))
    n_q = draw(st.integers(1, n_k))
    causal = draw(st.booleans())
    k_top = draw(st.sampled_from([1, 2, 3, max(1, n_k - 1), n_k, n_k + 3, 0.4]))
    padding = draw(st.sampled_from([None, "left", "right", "holes"]))
    softcap = draw(st.sampled_from([None, None, 3.0]))
    window = draw(st.sampled_from([None, None, 1, 4])) if causal else None
    return b, n_q, n_k, h, h_kv, causal, k_top, padding, softcap, window, draw(st.integers(0, 2**16))


@settings(max_examples=40, deadline=None)
@given(flex_cases())
def test_flex_forward_equals_dense(case):
    b, n_q, n_k, h, h_kv, causal, k_top, padding, softcap, window, seed = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n_q, h, 16, generator=g).to(DEVICE)
    k = torch.randn(b, n_k, h_kv, 16, generator=g).to(DEVICE)
    v = torch.randn(b, n_k, h_kv, 16, generator=g).to(DEVICE)
    pad = _pad(padding, b, n_k)
    with torch.no_grad():
        kw = dict(causal=causal, key_padding_mask=pad, softcap=softcap, window=window)
        ref = topk_attention(q, k, v, k_top, backend="dense", **kw)
        out = topk_attention(q, k, v, k_top, backend="flex", **kw)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 30), st.integers(1, 12), st.booleans(), st.sampled_from([None, 2, 7]),
       st.integers(0, 2**16))
def test_thresholds_reproduce_the_rule_on_tied_scores(h_kv, n, k_top, causal, window, seed):
    """Small integer q and k: scores are exact integers with many ties at every boundary."""
    window = window if causal else None
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (1, n, 2 * h_kv, 4), generator=g).double()
    k = torch.randint(-2, 3, (1, n, h_kv, 4), generator=g).double()
    pad = torch.rand(1, n, generator=g) > 0.2
    spec = per_head_spec(k_top, 2 * h_kv)
    k_rows = k_per_row(spec, count_valid(n, n, causal, pad, 1, "cpu", window), n)
    lo, tie, tie_idx = row_thresholds(q, k, k_rows, int(k_rows.max()), causal=causal, key_padding_mask=pad,
                                      scale=1.0, softcap=None, memory_budget=2048, window=window)  # several chunks
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2))
    valid = pad[:, None, None, :].expand_as(s)
    if causal:
        valid = valid & torch.ones(n, n, dtype=torch.bool).tril()
    if window is not None:
        valid = valid & torch.ones(n, n, dtype=torch.bool).triu(1 - window)
    s = s.masked_fill(~valid, float("-inf"))
    expected = topk_keep_mask(s, k_rows)
    assert torch.equal(keep_from_thresholds(s, lo, tie, tie_idx) & valid, expected)


def test_flex_ties_go_to_smaller_index():
    q = torch.randn(1, 16, 2, 16, device=DEVICE)
    k = torch.ones(1, 16, 1, 16, device=DEVICE)
    v = torch.arange(16.0, device=DEVICE).view(1, 16, 1, 1).expand(1, 16, 1, 16).contiguous()
    with torch.no_grad():
        out = topk_attention(q, k, v, 3, causal=False, backend="flex")
    torch.testing.assert_close(out, torch.full_like(out, 1.0))  # mean of v rows 0, 1, 2


@pytest.mark.skipif(DEVICE != "cpu", reason="CUDA has a FlexAttention backward")
def test_flex_backward_on_cpu_is_refused_clearly_and_no_grad_runs():
    q = torch.randn(1, 8, 2, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="backend='flex'.*no backward on CPU.*chunked"):
        topk_attention(q, q.detach(), q.detach(), 2, causal=True, backend="flex")
    with torch.no_grad():  # leaves that require grad, under no_grad: forward runs
        out = topk_attention(q, q, q, 2, causal=True, backend="flex")
        ref = topk_attention(q, q, q, 2, causal=True, backend="dense")
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


@pytest.mark.skipif(DEVICE != "cuda", reason="FlexAttention has no backward on CPU")
def test_flex_gradients_equal_dense():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 96, h, 64, generator=g).to(DEVICE).requires_grad_(True) for h in (6, 3, 3))
    pad = torch.ones(2, 96, dtype=torch.bool, device=DEVICE)
    pad[0, :40] = False
    ref = topk_attention(q, k, v, 9, causal=True, key_padding_mask=pad, backend="dense")
    out = topk_attention(q, k, v, 9, causal=True, key_padding_mask=pad, backend="flex")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    w = torch.randn_like(ref)
    for a, e in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_compiled_flex_equals_dense_and_decode_steps_stop_recompiling():
    """The compiled path (what CUDA runs) on CPU, over KV-cache decode steps (one query, one more key
    and a new causal offset each step): equal to dense, and after the first shape change the graph is
    dynamic, so a third step with new thresholds (a new score_mod closure) compiles nothing."""
    import torch._dynamo

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    try:
        for step, n_k in enumerate((40, 41, 42)):
            torch._dynamo.config.error_on_recompile = step == 2
            q = torch.randn(1, 1, 4, 16, generator=g).to(DEVICE)
            k, v = (torch.randn(1, n_k, 2, 16, generator=g).to(DEVICE) for _ in range(2))
            k_rows = k_per_row(per_head_spec(5, 4), count_valid(1, n_k, True, None, 1, DEVICE), n_k)
            with torch.no_grad():
                compiled = flex.flex_topk_attention(q, k, v, k_rows, 5, causal=True, key_padding_mask=None,
                                                    scale=0.25, softcap=None, compile=True)
                ref = topk_attention(q, k, v, 5, causal=True, scale=0.25, backend="dense")
            torch.testing.assert_close(compiled, ref, atol=2e-6, rtol=0)
    finally:
        torch._dynamo.config.error_on_recompile = False


def test_auto_picks_flex_on_cuda_only_where_triton_cannot():
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, triton_ok=True, flex_ok=True) == "triton"
    assert resolve_backend("auto", cuda, triton_ok=False, flex_ok=True) == "flex"
    assert resolve_backend("auto", cuda, triton_ok=False, flex_ok=False) == "chunked"
    assert resolve_backend("auto", torch.device("cpu"), triton_ok=False, flex_ok=True) == "chunked"


def test_model_with_flex_backend_equals_dense_backend(llama, tokens):
    with torch.no_grad():
        with tl_plugins.enabled(llama, "topk", k=5, backend="dense"):
            ref = llama(tokens)
        with tl_plugins.enabled(llama, "topk", k=5, backend="flex"):
            out = llama(tokens)
            _, cache = llama.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert set(cache.keys()) == {f"blocks.{i}.attn.hook_z" for i in range(llama.cfg.n_layers)}


def test_flex_kv_cache_generation_equals_dense_backend(llama):
    """Decode steps (one query over a growing cache: the causal offset) through flex."""
    toks = torch.randint(0, 90, (1, 20), generator=torch.Generator().manual_seed(0))
    outs = []
    for backend in ("dense", "flex"):
        with torch.no_grad(), tl_plugins.enabled(llama, "topk", k=4, backend=backend):
            outs.append(llama.generate(toks, max_new_tokens=8, do_sample=False, use_past_kv_cache=True,
                                       stop_at_eos=False, verbose=False))
    assert torch.equal(outs[0], outs[1])
