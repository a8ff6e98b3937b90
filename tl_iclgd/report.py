"""The iclgd section of ``tl-plugins report``: ZSL, ICL, GD and LCGD on a task, per-layer similarity
figures (trained vs untrained baselines) and two to four sentences computed from its own numbers."""

from __future__ import annotations

import re
from typing import Any, Optional

from tl_iclgd.gd import DEFAULT_LR
from tl_iclgd.tasks import synthetic_task


def _num(x: Any) -> float:
    if isinstance(x, (int, float)):
        return float(x)
    m = re.match(r"\s*(-?[\d.]+(?:e-?\d+)?)", str(x))
    return float(m.group(1)) if m else float("nan")


def summary_sentences(res: Any, curve_df: Optional[Any] = None) -> str:
    t = res.table()
    row = lambda v, m: t[(t["variant"] == v) & (t["method"] == m)]  # noqa: E731
    out = []
    tr = row("trained", "gd")
    if len(tr):
        r = tr.iloc[0]
        zsl, icl, ft = _num(r["ZSL_acc"]), _num(r["ICL_acc"]), _num(r["FT_acc"])
        out.append(f"Accuracy: zero-shot {zsl:.2f}, in-context {icl:.2f}, fine-tuned (GD) {ft:.2f}"
                   + (" — fine-tuning learned nothing here, so Rec2FTP and SimAM say little."
                      if ft <= zsl else "."))
        sim, simr = _num(r["SimAOU"]), _num(r["SimAOU_random"])
        out.append(f"SimAOU (GD) is {sim:.3f} against {simr:.3f} for random updates; SimAM_delta {_num(r['SimAM_delta']):+.3f}.")
    un = row("untrained", "gd")
    if len(tr) and len(un):
        a, b = _num(tr.iloc[0]["SimAOU"]), _num(un.iloc[0]["SimAOU"])
        out.append(f"An untrained model scores SimAOU {b:.3f} ({'as high or higher' if b >= a else 'lower'}), "
                   + ("so the metric does not by itself show a learned ICL-GD agreement."
                      if b >= 0.8 * a else "so part of the agreement is learned."))
    if curve_df is not None and len(curve_df):
        c = curve_df.sort_values("n_demos")
        out.append(f"ICL accuracy rises from {c['accuracy'].iloc[0]:.2f} at {int(c['n_demos'].iloc[0])} "
                   f"demonstrations to {c['accuracy'].iloc[-1]:.2f} at {int(c['n_demos'].iloc[-1])}.")
    return " ".join(out[:4])


def _layer_figure(layer_df, metric: str, title: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    for (variant, method), d in layer_df[layer_df.metric == metric].groupby(["variant", "method"], sort=False):
        fig.add_trace(go.Scatter(x=d.layer, y=d["mean"], mode="lines+markers", name=f"{method} / {variant}",
                                 line=dict(dash="solid" if variant == "trained" else "dot")))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title=metric, height=380,
                      margin=dict(l=50, r=20, t=50, b=40))
    return fig


def report_section(report) -> None:
    """The "ICL vs GD" section: ZSL/ICL/GD/LCGD on a task, per-layer similarity plots, a summary."""
    import plotly.graph_objects as go

    from tl_iclgd.capture import backend_of
    from tl_iclgd.compare import compare, icl_accuracy_curve
    from tl_iclgd.gd import GDConfig, check_unprocessed
    from tl_iclgd.threads import torch_threads

    model = report.model
    try:
        check_unprocessed(model)
    except ValueError as exc:
        report.add_section("ICL vs GD", html=f"<p>Skipped: {exc}</p>", order=60)
        return
    be = backend_of(model)
    has_tok = be.tokenizer is not None
    quick = report.quick
    n_demos, n_queries = (4, 8) if quick else (16, 50)
    task = "antonyms" if has_tok else synthetic_task(be.d_vocab, n_demos, n_queries)
    res = None
    for _ in report.progress([0], desc="iclgd compare"):
        res = compare(model, task, GDConfig(lr=DEFAULT_LR), methods=("gd", "lcgd"), n_demos=n_demos,
                      n_queries=n_queries, seeds=(0,), baselines=("untrained", "untrained_embeddings"),
                      num_threads=1)
    layer_df = res.to_frame("layer")
    figs = [
        _layer_figure(layer_df, "SimAOU", "SimAOU (raw) per layer: GD and LCGD, trained vs untrained"),
        _layer_figure(layer_df, "SimAOU_norm", "SimAOU_norm (original codes' normalisation) per layer"),
        _layer_figure(layer_df, "SimAM_delta", "SimAM_delta per layer"),
    ]
    html = (f"<p>Task <code>{res.settings['task']}</code>, {n_demos} demonstrations, {n_queries} queries, "
            f"lr {DEFAULT_LR}, K/V of every layer, seed 0. Dotted lines: untrained baselines (all random, or "
            "trained embeddings with random blocks), one seeded initialisation shared by their ZSL, ICL and FT "
            "runs. Scores near the trained model's for the baselines mean the metric does not show that ICL "
            "and GD agree for a learned reason (Deutch et al. 2024).</p>")
    tables = [res.table()]
    if has_tok:
        with torch_threads(1):
            curve = icl_accuracy_curve(model, "antonyms", n_demos=(0, 2, 4) if quick else (0, 1, 2, 4, 8, 16),
                                       n_queries=8 if quick else 20)
        cdf = curve.to_frame()
        fig = go.Figure(go.Scatter(x=cdf.n_demos, y=cdf.accuracy, mode="lines+markers"))
        fig.update_layout(title="ICL accuracy vs number of demonstrations (antonyms)", xaxis_title="demonstrations",
                          yaxis_title="accuracy", height=340, yaxis_range=[0, 1.05])
        figs.append(fig)
        tables.append(cdf)
    report.add_section("ICL vs GD (Deutch et al. 2024)", html=html, figures=figs, tables=tables, order=60,
                       summary=summary_sentences(res, tables[1] if len(tables) > 1 else None))
