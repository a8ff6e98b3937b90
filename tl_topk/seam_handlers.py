"""Model-aware glue: what the ``topk`` plugin does inside one attention call and one MLP call.

Attention takes one of three routes:
  * pass (return None, the host's bit-exact dense path) when the layer is not limited or every head
    keeps at least as many keys as there are (top-k equals dense);
  * the hooked route, ``call.dense(scores_transform=...)``, whenever ``hook_attn_scores`` or
    ``hook_pattern`` is observed or edited (so the hooks see the full masked scores and the sparse
    pattern the model used), and for attention variants the functional op does not model
    (masks that are not causal + window + key padding, dropout in training, non-causal attention
    with a padding mask), or ``backend="dense"``;
  * otherwise the functional op ``topk_attention`` (chunked on CPU, triton on CUDA), local
    (sliding-window) layers included.

The ``sdpa`` plugin (``sdpa_attention``) takes the calls that ``topk`` leaves dense (or all calls
when ``topk`` is not enabled): exact dense attention through ``scaled_dot_product_attention``
unless ``sdpa_route`` names a reason for the model's own dense path.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from tl_topk.config import SDPAConfig, TopKConfig
from tl_topk.ops.attention import topk_attention
from tl_topk.ops.backend import requested_backend
from tl_topk.ops.feedforward import check_activation, topk_activation
from tl_topk.ops.sdpa import sdpa_attention as sdpa_function
from tl_topk.ops.sdpa import unsupported_reason as sdpa_unsupported_reason
from tl_topk.ops.selection import k_per_row, spec_covers_all, topk_keep_mask, validate_k_value

PLUGIN = "topk"
SDPA_PLUGIN = "sdpa"


def scores_transform(spec: tuple):
    """Function [batch, head, q, k] masked scores -> scores with unselected keys set to -inf.

    Validity is read from the scores themselves (-inf = masked), so a hook that edits
    ``hook_attn_scores`` changes the selection. Keys that stay keep their exact bits.
    """

    def transform(scores: torch.Tensor) -> torch.Tensor:
        n_k = scores.shape[-1]
        with torch.no_grad():
            n_valid = (scores > float("-inf")).sum(-1)  # [b, h, q]: per head, hooks may edit heads apart
            k_rows = torch.stack(
                [k_per_row((entry,), n_valid[:, h], n_k)[:, 0] for h, entry in enumerate(spec)], dim=1)
            keep = topk_keep_mask(scores.detach(), k_rows)
            valid = scores > float("-inf")
        if bool((keep == valid).all()):
            return scores
        return scores.masked_fill(~keep, float("-inf"))

    return transform


def _hooked_route_needed(call: Any, backend: str) -> bool:
    """``backend``: the call's requested backend (``requested_backend(cfg.backend)``)."""
    return (
        backend == "dense"
        or call.scores_hooked()
        or call.custom_mask
        or (not call.causal and call.attention_mask is not None)
    )


def attention(call: Any) -> Optional[torch.Tensor]:
    """``tl_plugins_attention`` for the topk plugin: z [batch, q_pos, head, d_head] or None."""
    cfg: Optional[TopKConfig] = call.config(PLUGIN)
    if cfg is None:
        return None
    spec = cfg.attention_spec(call.layer, call.n_heads)
    if spec is None:
        return None
    n_k = call.k.shape[1]
    # The call's backend is settled once, here: cfg.backend, else use_backend, else TL_TOPK_BACKEND.
    backend = requested_backend(cfg.backend)
    hooked = _hooked_route_needed(call, backend)
    if spec_covers_all(spec, n_k) and not hooked:
        return None
    if hooked:
        return call.dense(scores_transform=scores_transform(spec))
    pad = call.key_padding_mask if call.causal else None
    if pad is not None and bool(pad.all()):
        pad = None  # TransformerLens passes an all-ones mask with a KV cache: skip a pass over the scores
    return topk_attention(
        call.q, call.k, call.v, spec, causal=call.causal, key_padding_mask=pad, scale=call.scale,
        softcap=call.softcap, backend=backend, chunk_size=cfg.chunk_size,
        memory_budget=cfg.memory_budget, window=call.window_size if call.causal else None,
    )


def sdpa_route(call: Any) -> Optional[str]:
    """Why the ``sdpa`` plugin leaves ``call`` to the model's own dense path, or None when SDPA runs it:
    hook_attn_scores / hook_pattern observed or edited (they must see the tensors the model used), a
    mask that is not causal + sliding window + key padding (or attention dropout in training), or an
    attention soft-cap (SDPA has no score modifier)."""
    if call.scores_hooked():
        return "hook_attn_scores or hook_pattern is observed"
    if call.custom_mask:
        return "a custom attention mask or attention dropout"
    return sdpa_unsupported_reason(call.softcap)


def sdpa_attention(call: Any) -> Optional[torch.Tensor]:
    """``tl_plugins_attention`` for the sdpa plugin: z [batch, q_pos, head, d_head], or None (dense)."""
    cfg: Optional[SDPAConfig] = call.config(SDPA_PLUGIN)
    if cfg is None or not cfg.covers(call.layer) or sdpa_route(call) is not None:
        return None
    return sdpa_function(call.q, call.k, call.v, causal=call.causal, key_padding_mask=call.key_padding_mask,
                         scale=call.scale, window=call.window_size if call.causal else None)


def mlp_activation(call: Any) -> Optional[torch.Tensor]:
    """``tl_plugins_mlp_activation`` for the topk plugin: sparse post-activations or None."""
    cfg: Optional[TopKConfig] = call.config(PLUGIN)
    if cfg is None:
        return None
    units = cfg.ff_units(call.layer, call.pre.shape[-1])
    if units is None:
        return None
    return topk_activation(call.pre, units, call.act_fn, rule=cfg.ff_rule)


def check_model(model: Any, cfg: TopKConfig) -> None:
    """Refuse models and options the plugin cannot honour (raises; the host then rolls back)."""
    mcfg = model.cfg
    cfg.check_model(mcfg.n_layers, mcfg.n_heads)
    if cfg.ff_k is not None:
        if getattr(mcfg, "attn_only", False):
            raise ValueError("ff_k: the model is attention-only (cfg.attn_only=True); it has no MLPs")
        check_activation(str(mcfg.act_fn))
    backend = requested_backend(cfg.backend)  # at enable time; each attention call settles its own
    if backend == "triton":
        from tl_topk.ops import triton_backend

        triton_backend.check_available(torch.empty(0, device=mcfg.device))
    if backend == "flex":
        from tl_topk.ops import flex

        reason = flex.unsupported_reason(torch.empty(0, device=mcfg.device, dtype=mcfg.dtype))
        if reason is not None:
            raise ValueError(f"backend='flex': {reason}; accepted here: auto, dense, chunked")


__all__ = ["attention", "sdpa_attention", "sdpa_route", "mlp_activation", "check_model", "scores_transform", "validate_k_value"]
