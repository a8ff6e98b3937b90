"""Untrained baselines: deterministic under a seed, the caller's RNG untouched, embeddings copied."""

import pytest
import torch

from tl_iclgd.baselines import untrained_like
from tl_plugins.backends import detect

NO_HOOKED = ("transformer_lens.HookedTransformer cannot be imported (transformer-lens 4.x removed it), so the "
             "tiny models are TransformerBridges; this test checks HookedTransformer specifics")


def _tensors(model):
    """Every weight by name: ``state_dict()`` of a HookedTransformer; a bridge's parameters and buffers
    (its ``state_dict`` renames them)."""
    be = detect(model)
    if be.name == "hooked":
        return model.state_dict()
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def test_untrained_is_deterministic_and_leaves_global_rng(llama3):
    state = torch.random.get_rng_state()
    a = untrained_like(llama3, "none", seed=3)
    b = untrained_like(llama3, "none", seed=3)
    c = untrained_like(llama3, "none", seed=4)
    assert torch.equal(state, torch.random.get_rng_state())
    sa, sb, sc = _tensors(a), _tensors(b), _tensors(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    k_name = next(iter(detect(llama3).attention_parameters(0, "k")))  # blocks.0.attn._W_K when hooked
    assert not torch.equal(sa[k_name], sc[k_name])
    assert not torch.equal(detect(a).weight("W_E"), detect(llama3).weight("W_E"))
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(a(x), b(x))


def test_untrained_weights_are_initialised_even_when_the_loader_disabled_init(gpt3):
    import copy

    if detect(gpt3).name != "hooked":
        pytest.skip(NO_HOOKED + " (cfg.init_weights is a HookedTransformerConfig field)")
    src = copy.deepcopy(gpt3)
    src.cfg.init_weights = False  # what real-weight loaders set
    u = untrained_like(src, "none", seed=0)
    for n, p in u.named_parameters():
        assert torch.isfinite(p).all(), n
        if "W_" in n:
            assert 0 < float(p.detach().std()) < 1, n


def test_trained_embeddings_copied_rest_random(gpt3):
    if detect(gpt3).name != "hooked":
        pytest.skip(NO_HOOKED + " (parameter names; the bridge's copy is tested in test_bridge.py)")
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
