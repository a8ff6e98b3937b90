"""The ``embedspace`` section of ``tl-plugins report``: copying-score heatmap, top OV/QK pairs of the
most notable heads, top value tokens of sampled neurons, and the paper's evaluations vs baselines."""

from __future__ import annotations

import html

import torch


def _text_tokens(sp, n: int) -> torch.Tensor:
    if sp.tokenizer is not None:
        from pydoc_data.topics import topics

        text = " ".join(topics[k] for k in sorted(topics)[:3])
        ids = sp.tokenizer.encode(text, add_special_tokens=False)[:n]
        return torch.tensor(ids)[None]
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, sp.d_vocab, (1, n), generator=g)


def report_section(report) -> None:
    import pandas as pd
    import plotly.graph_objects as go

    from tl_embedspace.config import space_for
    from tl_embedspace.evaluations import hidden_state_overlap, related_pairs

    quick = report.quick
    sp = space_for(report.model)
    L, H = sp.n_layers, sp.n_heads

    scores = sp.copying_scores()
    fig = go.Figure(go.Heatmap(z=scores.numpy(), x=[f"H{h}" for h in range(H)], y=[f"L{l}" for l in range(L)],
                               colorscale="RdBu", zmid=0, zmin=-1, zmax=1,
                               colorbar={"title": "copying"}))
    fig.update_layout(title="OV copying score (eigenvalues) per head", height=max(300, 18 * L + 120),
                      yaxis={"autorange": "reversed"})

    n_heads = 2 if quick else 4
    flat = scores.flatten()
    notable = torch.argsort(-flat.abs(), stable=True)[:n_heads].tolist()
    k = 8 if quick else 15
    pair_tables = []
    for idx in report.progress(notable, desc="embedspace: notable heads"):
        l, h = divmod(idx, H)
        for name, mat in (("OV", sp.ov(l, h)), ("QK", sp.qk(l, h))):
            df = mat.topk_pairs(k).to_frame()[["rank", "row_token", "col_token", "value"]]
            df.insert(0, "circuit", f"{name} L{l}H{h} (copying {float(scores[l, h]):+.2f})")
            pair_tables.append(df)
    pairs = pd.concat(pair_tables, ignore_index=True)

    neuron_rows = []
    if sp.w.d_mlp is not None:
        layers = sorted({0, L // 2, L - 1}) if quick else list(range(L))
        g = torch.Generator().manual_seed(0)
        per = 1 if quick else 2
        for l in report.progress(layers, desc="embedspace: neurons"):
            for n in torch.randperm(sp.w.d_mlp, generator=g)[:per].tolist():
                r = sp.ff_value(l, n, k=6)
                neuron_rows.append({"neuron": f"L{l}N{n}", "top value tokens": " | ".join(r.top_tokens),
                                    "bottom": " | ".join(r.bottom_tokens[:3])})
    neurons = pd.DataFrame(neuron_rows)

    eval_layers = sorted({0, L // 2, L - 1}) if quick else sorted({0, L // 4, L // 2, (3 * L) // 4, L - 1})
    rp = related_pairs(sp, k=50 if quick else 100, layers=eval_layers, max_vectors=8 if quick else 48)
    tables = [rp.summary()]
    if sp.w.d_mlp is not None:
        ho = hidden_state_overlap(sp, _text_tokens(sp, 24 if quick else 96), layers=eval_layers)
        tables.append(ho.summary())
    evals = pd.concat(tables, ignore_index=True)

    intro = (f"<p>Every weight read in vocabulary space (Dar et al. 2023). Bases: "
             f"{html.escape(', '.join(f'{k}={v}' for k, v in sp.basis.items()))}. Pairs are exact top-{k} "
             "entries of vocab x vocab circuits computed by streaming (never materialised). Tables: "
             "top OV/QK pairs of the heads with the largest |copying score|; top value tokens of sampled "
             "neurons; the paper's evaluations (score vs baseline).</p>")
    report.add_section("Embedding space (tl_embedspace)", html=intro, figures=[fig],
                       tables=[pairs, neurons, evals], order=40)
