"""The project's ranking rule (tl_plugins.ranking) against a brute-force oracle: Python's sort of
(value descending, index ascending), on inputs full of exact ties."""

import pytest
import torch

from tl_plugins.ranking import keep_mask, top_k, top_k_keyed


def _oracle(row: list[float], k: int) -> list[int]:
    return sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]


def _tied(shape, levels=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, shape, generator=g).float()


@pytest.mark.parametrize("k", [0, 1, 3, 7, 12])
def test_top_k_matches_sort_on_ties(k):
    x = _tied((5, 6, 12))
    v, i = top_k(x, k, dim=-1)
    for r, row in enumerate(x.reshape(-1, 12).tolist()):
        want = _oracle(row, k)
        assert i.reshape(30, k)[r].tolist() == want
        assert v.reshape(30, k)[r].tolist() == [row[j] for j in want]


def test_top_k_along_another_dim_and_with_infinities():
    x = _tied((9, 4), levels=3, seed=1)
    x[2, 1] = float("-inf")
    x[5, 3] = float("inf")
    v, i = top_k(x, 4, dim=0)
    assert v.shape == i.shape == (4, 4)
    for c in range(4):
        col = x[:, c].tolist()
        assert i[:, c].tolist() == _oracle(col, 4)


def test_top_k_agrees_with_torch_topk_values_without_ties():
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(2))
    v, i = top_k(x, 50)
    tv = torch.topk(x, 50).values
    assert torch.equal(v, tv)
    assert torch.equal(x.gather(-1, i), v)


@pytest.mark.parametrize("bad", [-1, 13, 2.0, True])
def test_top_k_rejects_bad_k(bad):
    with pytest.raises((ValueError, TypeError), match="k: got"):
        top_k(torch.zeros(12), bad)


def test_keep_mask_per_row_k_and_invalid_keys():
    s = _tied((4, 10), levels=3, seed=3)
    s[0, :7] = float("-inf")  # three valid keys, k above that keeps all three
    k_rows = torch.tensor([5, 1, 4, 10])
    keep = keep_mask(s, k_rows)
    for r, row in enumerate(s.tolist()):
        valid = [j for j in range(10) if row[j] > float("-inf")]
        want = [j for j in _oracle(row, int(k_rows[r])) if j in valid]
        assert sorted(keep[r].nonzero().flatten().tolist()) == sorted(want)


def test_top_k_keyed_orders_by_key_not_position():
    vals = torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0, 0.5])
    keys = torch.tensor([50, 40, 10, 5, 30, 1])
    v, kk = top_k_keyed(vals, keys, 4)
    assert kk.tolist() == [10, 30, 40, 5]
    assert v.tolist() == [2.0, 2.0, 2.0, 1.0]
    v, kk = top_k_keyed(vals, keys, 10)  # fewer candidates than k: all, in order
    assert kk.tolist() == [10, 30, 40, 5, 50, 1]
