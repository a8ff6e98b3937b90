"""``trace``: the feed-forward sub-updates (and attention-head outputs) at a position, read in
vocabulary space, with their signed direct effect on a target token, beside a per-layer logit lens.

Definitions (``docs/debugger.md``):

* coefficient ``m_i`` = the unit's activation ``hook_post`` (``act(gate) * up`` on gated MLPs);
  value ``v_i = W_out[layer, i]``; sub-update ``m_i v_i``; ``norm = ||v_i||``;
  ``score = |m_i| * norm`` (the original LM-Debugger ranking);
* ``direct_effect`` = the sub-update's effect on the target's logit (minus the contrast's) through
  the final norm with its scale frozen at the value it takes on the final residual at that position
  (``L(u) = w * P(u) / sigma_final``; P centres for LayerNorm). Summed over every component
  (embeddings, heads, biases, sub-updates) it gives the logit exactly, up to the norm's bias.
  The output soft-cap, where a model has one, is left out (effects on the pre-cap logit);
* a head's sub-update is its output ``z_h @ W_O[layer, h]`` at the position (no ``b_O``);
* on models with norms after attention and MLP (Gemma 2/3), each output reaches the residual through
  that norm, ``w * x / sigma`` with ``x`` the block's whole attention (or MLP) output: the value read
  is ``w * v_i`` (``norm`` is its norm), and ``score`` and ``direct_effect`` use ``m_i / sigma`` with
  ``sigma`` the norm's scale at the position, frozen like the final norm's (column
  ``post_norm_scale``; 1 on pre-norm-only models). The reconstruction is checked against the
  block's ``hook_mlp_out`` / ``hook_attn_out`` at every traced position;
* ``.layers``: the logit lens (final norm with its own scale, unembedding) of the residual before
  attention (``resid_pre``), after attention (``resid_mid``) and after the FFN (``resid_post``).

The forward pass is one run with observation hooks added by name for that call only.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import pandas as pd
import torch

from tl_embedspace.debugger import core
from tl_embedspace.debugger.model import (
    debug_weights,
    resolve_token,
    to_token_rows,
    token_strs,
    unit_label,
)
from tl_embedspace.projections import visible
from tl_plugins.checks import is_int
from tl_plugins.ranking import top_k


@dataclass
class TraceResult:
    """What :func:`trace` found. Frames have one row per (prompt, position, layer, unit/head)."""

    tokens: list                 # per prompt: list of token strings
    token_ids: list              # per prompt: list of ids
    sub_updates: pd.DataFrame    # top-k by the original score, per layer
    by_direct_effect: pd.DataFrame  # top-k by |direct effect|, per layer
    layers: pd.DataFrame
    heads: pd.DataFrame
    targets: pd.DataFrame        # per (prompt, position): target / contrast / prediction
    k: int
    meta: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return self.sub_updates

    def to_dict(self) -> dict:
        def rec(df):
            return df.astype(object).where(df.notna(), None).to_dict(orient="records")
        return {"tokens": self.tokens, "token_ids": self.token_ids, "k": self.k, "meta": self.meta,
                "targets": rec(self.targets), "layers": rec(self.layers), "sub_updates": rec(self.sub_updates),
                "by_direct_effect": rec(self.by_direct_effect), "heads": rec(self.heads)}

    def _repr_html_(self) -> str:
        out = ["<div class='tl-trace'>"]
        for _, t in self.targets.iterrows():
            p, pos = int(t["prompt"]), int(t["position"])
            out.append(f"<h4>prompt {p}, position {pos} ({html.escape(visible(t['token']))}): target "
                       f"{html.escape(visible(t['target']))}"
                       + (f" minus {html.escape(visible(t['contrast']))}" if t["contrast"] is not None else "")
                       + f"; model predicts {html.escape(visible(t['prediction']))}</h4>")
            L = self.layers[(self.layers.prompt == p) & (self.layers.position == pos)]
            S = self.sub_updates[(self.sub_updates.prompt == p) & (self.sub_updates.position == pos)]
            out.append("<table><tr><th>layer</th><th>after attn</th><th>after FFN</th><th>target rank</th>"
                       "<th>dominant sub-updates (score, direct effect)</th></tr>")
            for _, r in L.iterrows():
                subs = S[S.layer == r["layer"]].head(3)
                cells = ", ".join(f"{u.label} ({u.score:.2f}, {u.direct_effect:+.2f}: "
                                  f"{html.escape(' '.join(visible(x) for x in u.top_tokens[:3]))})"
                                  for u in subs.itertuples())
                out.append(f"<tr><td>{r['layer']}</td><td>{html.escape(visible(r['mid_top'][0]))}</td>"
                           f"<td>{html.escape(visible(r['post_top'][0]))}</td><td>{r['post_rank']}</td>"
                           f"<td>{cells}</td></tr>")
            out.append("</table>")
        out.append("</div>")
        return "".join(out)


def _positions(position: Any, n: int) -> list[int]:
    vals = position if isinstance(position, (list, tuple, range)) else [position]
    out = []
    for p in vals:
        if not is_int(p) or not -n <= int(p) < n:
            raise IndexError(f"position: got {p!r}; accepted: an int in [{-n}, {n - 1}] for a prompt of "
                             f"{n} tokens, or a list of them")
        out.append(int(p) % n)
    return out


def _check_k(k: Any, arg: str = "k") -> int:
    if not is_int(k) or k <= 0:
        raise ValueError(f"{arg}: got {k!r}; accepted: a positive int")
    return int(k)


def run_and_collect(model: Any, tokens: torch.Tensor, kinds: Sequence[str]) -> tuple[torch.Tensor, dict]:
    """One forward of ``tokens`` [1, pos] with observation hooks (by name, removed on return);
    returns (logits [pos, V], {(kind, layer): activation [pos, ...]})."""
    backend = debug_weights(model).backend
    store: dict = {}
    hooks = []
    for kind in kinds:
        for layer in range(backend.n_layers):
            def fn(t, hook, key=(kind, layer)):
                store[key] = t.detach()[0]
            hooks.append((backend.hook_name(kind, layer), fn))
    with torch.no_grad(), backend.hooks(hooks):
        logits = backend.run(tokens.to(backend.device))
    return logits.detach()[0], store


def _post_scale(dw: Any, acts: dict, kind: str, layer: int, pos: int, summed: torch.Tensor) -> float:
    """The post norm's scale for a block output ``summed`` [d] (before its bias), checked: the
    reconstruction ``w * (summed + b) / sigma`` must equal the block's hooked output."""
    from tl_plugins.errors import UnsupportedModelError

    bias = dw.b_O if kind == "attn" else dw.b_out
    x = summed + (bias[layer] if bias is not None else 0.0)
    sigma = dw.post_scale(x)
    w = dw.attn_post_w[layer] if kind == "attn" else dw.mlp_post_w[layer]
    real = acts[(f"{kind}_out", layer)][pos].float().cpu()
    ours = w * x / sigma
    if float((real - ours).abs().max()) > 1e-3 * max(1.0, float(real.abs().max())):
        raise UnsupportedModelError(
            f"model: layer {layer}'s {kind} output is not its post norm applied to the sum of its "
            f"{'heads' if kind == 'attn' else 'sub-updates'} (max difference "
            f"{float((real - ours).abs().max()):.3g}); accepted: models whose post norms act on the "
            "block's output alone")
    return sigma


def _top_tokens_of(vectors: torch.Tensor, basis: torch.Tensor, n: int, chunk: int = 256) -> torch.Tensor:
    out = []
    for s in range(0, vectors.shape[0], chunk):
        out.append(top_k(vectors[s:s + chunk] @ basis, n, dim=1)[1])
    return torch.cat(out) if out else torch.empty(0, n, dtype=torch.long)


def trace(model: Any, prompt_or_tokens: Any, position: Union[int, Sequence[int]] = -1, target: Any = None,
          contrast: Any = None, k: int = 10, *, heads: bool = True, n_tokens: int = 5, lens_k: int = 5,
          index: Any = "auto", head_tokens: int = 3) -> TraceResult:
    """Trace ``prompt_or_tokens`` (a string, a list of them, ids or a [batch, pos] tensor) at
    ``position`` (an int or a list; negative counts from the end).

    ``target``: a token string (exactly one token) or id whose logit the direct effects are measured
    on; default the model's top prediction at the position. ``contrast``: a second token; direct
    effects are then on ``logit(target) - logit(contrast)``. ``k``: sub-updates kept per layer (by
    score, and separately by |direct effect|). ``n_tokens``: promoted tokens shown per sub-update
    (the top tokens of ``sign(m_i) v_i`` in the readout basis, from ``index`` when one is given or
    already built for this model, computed otherwise; ``0``: none, which keeps a trace with a large
    ``k`` cheap on a large vocabulary). ``heads``: include attention-head outputs.
    """
    k = _check_k(k)
    if not (is_int(n_tokens) and n_tokens >= 0):
        raise ValueError(f"n_tokens: got {n_tokens!r}; accepted: an int >= 0 (0: no promoted tokens)")
    n_tokens = int(n_tokens)
    lens_k = _check_k(lens_k, "lens_k")
    dw = debug_weights(model)
    backend = dw.backend
    rows = to_token_rows(backend, prompt_or_tokens)
    target_id = resolve_token(backend, target, "target")
    contrast_id = resolve_token(backend, contrast, "contrast")
    if index == "auto":
        from tl_embedspace.debugger.index import ValueIndex

        index = ValueIndex.cached(model)
    if index is not None:
        index.check_model(model)
    basis = dw.readout_basis()
    L = dw.n_layers
    post = dw.mlp_post_w is not None
    kinds = ["resid_pre", "resid_mid", "resid_post", "mlp_post"] + (["z"] if heads else []) \
        + (["mlp_out", "attn_out"] if post else [])
    sub_rows, de_rows, layer_rows, head_rows, tgt_rows = [], [], [], [], []
    all_tokens, all_ids = [], []
    for b, toks in enumerate(rows):
        strs = token_strs(backend, toks.tolist())
        all_tokens.append(strs)
        all_ids.append(toks.tolist())
        positions = _positions(position, toks.numel())
        logits, acts = run_and_collect(model, toks[None], kinds)
        for pos in positions:
            x_final = acts[("resid_post", L - 1)][pos].float().cpu()
            fnorm = dw.frozen_norm(x_final)
            pred = int(logits[pos].argmax())
            tid = pred if target_id is None else target_id
            ids = torch.tensor([tid] + ([contrast_id] if contrast_id is not None else []))
            weights = torch.tensor([1.0] + ([-1.0] if contrast_id is not None else []))
            d = core.token_directions(dw.W_U, ids, fnorm, weights)
            value_dots = dw.W_out @ d                                   # [L, d_mlp]
            tgt_rows.append({"prompt": b, "position": pos, "token": strs[pos], "target_id": tid,
                             "target": token_strs(backend, [tid])[0], "contrast_id": contrast_id,
                             "contrast": None if contrast_id is None else token_strs(backend, [contrast_id])[0],
                             "prediction_id": pred, "prediction": token_strs(backend, [pred])[0],
                             "target_logit": float(logits[pos, tid]),
                             "sigma_final": fnorm.sigma})
            # logit lens, three readouts per layer, one batched readout
            stack = torch.stack([acts[(kind, l)][pos] for l in range(L)
                                 for kind in ("resid_pre", "resid_mid", "resid_post")])
            with torch.no_grad():
                lens = backend.readout(stack.to(backend.device)).float().cpu()
            logp = lens.log_softmax(-1)
            top = top_k(lens, lens_k, dim=-1)[1]
            t_logit = lens[:, tid]
            t_rank = (lens > t_logit[:, None]).sum(-1) + 1
            new_vecs, new_meta = [], []
            for l in range(L):
                coef = acts[("mlp_post", l)][pos].float().cpu()
                s2 = 1.0
                if post:  # the value as written is w2 * v_i, reached through 1 / sigma2
                    s2 = _post_scale(dw, acts, "mlp", l, pos, coef @ dw.W_out_raw[l])
                eff = coef / s2
                score = core.sub_update_scores(eff, dw.value_norms[l])
                de = core.direct_effects(eff, value_dots[l])
                by_score = core.ranked(score, k)
                by_de = core.ranked(de.abs(), k)
                de_rank = core.rank_of(de)
                shares = core.update_shares(eff, dw.W_out[l], by_score, value_dots[l])
                shares_de = core.update_shares(eff, dw.W_out[l], by_de, value_dots[l])
                i0, i1, i2 = 3 * l, 3 * l + 1, 3 * l + 2
                layer_rows.append({
                    "prompt": b, "position": pos, "layer": l,
                    "pre_top": token_strs(backend, top[i0].tolist()),
                    "mid_top": token_strs(backend, top[i1].tolist()),
                    "post_top": token_strs(backend, top[i2].tolist()),
                    "pre_rank": int(t_rank[i0]), "mid_rank": int(t_rank[i1]), "post_rank": int(t_rank[i2]),
                    "pre_prob": float(logp[i0, tid].exp()), "mid_prob": float(logp[i1, tid].exp()),
                    "post_prob": float(logp[i2, tid].exp()),
                    "attn_logit_change": float(t_logit[i1] - t_logit[i0]),
                    "ffn_logit_change": float(t_logit[i2] - t_logit[i1]),
                    **shares, "topk_direct_share_by_direct": shares_de["topk_direct_share"],
                })
                for table, order in ((sub_rows, by_score), (de_rows, by_de)):
                    for r, u in enumerate(order.tolist(), start=1):
                        c = float(coef[u])
                        table.append({"prompt": b, "position": pos, "layer": l, "unit": u,
                                      "label": unit_label(l, u), "coefficient": c,
                                      "norm": float(dw.value_norms[l, u]), "score": float(score[u]),
                                      "direct_effect": float(de[u]), "rank": r, "post_norm_scale": s2,
                                      "score_rank": int(core.rank_of(score)[u]) if table is de_rows else r,
                                      "direct_rank": int(de_rank[u]), "top_tokens": None})
                        new_meta.append((table, len(table) - 1, l, u, c))
                if heads:
                    z = acts[("z", l)][pos].float().cpu()                   # [H, d_head]
                    out = torch.einsum("hd,hdm->hm", z, dw.W_O[l])
                    s1 = 1.0
                    if post:
                        s1 = _post_scale(dw, acts, "attn", l, pos, out.sum(0))
                        out = out * dw.attn_post_w[l] / s1
                    hnorm = out.norm(dim=-1)
                    hde = out @ d
                    show = set(core.ranked(hnorm, head_tokens).tolist())
                    for h in range(out.shape[0]):
                        head_rows.append({"prompt": b, "position": pos, "layer": l, "head": h,
                                          "label": f"L{l}H{h}", "norm": float(hnorm[h]),
                                          "direct_effect": float(hde[h]), "post_norm_scale": s1,
                                          "top_tokens": None})
                        if h in show:
                            new_vecs.append(out[h])
                            new_meta.append((head_rows, len(head_rows) - 1, l, None, 1.0))
            # promoted tokens: from the index where it has them, else one batched product
            todo = []
            if n_tokens == 0:
                for table, row, *_ in new_meta:
                    table[row]["top_tokens"] = []
                new_meta, new_vecs = [], []
            for table, row, l, u, c in new_meta:
                if u is not None and index is not None and index.n_tokens >= n_tokens:
                    ids_ = index.promoted(l, u, c, n_tokens)
                    table[row]["top_tokens"] = token_strs(backend, ids_)
                elif u is not None:
                    todo.append((table, row, dw.W_out[l, u] * (1.0 if c >= 0 else -1.0)))
            vecs = [v for _, _, v in todo] + new_vecs
            if vecs:
                got = _top_tokens_of(torch.stack(vecs), basis, n_tokens)
                targets_ = [(t, r) for t, r, _ in todo] + [(t, r) for t, r, l, u, c in new_meta if u is None]
                for (table, row), ids_ in zip(targets_, got.tolist()):
                    table[row]["top_tokens"] = token_strs(backend, ids_)
    cols = ["prompt", "position", "layer", "unit", "label", "coefficient", "norm", "score", "direct_effect",
            "rank", "score_rank", "direct_rank", "post_norm_scale", "top_tokens"]
    meta = {"norm": f"{dw.norm_kind} final norm, scale frozen at the final residual (sigma_final)"
                    + ("; post-attention and post-MLP RMS norms, scales frozen per position (post_norm_scale)"
                       if post else ""),
            "weights": dw.processing, "n_layers": L, "d_mlp": dw.d_mlp, "index": index is not None}
    return TraceResult(tokens=all_tokens, token_ids=all_ids, sub_updates=pd.DataFrame(sub_rows, columns=cols),
                       by_direct_effect=pd.DataFrame(de_rows, columns=cols), layers=pd.DataFrame(layer_rows),
                       heads=pd.DataFrame(head_rows, columns=["prompt", "position", "layer", "head", "label",
                                                              "norm", "direct_effect", "post_norm_scale",
                                                              "top_tokens"]),
                       targets=pd.DataFrame(tgt_rows), k=k, meta=meta)


def coefficients(model: Any, prompt_or_tokens: Any, layer: int) -> torch.Tensor:
    """``hook_post`` of ``layer`` for every position of one prompt: [pos, d_mlp] (where a unit is active)."""
    dw = debug_weights(model)
    layer = dw.backend.check_layer(layer)
    rows = to_token_rows(dw.backend, prompt_or_tokens)
    if len(rows) != 1:
        raise ValueError("prompt_or_tokens: one prompt expected")
    store = {}

    def fn(t, hook):
        store["x"] = t.detach()[0]

    with torch.no_grad(), dw.backend.hooks([(dw.backend.hook_name("mlp_post", layer), fn)]):
        dw.backend.run(rows[0][None].to(dw.backend.device), stop_at_layer=layer + 1)
    return store["x"].float().cpu()
