"""The Triton backend against the dense oracle, in Triton's CPU interpreter (tiny shapes, n <= 64).

``TRITON_INTERPRET=1`` must be set before the kernel module is imported; the kernels are imported
lazily, so setting it here (module import) is early enough. On a CUDA machine the same tests run
on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from tl_topk.ops import triton_backend

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytestmark = pytest.mark.skipif(not triton_backend.installed(), reason="the triton package is not installed")

from tl_topk import topk_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _case(b, n_q, n_k, h, h_kv, seed, d=16):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE).requires_grad_(True)  # noqa: E731
    return mk(b, n_q, h, d), mk(b, n_k, h_kv, d), mk(b, n_k, h_kv, d)


@pytest.mark.parametrize("b, n_q, n_k, h, h_kv, k_top, causal, padding", [
    (1, 20, 20, 2, 1, 3, True, None),          # GQA, n not a multiple of the tile
    (1, 7, 20, 4, 2, 5, True, "left"),         # decode-like offset, left padding, fully masked rows
    (1, 17, 17, 2, 2, 17, False, "right"),     # k = n: dense
    (1, 24, 24, 2, 1, 1, True, None),          # k = 1: hard attention
    (1, 16, 16, 2, 2, 0.3, True, None),        # fraction of valid keys
    # several query and key tiles (16 x 16 in the interpreter): the running top-k merges across tiles
    (1, 64, 64, 3, 1, 5, True, "left"),        # 4 x 4 tiles, causal tile skipping, GQA 3:1
    (1, 40, 40, 2, 2, 20, False, "right"),     # k = 20 -> 32-wide key tiles, non-causal
    (1, 9, 61, 2, 1, 7, True, None),           # decode-like offset over 4 key tiles
])
def test_triton_equals_dense_forward_and_backward(b, n_q, n_k, h, h_kv, k_top, causal, padding):
    q, k, v = _case(b, n_q, n_k, h, h_kv, seed=n_q + n_k)
    pad = None
    if padding:
        pad = torch.ones(b, n_k, dtype=torch.bool, device=DEVICE)
        if padding == "left":
            pad[0, :15] = False
        else:
            pad[-1, -5:] = False
    ref = topk_attention(q, k, v, k_top, causal=causal, key_padding_mask=pad, backend="dense")
    out = topk_attention(q, k, v, k_top, causal=causal, key_padding_mask=pad, backend="triton")
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    w = torch.randn_like(ref)
    for a, e in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, e, atol=5e-6, rtol=1e-5)


@pytest.mark.parametrize("causal, padding", [(True, "left"), (False, None)])
def test_triton_softcap_equals_dense_forward_and_backward(causal, padding):
    """Soft-capped scores (c tanh(s / c)) select and weigh as in dense; the backward carries the
    cap's slope 1 - tanh^2. A small cap (1.5) makes the slope matter."""
    q, k, v = _case(1, 24, 24, 2, 1, seed=7)
    pad = None
    if padding:
        pad = torch.ones(1, 24, dtype=torch.bool, device=DEVICE)
        pad[0, :6] = False
    ref = topk_attention(q, k, v, 4, causal=causal, key_padding_mask=pad, softcap=1.5, backend="dense")
    out = topk_attention(q, k, v, 4, causal=causal, key_padding_mask=pad, softcap=1.5, backend="triton")
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    w = torch.randn_like(ref)
    for a, e in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, e, atol=5e-6, rtol=1e-5)


def test_triton_ties_go_to_smaller_index():
    q = torch.randn(1, 16, 2, 16, device=DEVICE)
    k = torch.ones(1, 16, 1, 16, device=DEVICE)
    v = torch.arange(16.0, device=DEVICE).view(1, 16, 1, 1).expand(1, 16, 1, 16).contiguous()
    out = topk_attention(q, k, v, 3, causal=False, backend="triton")
    torch.testing.assert_close(out, torch.full_like(out, 1.0))  # mean of v rows 0, 1, 2


def test_triton_refuses_unsupported_calls():
    q, k, v = _case(1, 8, 8, 2, 2, seed=0)
    with pytest.raises(ValueError, match="exceeds"):
        big = torch.randn(1, 200, 1, 16, device=DEVICE)
        topk_attention(big, big, big, 150, causal=True, backend="triton")
