"""The topk section of ``tl-plugins report``: perplexity vs k (attention and feed-forward on separate
panels), pattern sparsity per layer, and extra memory vs sequence length (top-k against dense), all
measured while the report runs. Each section opens with sentences computed from its own numbers."""

from __future__ import annotations

import html

import tl_plugins


def _within(df, mode: str, dense: float, tol: float = 0.05):
    """Smallest numeric k whose perplexity is within ``tol`` of dense, or None."""
    d = df[(df["mode"] == mode) & (df["k"] != "n")]
    ok = [int(k) for k, p in zip(d["k"], d["perplexity"]) if p <= dense * (1 + tol)]
    return min(ok) if ok else None


def _ratio_at(df, mode: str, k: int):
    d = df[(df["mode"] == mode) & (df["k"].astype(str) == str(k))]
    return float(d["ratio"].iloc[0]) if len(d) else None


def sweep_figure(sweep):
    """Three panels (attention, feed-forward, both), each with its own y axis and the dense line."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    df = sweep.to_frame()
    units = {"attention": "k = keys kept per query", "feed-forward": "k = FF units kept per token",
             "both": "k (both at once)"}
    modes = [m for m in ("attention", "feed-forward", "both") if (df["mode"] == m).any()]
    fig = make_subplots(rows=1, cols=len(modes), subplot_titles=[f"top-k {m}" for m in modes],
                        horizontal_spacing=0.08)
    for i, mode in enumerate(modes, start=1):
        d = df[(df["mode"] == mode) & (df["k"] != "n")]
        fig.add_trace(go.Scatter(x=d["k"].astype(int), y=d["perplexity"], mode="lines+markers", name=mode,
                                 showlegend=False), row=1, col=i)
        fig.add_hline(y=sweep.dense, line_dash="dot", line_color="grey", row=1, col=i,
                      annotation_text=f"dense {sweep.dense:.2f}" if i == 1 else None)
        fig.update_xaxes(title_text=units[mode], type="log", row=1, col=i)
        span = d["perplexity"].max() / max(d["perplexity"].min(), 1e-9) if len(d) else 1
        fig.update_yaxes(type="log" if span > 10 else "linear", row=1, col=i,
                         title_text="perplexity (nats → exp)" if i == 1 else None)
    fig.update_layout(title=f"{sweep.model_name}: perplexity vs k on {sweep.n_tokens} tokens of the Python docs",
                      height=400, margin=dict(l=60, r=20, t=70, b=50))
    return fig


def report_section(report) -> None:
    """Add three sections (perplexity vs k, pattern sparsity, memory vs n); ``report.quick`` keeps
    sizes small (well under a minute)."""
    from tl_topk.analysis import docs_tokens

    model = report.model
    if tl_plugins.active(model).get("topk") is not None:
        report.add_section("Top-k attention", html="<p>skipped: the topk plugin is already enabled on the model</p>",
                           order=30)
        return
    tokens = docs_tokens(model, min(64 if report.quick else 256, model.cfg.n_ctx))
    _perplexity_section(report, tokens)
    _sparsity_section(report, tokens)
    _memory_section(report)


def _perplexity_section(report, tokens) -> None:
    """Section "Top-k: perplexity vs k": attention, feed-forward and both, against dense."""
    from tl_topk.analysis import perplexity_sweep

    model, name = report.model, report.model_name
    ks = [8, 32, "n"] if report.quick else [4, 8, 16, 32, 64, 128, "n"]
    sweep = perplexity_sweep(model, tokens, ks, model_name=name, progress=report.progress)
    df = sweep.to_frame()
    k_ref = 32 if 32 in ks else [k for k in ks if k != "n"][-1]
    ra, rf = _ratio_at(df, "attention", k_ref), _ratio_at(df, "feed-forward", k_ref)
    wa, wf = _within(df, "attention", sweep.dense), _within(df, "feed-forward", sweep.dense)
    cfg = model.cfg
    local = list(getattr(cfg, "attn_types", None) or []).count("local")
    summary = (
        f"Dense perplexity of {name} on {tokens.shape[1]} tokens of the Python docs is {sweep.dense:.2f}. "
        f"Keeping the top {k_ref} keys per query multiplies it by {ra:.3f}; keeping the top {k_ref} "
        f"feed-forward units per token multiplies it by {rf:.3f}. "
        + (f"Attention is within 5% of dense from k = {wa}" if wa else "No tested attention k is within 5% of dense")
        + (f", feed-forward from k = {wf}." if wf else "; no tested feed-forward k is.")
        + (f" The {local} sliding-window layers run top-k over their window only (the windowed route)."
           if local else ""))
    report.metric(f"dense perplexity ({tokens.shape[1]} tokens)", round(sweep.dense, 3))
    report.metric(f"top-{k_ref} attention / dense perplexity", round(ra, 4))
    report.metric(f"top-{k_ref} feed-forward / dense perplexity", round(rf, 4))
    report.add_section(
        "Top-k: perplexity vs k",
        summary=summary,
        html=(f"<p>Perplexity of {html.escape(name)} with top-k attention, top-k feed-forward (largest "
              "gate/pre-activations) and both, on the standard library's Python documentation "
              "(<code>pydoc_data.topics</code>). 'n' = dense; ratio = perplexity / dense.</p>"),
        figures=[sweep_figure(sweep)], tables=[df], table_titles=["perplexity by mode and k"], order=30,
    )


def _sparsity_section(report, tokens) -> None:
    """Section "Top-k: pattern sparsity per layer": the dense attention mass inside each layer's top k."""
    from tl_topk.analysis import pattern_sparsity

    k_sp = 8 if report.quick else 32
    sp = pattern_sparsity(report.model, tokens, k_sp, model_name=report.model_name)
    sdf = sp.to_frame()
    lo = sdf.loc[sdf["dense_mass_in_topk"].idxmin()]
    hi = sdf.loc[sdf["dense_mass_in_topk"].idxmax()]
    summary = (f"On average {sdf['dense_mass_in_topk'].mean():.1%} of each layer's dense attention lies in its "
               f"top {k_sp} keys (of {tokens.shape[1]}). The most diffuse layer is {int(lo['layer'])} "
               f"({lo['dense_mass_in_topk']:.1%}), the most concentrated {int(hi['layer'])} "
               f"({hi['dense_mass_in_topk']:.1%}); with top-{k_sp} every row keeps at most "
               f"{int(sdf['max_nonzeros'].max())} keys.")
    report.metric(f"mean dense attention mass in top-{k_sp}", round(float(sdf["dense_mass_in_topk"].mean()), 3))
    fig = sp.figure()
    fig.update_layout(yaxis_title=f"share of dense attention mass in the top {k_sp} keys",
                      xaxis_title="layer", yaxis_tickformat=".0%")
    report.add_section(
        "Top-k: pattern sparsity per layer", summary=summary,
        html=(f"<p>With top-{sp.k} attention every pattern row has at most {sp.k} non-zeros. The bars show how "
              "much of each layer's <em>dense</em> attention mass lies inside its top k keys (mean over "
              "heads and rows): layers near 1 lose little to top-k.</p>"),
        figures=[fig], tables=[sdf], table_titles=["per layer"], order=31,
    )


def _memory_section(report) -> None:
    """Section "Top-k: extra memory vs sequence length": one SmolLM2-shaped layer, top-32 (the backend
    ``auto`` runs on the CPU) vs SDPA vs dense."""
    import plotly.graph_objects as go

    from tl_plugins.bench import BenchResult
    from tl_topk.bench import bench_memory

    mem = BenchResult("topk-memory")
    ns = [128, 256, 512] if report.quick else [512, 1024, 2048, 4096]
    bench_memory(mem, ns, dense_max_n=ns[-1], k_top=32, device="cpu", progress=report.progress)
    mdf = mem.to_frame()
    big = mdf.iloc[-1]
    ratio = float(big["dense_MiB"]) / max(float(big["extra_MiB"]), 1e-9)
    label = f"top-32 {str(big['method']).removeprefix('topk-')}"
    summary = (f"At n = {int(big['n'])} one attention layer's forward + backward needs {big['extra_MiB']:.0f} MiB "
               f"extra with {label} attention against {big['dense_MiB']:.0f} MiB dense "
               f"({ratio:.1f}x less) and {big['sdpa_MiB']:.0f} MiB with SDPA ({big['ratio_to_sdpa']:.2f}x top-k / SDPA). "
               "Top-k and SDPA memory grow linearly in n, dense quadratically.")
    report.metric(f"attention memory dense / top-32 at n={int(big['n'])}", round(ratio, 1))
    fig = go.Figure([
        go.Scatter(x=mdf["n"], y=mdf["extra_MiB"], mode="lines+markers", name=label),
        go.Scatter(x=mdf["n"], y=mdf["sdpa_MiB"], mode="lines+markers", name="SDPA (fused, causal)"),
        go.Scatter(x=mdf["n"], y=mdf["dense_MiB"], mode="lines+markers", name="dense (torch math)"),
    ])
    fig.update_layout(title="Peak extra memory, one SmolLM2-shaped attention layer, forward + backward",
                      xaxis_title="sequence length n (tokens)", yaxis_title="peak extra memory (MiB, resident set)",
                      xaxis_type="log", yaxis_type="log", height=380)
    report.add_section(
        "Top-k: extra memory vs sequence length", summary=summary,
        html=(f"<p>{html.escape(mem.device)}; fp32, batch 1, 9 heads over 3 K/V heads, d_head 64, causal "
              "(the same layer shape for every model, so columns compare the method, not the model). "
              "Peak resident-set growth during one forward + backward, read from the kernel's high-water mark "
              "(VmHWM), each method and n in a fresh process of its own.</p>"),
        figures=[fig], tables=[mdf], table_titles=["memory by n"], order=32,
    )
