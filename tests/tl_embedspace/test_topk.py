"""Exact streaming top-k against brute force on small products (integer factors make ties exact)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tl_embedspace import cpp_scan
from tl_embedspace.factored_topk import (
    balance_factors,
    diag_product,
    top1_diag_accuracy,
    topk_per_row,
    topk_product,
)


def brute(A, B, k, mode, rows=None, cols=None, exclude_diagonal=False):
    """Every entry of the dense product, ranked (value by mode desc, row asc, col asc)."""
    M = (A.double() @ B.double())
    ents = []
    for i in range(M.shape[0]):
        if rows is not None and i not in rows:
            continue
        for j in range(M.shape[1]):
            if cols is not None and j not in cols:
                continue
            if exclude_diagonal and i == j:
                continue
            v = float(M[i, j])
            key = v if mode == "largest" else (-v if mode == "smallest" else abs(v))
            ents.append((-key, i, j, v))
    ents.sort()
    return [(i, j, v) for _, i, j, v in ents[:k]]


@st.composite
def problems(draw):
    n = draw(st.integers(1, 14))
    m = draw(st.integers(1, 14))
    r = draw(st.integers(1, 5))
    lo, hi = -3, 3  # small integers: many exact ties, exact float arithmetic
    A = torch.tensor(draw(st.lists(st.lists(st.integers(lo, hi), min_size=r, max_size=r), min_size=n, max_size=n)),
                     dtype=torch.float32)
    B = torch.tensor(draw(st.lists(st.lists(st.integers(lo, hi), min_size=m, max_size=m), min_size=r, max_size=r)),
                     dtype=torch.float32)
    k = draw(st.integers(1, n * m + 5))  # sometimes more than the candidates
    mode = draw(st.sampled_from(["largest", "smallest", "abs"]))
    rows = draw(st.none() | st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    cols = draw(st.none() | st.lists(st.integers(0, m - 1), min_size=1, max_size=m, unique=True))
    excl = draw(st.booleans())
    budget = draw(st.sampled_from([8, 64, 300, 10**6]))  # from one row per chunk to everything at once
    return A, B, k, mode, rows, cols, excl, budget


def scan_backend(name):
    """The backend, skipped (with the reason) where the compiled scan does not build."""
    if name == "cpp" and not cpp_scan.available():
        pytest.skip(f"compiled scan: {cpp_scan.availability()}")
    return name


BACKENDS = ["torch", "cpp"]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems(), balance=st.booleans())
def test_topk_product_matches_brute_force(backend, p, balance):
    A, B, k, mode, rows, cols, excl, budget = p
    res = topk_product(A, B, k, mode=mode, rows=rows, cols=cols, exclude_diagonal=excl, budget_bytes=budget,
                       balance=balance, backend=scan_backend(backend))
    got = list(zip(res.rows.tolist(), res.cols.tolist(), res.values.tolist()))
    assert got == brute(A, B, k, mode, rows, cols, excl)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pruning_is_exact_on_float_factors_with_spread_norms(backend):
    backend = scan_backend(backend)
    g = torch.Generator().manual_seed(3)
    A = torch.randn(400, 16, generator=g) * torch.rand(400, 1, generator=g) ** 3
    B = torch.randn(16, 300, generator=g) * torch.rand(1, 300, generator=g) ** 3
    for mode in ("largest", "smallest", "abs"):
        res = topk_product(A, B, 25, mode=mode, budget_bytes=20_000, backend=backend)
        M = A @ B
        key = M.abs() if mode == "abs" else (-M if mode == "smallest" else M)
        ref = torch.topk(key.flatten(), 25)
        assert set(zip(res.rows.tolist(), res.cols.tolist())) == {(int(i) // 300, int(i) % 300) for i in ref.indices}
        torch.testing.assert_close(res.values, M[res.rows, res.cols])
        assert res.stats.fraction_computed < 1.0  # the bound did prune something
        bal = topk_product(A, B, 25, mode=mode, budget_bytes=20_000, balance=True, backend=backend)
        assert list(zip(bal.rows.tolist(), bal.cols.tolist())) == list(zip(res.rows.tolist(), res.cols.tolist()))


def test_balance_factors_keeps_the_product():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(60, 8, generator=g, dtype=torch.float64), torch.randn(8, 50, generator=g, dtype=torch.float64)
    a, b = balance_factors(A, B)
    torch.testing.assert_close(a @ b, A @ B)
    torch.testing.assert_close(a.norm(dim=0), b.norm(dim=1))  # balanced: equal column/row norms


@pytest.mark.parametrize("mode", ["largest", "smallest", "abs"])
def test_topk_per_row_matches_dense(mode):
    g = torch.Generator().manual_seed(1)
    A, B = torch.randint(-4, 5, (30, 4), generator=g).float(), torch.randint(-4, 5, (4, 25), generator=g).float()
    # column ids that differ from their positions in the filtered factor, so that a result reported
    # by position instead of id (or a diagonal masked by position) cannot pass
    cols = [0, 3, 7] + list(range(10, 25))
    rows = [0, 3, 7]
    M = A @ B  # integer entries: exact
    v, c = topk_per_row(A, B, 6, mode=mode, rows=rows, cols=cols, exclude_diagonal=True, budget_bytes=200)
    assert v.shape == c.shape == (3, 6)
    for r, i in enumerate(rows):
        # the values are the dense entries at the returned ids ...
        assert torch.equal(v[r], M[i, c[r]])
        assert all(int(j) in cols and int(j) != i for j in c[r])
        # ... and the ids are the brute-force ranking: value by mode desc, ties to the smaller column
        exp = brute(A, B, 6, mode, rows=[i], cols=cols, exclude_diagonal=True)
        assert c[r].tolist() == [e[1] for e in exp]


@pytest.mark.parametrize("mode, pad", [("largest", float("-inf")), ("smallest", float("inf")),
                                       ("abs", float("-inf"))])
def test_topk_per_row_pads_past_the_candidates_without_leaking_the_diagonal(mode, pad):
    """k = every column with the diagonal excluded: each row has one candidate fewer than k; the
    last entry is padding (-inf, +inf for smallest), never the excluded entry's real value."""
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(4, 3, generator=g), torch.randn(3, 4, generator=g)
    v, c = topk_per_row(A, B, 4, mode=mode, exclude_diagonal=True)
    M = A @ B
    assert torch.equal(v[:, -1], torch.full((4,), pad))
    for i in range(4):
        assert torch.equal(v[i, :3], M[i, c[i, :3]]) and i not in c[i, :3].tolist()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_topk_per_row_matches_brute_force(p):
    A, B, k, mode, rows, cols, excl, budget = p
    v, c = topk_per_row(A, B, k, mode=mode, rows=rows, cols=cols, exclude_diagonal=excl, budget_bytes=budget)
    M = A @ B
    row_list = sorted(set(rows)) if rows is not None else list(range(A.shape[0]))
    assert c.shape[0] == len(row_list)
    for r, i in enumerate(row_list):
        exp = brute(A, B, k, mode, rows=[i], cols=cols, exclude_diagonal=excl)
        n = len(exp)  # an excluded diagonal may leave fewer candidates than returned columns
        assert c[r, :n].tolist() == [e[1] for e in exp]
        assert torch.equal(v[r, :n], M[i, c[r, :n]])


def test_top1_diag_accuracy_matches_dense():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(80, 6, generator=g)
    B = A.T.clone() + 0.3 * torch.randn(6, 80, generator=g)
    M = A @ B
    expected = (M.argmax(dim=1) == torch.arange(80)).float().mean().item()
    acc, _ = top1_diag_accuracy(A, B, budget_bytes=2000)
    assert acc == pytest.approx(expected)
    torch.testing.assert_close(diag_product(A, B), M.diag())
    sub = [1, 5, 9, 30, 70]
    acc_sub, _ = top1_diag_accuracy(A, B, rows=sub)
    Ms = M[sub][:, sub]
    assert acc_sub == pytest.approx((Ms.argmax(1) == torch.arange(5)).float().mean().item())


def test_bad_input_is_refused():
    A, B = torch.randn(5, 2), torch.randn(2, 4)
    with pytest.raises(ValueError, match="k: got 0"):
        topk_product(A, B, 0)
    with pytest.raises(ValueError, match="mode: got 'biggest'"):
        topk_product(A, B, 3, mode="biggest")
    with pytest.raises(IndexError, match="rows: id 9 out of range"):
        topk_product(A, B, 3, rows=[9])
    with pytest.raises(ValueError, match="inner dimensions"):
        topk_product(A, torch.randn(3, 4), 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        topk_product(torch.full((5, 2), float("nan")), B, 3)
    with pytest.raises(ValueError, match="selects no ids"):
        topk_product(A, B, 3, cols=[])
    for f in (topk_product, topk_per_row):
        with pytest.raises(ValueError, match="budget_bytes: got 0; accepted: a positive number of bytes"):
            f(A, B, 3, budget_bytes=0)
        with pytest.raises(IndexError, match="cols: id 4 out of range"):
            f(A, B, 3, cols=[4])
