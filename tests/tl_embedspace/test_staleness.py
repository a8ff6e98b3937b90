"""An EmbeddingSpace follows edits to the model's weights: its bases and stacks are recomputed when a
parameter changes in place (oracle: a new EmbeddingSpace on the edited model); ``refresh()`` covers
edits through ``.data``, which PyTorch's version counter does not see."""

from __future__ import annotations

import torch

import tl_plugins
from tl_embedspace import EmbeddingSpace


def _same(a, b):
    assert a.top_tokens == b.top_tokens
    torch.testing.assert_close(a.top_values, b.top_values)


def test_in_place_edits_of_unembedding_and_values_are_seen():
    model = tl_plugins.models.load("tiny-llama")
    space = EmbeddingSpace(model)
    before = space.ff_value(1, 3)
    hits_before = space.find_neurons(7, k=5)
    with torch.no_grad():
        model.W_U.mul_(-1)
        for p in model.parameters():
            if p.shape == tl_plugins.weights(model).W_out_layer(1).shape:
                p.add_(torch.randn_like(p))
    fresh = EmbeddingSpace(model)
    after = space.ff_value(1, 3)
    _same(after, fresh.ff_value(1, 3))
    assert after.top_tokens != before.top_tokens
    hits = space.find_neurons(7, k=5)
    assert torch.equal(hits.units, fresh.find_neurons(7, k=5).units)
    assert not torch.equal(hits.units, hits_before.units) or not torch.equal(hits.layers, hits_before.layers)


def test_refresh_covers_edits_through_data():
    model = tl_plugins.models.load("tiny-gpt2")
    space = EmbeddingSpace(model)
    _ = space.embedding(5)
    target = next(p for p in model.parameters() if p.shape == tl_plugins.weights(model).W_E.shape)
    target.data[:] = torch.randn_like(target)  # .data bypasses the version counter
    space.refresh()
    _same(space.embedding(5), EmbeddingSpace(model).embedding(5))


def test_non_finite_weights_are_refused_at_construction_and_after_an_edit():
    import numpy as np
    import pytest

    model = tl_plugins.models.load("tiny-llama")
    space = EmbeddingSpace(model)
    assert space.ff_value(np.int64(1), np.int64(3), k=np.int64(4)).top_ids.shape == (4,)  # numpy ints work
    with torch.no_grad():
        model.W_U[0, 5] = float("nan")
    with pytest.raises(ValueError, match="model: parameter .* holds NaN or infinite values"):
        space.ff_value(1, 3)
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        EmbeddingSpace(model)
