"""The SVD-basis bound of ``topk_product(balance=True)`` against independent dense oracles.

The bound works on rotated rows/columns while the scan multiplies the caller's own factors chunk by
chunk; these tests check the result is still the exact top-k of ``A @ B`` on factors built to defeat
a loose or wrong certificate: equal norms, many exact ties, low rank, one dominant direction, column
subsets, an excluded diagonal and budgets small enough to split every gather into pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tl_embedspace import cpp_scan
from tl_embedspace import factored_topk as ft
from tl_embedspace.factored_topk import materialized_topk, svd_transforms, topk_product

MODES = ("largest", "smallest", "abs")


@pytest.fixture(params=["torch", "cpp"])
def backend(request):
    """Each test runs on both scans; cpp is skipped (with the reason) where it does not build."""
    if request.param == "cpp" and not cpp_scan.available():
        pytest.skip(f"compiled scan: {cpp_scan.availability()}")
    return request.param


def dense_ranking(A, B, k, mode, rows=None, cols=None, exclude_diagonal=False):
    """(row, col, value) of the k best entries of the float64 dense product: value by mode desc,
    then row id, then column id ascending."""
    M = (A.double() @ B.double()).numpy()
    key = {"largest": M, "smallest": -M, "abs": np.abs(M)}[mode].copy()
    if rows is not None:
        key[np.setdiff1d(np.arange(M.shape[0]), rows), :] = -np.inf
    if cols is not None:
        key[:, np.setdiff1d(np.arange(M.shape[1]), cols)] = -np.inf
    if exclude_diagonal:
        d = np.arange(min(M.shape))
        key[d, d] = -np.inf
    i, j = np.unravel_index(np.arange(M.size), M.shape)
    order = np.lexsort((j, i, -key.flatten()))
    order = order[np.isfinite(key.flatten()[order])][:k]
    return [(int(i[o]), int(j[o]), float(M.flatten()[o])) for o in order]


def check_exact(A, B, k, mode, **kw):
    res = topk_product(A, B, k, mode=mode, balance=True, **kw)
    exp = dense_ranking(A, B, k, mode, kw.get("rows"), kw.get("cols"), kw.get("exclude_diagonal", False))
    assert list(zip(res.rows.tolist(), res.cols.tolist())) == [(i, j) for i, j, _ in exp]
    torch.testing.assert_close(res.values.double(), torch.tensor([v for *_, v in exp], dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    return res


def integer_factors(n, m, r, seed, lo=-2, hi=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(lo, hi, (n, r), generator=g).float(), torch.randint(lo, hi, (r, m), generator=g).float())


@pytest.mark.parametrize("mode", MODES)
def test_many_exact_ties_keep_the_smaller_ids(mode, backend):
    # small integers, rank 6 over 300 x 260: every top value is shared by many entries
    A, B = integer_factors(300, 260, 6, seed=1)
    res = check_exact(A, B, 60, mode, budget_bytes=40_000, backend=backend)
    assert len(set(res.values.tolist())) < 60  # ties really are there


@pytest.mark.parametrize("mode", MODES)
def test_equal_norms_and_one_dominant_direction(mode, backend):
    g = torch.Generator().manual_seed(2)
    A = torch.nn.functional.normalize(torch.randn(400, 12, generator=g) + 4 * torch.randn(1, 12, generator=g), dim=1)
    B = torch.nn.functional.normalize(torch.randn(12, 350, generator=g), dim=0)
    res = check_exact(A, B, 50, mode, budget_bytes=60_000, backend=backend)
    assert res.stats.fraction_computed < 1.0


@pytest.mark.parametrize("mode", MODES)
def test_low_rank_factors_fall_back_to_the_plain_bound(mode, backend):
    # rank 3 inside r = 8: no SVD maps (a Gram matrix is singular), still exact
    g = torch.Generator().manual_seed(3)
    A = torch.randn(250, 3, generator=g) @ torch.randn(3, 8, generator=g)
    B = torch.randn(8, 3, generator=g) @ torch.randn(3, 240, generator=g)
    assert svd_transforms(A, B, torch.arange(250), torch.arange(240), 2**20) is None
    check_exact(A, B, 40, mode, budget_bytes=30_000, backend=backend)


@pytest.mark.parametrize("mode", MODES)
def test_subsets_and_excluded_diagonal(mode, backend):
    A, B = integer_factors(320, 320, 7, seed=4, lo=-3, hi=4)
    rows = list(range(0, 320, 3))
    cols = list(range(5, 320, 2))
    check_exact(A, B, 45, mode, rows=rows, cols=cols, exclude_diagonal=True, budget_bytes=25_000, backend=backend)
    check_exact(A, B, 45, mode, exclude_diagonal=True, budget_bytes=10**7, backend=backend)


def test_agrees_with_materialized_topk_on_spread_float_factors(backend):
    g = torch.Generator().manual_seed(5)
    A = torch.randn(600, 16, generator=g) * torch.rand(600, 1, generator=g) ** 2
    B = torch.randn(16, 500, generator=g) * torch.rand(1, 500, generator=g) ** 2
    for mode in MODES:
        ref = materialized_topk(A, B, 30, mode)
        res = topk_product(A, B, 30, mode=mode, balance=True, budget_bytes=50_000, backend=backend)
        assert list(zip(res.rows.tolist(), res.cols.tolist())) == list(zip(ref.rows.tolist(), ref.cols.tolist()))
        torch.testing.assert_close(res.values, ref.values)


def test_rotation_allowance_covers_the_float32_rotation():
    """kappa bounds |fl(A_i . B_j) - a'_i . b'_j| / (|A_i| |B_j|) for the float32 rotated factors."""
    g = torch.Generator().manual_seed(6)
    A = torch.randn(500, 10, generator=g) * torch.logspace(0, 3, 10)  # ill-conditioned columns
    B = torch.randn(10, 400, generator=g)
    T = svd_transforms(A, B, torch.arange(500), torch.arange(400), 2**20)
    gap = ((A @ T.Ta).double() @ (T.Tb @ B).double() - (A @ B).double()).abs()
    scale = A.double().norm(dim=1)[:, None] * B.double().norm(dim=0)[None, :]
    assert float((gap / scale).max()) <= T.kappa


def test_columns_are_gathered_in_pieces_within_the_budget(monkeypatch):
    """A budget that fits a few columns at a time: the product chunks are assembled from pieces."""
    calls = []
    real = ft._product_chunk

    def spy(A, B, rid, cid, nc, m, gather_bytes):
        calls.append(cid.numel() > max(1, gather_bytes // (B.shape[0] * B.element_size())))
        return real(A, B, rid, cid, nc, m, gather_bytes)

    monkeypatch.setattr(ft, "_product_chunk", spy)
    A, B = integer_factors(200, 300, 8, seed=7)
    check_exact(A, B, 20, "largest", cols=list(range(1, 300)), budget_bytes=4_000, backend="torch")
    assert any(calls)


@pytest.mark.slow
def test_gemma_head_top100_matches_chunked_brute_force():
    """One real Gemma 3 head (vocabulary 262,144): on 4,096 source tokens against every output
    token, the top-100 equals a brute-force pass over that slab; on the whole vocabulary every
    returned entry is the fresh dot product and the whole rows that hold the winners agree."""
    import tl_plugins
    from tl_embedspace.space import EmbeddingSpace

    sp = EmbeddingSpace(tl_plugins.models.load("gemma3-270m"))
    ov = sp.ov(15, 3)  # a head whose bound prunes to 0.5 % of the entries: about a minute on 2 cores
    A, B = ov.A, ov.B
    rows = torch.randperm(A.shape[0], generator=torch.Generator().manual_seed(0))[:4096].sort().values
    res = topk_product(A, B, 100, rows=rows, balance=True)
    vals, keys = torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long)
    for s in range(0, rows.numel(), 256):
        rid = rows[s:s + 256]
        C = (A[rid] @ B).double()
        v, flat = torch.topk(C.flatten(), 100)
        keys = torch.cat([keys, rid[flat // B.shape[1]] * B.shape[1] + flat % B.shape[1]])
        vals, keys = ft.select_topk(torch.cat([vals, v]), keys, 100)
    assert res.rows.tolist() == (keys // B.shape[1]).tolist() and res.cols.tolist() == (keys % B.shape[1]).tolist()

    full = topk_product(A, B, 100, balance=True)
    torch.testing.assert_close(full.values, (A[full.rows] * B[:, full.cols].T).sum(-1))
    # brute force over the whole rows that hold the winners: the same 100 entries, in the same order
    winners = torch.unique(full.rows)
    C = (A[winners] @ B).double()
    v, flat = torch.topk(C.flatten(), 100)
    v, keys = ft.select_topk(v, winners[flat // B.shape[1]] * B.shape[1] + flat % B.shape[1], 100)
    assert full.rows.tolist() == (keys // B.shape[1]).tolist()
    assert full.cols.tolist() == (keys % B.shape[1]).tolist()
