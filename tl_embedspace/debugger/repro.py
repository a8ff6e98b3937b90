"""The method paper's checks (Geva, Caciularu, Wang, Goldberg, EMNLP 2022) on any model, one
function each (``tl-plugins debug --model NAME repro promotion|saturation|coherence|intervention``):

(a) ``promotion``: token scores ``e_w . m_i v_i`` (``e_w`` the input embedding, as in the paper) of
    the tokens a sub-update promotes most (its top-30) and of the tokens the FFN eliminated (top-30
    before the FFN, out of the top-30 after it), for the 10 dominant sub-updates (by score) and for
    10 random ones, at the last position of text prompts;
(b) ``saturation``: per layer, saturation events (the final prediction is top-1 before and after
    this FFN and stays top-1) and elimination events (the top-1 before this FFN is no longer top-1
    after it), with the logit lens;
(c) ``coherence``: a proxy for the annotators' "concepts": the mean pairwise cosine of the input
    embeddings of a value's top-30 tokens, against random vectors of matched norm;
(d) ``intervention``: the values that promote a token set most (``ValueIndex.search``) set to 0
    (suppress) or to a coefficient of +3 (promote) at every position; the change of the set's
    probability on a prompt set and the perplexity on the standard library's documentation text.

Prompts and text come from ``pydoc_data.topics`` (text no one here wrote) except (d)'s prompt set.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tl_embedspace.debugger.model import debug_weights
from tl_embedspace.debugger.trace import run_and_collect
from tl_plugins.corpus import docs_text
from tl_plugins.ranking import top_k


def _chunks(model: Any, n: int, length: int, skip: int = 0) -> list[torch.Tensor]:
    be = debug_weights(model).backend
    ids = be.to_tokens(docs_text(400_000, sep="\n\n")[:400_000])[0].cpu()
    step = max(length, (ids.numel() - length) // max(n, 1))
    return [ids[skip + i * step: skip + i * step + length] for i in range(n)
            if skip + i * step + length <= ids.numel()]


def promotion(model: Any, *, quick: bool = False, n_prompts: int = None, seed: int = 0) -> dict:
    dw = debug_weights(model)
    be, L = dw.backend, dw.n_layers
    n_prompts = n_prompts or (6 if quick else 40)
    g = torch.Generator().manual_seed(seed)
    E = dw.W_E                                                   # [V, d]
    rows = {kind: {"promoted": [], "eliminated": [], "all_mean": []} for kind in ("top10", "random10")}
    per_layer = [[] for _ in range(L)]
    for toks in _chunks(model, n_prompts, 24):
        _, acts = run_and_collect(model, toks[None], ["resid_mid", "resid_post", "mlp_post"])
        for l in range(L):
            coef = acts[("mlp_post", l)][-1].float().cpu()
            with torch.no_grad():
                lens = be.readout(torch.stack([acts[("resid_mid", l)][-1], acts[("resid_post", l)][-1]])).float().cpu()
            before, after = top_k(lens[0], 30)[1], top_k(lens[1], 30)[1]
            elim = before[~torch.isin(before, after)]
            score = coef.abs() * dw.value_norms[l]
            top = torch.argsort(-score, stable=True)[:10]
            rnd = torch.randperm(dw.d_mlp, generator=g)[:10]
            for kind, units in (("top10", top), ("random10", rnd)):
                S = (coef[units, None] * dw.W_out[l, units]) @ E.T        # [10, V]
                rows[kind]["promoted"].append(float(S.topk(30, dim=1).values.mean()))
                rows[kind]["all_mean"].append(float(S.mean()))
                if elim.numel():
                    rows[kind]["eliminated"].append(float(S[:, elim].mean()))
                if kind == "top10":
                    per_layer[l].append(float(S.topk(30, dim=1).values.mean()))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    out = {k: {kk: mean(v) for kk, v in d.items()} for k, d in rows.items()}
    out["per_layer_promoted_top10"] = [mean(x) for x in per_layer]
    out["n_prompts"] = n_prompts
    t = out["top10"]
    out["claims"] = {
        "promoted tokens of dominant sub-updates score far above those of random ones":
            t["promoted"] > 3 * out["random10"]["promoted"],
        "eliminated tokens score about 0 (|mean| < 10% of the promoted mean)":
            abs(t["eliminated"]) < 0.1 * abs(t["promoted"]),
    }
    return out


def saturation(model: Any, *, quick: bool = False, n_prompts: int = None) -> dict:
    dw = debug_weights(model)
    be, L = dw.backend, dw.n_layers
    n_prompts = n_prompts or (8 if quick else 60)
    sat, eli, n = [0] * L, [0] * L, 0
    for toks in _chunks(model, n_prompts, 24, skip=7):
        logits, acts = run_and_collect(model, toks[None], ["resid_mid", "resid_post"])
        for pos in ([-1] if quick else [-1, -5, -9]):
            n += 1
            final = int(logits[pos].argmax())
            stack = torch.stack([acts[(k, l)][pos] for l in range(L) for k in ("resid_mid", "resid_post")])
            with torch.no_grad():
                top1 = be.readout(stack).argmax(-1).view(L, 2).cpu()
            stays = [bool((top1[l:, 1] == final).all()) for l in range(L)]
            for l in range(L):
                if top1[l, 0] == final and stays[l]:
                    sat[l] += 1
                elif top1[l, 0] != top1[l, 1]:
                    eli[l] += 1
    return {"n_positions": n, "saturation_per_layer": sat, "elimination_per_layer": eli,
            "saturation_total": sum(sat[:-1]), "elimination_total": sum(eli),
            "claims": {"saturation events outnumber elimination events (layers before the last)":
                       sum(sat[:-1]) > sum(eli[:-1])}}


def _coherence(ids: torch.Tensor, En: torch.Tensor) -> torch.Tensor:
    X = En[ids]                                                   # [n, 30, d]
    G = X @ X.transpose(1, 2)
    k = ids.shape[1]
    return (G.sum((1, 2)) - k) / (k * (k - 1))


def coherence(model: Any, *, quick: bool = False, per_layer: int = None, seed: int = 0) -> dict:
    dw = debug_weights(model)
    L = dw.n_layers
    per_layer = per_layer or (8 if quick else 64)
    g = torch.Generator().manual_seed(seed)
    En = dw.W_E / dw.W_E.norm(dim=1, keepdim=True).clamp_min(1e-12)
    B = dw.readout_basis()
    real, rand, above = [], [], []
    for l in range(L):
        units = torch.randperm(dw.d_mlp, generator=g)[:per_layer]
        V = dw.W_out[l, units]
        R = torch.randn(V.shape, generator=g)
        R = R / R.norm(dim=1, keepdim=True) * V.norm(dim=1, keepdim=True)
        cr = _coherence(top_k(V @ B, 30, dim=1)[1], En)
        cn = _coherence(top_k(R @ B, 30, dim=1)[1], En)
        real.append(float(cr.mean()))
        rand.append(float(cn.mean()))
        above.append(float((cr > torch.quantile(cn, 0.95)).float().mean()))
    lay = torch.arange(L, dtype=torch.float64)
    corr = float(torch.corrcoef(torch.stack([lay, torch.tensor(real, dtype=torch.float64)]))[0, 1])
    return {"per_layer_real": real, "per_layer_random": rand, "per_layer_share_above_random_p95": above,
            "mean_real": sum(real) / L, "mean_random": sum(rand) / L, "layer_correlation": corr,
            "claims": {"value top tokens are more coherent than random vectors of matched norm":
                       sum(real) / L > sum(rand) / L,
                       "coherence rises with depth (corr(layer, coherence) > 0)": corr > 0}}


CAPITALS = [" Paris", " London", " Rome", " Berlin", " Madrid"]
CAPITAL_PROMPTS = [
    "The capital of France is", "The capital of England is", "The capital of Italy is",
    "The capital of Germany is", "The capital of Spain is", "The Eiffel Tower is in the city of",
    "Big Ben is a clock tower in", "The Colosseum is an ancient amphitheatre in",
    "The Brandenburg Gate stands in", "The Prado museum is located in", "She moved to France and lives in",
    "The Louvre is a museum in",
]


def _set_prob(model: Any, prompts: list, ids: list) -> float:
    be = debug_weights(model).backend
    tot = 0.0
    for p in prompts:
        with torch.no_grad():
            lp = be.run(be.to_tokens(p))[0, -1].float().log_softmax(-1)
        tot += float(lp[ids].exp().sum())
    return tot / len(prompts)


def _ppl(model: Any, chunks: list) -> float:
    be = debug_weights(model).backend
    nll, n = 0.0, 0
    for c in chunks:
        with torch.no_grad():
            lp = be.run(c[None])[0].float().log_softmax(-1)
        nll -= float(lp[:-1].gather(1, c[1:, None]).sum())
        n += c.numel() - 1
    return math.exp(nll / n)


def intervention(model: Any, *, quick: bool = False, tokens: list = None, n_values: int = 10,
                 promote_value: float = 3.0) -> dict:
    import tl_plugins
    from tl_embedspace.debugger.index import ValueIndex
    from tl_embedspace.debugger.model import resolve_tokens

    dw = debug_weights(model)
    tokens = tokens or CAPITALS
    ids = resolve_tokens(dw.backend, tokens, "tokens")
    idx = ValueIndex.cached(model) or ValueIndex.load(model)
    found = idx.search(tokens, k=n_values)
    prompts = CAPITAL_PROMPTS[:4] if quick else CAPITAL_PROMPTS
    text = _chunks(model, 2 if quick else 8, 128 if quick else 256, skip=3)
    base_p, base_ppl = _set_prob(model, prompts, ids), _ppl(model, text)
    out = {"tokens": tokens, "values": found.label.tolist(), "search_scores": [round(x, 2) for x in found.score],
           "prompts": len(prompts), "ppl_tokens": sum(c.numel() for c in text),
           "baseline": {"set_probability": base_p, "perplexity": base_ppl}}
    for name, value in (("suppress (set 0)", 0.0), (f"promote (set {promote_value:+g})", promote_value)):
        ivs = [{"layer": int(r.layer), "unit": int(r.unit), "op": "set", "value": value, "positions": "all"}
               for r in found.itertuples()]
        with tl_plugins.enabled(model, "steer", interventions=ivs):
            p, ppl = _set_prob(model, prompts, ids), _ppl(model, text)
        out[name] = {"set_probability": p, "change": p - base_p, "perplexity": ppl,
                     "perplexity_cost": ppl / base_ppl - 1}
    sup = out["suppress (set 0)"]
    pro = out[f"promote (set {promote_value:+g})"]
    out["claims"] = {"suppressing the searched values lowers the set's probability": sup["change"] < 0,
                     "promoting them raises it": pro["change"] > 0,
                     "at a perplexity cost under 10% (suppress)": sup["perplexity_cost"] < 0.10,
                     "at a perplexity cost under 10% (promote)": pro["perplexity_cost"] < 0.10}
    return out


def render(name: str, res: dict) -> str:
    import json

    lines = [f"== repro {name} =="]
    for k, v in res.items():
        if k == "claims":
            continue
        if isinstance(v, list) and v and isinstance(v[0], float):
            v = "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
        elif isinstance(v, dict):
            v = json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in v.items()})
        elif isinstance(v, float):
            v = f"{v:.4g}"
        lines.append(f"{k}: {v}")
    for claim, ok in res.get("claims", {}).items():
        lines.append(f"  {'HOLDS' if ok else 'DOES NOT HOLD'}: {claim}")
    return "\n".join(lines)
