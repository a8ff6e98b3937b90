"""The ``triton`` backend's front: availability checks and the call into ``_triton_kernels``.

The kernels live in ``_triton_kernels`` and are imported only when first used, because Triton reads
``TRITON_INTERPRET`` (run kernels in its CPU interpreter, for tests) when that module is imported.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
from jaxtyping import Float, Int, Shaped

MAX_K = 128  # per-row top-k buffer = one key tile; larger k does not fit registers
HEAD_DIMS = (16, 32, 64, 128)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def availability() -> str:
    """One line: can the triton backend run here, and why not."""
    if not installed():
        return "not available: the triton package is not installed (pip install triton)"
    if torch.cuda.is_available():
        return "available (CUDA); auto picks it for supported calls on CUDA tensors"
    if _interpret():
        return "available in the CPU interpreter (TRITON_INTERPRET=1): for tests only, slow"
    return "not available: needs CUDA (or TRITON_INTERPRET=1 for the CPU interpreter)"


def check_available(q: torch.Tensor) -> None:
    """Raise ``RuntimeError`` naming the reason when the triton backend cannot run on ``q``'s device."""
    if not installed():
        raise RuntimeError("backend='triton': the triton package is not installed; pip install triton, "
                           "or use backend='chunked'")
    if q.device.type != "cuda" and not _interpret():
        raise RuntimeError(f"backend='triton' needs CUDA tensors, got device {q.device}; use backend='chunked' "
                           "on CPU (or set TRITON_INTERPRET=1 before importing to run Triton's CPU interpreter)")


def unsupported_reason(q: torch.Tensor, kk: int, softcap, window=None) -> str | None:
    """Why the kernel cannot take this call (None when it can)."""
    if window is not None:
        return "sliding-window attention is not implemented in the kernel"
    if q.shape[-1] not in HEAD_DIMS:
        return f"d_head {q.shape[-1]} is not one of {HEAD_DIMS}"
    if kk > MAX_K:
        return f"k = {kk} exceeds the kernel's per-row buffer of {MAX_K}"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} is not float32/bfloat16/float16"
    return None


def supports(q: torch.Tensor, kk: int, softcap, window=None) -> bool:
    """True when ``auto`` may pick triton: CUDA tensors, Triton installed and a supported call."""
    return q.device.type == "cuda" and installed() and unsupported_reason(q, kk, softcap, window) is None


def triton_topk_attention(
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
    window: Optional[int] = None,
) -> Float[torch.Tensor, "batch query_pos head_index d_v"]:
    """z [batch, query_pos, head_index, d_v] from the kernels; ``k_rows`` keys kept per row, ``kk``
    its maximum. Raises ``ValueError`` for calls the kernels do not support."""
    check_available(q)
    reason = unsupported_reason(q, kk, softcap, window)
    if reason is not None:
        raise ValueError(f"backend='triton': {reason}; use backend='chunked'")
    from tl_topk.ops._triton_kernels import TritonTopKAttention

    return TritonTopKAttention.apply(q, k, v, k_rows, kk, causal, key_padding_mask, scale, softcap)
