"""tl_plugins hooks for "iclgd": registration, the ``tl-plugins iclgd`` commands, the benchmark, the report.

"iclgd" observes and never changes the forward pass (``changes_forward=False``). Enabling it only
stores default fine-tuning settings: ``tl_plugins.enable(model, "iclgd", lr=1e-3)`` makes
``tl_iclgd.compare(model, task)`` use ``GDConfig(lr=1e-3)`` when no ``gd=`` is given.
"""

from __future__ import annotations

import time

import click

from tl_plugins import cli_checks, hookimpl

DEFAULT_LR = 0.1


@hookimpl
def tl_plugins_register(register):
    from tl_iclgd.gd import GDConfig

    register("iclgd", config=GDConfig, changes_forward=False,
             summary="ICL vs gradient descent on cached activations: vanilla GD, layer-causal GD, metrics, baselines")


@hookimpl
def tl_plugins_enable(model, name, config, backend):
    return True  # nothing to install: the config is kept by the host (tl_plugins.active)


# -- command line -----------------------------------------------------------------------------------

@click.group("iclgd", context_settings={"help_option_names": ["-h", "--help"]})
def iclgd_group():
    """ICL vs gradient descent (Deutch et al. 2024): compare ZSL, ICL, GD and layer-causal GD."""


@iclgd_group.command("tasks")
def tasks_cmd():
    """List the built-in tasks."""
    from tl_iclgd.tasks import BUILTIN_TASKS

    for name, fn in BUILTIN_TASKS.items():
        t = fn()
        click.echo(f"{name:<16} {len(t.demos):>3} demos, {len(t.queries):>3} queries  {(fn.__doc__ or '').splitlines()[0]}")


@iclgd_group.command("compare")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, callback=cli_checks.model_name,
              help="Model name (tl-plugins models).")
@click.option("--task", "task_name", default="antonyms", show_default=True,
              help="Built-in task (tl-plugins iclgd tasks), or several comma-separated (a grid); copy_token: "
                   "a raw-id copy task for models without a tokenizer.")
@click.option("--lr", default=str(DEFAULT_LR), show_default=True,
              help="SGD learning rate, or several comma-separated (a grid).")
@click.option("--params", default="kv", show_default=True, help="Trained attention projections: letters of 'qkvo'.")
@click.option("--loss", type=click.Choice(["all_tokens", "label_only"]), default="all_tokens", show_default=True)
@click.option("--readout", type=click.Choice(["resid_post", "resid_mid"]), default="resid_post", show_default=True,
              help="Where LCGD reads each layer out.")
@click.option("--methods", default="gd,lcgd", show_default=True, help="Comma-separated: gd, lcgd.")
@click.option("--baselines", default="", help="Comma-separated: untrained, untrained_embeddings.")
@click.option("--n-demos", type=int, default=16, show_default=True)
@click.option("--n-queries", type=int, default=50, show_default=True)
@click.option("--seeds", default="0", show_default=True, help="Comma-separated ints.")
@click.option("--position", type=click.Choice(["prompt_end", "first_label_token"]), default="prompt_end",
              show_default=True)
@click.option("--context-budget", type=int, default=None, help="Tokens ICL may use (default: n_ctx).")
@click.option("--no-kendall", is_flag=True, help="Skip Kendall tau.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch threads; 1 is several times faster than 2 on a CPU shared with other work.")
@click.option("--per-layer", is_flag=True, help="Also print the per-layer table.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the full result (settings, aggregate, per layer, runs) to this file.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for a grid: one JSON per (task, lr) and summary.json (needed for several tasks or "
                   "rates).")
@click.option("--force", is_flag=True, help="Overwrite the --json file (or the --out folder's results) if there.")
@cli_checks.argument_errors_as_usage
def compare_cmd(model_name, task_name, lr, params, loss, readout, methods, baselines, n_demos, n_queries, seeds,
                position, context_budget, no_kendall, threads, per_layer, json_out, out_dir, force):
    """Run ZSL, ICL and fine-tuning on a task; print the table (mean ± std over seeds) and write JSON.

    Several tasks or rates make a grid (tasks x rates x seeds, written to --out). Under torchrun the
    grid's (task, lr, variant, seed) units are split by rank and checkpointed; see docs/scale.md."""
    import pandas as pd

    from tl_iclgd.capture import backend_of
    from tl_iclgd.compare import compare
    from tl_iclgd.gd import GDConfig
    from tl_plugins import distributed, models

    task_list = [t.strip() for t in task_name.split(",") if t.strip()]
    try:
        lr_list = [float(x) for x in lr.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"got {lr!r}; accepted: a number or comma-separated numbers",
                                 param_hint="--lr") from None
    grid = out_dir is not None or len(task_list) != 1 or len(lr_list) != 1 or distributed.from_env().distributed
    if grid and len(task_list) * len(lr_list) > 1 and out_dir is None:
        raise click.BadParameter("several tasks or rates make a grid; give --out FOLDER for its files",
                                 param_hint="--out")
    out_path = None if out_dir is None else cli_checks.output_dir(out_dir, "--out")
    if out_path is not None and (out_path / "summary.json").exists() and not force:
        raise click.BadParameter(f"{str(out_path)!r} holds a finished grid; pass --force to overwrite it",
                                 param_hint="--out")
    try:
        gd = GDConfig(lr=lr_list[0] if lr_list else float("nan"), params=params, loss=loss, readout=readout)
        for x in lr_list[1:]:
            GDConfig(lr=x)
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if threads < 1:
        raise click.BadParameter(f"got {threads}; accepted: an int >= 1", param_hint="--threads")
    json_file = cli_checks.output_file(json_out, "--json")
    if json_file is not None and json_file.exists() and not force:
        raise click.BadParameter(f"{str(json_file)!r} exists; pass --force to overwrite it", param_hint="--json")
    device = distributed.default_device(distributed.from_env())
    model = models.load(model_name, **({} if device == "cpu" else {"device": device}))
    if backend_of(model).tokenizer is None and any(t != "copy_token" for t in task_list):
        raise click.BadParameter(f"model {model_name!r} has no tokenizer, so built-in tasks cannot be tokenised; "
                                 "use --task copy_token or the Python API with a TokenizedTask", param_hint="--model")
    if grid:
        from tl_iclgd.grid import run_cli

        return run_cli(model, task_list, lr_list, gd, json_file=json_file, out_dir=out_path, per_layer=per_layer,
                       echo=click.echo, methods=[m.strip() for m in methods.split(",") if m.strip()],
                       baselines=[b.strip() for b in baselines.split(",") if b.strip()], n_demos=n_demos,
                       n_queries=n_queries, seeds=seed_list, position=position, context_budget=context_budget,
                       kendall=not no_kendall, num_threads=threads)
    from tl_iclgd.grid import cli_task

    res = compare(model, cli_task(task_list[0], model, n_demos, n_queries), gd, methods=[m.strip() for m in methods.split(",") if m.strip()],
                  baselines=[b.strip() for b in baselines.split(",") if b.strip()], n_demos=n_demos,
                  n_queries=n_queries, seeds=seed_list, position=position, context_budget=context_budget,
                  kendall=not no_kendall, progress=True, num_threads=threads)
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        click.echo(res.table().to_string(index=False))
        if per_layer:
            click.echo(res.to_frame("layer").to_string(index=False))
    if json_file is not None:
        json_file.write_text(res.to_json())
        click.echo(f"written {json_file} ({res.settings['seconds']:.1f} s)")


@hookimpl
def tl_plugins_register_commands(cli):
    cli.add_command(iclgd_group)


# -- benchmark --------------------------------------------------------------------------------------

def _synthetic_task(d_vocab: int, n_demos: int, n_queries: int):
    """A copy-the-token task on raw ids, for models without a tokenizer (tiny test models)."""
    import random

    from tl_iclgd.tasks import TokenizedTask

    rng = random.Random(0)
    arrow = 3

    def pair():
        x = rng.randrange(10, d_vocab)
        return ([x, arrow], [x])
    return TokenizedTask.from_ids([pair() for _ in range(n_demos)], [pair() for _ in range(n_queries)],
                                  name="copy_token")


def bench_iclgd(*, quick: bool = False, model: str = "smollm2-135m", device: str = "cpu", threads: int = 1):
    """Full comparison (ZSL, ICL, GD, LCGD; every metric) on a real model: time, peak memory, tables.

    Runs with ``threads`` torch threads (default 1: on a 2-core CPU shared with other work one thread is
    several times faster than two; the ratio is measured below and printed).
    """
    from tl_iclgd.threads import torch_threads

    with torch_threads(threads):
        return _bench(quick=quick, model=model, device=device)


def _bench(*, quick: bool, model: str, device: str):
    import pandas as pd
    import torch

    from tl_iclgd.capture import backend_of, capture
    from tl_iclgd.compare import compare
    from tl_iclgd.gd import GDConfig, finetune
    from tl_iclgd.tasks import get_task, tokenize_task
    from tl_iclgd.threads import torch_threads
    from tl_plugins import models
    from tl_plugins.bench import BenchResult, PeakRSS, device_description, median_time

    n_demos, n_queries = (4, 8) if quick else (16, 50)
    m = models.load(model, device=device)
    be = backend_of(m)
    has_tok = be.tokenizer is not None
    task = "antonyms" if has_tok else _synthetic_task(be.d_vocab, n_demos, n_queries)
    gd = GDConfig(lr=DEFAULT_LR)
    res = BenchResult("iclgd", device=device_description(device))
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        full = compare(m, task, gd, methods=("gd", "lcgd"), n_demos=n_demos, n_queries=n_queries, seeds=(0,))
        t_full, c_full = time.perf_counter() - t0, time.process_time() - c0
    with PeakRSS() as mem_b:
        t0, c0 = time.perf_counter(), time.process_time()
        base = compare(m, task, gd, methods=("gd", "lcgd"), n_demos=n_demos, n_queries=n_queries, seeds=(0,),
                       baselines=("untrained",) if quick else ("untrained", "untrained_embeddings"))
        t_base, c_base = time.perf_counter() - t0, time.process_time() - c0
    res.add(what="full comparison, trained model (ZSL, ICL, GD, LCGD, all metrics)", seconds=t_full,
            cpu_seconds=c_full, ratio_to_full=1.0, peak_rss_gb=mem.peak / 2**30)
    res.add(what="same, plus the untrained baseline" if quick else
            "same, plus untrained and trained-embeddings baselines", seconds=t_base, cpu_seconds=c_base,
            ratio_to_full=t_base / t_full, peak_rss_gb=mem_b.peak / 2**30)

    # the phases side by side (medians)
    ttask = tokenize_task(get_task("antonyms").sample(n_demos, n_queries, 0), be.tokenizer) if has_tok else task
    queries = [ttask.query_tokens(i) for i in range(len(ttask.queries))]
    prefix = ttask.prefix_tokens()
    rep = 1 if quick else 3
    phases = [
        ("ZSL capture", lambda: capture(m, (), queries)),
        ("ICL capture, prefix KV cache", lambda: capture(m, prefix, queries)),
        ("ICL capture, full forward per query", lambda: capture(m, prefix, queries, use_prefix_cache=False)),
        (f"GD fine-tuning ({n_demos} SGD steps)" if not quick else "GD fine-tuning", lambda: finetune(m, ttask, gd)),
        ("LCGD fine-tuning", lambda: finetune(m, ttask, GDConfig(lr=DEFAULT_LR, layer_causal=True))),
    ]
    times = {}
    for what, fn in phases:
        c0 = time.process_time()
        times[what] = median_time(fn, repeat=rep, warmup=0 if quick else 1)
        res.add(what=what, seconds=times[what], cpu_seconds=(time.process_time() - c0) / (rep + (0 if quick else 1)),
                ratio_to_full=times[what] / t_full, peak_rss_gb=float("nan"))
    # one thread vs the machine's default, side by side, on the ICL capture (skipped when quick)
    t1 = times["ICL capture, prefix KV cache"]
    nthreads = torch.get_num_threads()
    default_threads = max(1, min(2, __import__("os").cpu_count() or 1))
    t2 = float("nan")
    if not quick:
        with torch_threads(default_threads):
            t2 = median_time(lambda: capture(m, prefix, queries), repeat=rep, warmup=0)
        res.add(what=f"ICL capture with {default_threads} threads (vs {nthreads} above)", seconds=t2,
                cpu_seconds=float("nan"), ratio_to_full=t2 / t_full, peak_rss_gb=float("nan"))
    res.check("full comparison at most 5 minutes" + (" (quick sizes)" if quick else ""), t_full <= 300)
    res.check("peak memory at most 3 GB", mem.peak <= 3 * 2**30)
    res.check("prefix KV cache faster than a full forward per query",
              t1 < times["ICL capture, full forward per query"])
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        res.notes.append(f"model {model}, task {getattr(ttask, 'name', task)}, {n_demos} demos, {n_queries} "
                         f"queries, {be.n_layers} layers, lr {gd.lr}, K/V of every layer, seed 0, "
                         f"{nthreads} torch thread(s); RSS before the run {mem.start / 2**30:.2f} GB"
                         + ("" if quick else f"; {nthreads}-thread/{default_threads}-thread ICL capture time "
                            f"ratio {t1 / t2:.2f}"))
        res.notes.append("aggregate (mean over examples, then layers), trained and untrained:\n"
                         + base.table().to_string(index=False))
    res.extra = {"trained": full.to_frame().to_dict(orient="records"),
                 "baselines": base.to_frame().to_dict(orient="records"),
                 "layers": base.to_frame("layer").to_dict(orient="records")}
    return res


@hookimpl
def tl_plugins_register_benchmarks(register):
    register("iclgd", bench_iclgd, summary="ICL vs GD: full comparison on SmolLM2 (time, peak memory, tables)")


# -- report -----------------------------------------------------------------------------------------

def _layer_figure(layer_df, metric: str, title: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    for (variant, method), d in layer_df[layer_df.metric == metric].groupby(["variant", "method"], sort=False):
        fig.add_trace(go.Scatter(x=d.layer, y=d["mean"], mode="lines+markers", name=f"{method} / {variant}",
                                 line=dict(dash="solid" if variant == "trained" else "dot")))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title=metric, height=380,
                      margin=dict(l=50, r=20, t=50, b=40))
    return fig


@hookimpl
def tl_plugins_report_sections(report):
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
    task = "antonyms" if has_tok else _synthetic_task(be.d_vocab, n_demos, n_queries)
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
    from tl_iclgd.report_summary import summary_sentences

    report.add_section("ICL vs GD (Deutch et al. 2024)", html=html, figures=figs, tables=tables, order=60,
                       summary=summary_sentences(res, tables[1] if len(tables) > 1 else None))
