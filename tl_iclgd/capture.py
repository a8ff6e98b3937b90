"""Capture the few activations the ICL/GD metrics need, through temporary hooks, batched.

Per query and layer only: the attention output at the recorded position (``blocks.{l}.hook_attn_out``),
the pre-softmax scores of that position over the query's own tokens, per head
(``blocks.{l}.attn.hook_attn_scores``, checked against ``hook_pattern``: softmax(scores) == pattern),
the logits at the position that predicts the label, and on request the attention pattern over the
demonstration tokens and the attention layer's input at the recorded position (for Kendall tau).
No full ActivationCache is ever kept.

A shared context (BOS, or BOS plus the demonstrations for ICL) is run once into a TransformerLens
key-value cache; every batch of queries then reuses it (frozen, expanded to the batch). Queries are
grouped by length, so no padding is needed and positions stay exact.

``params`` (a name -> tensor dict) evaluates the model with replaced parameters through
``torch.func.functional_call``: the user's model is never modified.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch


def _kv_cache_classes():
    try:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache as Cache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry as Entry
    except ImportError:  # transformer-lens 2.x names
        from transformer_lens.past_key_value_caching import (  # type: ignore
            HookedTransformerKeyValueCache as Cache,
        )
        from transformer_lens.past_key_value_caching import (
            HookedTransformerKeyValueCacheEntry as Entry,
        )
    return Cache, Entry


def call_with_params(model: Any, params: Optional[dict[str, torch.Tensor]], *args: Any, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` with the named parameters replaced (functional_call), or plain if None."""
    if not params:
        return model(*args, **kwargs)
    return torch.func.functional_call(model, params, args, kwargs, strict=False)


@dataclass
class Capture:
    """What one run (ZSL, ICL or FT) produced for N queries over L layers.

    attn_out:     [N, L, d_model]  attention output at the recorded position
    scores:       [N, L, H, n_q]   pre-softmax scores of the recorded position over the query tokens
                                   (n_q differs between queries: stored as a list when lengths differ)
    logits:       [N, d_vocab]     logits at the position that predicts the label
    demo_pattern: [N, L, P] or None  pattern (mean over heads) of the recorded position over the context
                                   tokens after BOS (the demonstrations)
    attn_in:      [N, L, d_model] or None  the attention layer's input (after ln1) at the recorded position
    """

    attn_out: torch.Tensor
    scores: list[torch.Tensor]
    logits: torch.Tensor
    demo_pattern: Optional[torch.Tensor] = None
    attn_in: Optional[torch.Tensor] = None

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"query": range(self.logits.shape[0]),
                             "argmax": self.logits.argmax(-1).tolist(),
                             "n_query_tokens": [s.shape[-1] for s in self.scores]})

    def _repr_html_(self) -> str:
        return f"<b>Capture</b> {tuple(self.attn_out.shape)}" + self.to_frame().to_html(index=False)


def prefix_cache(model: Any, context: Sequence[int], params: Optional[dict[str, torch.Tensor]] = None):
    """Run ``context`` [P] once and return a frozen TransformerLens key-value cache of batch 1."""
    Cache, _ = _kv_cache_classes()
    device = model.cfg.device
    cache = Cache.init_cache(model.cfg, device, 1)
    toks = torch.tensor([list(context)], dtype=torch.long, device=device)
    with torch.no_grad():
        call_with_params(model, params, toks, past_kv_cache=cache, attention_mask=torch.ones_like(toks))
    cache.freeze()
    return cache


def expand_cache(cache: Any, batch: int):
    """A frozen view of a batch-1 cache repeated ``batch`` times (no copy)."""
    Cache, Entry = _kv_cache_classes()
    entries = [Entry(e.past_keys.expand(batch, -1, -1, -1), e.past_values.expand(batch, -1, -1, -1), frozen=True)
               for e in cache.entries]
    return Cache(entries, cache.previous_attention_mask.expand(batch, -1), frozen=True)


def _attn_input(model: Any, layer: int, normalized: torch.Tensor) -> torch.Tensor:
    ln = model.blocks[layer].ln1
    out = normalized
    w = getattr(ln, "w", None)
    if w is not None:
        out = out * w
    b = getattr(ln, "b", None)
    if b is not None:
        out = out + b
    return out.detach()


def _unembed(model: Any, resid: torch.Tensor) -> torch.Tensor:
    """Logits of residual vectors [..., d_model] through the (untrained) final norm and unembedding."""
    x = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
    logits = model.unembed(x)
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def capture(model: Any, context: Sequence[int], queries: Sequence[Sequence[int]], *,
            predict_offset: int = -1, params: Optional[dict[str, torch.Tensor]] = None,
            use_prefix_cache: bool = True, batch_size: int = 64, demo_start: Optional[int] = None,
            want_attn_in: bool = False, check_pattern: bool = True, atol: float = 1e-4) -> Capture:
    """Run ``context + query`` for every query and keep only the slices listed in :class:`Capture`.

    context: token ids shared by every query (may be empty). queries: their own token ids; the
    recorded position is each query's last token, the prediction is read at ``predict_offset``.
    demo_start: if not None, also keep the pattern over context positions ``[demo_start, P)``.
    use_prefix_cache=False runs the full sequences instead (the oracle for the cache).
    """
    if len(queries) == 0:
        raise ValueError("queries: got an empty list; accepted: at least one query")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size!r}; accepted: a positive int")
    context = list(context)
    P = len(context)
    n_ctx = model.cfg.n_ctx
    longest = P + max(len(q) for q in queries)
    if longest > n_ctx:
        raise ValueError(f"queries: context ({P} tokens) plus the longest query is {longest} tokens, longer than "
                         f"the model's context n_ctx={n_ctx}")
    for i, q in enumerate(queries):
        if len(q) < -predict_offset:
            raise ValueError(f"queries[{i}]: {len(q)} tokens; at least {-predict_offset} needed")
    L = model.cfg.n_layers
    device = model.cfg.device
    cache = prefix_cache(model, context, params) if (use_prefix_cache and P > 0) else None

    groups: dict[int, list[int]] = defaultdict(list)
    for i, q in enumerate(queries):
        groups[len(q)].append(i)

    N = len(queries)
    attn_out = torch.empty(N, L, model.cfg.d_model)
    logits_out: Optional[torch.Tensor] = None
    scores_out: list[Optional[torch.Tensor]] = [None] * N
    pattern_out = torch.empty(N, L, P - demo_start) if demo_start is not None else None
    attn_in = torch.empty(N, L, model.cfg.d_model) if want_attn_in else None

    for n_q, idx_all in sorted(groups.items()):
        for s in range(0, len(idx_all), batch_size):
            idx = idx_all[s:s + batch_size]
            B = len(idx)
            q_toks = torch.tensor([list(queries[i]) for i in idx], dtype=torch.long, device=device)
            if cache is not None:
                toks, offset = q_toks, 0
                kw = dict(past_kv_cache=expand_cache(cache, B), attention_mask=torch.ones_like(q_toks))
            else:
                ctx = torch.tensor([context] * B, dtype=torch.long, device=device).reshape(B, P)
                toks, offset = torch.cat([ctx, q_toks], dim=1), P
                kw = {}
            rec = offset + n_q - 1  # recorded position, in the positions of this forward
            store: dict[str, torch.Tensor] = {}

            def keep_pos(x, hook, store=store, rec=rec):  # [B, T, d] -> [B, d]
                store[hook.name] = x[:, rec].detach()

            def keep_query_row(x, hook, store=store, rec=rec):  # [B, H, T, K] -> [B, H, K]
                store[hook.name] = x[:, :, rec].detach()

            fwd = []
            for layer in range(L):
                fwd.append((f"blocks.{layer}.hook_attn_out", keep_pos))
                fwd.append((f"blocks.{layer}.attn.hook_attn_scores", keep_query_row))
                fwd.append((f"blocks.{layer}.attn.hook_pattern", keep_query_row))
                if want_attn_in:
                    fwd.append((f"blocks.{layer}.ln1.hook_normalized", keep_pos))
            with torch.no_grad(), model.hooks(fwd_hooks=fwd):
                # stop before the final norm: unembedding every position would cost as much as a block
                resid = call_with_params(model, params, toks, stop_at_layer=L, **kw)
                pred = _unembed(model, resid[:, predict_offset]).float()
            if logits_out is None:
                logits_out = torch.empty(N, pred.shape[-1])
            idx_t = torch.tensor(idx)
            logits_out[idx_t] = pred.cpu()
            for layer in range(L):
                attn_out[idx_t, layer] = store[f"blocks.{layer}.hook_attn_out"].float().cpu()
                sc = store[f"blocks.{layer}.attn.hook_attn_scores"].float()
                pat = store[f"blocks.{layer}.attn.hook_pattern"].float()
                if check_pattern:
                    ref = torch.softmax(sc, dim=-1)
                    err = (ref - pat).abs().max().item()
                    if not err <= atol:
                        raise RuntimeError(
                            f"layer {layer}: softmax(hook_attn_scores) differs from hook_pattern by {err:.3g}; "
                            "the scores hook does not hold the pre-softmax scores (is a plugin changing "
                            "attention, e.g. top-k?). Disable it or pass check_pattern=False.")
                q_scores = sc[:, :, -n_q:].cpu()  # keys of the query tokens are the last n_q
                for j, i in enumerate(idx):
                    if scores_out[i] is None:
                        scores_out[i] = torch.empty(L, sc.shape[1], n_q)
                    scores_out[i][layer] = q_scores[j]  # type: ignore[index]
                if pattern_out is not None:
                    pattern_out[idx_t, layer] = pat[:, :, demo_start:P].mean(1).cpu()
                if attn_in is not None:
                    attn_in[idx_t, layer] = _attn_input(
                        model, layer, store[f"blocks.{layer}.ln1.hook_normalized"]).float().cpu()
    assert logits_out is not None
    return Capture(attn_out, [s for s in scores_out], logits_out, pattern_out, attn_in)  # type: ignore[misc]


def stack_scores(scores: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """[N] x [L, H, n_q] -> [N, L, H, n_q] when every n_q is equal, else None."""
    if len({s.shape for s in scores}) == 1:
        return torch.stack(list(scores))
    return None


__all__ = ["Capture", "capture", "prefix_cache", "expand_cache", "call_with_params", "stack_scores"]
