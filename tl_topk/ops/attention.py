"""``topk_attention``: the one functional op, its input checks and the backend choice.

Backends: ``dense`` (oracle, quadratic memory), ``chunked`` (linear memory, any device, the CPU
path), ``triton`` (GPU kernel: threshold pass + FlashAttention-style pass), ``flex`` (threshold
pass + FlexAttention with a threshold ``score_mod``; the second GPU path). ``auto`` takes
``triton`` on CUDA when it supports the call, else ``flex`` on CUDA, else ``dense`` when its score
matrices fit the memory budget, and ``chunked`` otherwise; the environment variable
``TL_TOPK_BACKEND`` overrides both ``auto`` and an explicit choice.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import torch

from tl_topk.ops import flex, triton_backend
from tl_topk.ops.chunked import DEFAULT_MEMORY_BUDGET, chunked_topk_attention
from tl_topk.ops.dense import dense_topk_attention
from tl_topk.ops.mixed import full_attention, mixed_heads_attention
from tl_topk.ops.selection import KSpec, count_valid, k_per_row, per_head_spec, spec_covers_all

BACKENDS = ("auto", "dense", "chunked", "triton", "flex")
ENV_BACKEND = "TL_TOPK_BACKEND"


def resolve_backend(backend: str, device: torch.device, triton_ok: bool, dense_fits: bool = False,
                    flex_ok: bool = False) -> str:
    """The backend that will run: env override first; ``auto`` -> triton on CUDA when it supports
    the call, else flex on CUDA (k > 128, other head sizes), else dense when its score
    matrices fit the memory budget (small n: the gathers of the chunked backend cost n k d memory
    traffic, more than dense matmuls there), else chunked."""
    env = os.environ.get(ENV_BACKEND, "").strip().lower()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND}: got {env!r}; accepted: {', '.join(BACKENDS)}")
        backend = env
    if backend not in BACKENDS:
        raise ValueError(f"backend: got {backend!r}; accepted: {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda" and triton_ok:
            return "triton"
        if device.type == "cuda" and flex_ok:
            return "flex"
        return "dense" if dense_fits else "chunked"
    return backend


def _check_inputs(q, k, v, key_padding_mask, scale, softcap, causal=True, window=None):
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
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
            raise ValueError(f"window: got {window!r}; accepted: an int >= 1 (sliding-window size) or None")
        if not causal:
            raise ValueError(f"window: got {window!r} with causal=False; a sliding window is causal: "
                             "pass causal=True or window=None")


def topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_top: KSpec,
    *,
    causal: bool,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    window: Optional[int] = None,
) -> torch.Tensor:
    """Top-k attention in TransformerLens layout; differentiable.

    Args:
        q: [batch, q_pos, n_heads, d_head] (post-rotary queries).
        k: [batch, k_pos, n_kv_heads, d_head]; n_heads must be a multiple of n_kv_heads (grouped-
            query attention: query head h reads K/V head h // (n_heads // n_kv_heads); never repeated).
        v: [batch, k_pos, n_kv_heads, d_v].
        k_top: int >= 1, fraction in (0, 1] of each row's valid keys (rounded up), or one entry per
            query head (int, fraction or None for a dense head).
        causal: mask keys after the query; query i sits at key position i + k_pos - q_pos (so a KV-
            cache decode step with q_pos = 1 sees every key).
        key_padding_mask: [batch, k_pos] bool/int, true for real tokens.
        scale: multiplier of q.k (default 1/sqrt(d_head)); softcap: c * tanh(s / c) after scaling.
        window: sliding-window (local) attention, causal only: query at key position p sees keys
            p - window < j <= p (TransformerLens's local attention layers).
        backend: "auto", "dense", "chunked", "triton" or "flex" (env TL_TOPK_BACKEND overrides).
            ``auto``: triton for supported CUDA calls, else flex on CUDA; otherwise dense when ~4
            score matrices fit ``memory_budget`` (short sequences), else chunked. ``flex`` on CPU
            runs forward only (FlexAttention has no CPU backward).
        chunk_size / memory_budget: query rows per chunk, or bytes of transient buffers (chunked;
            flex's threshold pass takes ``memory_budget`` too).

    Heads whose k keeps every key (None, k >= k_pos) need no selection: unless the backend is
    ``dense`` or there is a soft-cap, they run through ``scaled_dot_product_attention`` and only the
    other heads reach the backend (``tl_topk.ops.mixed``).

    Returns:
        z: [batch, q_pos, n_heads, d_v]. Row i mixes the V rows of its k largest valid scores
        (ties to the smaller key index); rows with fewer than k valid keys are dense; rows with no
        valid key are zero.
    """
    _check_inputs(q, k, v, key_padding_mask, scale, softcap, causal, window)
    b, n_q, h, d = q.shape
    n_k = k.shape[1]
    spec = per_head_spec(k_top, h)
    scale = float(scale) if scale is not None else d ** -0.5
    softcap = float(softcap) if softcap is not None else None
    if n_k == 0 or n_q == 0 or b == 0:
        return q.new_zeros(b, n_q, h, v.shape[3])
    n_valid = count_valid(n_q, n_k, causal, key_padding_mask, b, q.device, window)
    k_rows = k_per_row(spec, n_valid, n_k)
    kk = int(k_rows.max().item())
    # The dense backend keeps about four [b, h, n_q, n_k] fp32 tensors alive for its backward.
    dense_fits = b * h * n_q * n_k * 4 * 4 <= memory_budget
    chosen = resolve_backend(backend, q.device, triton_backend.supports(q, kk, softcap, window), dense_fits,
                             flex.supports(q))
    if chosen == "triton":
        triton_backend.check_available(q)
    dense_heads = [i for i, e in enumerate(spec) if spec_covers_all((e,), n_k)]
    if chosen != "dense" and dense_heads and softcap is None:
        # Heads that keep every key need no selection: SDPA runs them (linear memory when causal
        # and square); only the top-k heads reach the backend, with their own k (see ops/mixed.py).
        if len(dense_heads) == h:
            return full_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                                  window=window)

        def sparse_fn(qs, ks, vs, sub_spec):
            return topk_attention(qs, ks, vs, sub_spec, causal=causal, key_padding_mask=key_padding_mask,
                                  scale=scale, backend=backend, chunk_size=chunk_size, memory_budget=memory_budget,
                                  window=window)

        return mixed_heads_attention(q, k, v, spec, dense_heads, causal=causal, key_padding_mask=key_padding_mask,
                                     scale=scale, sparse_fn=sparse_fn, window=window)
    if chosen == "dense":
        return dense_topk_attention(q, k, v, spec, causal=causal, key_padding_mask=key_padding_mask,
                                    scale=scale, softcap=softcap, window=window)
    if chosen == "triton":
        return triton_backend.triton_topk_attention(q, k, v, k_rows, kk, causal=causal,
                                                    key_padding_mask=key_padding_mask, scale=scale,
                                                    softcap=softcap, window=window)
    if chosen == "flex":
        return flex.flex_topk_attention(q, k, v, k_rows, kk, causal=causal, key_padding_mask=key_padding_mask,
                                        scale=scale, softcap=softcap, memory_budget=memory_budget, window=window)
    return chunked_topk_attention(q, k, v, k_rows, kk, causal=causal, key_padding_mask=key_padding_mask,
                                  scale=scale, softcap=softcap, chunk_size=chunk_size,
                                  memory_budget=memory_budget, window=window)
