"""Time one head's exact whole-vocabulary top-k OV pairs: ``python scripts/embedspace_head_topk.py``.

    PYTHONPATH=. .venv/bin/python scripts/embedspace_head_topk.py --model gemma3-270m --heads 15,3 17,1

For each head prints one JSON line: the median of ``--repeat`` calls of
``EmbeddingSpace(model).ov(layer, head).topk_pairs(k, backend=...)`` (each call measured separately), the
time to form the head's two factors (``ov(layer, head)``), which scan ran, the entries it bounded, bounded
again and computed (machine-independent), the peak extra resident memory of the last call, the k-th and
first values, and the load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import tl_plugins
from tl_plugins.measure import PeakMemory, load_average


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--heads", nargs="+", default=["15,3", "17,1"], help="LAYER,HEAD pairs")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", default="auto", choices=["auto", "cpp", "torch"])
    args = ap.parse_args()
    from tl_embedspace.space import EmbeddingSpace

    sp = EmbeddingSpace(tl_plugins.models.load(args.model))
    for spec in args.heads:
        layer, head = (int(x) for x in spec.split(","))
        t = time.perf_counter()
        ov = sp.ov(layer, head)
        t_factors = time.perf_counter() - t
        before, times = load_average(), []
        for _ in range(args.repeat):
            with PeakMemory() as mem:
                t = time.perf_counter()
                res = ov.topk_pairs(args.k, backend=args.backend)
                times.append(time.perf_counter() - t)
        print(json.dumps(dict(model=args.model, head=f"L{layer}H{head}", k=args.k, median_s=round(statistics.median(times), 2),
                              times_s=[round(x, 2) for x in times], factors_s=round(t_factors, 2),
                              scan=res.stats.scan, fraction_computed=res.stats.fraction_computed,
                              entries_bounded=res.stats.entries_bounded, entries_refined=res.stats.entries_refined,
                              peak_extra_mib=round(mem.peak_extra / 2**20), kth_value=float(res.values[-1]),
                              first_value=float(res.values[0]), threads=torch.get_num_threads(),
                              loadavg_before=before, loadavg_after=load_average())), flush=True)


if __name__ == "__main__":
    main()
