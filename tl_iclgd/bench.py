"""``tl-plugins bench iclgd``: the full comparison on SmolLM2 (time, peak memory, the tables), each
phase timed, ratios in one run."""

from __future__ import annotations

import time

from tl_iclgd.gd import DEFAULT_LR
from tl_iclgd.tasks import synthetic_task


def bench_iclgd(*, quick: bool = False, model: str = "smollm2-135m", device: str = "cpu", threads: int = 1):
    """Full comparison (ZSL, ICL, GD, LCGD; every metric) on a real model: time, peak memory, tables.

    Runs with ``threads`` torch threads (default 1: on a 2-core CPU shared with other work one thread is
    several times faster than two; the ratio is measured below and printed).
    """
    from tl_iclgd.threads import torch_threads

    with torch_threads(threads):
        return _bench(quick=quick, model=model, device=device)


def _bench(*, quick: bool, model: str, device: str):
    from tl_iclgd.capture import backend_of
    from tl_iclgd.gd import GDConfig
    from tl_plugins import models
    from tl_plugins.bench import BenchResult, device_description

    n_demos, n_queries = (4, 8) if quick else (16, 50)
    m = models.load(model, device=device)
    be = backend_of(m)
    has_tok = be.tokenizer is not None
    task = "antonyms" if has_tok else synthetic_task(be.d_vocab, n_demos, n_queries)
    gd = GDConfig(lr=DEFAULT_LR)
    res = BenchResult("iclgd", device=device_description(device))
    full, base, t_full, mem = _bench_comparisons(res, m, task, gd, n_demos, n_queries, quick)
    ttask = _phase_task(be, task, n_demos, n_queries, has_tok)
    queries = [ttask.query_tokens(i) for i in range(len(ttask.queries))]
    prefix = ttask.prefix_tokens()
    rep = 1 if quick else 3
    times = _bench_phases(res, m, ttask, prefix, queries, gd, n_demos, rep, quick, t_full)
    t1 = times["ICL capture, prefix KV cache"]
    t2, nthreads, default_threads = _bench_threads(res, m, prefix, queries, rep, quick, t_full)
    res.check("full comparison at most 5 minutes" + (" (quick sizes)" if quick else ""), t_full <= 300)
    res.check("peak memory at most 3 GB", mem.peak <= 3 * 2**30)
    res.check("prefix KV cache faster than a full forward per query",
              t1 < times["ICL capture, full forward per query"])
    settings = (f"model {model}, task {getattr(ttask, 'name', task)}, {n_demos} demos, {n_queries} "
                f"queries, {be.n_layers} layers, lr {gd.lr}, K/V of every layer, seed 0, "
                f"{nthreads} torch thread(s); RSS before the run {mem.start / 2**30:.2f} GB"
                + ("" if quick else f"; {nthreads}-thread/{default_threads}-thread ICL capture time "
                   f"ratio {t1 / t2:.2f}"))
    _attach_tables(res, settings, full, base)
    return res


def _bench_comparisons(res, m, task, gd, n_demos: int, n_queries: int, quick: bool):
    """The full comparison on the trained model, then with the untrained baselines: time, CPU time and
    peak memory of each; (trained result, with baselines, seconds of the first, its memory)."""
    from tl_iclgd.compare import compare
    from tl_plugins.measure import PeakMemory

    with PeakMemory("cpu") as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        full = compare(m, task, gd, methods=("gd", "lcgd"), n_demos=n_demos, n_queries=n_queries, seeds=(0,))
        t_full, c_full = time.perf_counter() - t0, time.process_time() - c0
    with PeakMemory("cpu") as mem_b:
        t0, c0 = time.perf_counter(), time.process_time()
        base = compare(m, task, gd, methods=("gd", "lcgd"), n_demos=n_demos, n_queries=n_queries, seeds=(0,),
                       baselines=("untrained",) if quick else ("untrained", "untrained_embeddings"))
        t_base, c_base = time.perf_counter() - t0, time.process_time() - c0
    res.add(what="full comparison, trained model (ZSL, ICL, GD, LCGD, all metrics)", seconds=t_full,
            cpu_seconds=c_full, ratio_to_full=1.0, peak_rss_gb=mem.peak / 2**30)
    res.add(what="same, plus the untrained baseline" if quick else
            "same, plus untrained and trained-embeddings baselines", seconds=t_base, cpu_seconds=c_base,
            ratio_to_full=t_base / t_full, peak_rss_gb=mem_b.peak / 2**30)
    return full, base, t_full, mem


def _phase_task(be, task, n_demos: int, n_queries: int, has_tok: bool):
    """The tokenised task the phases run on (the raw-id task itself for a model without a tokenizer)."""
    from tl_iclgd.tasks import get_task, tokenize_task

    return tokenize_task(get_task("antonyms").sample(n_demos, n_queries, 0), be.tokenizer) if has_tok else task


def _bench_phases(res, m, ttask, prefix, queries, gd, n_demos: int, rep: int, quick: bool, t_full: float) -> dict:
    """The phases side by side (medians): captures with and without the prefix cache, GD and LCGD."""
    from tl_iclgd.capture import capture
    from tl_iclgd.gd import GDConfig, finetune
    from tl_plugins.measure import median_time

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
    return times


def _bench_threads(res, m, prefix, queries, rep: int, quick: bool, t_full: float):
    """The ICL capture with the machine's default thread count, beside the one-thread figure above
    (skipped when quick); (that time or nan, threads now, the default)."""
    import torch

    from tl_iclgd.capture import capture
    from tl_iclgd.threads import torch_threads
    from tl_plugins.measure import median_time

    nthreads = torch.get_num_threads()
    default_threads = max(1, min(2, __import__("os").cpu_count() or 1))
    t2 = float("nan")
    if not quick:
        with torch_threads(default_threads):
            t2 = median_time(lambda: capture(m, prefix, queries), repeat=rep, warmup=0)
        res.add(what=f"ICL capture with {default_threads} threads (vs {nthreads} above)", seconds=t2,
                cpu_seconds=float("nan"), ratio_to_full=t2 / t_full, peak_rss_gb=float("nan"))
    return t2, nthreads, default_threads


def _attach_tables(res, settings: str, full, base) -> None:
    """The settings and the aggregate table as notes; the trained, baseline and per-layer tables as extra."""
    import pandas as pd

    with pd.option_context("display.width", 250, "display.max_columns", 40):
        res.notes.append(settings)
        res.notes.append("aggregate (mean over examples, then layers), trained and untrained:\n"
                         + base.table().to_string(index=False))
    res.extra = {"trained": full.to_frame().to_dict(orient="records"),
                 "baselines": base.to_frame().to_dict(orient="records"),
                 "layers": base.to_frame("layer").to_dict(orient="records")}
