"""The ``embedspace`` section of ``tl-plugins report``: copying-score heatmap, top OV/QK pairs of the
most notable heads, top value tokens of late-layer neurons, and the paper's evaluations vs baselines.

Vocabulary-space tables use the ``corpus`` token filter by default (whole words of the standard
library's documentation, ``tl_embedspace.filters``), as the paper kept the tokens of its IMDB corpus;
``report.options["embedspace_filter"] = "none"`` (or another filter name) shows every token. The filter
is written into every table (``filter`` column) and into the section's text. The evaluations are
computed over the whole vocabulary, as before, so their numbers do not depend on the filter.
"""

from __future__ import annotations

import html
import time

import torch


def report_section(report) -> None:
    import pandas as pd
    import plotly.graph_objects as go

    from tl_embedspace.config import space_for
    from tl_embedspace.evaluations import hidden_state_overlap, related_pairs
    from tl_embedspace.space import resolve_filter, space_with_filter
    from tl_plugins.corpus import docs_tokens

    quick = report.quick
    asked = report.options.get("embedspace_filter", "auto")
    filt = resolve_filter(asked, report.model)
    sp_all = space_for(report.model)
    sp = sp_all
    if filt is not None:
        base = {k: getattr(sp_all, k) for k in ("read_basis", "write_basis", "ln")}
        sp = space_with_filter(report.model, filt, auto=asked == "auto", budget_bytes=sp_all.budget_bytes, **base)
    filter_desc = sp.basis["filter"]
    L, H = sp.n_layers, sp.n_heads

    scores = sp_all.copying_scores()
    fig = go.Figure(go.Heatmap(z=scores.numpy(), x=[f"H{h}" for h in range(H)], y=[f"L{l}" for l in range(L)],
                               colorscale="RdBu", zmid=0, zmin=-1, zmax=1,
                               colorbar={"title": "copying score"}))
    fig.update_layout(title="OV copying score per head (eigenvalues of W_U^T W_OV W_E; 1 = copies its input)",
                      height=max(300, 18 * L + 120), yaxis={"autorange": "reversed"},
                      xaxis_title="head", yaxis_title="layer")

    n_heads = 2 if quick else 4
    flat = scores.flatten()
    notable = torch.argsort(-flat.abs(), stable=True)[:n_heads].tolist()
    k = 8 if quick else 15
    pair_tables, head_seconds = [], []
    for idx in report.progress(notable, desc="embedspace: notable heads"):
        l, h = divmod(idx, H)
        for name, mat in (("OV", sp.ov(l, h)), ("QK", sp.qk(l, h))):
            t0 = time.perf_counter()
            df = mat.topk_pairs(k).to_frame()[["rank", "row_token", "col_token", "value"]]
            head_seconds.append(time.perf_counter() - t0)
            df.insert(0, "circuit", f"{name} L{l}H{h} (copying {float(scores[l, h]):+.2f})")
            df["filter"] = filter_desc
            pair_tables.append(df)
    pairs = pd.concat(pair_tables, ignore_index=True)
    first = pair_tables[0]
    same = int((first["row_token"] == first["col_token"]).sum())

    neuron_rows = []
    if sp.w.d_mlp is not None:
        layers = sorted({L // 2, L - 2, L - 1}) if quick else sorted({L // 2, (3 * L) // 4, L - 2, L - 1})
        g = torch.Generator().manual_seed(0)
        per = 1 if quick else 3
        for l in report.progress(layers, desc="embedspace: neurons"):
            for n in torch.randperm(sp.w.d_mlp, generator=g)[:per].tolist():
                r = sp.ff_value(l, n, k=6)
                neuron_rows.append({"neuron": f"L{l}N{n}", "top value tokens": " | ".join(r.top_tokens),
                                    "bottom": " | ".join(r.bottom_tokens[:3]), "filter": filter_desc})
    neurons = pd.DataFrame(neuron_rows)

    eval_layers = sorted({0, L // 2, L - 1}) if quick else sorted({0, L // 4, L // 2, (3 * L) // 4, L - 1})
    rp = related_pairs(sp_all, k=50 if quick else 100, layers=eval_layers, max_vectors=8 if quick else 48)
    tables = [rp.summary()]
    if sp.w.d_mlp is not None:
        ho = hidden_state_overlap(sp_all, docs_tokens(report.model, 24 if quick else 96), layers=eval_layers)
        tables.append(ho.summary())
    evals = pd.concat(tables, ignore_index=True)
    evals["filter"] = "none (whole vocabulary)"

    n_copy = int((scores > 0.5).sum())
    top_l, top_h = divmod(notable[0], H)
    best = evals.loc[evals["ratio"].idxmax()] if evals["ratio"].notna().any() else None
    summary = (
        f"{n_copy} of {L * H} heads have an OV copying score above 0.5; the strongest, L{top_l}H{top_h} "
        f"({float(scores[top_l, top_h]):+.2f}), maps {same} of its top {k} token pairs onto themselves "
        f"(filter: {filter_desc}). "
        + ("" if best is None else
           f"Related parameters agree above their shuffled baselines, most in '{best['evaluation']}' "
           f"({best['ratio']:.1f}x baseline). " if best["ratio"] >= 1.2 else
           f"Related parameters do not clearly beat their shuffled baselines (best: '{best['evaluation']}', "
           f"{best['ratio']:.2f}x). ")
        + f"Exact top-{k} over {sp.d_vocab:,} x {sp.d_vocab:,} took a median "
        f"{sorted(head_seconds)[len(head_seconds) // 2]:.2f} s per circuit here.")
    report.metric("heads with copying score > 0.5", f"{n_copy} / {L * H}")
    report.metric("embedspace token filter", filter_desc)
    report.metric("exact top-k OV/QK pairs, median s per circuit",
                  round(sorted(head_seconds)[len(head_seconds) // 2], 2))

    intro = (f"<p>Every weight read in vocabulary space (Dar et al. 2023). Bases: "
             f"{html.escape(', '.join(f'{k}={v}' for k, v in sp.basis.items()))}. Pairs are exact top-{k} "
             "entries of vocab x vocab circuits computed by streaming (never materialised). Token filter: "
             f"<code>{html.escape(filter_desc)}</code> (tokens that occur as whole words in the standard "
             "library's documentation; the report option <code>embedspace_filter='none'</code> and the CLI's "
             "<code>--filter none</code> show every token). Tables: top OV/QK pairs of the heads with the "
             "largest |copying score|; top value tokens of sampled mid and late-layer neurons; the paper's "
             "evaluations (score vs baseline, over the whole vocabulary).</p>")
    report.add_section("Embedding space (tl_embedspace)", html=intro, figures=[fig], summary=summary,
                       tables=[pairs, neurons, evals],
                       table_titles=["top OV/QK pairs of notable heads", "neuron value tokens",
                                     "evaluations vs baselines"], order=40, max_rows=2 * k)
