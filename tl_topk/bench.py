"""``tl-plugins bench topk``: quality, memory and time of top-k attention, each as a ratio to a
baseline measured in the same run.

1. Perplexity of the model (default SmolLM2-135M, unprocessed) on the stdlib Python docs vs k, with
   top-k attention, top-k feed-forward, and both. Targets: k = 64 within 1 %, k = 32 within 3 %.
2. Peak extra memory (CPU: resident set; CUDA: allocator peak) of one SmolLM2-shaped attention layer
   (9 heads over 3 K/V heads, d_head 64, fp32, batch 1), forward + backward, vs n, against SDPA
   (``scaled_dot_product_attention(is_causal=True, enable_gqa=True)``, the fused kernel a user
   has) measured at every n, and against the dense math path, measured where it fits and
   extrapolated quadratically (labelled) beyond.
3. Time at n = 4096, 8192, 16384, k = 32: forward + backward, and forward only under
   ``torch.no_grad()``: top-k (cpp, and chunked) vs SDPA (the baseline of every ratio) vs the dense math path
   (where it fits) and a paper-style chunked implementation that scatters into dense buffers.
4. With ``device="cuda"``: Triton vs SDPA (flash) vs the paper-style implementation, bf16 and fp32.
"""

from __future__ import annotations

import gc
from typing import Any, Callable, Optional

import torch

from tl_plugins.bench import BenchResult, device_description
from tl_plugins.measure import fixed_mmap_threshold, median_time, peak_cpu_extra, peak_cuda_extra
from tl_topk.ops.attention import topk_attention
from tl_topk.reference import dense_math_attention, sdpa_attention  # noqa: F401 - the baselines

LAYER = dict(n_heads=9, n_kv_heads=3, d_head=64)


def layer_inputs(n: int, device: str, dtype=torch.float32, n_heads=9, n_kv_heads=3, d_head=64, seed=0):
    """Seeded q [1, n, n_heads, d_head] and k, v [1, n, n_kv_heads, d_head] (requiring grad) for one
    attention layer; the defaults are SmolLM2's shape (9 heads over 3 K/V heads, d_head 64)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(1, n, n_heads, d_head, generator=g, dtype=dtype).to(device).requires_grad_(True)
    k = torch.randn(1, n, n_kv_heads, d_head, generator=g, dtype=dtype).to(device).requires_grad_(True)
    v = torch.randn(1, n, n_kv_heads, d_head, generator=g, dtype=dtype).to(device).requires_grad_(True)
    return q, k, v


def _fwd_bwd(fn: Callable, q, k, v) -> Callable[[], None]:
    def run():
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
        del out

    return run


def topk_backends(device: str) -> list[str]:
    """The top-k backends the benchmark times, the first one being what ``auto`` runs at these sizes:
    triton on CUDA; on the CPU cpp (where its extension builds) and chunked."""
    from tl_topk.ops import cpp_backend

    if device.startswith("cuda"):
        return ["triton"]
    return ["cpp", "chunked"] if cpp_backend.available() else ["chunked"]


def _topk_method(k_top: int, backend: str) -> Callable:
    return lambda q, k, v: topk_attention(q, k, v, k_top, causal=True, backend=backend)


def _methods(k_top: int, device: str) -> dict[str, Callable]:
    from tl_topk.reference import paper_style_topk

    m = {f"topk-{b}": _topk_method(k_top, b) for b in topk_backends(device)}
    m.update({
        "dense-math": dense_math_attention,
        "paper-style": lambda q, k, v: paper_style_topk(q, k, v, k_top, causal=True),
    })
    if not device.startswith("cuda"):
        m["sdpa"] = sdpa_attention
    if device.startswith("cuda"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(q, k, v):
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                return torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                    enable_gqa=True).transpose(1, 2)

        m["sdpa-flash"] = sdpa
    return m


def peak_extra(fn: Callable, q, k, v, device: str) -> int:
    """Peak extra bytes of one forward + backward of ``fn`` (inputs already allocated)."""
    run = _fwd_bwd(fn, q, k, v)
    if device.startswith("cuda"):
        return peak_cuda_extra(run, device)
    return peak_cpu_extra(run)


def bench_memory(result: BenchResult, ns, dense_max_n: int, k_top: int, device: str, progress=None):
    """Rows (n, method, peak extra MiB); dense above ``dense_max_n`` extrapolated as n^2.

    On CPU every (method, n) is measured in a freshly spawned process of its own: a process that
    already held and freed large tensors (a model, or the method measured before) serves new ones
    from memory that is already resident, which hides them from the resident-set figure, so two
    methods measured one after the other in one process would favour the second.
    """
    _bench_memory(result, ns, dense_max_n, k_top, device, progress)


def _peak_in_fresh_process(name: str, n: int, k_top: int, device: str) -> tuple[int, list[str]]:
    """(peak extra bytes of one forward + backward of method ``name`` at ``n``, notes), measured in
    the calling process after a warm-up at n = 256 (thread pools, allocator arenas)."""
    notes = []
    if not device.startswith("cuda") and not fixed_mmap_threshold():
        notes.append("could not fix glibc's mmap threshold: CPU memory figures may be understated")
    fn = _methods(k_top, device)[name]
    _fwd_bwd(fn, *layer_inputs(256, device))()
    q, k, v = layer_inputs(n, device)
    return peak_extra(fn, q, k, v, device), notes


def _measure_peak(name: str, n: int, k_top: int, device: str, result: BenchResult) -> int:
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        peak, notes = _peak_in_fresh_process(name, n, k_top, device)
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(1) as pool:
            peak, notes = pool.apply(_peak_in_fresh_process, (name, n, k_top, device))
    for note in notes:
        if note not in result.notes:
            result.notes.append(note)
    return peak


def _bench_memory(result: BenchResult, ns, dense_max_n: int, k_top: int, device: str, progress=None):
    dense_ref: Optional[tuple[int, int]] = None
    methods = _methods(k_top, device)
    topk_name = [m for m in methods if m.startswith("topk")][0]
    sdpa_name = "sdpa" if "sdpa" in methods else ("sdpa-flash" if "sdpa-flash" in methods else None)
    measured: dict[int, float] = {}
    sdpa_ratio: dict[int, float] = {}
    for n in (progress(ns, "memory vs n") if progress else ns):
        top = _measure_peak(topk_name, n, k_top, device, result)
        measured[n] = top
        sdpa = _measure_peak(sdpa_name, n, k_top, device, result) if sdpa_name else float("nan")
        if n <= dense_max_n:
            dense = _measure_peak("dense-math", n, k_top, device, result)
            dense_ref = (n, dense)
            label = "measured"
        else:
            n0, d0 = dense_ref if dense_ref else (n, float("nan"))
            dense = d0 * (n / n0) ** 2
            label = f"extrapolated n^2 from n={n0}"
        score_bytes = LAYER["n_heads"] * n * n * 4
        sdpa_ratio[n] = top / sdpa if sdpa else float("nan")
        result.add(part="memory", n=n, k=k_top, method=topk_name, extra_MiB=top / 2**20,
                   sdpa_MiB=sdpa / 2**20, ratio_to_sdpa=sdpa_ratio[n],
                   dense_MiB=dense / 2**20, dense_is=label, score_matrix_MiB=score_bytes / 2**20,
                   ratio_to_dense=top / dense if dense else float("nan"))
    ordered = sorted(measured)
    growth = [measured[b] / measured[a] for a, b in zip(ordered, ordered[1:]) if b == 2 * a and measured[a] > 0]
    if growth:
        result.check(f"top-k extra memory grows linearly: doubling n at most 2.2x (worst {max(growth):.2f}x)",
                     max(growth) <= 2.2)
    if 16384 in measured:
        row = [r for r in result.rows if r.get("part") == "memory" and r["n"] == 16384][0]
        result.check(f"n=16K top-k extra memory <= 1/10 of dense ({row['ratio_to_dense']:.4f}, dense "
                     f"{row['dense_is']})", row["ratio_to_dense"] <= 0.1)
    big = {n: r for n, r in sdpa_ratio.items() if n >= 4096}
    if big:
        worst = max(big, key=big.get)
        result.check(f"top-k peak extra memory <= 1.2x SDPA at every n >= 4096 (worst {big[worst]:.2f}x at "
                     f"n={worst})", big[worst] <= 1.2)


def _fwd_only(fn: Callable, q, k, v) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            fn(q, k, v)

    return run


def _interleaved_medians(runs: dict[str, Callable[[], None]], repeat: int, sync: bool):
    """Median wall and CPU seconds per run, runs interleaved so that a busy machine's slow spells fall
    on every method alike."""
    import statistics
    import time

    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeat):
        for name, run in runs.items():
            if sync:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            if sync:
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return ({name: statistics.median(x) for name, x in wall.items()},
            {name: statistics.median(x) for name, x in cpu.items()})


# The targets for the CPU chunked backend, as ratios to SDPA measured in the same run.
TIME_TARGETS = {4096: 0.8, 16384: 0.5}
NO_GRAD_TARGET = 1.2


def bench_time(result: BenchResult, n, k_top: int, device: str, repeat: int, dense_max_n: int = 4096,
               paper_max_n: int = 4096, forward_only: bool = True):
    """Median wall and CPU seconds of forward + backward (part "time") and, with ``forward_only``, of
    the forward under ``torch.no_grad()`` (part "time (no grad)"), at each n of ``n`` (an int or a
    list). Every ratio is to SDPA measured in the same run (``ratio_to_baseline``); the dense math
    path (up to ``dense_max_n``) is a second baseline (``ratio_to_dense_math``)."""
    methods = _methods(k_top, device)
    sync = device.startswith("cuda")
    topk_name = [m for m in methods if m.startswith("topk")][0]
    base = "sdpa-flash" if "sdpa-flash" in methods else ("sdpa" if "sdpa" in methods else "dense-math")
    ns = [n] if isinstance(n, int) else list(n)
    for n in ns:
        q, k, v = layer_inputs(n, device)
        chosen = {name: fn for name, fn in methods.items()
                  if not ((name == "dense-math" and n > dense_max_n and base != name)
                          or (name == "paper-style" and n > paper_max_n))}
        parts = [("time", "fwd+bwd", _fwd_bwd)] + ([("time (no grad)", "forward (no grad)", _fwd_only)]
                                                   if forward_only else [])
        for part, what, make in parts:
            times, cpus = _interleaved_medians({name: make(fn, q, k, v) for name, fn in chosen.items()},
                                               repeat, sync)
            for name, t in times.items():
                result.add(part=part, n=n, k=k_top, method=name, seconds=t, cpu_seconds=cpus[name],
                           ratio_to_baseline=t / times[base], cpu_ratio_to_baseline=cpus[name] / cpus[base],
                           baseline=base,
                           ratio_to_dense_math=t / times["dense-math"] if "dense-math" in times else float("nan"))
            r = times[topk_name] / times[base]
            target = NO_GRAD_TARGET if part != "time" else TIME_TARGETS.get(n, 2.0 if base == "dense-math" else None)
            text = (f"n={n} k={k_top} {what} time <= {target}x {base} ({r:.2f}x wall, "
                    f"{cpus[topk_name] / cpus[base]:.2f}x CPU time)")
            if n >= 4096 and target is not None:  # the targets' sizes; below them auto picks dense on CPU
                result.check(text, r <= target)
            else:
                result.notes.append(f"not a target: n={n} k={k_top} {what}: {topk_name} {r:.2f}x {base} "
                                    f"({cpus[topk_name] / cpus[base]:.2f}x CPU time)")
            if "paper-style" in times and part == "time":
                result.notes.append(f"n={n}: paper-style chunked scatter takes "
                                    f"{times['paper-style'] / times[topk_name]:.2f}x the time of {topk_name}")
        del q, k, v
        gc.collect()


def _oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def bench_gpu(result: BenchResult, device: str, ns, k_top: int = 32, paper_max_n: int = 16384):
    """Part 4 (CUDA only): 12 heads x 64, bf16 and fp32, causal, batch 1, forward + backward.

    Triton and flex top-k vs SDPA (flash / memory-efficient) vs the paper-style implementation; each time and
    peak extra memory is a ratio to SDPA measured in the same run. Out-of-memory is recorded, not raised.
    """
    import torch._dynamo

    from tl_topk.reference import paper_style_topk

    # 2 dtypes x 6 lengths of compiled FlexAttention: keep dynamo from falling back to eager.
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    methods = _methods(k_top, device)
    fns = {"topk-triton": methods["topk-triton"],
           # the second GPU path: threshold pass + compiled FlexAttention, budget sized for a GPU
           "topk-flex": lambda q, k, v: topk_attention(q, k, v, k_top, causal=True, backend="flex",
                                                       memory_budget=1 << 30),
           "sdpa-flash": methods["sdpa-flash"],
           "paper-style": lambda q, k, v: paper_style_topk(q, k, v, k_top, causal=True)}
    for dtype in (torch.bfloat16, torch.float32):
        for n in ns:
            q, k, v = layer_inputs(n, device, dtype=dtype, n_heads=12, n_kv_heads=12, d_head=64)
            got = {}
            for name, fn in fns.items():
                if name == "paper-style" and n > paper_max_n:
                    continue
                try:
                    t = median_time(_fwd_bwd(fn, q, k, v), repeat=3, warmup=1, sync=True)
                    mem = peak_cuda_extra(_fwd_bwd(fn, q, k, v), device)
                    got[name] = (t, mem)
                except RuntimeError as exc:
                    if not _oom(exc):
                        raise
                    torch.cuda.empty_cache()
                    result.notes.append(f"gpu {dtype} n={n}: {name} ran out of memory")
            base = got.get("sdpa-flash")
            for name, (t, mem) in got.items():
                result.add(part="gpu", n=n, k=k_top, method=f"{name} {str(dtype).replace('torch.', '')}",
                           seconds=t, extra_MiB=mem / 2**20,
                           ratio_to_baseline=t / base[0] if base else float("nan"),
                           memory_ratio_to_sdpa=mem / base[1] if base and base[1] else float("nan"),
                           baseline="sdpa-flash")
            if base and "topk-triton" in got:
                t, mem = got["topk-triton"]
                tag = f"{str(dtype).replace('torch.', '')} n={n}"
                result.check(f"gpu {tag}: triton fwd+bwd <= 2x SDPA ({t / base[0]:.2f}x)", t <= 2 * base[0])
                result.check(f"gpu {tag}: triton extra memory <= 1.2x SDPA ({mem / max(base[1], 1):.2f}x)",
                             mem <= 1.2 * base[1])
                if "paper-style" in got:
                    sp = got["paper-style"][0] / t
                    result.check(f"gpu {tag}: triton >= 50x faster than paper-style ({sp:.1f}x)", sp >= 50)
            del q, k, v
            torch.cuda.empty_cache()


def bench_perplexity(result: BenchResult, model: Any, model_name: str, n_tokens: int, ks, progress=None):
    from tl_topk.analysis import docs_tokens, perplexity_sweep

    tokens = docs_tokens(model, n_tokens)
    sweep = perplexity_sweep(model, tokens, ks, model_name=model_name, progress=progress)
    for row in sweep.rows:
        result.add(part="perplexity", n=n_tokens, k=row["k"], method=row["mode"],
                   perplexity=row["perplexity"], ratio_to_dense=row["ratio"])
    att = {r["k"]: r["ratio"] for r in sweep.rows if r["mode"] == "attention"}
    if 64 in att:
        result.check(f"k=64 attention perplexity within 1% of dense ({(att[64] - 1) * 100:+.2f}%)", att[64] <= 1.01)
    if 32 in att:
        result.check(f"k=32 attention perplexity within 3% of dense ({(att[32] - 1) * 100:+.2f}%)", att[32] <= 1.03)
    result.notes.append(f"dense perplexity {sweep.dense:.4f} on {n_tokens} tokens of pydoc_data.topics "
                        f"({model_name}, unprocessed weights)")
    return sweep


def bench_topk(*, quick: bool = False, model: str = "smollm2-135m", device: str = "cpu",
               backend: str = "hooked") -> BenchResult:
    """Run the four parts (the GPU part only with ``device='cuda'``); see the module docstring.
    ``backend="bridge"`` runs the TransformerBridge benchmark instead (``tl_topk.bench_bridge``)."""
    import tl_plugins

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device: got {device!r} but CUDA is not available on this machine; use device='cpu'")
    if backend not in ("hooked", "bridge"):
        raise ValueError(f"backend: got {backend!r}; accepted: hooked, bridge")
    if backend == "bridge":
        from tl_topk.bench_bridge import bench_bridge

        result = BenchResult("topk --backend bridge", device=device_description("cpu"))
        bench_bridge(result, quick=quick, device=device)
        return result
    result = BenchResult("topk", device=device_description(device))
    lm = tl_plugins.models.load(model)
    if quick:
        bench_perplexity(result, lm, model, 128, [4, 16, "n"])
        if device.startswith("cuda"):
            bench_gpu(result, device, [4096], paper_max_n=4096)
        bench_memory(result, [128, 256, 512], dense_max_n=512, k_top=32, device=device)
        bench_time(result, 512, 32, device, repeat=1, dense_max_n=512, paper_max_n=512)
    else:
        bench_perplexity(result, lm, model, 1024, [4, 8, 16, 32, 64, 128, "n"])
        del lm
        gc.collect()
        if device.startswith("cuda"):
            bench_memory(result, [4096, 8192, 16384, 32768], dense_max_n=16384, k_top=32, device=device)
            bench_time(result, 4096, 32, device, repeat=5)
            bench_gpu(result, device, [4096, 8192, 16384, 32768, 65536, 131072])
        else:
            bench_memory(result, [1024, 2048, 4096, 8192, 16384, 32768], dense_max_n=4096, k_top=32,
                         device=device)
            bench_time(result, [4096, 8192, 16384], 32, device, repeat=3)
    if not device.startswith("cuda"):
        result.notes.append("GPU figures (Triton vs SDPA flash vs paper-style) need --device cuda; "
                            "not measured in this run")
    return result
