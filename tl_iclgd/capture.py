"""Capture the few activations the ICL/GD metrics need, through temporary hooks, batched.

Per query and layer only: the attention output at the recorded position (hook kind ``attn_out``),
the pre-softmax scores of that position over the query's own tokens, per head (kind ``attn_scores``,
checked against ``pattern``: softmax(scores) == pattern), the logits at the position that predicts
the label, and on request the attention pattern over the demonstration tokens and the attention
layer's input at the recorded position (for Kendall tau). No full activation cache is ever kept.

Where the scores hook does not hold the pre-softmax scores (some bridge attention classes fire it on
the post-softmax pattern), ``scores_from="auto"`` rebuilds them from the query/key hook points (after
rotary) with the backend's own scale and soft-cap, and checks them against the pattern instead.

A shared context (BOS, or BOS plus the demonstrations for ICL) is run once into the backend's
key-value cache (TransformerLens's for HookedTransformer, a transformers cache for the bridge);
every batch of queries then reuses it (frozen, expanded to the batch). Queries are grouped by length,
so no padding is needed and positions stay exact.

The model is reached only through its backend (``tl_plugins.backends.detect``): hook names, the
attention input, the readout, the cache and ``functional_call`` for replaced parameters (``params``,
a name -> tensor dict): the user's model is never modified.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Float

from tl_plugins.checks import check_positive_int

SCORES_FROM = ("auto", "hook", "qk")


def backend_of(model: Any):
    """The model's :class:`tl_plugins.backends.Backend` (a backend passed in is returned as is)."""
    from tl_plugins.backends import Backend, detect

    return model if isinstance(model, Backend) else detect(model)


def call_with_params(model: Any, params: Optional[dict[str, torch.Tensor]], *args: Any, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` with the named parameters replaced (the backend's functional_call)."""
    return backend_of(model).functional_call(params, *args, **kwargs)


@dataclass
class Capture:
    """What one run (ZSL, ICL or FT) produced for N queries over L layers.

    attn_out:     [query, n_layers, d_model]  attention output at the recorded position
    scores:       query x [n_layers, head_index, q_tokens]  pre-softmax scores of the recorded position
                  over the query tokens (q_tokens differs between queries, hence one tensor per query)
    logits:       [query, d_vocab]  logits at the position that predicts the label
    demo_pattern: [query, n_layers, demo_pos] or None  pattern (mean over heads) of the recorded position
                  over the context tokens after BOS (the demonstrations)
    attn_in:      [query, n_layers, d_model] or None  the attention layer's input (after ln1) at the
                  recorded position
    """

    attn_out: Float[torch.Tensor, "query n_layers d_model"]
    scores: list[Float[torch.Tensor, "n_layers head_index q_tokens"]]
    logits: Float[torch.Tensor, "query d_vocab"]
    demo_pattern: Optional[Float[torch.Tensor, "query n_layers demo_pos"]] = None
    attn_in: Optional[Float[torch.Tensor, "query n_layers d_model"]] = None

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"query": range(self.logits.shape[0]),
                             "argmax": self.logits.argmax(-1).tolist(),
                             "n_query_tokens": [s.shape[-1] for s in self.scores]})

    def _repr_html_(self) -> str:
        return f"<b>Capture</b> {tuple(self.attn_out.shape)}" + self.to_frame().to_html(index=False)


def prefix_cache(model: Any, context: Sequence[int], params: Optional[dict[str, torch.Tensor]] = None):
    """Run ``context`` [P] once and return the backend's frozen key-value cache of batch 1."""
    return backend_of(model).prefix_cache(list(context), params)


def expand_cache(model: Any, cache: Any, batch: int):
    """A frozen view of a batch-1 cache repeated ``batch`` times (no copy)."""
    return backend_of(model).expand_cache(cache, batch)


def _conditional_softmax_error(scores: torch.Tensor, pattern: torch.Tensor) -> float:
    """Max |softmax(scores) - pattern renormalised over the same keys| [..., K], rows with no mass skipped.

    The softmax over a subset of keys is the full pattern restricted to them and renormalised, so
    scores over only some keys (the query's own, here) can still be checked against the pattern.
    """
    p = pattern.double()
    mass = p.sum(-1, keepdim=True)
    ok = mass[..., 0] > 1e-20
    if not bool(ok.any()):
        return 0.0
    err = (torch.softmax(scores.double(), dim=-1) - p / mass.clamp_min(1e-300)).abs().amax(-1)
    return float(err[ok].max())


def capture(model: Any, context: Sequence[int], queries: Sequence[Sequence[int]], *,
            predict_offset: int = -1, params: Optional[dict[str, torch.Tensor]] = None,
            use_prefix_cache: bool = True, batch_size: int = 64, demo_start: Optional[int] = None,
            want_attn_in: bool = False, check_pattern: bool = True, atol: float = 1e-4,
            scores_from: str = "auto") -> Capture:
    """Run ``context + query`` for every query and keep only the slices listed in :class:`Capture`.

    context: token ids shared by every query (may be empty). queries: their own token ids; the
    recorded position is each query's last token, the prediction is read at ``predict_offset``.
    demo_start: if not None, also keep the pattern over context positions ``[demo_start, P)``.
    use_prefix_cache=False runs the full sequences instead (the oracle for the cache).
    scores_from: "hook" reads the scores hook and raises when softmax(scores) != pattern; "qk"
    always rebuilds the scores from the query/key hooks (checked against the pattern); "auto" reads
    the hook and rebuilds from q/k only where the hook fails the check.
    """
    _check_capture_args(queries, batch_size, scores_from)
    be = backend_of(model)
    context = list(context)
    P = len(context)
    _check_lengths(be.n_ctx, P, queries, predict_offset)
    cache = be.prefix_cache(context, params) if (use_prefix_cache and P > 0) else None
    hooks = _CaptureHooks(be, want_attn_in, scores_from)
    out = _CaptureBuffers(len(queries), be.n_layers, be.d_model, P, demo_start, want_attn_in)
    for n_q, idx in _length_batches(queries, batch_size):
        toks, rec, kv = _batch_inputs(be, context, queries, idx, cache)
        store: dict[str, torch.Tensor] = {}
        with torch.no_grad(), be.hooks(hooks.forward_hooks(rec, n_q, store)):
            # stop before the final norm: unembedding every position would cost as much as a block
            resid = be.run(toks, params=params, stop_at_layer=be.n_layers, kv_cache=kv)
            pred = be.readout(resid[:, predict_offset]).float()
        out.add_batch(be, hooks, idx, n_q, store, pred, scores_from=scores_from, check_pattern=check_pattern,
                      atol=atol)
    return out.result()


def _check_capture_args(queries: Sequence[Sequence[int]], batch_size: Any, scores_from: str) -> None:
    if len(queries) == 0:
        raise ValueError("queries: got an empty list; accepted: at least one query")
    check_positive_int(batch_size, "batch_size")
    if scores_from not in SCORES_FROM:
        raise ValueError(f"scores_from: got {scores_from!r}; accepted: {', '.join(SCORES_FROM)}")


def _check_lengths(n_ctx: int, P: int, queries: Sequence[Sequence[int]], predict_offset: int) -> None:
    """Every context + query fits the model's context, and every query reaches ``predict_offset``."""
    longest = P + max(len(q) for q in queries)
    if longest > n_ctx:
        raise ValueError(f"queries: context ({P} tokens) plus the longest query is {longest} tokens, longer than "
                         f"the model's context n_ctx={n_ctx}")
    for i, q in enumerate(queries):
        if len(q) < -predict_offset:
            raise ValueError(f"queries[{i}]: {len(q)} tokens; at least {-predict_offset} needed")


def _length_batches(queries: Sequence[Sequence[int]], batch_size: int):
    """(query length, query indices) per batch: queries grouped by length (no padding), shortest first."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, q in enumerate(queries):
        groups[len(q)].append(i)
    for n_q, idx_all in sorted(groups.items()):
        for s in range(0, len(idx_all), batch_size):
            yield n_q, idx_all[s:s + batch_size]


def _batch_inputs(be: Any, context: list[int], queries: Sequence[Sequence[int]], idx: list[int], cache: Any):
    """(tokens to run, recorded position in them, KV cache or None) for one batch of equal-length queries."""
    B, P = len(idx), len(context)
    q_toks = torch.tensor([list(queries[i]) for i in idx], dtype=torch.long, device=be.device)
    if cache is not None:
        return q_toks, q_toks.shape[1] - 1, be.expand_cache(cache, B)
    ctx = torch.tensor([context] * B, dtype=torch.long, device=be.device).reshape(B, P)
    return torch.cat([ctx, q_toks], dim=1), P + q_toks.shape[1] - 1, None


class _CaptureHooks:
    """The hook names and functions of one capture, asked of the backend once."""

    def __init__(self, be: Any, want_attn_in: bool, scores_from: str):
        L = be.n_layers
        self.n_layers = L
        self.attn_out = [be.hook_name("attn_out", layer) for layer in range(L)]
        self.scores = [be.hook_name("attn_scores", layer) for layer in range(L)]
        self.pattern = [be.hook_name("pattern", layer) for layer in range(L)]
        self.attn_in = [be.attention_input_hook(layer) for layer in range(L)] if want_attn_in else None
        self.qk = [be.attention_scores_from_qk(layer) for layer in range(L)] if scores_from != "hook" else None

    def forward_hooks(self, rec: int, n_q: int, store: dict) -> list:
        """(hook name, function) pairs that keep, in ``store``, the slices of one batch's forward;
        keyed by our own names: the bridge reports an aliased hook point's canonical name."""
        def keep_pos(key):  # [B, T, d] -> [B, d]
            def fn(x, hook):
                store[key] = x[:, rec].detach()
            return fn

        def keep_query_row(key):  # [B, H, T, K] -> [B, H, K]
            def fn(x, hook):
                store[key] = x[:, :, rec].detach()
            return fn

        def keep_last(key, n):  # [B, T, h, d] -> [B, n, h, d]: the query's tokens
            def fn(x, hook):
                store[key] = x[:, -n:].detach()
            return fn

        fwd = []
        for layer in range(self.n_layers):
            fwd.append((self.attn_out[layer], keep_pos(f"out{layer}")))
            fwd.append((self.scores[layer], keep_query_row(f"scores{layer}")))
            fwd.append((self.pattern[layer], keep_query_row(f"pattern{layer}")))
            if self.attn_in is not None:
                fwd.append((self.attn_in[layer][0], keep_pos(f"in{layer}")))
            if self.qk is not None:
                fwd.append((self.qk[layer][0], keep_last(f"q{layer}", 1)))   # the recorded position
                fwd.append((self.qk[layer][1], keep_last(f"k{layer}", n_q)))  # the query's keys
        return fwd


class _CaptureBuffers:
    """The outputs of one capture (see :class:`Capture`), filled batch by batch on the CPU."""

    def __init__(self, N: int, L: int, d_model: int, P: int, demo_start: Optional[int], want_attn_in: bool):
        self.L, self.P, self.demo_start = L, P, demo_start
        self.attn_out = torch.empty(N, L, d_model)
        self.logits: Optional[torch.Tensor] = None
        self.scores: list[Optional[torch.Tensor]] = [None] * N
        self.pattern = torch.empty(N, L, P - demo_start) if demo_start is not None else None
        self.attn_in = torch.empty(N, L, d_model) if want_attn_in else None

    def add_batch(self, be: Any, hooks: _CaptureHooks, idx: list[int], n_q: int, store: dict,
                  pred: torch.Tensor, *, scores_from: str, check_pattern: bool, atol: float) -> None:
        if self.logits is None:
            self.logits = torch.empty(len(self.scores), pred.shape[-1])
        idx_t = torch.tensor(idx)
        self.logits[idx_t] = pred.cpu()
        for layer in range(self.L):
            self.attn_out[idx_t, layer] = store[f"out{layer}"].float().cpu()
            sc = store[f"scores{layer}"].float()
            pat = store[f"pattern{layer}"].float()
            q_scores = _query_scores(be, layer, store, hooks.qk, sc, pat, n_q, scores_from,
                                     check_pattern, atol).cpu()
            for j, i in enumerate(idx):
                if self.scores[i] is None:
                    self.scores[i] = torch.empty(self.L, q_scores.shape[1], n_q)
                self.scores[i][layer] = q_scores[j]  # type: ignore[index]
            if self.pattern is not None:
                self.pattern[idx_t, layer] = pat[:, :, self.demo_start:self.P].mean(1).cpu()
            if self.attn_in is not None:
                to_input = hooks.attn_in[layer][1]  # type: ignore[index]
                self.attn_in[idx_t, layer] = to_input(store[f"in{layer}"]).detach().float().cpu()

    def result(self) -> "Capture":
        assert self.logits is not None
        return Capture(self.attn_out, [s for s in self.scores], self.logits, self.pattern,  # type: ignore[misc]
                       self.attn_in)


def _query_scores(be: Any, layer: int, store: dict, qk_hook: Optional[list], sc: torch.Tensor, pat: torch.Tensor,
                  n_q: int, scores_from: str, check_pattern: bool, atol: float) -> torch.Tensor:
    """[B, H, n_q] pre-softmax scores of the recorded position over the query's own keys (the last n_q)."""
    hook_err = None
    if scores_from != "qk":
        hook_err = (torch.softmax(sc, dim=-1) - pat).abs().max().item()
        if not check_pattern or hook_err <= atol:
            return sc[:, :, -n_q:]
        if scores_from == "hook":
            _pattern_error(layer, hook_err, None)
    assert qk_hook is not None
    q, k = store[f"q{layer}"].float(), store[f"k{layer}"].float()
    rebuilt = qk_hook[layer][2](q, k)[:, :, 0]  # [B, H, n_q]
    if check_pattern:
        # the pattern must be a distribution over all keys, and the rebuilt scores must reproduce it
        # over the query's keys (renormalised: the context keys' scores are not rebuilt)
        qk_err = max(_conditional_softmax_error(rebuilt, pat[:, :, -n_q:]),
                     float((pat.double().sum(-1) - 1).abs().max()))
        if not qk_err <= atol:
            _pattern_error(layer, hook_err, qk_err)
    return rebuilt


def _pattern_error(layer: int, hook_err: Optional[float], qk_err: Optional[float]) -> None:
    parts = []
    if hook_err is not None:
        parts.append(f"softmax(hook_attn_scores) differs from hook_pattern by {hook_err:.3g}")
    if qk_err is not None:
        parts.append(f"scores rebuilt from the query/key hooks differ from it by {qk_err:.3g}")
    raise RuntimeError(
        f"layer {layer}: " + "; ".join(parts) + "; the pre-softmax scores cannot be read (is a plugin "
        "changing attention, e.g. top-k?). Disable it or pass check_pattern=False.")


def stack_scores(scores: Sequence[Float[torch.Tensor, "n_layers head_index q_tokens"]]
                 ) -> Optional[Float[torch.Tensor, "query n_layers head_index q_tokens"]]:
    """query x [n_layers, head_index, q_tokens] -> [query, n_layers, head_index, q_tokens] when every
    q_tokens is equal, else None."""
    if len({s.shape for s in scores}) == 1:
        return torch.stack(list(scores))
    return None


__all__ = ["Capture", "capture", "prefix_cache", "expand_cache", "call_with_params", "stack_scores",
           "backend_of", "SCORES_FROM"]
