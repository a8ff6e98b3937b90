"""The ``flex`` backend: top-k attention as FlexAttention with a per-row threshold ``score_mod``.

Pass 1 (``threshold.row_thresholds``, linear memory) finds each row's boundary; pass 2 is
``torch.nn.attention.flex_attention`` whose ``score_mod`` sends every score below the boundary to
-inf, with causal and padding masks as a ``BlockMask`` (fully masked tiles are skipped). The
forward and the gradients are FlexAttention's own: on CUDA a compiled fused kernel (linear memory),
on CPU PyTorch's unfused reference, which materialises the scores and has no backward in torch
2.13, so on CPU this backend is for inference and for checking pass 1 against the other backends.

Pass 2 recomputes the scores in its own order. The boundary sits halfway between the k-th and the
(k+1)-th score, so the kept set equals the rule's unless those two scores are within rounding of
each other (about 1e-7 relative in fp32); exact ties resolve by key index as the rule says.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from jaxtyping import Float, Int, Shaped

from tl_topk.ops.chunked import DEFAULT_MEMORY_BUDGET
from tl_topk.ops.dense import soft_cap
from tl_topk.ops.threshold import row_thresholds


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when this torch has ``torch.nn.attention.flex_attention`` (checked once)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def availability() -> str:
    """One line: can the flex backend run here, and how."""
    if not available():
        return f"not available: torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if torch.cuda.is_available():
        return "available (CUDA, compiled FlexAttention); auto picks it where triton cannot take a CUDA call"
    return "available on CPU for inference only (unfused reference, no backward); CUDA compiles a fused kernel"


def unsupported_reason(q: torch.Tensor) -> str | None:
    """Why flex cannot take this call (None when it can)."""
    if not available():
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} is not float32/bfloat16/float16"
    return None


def supports(q: torch.Tensor) -> bool:
    """True when ``auto`` may pick flex: CUDA tensors and a supported call."""
    return q.device.type == "cuda" and unsupported_reason(q) is None


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=None: the first shape compiles static, a second shape recompiles with dynamic sizes
    # (decode steps grow k_pos by one per token) instead of once per length.
    return torch.compile(flex_attention)


def flex_topk_attention(
    q: Float[torch.Tensor, "batch query_pos head_index d_head"],
    k: Float[torch.Tensor, "batch key_pos kv_head_index d_head"],
    v: Float[torch.Tensor, "batch key_pos kv_head_index d_v"],
    k_rows: Int[torch.Tensor, "batch head_index query_pos"],
    kk: int,
    *,
    causal: bool,
    key_padding_mask: Optional[Shaped[torch.Tensor, "batch key_pos"]],
    scale: float,
    softcap: Optional[float],
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    compile: bool | None = None,
    window: int | None = None,
) -> Float[torch.Tensor, "batch query_pos head_index d_v"]:
    """z [batch, query_pos, head_index, d_v] from pass 1 + FlexAttention.

    ``k_rows`` [batch, head_index, query_pos] int64 and ``kk`` its maximum, as the other backends take
    them. ``compile``: run ``torch.compile(flex_attention)`` (default: on CUDA only). Raises
    ``ValueError`` for unsupported calls and ``RuntimeError`` for a backward on CPU.
    """
    reason = unsupported_reason(q)
    if reason is not None:
        raise ValueError(f"backend='flex': {reason}; use backend='chunked'")
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.device.type != "cuda" and wants_grad:
        raise RuntimeError(
            f"backend='flex' on {q.device}: FlexAttention has no backward on CPU in torch "
            f"{torch.__version__}; use backend='chunked' for gradients on CPU, or run under torch.no_grad()")
    if q.device.type != "cuda":
        # FlexAttention refuses CPU inputs that require grad even under no_grad.
        q, k, v = q.detach(), k.detach(), v.detach()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, n_q, h, _ = q.shape
    n_k, h_kv = k.shape[1], k.shape[2]
    offset = n_k - n_q
    lo, tie, tie_idx = row_thresholds(q, k, k_rows, kk, causal=causal, key_padding_mask=key_padding_mask,
                                      scale=scale, softcap=softcap, memory_budget=memory_budget, window=window)
    ninf = float("-inf")

    def score_mod(score, bi, hi, qi, ki):
        s = soft_cap(score, softcap)
        keep = (s > lo[bi, hi, qi]) | ((s == tie[bi, hi, qi]) & (ki <= tie_idx[bi, hi, qi]))
        return torch.where(keep, s, ninf)

    block_mask = None
    if causal or key_padding_mask is not None:
        pad = key_padding_mask.to(torch.bool) if key_padding_mask is not None else None
        # A tensor, not a Python int: the compiled kernel takes it as an input instead of
        # specialising on it, so decode steps (a new offset each) do not recompile for that.
        offset_t = torch.tensor(offset, device=q.device)

        def mask_mod(bi, hi, qi, ki):
            ok = ki >= 0
            if causal:
                ok = ok & (ki <= qi + offset_t)
                if window is not None:
                    ok = ok & (ki > qi + offset_t - window)
            if pad is not None:
                ok = ok & pad[bi, ki]
            return ok

        block_mask = create_block_mask(mask_mod, b if pad is not None else None, None, n_q, n_k,
                                       device=q.device)
    use_compile = q.device.type == "cuda" if compile is None else compile
    run = _compiled_flex() if use_compile else flex_attention
    out = run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod,
              block_mask=block_mask, scale=scale, enable_gqa=h != h_kv)
    return out.transpose(1, 2)
