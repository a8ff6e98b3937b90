"""``tl-plugins bench embedspace``: exact top-k pairs of one head, find_neurons, the whole-model sweep
(measured on a sample of layers and extrapolated), and the speed-up over materialise-then-threshold
measured side by side on a vocabulary slice where the dense matrix fits in memory."""

from __future__ import annotations

import gc
import tempfile
import time

import torch

from tl_embedspace.factored_topk import DEFAULT_BUDGET_BYTES as BUDGET
from tl_plugins.bench import BenchResult, device_description
from tl_plugins.measure import PeakMemory, median_time


def _pick_head(sp):
    if sp.n_layers == 30 and sp.n_heads == 9:  # SmolLM2-135M: a strong induction head
        return 18, 6
    if sp.n_layers == 18 and sp.n_heads == 4:  # Gemma 3 270M: a copying head (docs/embedspace.md)
        return 17, 1
    return sp.n_layers - 1, 0


def bench_embedspace(*, quick: bool = False, model: str = "smollm2-135m", device: str = "cpu") -> BenchResult:
    from tl_embedspace.space import EmbeddingSpace
    from tl_plugins import models

    if device != "cpu":
        raise ValueError(f"device: got {device!r}; accepted: 'cpu' (GPU figures were not taken for this plugin)")
    res = BenchResult("embedspace", device=device_description(device))
    m = models.load(model)
    sp = EmbeddingSpace(m, budget_bytes=BUDGET)
    l, h = _pick_head(sp)
    k = 100
    reps = 1 if quick else 5
    _bench_head_pairs(res, sp, l, h, k, reps)
    _bench_find_neurons(res, sp, quick)
    _bench_vs_materialised(res, sp.ov(l, h), k, reps, n=min(sp.d_vocab, 4096 if quick else 16384))
    _bench_sweep(res, sp, [l] if quick else sorted({0, sp.n_layers // 3, (2 * sp.n_layers) // 3, sp.n_layers - 1}))
    res.notes.append(f"model {model}, basis {sp.basis}; torch threads {torch.get_num_threads()}")
    if not torch.cuda.is_available():
        res.notes.append("CPU only: no CUDA device here, so no GPU figure")
    return res


def _bench_head_pairs(res: BenchResult, sp, l: int, h: int, k: int, reps: int) -> None:
    """1. exact top-k pairs of one head's OV (largest, abs) and QK, and the OV search's memory."""
    V = sp.d_vocab
    ov = sp.ov(l, h)
    ov.topk_pairs(k)  # warm-up (allocator, threads)
    t_ov = median_time(lambda: ov.topk_pairs(k), repeat=reps, warmup=0)
    gc.collect()
    with PeakMemory("cpu") as mem:
        r = ov.topk_pairs(k)
    res.add(task=f"top-{k} pairs OV L{l}H{h} (largest)", seconds=round(t_ov, 3),
            peak_extra_mb=round(mem.peak_extra / 2**20, 1), computed=f"{r.stats.fraction_computed:.2%}",
            note=f"vocab {V}, budget {BUDGET // 2**20} MB")
    from tl_embedspace import cpp_scan

    if r.stats.scan == "cpp":  # the same call on the torch scan, side by side
        t_torch = median_time(lambda: ov.topk_pairs(k, backend="torch"), repeat=max(1, reps // 2), warmup=0)
        res.add(task=f"top-{k} pairs OV L{l}H{h} (largest), torch scan", seconds=round(t_torch, 3),
                peak_extra_mb=None, computed=None, note=f"compiled scan / torch scan: {t_ov / t_torch:.2f}x")
    else:
        res.notes.append(f"OV L{l}H{h} ran the {r.stats.scan} scan (compiled scan: {cpp_scan.availability()})")
    t_abs = median_time(lambda: ov.topk_pairs(k, "abs"), repeat=reps, warmup=0)
    res.add(task=f"top-{k} pairs OV L{l}H{h} (abs)", seconds=round(t_abs, 3), peak_extra_mb=None,
            computed=None, note="")
    qk = sp.qk(l, h)
    t_qk = median_time(lambda: qk.topk_pairs(k), repeat=reps, warmup=0)
    res.add(task=f"top-{k} pairs QK L{l}H{h} (largest)", seconds=round(t_qk, 3), peak_extra_mb=None,
            computed=None, note="")
    res.check(f"exact top-{k} pairs of one head's OV <= 5 s median (vocab {V})", t_ov <= 5.0)
    res.check(f"peak extra memory under the chunk budget ({BUDGET // 2**20} MB) and under vocab^2 floats",
              mem.peak_extra < BUDGET and mem.peak_extra < V * V * 4)


def _bench_find_neurons(res: BenchResult, sp, quick: bool) -> None:
    """2. find_neurons over every layer in one product."""
    tok = 1000 % sp.d_vocab
    sp.find_neurons(tok)
    t_fn = median_time(lambda: sp.find_neurons(tok), repeat=5 if quick else 21, warmup=1)
    res.add(task="find_neurons (all layers, one product)", seconds=round(t_fn, 4), peak_extra_mb=None,
            computed=None, note=f"{sp.n_layers * (sp.w.d_mlp or 0)} neurons")
    res.check("find_neurons < 50 ms", t_fn < 0.05)


def _bench_vs_materialised(res: BenchResult, ov, k: int, reps: int, n: int) -> None:
    """3. streaming vs materialise-then-threshold on an n x n vocabulary slice that fits densely."""
    from tl_embedspace.factored_topk import topk_product
    from tl_embedspace.reference import materialized_topk

    A, B = ov.A[:n].contiguous(), ov.B[:, :n].contiguous()
    t_stream = median_time(lambda: topk_product(A, B, k, balance=True), repeat=reps, warmup=1)
    t_dense = median_time(lambda: materialized_topk(A, B, k), repeat=reps, warmup=1)
    s = topk_product(A, B, k, balance=True)
    d = materialized_topk(A, B, k)
    same = set(zip(s.rows.tolist(), s.cols.tolist())) == set(zip(d.rows.tolist(), d.cols.tolist()))
    res.add(task=f"streaming top-{k}, {n} x {n} slice", seconds=round(t_stream, 3), peak_extra_mb=None,
            computed=None, note=f"same pairs as dense: {same}")
    res.add(task=f"materialise + topk, {n} x {n} slice", seconds=round(t_dense, 3),
            peak_extra_mb=round(n * n * 4 / 2**20, 1), computed="100%",
            note=f"speed-up of streaming: {t_dense / t_stream:.1f}x")
    res.check("streaming and dense agree on the slice", same)


def _bench_sweep(res: BenchResult, sp, layers: list[int]) -> None:
    """4. the whole-model sweep, timed on a sample of layers and extrapolated."""
    from tl_embedspace.sweep import sweep, sweep_items

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sweep(sp, tmp, k=50, layers=layers, progress=False, heads=True, neurons=True)
        t_sample = time.perf_counter() - t0
    n_sample = len(sweep_items(sp, layers=layers))
    n_all = len(sweep_items(sp))
    est = t_sample * sp.n_layers / len(layers)
    res.add(task=f"sweep, layers {layers} ({n_sample} items)", seconds=round(t_sample, 1), peak_extra_mb=None,
            computed=None, note=f"whole model ({n_all} items) extrapolated: {est / 60:.1f} min")
    res.check("whole-model sweep (every head OV+QK, every FF value) <= 20 min (extrapolated from the sample)",
              est <= 20 * 60)
