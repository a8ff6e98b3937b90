"""Shared fixtures for tl_iclgd tests: tiny random models (fast) and the real SmolLM2 (slow, session).

On transformer-lens 3.x the tiny models are HookedTransformers (as before); on 4.x, which has no
HookedTransformer, the same architectures come as TransformerBridges (Hugging Face init), so the
backend-neutral tests run on both legs. ``HOOKED`` says which leg this is.
"""

import copy
import weakref

import pytest
import torch

from tl_iclgd.tasks import TokenizedTask
from tl_iclgd.threads import torch_threads
from tl_plugins.backends.bridge import is_bridge
from tl_plugins.models import tiny

HOOKED = tiny.hooked_available()


_RECIPES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # bridge -> (kind, options)


def tiny_model(kind: str, **options):
    """A tiny ``kind`` ("llama" or "gpt2") model: HookedTransformer on 3.x, TransformerBridge on 4.x."""
    if HOOKED:
        return tiny.build(tiny.TINY_LLAMA if kind == "llama" else tiny.TINY_GPT2, **options)
    return tiny_bridge(kind, **options)


def tiny_bridge(kind: str, **options):
    """``tiny.tiny_bridge`` remembering how it was built (for :func:`twin` and :class:`HFTwin`)."""
    model = tiny.tiny_bridge(kind, **options)
    _RECIPES[model] = (kind, dict(options))
    return model


def twin(model):
    """An independent model with the same weights. A HookedTransformer is deep-copied; a bridge is built
    again from its recipe: a deep-copied TransformerBridge (3.9 and 4.3) keeps the original's capture
    hooks, so a gradient forward on the copy leaves autograd graphs on the *original's* attention
    modules (``_captured_pre_ln_residual``), after which the original cannot be deep-copied."""
    if not is_bridge(model):
        return copy.deepcopy(model)
    kind, options = _RECIPES[model]
    return tiny_bridge(kind, **options)


class HFTwin:
    """A plain Hugging Face model with a tiny bridge's weights (built again from the same seed, never
    booted), and the bridge's parameter names resolved to its tensors: the oracle for gradient steps.

    GPT-2's q/k/v (separate tensors on the bridge) are column blocks of the fused ``c_attn`` here, so
    training some of them is plain SGD on ``c_attn`` with the gradient masked to those columns.
    """

    def __init__(self, model):
        kind, options = _RECIPES[model]
        build = {k: v for k, v in options.items() if k not in ("device", "compatibility_mode")}
        self.kind = kind
        self.hf = tiny.hf_model(kind, **build)
        self.named = dict(self.hf.named_parameters())

    def resolve(self, bridge_name: str):
        """(HF parameter name, index into it, transposed?) holding the bridge parameter ``bridge_name``."""
        name = bridge_name.replace("._original_component", "")
        if name in self.named:
            return name, (...,), False
        if self.kind == "gpt2":
            prefix, proj, kind = name.rsplit(".", 2)
            d = self.hf.config.n_embd
            if proj in ("q", "k", "v"):
                i = "qkv".index(proj)
                cols = slice(i * d, (i + 1) * d)
                if kind == "weight":  # Conv1D [in, 3 out]; the bridge holds nn.Linear [out, in]
                    return f"{prefix}.c_attn.weight", (slice(None), cols), True
                return f"{prefix}.c_attn.bias", (cols,), False
            if proj in ("o", "qkv"):
                return f"{prefix}.{'c_proj' if proj == 'o' else 'c_attn'}.{kind}", (...,), False
        raise KeyError(f"no Hugging Face tensor for bridge parameter {bridge_name!r}")

    def tensor(self, bridge_name: str) -> torch.Tensor:
        """The bridge parameter's current value here, in the bridge's layout."""
        hf_name, index, transposed = self.resolve(bridge_name)
        t = self.named[hf_name].detach()[index]
        return (t.T if transposed else t).clone()

    def logits(self, toks: torch.Tensor) -> torch.Tensor:
        return self.hf(toks).logits

    def sgd(self, bridge_names, steps, lr: float) -> dict:
        """Plain SGD written out (torch.autograd.grad, then p -= lr * grad) on the HF tensors holding
        ``bridge_names``, the gradient masked to exactly those entries; ``steps`` yields a loss function
        of this twin per step. Returns the trained values in the bridge's layout."""
        masks: dict = {}
        for b in bridge_names:
            hf_name, index, _ = self.resolve(b)
            masks.setdefault(hf_name, torch.zeros_like(self.named[hf_name]))[index] = 1.0
        leaves = [self.named[n] for n in masks]
        for loss_fn in steps:
            grads = torch.autograd.grad(loss_fn(self), leaves, allow_unused=True)
            with torch.no_grad():
                for leaf, g, m in zip(leaves, grads, masks.values()):
                    if g is not None:
                        leaf -= lr * g * m
        return {b: self.tensor(b) for b in bridge_names}

    def layer_causal_logits(self, toks: torch.Tensor, readout: str = "resid_post") -> torch.Tensor:
        """[L, T, vocab]: layer-causal logit lens written out on the HF modules: every decoder layer's
        input detached (forward pre-hooks), each layer's output (or its second norm's input, for
        ``resid_mid``) read out through the final norm and the LM head."""
        llama = self.kind == "llama"
        layers = self.hf.model.layers if llama else self.hf.transformer.h
        norm = self.hf.model.norm if llama else self.hf.transformer.ln_f
        outs: dict = {}

        def cut(module, args, kwargs):
            if args:
                return (args[0].detach(), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

        handles = []
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(cut, with_kwargs=True))
            if readout == "resid_post":
                handles.append(layer.register_forward_hook(
                    lambda m, a, out, i=i: outs.__setitem__(i, out[0] if isinstance(out, tuple) else out)))
            else:
                ln2 = layer.post_attention_layernorm if llama else layer.ln_2
                handles.append(ln2.register_forward_pre_hook(lambda m, a, i=i: outs.__setitem__(i, a[0])))
        try:
            self.hf(toks)
        finally:
            for h in handles:
                h.remove()
        resid = torch.cat([outs[i] for i in range(len(layers))], dim=0)
        return self.hf.lm_head(norm(resid))


@pytest.fixture(scope="module")
def llama3():
    """3-layer Llama-like model: grouped-query attention (K/V live in _W_K/_W_V), rotary, RMSNorm."""
    return tiny_model("llama", n_layers=3, seed=1)


@pytest.fixture(scope="module")
def gpt3():
    """3-layer GPT-2-like model: LayerNorm, learned positions, biases."""
    return tiny_model("gpt2", n_layers=3, seed=2)


@pytest.fixture(scope="session")
def make_model():
    """The factory :func:`tiny_model`."""
    return tiny_model


@pytest.fixture(scope="session")
def make_twin():
    """The function :func:`twin`."""
    return twin


@pytest.fixture(scope="session")
def make_hf_twin():
    """The class :class:`HFTwin` (bridges built by :func:`tiny_model` / :func:`tiny_bridge` only)."""
    return HFTwin


@pytest.fixture(scope="session")
def make_tiny_bridge():
    """The factory :func:`tiny_bridge` (a bridge on either leg)."""
    return tiny_bridge


def id_task(d_vocab: int = 90, n_demos: int = 4, n_queries: int = 6, seed: int = 0) -> TokenizedTask:
    """A token-copy task on raw ids (x, 3) -> x with prompts of varying length."""
    g = torch.Generator().manual_seed(seed)

    def pair(i):
        n = 1 + i % 3
        x = torch.randint(10, d_vocab, (n,), generator=g).tolist()
        return (x + [3], [x[-1]])
    return TokenizedTask.from_ids([pair(i) for i in range(n_demos)], [pair(i) for i in range(n_queries)])


@pytest.fixture(scope="session")
def smollm2():
    from tl_plugins.models import load

    return load("smollm2-135m")


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: much faster than two on the shared 2-core test machine."""
    with torch_threads(1):
        yield


@pytest.fixture
def make_task():
    """The factory :func:`id_task` (test folders have no __init__.py, so tests take it as a fixture)."""
    return id_task
