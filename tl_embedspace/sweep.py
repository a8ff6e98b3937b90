"""Rank every head (OV and QK top pairs) and every feed-forward value of a model into files.

One file per item (``heads/ov_L3H1.parquet``, ``heads/qk_L3H1.parquet``, ``neurons/values_L3.parquet``),
written atomically (temporary name, then rename), so an interrupted sweep resumes by skipping the
files that exist. ``summary.json`` lists the items and each head's eigenvalue copying score.

Resuming never mixes settings: ``settings.json`` (written first) records everything that changes a
file's contents (bases, layer-norm mode, filters, k, k_neurons, format, the model's shapes and a
checksum of its weights); a folder holding another sweep's settings, or result files without
settings, is refused before anything is computed. Every file a resumed run would skip is read back
and checked (readable, expected columns and rows); a truncated or damaged one is recomputed.

Under ``torchrun`` (see :mod:`tl_plugins.distributed` and docs/scale.md) each rank sweeps a contiguous
share of the items, balanced by :func:`item_cost`, and writes their files; the item files are the
shards (one file per unit, so a killed rank's rerun skips what it finished). Ranks must agree on the
settings and items; rank 0 writes ``settings.json`` before any item and ``summary.json`` (with
``world_size``) after every rank has finished, so the folder holds the same files as a one-process
sweep's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from tl_embedspace import factored_topk as _topk
from tl_embedspace.projections import visible
from tl_plugins import distributed

FORMATS = ("parquet", "json")


def _write(df, path: Path, fmt: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    if fmt == "parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_json(tmp, orient="records", force_ascii=False)
    os.replace(tmp, path)


def sweep_items(space: Any, *, layers: Sequence[int] | None = None, heads: bool = True,
                neurons: bool = True, circuits: Sequence[str] = ("ov", "qk")) -> list[tuple]:
    """The items a sweep covers: ("ov"|"qk", layer, head) and ("values", layer, None)."""
    layers = list(range(space.n_layers)) if layers is None else [space.check_layer(l) for l in layers]
    items: list[tuple] = []
    for l in layers:
        if heads:
            items += [(c, l, h) for c in circuits for h in range(space.n_heads)]
        if neurons and space.w.d_mlp is not None:
            items.append(("values", l, None))
    return items


def item_path(out: Path, item: tuple, fmt: str) -> Path:
    kind, l, h = item
    return out / ("heads" if h is not None else "neurons") / (
        f"{kind}_L{l}H{h}.{fmt}" if h is not None else f"{kind}_L{l}.{fmt}")


def item_cost(space: Any, item: tuple) -> float:
    """Relative cost of an item, for balancing ranks: a head circuit's exact top-k is at most
    n**2 * d_head multiply-adds, a layer of neuron values d_mlp * d_model * n, where n is the number
    of tokens the filter keeps (d_vocab without a filter)."""
    w = space.w
    n = float(space.d_vocab if space.filter_ids is None else len(space.filter_ids))
    if item[2] is not None:
        return n * n * w.d_head
    return float(w.d_mlp) * w.d_model * n


def layer_circuits(space: Any, layer: int, kind: str) -> list:
    """Every head's OV or QK ``VocabMatrix`` of one layer, built with one product per factor side.

    Same matrices as ``space.ov(layer, h)`` / ``space.qk(layer, h)``; batching the heads turns
    n_heads thin products with the vocabulary into one (a third of a sweep's time otherwise).
    """
    from tl_embedspace.space import VocabMatrix

    w, d = space.w, space.w.d_model
    H, dh = w.n_heads, w.d_head
    if kind == "ov":
        A_all = space.R @ w.W_V_layer(layer).permute(1, 0, 2).reshape(d, H * dh)  # [V, H*dh]
        B_all = w.W_O_layer(layer).reshape(H * dh, d) @ space.W  # [H*dh, V]
    elif kind == "qk":
        A_all = space.R @ w.W_Q_layer(layer).permute(1, 0, 2).reshape(d, H * dh)
        B_all = (space.R @ w.W_K_layer(layer).permute(1, 0, 2).reshape(d, H * dh)).T
    else:
        raise ValueError(f"kind: got {kind!r}; accepted: 'ov' or 'qk'")
    return [VocabMatrix(space, A_all[:, h * dh:(h + 1) * dh], B_all[h * dh:(h + 1) * dh],
                        f"{kind.upper()} L{layer}H{h}", kind, layer, h) for h in range(H)]


def sweep_settings(space: Any, *, k: int, k_neurons: int, fmt: str) -> dict:
    """What determines the files' contents (compared on resume); JSON-serialisable."""
    w = space.w
    with torch.no_grad():
        checksum = float(w.W_U.double().abs().sum() + w.W_E.double().abs().sum())
        if w.d_mlp is not None:
            checksum += float(w.W_out_layer(0).double().abs().sum())
    return {"basis": space.basis, "filters": repr(space.filter_spec), "k": k, "k_neurons": k_neurons,
            "format": fmt, "model": {"n_layers": w.n_layers, "n_heads": w.n_heads, "d_model": w.d_model,
                                     "d_mlp": w.d_mlp, "d_vocab": w.d_vocab, "weights_checksum": round(checksum, 3)}}


SETTINGS = "settings.json"


def _check_folder(out: Path, settings: dict) -> None:
    """Refuse a folder that holds another sweep (other settings, or result files without settings)."""
    path = out / SETTINGS
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"out_dir: {str(out)!r} has an unreadable {SETTINGS} ({exc}); use a new folder "
                             "or delete it") from None
        if old != settings:
            diff = sorted(key for key in set(old) | set(settings) if old.get(key) != settings.get(key))
            raise ValueError(
                f"out_dir: {str(out)!r} holds a sweep with other settings ({', '.join(diff)} differ: "
                f"{', '.join(f'{key}={old.get(key)!r} there, {settings.get(key)!r} now' for key in diff)}); "
                "resuming would mix them: use a new folder, or delete that one")
        return
    existing = [p for sub in ("heads", "neurons") if (out / sub).is_dir() for p in (out / sub).iterdir()]
    if existing:
        raise ValueError(f"out_dir: {str(out)!r} holds {len(existing)} result files but no {SETTINGS}, so "
                         "it cannot be resumed safely; use a new folder, or delete that one")


def _expected_rows(space: Any, item: tuple, k: int, k_neurons: int) -> Optional[int]:
    kind, _, h = item
    if h is None:
        ids = space.filter_ids
        candidates = space.d_vocab if ids is None else int(len(ids))
        return space.w.d_mlp * min(k_neurons, candidates)
    return None  # a head's file may hold fewer than k pairs (filters): checked by columns only


_COLUMNS = {"heads": {"circuit", "layer", "head"}, "neurons": {"layer", "neuron", "rank", "token", "id", "value"}}


def _intact(path: Path, fmt: str, expected_rows: Optional[int], columns: set) -> bool:
    import pandas as pd

    try:
        df = pd.read_parquet(path) if fmt == "parquet" else pd.read_json(path, orient="records")
    except Exception:  # noqa: BLE001 - any failure to read back means the file must be recomputed
        return False
    if not columns <= set(df.columns):
        return False
    return expected_rows is None or len(df) == expected_rows


def sweep(space: Any, out_dir: str | Path, *, k: int = 50, k_neurons: int = 10, fmt: str = "parquet",
          layers: Sequence[int] | None = None, heads: bool = True, neurons: bool = True,
          progress: bool = True, ctx: Optional[distributed.Context] = None) -> Optional[dict]:
    """Write the ranking files and ``summary.json``; return the summary (items done, skipped, seconds).

    Heads: exact top-``k`` (largest) token pairs of each OV and QK circuit. Neurons: the top
    ``k_neurons`` value tokens of every neuron of each layer. ``out_dir`` may start with ``~``.
    Resuming checks settings and files (see the module docstring). ctx: the ranks to share the work
    with (default: :func:`tl_plugins.distributed.current`, one process unless a process group is
    initialised); the summary is returned on rank 0, None on the other ranks.
    """
    from tqdm.auto import tqdm

    if fmt not in FORMATS:
        raise ValueError(f"fmt: got {fmt!r}; accepted: {', '.join(FORMATS)}")
    _topk.check_k(k)
    _topk.check_k(k_neurons)
    for arg, value in (("heads", heads), ("neurons", neurons), ("progress", progress)):
        _topk.check_flag(value, arg)
    items = sweep_items(space, layers=layers, heads=heads, neurons=neurons)  # validates layers first
    if not items:
        raise ValueError("heads, neurons: nothing to sweep (heads=False and the model has no MLPs, or "
                         "neurons=False too)")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {str(out)!r} exists and is not a folder")
    settings = sweep_settings(space, k=k, k_neurons=k_neurons, fmt=fmt)
    ctx = distributed.current() if ctx is None else ctx
    distributed.agree({**settings, "items": [list(i) for i in items], "out": str(out)}, ctx)
    distributed.checked(lambda: _check_folder(out, settings), ctx)  # every rank sees the folder as it was
    if ctx.is_main:
        (out / "heads").mkdir(parents=True, exist_ok=True)
        (out / "neurons").mkdir(parents=True, exist_ok=True)
        if not (out / SETTINGS).exists():
            (out / SETTINGS).write_text(json.dumps(settings, indent=2))
    distributed.barrier(ctx)  # settings.json is there before any rank writes an item
    mine = distributed.split(items, ctx.rank, ctx.world_size, [item_cost(space, i) for i in items])
    counts = {"written": 0, "skipped_existing": 0, "recomputed_damaged": 0}
    t0 = time.perf_counter()
    desc = "embedspace sweep" + (f" [rank {ctx.rank}/{ctx.world_size}]" if ctx.distributed else "")

    def work() -> None:
        for item in tqdm(mine, desc=desc, disable=not progress, file=sys.stderr, position=ctx.local_rank):
            _sweep_item(space, out, item, fmt, k, k_neurons, counts, built)
            distributed.unit_done("embedspace sweep", distributed.unit_key(item), ctx)

    built: dict = {}  # (kind, layer) -> that layer's circuits, built once
    distributed.checked(work, ctx)
    gathered = distributed.all_gather(counts, ctx)  # the barrier: every item file is written after it
    if not ctx.is_main:
        return None
    totals = {key: sum(c[key] for c in gathered) for key in counts}
    summary_path = out / "summary.json"
    scores = space.copying_scores() if heads else None
    summary = {
        "basis": space.basis, "k": k, "k_neurons": k_neurons, "format": fmt, "items": len(items),
        **totals, "seconds": round(time.perf_counter() - t0, 2), "world_size": ctx.world_size,
        "copying_scores": scores.tolist() if scores is not None else None,
        "token_note": "token strings show spaces as " + visible(" "),
    }
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def _sweep_item(space: Any, out: Path, item: tuple, fmt: str, k: int, k_neurons: int, counts: dict,
                built: dict) -> None:
    """Write one item's file unless an intact one is there (counts updated in place)."""
    import pandas as pd

    path = item_path(out, item, fmt)
    if path.exists():
        sub = "heads" if item[2] is not None else "neurons"
        if _intact(path, fmt, _expected_rows(space, item, k, k_neurons), _COLUMNS[sub]):
            counts["skipped_existing"] += 1
            return
        counts["recomputed_damaged"] += 1  # damaged or truncated: computed again below
    kind, l, h = item
    if h is not None:
        if (kind, l) not in built:
            built.clear()  # keep one layer at a time
            built[(kind, l)] = layer_circuits(space, l, kind)
        mat = built[(kind, l)][h]
        r = mat.topk_pairs(k)
        df = r.to_frame()
        df.insert(0, "head", h)
        df.insert(0, "layer", l)
        df.insert(0, "circuit", kind)
    else:
        W_out = space.w.W_out_layer(l)  # [d_mlp, d_model]
        ids = space.filter_ids
        v, c = _topk.topk_per_row(W_out, space.W, k_neurons, cols=ids, budget_bytes=space.budget_bytes)
        n = W_out.shape[0]
        df = pd.DataFrame({
            "layer": l, "neuron": torch.arange(n).repeat_interleave(c.shape[1]).tolist(),
            "rank": torch.arange(1, c.shape[1] + 1).repeat(n).tolist(),
            "token": [space.token_str(i) for i in c.flatten().tolist()],
            "id": c.flatten().tolist(), "value": v.flatten().tolist()})
    _write(df, path, fmt)
    counts["written"] += 1
