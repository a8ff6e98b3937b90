"""``tl-plugins bench topk --backend bridge``: top-k attention on a TransformerBridge.

One SmolLM2-shaped decoder layer (d_model 576, 9 query heads over 3 K/V heads, d_head 64, gated MLP
1536, vocabulary cut to 2048 so the unembedding does not dominate), random weights, booted with
TransformerLens's ``boot_transformers``; fp32, batch 1, the loss's forward + backward:

1. memory: peak extra resident memory of the bridge with ``topk`` (k = 32, chunked) vs the same
   bridge without it (the library's eager attention) and with the ``sdpa`` plugin (exact dense
   attention through SDPA, the baseline a user has), n = 1K..8K, in a fresh process;
2. time: the same three, median of interleaved runs at n = 4096;
3. overhead: forward time (no grad) at n = 1024 of the bridge and of a HookedTransformer on the same
   weights, each with and without the plugin (HookedTransformer only on transformer-lens 3.x).
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
import warnings
from typing import Any, Callable

import torch

from tl_plugins.bench import BenchResult, device_description

K_TOP = 32


def _hf_layer(n_ctx: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=2048, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                      max_position_embeddings=max(n_ctx, 2048), rms_norm_eps=1e-5, rope_theta=100000.0,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()


def _models(n_ctx: int, with_hooked: bool):
    """(bridge, HookedTransformer or None) on the same weights."""
    from tl_plugins.models.local import hf_to_bridge, hf_to_hooked
    from tl_plugins.models.tiny import hooked_available, word_tokenizer

    hf = _hf_layer(n_ctx)
    tok = word_tokenizer(hf.config.vocab_size)
    hooked = hf_to_hooked(hf, tok, n_ctx=n_ctx) if with_hooked and hooked_available() else None
    bridge = hf_to_bridge(copy.deepcopy(hf), tok, n_ctx=n_ctx)
    return bridge, hooked


def _with_topk(model: Any) -> Any:
    import tl_plugins

    tl_plugins.enable(model, "topk", k=K_TOP, backend="chunked")
    return model


def _loss_run(model: Any, tokens: torch.Tensor) -> Callable[[], None]:
    def run():
        model.zero_grad(set_to_none=True)
        out = model(tokens)
        out.float().logsumexp(-1).mean().backward()
        del out
        model.zero_grad(set_to_none=True)

    return run


def _memory_in_fresh_process(ns: list[int]) -> list[dict]:
    import tl_plugins
    from tl_plugins.measure import fixed_mmap_threshold, peak_cpu_extra

    fixed_mmap_threshold()
    bridge, _ = _models(max(ns), with_hooked=False)
    rows = []
    warm = torch.randint(4, 2048, (1, min(ns)))
    _loss_run(bridge, warm)()
    with tl_plugins.enabled(bridge, "topk", k=K_TOP, backend="chunked"):
        _loss_run(bridge, warm)()
    with tl_plugins.enabled(bridge, "sdpa"):
        _loss_run(bridge, warm)()
    for n in ns:
        tokens = torch.randint(4, 2048, (1, n), generator=torch.Generator().manual_seed(n))
        dense = peak_cpu_extra(_loss_run(bridge, tokens))
        with tl_plugins.enabled(bridge, "topk", k=K_TOP, backend="chunked"):
            top = peak_cpu_extra(_loss_run(bridge, tokens))
        with tl_plugins.enabled(bridge, "sdpa"):
            sdpa = peak_cpu_extra(_loss_run(bridge, tokens))
        rows.append(dict(part="bridge memory", n=n, k=K_TOP, method="bridge topk-chunked",
                         extra_MiB=top / 2**20, baseline="bridge eager (no plugin)",
                         baseline_MiB=dense / 2**20, ratio_to_baseline=top / dense if dense else float("nan"),
                         sdpa_MiB=sdpa / 2**20, ratio_to_sdpa=top / sdpa if sdpa else float("nan")))
        gc.collect()
    return rows


def _interleaved(runs: dict[str, Callable[[], None]], repeat: int) -> dict[str, float]:
    for run in runs.values():
        run()
    wall: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            wall[name].append(time.perf_counter() - t0)
    return {name: statistics.median(x) for name, x in wall.items()}


def bench_bridge(result: BenchResult, *, quick: bool, device: str = "cpu") -> None:
    """Add the bridge rows (see the module docstring) to ``result``."""
    import multiprocessing

    import tl_plugins

    if device != "cpu":
        result.notes.append("the bridge benchmark runs on the CPU only")
    ns = [256, 512] if quick else [1024, 2048, 4096, 8192]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result.rows.extend(pool.apply(_memory_in_fresh_process, (ns,)))
    mem = {r["n"]: r for r in result.rows if r.get("part") == "bridge memory"}
    if 8192 in mem:
        result.check(f"bridge, n=8K: top-k extra memory below the bridge's eager attention "
                     f"({mem[8192]['ratio_to_baseline']:.3f}x)", mem[8192]["ratio_to_baseline"] < 1.0)

    n_time, n_fwd = (512, 256) if quick else (4096, 1024)
    # Two copies of each model on the same weights, one with the plugin enabled throughout, so that
    # runs can interleave without enabling or disabling inside a timed call.
    bridge, hooked = _models(max(n_time, n_fwd), with_hooked=True)
    bridge_k, hooked_k = (_with_topk(m) if m is not None else None
                          for m in _models(max(n_time, n_fwd), with_hooked=True))
    bridge_s = _models(n_time, with_hooked=False)[0]
    tl_plugins.enable(bridge_s, "sdpa")
    tokens = torch.randint(4, 2048, (1, n_time), generator=torch.Generator().manual_seed(1))
    times = _interleaved({"bridge eager": _loss_run(bridge, tokens),
                          "bridge topk-chunked": _loss_run(bridge_k, tokens),
                          "bridge sdpa": _loss_run(bridge_s, tokens)}, repeat=1 if quick else 3)
    del bridge_s
    for name, t in times.items():
        result.add(part="bridge time", n=n_time, k=K_TOP, method=name, seconds=t,
                   ratio_to_baseline=t / times["bridge eager"], baseline="bridge eager",
                   ratio_to_sdpa=t / times["bridge sdpa"])

    fwd_tokens = tokens[:, :n_fwd]

    def forward(model):
        def run():
            with torch.no_grad():
                model(fwd_tokens)
        return run

    runs = {"bridge": forward(bridge), "bridge + topk": forward(bridge_k)}
    if hooked is not None:
        runs.update({"hooked": forward(hooked), "hooked + topk": forward(hooked_k)})
    fwd = _interleaved(runs, repeat=2 if quick else 5)
    base = "hooked" if hooked is not None else "bridge"
    for name, t in fwd.items():
        result.add(part="backend overhead", n=n_fwd, k=K_TOP, method=name, seconds=t,
                   ratio_to_baseline=t / fwd[base], baseline=base)
    if hooked is None:
        result.notes.append("backend overhead: no HookedTransformer on this transformer-lens (4.x); "
                            "bridge rows only")
    result.notes.append(f"bridge part: one SmolLM2-shaped layer, vocabulary 2048, fp32, batch 1, "
                        f"{device_description('cpu')}")


__all__ = ["bench_bridge"]
