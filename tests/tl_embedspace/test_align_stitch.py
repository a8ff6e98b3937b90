"""A model in a rotated residual basis: exact identities for alignment and stitching."""

from __future__ import annotations

import copy

import pytest
import torch

from tl_embedspace import EmbeddingSpace
from tl_embedspace.align import align, embedding_correlation, gram_matrices
from tl_embedspace.stitch import collect_hidden, stitched_forward, translator
from tl_plugins.backends.bridge import is_bridge
from tl_plugins.models import tiny


def rotate(model, Q):
    """Model b = model a with residual basis x -> x Q (exactly equivalent: RMSNorm scales are 1)."""
    m = copy.deepcopy(model)
    Qt = Q.T
    with torch.no_grad():
        m.embed.W_E.copy_(m.embed.W_E @ Q)
        m.unembed.W_U.copy_(Qt @ m.unembed.W_U)
        for b in m.blocks:
            a = b.attn
            for p in (a.W_Q, a._W_K, a._W_V):
                p.copy_(torch.einsum("md,hdk->hmk", Qt, p))
            a.W_O.copy_(a.W_O @ Q)
            a.b_O.copy_(a.b_O @ Q)
            b.mlp.W_in.copy_(Qt @ b.mlp.W_in)
            b.mlp.W_gate.copy_(Qt @ b.mlp.W_gate)
            b.mlp.W_out.copy_(b.mlp.W_out @ Q)
            b.mlp.b_out.copy_(b.mlp.b_out @ Q)
            assert torch.all(b.ln1.w == 1) and torch.all(b.ln2.w == 1)
    return m


def rotate_bridge(m, Q):
    """The same rotation on a TransformerBridge ``m`` (in place), through its Hugging Face Llama's
    weights ([out, in] layout): what reads the residual stream gets ``weight @ Q``, what writes it
    ``Q^T @ weight``. The bridge's W_E/W_U/W_Q/... are read off these modules."""
    hf = m.original_model
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(hf.model.embed_tokens.weight @ Q)
        hf.lm_head.weight.copy_(hf.lm_head.weight @ Q)
        for layer in hf.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj):
                lin.weight.copy_(lin.weight @ Q)
            for lin in (a.o_proj, mlp.down_proj):
                lin.weight.copy_(Q.T @ lin.weight)
                assert lin.bias is None
            assert torch.all(layer.input_layernorm.weight == 1) and torch.all(layer.post_attention_layernorm.weight == 1)
        assert torch.all(hf.model.norm.weight == 1)
    return m


@pytest.fixture(scope="module")
def pair():
    a = tiny.build(tiny.TINY_LLAMA, n_layers=5, seed=7)
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(a.cfg.d_model, a.cfg.d_model, generator=g, dtype=torch.float64))
    Q = Q.float()
    if is_bridge(a):  # a second bridge of the same seed, not a deep copy (which shares capture hooks)
        return a, rotate_bridge(tiny.build(tiny.TINY_LLAMA, n_layers=5, seed=7), Q), Q
    return a, rotate(a, Q), Q


def test_rotation_is_exact(pair):
    a, b, _ = pair
    toks = torch.randint(0, a.cfg.d_vocab, (1, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(b(toks), a(toks), rtol=1e-4, atol=1e-4)


def test_embedding_space_correlation_is_one(pair):
    a, b, _ = pair
    sa, sb = EmbeddingSpace(a), EmbeddingSpace(b)
    Xa, Xb = a.blocks[2].mlp.W_out.detach(), b.blocks[2].mlp.W_out.detach()
    corr = embedding_correlation(Xa, Xb, gram_matrices(sa.W, sb.W))
    torch.testing.assert_close(corr.diag(), torch.ones(Xa.shape[0], dtype=torch.float64), rtol=0, atol=1e-5)
    # the kernel trick equals the correlation of the vocab-sized projections computed densely
    pa, pb = Xa[:5] @ sa.W, Xb[:7] @ sb.W
    dense = torch.corrcoef(torch.cat([pa, pb]).double())[:5, 5:]
    torch.testing.assert_close(corr[:5, :7], dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["ff_values", "ff_keys", "W_V"])
def test_hungarian_recovers_identity_in_embedding_space_only(pair, kind):
    a, b, _ = pair
    res = align(EmbeddingSpace(a), EmbeddingSpace(b), kind=kind)
    assert res.diagonal_recovered("embedding")
    assert not res.diagonal_recovered("feature")
    assert res.to_frame().shape[0] == a.cfg.n_layers
    best = align(EmbeddingSpace(a), EmbeddingSpace(b), kind=kind, stat="max_abs")
    torch.testing.assert_close(best.S_embedding.diag(), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-5)


def test_pinv_translator_is_the_rotation_and_stitching_is_exact(pair):
    a, b, Q = pair
    sa, sb = EmbeddingSpace(a), EmbeddingSpace(b)
    T = translator(sa, sb, "pinv")
    torch.testing.assert_close(T.T, Q, rtol=1e-4, atol=1e-4)  # h_b = h_a Q
    back = translator(sb, sa, "pinv")
    torch.testing.assert_close(back.T, Q.T, rtol=1e-4, atol=1e-4)  # and the inverse rotation back
    toks = torch.randint(0, a.cfg.d_vocab, (2, 10), generator=torch.Generator().manual_seed(2))
    logits = stitched_forward(a, b, toks, 1, 1, T)
    torch.testing.assert_close(logits, a(toks), rtol=1e-4, atol=1e-4)
    # least squares on paired hidden states finds the same map
    ha, hb = collect_hidden(a, toks, 2), collect_hidden(b, toks, 2)
    ls = translator(sa, sb, "lstsq", hidden_a=ha, hidden_b=hb)
    torch.testing.assert_close(ls(ha), hb, rtol=1e-3, atol=1e-3)
    tr = translator(sa, sb, "transpose")
    assert tr.T.shape == (a.cfg.d_model, b.cfg.d_model)


def test_mismatched_vocabularies_are_refused(pair, gpt2_tied):
    a, _, _ = pair
    with pytest.raises(ValueError, match="vocabularies differ"):
        align(EmbeddingSpace(a), EmbeddingSpace(gpt2_tied))
    with pytest.raises(ValueError, match="vocabularies differ"):
        translator(EmbeddingSpace(a), EmbeddingSpace(gpt2_tied))
    with pytest.raises(ValueError, match="kind: got 'W_X'"):
        align(EmbeddingSpace(a), EmbeddingSpace(a), kind="W_X")
    with pytest.raises(ValueError, match="lstsq' needs hidden_a"):
        translator(EmbeddingSpace(a), EmbeddingSpace(a), "lstsq")
