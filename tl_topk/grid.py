"""Perplexity vs k over a grid of (mode, k, layer set), split over torchrun ranks.

``tl-plugins topk perplexity`` with ``--per-layer`` scores top-k on each layer alone (one layer set
per layer), without it on the ``--layers`` set (all layers by default). Each (mode, k, layer set) is a
work unit: one forward pass of the scored text with the topk plugin enabled on those layers, which
depends on nothing but the unit. Under ``torchrun`` the units are split by rank
(:mod:`tl_plugins.distributed`), checkpointed in per-rank shard logs next to the CSV, and rank 0
merges the rows in the order :func:`tl_topk.analysis.perplexity_sweep` gives them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

import tl_plugins
from tl_topk.analysis import MODES, perplexity


def grid_units(modes: Sequence[str], ks: Sequence[Any], layer_sets: Sequence[Optional[Sequence[int]]]) -> list:
    """(mode, k, layer set) for every cell, in merge order (layer set, then mode, then k); a layer set
    is a list of layers or None (all)."""
    return [(m, k, None if ls is None else list(ls)) for ls in layer_sets for m in modes for k in ks]


def perplexity_grid(model: Any, tokens: torch.Tensor, ks: Sequence[Any], *, modes: Sequence[str] = MODES,
                    layer_sets: Sequence[Optional[Sequence[int]]] = (None,), backend: str = "auto",
                    ff_rule: str = "value", shard_dir: Any = None, settings: Optional[dict] = None,
                    progress: bool = False, ctx: Any = None) -> Optional[tuple[float, list[dict]]]:
    """(dense perplexity, rows) on rank 0, None elsewhere; rows as ``perplexity_sweep(...).rows`` for each
    layer set in turn, with a ``layers`` entry ("all" or "0,3,5") when there is more than one set.

    tokens: [batch, pos], the same on every rank. shard_dir: where finished units are checkpointed (None:
    no checkpoints, rows reach rank 0 over the process group). settings: anything else the ranks must
    agree on (the model name, the text). The model is left as it was.
    """
    from tl_plugins import distributed

    ctx = distributed.current() if ctx is None else ctx
    if tl_plugins.active(model).get("topk") is not None:
        raise ValueError("model: the topk plugin is already enabled; disable it before a sweep")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes: got {list(modes)!r}; accepted: any of {', '.join(MODES)}")
    layer_sets = list(layer_sets)
    units = grid_units(modes, ks, layer_sets)
    tok_sum = int(tokens.long().sum())  # the ranks must score the same text
    agreed = {**(settings or {}), "tokens": [list(tokens.shape), tok_sum], "backend": backend, "ff_rule": ff_rule}
    dense = perplexity(model, tokens)  # every rank: "n" units and the ratios need it

    def run_unit(unit):
        mode, k, layers = unit
        if k == "n":
            return dense
        opts = {"attention": dict(k=k), "feed-forward": dict(ff_k=k, ff_rule=ff_rule),
                "both": dict(k=k, ff_k=k, ff_rule=ff_rule)}[mode]
        with tl_plugins.enabled(model, "topk", backend=backend, layers=layers, **opts):
            return perplexity(model, tokens)

    def merge(results, stats):
        rows = []
        for (mode, k, layers), ppl in zip(units, results):
            row = dict(mode=mode, k=str(k) if k == "n" else int(k), perplexity=ppl, ratio=ppl / dense)
            if len(layer_sets) > 1:
                row = {"layers": "all" if layers is None else ",".join(map(str, layers)), **row}
            rows.append(row)
        return dense, rows

    return distributed.sharded_map("topk perplexity", units, run_unit,
                                   shard_dir=None if shard_dir is None else Path(shard_dir),
                                   settings=agreed, merge=merge, ctx=ctx, progress=progress)


__all__ = ["perplexity_grid", "grid_units"]
