"""ICL vs GD on the ``reviews`` sentiment task with the learning rate chosen on held-out demonstrations.

    python scripts/iclgd_reviews.py --model gemma3-270m --out iclgd-reviews          # everything, in order
    python scripts/iclgd_reviews.py --stage select --method lcgd --out iclgd-reviews   # one stage

Stages (each writes ``OUT/<stage>.json`` and prints JSON lines as it goes):

- ``select``: :func:`tl_iclgd.lr_select.select_lr` for ``--method`` on the demonstration pool only
  (32 training and 32 held-out demonstrations, selection seed 0) over ``--grid``;
- ``compare``: :func:`tl_iclgd.compare` with the selected rate per method (read from
  ``OUT/select-gd.json`` / ``OUT/select-lcgd.json``, or ``--lr-gd`` / ``--lr-lcgd``), 32
  demonstrations, ``--n-queries`` queries drawn from the query pool, ``--seeds``;
- ``curve``: ICL accuracy against the number of demonstrations;
- ``merge``: every ``OUT/compare-*.json`` into one table (markdown) and ``OUT/layers.csv``;
- ``all`` (default): select (both methods), compare, curve.

``--variants`` and ``--baseline-seeds`` split the comparison (the untrained baselines are built with
``untrained_like(model, keep, seed)`` exactly as ``compare(..., baselines=...)`` builds them), so the
parts can run as separate processes and be merged.

One torch thread (much faster than two on a shared CPU). Times are wall seconds on whatever machine
runs it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def emit(out: Path | None, **kw) -> None:
    line = json.dumps(kw, default=str)
    print(line, flush=True)
    if out is not None:
        with open(out / "log.jsonl", "a") as f:
            f.write(line + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--task", default="reviews")
    ap.add_argument("--stage", default="all", choices=["all", "select", "compare", "curve", "merge"])
    ap.add_argument("--method", default="gd", choices=["gd", "lcgd"], help="for --stage select")
    ap.add_argument("--grid", default=",".join(f"{x:g}" for x in GRID))
    ap.add_argument("--n-demos", type=int, default=32)
    ap.add_argument("--n-heldout", type=int, default=32)
    ap.add_argument("--n-queries", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="trained,untrained,untrained_embeddings")
    ap.add_argument("--baseline-seeds", default=None, help="seeds for the untrained variants (default: --seeds)")
    ap.add_argument("--methods", default="gd,lcgd")
    ap.add_argument("--lr-gd", type=float, default=None)
    ap.add_argument("--lr-lcgd", type=float, default=None)
    ap.add_argument("--no-kendall", action="store_true")
    ap.add_argument("--curve-seeds", default="0")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    import tl_plugins
    from tl_iclgd import GDConfig, compare, icl_accuracy_curve
    from tl_iclgd.lr_select import select_lr

    t0 = time.perf_counter()
    model = None if a.stage == "merge" else tl_plugins.models.load(a.model)
    emit(a.out, stage=a.stage, model=a.model, load_s=round(time.perf_counter() - t0, 1))
    grid = tuple(float(x) for x in a.grid.split(","))
    methods = [m for m in a.methods.split(",") if m]

    def select(method: str) -> None:
        t = time.perf_counter()
        sel = select_lr(model, a.task, grid, method=method, n_demos=a.n_demos, n_heldout=a.n_heldout, seed=0,
                        log=lambda row: emit(a.out, stage="select", method=method, **row,
                                             s=round(time.perf_counter() - t, 1)))
        rec = {"task": a.task, "method": method, "lr": sel.lr, "rows": sel.rows, "zsl_acc": sel.zsl_acc,
               "zsl_loss": sel.zsl_loss, "train": sel.train, "heldout": sel.heldout, "grid": grid,
               "seconds": round(time.perf_counter() - t, 1)}
        (a.out / f"select-{method}.json").write_text(json.dumps(rec, indent=1))
        emit(a.out, stage="select-done", **{k: rec[k] for k in ("method", "lr", "zsl_acc", "seconds")})

    def lr_of(method: str) -> float:
        given = a.lr_gd if method == "gd" else a.lr_lcgd
        if given is not None:
            return given
        return json.loads((a.out / f"select-{method}.json").read_text())["lr"]

    if a.stage == "select":
        select(a.method)
    if a.stage == "all":
        for m in methods:
            select(m)
    if a.stage in ("all", "compare"):
        from tl_iclgd import untrained_like

        lrs = {m: lr_of(m) for m in methods}
        seeds = tuple(int(s) for s in a.seeds.split(","))
        bseeds = seeds if a.baseline_seeds is None else tuple(int(s) for s in a.baseline_seeds.split(","))
        variants = [v for v in a.variants.split(",") if v]
        for variant in variants:
            # a baseline is compare() on the untrained copy that compare() itself would build for that
            # seed (untrained_like(model, keep, seed)); run here so baselines can use fewer seeds
            for seed in (seeds if variant == "trained" else bseeds):
                t = time.perf_counter()
                m = model if variant == "trained" else untrained_like(
                    model, keep={"untrained": "none", "untrained_embeddings": "embeddings"}[variant], seed=seed)
                res = compare(m, a.task, GDConfig(), methods=methods, lrs=lrs, n_demos=a.n_demos,
                              n_queries=a.n_queries, seeds=(seed,), kendall=not a.no_kendall, num_threads=1)
                res.layers["variant"] = variant
                res.runs["variant"] = variant
                tag = f"{variant}-{'-'.join(methods)}-s{seed}"
                (a.out / f"compare-{tag}.json").write_text(res.to_json())
                emit(a.out, stage="compare", tag=tag, lrs=lrs, s=round(time.perf_counter() - t, 1),
                     table=res.table().to_dict("records"))
                del m
    if a.stage == "merge":
        import pandas as pd

        from tl_iclgd.compare import Comparison

        layers, runs = [], []
        for f in sorted(a.out.glob("compare-*.json")):
            d = json.loads(f.read_text())
            layers.append(pd.DataFrame(d["layers"]))
            runs.append(pd.DataFrame(d["runs"]))
        res = Comparison(pd.concat(layers, ignore_index=True).astype({"value": float}),
                         pd.concat(runs, ignore_index=True).astype({"value": float}), {"task": a.task})
        (a.out / "merged.json").write_text(res.to_json())
        tab = res.table()
        print("| " + " | ".join(tab.columns) + " |\n|" + "---|" * len(tab.columns))
        for row in tab.itertuples(index=False):
            print("| " + " | ".join(str(x) for x in row) + " |")
        print(res.to_frame("layer").to_csv(index=False), file=open(a.out / "layers.csv", "w"))
    if a.stage in ("all", "curve"):
        t = time.perf_counter()
        curve = icl_accuracy_curve(model, a.task, n_demos=(0, 1, 2, 4, 8, 16, 32), n_queries=a.n_queries,
                                   seeds=tuple(int(s) for s in a.curve_seeds.split(",")))
        df = curve.to_frame()
        (a.out / "curve.json").write_text(df.to_json(orient="records"))
        emit(a.out, stage="curve-done", rows=df.to_dict("records"), s=round(time.perf_counter() - t, 1))


if __name__ == "__main__":
    main()
