"""Exact streaming top-k over a matrix product ``A @ B`` that is never materialised.

A vocab x vocab matrix of a transformer (an OV or QK circuit in embedding space) is a product of
two thin factors, ``A [n, r]`` and ``B [r, m]`` with ``r`` (d_head or d_model) much smaller than
``n`` and ``m`` (the vocabulary). The functions here find the exact top-k entries, row maxima or
per-row top-k of such a product while holding only a chunk of rows at a time:

* rows are visited in order of decreasing (centred) norm, chunk by chunk;
* a running k-th best value (``threshold``) is kept; by Cauchy-Schwarz an entry satisfies
  ``a_i . b_j <= |a_i - c| |b_j| + c . b_j`` (c the mean row), so once the first remaining row's
  bound falls below the threshold for every column the scan stops, and inside a chunk only the
  columns whose bound reaches the threshold are multiplied;
* with ``balance`` the bound is taken in the balanced SVD basis of the product (``A Ta = U S^1/2``,
  ``Tb B = S^1/2 V^T``; r x r work), where it is far tighter, while the entries ranked are still
  computed from the caller's own factors; the rotation's rounding is part of the allowance;
* rows and columns are gathered from the factors per chunk (filters included), so the working
  memory is the chunk budget plus a few floats per row and column, never a copy of a factor; a
  filtered top-k is exact (thresholding first and filtering afterwards is not).

Ties are broken deterministically: by value, then row id, then column id (ascending). The bound is
inflated by a rounding allowance so that float rounding in the chunk products cannot make the
pruning skip an entry that a dense product would have ranked.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch

from tl_plugins.checks import is_int
from tl_plugins.ranking import top_k, top_k_keyed

DEFAULT_BUDGET_BYTES = 256 * 2**20
MODES = ("largest", "smallest", "abs")
MIN_CHUNK_ROWS = 512

IndexLike = Union[None, torch.Tensor, Sequence[int]]


@dataclass
class TopkStats:
    """What the streaming scan did: how much of the product it actually computed."""

    rows_total: int = 0
    cols_total: int = 0
    rows_visited: int = 0
    entries_computed: int = 0
    chunks: int = 0
    chunk_rows: int = 0
    entries_bounded: int = 0  # cpp: entries bounded from their first h1 SVD coordinates
    entries_refined: int = 0  # cpp: of those, entries bounded again from H coordinates
    head_coordinates: tuple = (0, 0)  # cpp: (h1, H)
    scan: str = "torch"  # which scan ran: "cpp" or "torch"

    @property
    def fraction_computed(self) -> float:
        total = self.rows_total * self.cols_total
        return self.entries_computed / total if total else 0.0


@dataclass
class TopkPairsRaw:
    """Top-k entries of ``A @ B``: ``values [k]`` (signed), ``rows [k]`` and ``cols [k]`` (ids)."""

    values: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    stats: TopkStats = field(default_factory=TopkStats)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}; accepted: one of {', '.join(MODES)}")


def _by_mode(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The ranking key of values ``x`` in ``mode``: x (largest), -x (smallest) or |x| (abs); also the
    bound on that key from a bound on x's offset term."""
    return x if mode == "largest" else (-x if mode == "smallest" else x.abs())


def check_k(k) -> int:
    if not is_int(k) or k <= 0:
        raise ValueError(f"k: got {k!r}; accepted: a positive int")
    return int(k)


def _check_factors(A: torch.Tensor, B: torch.Tensor) -> None:
    if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor) or A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"A, B: need 2-d tensors A [n, r], B [r, m]; got {getattr(A, 'shape', A)} and "
                         f"{getattr(B, 'shape', B)}")
    if A.shape[1] != B.shape[0]:
        raise ValueError(f"A, B: inner dimensions differ: A {tuple(A.shape)}, B {tuple(B.shape)}")


def _check_finite(*norms: torch.Tensor) -> None:
    # a NaN or inf anywhere in a factor shows up in its row/column norms, which are needed anyway
    if not all(bool(torch.isfinite(x).all()) for x in norms):
        raise ValueError("A, B: factors contain NaN or inf")


def as_index(ids: IndexLike, size: int, name: str) -> torch.Tensor | None:
    """Normalise a row/column filter (ids or a bool mask) to sorted unique int64 ids, or None."""
    if ids is None:
        return None
    t = torch.as_tensor(ids)
    if t.numel() == 0:
        raise ValueError(f"{name}: the filter selects no ids")
    if t.dtype == torch.bool:
        if t.shape != (size,):
            raise ValueError(f"{name}: a bool mask must have shape ({size},); got {tuple(t.shape)}")
        t = t.nonzero().flatten()
    else:
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise ValueError(f"{name}: ids must be integers; got dtype {t.dtype}")
        t = t.flatten().long()
        if t.numel() and (t.min() < 0 or t.max() >= size):
            bad = t[(t < 0) | (t >= size)][0].item()
            raise IndexError(f"{name}: id {bad} out of range; accepted: ids in [0, {size - 1}]")
        t = torch.unique(t)
    if t.numel() == 0:
        raise ValueError(f"{name}: the filter selects no ids")
    return t


def rounding_slack(r: int, dtype: torch.dtype) -> float:
    """Relative allowance for float rounding of an r-term dot product and of the norms."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return 1.0 + 2.0 * (r + 4) * eps


def chunk_rows_for(m: int, itemsize: int, budget_bytes: int) -> int:
    """Rows per chunk so that a chunk, its mask and index scratch stay inside ``budget_bytes``."""
    per_row = max(1, m) * (itemsize + 1 + itemsize)  # product chunk, bool mask, abs/compare scratch
    return max(1, int(budget_bytes // per_row))


def select_topk(vals: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (value desc, key asc) of a candidate set, sorted in that order
    (:func:`tl_plugins.ranking.top_k_keyed`)."""
    return top_k_keyed(vals, keys, k)


def balance_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Refactor ``A @ B`` as ``(U S^1/2) (S^1/2 V^T)``, the balanced thin SVD of the product.

    The product is unchanged (up to rounding) but the factors are balanced, which makes the
    Cauchy-Schwarz bound ``|a_i| |b_j|`` far tighter for real weights (ten times fewer entries
    computed on SmolLM2 OV circuits). Works from the r x r Gram matrices in float64 (no QR of the
    tall factors): ``A = Qa Ra`` with ``Ra = Ea^1/2 Va^T`` from ``A^T A = Va Ea Va^T``, likewise for B,
    then the SVD of ``Ra Rb^T``. Directions with zero norm are dropped (the rank may shrink).
    """
    with _small_ops():
        Ad, Bd = A.double(), B.double()
        Ea, Va = torch.linalg.eigh(Ad.T @ Ad)
        Eb, Vb = torch.linalg.eigh(Bd @ Bd.T)
        keep_a = Ea > Ea.max().clamp_min(0) * 1e-12
        keep_b = Eb > Eb.max().clamp_min(0) * 1e-12
        Ea, Va, Eb, Vb = Ea[keep_a], Va[:, keep_a], Eb[keep_b], Vb[:, keep_b]
        if Ea.numel() == 0 or Eb.numel() == 0:
            return A, B
        Ra = Ea.sqrt()[:, None] * Va.T  # [ra, r]
        Rb = Eb.sqrt()[:, None] * Vb.T  # [rb, r]
        U, S, Vh = torch.linalg.svd(Ra @ Rb.T, full_matrices=False)
        root = S.sqrt()
        Ta = (Va / Ea.sqrt()) @ U * root  # A' = A @ Ta
        Tb = (root[:, None] * Vh) @ (Vb / Eb.sqrt()).T  # B' = Tb @ B
    return (Ad @ Ta).to(A.dtype), (Tb @ Bd).to(B.dtype).contiguous()


class _small_ops:
    """Run r x r linear algebra on one thread: on a busy machine a 64 x 64 eigh or SVD spends far
    longer in thread barriers than in arithmetic."""

    def __enter__(self):
        self._n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self._n)


def check_flag(value, arg: str) -> bool:
    """``value`` if it is a bool, else a TypeError naming ``arg`` ("yes", 1, None are not flags)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{arg}: got {value!r}; accepted: True or False")
    return bool(value)


def _prepare(A, B, k, mode, rows, cols, budget_bytes, exclude_diagonal=False):
    """Validate the arguments shared by the top-k scans; return the factors sliced to the selected
    rows/columns and the selected ids ``(A[rows], B[:, cols], row_ids, col_ids)`` (all ids if None)."""
    row_ids, col_ids = _prepare_ids(A, B, k, mode, rows, cols, budget_bytes, exclude_diagonal)
    return A[row_ids.to(A.device)], B[:, col_ids.to(B.device)], row_ids, col_ids


def topk_product(
    A: torch.Tensor,
    B: torch.Tensor,
    k: int,
    *,
    mode: str = "largest",
    rows: IndexLike = None,
    cols: IndexLike = None,
    exclude_diagonal: bool = False,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    prune: bool = True,
    balance: bool = False,
    backend: str = "auto",
) -> TopkPairsRaw:
    """Exact top-k entries of ``A @ B`` (``A [n, r]``, ``B [r, m]``) without forming the product.

    ``mode``: "largest" (greatest values), "smallest" (most negative) or "abs" (greatest
    magnitude; returned values keep their sign). ``rows``/``cols``: ids (or bool masks) that
    restrict the candidates. ``exclude_diagonal`` drops entries with row id == column id.
    ``budget_bytes`` bounds the working memory: a chunk of the product and the factor rows and
    columns gathered for it (the factors themselves are never copied whole). ``balance`` takes the
    pruning bound in the balanced SVD basis of the product (:func:`svd_transforms`; much tighter for
    real weights); the entries ranked and reported are always those of ``A @ B``. When fewer than
    ``k`` entries are candidates, all of them are returned. Returns values/rows/cols sorted best
    first, ties by (row id, column id) ascending.

    ``backend``: "cpp" (the compiled two-level scan, :mod:`tl_embedspace.cpp_scan`: CPU float32/float64
    factors; each entry bounded from its first coordinates in the SVD basis before any is computed),
    "torch" (the row scan below, any device and dtype) or "auto" (cpp where it applies and builds, with
    one warning when it cannot be built, unless a sample of rows predicts that the bound prunes too
    little for it to beat chunk products, see :func:`predicted_costs`; torch otherwise, and always when
    ``prune=False``). Both return the same entries; cpp ranks dot products accumulated in float64,
    torch the chunk products in the factors' dtype. ``stats.scan`` says which one ran.
    """
    row_ids, col_ids = _prepare_ids(A, B, k, mode, rows, cols, budget_bytes, exclude_diagonal)
    use_cpp = _use_cpp(backend, A, B, prune)
    T = None
    if balance and min(row_ids.numel(), col_ids.numel()) > A.shape[1]:
        T = svd_transforms(A, B, row_ids, col_ids, budget_bytes)  # None: rank-deficient, plain bound
    if use_cpp:
        res = _topk_cpp(A, B, k, mode, row_ids, col_ids, exclude_diagonal, budget_bytes, T, backend == "auto")
        if res is not None:
            return res
    bound = _norm_bound(A, B, row_ids, col_ids, T, mode, prune, budget_bytes)
    vals, keys, stats = _topk_norm_scan(A, B, k, mode, col_ids, exclude_diagonal, budget_bytes, prune, bound)
    return _finish(vals, keys, stats, A, B, B.shape[1], mode)


BACKENDS = ("auto", "cpp", "torch")
FIRST_COORDINATES = 16  # cpp: SVD coordinates of the first bound, for every listed entry (in registers)
HEAD_COORDINATES = 64  # cpp: coordinates stored for the second bound, for the entries that pass the first


def _use_cpp(backend, A, B, prune) -> bool:
    """Whether this call runs the compiled scan; ValueError/RuntimeError for a backend that cannot."""
    from tl_embedspace import cpp_scan

    if backend not in BACKENDS:
        raise ValueError(f"backend: got {backend!r}; accepted: one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    if backend == "cpp":
        if not cpp_scan.supports(A, B):
            raise ValueError(f"backend='cpp' takes CPU float32/float64 factors of one dtype; got {A.dtype} on "
                             f"{A.device} and {B.dtype} on {B.device}; use backend='torch'")
        if not prune:
            raise ValueError("backend='cpp' always prunes; prune=False needs backend='torch'")
        cpp_scan.load()  # RuntimeError naming why it cannot be built
        return True
    return prune and cpp_scan.supports(A, B) and cpp_scan.available_for_auto()


def _prepare_ids(A, B, k, mode, rows, cols, budget_bytes, exclude_diagonal):
    """Validate the top-k arguments; the selected row and column ids (all ids where None)."""
    check_flag(exclude_diagonal, "exclude_diagonal")
    check_mode(mode)
    check_k(k)
    _check_factors(A, B)
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes: got {budget_bytes!r}; accepted: a positive number of bytes")
    n, m = A.shape[0], B.shape[1]
    row_ids = as_index(rows, n, "rows")
    col_ids = as_index(cols, m, "cols")
    row_ids = torch.arange(n) if row_ids is None else row_ids
    col_ids = torch.arange(m) if col_ids is None else col_ids
    return row_ids, col_ids


def _finish(best_vals, best_keys, stats, A, B, m, mode):
    """Ids and reported values of the ranked keys: signed entries of the caller's ``A @ B``."""
    rows_out = best_keys // m
    cols_out = best_keys % m
    values = best_vals.to(A.dtype)
    if mode == "smallest":
        values = -values
    elif mode == "abs" and values.numel():
        # recover signs from a fresh dot product of the chosen entries (magnitude kept as ranked)
        signed = (A[rows_out.to(A.device)] * B[:, cols_out.to(B.device)].T).sum(-1)
        values = torch.where(signed < 0, -values.to(signed.device), values.to(signed.device))
    return TopkPairsRaw(values.cpu(), rows_out, cols_out, stats)


def _topk_norm_scan(A, B, k, mode, col_ids, exclude_diagonal, budget_bytes, prune, st: "_NormBound"):
    """The row scan: rows by decreasing bound radius, each chunk multiplying only the columns whose
    bound reaches the running k-th value (module docstring). Rows and columns are gathered from the
    caller's factors chunk by chunk. Returns ``(values, keys, stats)``, keys ``row_id * m + col_id``."""
    nr, nc, m = st.row_ids.numel(), col_ids.numel(), B.shape[1]
    stats = TopkStats(rows_total=nr, cols_total=nc)
    n_candidates = nr * nc - (int(torch.isin(st.row_ids, col_ids).sum()) if exclude_diagonal else 0)
    # a third of the budget for the product chunk (with its mask and scratch), a quarter for the
    # gathered columns; the rest for the rows a chunk keeps while it is scanned
    chunk = chunk_rows_for(nc, A.element_size(), budget_bytes // 3)
    stats.chunk_rows = chunk
    best_vals, best_keys = torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long)
    threshold, i, first = -math.inf, 0, True
    while i < nr:
        if prune and threshold > -math.inf:
            span = _pruned_span(st, i, nr, threshold, chunk * nc)
            if span is None:
                break  # rows are sorted by rho: no remaining row can reach the threshold
            stop, sel = span
            cid = col_ids[sel]
        else:
            # a small first chunk seeds the threshold cheaply from the rows of largest radius
            stop = min(nr, i + (min(chunk, max(64, -(-2 * k // max(1, nc)))) if first else chunk))
            cid = col_ids
        rid = st.row_ids[i:stop]
        C = _product_chunk(A, B, rid, cid, nc, m, budget_bytes // 4)
        stats.chunks, stats.entries_computed, stats.rows_visited = stats.chunks + 1, stats.entries_computed + C.numel(), stop
        if mode == "smallest":
            C.neg_()
        _mode_and_diagonal(C, mode, exclude_diagonal, rid.to(C.device), cid.to(C.device))
        if first and n_candidates > k:
            threshold = _seed_threshold(C, k)
            first = False
        best_vals, best_keys = _scan_chunk(C, threshold, rid.to(C.device), cid.to(C.device), m, best_vals,
                                           best_keys, k, budget_bytes)
        if best_vals.numel() >= k:
            threshold = max(threshold, float(best_vals[k - 1]))
        del C
        i = stop
    return best_vals, best_keys, stats


def _product_chunk(A, B, rid, cid, nc, m, gather_bytes) -> torch.Tensor:
    """``A[rid] @ B[:, cid]``, gathering the columns in pieces of at most ``gather_bytes`` (a view of
    B when every column of B is wanted)."""
    Ar = A.index_select(0, rid.to(A.device))
    if cid.numel() == m and nc == m:
        return Ar @ B
    piece = max(1, gather_bytes // (B.shape[0] * B.element_size()))
    if cid.numel() <= piece:
        return Ar @ _gather(B, cid, True).T
    C = torch.empty(Ar.shape[0], cid.numel(), dtype=torch.result_type(Ar, B), device=A.device)
    for s in range(0, cid.numel(), piece):
        C[:, s:s + piece] = Ar @ _gather(B, cid[s:s + piece], True).T
    return C


@dataclass
class _NormBound:
    """entry(i, j) <= rho[i] * slope[j] + intercept[j] for the rows ``row_ids`` (sorted by rho, down)."""

    row_ids: torch.Tensor
    rho: torch.Tensor
    rho_neg: list
    slope: torch.Tensor
    intercept: torch.Tensor


def _norm_bound(A, B, row_ids, col_ids, T, mode, prune, budget_bytes) -> _NormBound:
    """The centred Cauchy-Schwarz bound, in the SVD basis when ``T`` is given.

    Rows a = A_i Ta and columns b = Tb B_j (or A_i, B_j), centred on the mean row c:
    a.b = (a - c).b + c.b <= |a - c| |b| + c.b. With c the mean this removes a component shared by
    all rows, which otherwise makes the plain bound |a| |b| useless (an OV circuit whose entries are
    mostly large and negative). The float rounding of the chunk products and of the rotation,
    ``kappa |A_i| |B_j|``, is added to the intercept. Norms and offsets in float64."""
    Ta, Tb = (T.Ta, T.Tb.T) if T is not None else (None, None)
    kappa = T.kappa if T is not None else rounding_slack(A.shape[1], A.dtype) - 1.0
    c = _mean_row(A, row_ids, Ta, budget_bytes) if (prune and row_ids.numel() > 1) else None
    rho, a_norm = _rotated_norms(A, row_ids, Ta, c, budget_bytes, cols=False)
    slope, b_norm, offset = _rotated_norms(B, col_ids, Tb, None, budget_bytes, cols=True, dot=c)
    _check_finite(a_norm, b_norm, rho, slope)
    offset = _by_mode(offset, mode)
    order = torch.argsort(-rho, stable=True)
    intercept = offset + kappa * float(a_norm.max()) * b_norm
    return _NormBound(row_ids[order], rho[order], (-rho[order]).tolist(), slope, intercept)


def _mean_row(X, ids, T, budget_bytes) -> torch.Tensor:
    """Mean of the selected rows of X (rotated by T when given), float64 [r]."""
    total = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
    step = _row_step(X.shape[1], budget_bytes)
    for _, _, sel in _slices(ids, step):
        total += _take(X, sel, False).sum(0, dtype=torch.float64)
    mean = total / ids.numel()
    return (mean.to(X.dtype) @ T).double() if T is not None else mean


def _row_step(r, budget_bytes) -> int:
    """Rows per pass of the setup (a float32 slice and three float64 copies: an eighth of the budget)."""
    return max(1, (budget_bytes // 8) // (r * 32))


def _rotated_norms(X, ids, T, c, budget_bytes, cols: bool, dot=None):
    """For each selected row (``cols``: column) x of X, rotated y = x T (or y = x): ``(|y - c|, |x|)``
    and, with ``dot``, also ``y . dot`` (zeros without); float64 on the CPU."""
    n = ids.numel()
    rad, norm = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    proj = torch.zeros(n, dtype=torch.float64)
    step = _row_step(X.shape[0] if cols else X.shape[1], budget_bytes)
    for s in range(0, n, step):
        Xc = _gather(X, ids[s:s + step], cols)
        Y = (Xc @ T if T is not None else Xc).double()
        norm[s:s + step] = Xc.double().norm(dim=1).cpu()
        if dot is not None:
            proj[s:s + step] = (Y @ dot).cpu()
        rad[s:s + step] = (Y - c if c is not None else Y).norm(dim=1).cpu()
    return (rad, norm) if not cols else (rad, norm, proj)


def _pruned_span(st: _NormBound, i, nr, threshold, budget_elems):
    """The next chunk of the norm scan from row i: ``(stop, selected columns)``, None when done."""
    r0 = float(st.rho[i])
    bound = st.slope * r0 + st.intercept
    if float(bound.max()) < threshold:
        return None
    sel = (bound >= threshold).nonzero().flatten()
    ncols = sel.numel()
    # Rows further down need fewer columns; end the chunk where a row needs less than half of
    # these, so that little of the chunk is computed in vain ...
    r_cut = r0
    for f in (0.9, 0.75, 0.5, 0.25, 0.0):
        if int((st.slope * (r0 * f) + st.intercept >= threshold).sum()) * 2 < ncols:
            break
        r_cut = r0 * f
    rows_ok = bisect.bisect_right(st.rho_neg, -r_cut) - i
    # ... but never so few rows that the per-chunk bookkeeping (a few passes over the columns)
    # outweighs the product itself
    rows = min(budget_elems // max(1, ncols), max(rows_ok, MIN_CHUNK_ROWS))
    return min(nr, i + max(1, rows)), sel


def _mode_and_diagonal(C, mode, exclude_diagonal, rid, cid) -> None:
    """In place: C -> |C| for abs mode, excluded diagonal entries -> -inf."""
    if mode == "abs":
        C.abs_()
    if exclude_diagonal:
        _mask_diagonal(C, rid, cid)


def _seed_threshold(C, k) -> float:
    """The k-th best of the row maxima of a first chunk (a lower bound on the final k-th value)."""
    seeds = C.topk(min(k, C.shape[1]), dim=1).values.flatten()
    seeds = seeds[seeds > -math.inf]
    return float(torch.topk(seeds, k).values[-1]) if seeds.numel() >= k else -math.inf


# -- the compiled two-level scan ---------------------------------------------------------------


@dataclass
class _TwoLevel:
    """The inputs of :func:`tl_embedspace.cpp_scan.bounded_scan` (rows in scan order: rho down)."""

    ah: torch.Tensor
    rt: torch.Tensor
    rho: torch.Tensor
    row_ids: torch.Tensor
    bh: torch.Tensor
    st: torch.Tensor
    q: torch.Tensor
    slope: torch.Tensor
    intercept: torch.Tensor
    a_max: float  # largest |A_i| of the selected rows
    b_max: float  # largest |B_j| of the selected columns
    col_ids: torch.Tensor  # the columns' ids in B, in the order of bh (norm down)


def head_coordinates_for(nr: int, nc: int, r: int, itemsize: int, budget_bytes: int) -> tuple[int, int]:
    """``(h1, H)``: the leading SVD coordinates of each row and column the cpp scan bounds every listed
    entry with (``h1``, at most ``FIRST_COORDINATES``) and those it stores for the second bound (``H``, at
    most ``HEAD_COORDINATES``), both at most ``r`` and within half the budget (zero: the centred bound)."""
    fit = (budget_bytes // 2) // max(1, (nr + nc) * itemsize)
    H = int(max(0, min(HEAD_COORDINATES, r, fit)))
    return min(FIRST_COORDINATES, H), H


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 ``x`` in ``dtype``, never below ``x``."""
    y = x + x.abs() * (2 * torch.finfo(dtype).eps) + torch.finfo(dtype).tiny
    return y.to(dtype)


def _slices(ids: torch.Tensor, step: int):
    """``(start, stop, ids_or_range)`` pieces of ``step`` ids; a piece of consecutive ids comes back as a
    ``slice`` (a view of the factor, no gather)."""
    for s in range(0, ids.numel(), step):
        piece = ids[s:s + step]
        lo, hi = int(piece[0]), int(piece[-1])
        yield s, s + piece.numel(), (slice(lo, hi + 1) if hi - lo + 1 == piece.numel() else piece)


def _take(X, sel, cols: bool) -> torch.Tensor:
    """Rows (``cols``: columns, transposed) of X: a view for a slice, a gather for ids."""
    if isinstance(sel, slice):
        return X[:, sel].T if cols else X[sel]
    return _gather(X, sel, cols)


def _two_level_bound(A, B, row_ids, col_ids, T, mode, h1, H, budget_bytes, pad_rows) -> _TwoLevel:
    """Rows a' = A_i Ta and columns b' = Tb B_j (the caller's own without ``T``), centred on the mean
    row c, in one pass over each factor in the factors' dtype: the first ``H`` coordinates and, past
    ``h1`` and past ``H`` coordinates, the radius |(a'_i - c)[h:]|, the norm |b'_j[h:]| and the offset
    c[h:] . b'_j[h:]; also the centred bound over all coordinates (rho_i = |a'_i - c|, slope_j = |b'_j|,
    offset c . b'_j).

    Allowances folded into ``q`` and ``intercept``: the rotation and the float rounding of a dot
    product (``kappa |A_i| |B_j|`` plus the double-versus-float difference); the rounding of the norms
    (relative ``gamma_r``) and offsets (``gamma_r |c| |b'_j|``) computed here; that of the partial
    products and of the bound's own evaluation in the kernel (a few eps of each term's maximum)."""
    dtype, r = A.dtype, A.shape[1]
    eps = torch.finfo(dtype).eps
    gam = (r + 4) * eps
    up = 1.0 + 2.0 * gam  # a norm computed in dtype, inflated to bound the exact one
    Ta, Tb = (T.Ta, T.Tb.T) if T is not None else (None, None)
    kappa = (T.kappa if T is not None else 0.0) + 2.0 * gam
    nr, nc = row_ids.numel(), col_ids.numel()
    c = (_mean_row(A, row_ids, Ta, budget_bytes) if nr > 1 else torch.zeros(r, dtype=torch.float64)).to(dtype)
    cd = c.double()
    c_norm = float(cd.norm())
    nr_pad = -(-nr // pad_rows) * pad_rows
    levels = (h1, H)
    ah = torch.zeros(nr_pad, H, dtype=dtype)
    rt = torch.zeros(2, nr_pad, dtype=torch.float64)
    rho, an, a_norm = (torch.empty(nr, dtype=torch.float64) for _ in range(3))
    step = _row_step(r, budget_bytes)
    for s, e, sel in _slices(row_ids, step):
        X = _take(A, sel, False)
        Y = X @ Ta if Ta is not None else X
        D = Y - c
        ah[s:e] = Y[:, :H].cpu()
        rho[s:e] = D.norm(dim=1).double().cpu()
        for lv, h in enumerate(levels):
            rt[lv, s:e] = D[:, h:].norm(dim=1).double().cpu()
        an[s:e] = Y[:, :H].norm(dim=1).double().cpu()
        a_norm[s:e] = X.norm(dim=1).double().cpu()
    rho, rt, an, a_norm = rho * up, rt * up, an * up, a_norm * up
    bh = torch.empty(nc, H, dtype=dtype)
    st, ct = torch.empty(2, nc, dtype=torch.float64), torch.empty(2, nc, dtype=torch.float64)
    slope, offset, bn, b_norm = (torch.empty(nc, dtype=torch.float64) for _ in range(4))
    step = _row_step(B.shape[0], budget_bytes)
    for s, e, sel in _slices(col_ids, step):
        X = _take(B, sel, True)
        Z = X @ Tb if Tb is not None else X
        bh[s:e] = Z[:, :H].cpu()
        slope[s:e] = Z.norm(dim=1).double().cpu()
        offset[s:e] = (Z @ c).double().cpu()
        for lv, h in enumerate(levels):
            st[lv, s:e] = Z[:, h:].norm(dim=1).double().cpu()
            ct[lv, s:e] = (Z[:, h:] @ c[h:]).double().cpu()
        bn[s:e] = Z[:, :H].norm(dim=1).double().cpu()
        b_norm[s:e] = X.norm(dim=1).double().cpu()
    slope, st, bn, b_norm = slope * up, st * up, bn * up, b_norm * up
    _check_finite(a_norm, b_norm, rho, slope)
    a_max = float(a_norm.max())
    rotation = kappa * a_max * b_norm
    dots = gam * c_norm * slope  # rounding of the offsets computed above
    intercept = _by_mode(offset, mode) + rotation + dots + 4 * eps * (float(rho.max()) * slope + offset.abs())
    # in the kernel: the partial products (gamma_h |a'_i[:h]| |b'_j[:h]|) and the bound's evaluation
    # (a few eps of each term; |P| <= |a'_i[:H]| |b'_j[:H]|)
    an_max = float(an.max()) if nr else 0.0
    q = torch.empty(2, nc, dtype=torch.float64)
    for lv, h in enumerate(levels):
        rt_max = float(rt[lv].max()) if nr else 0.0
        q[lv] = (_by_mode(ct[lv], mode) + rotation + dots + ((h + 4) * eps + 8 * eps) * an_max * bn
                 + 8 * eps * rt_max * st[lv])
        q[lv] = q[lv] + 8 * eps * q[lv].abs()
    # rows in scan order (rho down); columns by norm down, so that the columns a block lists sit
    # together in memory (permuted in place: no second copy of the coordinates)
    from tl_embedspace import cpp_scan

    order = torch.argsort(-rho, stable=True)
    cpp_scan.permute_rows(ah, order)
    corder = torch.argsort(-slope, stable=True)
    cpp_scan.permute_rows(bh, corder)
    rt_s = rt[:, torch.cat([order, torch.arange(nr, nr_pad)])]
    rt_s[:, nr:] = 0
    return _TwoLevel(ah, _round_up(rt_s, dtype).contiguous(), rho[order].contiguous(), row_ids[order].contiguous(),
                     bh, _round_up(st[:, corder], dtype).contiguous(), _round_up(q[:, corder], dtype).contiguous(),
                     slope[corder].contiguous(), intercept[corder].contiguous(), a_max, float(b_norm.max()),
                     col_ids[corder].contiguous())


SEED_SIDE = 4096  # cpp: rows and columns of the block the threshold is seeded from


SEED_GROUP = 8  # columns whose maximum stands for them in the seed's selection


def _group_maxima(C: torch.Tensor) -> torch.Tensor:
    """The maxima of groups of ``SEED_GROUP`` consecutive columns of each row (the last columns each
    on their own), flat: distinct entries of C, so their k-th best is at most C's k-th best, and a
    selection over an eighth of the entries (a flat top-k of the whole block is the slow part)."""
    w = (C.shape[1] // SEED_GROUP) * SEED_GROUP
    return torch.cat([C[:, :w].reshape(C.shape[0], -1, SEED_GROUP).amax(-1).flatten(), C[:, w:].flatten()])


def _seed_from_corner(A, B, k, mode, st: _TwoLevel, col_ids, exclude_diagonal, budget_bytes) -> tuple[float, int]:
    """A lower bound of the final k-th key from real entries: the k-th best of the block of the rows of
    largest radius and the columns of largest norm (at most ``SEED_SIDE`` each, a third of the budget;
    its maxima over groups of columns, :func:`_group_maxima`) together with the diagonal entries (row id = column id, unless excluded; each entry counted once).
    On real OV and QK circuits this is within 1 % of the final k-th value, so the scan prunes at full
    strength from its first block. Returns ``(seed or -inf, entries computed)``."""
    side = max(1, min(SEED_SIDE, math.isqrt(max(1, budget_bytes // (3 * A.element_size())))))
    rid = st.row_ids[:max(1, min(side, st.row_ids.numel() // 4))]  # a small corner of a small product
    cid = st.col_ids[:max(1, min(side, col_ids.numel() // 4))].sort().values  # st.col_ids: norm down
    Ar = A.index_select(0, rid.to(A.device))
    vals, computed = torch.empty(0, dtype=A.dtype), 0
    piece = max(1, (budget_bytes // 16) // max(1, rid.numel() * A.element_size()))  # a sixteenth at a time
    for s in range(0, cid.numel(), piece):
        cp = cid[s:s + piece]
        C = Ar @ _gather(B, cp, True).T
        if mode == "smallest":
            C.neg_()
        _mode_and_diagonal(C, mode, True, rid, cp)  # diagonal entries come from the diagonal below
        g = _group_maxima(C)
        v = torch.topk(g, min(k, g.numel())).values
        vals = torch.cat([vals, v[v > -math.inf].cpu()])
        vals = torch.topk(vals, min(k, vals.numel())).values
        computed += C.numel()
        del C
    if not exclude_diagonal:
        rows_sorted = st.row_ids.sort().values
        both = rows_sorted[torch.isin(rows_sorted, col_ids)]
        diag = []
        for _, _, sel in _slices(both, max(1, _row_step(A.shape[1], budget_bytes))):
            d = (_take(A, sel, False) * _take(B, sel, True)).sum(-1)
            diag.append(_by_mode(d, mode))
        if diag:
            d = torch.cat(diag)
            vals = torch.cat([vals, torch.topk(d, min(k, d.numel())).values.to(vals.dtype)])
            computed += d.numel()
    if vals.numel() < k:
        return -math.inf, computed
    return float(torch.topk(vals, k).values[-1]), computed


# Wall time per entry on the 2-core x86_64 machine the scans were measured on (2 threads), in ns,
# fitted on Gemma 3 heads (h1 = 16, H = 64, r = 256): an entry bounded from h1 coordinates (per
# coordinate), bounded again from H (mostly the column's memory), computed exactly (per coordinate of
# r), and an entry of a chunk product (torch: 2 r flops at about 80 GFLOP/s, per coordinate of r).
# Only their ratios matter.
COST_BOUNDED_NS_PER_H, COST_REFINED_NS, COST_EXACT_NS_PER_R, COST_PRODUCT_NS_PER_R = 0.7 / 16, 17.0, 100 / 256, 6.4 / 256
SAMPLE_ROWS = 32


def predicted_costs(st: _TwoLevel, h1: int, mode: str, threshold: float, r: int) -> tuple[float, float, dict]:
    """Predicted wall time of the cpp scan and of the torch scan (same unit, ns per entry of the
    product), from ``SAMPLE_ROWS`` rows spread over the scan order: the fractions of entries whose
    centred bound (both scans multiply or bound only those), first bound and second bound reach
    ``threshold``. Returns ``(cpp, torch, fractions)``."""
    nr = st.rho.numel()
    pos = torch.linspace(0, nr - 1, min(nr, SAMPLE_ROWS)).round().long().unique()
    n0 = n1 = n2 = 0
    slope, intercept = st.slope.float(), st.intercept.float()  # an estimate: float32 is plenty
    for s in range(0, pos.numel(), 4):  # 4 rows at a time: a few MB per array
        p = pos[s:s + 4]
        b0 = torch.addcmul(intercept, st.rho[p, None].float(), slope) >= threshold
        P1 = st.ah[p, :h1].float() @ st.bh[:, :h1].T.float()  # [rows, cols]: the sample only
        P = P1 + st.ah[p, h1:].float() @ st.bh[:, h1:].T.float() if h1 < st.ah.shape[1] else P1
        b1 = b0 & (torch.addcmul(st.q[0].float(), st.rt[0, p, None].float(), st.st[0].float()).add_(_by_mode(P1, mode))
                   >= threshold)
        b2 = b1 & (torch.addcmul(st.q[1].float(), st.rt[1, p, None].float(), st.st[1].float()).add_(_by_mode(P, mode))
                   >= threshold)
        n0, n1, n2 = n0 + int(b0.sum()), n1 + int(b1.sum()), n2 + int(b2.sum())
    total = max(1, pos.numel() * st.slope.numel())
    fr = dict(centred=n0 / total, first=n1 / total, second=n2 / total)
    cpp = (fr["centred"] * COST_BOUNDED_NS_PER_H * max(1, h1) + fr["first"] * COST_REFINED_NS
           + fr["second"] * COST_EXACT_NS_PER_R * r)
    return cpp, fr["centred"] * COST_PRODUCT_NS_PER_R * r, fr


def _topk_cpp(A, B, k, mode, row_ids, col_ids, exclude_diagonal, budget_bytes, T, decide) -> TopkPairsRaw | None:
    """``topk_product`` by the compiled scan: prepare the two-level bound, seed the threshold from real
    entries, scan every row in the kernel, merge the threads' best. With ``decide`` (backend "auto"),
    None when :func:`predicted_costs` says the torch scan is the faster one, or when the threads'
    heaps of k candidates would take more than a quarter of the budget."""
    from tl_embedspace import cpp_scan

    nr, nc, m, r = row_ids.numel(), col_ids.numel(), B.shape[1], A.shape[1]
    if decide and 32 * k * torch.get_num_threads() > budget_bytes // 4:
        return None  # each thread's heap of k candidates would not fit a quarter of the budget
    h1, H = head_coordinates_for(nr, nc, r, A.element_size(), budget_bytes)
    st = _two_level_bound(A, B, row_ids, col_ids, T, mode, h1, H, budget_bytes, cpp_scan.row_multiple())
    stats = TopkStats(rows_total=nr, cols_total=nc)
    n_candidates = nr * nc - (int(torch.isin(row_ids, col_ids).sum()) if exclude_diagonal else 0)
    threshold = -math.inf
    if n_candidates > k:
        seed, computed = _seed_from_corner(A, B, k, mode, st, col_ids, exclude_diagonal, budget_bytes)
        stats.entries_computed += computed
        if seed > -math.inf:  # lowered by the float rounding of the seed's products
            threshold = seed - 4.0 * (rounding_slack(r, A.dtype) - 1.0) * st.a_max * st.b_max
    if decide and nr * nc > SAMPLE_ROWS * nc * 8:
        cpp_ns, torch_ns, _ = predicted_costs(st, h1, mode, threshold, r)
        if cpp_ns > torch_ns:
            return None
    stats.scan = "cpp"
    keys, values, rows, cols, ks = cpp_scan.bounded_scan(
        st.ah, st.rt, st.rho, st.row_ids, A, st.bh, st.st, st.q, st.slope, st.intercept, st.col_ids, B, h1, k, mode,
        exclude_diagonal, threshold)
    stats.entries_computed += ks["exact"]
    stats.entries_bounded = ks["bounded"]
    stats.entries_refined = ks["refined"]
    stats.rows_visited = ks["rows_end"]
    stats.head_coordinates = (h1, H)
    stats.chunk_rows = int(cpp_scan.load().BLOCK)
    stats.chunks = -(-ks["rows_end"] // stats.chunk_rows)
    best, flat = select_topk(keys, rows * m + cols, k)
    # the signed value of each kept entry (keys were unique per entry, so look them up)
    pos = {int(x): i for i, x in enumerate((rows * m + cols).tolist())}
    signed = values[[pos[int(x)] for x in flat.tolist()]] if flat.numel() else values[:0]
    return TopkPairsRaw(signed.to(A.dtype), flat // m, flat % m, stats)


# -- the SVD basis of the product, for the bound ---------------------------------------------


@dataclass
class _Transforms:
    """r x r maps with (A Ta)(Tb B) = A B up to rounding, and the certified allowance ``kappa``:
    |fl(A_i . B_j) - a'_i . b'_j| <= kappa |A_i| |B_j| for the float32 rotated rows/columns."""

    Ta: torch.Tensor
    Tb: torch.Tensor
    kappa: float


def _gram(X, ids, budget_bytes, cols: bool) -> torch.Tensor:
    """X^T X over the selected rows of X (or X X^T over selected columns), accumulated in float64."""
    r = X.shape[1] if not cols else X.shape[0]
    G = torch.zeros(r, r, dtype=torch.float64, device=X.device)
    step = max(1, (budget_bytes // 4) // (r * 8))
    for _, _, sel in _slices(ids, step):
        Y = _take(X, sel, cols)
        G += (Y.T @ Y).double()  # float32 is enough: exactness rests on Ta Tb = I, not on G
    return G


def _gather(X, ids, cols: bool) -> torch.Tensor:
    """Selected rows of X as [len(ids), r]; for cols the selected columns of X [r, m] transposed
    (gathered as rows of ``X.T`` when X is column-major: each column is one piece of memory)."""
    ids = ids.to(X.device)
    if cols:
        return X.T.index_select(0, ids) if X.stride(0) == 1 else X.index_select(1, ids).T
    return X.index_select(0, ids)


GRAM_ROWS = 32768  # rows (columns) a Gram matrix of the SVD basis is estimated from


def _gram_sample(ids: torch.Tensor) -> torch.Tensor:
    """Evenly spaced ids, at most ``GRAM_ROWS`` of them (all when there are fewer)."""
    if ids.numel() <= GRAM_ROWS:
        return ids
    return ids[torch.linspace(0, ids.numel() - 1, GRAM_ROWS).round().long().unique()]


def svd_transforms(A, B, row_ids, col_ids, budget_bytes) -> _Transforms | None:
    """The maps into the balanced SVD basis of ``A[rows] @ B[:, cols]`` (None if a factor is not
    of full rank r); r x r work after two chunked Gram matrices, no copy of the factors.

    The Gram matrices come from at most ``GRAM_ROWS`` evenly spaced rows and columns: the maps are
    only a basis for the bound, whose exactness rests on ``Ta Tb = I`` (its residual is measured
    and part of ``kappa``), not on the Gram matrices; a basis estimated from an eighth of a
    262,144-token vocabulary bounds as tightly and costs an eighth."""
    with _small_ops():
        Ea, Va = torch.linalg.eigh(_gram(A, _gram_sample(row_ids), budget_bytes, cols=False))
        Eb, Vb = torch.linalg.eigh(_gram(B, _gram_sample(col_ids), budget_bytes, cols=True))
        if float(Ea.min()) <= float(Ea.max()) * 1e-10 or float(Eb.min()) <= float(Eb.max()) * 1e-10:
            return None
        Ra = Ea.sqrt()[:, None] * Va.T
        Rb = Eb.sqrt()[:, None] * Vb.T
        U, S, Vh = torch.linalg.svd(Ra @ Rb.T)
        root = S.sqrt()
        Ta = ((Va / Ea.sqrt()) @ U * root).to(A.dtype)
        Tb = ((root[:, None] * Vh) @ (Vb / Eb.sqrt()).T).to(A.dtype)
        Ta64, Tb64 = Ta.double(), Tb.double()
        r = A.shape[1]
        gam = (r + 4) * torch.finfo(A.dtype).eps
        fa, fb = float(torch.linalg.matrix_norm(Ta64)), float(torch.linalg.matrix_norm(Tb64))
        sa, sb = float(torch.linalg.matrix_norm(Ta64, 2)), float(torch.linalg.matrix_norm(Tb64, 2))
        resid = float(torch.linalg.matrix_norm(Ta64 @ Tb64 - torch.eye(r, dtype=torch.float64), 2))
        kappa = 2.0 * (gam * (fa * sb + sa * fb) + 3 * gam * gam * fa * fb + resid + gam) + 1e-12
    return _Transforms(Ta, Tb, kappa)


def _mask_diagonal(C: torch.Tensor, rid: torch.Tensor, cid: torch.Tensor) -> None:
    """Set C[i, j] = -inf where row id rid[i] equals column id cid[j]."""
    pos = torch.full((int(max(rid.max(), cid.max())) + 1,), -1, dtype=torch.long, device=C.device)
    pos[cid] = torch.arange(cid.numel(), device=C.device)
    p = pos[rid]
    hit = (p >= 0).nonzero().flatten()
    if hit.numel():
        C[hit, p[hit]] = -math.inf


def _scan_chunk(C, threshold, rid, cid, m, best_vals, best_keys, k, budget_bytes):
    """Merge the entries of chunk C that reach the threshold into the running best set."""
    if threshold > -math.inf:
        # one pass for the row maxima, then only rows that hold a candidate are searched
        live = (C.amax(dim=1) >= threshold).nonzero().flatten()
        if live.numel() == 0:
            return best_vals, best_keys
        C, rid = C[live], rid[live]
    # Index scratch for nonzero() is 16 bytes per hit: bound it by scanning row blocks.
    cap = max(C.shape[1], budget_bytes // 64)
    block = max(1, cap // max(1, C.shape[1]))
    for s in range(0, C.shape[0], block):
        sub = C[s:s + block]
        mask = sub >= threshold if threshold > -math.inf else sub > -math.inf
        ij = mask.nonzero()
        if ij.shape[0] == 0:
            continue
        vals = sub[ij[:, 0], ij[:, 1]].double().cpu()
        keys = (rid[s:][ij[:, 0]] * m + cid[ij[:, 1]]).cpu()
        best_vals, best_keys = select_topk(torch.cat([best_vals, vals]), torch.cat([best_keys, keys]), k)
        if best_vals.numel() >= k:
            threshold = max(threshold, float(best_vals[k - 1]))
    return best_vals, best_keys


def topk_per_row(
    A: torch.Tensor,
    B: torch.Tensor,
    k: int,
    *,
    mode: str = "largest",
    rows: IndexLike = None,
    cols: IndexLike = None,
    exclude_diagonal: bool = False,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k columns of each (selected) row of ``A @ B``: ``(values [n, k'], col ids [n, k'])``.

    k' = min(k, number of columns). Streams row chunks; ties inside a row go to the smaller column
    id (both which tied entries are kept and their order). With ``exclude_diagonal`` a row's own id is never a column.
    When k' exceeds a row's candidates (the excluded diagonal), the padding entries come last with
    value -inf (+inf in ``mode="smallest"``).
    """
    A, B, row_ids, col_ids = _prepare(A, B, k, mode, rows, cols, budget_bytes, exclude_diagonal)
    n = A.shape[0]
    kk = min(k, col_ids.numel())
    chunk = chunk_rows_for(col_ids.numel(), A.element_size(), budget_bytes)
    out_v = torch.empty(n, kk, dtype=A.dtype)
    out_i = torch.empty(n, kk, dtype=torch.long)
    cid = col_ids.to(A.device)
    for s in range(0, n, chunk):
        C = A[s:s + chunk] @ B
        if mode == "smallest":
            C.neg_()
        signed = None
        if mode == "abs":
            signed = C.clone() if kk else None
            C.abs_()
        if exclude_diagonal:
            _mask_diagonal(C, row_ids[s:s + chunk].to(A.device), cid)
        # (value desc, column id asc): positions are in column-id order (col_ids are sorted)
        v, j = top_k(C, kk, dim=1)
        ids = cid[j]
        if mode == "smallest":
            v = -v
        elif mode == "abs":
            # an excluded diagonal entry only comes back as padding (k above the row's candidates):
            # it keeps the -inf marker of its key, not its real value
            v = torch.where(v == float("-inf"), v, signed.gather(1, j))
        out_v[s:s + chunk] = v.cpu()
        out_i[s:s + chunk] = ids.cpu()
    return out_v, out_i


def diag_product(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Diagonal of ``A @ B`` for square products: ``[n]``, computed row by row (``(A * B^T).sum(-1)``)."""
    _check_factors(A, B)
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"A, B: the product is {A.shape[0]} x {B.shape[1]}, not square; no diagonal")
    return (A * B.T).sum(-1)


def top1_diag_accuracy(
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    rows: IndexLike = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    prune: bool = True,
    balance: bool = False,
) -> tuple[float, torch.Tensor]:
    """Fraction of rows i of the square product whose maximum is attained on the diagonal.

    Exact and streamed: for row i only columns with ``|a_i| |b_j| > diag_i`` can beat the
    diagonal, so rows are grouped by ``diag_i / |a_i|`` and each group multiplies only the prefix of
    norm-sorted columns that could. A tie with the diagonal counts as a hit. Returns
    ``(accuracy, hit [n_rows] bool in the order of the selected row ids)``.
    """
    _check_factors(A, B)
    n, r = A.shape
    if n != B.shape[1]:
        raise ValueError(f"A, B: the product is {n} x {B.shape[1]}, not square; no diagonal")
    row_ids = as_index(rows, n, "rows")
    if row_ids is not None:  # the square sub-matrix of the selected tokens
        A, B = A[row_ids.to(A.device)], B[:, row_ids.to(B.device)]
        n = A.shape[0]
    if balance and n > r:
        A, B = balance_factors(A, B)
    row_ids = torch.arange(n)
    d = diag_product(A, B)
    a_norm = A.double().norm(dim=1).cpu()
    b_norm_all = B.double().norm(dim=0).cpu()
    _check_finite(a_norm, b_norm_all)
    b_order = torch.argsort(-b_norm_all, stable=True)
    b_sorted = b_norm_all[b_order]
    B_sorted = B[:, b_order.to(B.device)]
    slack = rounding_slack(r, A.dtype)
    # ratio = the column norm a competitor needs; rows needing the fewest columns first
    ratio = d.double().cpu() / (a_norm * slack).clamp_min(1e-300)
    order = torch.argsort(-ratio, stable=True)
    hit = torch.ones(row_ids.numel(), dtype=torch.bool)
    chunk = chunk_rows_for(n, A.element_size(), budget_bytes)
    for s in range(0, order.numel(), chunk):
        idx = order[s:s + chunk]
        need = float(ratio[idx].min())
        ncols = n if not prune or need <= 0 else int((b_sorted >= need).sum())
        if ncols == 0:
            continue
        rid = row_ids[idx]
        C = A[rid.to(A.device)] @ B_sorted[:, :ncols]
        # exclude the diagonal itself, then compare the best competitor with the diagonal
        _mask_diagonal(C, rid.to(A.device), b_order[:ncols].to(A.device))
        best = C.max(dim=1).values.cpu()
        hit[idx] = best <= d[idx.to(d.device)].cpu()
    return float(hit.float().mean()), hit


def materialized_topk(A: torch.Tensor, B: torch.Tensor, k: int, mode: str = "largest") -> TopkPairsRaw:
    """The naive reference: form ``A @ B`` densely and take its top-k (for benchmarks and tests)."""
    check_mode(mode)
    M = A @ B
    key = M.abs() if mode == "abs" else (-M if mode == "smallest" else M)
    _, flat = top_k(key.flatten(), min(k, key.numel()))
    rows, cols = flat // M.shape[1], flat % M.shape[1]
    return TopkPairsRaw(M[rows, cols], rows, cols)
