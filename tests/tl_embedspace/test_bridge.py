"""EmbeddingSpace on a TransformerBridge equals EmbeddingSpace on a HookedTransformer of the same weights.

``tiny.hf_pair(kind)`` converts one random Hugging Face model both ways (TransformerLens's weight
converter for the HookedTransformer, ``boot_transformers`` for the bridge). The bridge keeps W_K/W_V
at the K/V head count and has no biases on bias-free models; the weight view hides both, so every
view and basis agrees (<= 1e-5 relative). Needs HookedTransformer (transformer-lens 3.x).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import tl_plugins
from tl_embedspace import EmbeddingSpace
from tl_plugins import UnsupportedModelError
from tl_plugins.models import tiny

if not tiny.hooked_available():
    pytest.skip("parity with HookedTransformer needs transformer-lens 3.x (4.x removed it)",
                allow_module_level=True)

BASES = ("unembed", "full-circuit", "pinv")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny.hf_pair(request.param)


def _close(a, b, rel=1e-5):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    assert float((a - b).abs().max()) <= rel * scale


def _same_scores(x, y):
    _close(x.top_values, y.top_values)
    _close(x.bottom_values, y.bottom_values)
    assert x.top_tokens == y.top_tokens


def test_weight_view_hides_kv_heads_and_missing_biases(pair):
    hooked, bridge = pair
    wh, wb = tl_plugins.weights(hooked), tl_plugins.weights(bridge)
    # the bridge's own W_K is at the K/V head count; the view expands it
    assert bridge.blocks[0].attn.W_K.shape[0] == wb.n_kv_heads
    for name in ("W_E", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O",
                 "W_in", "W_out", "b_in", "b_out"):
        a, b = getattr(wh, name), getattr(wb, name)
        assert a.shape == b.shape, name
        _close(a, b)
    assert (wh.W_gate is None) == (wb.W_gate is None)
    if wh.W_gate is not None:
        _close(wh.W_gate, wb.W_gate)
    assert wh.tied == wb.tied and wh.processing.is_processed == wb.processing.is_processed


@pytest.mark.parametrize("read_basis", BASES)
@pytest.mark.parametrize("write_basis", BASES)
def test_every_view_agrees(pair, read_basis, write_basis):
    hooked, bridge = pair
    sh = EmbeddingSpace(hooked, read_basis=read_basis, write_basis=write_basis)
    sb = EmbeddingSpace(bridge, read_basis=read_basis, write_basis=write_basis)
    _close(sh.R, sb.R)
    _close(sh.W, sb.W)
    for layer in range(sh.n_layers):
        _same_scores(sh.ff_value(layer, 3), sb.ff_value(layer, 3))
        _same_scores(sh.ff_key(layer, 5), sb.ff_key(layer, 5))
        if sh.w.gated_mlp:
            _same_scores(sh.ff_gate(layer, 7), sb.ff_gate(layer, 7))
        for which in "QKVO":
            _same_scores(sh.head_vector(layer, 1, which, 2), sb.head_vector(layer, 1, which, 2))
        for view in ("ov", "qk"):
            mh, mb = getattr(sh, view)(layer, 2), getattr(sb, view)(layer, 2)
            for mode in ("largest", "smallest", "abs"):
                ph, pb = mh.topk_pairs(12, mode), mb.topk_pairs(12, mode)
                _close(ph.values, pb.values)
                assert torch.equal(ph.row_ids, pb.row_ids) and torch.equal(ph.col_ids, pb.col_ids)
            _close(mh.diag(), mb.diag())
            _close(mh.topk_per_row(3).values, mb.topk_per_row(3).values)
            _same_scores(mh.row(9), mb.row(9))
            _same_scores(mh.col(9), mb.col(9))
            assert abs(mh.copying_score() - mb.copying_score()) <= 1e-5 * max(1.0, abs(mh.copying_score()))
    _same_scores(sh.embedding(11), sb.embedding(11))
    _same_scores(sh.unembedding(11), sb.unembedding(11))
    fh, fb = sh.find_neurons(11, k=8), sb.find_neurons(11, k=8)
    assert torch.equal(fh.layers, fb.layers) and torch.equal(fh.units, fb.units)
    _close(sh.copying_scores(), sb.copying_scores())


def test_paper_basis_alike(pair):
    """GPT-2 ties W_U to W_E (the paper's basis applies), the tiny Llama does not (refused on both)."""
    hooked, bridge = pair
    assert tl_plugins.weights(hooked).tied == tl_plugins.weights(bridge).tied
    if not tl_plugins.weights(hooked).tied:
        for model in pair:
            with pytest.raises(UnsupportedModelError, match="tied"):
                EmbeddingSpace(model, read_basis="paper")
        return
    sh, sb = EmbeddingSpace(hooked, "paper", "paper"), EmbeddingSpace(bridge, "paper", "paper")
    ph, pb = sh.ov(1, 0).topk_pairs(10), sb.ov(1, 0).topk_pairs(10)
    _close(ph.values, pb.values)
    assert torch.equal(ph.row_ids, pb.row_ids)


def test_hidden_state_evaluation_agrees(pair):
    from tl_embedspace.evaluations import hidden_state_overlap

    hooked, bridge = pair
    toks = torch.randint(4, hooked.cfg.d_vocab, (2, 10), generator=torch.Generator().manual_seed(1))
    rh = hidden_state_overlap(EmbeddingSpace(hooked), toks, k=5, n_neurons=4)
    rb = hidden_state_overlap(EmbeddingSpace(bridge), toks, k=5, n_neurons=4)
    fh, fb = rh.to_frame(), rb.to_frame()
    assert list(fh["layer"]) == list(fb["layer"])
    _close(torch.tensor(fh["score"].to_numpy()), torch.tensor(fb["score"].to_numpy()), rel=1e-4)
