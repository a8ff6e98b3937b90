"""Sanity on the real SmolLM2-135M-Instruct (slow): induction heads from activations, copying heads from
the eigenvalue copying score vs copying measured from activations, tokens with visible spaces."""

from __future__ import annotations

import pytest
import torch

from tl_embedspace import EmbeddingSpace

pytestmark = pytest.mark.slow

T = 50


@pytest.fixture(scope="module")
def run(smollm2):
    """A repeated random-token sequence and, per head, induction and activation-copying scores."""
    g = torch.Generator().manual_seed(0)
    half = torch.randint(1000, 20000, (1, T), generator=g)
    toks = torch.cat([half, half], 1)
    names = lambda n: n.endswith("hook_pattern") or n.endswith("hook_z")
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(toks, names_filter=names)
    L, H = smollm2.cfg.n_layers, smollm2.cfg.n_heads
    induction, act_copy = torch.zeros(L, H), torch.zeros(L, H)
    q = torch.arange(T, 2 * T)
    W_U = smollm2.W_U.detach()
    for l in range(L):
        p = cache[f"blocks.{l}.attn.hook_pattern"][0]  # [head, q, k]
        induction[l] = p[:, q, q - T + 1].mean(-1)
        # copying from activations: z-scored direct logit of the most attended token
        out = torch.einsum("phd,hdm->hpm", cache[f"blocks.{l}.attn.hook_z"][0][q], smollm2.blocks[l].attn.W_O.detach())
        logits = out @ W_U
        z = (logits - logits.mean(-1, keepdim=True)) / logits.std(-1, keepdim=True)
        src = toks[0][p[:, q].argmax(-1)]
        act_copy[l] = z.gather(-1, src[..., None]).squeeze(-1).mean(-1)
    return induction, act_copy


def test_known_induction_heads(run):
    induction, _ = run
    top = [divmod(int(i), 9) for i in torch.argsort(-induction.flatten())[:5]]
    assert top[0] == (18, 6)
    assert (17, 4) in top


def test_copying_score_agrees_with_copying_from_activations(smollm2, run):
    _, act_copy = run
    sp = EmbeddingSpace(smollm2)
    scores = sp.copying_scores()
    order = torch.argsort(-scores.flatten())
    top, bottom = act_copy.flatten()[order[:20]], act_copy.flatten()[order[-20:]]
    assert top.mean() > act_copy.mean() > bottom.mean()
    assert top.mean() - bottom.mean() > 0.3
    # the strongest induction head copies by both measures
    assert scores[18, 6] > 0.3 and act_copy[18, 6] > 0.5
    assert sp.ov(18, 6).copying_score() == pytest.approx(float(scores[18, 6]), abs=1e-4)


def test_tokens_and_visible_spaces(smollm2):
    sp = EmbeddingSpace(smollm2)
    assert sp.read_basis == "paper"  # SmolLM2 ties its embeddings
    t = sp.to_id(" Paris")
    assert sp.token_str(t) == "\u2423Paris" and sp.to_id("\u2423Paris") == t
    with pytest.raises(ValueError, match="not a single token"):
        sp.to_id(" Paris is")
    hits = sp.find_neurons(" Paris", k=3)
    dense = torch.cat([smollm2.blocks[l].mlp.W_out.detach() @ smollm2.W_U.detach()[:, t] for l in range(30)])
    assert (hits.layers * 1536 + hits.units).tolist() == torch.topk(dense, 3).indices.tolist()
    r = sp.ov(18, 6).topk_pairs(5, cols="words")
    assert all(tok.startswith("\u2423") for tok in r.col_tokens)
