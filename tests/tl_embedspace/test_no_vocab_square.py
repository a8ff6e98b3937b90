"""A guard that fails if any d_vocab x d_vocab tensor is allocated while working in embedding space.

Every op's outputs are checked by a TorchDispatchMode: a tensor with two dimensions of at least
d_vocab, or with d_vocab^2 / 2 elements or more, is an error. The vocabulary (400) is larger than
every other dimension of the model, so only a vocab x vocab product can trip it.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tl_embedspace import EmbeddingSpace
from tl_embedspace.reference import materialized_topk
from tl_plugins.models import tiny

V = 400


class VocabSquareGuard(TorchDispatchMode):
    def __init__(self, d_vocab):
        super().__init__()
        self.d_vocab = d_vocab
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                big_dims = sum(1 for s in t.shape if s >= self.d_vocab)
                if big_dims >= 2 or t.numel() >= self.d_vocab ** 2 // 2:
                    raise AssertionError(f"{func} allocated a {tuple(t.shape)} tensor (d_vocab={self.d_vocab})")
        return out


@pytest.fixture(scope="module")
def space():
    m = tiny.build(tiny.TINY_GPT2, n_layers=2, d_vocab=V, seed=5)
    with torch.no_grad():
        m.unembed.W_U.copy_(m.embed.W_E.T)
    # a chunk of at most 40 rows: a real chunk, far below vocab x vocab
    return EmbeddingSpace(m, budget_bytes=40 * V * 9)


def test_guard_catches_a_materialised_product(space):
    ov = space.ov(0, 0)
    with pytest.raises(AssertionError, match="allocated"), VocabSquareGuard(V):
        materialized_topk(ov.A, ov.B, 5)


def test_nothing_vocab_square_is_allocated(space):
    ov, qk = space.ov(1, 2), space.qk(0, 3)
    with VocabSquareGuard(V) as guard:
        for mode in ("largest", "smallest", "abs"):
            ov.topk_pairs(50, mode)
            qk.topk_pairs(50, mode, exclude_diagonal=True)
        ov.topk_pairs(10, rows=list(range(0, V, 2)), cols=list(range(1, V, 3)))
        ov.topk_per_row(5, exclude_diagonal=True)
        ov.row(3), ov.col(4), ov.diag(), ov.copying_score(), ov.eigenvalues()
        ov.top1_diag_accuracy(), qk.top1_diag_accuracy()
        space.find_neurons(7), space.find_neurons(7, kind="key"), space.find_heads(1, 2, kind="qk")
        space.copying_scores()
        space.ff_value(1, 3), space.embedding(9), space.unembedding(9)
    assert guard.ops > 100
