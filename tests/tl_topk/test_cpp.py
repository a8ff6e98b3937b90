"""The cpp backend's own paths: the streamed selection with its lower bound on long rows (orders that
make every key a candidate, rows full of ties, masked keys), the exact rule read from the output, no
saved state without a gradient, a deterministic backward, and the refusals. (Forward and gradients
against the dense oracle on random shapes: tests/tl_topk/test_backends.py, for every sparse backend.)"""

from __future__ import annotations

import pytest
import torch

from tl_topk import topk_attention
from tl_topk.ops import cpp_backend

pytestmark = pytest.mark.skipif(not cpp_backend.available(), reason=f"cpp backend: {cpp_backend.availability()}")


def selection_probe(k_keys: torch.Tensor, q: torch.Tensor, k_top, **kw):
    """Outputs with V = the identity: out[0, i, h, j] is the probability the row gives key j, so the
    kept set and its weights are read off exactly. Returns (cpp, dense)."""
    n_k = k_keys.shape[1]
    v = torch.eye(n_k, dtype=q.dtype).view(1, n_k, 1, n_k).expand(1, n_k, k_keys.shape[2], n_k).contiguous()
    return tuple(topk_attention(q, k_keys, v, k_top, backend=b, **kw) for b in ("cpp", "dense"))


def brute_force_kept(scores: torch.Tensor, k_top: int, valid: torch.Tensor) -> set:
    """Indices of the k largest valid scores of one row, ties to the smaller index (a plain sort)."""
    order = sorted((j for j in range(len(scores)) if valid[j]), key=lambda j: (-float(scores[j]), j))
    return set(order[:k_top])


@pytest.mark.parametrize("k_top", [1, 3, 8, 32])
@pytest.mark.parametrize("pattern", ["random", "increasing", "decreasing", "all-equal", "few-values"])
def test_long_rows_keep_exactly_the_rule_s_keys(pattern, k_top):
    """Rows of 300 keys (the lower-bound pass runs once a row has more than 4 k keys): increasing
    scores make every key beat the ones kept so far, equal scores tie everywhere."""
    n, d = 300, 4
    gen = torch.Generator().manual_seed(11)
    u = torch.zeros(d, dtype=torch.float64)
    u[0] = 1.0
    pos = torch.arange(n, dtype=torch.float64)
    keys = {
        "random": torch.randn(n, d, dtype=torch.float64, generator=gen),
        "increasing": pos[:, None] * u,
        "decreasing": (n - pos)[:, None] * u,
        "all-equal": torch.ones(n, d, dtype=torch.float64),
        "few-values": torch.randint(0, 3, (n, d), generator=gen).double(),
    }[pattern]
    q = torch.randn(1, n, 2, d, dtype=torch.float64, generator=gen)
    if pattern != "random":
        q = q.abs()  # positive q: the key order is the score order
    out, ref = selection_probe(keys.view(1, n, 1, d), q, k_top, causal=True, scale=1.0)
    torch.testing.assert_close(out, ref, atol=1e-13, rtol=0)
    scores = torch.einsum("qhd,kd->hqk", q[0], keys)
    for h in range(2):
        for i in (0, 5, 4 * k_top, 150, n - 1):
            kept = sorted(brute_force_kept(scores[h, i], k_top, torch.arange(n) <= i))
            expect = torch.zeros(n, dtype=torch.float64)
            expect[kept] = torch.softmax(scores[h, i, kept], -1)
            torch.testing.assert_close(out[0, i, h], expect, atol=1e-13, rtol=0)


def test_masked_keys_are_never_kept_in_long_rows():
    n = 200
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(1, n, 1, 8, dtype=torch.float64, generator=gen)
    k = torch.randn(1, n, 1, 8, dtype=torch.float64, generator=gen)
    pad = torch.rand(1, n, generator=gen) > 0.7  # 70 % of the keys masked
    out, ref = selection_probe(k, q, 16, causal=False, key_padding_mask=pad)
    torch.testing.assert_close(out, ref, atol=1e-13, rtol=0)
    assert torch.all(out[0, :, 0, ~pad[0]] == 0)


def test_no_gradient_saves_nothing_and_matches_the_gradient_run():
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 64, 4, 16, generator=gen) for _ in range(3))
    saved = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        plain = topk_attention(q, k[:, :, :2], v[:, :, :2], 8, causal=True, backend="cpp")
    assert saved == []
    qg = q.clone().requires_grad_(True)
    with_grad = topk_attention(qg, k[:, :, :2], v[:, :, :2], 8, causal=True, backend="cpp")
    assert torch.equal(plain, with_grad.detach())


def test_backward_is_deterministic_and_sums_shared_keys():
    """Many rows share a key (an attention sink): the per-thread dK/dV buffers are summed in a fixed
    order, so two runs are bitwise equal, and equal to dense within fp64 rounding."""
    gen = torch.Generator().manual_seed(14)
    q = torch.randn(2, 96, 6, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(2, 96, 3, 16, dtype=torch.float64, generator=gen)
    k[:, 0] *= 8  # key 0 scores high for many rows
    k.requires_grad_(True)
    v = torch.randn(2, 96, 3, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(2, 96, 6, 16, dtype=torch.float64, generator=gen)
    runs = [torch.autograd.grad((topk_attention(q, k, v, 5, causal=True, backend=b) * w).sum(), (q, k, v))
            for b in ("cpp", "cpp", "dense")]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for a, e in zip(runs[0], runs[2]):
        torch.testing.assert_close(a, e, atol=1e-11, rtol=1e-9)


def test_decode_step_and_window_against_dense():
    gen = torch.Generator().manual_seed(15)
    q = torch.randn(1, 3, 4, 8, generator=gen)  # 3 new queries against 70 cached keys
    k, v = (torch.randn(1, 70, 2, 8, generator=gen) for _ in range(2))
    for window in (None, 9):
        out = topk_attention(q, k, v, 6, causal=True, window=window, backend="cpp")
        ref = topk_attention(q, k, v, 6, causal=True, window=window, backend="dense")
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


def test_non_cpu_tensors_are_refused():
    q = torch.randn(1, 4, 1, 2)
    with pytest.raises(ValueError, match="backend='cpp' runs on CPU tensors, got device meta"):
        cpp_backend.cpp_topk_attention(q.to("meta"), q.to("meta"), q.to("meta"), torch.ones(1, 1, 4, dtype=torch.long),
                                       1, causal=True, key_padding_mask=None, scale=1.0, softcap=None)
