"""A new model family is one new backend: a minimal third backend, written here, carries the plugins.

``ToyLM`` is a one-layer decoder in plain PyTorch (TransformerLens HookPoints where TL has them, no
TransformerLens model class). ``ToyBackend`` subclasses ``tl_plugins.backends.Backend`` and is
registered with ``register_backend``; then ``topk`` and the weight view work on it, the seam comes
off on disable, and unregistering makes the model unknown again (the error lists the backends).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from transformer_lens.hook_points import HookPoint

try:
    from transformer_lens import HookedRootModule
except ImportError:  # older layout
    from transformer_lens.hook_points import HookedRootModule

import tl_plugins
from tl_plugins import UnsupportedModelError
from tl_plugins.backends import Backend, detect, register_backend, unregister_backend
from tl_plugins.seams import SEAM_OWNER_ATTN, AttentionCall, ask_attention
from tl_plugins.state import set_instance_attr


class ToyConfig(types.SimpleNamespace):
    pass


class ToyAttention(torch.nn.Module):
    def __init__(self, d_model=32, n_heads=4, d_head=8):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        self.W_Q = torch.nn.Parameter(torch.randn(n_heads, d_model, d_head) / d_model**0.5)
        self.W_K = torch.nn.Parameter(torch.randn(n_heads, d_model, d_head) / d_model**0.5)
        self.W_V = torch.nn.Parameter(torch.randn(n_heads, d_model, d_head) / d_model**0.5)
        self.W_O = torch.nn.Parameter(torch.randn(n_heads, d_head, d_model) / d_head**0.5)
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()

    def qkv(self, x):
        return [torch.einsum("bpd,hde->bphe", x, w) for w in (self.W_Q, self.W_K, self.W_V)]

    def out(self, z):
        return torch.einsum("bphe,hed->bpd", z, self.W_O)

    def forward(self, x):
        q, k, v = self.qkv(x)
        n = x.shape[1]
        s = torch.einsum("bqhe,bkhe->bhqk", q, k) / self.d_head**0.5
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        p = self.hook_pattern(F.softmax(self.hook_attn_scores(s), -1))
        return self.out(torch.einsum("bhqk,bkhe->bqhe", p, v))


class ToyLM(HookedRootModule):
    def __init__(self, d_vocab=50, d_model=32):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(d_vocab, d_model)
            self.pos = torch.nn.Parameter(torch.randn(64, d_model))  # repeated tokens: no tied scores
            self.attn = ToyAttention(d_model)
            self.unembed_w = torch.nn.Parameter(torch.randn(d_model, d_vocab) / d_model**0.5)
        self.cfg = ToyConfig(n_layers=1, n_heads=4, d_model=d_model, d_head=8, d_mlp=None, d_vocab=d_vocab,
                             n_ctx=64, device="cpu", dtype=torch.float32, attn_only=True)
        self.setup()

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return (x + self.attn(x)) @ self.unembed_w


@dataclass
class ToyCall(AttentionCall):
    @property
    def scale(self) -> float:
        return self.module.d_head ** -0.5

    def dense_scores(self):
        n = self.q.shape[1]
        s = torch.einsum("bqhe,bkhe->bhqk", self.q, self.k) * self.scale
        return s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))


def _toy_seam_forward(self, x):
    q, k, v = self.qkv(x)
    call = ToyCall(module=self, layer=0, q=q, k=k, v=v, causal=True, past_kv_pos_offset=0, attention_mask=None,
                   additive_attention_mask=None, state=self.__dict__["_toy_state"])
    return self.out(ask_attention(call))


class ToyBackend(Backend):
    name = "toy"

    @classmethod
    def accepts(cls, model):
        return isinstance(model, ToyLM)

    def attention_modules(self):
        return [(0, self.model.attn)]

    def mlp_modules(self):
        return []

    def check_attention_supported(self, plugin):
        pass

    def install_attention_seam(self, model_state):
        attn = self.model.attn
        set_instance_attr(self.model, SEAM_OWNER_ATTN, attn, "_toy_state", model_state)
        set_instance_attr(self.model, SEAM_OWNER_ATTN, attn, "forward", types.MethodType(_toy_seam_forward, attn))

    def install_mlp_seam(self, model_state):
        pass  # attention-only: no MLP to wrap

    def final_norm(self, resid):
        return resid

    def unembed(self, x):
        return x @ self.model.unembed_w

    def attention_input_hook(self, layer):
        raise UnsupportedModelError("toy: no attention-input hook")

    def weight(self, name: str, layer: Optional[int] = None) -> Any:
        m = self.model
        table = {"W_E": m.embed.weight, "W_U": m.unembed_w, "b_U": torch.zeros(m.cfg.d_vocab), "W_pos": None,
                 "ln_final_w": None, "W_Q": m.attn.W_Q, "W_K": m.attn.W_K, "W_V": m.attn.W_V, "W_O": m.attn.W_O}
        if name in ("b_Q", "b_K", "b_V"):
            return torch.zeros(m.cfg.n_heads, m.cfg.d_head)
        if name == "b_O":
            return torch.zeros(m.cfg.d_model)
        return table[name]

    def processing(self):
        from tl_plugins.weights import Processing

        return Processing(False, False, False, False, "recorded")

    def attention_parameters(self, layer, letter):
        return {f"attn.W_{letter.upper()}": getattr(self.model.attn, f"W_{letter.upper()}")}

    def untrained_copy(self, *, seed, keep_embeddings):
        raise NotImplementedError

    def run(self, tokens, *, params=None, stop_at_layer=None, kv_cache=None):
        return self.functional_call(params, tokens)

    def prefix_cache(self, tokens, params=None):
        raise NotImplementedError

    def expand_cache(self, cache, batch):
        raise NotImplementedError


@pytest.fixture
def toy():
    register_backend(ToyBackend)
    try:
        yield ToyLM()
    finally:
        unregister_backend(ToyBackend)


def _topk_oracle(model, toks, k):
    def keep(s, hook):
        kth = s.topk(k, -1).values[..., -1:]
        return s.masked_fill(s < kth, float("-inf"))
    return model.run_with_hooks(toks, fwd_hooks=[("attn.hook_attn_scores", keep)])


def test_topk_runs_on_a_third_backend(toy):
    toks = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    assert isinstance(detect(toy), ToyBackend)
    ref = toy(toks)
    with tl_plugins.enabled(toy, "topk", k=1000):  # the host's dense path, not the toy's own ops
        torch.testing.assert_close(toy(toks), ref, atol=1e-6, rtol=1e-6)
    with tl_plugins.enabled(toy, "topk", k=3, backend="chunked"):
        out = toy(toks)
        with_hooks = _topk_oracle(toy, toks, 3)  # hooked route under the plugin: same selection
    torch.testing.assert_close(out, _topk_oracle(toy, toks, 3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_hooks, out, atol=1e-5, rtol=1e-5)
    assert "forward" not in vars(toy.attn) and "_toy_state" not in vars(toy.attn)
    assert torch.equal(toy(toks), ref)


def test_weight_view_and_refusals_on_a_third_backend(toy):
    w = tl_plugins.weights(toy)
    assert w.W_Q.shape == (1, 4, 32, 8) and torch.equal(w.W_U, toy.unembed_w.detach())
    w.W_Q.zero_()  # a copy: the model is untouched
    assert toy.attn.W_Q.abs().sum() > 0
    with pytest.raises(ValueError, match="ff_k: the model is attention-only"):
        tl_plugins.enable(toy, "topk", ff_k=4)
    assert tl_plugins.active(toy) == {} and "forward" not in vars(toy.attn)


def test_unregistered_backend_is_unknown_and_the_error_lists_backends():
    model = ToyLM()
    with pytest.raises(UnsupportedModelError, match="ToyLM.*accepted: .*HookedTransformer.*TransformerBridge"):
        detect(model)
    with pytest.raises(TypeError, match="subclass of tl_plugins.backends.Backend"):
        register_backend(object)
