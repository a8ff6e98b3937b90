"""The compiled two-level scan (``topk_product(backend="cpp")``) against dense oracles, the torch scan,
and the choices ``backend="auto"`` makes.

The oracle is the float64 dense product ranked by (value by mode desc, row id asc, column id asc);
the shared brute-force and bound tests (test_topk.py, test_topk_bounds.py) also run on both scans.
"""

from __future__ import annotations

import pytest
import torch

from tl_embedspace import cpp_scan
from tl_embedspace import factored_topk as ft
from tl_embedspace.factored_topk import topk_product

pytestmark = pytest.mark.skipif(not cpp_scan.available(), reason=f"compiled scan: {cpp_scan.availability()}")

MODES = ("largest", "smallest", "abs")


def dense(A, B, k, mode, exclude_diagonal=False):
    M = A.double() @ B.double()
    key = {"largest": M, "smallest": -M, "abs": M.abs()}[mode].clone()
    if exclude_diagonal:
        d = torch.arange(min(M.shape))
        key[d, d] = -torch.inf
    flat = key.flatten()
    order = sorted(range(flat.numel()), key=lambda x: (-float(flat[x]), x))[:k]
    return [(x // M.shape[1], x % M.shape[1]) for x in order], M


def copying(n, r, seed, noise=0.5):
    """A copying-head-like product: B ~ A^T, so the diagonal stands far above the bulk."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, r, generator=g) * torch.logspace(0, -1, r)
    B = A.T.contiguous() + noise * torch.randn(r, n, generator=g) * torch.logspace(0, -1, r)[:, None]
    return A, B


@pytest.mark.parametrize("mode", MODES)
def test_exact_on_a_product_the_bound_prunes(mode):
    A, B = copying(1500, 48, seed=0)
    res = topk_product(A, B, 40, mode=mode, balance=True, backend="cpp")
    exp, M = dense(A, B, 40, mode)
    assert list(zip(res.rows.tolist(), res.cols.tolist())) == exp
    torch.testing.assert_close(res.values.double(), M[res.rows, res.cols], rtol=1e-6, atol=1e-6)
    s = res.stats
    assert s.scan == "cpp" and s.head_coordinates == (16, 48)
    # the first bound prunes most of what the centred bound lists, the second most of the rest
    assert s.entries_refined < s.entries_bounded / 4
    assert s.fraction_computed < 0.2


def test_column_major_and_row_major_B_and_float64_agree():
    A, B = copying(900, 24, seed=1)
    ref = topk_product(A, B, 30, balance=True, backend="torch")
    for BB in (B.contiguous(), B.T.contiguous().T):
        got = topk_product(A, BB, 30, balance=True, backend="cpp")
        assert (got.rows.tolist(), got.cols.tolist()) == (ref.rows.tolist(), ref.cols.tolist())
    got64 = topk_product(A.double(), B.double(), 30, balance=True, backend="cpp")
    assert (got64.rows.tolist(), got64.cols.tolist()) == (ref.rows.tolist(), ref.cols.tolist())
    assert got64.values.dtype == torch.float64


def test_many_candidates_past_k_and_filters_with_the_diagonal_excluded():
    A, B = copying(700, 16, seed=2, noise=2.0)
    rows, cols = torch.arange(3, 700, 2), torch.arange(0, 650)
    for k in (1, 7, 500):
        got = topk_product(A, B, k, rows=rows, cols=cols, exclude_diagonal=True, balance=True, backend="cpp")
        ref = topk_product(A, B, k, rows=rows, cols=cols, exclude_diagonal=True, balance=True, backend="torch")
        assert (got.rows.tolist(), got.cols.tolist()) == (ref.rows.tolist(), ref.cols.tolist())
        assert all(i != j for i, j in zip(got.rows.tolist(), got.cols.tolist()))


def test_permute_rows_in_place_matches_indexing():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, 7, generator=g)
    perm = torch.randperm(990, generator=g)
    expect = torch.cat([x[perm], x[990:]])
    cpp_scan.permute_rows(x, perm)
    assert torch.equal(x, expect)


def test_auto_runs_cpp_where_the_bound_prunes_and_torch_where_it_cannot():
    A, B = copying(3000, 64, seed=4)
    cpp_ns, torch_ns, frac = ft.predicted_costs(*_prepared(A, B, 20))
    assert cpp_ns < torch_ns / 1.5 and frac["centred"] < 0.05
    assert topk_product(A, B, 20, balance=True).stats.scan == "cpp"
    # independent Gaussian factors: the top entries sit inside the bulk, every bound keeps nearly all
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(3000, 64, generator=g), torch.randn(64, 3000, generator=g)
    cpp_ns, torch_ns, frac = ft.predicted_costs(*_prepared(A, B, 20))
    assert cpp_ns > 2 * torch_ns and frac["first"] > 0.5
    res = topk_product(A, B, 20, balance=True)
    assert res.stats.scan == "torch"
    exp, _ = dense(A, B, 20, "largest")
    assert list(zip(res.rows.tolist(), res.cols.tolist())) == exp


def _prepared(A, B, k):
    ids_r, ids_c = torch.arange(A.shape[0]), torch.arange(B.shape[1])
    T = ft.svd_transforms(A, B, ids_r, ids_c, ft.DEFAULT_BUDGET_BYTES)
    h1, H = ft.head_coordinates_for(A.shape[0], B.shape[1], A.shape[1], 4, ft.DEFAULT_BUDGET_BYTES)
    st = ft._two_level_bound(A, B, ids_r, ids_c, T, "largest", h1, H, ft.DEFAULT_BUDGET_BYTES, cpp_scan.row_multiple())
    seed, _ = ft._seed_from_corner(A, B, k, "largest", st, ids_c, False, ft.DEFAULT_BUDGET_BYTES)
    return st, h1, "largest", seed, A.shape[1]


def test_a_failed_build_warns_once_under_auto_and_refuses_backend_cpp(monkeypatch):
    monkeypatch.setattr(cpp_scan.EXTENSION, "module", None)
    monkeypatch.setattr(cpp_scan.EXTENSION, "failure", "no compiler (simulated)")
    monkeypatch.setattr(cpp_scan.EXTENSION, "warned", False)
    A, B = copying(400, 8, seed=6)
    with pytest.warns(RuntimeWarning, match=r"no compiler \(simulated\).*scans in torch"):
        res = topk_product(A, B, 10, balance=True)
    assert res.stats.scan == "torch"
    exp, _ = dense(A, B, 10, "largest")
    assert list(zip(res.rows.tolist(), res.cols.tolist())) == exp
    with pytest.raises(RuntimeError, match=r"backend='cpp'.*no compiler \(simulated\).*backend='torch'"):
        topk_product(A, B, 10, backend="cpp")


def test_bad_backend_arguments_are_refused():
    A, B = torch.randn(6, 3), torch.randn(3, 5)
    with pytest.raises(ValueError, match="backend: got 'gpu'; accepted: one of auto, cpp, torch"):
        topk_product(A, B, 2, backend="gpu")
    with pytest.raises(ValueError, match="backend='cpp' takes CPU float32/float64.*torch.bfloat16"):
        topk_product(A.bfloat16(), B.bfloat16(), 2, backend="cpp")
    with pytest.raises(ValueError, match="backend='cpp' always prunes"):
        topk_product(A, B, 2, backend="cpp", prune=False)
    # auto takes the torch scan for what the kernel does not take, with the same answer
    got = topk_product(A.bfloat16(), B.bfloat16(), 2)
    assert got.stats.scan == "torch"
