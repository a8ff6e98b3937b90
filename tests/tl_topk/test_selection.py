"""The selection rule (k largest valid scores, ties to the smaller index) against brute force."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tl_topk.ops.selection import (
    count_valid,
    k_per_row,
    per_head_spec,
    topk_keep_mask,
    topk_select,
    validate_k_value,
)

NEG = float("-inf")


def brute_keep(row: list[float], k: int) -> set[int]:
    """Sort (score desc, index asc) in plain Python; keep the first k valid keys."""
    valid = [(-s, j) for j, s in enumerate(row) if s != NEG]
    return {j for _, j in sorted(valid)[:k]}


@st.composite
def score_rows(draw):
    n = draw(st.integers(1, 12))
    # Small integer values make ties common; some keys masked.
    vals = draw(st.lists(st.one_of(st.integers(-3, 3).map(float), st.just(NEG)), min_size=n, max_size=n))
    k = draw(st.integers(1, n + 2))
    return vals, k


@settings(max_examples=150, deadline=None)
@given(score_rows())
def test_keep_mask_matches_brute_force(case):
    vals, k = case
    s = torch.tensor([vals])
    keep = topk_keep_mask(s, torch.tensor([k]))
    assert set(torch.nonzero(keep[0]).flatten().tolist()) == brute_keep(vals, k)


@settings(max_examples=100, deadline=None)
@given(score_rows())
def test_select_returns_the_same_set(case):
    vals, k = case
    s = torch.tensor([vals])
    kk = min(k, len(vals))
    v, idx = topk_select(s, torch.tensor([k]), kk)
    chosen = {int(j) for j, x in zip(idx[0].tolist(), v[0].tolist()) if x != NEG}
    assert chosen == brute_keep(vals, k)


def test_ties_go_to_smaller_index():
    s = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert topk_keep_mask(s, torch.tensor([2])).tolist() == [[False, True, True, False, False]]
    # a large all-equal row: torch.topk's own choice is not the rule's
    s = torch.zeros(1, 1000)
    keep = topk_keep_mask(s, torch.tensor([3]))
    assert torch.nonzero(keep[0]).flatten().tolist() == [0, 1, 2]
    v, idx = topk_select(s, torch.tensor([3]), 3)
    assert sorted(idx[0].tolist()) == [0, 1, 2]


def test_select_many_tied_rows_in_blocks():
    """Most rows tie at their boundary, so the tie path runs over several blocks of rows; rows
    without a tie keep torch.topk's own answer. Every row against the brute-force rule."""
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 6, (3, 40, 50), generator=g).float()
    s[:, ::5] = torch.randn(3, 8, 50, generator=g)  # some rows with distinct scores
    s[0, 3, 10:] = NEG
    k_rows = torch.randint(1, 12, (3, 40), generator=g)
    v, idx = topk_select(s, k_rows, 11)
    for b in range(3):
        for r in range(40):
            row = s[b, r].tolist()
            chosen = {int(j) for j, x in zip(idx[b, r].tolist(), v[b, r].tolist()) if x != NEG}
            assert chosen == brute_keep(row, int(k_rows[b, r])), (b, r)
            kept = v[b, r][v[b, r] != NEG]
            assert torch.equal(kept, s[b, r, idx[b, r][v[b, r] != NEG]])


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 12), st.integers(0, 6), st.sampled_from([None, 1, 2, 5]), st.booleans(),
       st.integers(0, 2**16))
def test_count_valid_equals_the_mask_it_describes(n_k, n_q_less, window, padded, seed):
    """count_valid (cumulative sums) against valid_mask (explicit comparisons), sliding windows included."""
    from tl_topk.ops.dense import valid_mask

    n_q = max(1, n_k - n_q_less)
    pad = (torch.rand(2, n_k, generator=torch.Generator().manual_seed(seed)) > 0.3) if padded else None
    got = count_valid(n_q, n_k, True, pad, 2, "cpu", window)
    mask = valid_mask(torch.arange(n_q) + n_k - n_q, n_k, True, pad, window)
    assert torch.equal(got, mask.expand(2, 1, n_q, n_k).sum(-1)[:, 0])


def test_count_valid_causal_with_padding_and_offset():
    pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]]).bool()
    got = count_valid(3, 5, True, pad, 2, "cpu")  # queries at key positions 2, 3, 4
    assert got.tolist() == [[1, 2, 3], [3, 4, 4]]
    assert count_valid(2, 5, False, pad, 2, "cpu").tolist() == [[3, 3], [4, 4]]
    assert count_valid(3, 3, True, None, 1, "cpu").tolist() == [[1, 2, 3]]


def test_fraction_rounds_up_and_per_head_entries():
    n_valid = torch.tensor([[1, 10, 30]])
    rows = k_per_row((0.1, 3, None), n_valid, 30)
    assert rows[0, 0].tolist() == [1, 1, 3]  # ceil(0.1 * 30) = 3, not 4 from float error
    assert rows[0, 1].tolist() == [3, 3, 3]
    assert rows[0, 2].tolist() == [30, 30, 30]


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-2, ValueError), (1.5, ValueError), (0.0, ValueError),
                                      (float("nan"), ValueError), (True, TypeError), ("8", TypeError),
                                      (None, TypeError)])
def test_bad_k_values(bad, exc):
    with pytest.raises(exc, match="k"):
        validate_k_value(bad, "k")


def test_per_head_spec_length_checked():
    with pytest.raises(ValueError, match="one entry per query head"):
        per_head_spec([1, 2], 3)
    assert per_head_spec(torch.tensor([1, 2, 3]), 3) == (1, 2, 3)


def test_fractions_that_keep_every_key_count_as_dense():
    """ceil(0.9999 * n) == n for n < 10000: such a fraction must hand the call to the dense path,
    which is what keeps TransformerLens's own allclose-tolerance tests passing (conformance)."""
    from tl_topk.ops.selection import k_per_row, spec_covers_all

    for f, n_k in [(0.9999, 20), (0.9999, 9999), (0.5, 1), (0.75, 3)]:
        n_valid = torch.arange(1, n_k + 1).unsqueeze(0)
        keeps_all = bool((k_per_row((f,), n_valid, n_k)[0, 0] == n_valid[0]).all())
        assert spec_covers_all((f,), n_k) == keeps_all
    assert spec_covers_all((0.9999,), 20) and not spec_covers_all((0.9999,), 10001)
    assert not spec_covers_all((0.75,), 5)
