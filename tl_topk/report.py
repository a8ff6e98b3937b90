"""The topk section of ``tl-plugins report``: perplexity vs k, pattern sparsity per layer, and
extra memory vs sequence length (top-k against dense), all measured while the report runs."""

from __future__ import annotations

import html

import tl_plugins


def report_section(report) -> None:
    """Add three sections; ``report.quick`` keeps sizes small (well under a minute)."""
    import plotly.graph_objects as go

    from tl_plugins.bench import BenchResult
    from tl_topk.analysis import docs_tokens, pattern_sparsity, perplexity_sweep
    from tl_topk.bench import bench_memory

    model, name = report.model, report.model_name
    if tl_plugins.active(model).get("topk") is not None:
        report.add_section("Top-k attention", html="<p>skipped: the topk plugin is already enabled on the model</p>",
                           order=30)
        return
    quick = report.quick
    n_tokens = 64 if quick else 256
    ks = [8, 32, "n"] if quick else [4, 8, 16, 32, 64, 128, "n"]
    tokens = docs_tokens(model, min(n_tokens, model.cfg.n_ctx))
    sweep = perplexity_sweep(model, tokens, ks, model_name=name, progress=report.progress)
    report.add_section(
        "Top-k: perplexity vs k",
        html=(f"<p>Perplexity of {html.escape(name)} on {tokens.shape[1]} tokens of the standard library's "
              "Python documentation (<code>pydoc_data.topics</code>) with top-k attention, top-k feed-forward "
              f"(largest gate/pre-activations), and both. Dense: {sweep.dense:.3f}. 'n' = dense.</p>"),
        figures=[sweep.figure()], tables=[sweep.to_frame()], order=30,
    )

    sp = pattern_sparsity(model, tokens, 8 if quick else 32, model_name=name)
    report.add_section(
        "Top-k: pattern sparsity per layer",
        html=(f"<p>With top-{sp.k} attention every pattern row has at most {sp.k} non-zeros. The bars show how "
              "much of each layer's <em>dense</em> attention mass lies inside its top k keys (mean over "
              "heads and rows): layers near 1 lose little to top-k.</p>"),
        figures=[sp.figure()], tables=[sp.to_frame()], order=31,
    )

    mem = BenchResult("topk-memory")
    ns = [128, 256, 512] if quick else [512, 1024, 2048, 4096]
    bench_memory(mem, ns, dense_max_n=ns[-1], k_top=32, device="cpu", progress=report.progress)
    df = mem.to_frame()
    fig = go.Figure([
        go.Scatter(x=df["n"], y=df["extra_MiB"], mode="lines+markers", name="top-32 chunked"),
        go.Scatter(x=df["n"], y=df["dense_MiB"], mode="lines+markers", name="dense (torch math)"),
    ])
    fig.update_layout(title="Peak extra memory, one SmolLM2-shaped attention layer, forward + backward",
                      xaxis_title="sequence length n", yaxis_title="MiB (resident set)", xaxis_type="log",
                      yaxis_type="log", height=380)
    report.add_section(
        "Top-k: extra memory vs sequence length",
        html=(f"<p>{html.escape(mem.device)}; fp32, batch 1, 9 heads over 3 K/V heads, d_head 64, causal. "
              "Peak resident-set growth during one forward + backward, read from the kernel's high-water mark "
              "(VmHWM) in a fresh process.</p>"),
        figures=[fig], tables=[df], order=32,
    )
