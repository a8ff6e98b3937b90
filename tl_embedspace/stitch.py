"""Translating hidden states between two models that share a vocabulary, and a stitched forward pass.

A hidden state ``h_a [..., d_a]`` of model a reads as token scores ``h_a E_a`` (``E = [d_model,
d_vocab]``, the write basis). A translator ``T [d_a, d_b]`` maps it into model b's residual space:

    "pinv":      T = E_a pinv(E_b)          (scores of a, read back through b's embedding; the paper's)
    "transpose": T = E_a E_b^T              (E^T in place of a right-inverse, unnormalised)
    "lstsq":     T = argmin ||H_a T - H_b|| (paired hidden states of both models on the same tokens)

For a model b that is model a in a rotated residual basis (``E_b = Q^T E_a``), "pinv" gives exactly
``T = Q``. ``stitched_forward`` runs model a up to a layer, translates, and lets model b continue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tl_embedspace.align import check_shared_vocabulary
from tl_plugins.backends import detect
from tl_plugins.checks import check_index

METHODS = ("pinv", "transpose", "lstsq")


def pinv_translator(E_a: torch.Tensor, E_b: torch.Tensor) -> torch.Tensor:
    """``E_a [d_a, V] @ pinv(E_b) [V, d_b] -> [d_a, d_b]`` (computed in float64)."""
    return (E_a.double() @ torch.linalg.pinv(E_b.double())).to(E_a.dtype)


def transpose_translator(E_a: torch.Tensor, E_b: torch.Tensor) -> torch.Tensor:
    """``E_a [d_a, V] @ E_b^T [V, d_b] -> [d_a, d_b]``."""
    return E_a @ E_b.T


def lstsq_translator(H_a: torch.Tensor, H_b: torch.Tensor) -> torch.Tensor:
    """Least-squares ``T [d_a, d_b]`` with ``H_a [n, d_a] @ T ~ H_b [n, d_b]``."""
    if H_a.shape[0] != H_b.shape[0]:
        raise ValueError(f"hidden_a, hidden_b: need paired rows; got {H_a.shape[0]} and {H_b.shape[0]}")
    return torch.linalg.lstsq(H_a.double(), H_b.double()).solution.to(H_a.dtype)


@dataclass
class Translator:
    """A linear map ``T [d_a, d_b]`` from model a's residual space to model b's."""

    method: str
    T: torch.Tensor
    basis: dict = field(default_factory=dict)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """Translate ``h [..., d_a] -> [..., d_b]``."""
        return h.to(self.T.dtype) @ self.T

    def to_frame(self):
        import pandas as pd

        s = torch.linalg.svdvals(self.T.double())
        return pd.DataFrame([{"method": self.method, "d_a": self.T.shape[0], "d_b": self.T.shape[1],
                              "sigma_max": float(s.max()), "sigma_min": float(s.min())}])

    def _repr_html_(self) -> str:
        return self.to_frame().to_html(index=False)


def translator(space_a: Any, space_b: Any, method: str = "pinv", *, hidden_a: torch.Tensor | None = None,
               hidden_b: torch.Tensor | None = None) -> Translator:
    """A translator from ``space_a``'s model to ``space_b``'s (``EmbeddingSpace`` objects).

    "lstsq" needs ``hidden_a [n, d_a]`` and ``hidden_b [n, d_b]``: hidden states of both models at
    the same token positions (e.g. from ``collect_hidden``).
    """
    check_shared_vocabulary(space_a, space_b)
    if method == "pinv":
        T = pinv_translator(space_a.W, space_b.W)
    elif method == "transpose":
        T = transpose_translator(space_a.W, space_b.W)
    elif method == "lstsq":
        if hidden_a is None or hidden_b is None:
            raise ValueError("method: 'lstsq' needs hidden_a and hidden_b (paired hidden states)")
        T = lstsq_translator(hidden_a.reshape(-1, hidden_a.shape[-1]), hidden_b.reshape(-1, hidden_b.shape[-1]))
    else:
        raise ValueError(f"method: got {method!r}; accepted: {', '.join(METHODS)}")
    return Translator(method, T, {"a": space_a.basis, "b": space_b.basis})


def collect_hidden(model: Any, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """``blocks.{layer}.hook_resid_post`` of ``model`` on ``tokens``: ``[batch, pos, d_model]``."""
    backend = detect(model)
    layer = check_index(layer, backend.n_layers, "layer")
    store: dict[str, torch.Tensor] = {}

    def keep(x, hook):
        store["h"] = x.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(backend.hook_name("resid_post", layer), keep)],
                             stop_at_layer=layer + 1)
    return store["h"]


def stitched_forward(model_a: Any, model_b: Any, tokens: torch.Tensor, layer_a: int, layer_b: int,
                     translate: Translator) -> torch.Tensor:
    """Logits ``[batch, pos, d_vocab]`` of model a's layers ``0..layer_a``, the translator, then model
    b's layers ``layer_b+1..`` and unembedding.

    Model b runs with a temporary hook that replaces ``blocks.{layer_b}.hook_resid_post`` with the
    translated state (hooks are removed afterwards; neither model is modified).
    """
    backend_a, backend_b = detect(model_a), detect(model_b)
    if backend_a.d_vocab != backend_b.d_vocab:
        raise ValueError(f"models: vocabularies differ ({backend_a.d_vocab} vs {backend_b.d_vocab})")
    layer_b = check_index(layer_b, backend_b.n_layers, "layer_b")
    h_a = collect_hidden(model_a, tokens, layer_a)
    h_b = translate(h_a)
    if h_b.shape[-1] != backend_b.d_model:
        raise ValueError(f"translate: produces width {h_b.shape[-1]}, model b has d_model {backend_b.d_model}")

    def replace(x, hook):
        return h_b.to(x.dtype)

    with torch.no_grad():
        return model_b.run_with_hooks(tokens, fwd_hooks=[(backend_b.hook_name("resid_post", layer_b), replace)])
