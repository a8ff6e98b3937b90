"""Every backend of ``topk_attention`` against the dense oracle, and the oracle against brute force."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tl_topk import topk_attention

CPU_BACKENDS = ["chunked"]
# The linear-memory CPU backends, each held to the dense oracle by the same tests.
SPARSE = ["chunked", "cpp"]


def need(backend):
    """Skip, saying why, when ``backend`` cannot run here (the cpp extension did not build)."""
    if backend == "cpp":
        from tl_topk.ops import cpp_backend

        if not cpp_backend.available():
            pytest.skip(f"cpp backend: {cpp_backend.availability()}")
    return backend


def built(backends):
    """``backends`` without the ones that cannot run here."""
    from tl_topk.ops import cpp_backend

    return [b for b in backends if b != "cpp" or cpp_backend.available()]


def naive(q, k, v, k_top, causal, pad, scale, softcap=None, window=None):
    """Loop over (batch, head, row): sort keys by (score desc, index asc), softmax over the first k."""
    b, n_q, h, d = q.shape
    n_k, h_kv = k.shape[1], k.shape[2]
    out = torch.zeros(b, n_q, h, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // h_kv)
            for i in range(n_q):
                cand = []
                for j in range(n_k):
                    if causal and j > i + n_k - n_q:
                        continue
                    if window is not None and j <= i + n_k - n_q - window:
                        continue
                    if pad is not None and not pad[bi, j]:
                        continue
                    s = float(q[bi, i, hi].double() @ k[bi, j, kv].double()) * scale
                    if softcap:
                        s = softcap * math.tanh(s / softcap)
                    cand.append((-s, j))
                kept = sorted(cand)[:k_top]
                if not kept:
                    continue
                m = max(-s for s, _ in kept)
                w = [math.exp(-s - m) for s, _ in kept]
                z = sum(w)
                for (s, j), wj in zip(kept, w):
                    out[bi, i, hi] += wj / z * v[bi, j, kv].double()
    return out


@st.composite
def cases(draw):
    b = draw(st.integers(1, 2))
    h_kv = draw(st.sampled_from([1, 2]))
    g = draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from([2, 4, 8]))
    n_k = draw(st.integers(1, 13))
    n_q = draw(st.integers(1, n_k))
    causal = draw(st.booleans())
    k_top = draw(st.sampled_from(["1", "2", "odd", "n-1", "n", "n+3", "frac"]))
    k_top = {"1": 1, "2": 2, "odd": 3, "n-1": max(1, n_k - 1), "n": n_k, "n+3": n_k + 3, "frac": 0.4}[k_top]
    padding = draw(st.sampled_from(["none", "left", "right", "holes"]))
    chunk = draw(st.integers(1, max(1, n_q + 1)))
    softcap = draw(st.sampled_from([None, None, 1.5]))
    window = draw(st.sampled_from([None, None, 1, 3])) if causal else None  # sliding-window layers
    seed = draw(st.integers(0, 2**16))
    return dict(b=b, h_kv=h_kv, g=g, d=d, n_k=n_k, n_q=n_q, causal=causal, k_top=k_top,
                padding=padding, chunk=chunk, softcap=softcap, window=window, seed=seed)


def make(c, dtype=torch.float64):
    gen = torch.Generator().manual_seed(c["seed"])
    b, n_q, n_k, h_kv, d = c["b"], c["n_q"], c["n_k"], c["h_kv"], c["d"]
    q = torch.randn(b, n_q, h_kv * c["g"], d, generator=gen, dtype=dtype)
    k = torch.randn(b, n_k, h_kv, d, generator=gen, dtype=dtype)
    v = torch.randn(b, n_k, h_kv, d, generator=gen, dtype=dtype)
    pad = None
    if c["padding"] != "none":
        pad = torch.ones(b, n_k, dtype=torch.bool)
        cut = n_k // 2
        if c["padding"] == "left":
            pad[0, :cut] = False  # fully masked early rows when causal
        elif c["padding"] == "right":
            pad[-1, n_k - cut:] = False
        else:
            pad[:, ::2] = False
    return q, k, v, pad


def run(backend, q, k, v, c, pad, **kw):
    return topk_attention(q, k, v, c["k_top"], causal=c["causal"], key_padding_mask=pad,
                          softcap=c["softcap"], window=c["window"], backend=backend, **kw)


def assert_backend_equals_dense(backend, q, k, v, c, pad):
    """Forward and gradients (float64) of ``backend`` against dense, no NaN anywhere."""
    ref = run("dense", q, k, v, c, pad)
    out = run(backend, q, k, v, c, pad, **({"chunk_size": c["chunk"]} if backend == "chunked" else {}))
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    g_out = torch.autograd.grad((out * w).sum(), (q, k, v))
    for a, e in zip(g_out, g_ref):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("backend", SPARSE)
@settings(max_examples=60, deadline=None)
@given(c=cases())
def test_sparse_backend_equals_dense_forward_and_backward(backend, c):
    need(backend)
    q, k, v, pad = make(c)
    for t in (q, k, v):
        t.requires_grad_(True)
    assert_backend_equals_dense(backend, q, k, v, c, pad)


@pytest.mark.parametrize("backend", SPARSE)
@settings(max_examples=40, deadline=None)
@given(c=cases(), data=st.data())
def test_heads_mixing_dense_and_topk_equal_dense_forward_and_backward(backend, c, data):
    """Per-head specs with dense heads (None, k >= n): those heads go through SDPA, the rest through
    ``backend``; whole and partial K/V groups, padding with fully masked rows."""
    need(backend)
    h = c["h_kv"] * c["g"]
    entries = st.sampled_from([None, 1, 2, 0.5, c["n_k"], c["n_k"] + 1])
    c = dict(c, k_top=tuple(data.draw(st.lists(entries, min_size=h, max_size=h))), softcap=None)
    q, k, v, pad = make(c)
    for t in (q, k, v):
        t.requires_grad_(True)
    assert_backend_equals_dense(backend, q, k, v, c, pad)


def test_dense_heads_do_not_make_the_chunked_backend_quadratic():
    """A layer with one top-2 head among dense heads: nothing autograd saves is O(n^2)."""
    n, h = 256, 6
    q = torch.randn(1, n, h, 16, requires_grad=True)
    k = torch.randn(1, n, 3, 16, requires_grad=True)
    v = torch.randn(1, n, 3, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = topk_attention(q, k, v, (None, 2, None, None, None, None), causal=True, backend="chunked")
    # linear: nothing larger than q (the dense heads' q/out, n x k for the top-k head); one head's
    # n x n scores alone would be 65536 elements, and the unsplit call saved 6 x n x n
    assert max(saved) <= q.numel() < n * n, max(saved)
    ref = topk_attention(q, k, v, (None, 2, None, None, None, None), causal=True, backend="dense")
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@settings(max_examples=25, deadline=None)
@given(cases())
def test_dense_oracle_equals_brute_force(c):
    q, k, v, pad = make(c)
    if isinstance(c["k_top"], float):
        return  # the brute force takes an absolute k
    out = run("dense", q, k, v, c, pad)
    ref = naive(q, k, v, c["k_top"], c["causal"], pad, q.shape[-1] ** -0.5, c["softcap"], c["window"])
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64(causal):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(1, 7, 2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(1, 7, 2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    pad = torch.tensor([[0, 1, 1, 1, 1, 1, 1]]).bool()
    for backend in built(["dense", *SPARSE]):
        def f(q, k, v, backend=backend):
            return topk_attention(q, k, v, 3, causal=causal, key_padding_mask=pad, softcap=2.0,
                                  backend=backend, chunk_size=4 if backend == "chunked" else None)
        assert torch.autograd.gradcheck(f, (q, k, v))


def test_k1_is_hard_attention():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 9, 2, 4, generator=gen)
    k = torch.randn(2, 9, 2, 4, generator=gen)
    v = torch.randn(2, 9, 2, 4, generator=gen)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    best = scores.argmax(-1)  # [b, h, q]
    expected = torch.gather(v.permute(0, 2, 1, 3), 2, best.unsqueeze(-1).expand(-1, -1, -1, 4))
    for backend in built(["dense", *SPARSE]):
        out = topk_attention(q, k, v, 1, causal=True, backend=backend)
        torch.testing.assert_close(out, expected.permute(0, 2, 1, 3), atol=0, rtol=0)


def test_ties_pick_smaller_key_index_in_every_backend():
    # identical keys: every score of a row ties; the rule keeps the first k valid keys
    q = torch.randn(1, 5, 2, 4)
    k = torch.ones(1, 6, 1, 4)
    v = torch.arange(6.0).view(1, 6, 1, 1).expand(1, 6, 1, 4).contiguous()
    for backend in built(["dense", *SPARSE]):
        out = topk_attention(q, k, v, 2, causal=False, backend=backend)
        torch.testing.assert_close(out, torch.full_like(out, 0.5))  # mean of v rows 0 and 1


def test_fully_masked_rows_give_zeros_without_nan():
    q = torch.randn(1, 4, 2, 4, requires_grad=True, dtype=torch.float64)
    k = torch.randn(1, 4, 2, 4, requires_grad=True, dtype=torch.float64)
    v = torch.randn(1, 4, 2, 4, requires_grad=True, dtype=torch.float64)
    pad = torch.tensor([[0, 0, 1, 1]]).bool()
    for backend in built(["dense", *SPARSE]):
        out = topk_attention(q, k, v, 2, causal=True, key_padding_mask=pad, backend=backend)
        assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(not torch.isnan(g).any() for g in grads)
        assert torch.equal(grads[0][0, :2], torch.zeros_like(grads[0][0, :2]))


def test_k_at_least_n_valid_equals_dense_softmax_fp32():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 16, 4, 8, generator=gen) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    for backend in built(["dense", *SPARSE]):
        out = topk_attention(q, k, v, 16, causal=True, backend=backend, chunk_size=5 if backend == "chunked" else None)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", SPARSE)
def test_bf16_inputs_keep_dtype_and_match_fp32_selection(backend):
    need(backend)
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 12, 2, 8, generator=gen).bfloat16() for _ in range(3))
    out = topk_attention(q, k, v, 4, causal=True, backend=backend)
    ref = topk_attention(q.float(), k.float(), v.float(), 4, causal=True, backend="dense")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)


def test_backend_env_override(monkeypatch):
    q = torch.randn(1, 3, 1, 2)
    monkeypatch.setenv("TL_TOPK_BACKEND", "bogus")
    with pytest.raises(ValueError, match="TL_TOPK_BACKEND"):
        topk_attention(q, q, q, 1, causal=True)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(k_top=0), ValueError, "k_top"),
    (dict(k_top=2.5), ValueError, "k_top"),
    (dict(k_top=1.2), ValueError, "fraction"),
    (dict(k_top="3"), TypeError, "k_top"),
    (dict(backend="flash"), ValueError, "backend"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(window=0), ValueError, "window: got 0"),
    (dict(window=2.0), ValueError, "window: got 2.0"),
    (dict(window=3, causal=False), ValueError, "window: got 3 with causal=False"),
])
def test_bad_arguments(kwargs, exc, match):
    q = torch.randn(1, 3, 2, 4)
    args = dict(k_top=2, causal=True)
    args.update(kwargs)
    k_top = args.pop("k_top")
    with pytest.raises(exc, match=match):
        topk_attention(q, q, q, k_top, **args)


def test_dtype_device_and_shape_mismatches():
    q = torch.randn(1, 3, 4, 4)
    k = torch.randn(1, 3, 2, 4)
    with pytest.raises(TypeError, match="dtype"):
        topk_attention(q, k.double(), k, 2, causal=True)
    with pytest.raises(ValueError, match="do not divide"):
        topk_attention(q, torch.randn(1, 3, 3, 4), torch.randn(1, 3, 3, 4), 2, causal=True)
    with pytest.raises(ValueError, match="key_padding_mask"):
        topk_attention(q, k, k, 2, causal=True, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="device"):
        topk_attention(q, k.to("meta"), k, 2, causal=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_triton_without_cuda_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(RuntimeError, match="CUDA"):
        topk_attention(q, q, q, 2, causal=True, backend="triton")
