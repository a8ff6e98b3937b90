"""How a model's weights were processed when it was loaded (layer-norm folding, centring): recorded
by the loaders, or read off the weights.

Projections into vocabulary space and gradient steps depend on the parameterisation, so the weight
view (:mod:`tl_plugins.weights`) and the backends report it. This module sits below both: it reads
weights only through the backend object it is handed.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch


@dataclass(frozen=True)
class Processing:
    """How a model's weights were processed when loaded (TransformerLens ``from_pretrained`` flags).

    ``source`` is "recorded" when the loader told us, "inferred" when read off the weights.
    """

    fold_ln: bool
    center_writing_weights: bool
    center_unembed: bool
    fold_value_biases: bool
    source: str = "inferred"

    @property
    def is_processed(self) -> bool:
        return self.fold_ln or self.center_writing_weights or self.center_unembed or self.fold_value_biases

    def describe(self) -> str:
        flags = [f for f in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
                 if getattr(self, f)]
        return (", ".join(flags) or "unprocessed") + f" ({self.source})"


_recorded: "weakref.WeakKeyDictionary[Any, Processing]" = weakref.WeakKeyDictionary()
_PROCESSING_ATTR = "_tl_plugins_processing"


def record_processing(model: Any, *, fold_ln: bool, center_writing_weights: bool, center_unembed: bool,
                      fold_value_biases: bool) -> None:
    """Loaders call this so ``weights(model).processing`` is known rather than inferred.

    Stored on ``model.cfg`` (survives ``deepcopy``) as ``cfg._tl_plugins_processing``.
    """
    p = Processing(fold_ln, center_writing_weights, center_unembed, fold_value_biases, "recorded")
    object.__setattr__(model.cfg, _PROCESSING_ATTR, p)
    _recorded[model] = p


def infer_processing(model: Any, backend: Any) -> Processing:
    """The loader's record if it is still true of the weights, else what the weights show."""
    cfg = model.cfg
    recorded = getattr(cfg, _PROCESSING_ATTR, None) or _recorded.get(model)
    inferred = _read_processing_off_weights(backend)
    if recorded is None:
        return inferred
    # A model processed in place after loading (model.process_weights_()) makes the record stale.
    stale = any(getattr(inferred, f) and not getattr(recorded, f)
                for f in ("fold_ln", "center_writing_weights", "center_unembed"))
    return replace(inferred, source="inferred (the loader's record is stale)") if stale else recorded


def _read_processing_off_weights(backend: Any) -> Processing:
    cfg = backend.cfg
    norm = getattr(cfg, "normalization_type", None) or ""
    fold_ln = norm.endswith("Pre") or bool(getattr(backend, "layer_norm_folded", False))
    with torch.no_grad():
        W_U = backend.weight("W_U").detach().float()
        W_E = backend.weight("W_E").detach().float()
        scale_u = W_U.abs().mean().clamp_min(1e-12)
        scale_e = W_E.abs().mean().clamp_min(1e-12)
        center_unembed = bool((W_U.mean(-1).abs().max() / scale_u) < 1e-4)
        center_writing = bool((W_E.mean(-1).abs().max() / scale_e) < 1e-4) and backend.d_model > 1
    return Processing(fold_ln, center_writing, center_unembed, False, "inferred")


__all__ = ["Processing", "infer_processing", "record_processing"]
