"""EmbeddingSpace against the paper's formulas written out densely here, FactoredMatrix interop,
a planted copying head, GQA and gated MLPs, bad input."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import tl_plugins
from tl_embedspace import EmbeddingSpace, ProcessedWeightsWarning
from tl_plugins.backends.bridge import is_bridge
from tl_plugins.errors import UnsupportedModelError
from tl_plugins.models import tiny
from tl_plugins.weights import record_processing


def kv_weight(model, layer, letter, h):
    """W_K or W_V (``letter`` "K"/"V") of query head ``h``, from the model's own un-expanded K/V
    weights: HookedTransformer's ``_W_K`` (grouped attention) or ``W_K``, a bridge's ``W_K``
    (kept at the kv-head count)."""
    attn = model.blocks[layer].attn
    raw = getattr(attn, f"_W_{letter}") if (not is_bridge(model) and hasattr(attn, f"_W_{letter}")) else \
        getattr(attn, f"W_{letter}")
    return raw.detach()[h // (model.cfg.n_heads // raw.shape[0])]


def dense_topk(M, k, mode="largest"):
    key = M.abs() if mode == "abs" else (-M if mode == "smallest" else M)
    idx = torch.topk(key.flatten(), k).indices
    return {(int(i) // M.shape[1], int(i) % M.shape[1]) for i in idx}


# -- parity with the paper (tied, unprocessed GPT-2-shaped model) ------------------------------------

def test_paper_formulas(gpt2_tied):
    m = gpt2_tied
    sp = EmbeddingSpace(m)
    assert sp.read_basis == sp.write_basis == "paper"
    E = m.W_U.detach()  # the paper's E: the (tied) output embedding, d_model x vocab
    l, h, i = 1, 2, 7
    # feed-forward value and key: x E
    v = m.blocks[l].mlp.W_out.detach()[i] @ E
    key = m.blocks[l].mlp.W_in.detach()[:, i] @ E
    r = sp.ff_value(l, i, k=50)
    torch.testing.assert_close(r.top_values, v.sort(descending=True).values)
    assert r.top_ids.tolist() == torch.argsort(-v, stable=True).tolist()
    torch.testing.assert_close(sp.ff_key(l, i, k=5).top_values, key.sort(descending=True).values[:5])
    # head matrices
    WQ, WK = m.blocks[l].attn.W_Q.detach()[h], m.blocks[l].attn.W_K.detach()[h]
    WV, WO = m.blocks[l].attn.W_V.detach()[h], m.blocks[l].attn.W_O.detach()[h]
    torch.testing.assert_close(sp.head_vector(l, h, "K", 3, k=5).top_values, (WK[:, 3] @ E).sort(descending=True).values[:5])
    torch.testing.assert_close(sp.head_vector(l, h, "O", 4, k=5).top_values, (WO[4] @ E).sort(descending=True).values[:5])
    OV = E.T @ WV @ WO @ E
    QK = E.T @ WQ @ WK.T @ E
    for mode in ("largest", "smallest", "abs"):
        assert set(sp.ov(l, h).topk_pairs(20, mode).pairs()) == dense_topk(OV, 20, mode)
        assert set(sp.qk(l, h).topk_pairs(20, mode).pairs()) == dense_topk(QK, 20, mode)
    ov = sp.ov(l, h)
    torch.testing.assert_close(ov.diag(), OV.diag(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ov.row(5, k=50).top_values, OV[5].sort(descending=True).values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ov.col(5, k=50).top_values, OV[:, 5].sort(descending=True).values, rtol=1e-4,
                               atol=1e-5)
    r = ov.topk_pairs(10)
    torch.testing.assert_close(r.values, OV[r.row_ids, r.col_ids], rtol=1e-4, atol=1e-5)
    assert r.basis["read_basis"] == "paper" and r.basis["ln"] == "raw"
    # filters are applied before ranking: exact within the allowed tokens
    allowed = list(range(0, 50, 3))
    sub = OV[allowed][:, allowed]
    got = ov.topk_pairs(7, rows=allowed, cols=allowed).pairs()
    assert set(got) == {(allowed[i], allowed[j]) for i, j in dense_topk(sub, 7)}
    # per-row top-k
    pr = ov.topk_per_row(3, rows=[2, 9])
    assert pr.col_ids[1].tolist() == torch.topk(OV[9], 3).indices.tolist()


def test_bases_full_circuit_and_pinv(llama):
    sp = EmbeddingSpace(llama)  # untied: auto -> full-circuit
    assert sp.read_basis == "full-circuit"
    W_E, W_U = llama.W_E.detach(), llama.W_U.detach()
    l, h = 1, 3
    OV = W_E @ kv_weight(llama, l, "V", h) @ llama.blocks[l].attn.W_O.detach()[h] @ W_U
    assert set(sp.ov(l, h).topk_pairs(15).pairs()) == dense_topk(OV, 15)
    sp2 = EmbeddingSpace(llama, read_basis="pinv", write_basis="pinv")
    torch.testing.assert_close(sp2.R, torch.linalg.pinv(W_U), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(sp2.W, torch.linalg.pinv(W_E), rtol=1e-3, atol=1e-4)
    # pinv(W_U) is a right inverse: reading a hidden state's scores back recovers it
    x = torch.randn(llama.cfg.d_model)
    torch.testing.assert_close((x @ W_U) @ sp2.R, x, rtol=1e-3, atol=1e-3)


# -- FactoredMatrix interop -------------------------------------------------------------------------

def test_factored_matrix_interop(llama):
    sp = EmbeddingSpace(llama, read_basis="full-circuit", write_basis="full-circuit")
    for l, h in [(0, 1), (1, 2)]:
        fm_tl = llama.W_E @ llama.OV[l, h] @ llama.W_U  # TransformerLens's own full OV circuit
        ours = sp.ov(l, h).factored
        torch.testing.assert_close(ours.A, fm_tl.A.detach())
        torch.testing.assert_close(ours.B, fm_tl.B.detach())
        eig = fm_tl.eigenvalues.detach()
        expected = float(eig.real.sum() / eig.abs().sum())
        assert sp.ov(l, h).copying_score() == pytest.approx(expected, rel=1e-4, abs=1e-5)
        fm_qk = llama.W_E @ llama.QK[l, h] @ llama.W_E.T
        torch.testing.assert_close(sp.qk(l, h).factored.AB, fm_qk.AB.detach(), rtol=1e-4, atol=1e-5)
    scores = sp.copying_scores()
    assert scores.shape == (llama.cfg.n_layers, llama.cfg.n_heads)
    assert float(scores[1, 2]) == pytest.approx(sp.ov(1, 2).copying_score(), abs=1e-5)


# -- planted copying head ---------------------------------------------------------------------------

def test_planted_copying_head():
    m = tiny.build(tiny.TINY_GPT2, n_layers=1, n_heads=2, d_head=32, d_vocab=50, seed=4)
    with torch.no_grad():
        m.unembed.W_U.copy_(m.embed.W_E.T)
        # W_V W_O = M M^T on the top-32 embedding directions: the OV circuit is a Gram matrix
        _, _, Vh = torch.linalg.svd(m.W_E.detach(), full_matrices=False)
        M = Vh[:32].T
        m.blocks[0].attn.W_V[1].copy_(M)
        m.blocks[0].attn.W_O[1].copy_(M.T)
    sp = EmbeddingSpace(m)
    ov = sp.ov(0, 1)
    top = ov.topk_pairs(10)
    assert all(i == j for i, j in top.pairs())
    dense = m.W_E.detach() @ M @ M.T @ m.W_U.detach()
    expected = (dense.argmax(1) == torch.arange(50)).float().mean().item()
    assert ov.top1_diag_accuracy() == pytest.approx(expected)
    assert expected > 0.95
    assert ov.copying_score() == pytest.approx(1.0, abs=1e-5)
    assert sp.ov(0, 0).copying_score() < 0.9  # the random head does not copy


# -- GQA and gated MLPs ------------------------------------------------------------------------------

def test_gqa_and_gated_mlp(llama):
    sp = EmbeddingSpace(llama)
    W_E, W_U = llama.W_E.detach(), llama.W_U.detach()
    attn = llama.blocks[1].attn
    assert llama.cfg.n_key_value_heads < llama.cfg.n_heads
    for h in range(llama.cfg.n_heads):
        WV = kv_weight(llama, 1, "V", h)
        WK = kv_weight(llama, 1, "K", h)
        OV = W_E @ WV @ attn.W_O.detach()[h] @ W_U
        QK = W_E @ attn.W_Q.detach()[h] @ WK.T @ W_E.T
        torch.testing.assert_close(sp.ov(1, h).factored.AB, OV, rtol=1e-4, atol=1e-5)
        assert set(sp.qk(1, h).topk_pairs(10).pairs()) == dense_topk(QK, 10)
    W_gate = llama.blocks[0].mlp.W_gate.detach()
    torch.testing.assert_close(sp.ff_gate(0, 5, k=4).top_values, (W_E @ W_gate[:, 5]).sort(descending=True).values[:4])
    # find_neurons over every layer in one product = the dense scores of every neuron
    t = 11
    gates = torch.cat([W_E[t] @ llama.blocks[l].mlp.W_gate.detach() for l in range(2)])
    hits = sp.find_neurons(t, k=5, kind="gate")
    assert (hits.layers * llama.cfg.d_mlp + hits.units).tolist() == torch.argsort(-gates, stable=True)[:5].tolist()
    values = torch.cat([llama.blocks[l].mlp.W_out.detach() @ W_U[:, t] for l in range(2)])
    hits = sp.find_neurons(t, k=5)
    torch.testing.assert_close(hits.values, values.sort(descending=True).values[:5])
    # find_heads: OV entry (src, dst) of every head in one product
    s, d = 3, 8
    dense = torch.stack([torch.stack([
        (W_E @ kv_weight(llama, l, "V", h) @ llama.blocks[l].attn.W_O.detach()[h] @ W_U)[s, d]
        for h in range(4)]) for l in range(2)])
    heads = sp.find_heads(s, d, k=8)
    torch.testing.assert_close(heads.values, dense.flatten().sort(descending=True).values)
    order = torch.argsort(-dense.flatten(), stable=True)
    assert (heads.layers * 4 + heads.units).tolist() == order.tolist()
    heads = sp.find_heads(s, d, k=3)
    assert (heads.layers * 4 + heads.units).tolist() == order[:3].tolist()
    torch.testing.assert_close(heads.values, dense.flatten()[order[:3]])
    assert heads.to_frame().columns.tolist() == ["rank", "layer", "head", "value"]


def test_find_neurons_and_heads_ties_go_to_the_smaller_index():
    """Integer weights make the scores exact integers with many ties at the k-th value: the ids must
    be those of a stable descending argsort of the dense scores (torch.topk alone picks any tie)."""
    m = tiny.build(tiny.TINY_GPT2, n_layers=3, d_vocab=40, seed=5)
    g = torch.Generator().manual_seed(0)
    cfg = m.cfg

    def ints(*shape):
        return torch.randint(-1, 2, shape, generator=g).float()

    with torch.no_grad():
        m.embed.W_E.copy_(ints(cfg.d_vocab, cfg.d_model))
        m.unembed.W_U.copy_(m.embed.W_E.T)
        for block in m.blocks:
            block.mlp.W_out.copy_(ints(cfg.d_mlp, cfg.d_model))
            # three distinct head patterns shared by the heads: equal OV entries across heads
            pats = [(ints(cfg.d_model, cfg.d_head), ints(cfg.d_head, cfg.d_model)) for _ in range(3)]
            for h in range(cfg.n_heads):
                block.attn.W_V[h].copy_(pats[h % 3][0])
                block.attn.W_O[h].copy_(pats[h % 3][1])
    sp = EmbeddingSpace(m)
    E = m.W_U.detach()
    n_checked = 0
    for t in (0, 7, 21):
        dense = torch.cat([m.blocks[l].mlp.W_out.detach() @ E[:, t] for l in range(cfg.n_layers)])
        assert torch.equal(dense, dense.round())
        for mode in ("largest", "smallest", "abs"):
            key = dense.abs() if mode == "abs" else (-dense if mode == "smallest" else dense)
            for k in (1, 5, 37, 200):
                hits = sp.find_neurons(t, k=k, mode=mode)
                want = torch.argsort(-key, stable=True)[:k]
                assert (hits.layers * cfg.d_mlp + hits.units).tolist() == want.tolist()
                assert torch.equal(hits.values, dense[want])
                n_checked += int((key == key[want[-1]]).sum()) > 1  # k-th value shared
    assert n_checked > 20  # the cases really have ties at the boundary
    s, d = 3, 8
    heads_dense = torch.stack([torch.stack([
        (E.T @ m.blocks[l].attn.W_V.detach()[h] @ m.blocks[l].attn.W_O.detach()[h] @ E)[s, d]
        for h in range(cfg.n_heads)]) for l in range(cfg.n_layers)]).flatten()
    for mode in ("largest", "smallest", "abs"):
        key = heads_dense.abs() if mode == "abs" else (-heads_dense if mode == "smallest" else heads_dense)
        for k in (1, 2, 4, 5):
            heads = sp.find_heads(s, d, k=k, mode=mode)
            want = torch.argsort(-key, stable=True)[:k]
            assert (heads.layers * cfg.n_heads + heads.units).tolist() == want.tolist()
            assert torch.equal(heads.values, heads_dense[want])


def test_rank_matches_stable_argsort_on_integer_scores():
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        n = int(torch.randint(1, 80, (1,), generator=g))
        k = int(torch.randint(1, n + 5, (1,), generator=g))
        scores = torch.randint(-3, 4, (n,), generator=g).float()
        for mode in ("largest", "smallest", "abs"):
            key = scores.abs() if mode == "abs" else (-scores if mode == "smallest" else scores)
            want = torch.argsort(-key, stable=True)[:k]
            layers, units, vals = EmbeddingSpace._rank(scores, k, mode, 6)
            assert (layers * 6 + units).tolist() == want.tolist()
            assert torch.equal(vals, scores[want])


# -- results -----------------------------------------------------------------------------------------

def test_results_frames_and_html(gpt2_tied):
    sp = EmbeddingSpace(gpt2_tied)
    r = sp.ff_value(0, 1, k=3)
    df = r.to_frame()
    assert list(df.columns) == ["side", "rank", "token", "id", "score"] and len(df) == 6
    assert "<table" in r._repr_html_() and "read_basis=paper" in r._repr_html_()
    p = sp.ov(0, 0).topk_pairs(4)
    assert p.to_frame()["rank"].tolist() == [1, 2, 3, 4]
    v = torch.randn(gpt2_tied.cfg.d_model)
    pr = sp.project(v, k=4)
    torch.testing.assert_close(pr.top_values, (v @ gpt2_tied.W_U.detach()).sort(descending=True).values[:4])
    pr = sp.project(v, k=4, side="read")
    torch.testing.assert_close(pr.bottom_values, (gpt2_tied.W_U.detach().T @ v).sort().values[:4])


# -- bad input ---------------------------------------------------------------------------------------

def test_bad_input(gpt2_tied, llama, monkeypatch):
    sp = EmbeddingSpace(gpt2_tied)
    if sp.tokenizer is not None:  # a bridge comes with a (word-level) tokenizer: strings work ...
        assert sp.find_neurons("w5", k=3).units.tolist() == sp.find_neurons(5, k=3).units.tolist()
        monkeypatch.setattr(gpt2_tied, "tokenizer", None)  # ... and the refusals below need none
        sp = EmbeddingSpace(gpt2_tied)
        assert sp.tokenizer is None
    with pytest.raises(IndexError, match="layer: got 3"):
        sp.ov(3, 0)
    with pytest.raises(IndexError, match="head: got 4"):
        sp.qk(0, 4)
    with pytest.raises(IndexError, match="neuron: got 256"):
        sp.ff_value(0, 256)
    with pytest.raises(IndexError, match="token: id 50 is not in the vocabulary"):
        sp.embedding(50)
    with pytest.raises(ValueError, match="no tokenizer"):
        sp.find_neurons("hello")
    with pytest.raises(ValueError, match="k: got 0"):
        sp.ov(0, 0).topk_pairs(0)
    with pytest.raises(ValueError, match="k: got -1"):
        sp.ff_value(0, 0, k=-1)
    with pytest.raises(UnsupportedModelError, match="tied embeddings"):
        EmbeddingSpace(llama, read_basis="paper")
    with pytest.raises(ValueError, match="read_basis: got 'E'"):
        EmbeddingSpace(llama, read_basis="E")
    with pytest.raises(ValueError, match="ln: got 'fold'"):
        EmbeddingSpace(llama, ln="fold")
    moe = types.SimpleNamespace(cfg=types.SimpleNamespace(num_experts=8))
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        EmbeddingSpace(moe)
    with pytest.raises(UnsupportedModelError, match="not gated"):
        sp.ff_gate(0, 0)
    with pytest.raises(ValueError, match="filters: unknown filter"):
        EmbeddingSpace(gpt2_tied, filters="emoji")
    with pytest.raises(ValueError, match="needs token strings"):
        EmbeddingSpace(gpt2_tied, filters="ascii")


def test_processed_weights_warn_under_raw():
    m = tiny.build(tiny.TINY_GPT2, n_layers=1, d_vocab=40, seed=2)
    record_processing(m, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=False)
    with pytest.warns(ProcessedWeightsWarning, match="processed"):
        sp = EmbeddingSpace(m, ln="raw")
    assert "fold_ln" in sp.basis["weights"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp = EmbeddingSpace(m, ln="as_loaded")
    assert sp.ov(0, 0).topk_pairs(3).basis["ln"] == "as_loaded"


def test_plugin_registered_and_enable_records_config(gpt2_tied):
    names = {p.name for p in tl_plugins.list_plugins()}
    assert "embedspace" in names
    from tl_embedspace.config import space_for

    with tl_plugins.enabled(gpt2_tied, "embedspace", read_basis="full-circuit", write_basis="unembed"):
        sp = space_for(gpt2_tied)
        assert (sp.read_basis, sp.write_basis) == ("full-circuit", "unembed")
    assert space_for(gpt2_tied).read_basis == "paper"
    with pytest.raises(ValueError, match="read_basis: got 'x'"):
        tl_plugins.enable(gpt2_tied, "embedspace", read_basis="x")
