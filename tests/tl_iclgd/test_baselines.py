"""Untrained baselines: deterministic under a seed, the caller's RNG untouched, embeddings copied."""

import pytest
import torch

from tl_iclgd.baselines import untrained_like


def test_untrained_is_deterministic_and_leaves_global_rng(llama3):
    state = torch.random.get_rng_state()
    a = untrained_like(llama3, "none", seed=3)
    b = untrained_like(llama3, "none", seed=3)
    c = untrained_like(llama3, "none", seed=4)
    assert torch.equal(state, torch.random.get_rng_state())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn._W_K"], sc["blocks.0.attn._W_K"])
    assert not torch.equal(sa["embed.W_E"], llama3.state_dict()["embed.W_E"])
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(a(x), b(x))


def test_untrained_weights_are_initialised_even_when_the_loader_disabled_init(gpt3):
    import copy

    src = copy.deepcopy(gpt3)
    src.cfg.init_weights = False  # what real-weight loaders set
    u = untrained_like(src, "none", seed=0)
    for n, p in u.named_parameters():
        assert torch.isfinite(p).all(), n
        if "W_" in n:
            assert 0 < float(p.detach().std()) < 1, n


def test_trained_embeddings_copied_rest_random(gpt3):
    e = untrained_like(gpt3, "embeddings", seed=0)
    src = dict(gpt3.named_parameters())
    # embeddings, unembedding and every norm of the 3-layer GPT-2-like model, written out
    kept = {"embed.W_E", "pos_embed.W_pos", "unembed.W_U", "unembed.b_U", "ln_final.w", "ln_final.b"}
    kept |= {f"blocks.{layer}.{ln}.{wb}" for layer in range(3) for ln in ("ln1", "ln2") for wb in ("w", "b")}
    assert kept <= set(src)
    for n, p in e.named_parameters():
        if n in kept:
            assert torch.equal(p, src[n]), n
        elif "W_" in n:
            assert not torch.equal(p, src[n]), n


def test_bad_keep(llama3):
    with pytest.raises(ValueError, match="keep: got 'all'"):
        untrained_like(llama3, "all")
