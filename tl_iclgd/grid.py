"""ICL vs GD over a grid of tasks x learning rates x seeds, split over torchrun ranks.

``compare_grid(model, ["antonyms", "country_capital"], [1e-3, 1e-2], seeds=(0, 1, 2), out_dir="grid/")``
is :func:`tl_iclgd.compare.compare` for every (task, lr) cell. Its work units are (task, lr, variant,
seed): one ZSL/ICL capture and one fine-tuning per method, independent of every other unit (the task
draw, the untrained baseline and the random-update baseline are seeded by the unit's seed). Under
``torchrun`` the units are split by rank (:mod:`tl_plugins.distributed`), each rank checkpoints the
rows of every finished unit in its shard log, and rank 0 merges them, cell by cell, in the order
:func:`compare` produces them, so each cell's tables equal a one-process ``compare()`` exactly.
"""

from __future__ import annotations

import gc
import json
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from tl_iclgd.baselines import untrained_like
from tl_iclgd.capture import backend_of
from tl_iclgd.compare import (
    BASELINES,
    METHODS,
    Comparison,
    active_config,
    default_prepend_bos,
    resolve_task,
    run_variant,
    task_name,
)
from tl_iclgd.gd import GDConfig, check_unprocessed
from tl_iclgd.tasks import COPY_TASK, Task, TokenizedTask, synthetic_task
from tl_iclgd.threads import torch_threads


def grid_file(task: str, lr: float) -> str:
    """The file name of one (task, lr) cell in :func:`compare_grid`'s output folder."""
    return f"{task}_lr{float(lr)!r}.json"


def grid_units(n_tasks: int, lrs: Sequence[float], variants: Sequence[str], seeds: Sequence[int]) -> list[tuple]:
    """The work units, in merge order: (task index, lr, variant, seed)."""
    return [(ti, float(lr), v, s) for ti in range(n_tasks) for lr in lrs for v in variants for s in seeds]


def compare_grid(model: Any, tasks: Sequence[Union[str, Task, TokenizedTask]], lrs: Sequence[float],
                 gd: Optional[GDConfig] = None, *, seeds: Sequence[int] = (0,), out_dir: Any = None,
                 shard_dir: Any = None, methods: Sequence[str] = METHODS, baselines: Sequence[str] = (),
                 n_demos: Optional[int] = 16, n_queries: Optional[int] = 50, position: str = "prompt_end",
                 prepend_bos: Optional[bool] = None, context_budget: Optional[int] = None,
                 single_token_labels: bool = True, batch_size: int = 64, kendall: bool = True,
                 progress: bool = False, num_threads: Optional[int] = None, ctx: Any = None) -> Optional[dict]:
    """:func:`~tl_iclgd.compare.compare` for every task in ``tasks`` and learning rate in ``lrs``.

    Arguments as for ``compare`` (``gd`` gives every setting but the learning rate). ctx: the ranks to
    share the units with (default :func:`tl_plugins.distributed.current`: one process unless a process
    group is initialised). shard_dir: where finished units are checkpointed (default ``out_dir/.shards``;
    no checkpoints without either), so a killed run restarted with the same arguments resumes.

    Returns, on rank 0, {(task name, lr): Comparison}, each equal to ``compare(model, task, gd with lr,
    seeds=seeds, ...)`` (same rows in the same order; ``settings["seconds"]`` sums the cell's units);
    None on the other ranks. With ``out_dir``, rank 0 writes one :func:`grid_file` per cell
    (``Comparison.to_json()``) and ``summary.json`` (grid, world size, what each rank did).
    """
    import pandas as pd

    from tl_plugins import distributed

    ctx = distributed.current() if ctx is None else ctx
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                    or num_threads < 1):
        raise ValueError(f"num_threads: got {num_threads!r}; accepted: None or an int >= 1")
    tasks = list(tasks)
    names = [task_name(t) for t in tasks]
    if not tasks or len(set(names)) != len(names):
        raise ValueError(f"tasks: got {names!r}; accepted: a non-empty list of tasks with distinct names")
    try:
        lrs = [float(x) for x in lrs]
    except (TypeError, ValueError):
        raise ValueError(f"lrs: got {lrs!r}; accepted: a non-empty list of numbers") from None
    if not lrs or len(set(lrs)) != len(lrs):
        raise ValueError(f"lrs: got {lrs!r}; accepted: a non-empty list of distinct learning rates")
    base = active_config(model) if gd is None else gd
    if not isinstance(base, GDConfig):
        raise TypeError(f"gd: got {type(base).__name__}; accepted: a tl_iclgd.GDConfig")
    cfgs = {lr: replace(base, lr=lr) for lr in lrs}  # GDConfig validates each rate
    methods, baselines, seeds = tuple(methods), tuple(baselines), tuple(seeds)
    if not methods or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
        raise ValueError(f"methods: got {methods!r}; accepted: a non-empty subset of {METHODS}")
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ValueError(f"baselines: got {bad!r}; accepted: any of {tuple(BASELINES)}")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds: got {seeds!r}; accepted: a non-empty sequence of ints")
    check_unprocessed(model, base.allow_processed)
    keep = {"trained": None, **{b: BASELINES[b] for b in baselines}}
    units = grid_units(len(tasks), lrs, list(keep), seeds)
    bos = [default_prepend_bos(model, t) if prepend_bos is None else prepend_bos for t in tasks]
    be = backend_of(model)
    settings = {"tasks": names, "lrs": lrs, "seeds": list(seeds), "methods": list(methods),
                "baselines": list(baselines), "gd": {k: repr(v) for k, v in vars(base).items() if k != "lr"}, "n_demos": n_demos,
                "n_queries": n_queries, "position": position, "prepend_bos": bos, "context_budget": context_budget,
                "single_token_labels": single_token_labels, "batch_size": batch_size, "kendall": kendall,
                "model": {"n_layers": be.n_layers, "d_vocab": be.d_vocab}}

    def run_unit(unit):
        ti, lr, variant, seed = unit
        configs = [replace(cfgs[lr], layer_causal=(m == "lcgd")) for m in methods]
        t0 = time.perf_counter()
        layer_rows: list = []
        run_rows: list = []
        with torch_threads(num_threads) if num_threads is not None else nullcontext():
            ttask = resolve_task(model, tasks[ti], seed, n_demos, n_queries, position, bos[ti], single_token_labels)
            m = model if keep[variant] is None else untrained_like(model, keep=keep[variant], seed=seed)
            run_variant(m, ttask, configs, seed=seed, context_budget=context_budget, batch_size=batch_size,
                        kendall=kendall, variant=variant, layer_rows=layer_rows, run_rows=run_rows)
            if m is not model:
                del m
                gc.collect()  # free the baseline model before the next unit builds one (peak memory)
        return {"layers": layer_rows, "runs": run_rows, "seconds": time.perf_counter() - t0}

    out = None if out_dir is None else Path(out_dir).expanduser()
    if shard_dir is None and out is not None:
        shard_dir = out / ".shards"

    def merge(results, stats):
        cells: dict = {}
        for unit, res in zip(units, results):
            cells.setdefault((unit[0], unit[1]), []).append(res)
        merged = {}
        for (ti, lr), parts in cells.items():
            cfg = cfgs[lr]
            s = {"task": names[ti], "n_demos": n_demos, "n_queries": n_queries, "seeds": list(seeds),
                 "position": position, "methods": list(methods), "baselines": list(baselines), "lr": cfg.lr,
                 "params": cfg.params, "loss": cfg.loss, "order": cfg.order, "readout": cfg.readout,
                 "epochs": cfg.epochs, "prepend_bos": bos[ti], "context_budget": context_budget,
                 "n_layers": be.n_layers, "threads": num_threads or torch.get_num_threads(),
                 "seconds": round(sum(p["seconds"] for p in parts), 2)}
            merged[(names[ti], lr)] = Comparison(pd.DataFrame([r for p in parts for r in p["layers"]]),
                                                 pd.DataFrame([r for p in parts for r in p["runs"]]), s)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            for (name, lr), res in merged.items():
                (out / grid_file(name, lr)).write_text(res.to_json())
            summary = {"tasks": names, "lrs": lrs, "seeds": list(seeds), "methods": list(methods),
                       "baselines": list(baselines), "units": len(units),
                       "files": [grid_file(n, lr) for n, lr in merged], "world_size": ctx.world_size,
                       "ranks": [vars(st) for st in stats],
                       "seconds": round(sum(p["seconds"] for r in cells.values() for p in r), 2)}
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return merged

    return distributed.sharded_map("iclgd compare", units, run_unit,
                                   shard_dir=None if shard_dir is None else Path(shard_dir).expanduser(),
                                   settings=settings, merge=merge, ctx=ctx, progress=progress)


__all__ = ["compare_grid", "grid_file", "grid_units"]


# -- the command line (``tl-plugins iclgd compare`` with several tasks or rates, --out, or torchrun) --

def cli_task(name: str, model: Any, n_demos: Optional[int], n_queries: Optional[int]):
    """A CLI task name as compare() takes it: "copy_token" is the raw-id copy task (any model, no
    tokenizer needed; pools of ``n_demos`` and ``n_queries`` pairs), anything else a built-in name."""
    if name != COPY_TASK:
        return name
    return synthetic_task(backend_of(model).d_vocab, n_demos or 16, n_queries or 50)


def run_cli(model: Any, task_names: Sequence[str], lrs: Sequence[float], gd: GDConfig, *, json_file: Any,
            out_dir: Any, per_layer: bool, echo: Any, **kw: Any) -> None:
    """The sharded path of ``iclgd compare``: inside :func:`tl_plugins.distributed.session`, rank 0
    prints each cell's table and writes ``--json`` (one cell) or the ``--out`` folder."""
    import pandas as pd

    from tl_plugins import distributed

    shard_dir = None
    if out_dir is None and json_file is not None:
        shard_dir = json_file.with_name(json_file.name + ".shards")
    with distributed.session() as ctx:
        tasks = [cli_task(t, model, kw.get("n_demos"), kw.get("n_queries")) for t in task_names]
        res = compare_grid(model, tasks, lrs, gd, out_dir=out_dir, shard_dir=shard_dir, ctx=ctx,
                           progress=True, **kw)
    if not ctx.is_main:
        return
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        for (task, lr), comp in res.items():
            if len(res) > 1:
                echo(f"\ntask {task}, lr {lr}")
            echo(comp.table().to_string(index=False))
            if per_layer:
                echo(comp.to_frame("layer").to_string(index=False))
    if json_file is not None:
        (comp,) = res.values()
        json_file.write_text(comp.to_json())
        echo(f"written {json_file} ({comp.settings['seconds']:.1f} s of work on {ctx.world_size} process(es))")
    if out_dir is not None:
        echo(f"written {len(res)} cells and summary.json to {out_dir} ({ctx.world_size} process(es))")
