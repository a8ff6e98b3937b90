"""``topk_attention``: the one functional op, its input checks and the backend choice.

Backends: ``dense`` (oracle, quadratic memory), ``chunked`` (linear memory, any device, in
ATen calls), ``cpp`` (linear memory, compiled CPU kernels: the fast CPU path), ``triton`` (GPU kernel: threshold pass + FlashAttention-style pass), ``flex`` (threshold
pass + FlexAttention with a threshold ``score_mod``; the second GPU path). ``auto`` takes
``triton`` on CUDA when it supports the call, else ``flex`` on CUDA, else ``dense`` when its score
matrices fit the memory budget, else ``cpp`` on the CPU where its extension builds, and ``chunked``
otherwise. Which backend a call asks for (the
``backend=`` argument, ``tl_topk.ops.use_backend`` blocks, ``TL_TOPK_BACKEND``) is settled once at
the start of ``topk_attention`` by ``tl_topk.ops.backend.requested_backend``; the phases below
(validate, plan, dispatch) and the backends take the result as an argument.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, cast

import torch
from jaxtyping import Float, Shaped

from tl_plugins.checks import is_int
from tl_topk.ops import cpp_backend, flex, triton_backend
from tl_topk.ops.backend import BACKENDS, ENV_BACKEND, check_backend, requested_backend
from tl_topk.ops.chunked import DEFAULT_MEMORY_BUDGET, chunked_topk_attention
from tl_topk.ops.dense import dense_topk_attention
from tl_topk.ops.mixed import full_attention, mixed_heads_attention
from tl_topk.ops.selection import KSpec, count_valid, k_per_row, per_head_spec, spec_covers_all

__all__ = ["BACKENDS", "ENV_BACKEND", "resolve_backend", "topk_attention"]


def resolve_backend(backend: str, device: torch.device, triton_ok: bool, dense_fits: bool = False,
                    flex_ok: bool = False, cpp_ok: bool = False) -> str:
    """The backend that will run for a requested one (pure: reads no environment). A named backend
    runs as asked; ``auto`` -> triton on CUDA when it supports the call, else flex on CUDA (k > 128,
    other head sizes), else dense when its score matrices fit the memory budget (small n), else cpp
    on the CPU when its extension is built (``cpp_ok``), else chunked."""
    check_backend(backend)
    if backend == "auto":
        if device.type == "cuda" and triton_ok:
            return "triton"
        if device.type == "cuda" and flex_ok:
            return "flex"
        if dense_fits:
            return "dense"
        return "cpp" if (device.type == "cpu" and cpp_ok) else "chunked"
    return backend


def _check_inputs(q, k, v, key_padding_mask, scale, softcap, causal=True, window=None):
    """Raise for tensors, masks and options ``topk_attention`` does not accept (the validate phase)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected [batch, pos, head, d_head], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}; accepted: one dtype for q, k, v")
        if t.device != q.device:
            raise ValueError(f"{name}: device {t.device} differs from q's {q.device}; accepted: one device")
    b, n_q, h, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"k, v: batch {k.shape[0]}, {v.shape[0]} differs from q's {b}")
    if k.shape[3] != d:
        raise ValueError(f"k: d_head {k.shape[3]} differs from q's {d}")
    if v.shape[1:3] != k.shape[1:3]:
        raise ValueError(f"v: [pos, head] {tuple(v.shape[1:3])} differs from k's {tuple(k.shape[1:3])}")
    if k.shape[2] < 1 or h % k.shape[2] != 0:
        raise ValueError(f"k: {k.shape[2]} K/V heads do not divide q's {h} heads (grouped-query attention)")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask: expected a tensor [batch, k_pos], got {type(key_padding_mask).__name__}")
        if tuple(key_padding_mask.shape) != (b, k.shape[1]):
            raise ValueError(f"key_padding_mask: shape {tuple(key_padding_mask.shape)}, expected [batch, k_pos] = {(b, k.shape[1])}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask: device {key_padding_mask.device} differs from q's {q.device}")
        if key_padding_mask.dtype.is_floating_point:
            raise TypeError(f"key_padding_mask: dtype {key_padding_mask.dtype}; accepted: bool or int (1 = real token)")
    for name, value, default in (("scale", scale, " (1/sqrt(d_head))"), ("softcap", softcap, "")):
        if value is not None and not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                                      and math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: got {value!r}; accepted: a finite positive number or None{default}")
    if q.shape[-1] == 0:
        raise ValueError(f"q: d_head is 0 (shape {tuple(q.shape)}); accepted: d_head >= 1")
    # One rule for every backend: non-finite inputs are refused, not turned into zeros by one backend
    # and NaN by another (auto picks a backend by sequence length).
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or infinite values; accepted: finite tensors (top-k "
                             "selection is undefined on NaN scores)")
    if window is not None:
        if not is_int(window) or window < 1:
            raise ValueError(f"window: got {window!r}; accepted: an int >= 1 (sliding-window size) or None")
        if not causal:
            raise ValueError(f"window: got {window!r} with causal=False; a sliding window is causal: "
                             "pass causal=True or window=None")


def topk_attention(
    q: Float[torch.Tensor, "batch query_pos head_index d_head"],
    k: Float[torch.Tensor, "batch key_pos kv_head_index d_head"],
    v: Float[torch.Tensor, "batch key_pos kv_head_index d_v"],
    k_top: KSpec,
    *,
    causal: bool,
    key_padding_mask: Optional[Shaped[torch.Tensor, "batch key_pos"]] = None,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    window: Optional[int] = None,
) -> Float[torch.Tensor, "batch query_pos head_index d_v"]:
    """Top-k attention in TransformerLens layout; differentiable.

    Args:
        q: [batch, query_pos, head_index, d_head] (post-rotary queries).
        k: [batch, key_pos, kv_head_index, d_head]; the number of query heads must be a multiple of
            the number of K/V heads (grouped-query attention: query head h reads K/V head h // group;
            never repeated).
        v: [batch, key_pos, kv_head_index, d_v].
        k_top: int >= 1, fraction in (0, 1] of each row's valid keys (rounded up), or one entry per
            query head (int, fraction or None for a dense head).
        causal: mask keys after the query; query i sits at key position i + key_pos - query_pos (so a
            KV-cache decode step with query_pos = 1 sees every key).
        key_padding_mask: [batch, key_pos] bool/int, true for real tokens.
        scale: multiplier of q.k (default 1/sqrt(d_head)); softcap: c * tanh(s / c) after scaling.
        window: sliding-window (local) attention, causal only: query at key position p sees keys
            p - window < j <= p (TransformerLens's local attention layers).
        backend: "auto", "dense", "chunked", "cpp", "triton" or "flex". A name other than ``auto`` wins;
            ``auto`` defers to the innermost ``tl_topk.ops.use_backend`` block, then to the environment
            variable ``TL_TOPK_BACKEND`` (read once, here, at the start of the call), then to the
            automatic pick: triton for supported CUDA calls, else flex on CUDA; otherwise dense when
            ~4 score matrices fit ``memory_budget`` (short sequences), else cpp (the compiled CPU
            kernels, ``tl_topk.ops.cpp_backend``) where its extension builds, else chunked. ``flex`` on CPU
            runs forward only (FlexAttention has no CPU backward).
        chunk_size / memory_budget: query rows per chunk, or bytes of transient buffers (chunked;
            flex's threshold pass takes ``memory_budget`` too).

    Heads whose k keeps every key (None, k >= key_pos) need no selection: unless the backend is
    ``dense`` or there is a soft-cap, they run through ``scaled_dot_product_attention`` and only the
    other heads reach the backend (``tl_topk.ops.mixed``).

    Returns:
        z: [batch, query_pos, head_index, d_v]. Row i mixes the V rows of its k largest valid scores
        (ties to the smaller key index); rows with fewer than k valid keys are dense; rows with no
        valid key are zero.
    """
    # Validate: the inputs, k_top and the requested backend (the one read of TL_TOPK_BACKEND).
    _check_inputs(q, k, v, key_padding_mask, scale, softcap, causal, window)
    spec = per_head_spec(k_top, q.shape[2])
    requested = requested_backend(backend)
    opts = _Options(causal=causal, key_padding_mask=key_padding_mask,
                    scale=float(scale) if scale is not None else q.shape[-1] ** -0.5,
                    softcap=float(softcap) if softcap is not None else None, chunk_size=chunk_size,
                    memory_budget=memory_budget, window=window)
    return _plan_and_run(q, k, v, spec, requested, opts)


@dataclass(frozen=True)
class _Options:
    """The validated options of one ``topk_attention`` call, as every phase below takes them."""

    causal: bool
    key_padding_mask: Optional[torch.Tensor]
    scale: float
    softcap: Optional[float]
    chunk_size: Optional[int]
    memory_budget: int
    window: Optional[int]


@dataclass(frozen=True)
class _Plan:
    """What one call runs. ``route``: "backend" (every head through ``backend``), "sdpa" (every head
    keeps every key) or "mixed" (``dense_heads`` through SDPA, the others through ``backend``)."""

    backend: str
    route: str
    spec: tuple
    k_rows: torch.Tensor  # [batch, head_index, query_pos] int64: keys kept per row
    kk: int  # k_rows.max()
    dense_heads: tuple


def _plan(q: torch.Tensor, k: torch.Tensor, spec: tuple, requested: str, opts: _Options) -> _Plan:
    """The plan phase: k per row, the backend that runs (``resolve_backend``) and the SDPA split."""
    b, n_q, h, _ = q.shape
    n_k = k.shape[1]
    n_valid = count_valid(n_q, n_k, opts.causal, opts.key_padding_mask, b, q.device, opts.window)
    k_rows = k_per_row(spec, n_valid, n_k)
    kk = int(k_rows.max().item())
    # The dense backend keeps about four [b, h, n_q, n_k] fp32 tensors alive for its backward.
    dense_fits = b * h * n_q * n_k * 4 * 4 <= opts.memory_budget
    # The cpp extension is built (or loaded from torch's cache) only when auto would pick it.
    cpp_ok = requested == "auto" and not dense_fits and cpp_backend.supports(q) and cpp_backend.available_for_auto()
    chosen = resolve_backend(requested, q.device, triton_backend.supports(q, kk, opts.softcap, opts.window),
                             dense_fits, flex.supports(q), cpp_ok)
    if chosen == "triton":
        triton_backend.check_available(q)
    dense_heads = tuple(i for i, e in enumerate(spec) if spec_covers_all((e,), n_k))
    route = "backend"
    if chosen != "dense" and dense_heads and opts.softcap is None:
        # Heads that keep every key need no selection: SDPA runs them (linear memory when causal
        # and square); only the top-k heads reach the backend, with their own k (see ops/mixed.py).
        route = "sdpa" if len(dense_heads) == h else "mixed"
    return _Plan(chosen, route, spec, k_rows, kk, dense_heads)


def _plan_and_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: tuple, requested: str,
                  opts: _Options) -> torch.Tensor:
    """Plan and dispatch validated inputs; ``requested`` is already resolved against the
    environment, so the mixed route's second pass over the top-k heads re-plans without re-reading it."""
    b, n_q, h, _ = q.shape
    if k.shape[1] == 0 or n_q == 0 or b == 0:
        return q.new_zeros(b, n_q, h, v.shape[3])
    return _dispatch(_plan(q, k, spec, requested, opts), q, k, v, requested, opts)


def _dispatch(plan: _Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, requested: str,
              opts: _Options) -> torch.Tensor:
    """The dispatch phase: call the pure function of ``plan``'s route and backend."""
    causal, pad, scale, window, softcap = opts.causal, opts.key_padding_mask, opts.scale, opts.window, opts.softcap
    if plan.route == "sdpa":
        return full_attention(q, k, v, causal=causal, key_padding_mask=pad, scale=scale, window=window)
    if plan.route == "mixed":
        def sparse_fn(qs, ks, vs, sub_spec):
            return _plan_and_run(qs, ks, vs, sub_spec, requested, opts)

        return mixed_heads_attention(q, k, v, plan.spec, plan.dense_heads, causal=causal, key_padding_mask=pad,
                                     scale=scale, sparse_fn=sparse_fn, window=window)
    if plan.backend == "dense":
        z = dense_topk_attention(q, k, v, plan.spec, causal=causal, key_padding_mask=pad, scale=scale,
                                 softcap=softcap, window=window)
        return cast(torch.Tensor, z)  # z alone: return_pattern is False
    if plan.backend == "triton":
        return triton_backend.triton_topk_attention(q, k, v, plan.k_rows, plan.kk, causal=causal,
                                                    key_padding_mask=pad, scale=scale, softcap=softcap,
                                                    window=window)
    if plan.backend == "cpp":
        return cpp_backend.cpp_topk_attention(q, k, v, plan.k_rows, plan.kk, causal=causal, key_padding_mask=pad,
                                              scale=scale, softcap=softcap, window=window)
    if plan.backend == "flex":
        return flex.flex_topk_attention(q, k, v, plan.k_rows, plan.kk, causal=causal, key_padding_mask=pad,
                                        scale=scale, softcap=softcap, memory_budget=opts.memory_budget,
                                        window=window)
    return chunked_topk_attention(q, k, v, plan.k_rows, plan.kk, causal=causal, key_padding_mask=pad, scale=scale,
                                  softcap=softcap, chunk_size=opts.chunk_size, memory_budget=opts.memory_budget,
                                  window=window)
