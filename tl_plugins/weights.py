"""``tl_plugins.weights(model)``: one read-only view of a model's weights, in TransformerLens layout.

Grouped K/V heads are expanded to one entry per query head, absent biases are zeros, and the view
records how the weights were processed (layer-norm folding, centering), because projections into
vocabulary space and gradient steps depend on the parameterisation. Plugins read weights only
through this view, so a new backend is one new file.

Shapes (L = n_layers, H = n_heads, Hkv = n_key_value_heads):
    W_E [d_vocab, d_model]         W_U [d_model, d_vocab]          W_pos [n_ctx, d_model] or None
    W_Q, W_K, W_V [L, H, d_model, d_head]     W_O [L, H, d_head, d_model]
    b_Q, b_K, b_V [L, H, d_head]              b_O [L, d_model]
    W_in [L, d_model, d_mlp]   W_gate [L, d_model, d_mlp] or None   W_out [L, d_mlp, d_model]
    b_in [L, d_mlp]            b_out [L, d_model]
Every tensor is detached (no autograd history) and cloned on access, so writing to it cannot
change the model; the copy is on the model's device (``cfg.device``), so a model whose layers sit
on different devices gives readouts that combine without moving anything.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Optional

import torch
from jaxtyping import Float

from tl_plugins import backends as _backends
from tl_plugins.checks import check_index
from tl_plugins.errors import UnsupportedModelError
from tl_plugins.processing import Processing, infer_processing, record_processing  # noqa: F401 - re-exported


class WeightView:
    """Read-only, backend-independent access to a TransformerLens model's weights (see module doc)."""

    def __init__(self, model: Any):
        self._backend = _backends.detect(model)
        self._model = model
        self.cfg = model.cfg

    @property
    def backend(self) -> Any:
        """The model's backend (``tl_plugins.backends``): where these weights are read from."""
        return self._backend

    @cached_property
    def processing(self) -> Processing:
        """How the weights were processed; read off W_E/W_U on first access only (a vocab-sized scan)."""
        return self._backend.processing()

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self._backend.n_layers

    @property
    def n_heads(self) -> int:
        return self._backend.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self._backend.n_kv_heads

    @property
    def d_model(self) -> int:
        return self._backend.d_model

    @property
    def d_head(self) -> int:
        return self._backend.d_head

    @property
    def d_mlp(self) -> Optional[int]:
        return self._backend.d_mlp

    @property
    def d_vocab(self) -> int:
        return self._backend.d_vocab

    @property
    def gated_mlp(self) -> bool:
        return self._backend.gated_mlp

    @property
    def tied(self) -> bool:
        """True when W_U equals W_E^T exactly (tied embeddings, not centred apart)."""
        W_E, W_U = self._backend.weight("W_E"), self._backend.weight("W_U")
        return W_E.shape == W_U.T.shape and bool(torch.equal(W_E.detach(), W_U.detach().T))

    # -- helpers -------------------------------------------------------------------------------
    def _out(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        # a copy on the model's device (cfg.device, where the embedding and the tokens sit): a model
        # split over devices (HookedTransformer's n_devices, a bridge's device map) keeps each
        # layer where it is, and every readout still meets every other one on one device
        return None if t is None else t.detach().to(device=self._backend.device, copy=True)

    def _check_layer(self, layer: Any) -> int:
        return check_index(layer, self.n_layers, "layer")

    def _layer_weight(self, name: str, layer: int) -> Optional[torch.Tensor]:
        if name in _MLP_WEIGHTS and self.d_mlp is None:
            raise UnsupportedModelError("model: attention-only model (cfg.attn_only=True) has no MLP weights")
        return self._out(self._backend.weight(name, self._check_layer(layer)))

    def _stack(self, fn) -> torch.Tensor:
        return torch.stack([fn(layer) for layer in range(self.n_layers)])

    # -- embeddings ----------------------------------------------------------------------------
    @property
    def W_E(self) -> Float[torch.Tensor, "d_vocab d_model"]:
        return self._out(self._backend.weight("W_E"))

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
        return self._out(self._backend.weight("W_U"))

    @property
    def b_U(self) -> Float[torch.Tensor, " d_vocab"]:
        return self._out(self._backend.weight("b_U"))

    @property
    def W_pos(self) -> Optional[Float[torch.Tensor, "n_ctx d_model"]]:
        return self._out(self._backend.weight("W_pos"))

    # -- per layer: W_Q_layer(l) ... b_out_layer(l) are defined below ---------------------------
    @property
    def W_gate(self) -> Optional[Float[torch.Tensor, "n_layers d_model d_mlp"]]:
        return self._stack(self.W_gate_layer) if self.gated_mlp else None

    # -- norms ---------------------------------------------------------------------------------
    def ln_final_w(self) -> Optional[Float[torch.Tensor, " d_model"]]:
        """Scale of the final norm, or None when it was folded or is absent."""
        return self._out(self._backend.weight("ln_final_w"))

    def __repr__(self) -> str:
        return (
            f"WeightView(n_layers={self.n_layers}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
            f"d_model={self.d_model}, d_vocab={self.d_vocab}, processing={self.processing.describe()})"
        )


_MLP_WEIGHTS = ("W_in", "W_gate", "W_out", "b_in", "b_out")


def _per_layer(name: str):
    def get(self: WeightView, layer: int) -> Optional[torch.Tensor]:
        return self._layer_weight(name, layer)

    get.__doc__ = f"``{name}`` of one layer (shape in the module docstring, without the layer axis)."
    get.__name__ = f"{name}_layer"
    return get


def _stacked(per_layer: str) -> property:
    def get(self: WeightView) -> torch.Tensor:
        return self._stack(getattr(self, per_layer))

    get.__doc__ = f"``{per_layer}(l)`` for every layer, stacked on a leading [n_layers] axis."
    return property(get)


for _name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_gate", "W_out", "b_in", "b_out"):
    setattr(WeightView, f"{_name}_layer", _per_layer(_name))
for _name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out", "b_in", "b_out"):
    setattr(WeightView, _name, _stacked(f"{_name}_layer"))


def weights(model: Any) -> WeightView:
    """Return the read-only :class:`WeightView` of ``model`` (see the module docstring for shapes)."""
    return WeightView(model)


__all__ = ["Processing", "WeightView", "infer_processing", "record_processing", "weights"]
