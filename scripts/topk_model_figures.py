"""SmolLM2-135M forward (inference) with stock TransformerLens attention, the ``sdpa`` plugin and
``topk`` (k = 64), side by side in one process: docs/topk.md's model-level figures.

    .venv/bin/python scripts/topk_model_figures.py [--ns 1024,2048,4096,8192] [--topk-ns 4096,8192]
        [--repeat 3] [--repeat-big 1] [--big 8192] [--k 64] [--out figures.json] [--memory-fresh]

Per n: tokens of ``pydoc_data.topics``, ``model(tokens)`` under ``torch.no_grad()``, fp32, batch 1.
Methods run interleaved (stock, sdpa, topk, stock, ...) so that a busy machine's slow spells fall on
every method alike; the figures are the median wall seconds and the peak extra resident memory (the
kernel's high-water mark, reset before each run; glibc's mmap threshold fixed so freed tensors leave
the resident set). ``--repeat`` runs per method at n below ``--big``, ``--repeat-big`` at and above it
(stock attention at n = 8192 takes minutes on 2 cores). The load average is read before and after
each n, in the order given. One warm-up forward per method at the smallest n.

Memory read in one process favours whichever method runs second (it reuses memory the first one
freed; at n = 1024 all three read the same 302 MiB). ``--memory-fresh`` measures only the peak
extra memory, each (method, n) in a freshly spawned process of its own (model loaded, one warm-up
forward at n = 256, then the measured forward): the memory figures of docs/topk.md come from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import tl_plugins
from tl_plugins.measure import PeakMemory, fixed_mmap_threshold, load_average
from tl_topk.analysis import docs_tokens


def timed_peak(run):
    """(wall seconds, peak extra resident bytes (the kernel's high-water mark), result) of ``run()``."""
    with PeakMemory("cpu") as mem:
        t0 = time.perf_counter()
        out = run()
        wall = time.perf_counter() - t0
    return wall, mem.peak_extra, out


def _forward_fn(model, tokens, plugin):
    def run():
        with torch.no_grad():
            if plugin is None:
                return model(tokens)
            name, config = plugin
            with tl_plugins.enabled(model, name, **config):
                return model(tokens)
    return run


def fresh_peak(plugin, n: int, n_ctx: int) -> int:
    """Peak extra resident bytes of one forward at ``n`` in the calling (fresh) process."""
    fixed_mmap_threshold()
    model = tl_plugins.models.load("smollm2-135m", n_ctx=n_ctx)
    model.eval()
    _forward_fn(model, docs_tokens(model, 256), plugin)()
    tokens = docs_tokens(model, n)
    _, peak, out = timed_peak(_forward_fn(model, tokens, plugin))
    return peak


def memory_fresh(ns, topk_ns, plugins, n_ctx, out_path) -> int:
    import multiprocessing

    rows = []
    for n in ns:
        peaks = {}
        for m, plugin in plugins.items():
            if m.startswith("topk") and n not in topk_ns:
                continue
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                peaks[m] = pool.apply(fresh_peak, (plugin, n, n_ctx))
            print(f"  n={n} {m}: {peaks[m] / 2**20:.0f} MiB extra, fresh process (load {load_average()})", flush=True)
        for m, p in peaks.items():
            rows.append(dict(n=n, method=m, peak_extra_MiB=p / 2**20, memory_ratio_to_stock=p / peaks["stock"],
                             utc=time.strftime("%H:%M:%S", time.gmtime())))
        if out_path:
            with open(out_path, "w") as fh:
                json.dump(rows, fh, indent=2)
    for r in rows:
        print(f"{r['n']:>5} {r['method']:<10} {r['peak_extra_MiB']:>7.0f} MiB {r['memory_ratio_to_stock']:>6.2f}x stock")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="1024,2048,4096,8192")
    ap.add_argument("--topk-ns", default="4096,8192", help="n at which topk (k = --k) runs too")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--repeat-big", type=int, default=1)
    ap.add_argument("--big", type=int, default=8192)
    ap.add_argument("--out", default=None)
    ap.add_argument("--memory-fresh", action="store_true",
                    help="only peak memory, each (method, n) in a fresh process")
    args = ap.parse_args(argv)
    ns = [int(x) for x in args.ns.split(",")]
    topk_ns = {int(x) for x in args.topk_ns.split(",") if x}
    plugins = {"stock": None, "sdpa": ("sdpa", {}), f"topk k={args.k}": ("topk", {"k": args.k})}
    if args.memory_fresh:
        return memory_fresh(ns, topk_ns, plugins, max(2048, max(ns)), args.out)
    if not fixed_mmap_threshold():
        print("warning: could not fix glibc's mmap threshold; memory figures may be understated")
    # TransformerLens sizes the rotary tables by n_ctx (the loader's default is 2048; SmolLM2 allows 8192).
    model = tl_plugins.models.load("smollm2-135m", n_ctx=max(2048, max(ns)))
    model.eval()

    def forward(tokens, plugin):
        return _forward_fn(model, tokens, plugin)

    warm = docs_tokens(model, min(ns))
    for plugin in plugins.values():
        forward(warm, plugin)()
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for n in ns:
        tokens = docs_tokens(model, n)
        chosen = {m: p for m, p in plugins.items() if not m.startswith("topk") or n in topk_ns}
        repeat = args.repeat_big if n >= args.big else args.repeat
        before = load_average()
        walls: dict[str, list[float]] = {m: [] for m in chosen}
        peaks: dict[str, list[int]] = {m: [] for m in chosen}
        ref = None
        diffs: dict[str, float] = {}
        t_start = time.strftime("%H:%M:%S", time.gmtime())
        for _ in range(repeat):
            for m, plugin in chosen.items():
                wall, peak, logits = timed_peak(forward(tokens, plugin))
                walls[m].append(wall)
                peaks[m].append(peak)
                if m == "stock" and ref is None:
                    ref = logits
                elif ref is not None and m not in diffs:
                    diffs[m] = float((logits - ref).abs().max())
                del logits
                print(f"  n={n} {m}: {wall:.2f} s, {peak / 2**20:.0f} MiB extra (load {load_average()})", flush=True)
        del ref
        after = load_average()
        base_t = statistics.median(walls["stock"])
        base_m = statistics.median(peaks["stock"])
        for m in chosen:
            t, p = statistics.median(walls[m]), statistics.median(peaks[m])
            rows.append(dict(n=n, method=m, runs=repeat, seconds=t, all_seconds=walls[m],
                             ratio_to_stock=t / base_t, peak_extra_MiB=p / 2**20,
                             memory_ratio_to_stock=p / base_m, max_abs_logit_diff=diffs.get(m, 0.0),
                             load_before=before, load_after=after, utc_start=t_start))
        if args.out:  # after every n, so that a long run killed half-way keeps what it measured
            with open(args.out, "w") as fh:
                json.dump(rows, fh, indent=2)
    print(f"{'n':>5} {'method':<10} {'runs':>4} {'s':>8} {'x stock':>8} {'MiB':>7} {'x stock':>8} "
          f"{'max|dlogit|':>11}  load before -> after")
    for r in rows:
        print(f"{r['n']:>5} {r['method']:<10} {r['runs']:>4} {r['seconds']:>8.2f} {r['ratio_to_stock']:>7.2f}x "
              f"{r['peak_extra_MiB']:>7.0f} {r['memory_ratio_to_stock']:>7.2f}x {r['max_abs_logit_diff']:>11.2g}"
              f"  {r['load_before']} -> {r['load_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
