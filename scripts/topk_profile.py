"""Where the chunked top-k backend's time goes: torch.profiler over forward + backward of one
SmolLM2-shaped layer (9 heads over 3 K/V heads, d_head 64, fp32, causal, batch 1), summed per phase
(the ``topk.*`` ranges in tl_topk/ops/chunked.py), beside SDPA's forward and backward on the same
inputs in the same process.

    .venv/bin/python scripts/topk_profile.py [--n 4096] [--k 32] [--repeat 3]

Within the selection phase, ``aten::topk`` is split from the rest (the k-th value and boundary-tie
check of tl_topk.ops.selection.topk_select, and any tie resolution). Times are the profiler's CPU
time of each range on the calling thread (its wall time inside the range), medians over
``--repeat`` profiled runs after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from tl_plugins.measure import load_average
from tl_topk.bench import layer_inputs, sdpa_attention
from tl_topk.ops.attention import topk_attention


def one_profile(fn, q, k, v) -> dict[str, float]:
    """Seconds per named range (and per chosen aten op inside the selection) of one fwd + bwd."""
    for t in (q, k, v):
        t.grad = None
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("total.forward"):
            out = fn(q, k, v)
        g = torch.ones_like(out)
        with record_function("total.backward"):
            out.backward(g)
    got: dict[str, float] = defaultdict(float)
    events = prof.events()
    ranges = [e for e in events if e.name.startswith(("topk.", "total."))]
    for e in ranges:
        got[e.name] += e.cpu_time_total / 1e6
    # aten::topk calls inside the selection ranges
    sel = [(e.time_range.start, e.time_range.end) for e in ranges if e.name == "topk.fwd.select"]
    for e in events:
        if e.name == "aten::topk" and any(a <= e.time_range.start and e.time_range.end <= b for a, b in sel):
            got["topk.fwd.select: aten::topk"] += e.cpu_time_total / 1e6
    return got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    q, k, v = layer_inputs(args.n, "cpu")
    methods = {
        "chunked": lambda q, k, v: topk_attention(q, k, v, args.k, causal=True, backend="chunked"),
        "sdpa": sdpa_attention,
    }
    before = load_average()
    print(f"n={args.n} k={args.k} torch {torch.__version__} {torch.get_num_threads()} threads; "
          f"{time.strftime('%H:%M:%S', time.gmtime())} UTC, load before {before}")
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    for m, fn in methods.items():
        one_profile(fn, q, k, v)  # warm-up
    for _ in range(args.repeat):
        for m, fn in methods.items():
            runs[m].append(one_profile(fn, q, k, v))
    print(f"load after {load_average()}")
    for m, rs in runs.items():
        keys = sorted({key for r in rs for key in r})
        med = {key: statistics.median(r.get(key, 0.0) for r in rs) for key in keys}
        total = med["total.forward"] + med["total.backward"]
        print(f"== {m}: forward {med['total.forward']:.3f} s, backward {med['total.backward']:.3f} s, "
              f"total {total:.3f} s (medians of {len(rs)})")
        for key in keys:
            if key.startswith("topk."):
                print(f"  {key:<32} {med[key]:8.3f} s  {100 * med[key] / total:5.1f} %")
        if m == "chunked":
            fwd_named = sum(med[x] for x in keys if x.startswith("topk.fwd.") and ":" not in x)
            bwd_named = sum(med[x] for x in keys if x.startswith("topk.bwd."))
            print(f"  {'forward outside the phases':<32} {med['total.forward'] - fwd_named:8.3f} s  "
                  f"{100 * (med['total.forward'] - fwd_named) / total:5.1f} %")
            print(f"  {'backward outside the phases':<32} {med['total.backward'] - bwd_named:8.3f} s  "
                  f"{100 * (med['total.backward'] - bwd_named) / total:5.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
