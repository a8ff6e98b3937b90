"""The ``cpp`` backend: compiled CPU kernels for top-k attention (``tl_topk/ops/cpp/topk_cpu.cpp``).

The forward works in tasks of 12 query rows of one K/V head's plane (the group's query heads at
consecutive positions), dealt round-robin to the threads in one parallel region: a register-blocked
kernel computes the task's scores into a per-thread buffer that stays in cache, each row's k largest
are selected while the scores are hot (a lower bound of the k-th value rejects almost every key with
one vector comparison; keys are streamed in index order, so ties go to the smaller key index
exactly, as ``tl_topk.ops.selection`` defines), then the softmax and P V over the k kept keys: the
[rows, keys] scores are never written to memory. The backward is a sum over the saved (query, key)
pairs, O(n k d): each thread scatter-adds into its own dK/dV buffer and the buffers are summed in a
fixed order (deterministic). Inputs are read in TransformerLens's layout; K/V are never repeated for
grouped-query attention.

The extension is built with ``torch.utils.cpp_extension`` on first use (a C++ compiler and the
Python headers are needed; about a minute, once, into torch's extension cache,
``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). ``availability()`` says whether it
built and, if not, why; ``auto`` then picks ``chunked`` on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from jaxtyping import Float, Int, Shaped

from tl_plugins.extensions import CompiledExtension

SOURCE = Path(__file__).with_name("cpp") / "topk_cpu.cpp"
EXTENSION = CompiledExtension("tl_topk_cpu", SOURCE)

def load_extension() -> Any:
    """The compiled module (built on the first call, then cached per process); raises ``RuntimeError``
    saying why when it cannot be built."""
    return EXTENSION.load_for("backend='cpp'", "use backend='chunked'")


def available() -> bool:
    """Whether the extension is built or builds now (the first call may take about a minute)."""
    return EXTENSION.available()


def available_for_auto() -> bool:
    """``available()``, warning once per process when it is not (``auto`` then runs ``chunked``)."""
    return EXTENSION.available_or_warn("tl_topk", "backend='auto' runs 'chunked' on the CPU instead (slower, "
                                       "same results)")


def availability() -> str:
    """One line: can the cpp backend run here, and why not."""
    return EXTENSION.availability("compiled CPU kernels; auto on CPU beyond the dense sizes")


def supports(q: torch.Tensor) -> bool:
    """Whether the kernels take tensors like ``q`` (CPU tensors; any floating dtype, computed in
    float32, or float64 as given)."""
    return q.device.type == "cpu"


class CppTopKAttention(torch.autograd.Function):
    """z = top-k attention (see ``tl_topk.topk_attention``) by the compiled kernels. Saved for the
    backward, only when a gradient is needed: the kept key indices, [batch, head_index, query_pos, k]
    (int16 while key_pos < 32768, else int32), and each row's log-sum-exp; the backward recomputes
    each kept probability (and the soft-cap's slope) from one q.k dot product."""

    @staticmethod
    def forward(ctx, q, k, v, k_rows, kk, causal, key_padding_mask, scale, softcap, window):
        ext = load_extension()
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        save = any(ctx.needs_input_grad[:3])
        qc = q.to(compute).contiguous()  # no copy for contiguous float32/float64 input
        b, n_k, h_kv, d = k.shape
        # [b, h_kv, d, n_k + LANES - 1]: a task's score vectors start at its first visible key (not
        # aligned), so the last one may read up to LANES - 1 zero columns past n_k.
        kt = k.new_zeros(b, h_kv, d, n_k + ext.LANES - 1, dtype=compute)
        kt[..., :n_k] = k.permute(0, 2, 3, 1)
        vc = v.to(compute).contiguous()
        pad = key_padding_mask.to(dtype=torch.bool).contiguous() if key_padding_mask is not None else None
        cap = float(softcap) if softcap is not None else 0.0
        out, index, lse = ext.forward(qc, kt, vc, k_rows.contiguous(), kk, causal,
                                      -1 if window is None else int(window), pad, float(scale), cap, save)
        del kt
        if save:
            ctx.save_for_backward(q, k, v, index, lse)
        ctx.scale, ctx.cap = scale, cap
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, index, lse = ctx.saved_tensors
        ext = load_extension()
        compute = lse.dtype
        dq, dk, dv = ext.backward(q.to(compute).contiguous(), k.to(compute).contiguous(),
                                  v.to(compute).contiguous(), grad_out.to(compute).contiguous(), index, lse,
                                  float(ctx.scale), ctx.cap)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def cpp_topk_attention(
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
    """Functional entry: see ``CppTopKAttention``. ``k_rows`` [batch, head_index, query_pos] int64
    keys kept per row, ``kk`` its maximum. Inputs already checked by ``tl_topk.topk_attention``."""
    if not supports(q):
        raise ValueError(f"backend='cpp' runs on CPU tensors, got device {q.device}; use backend='triton' "
                         "or 'chunked' there")
    return CppTopKAttention.apply(q, k, v, k_rows, kk, causal, key_padding_mask, scale, softcap, window)


__all__ = ["CppTopKAttention", "availability", "available", "cpp_topk_attention", "load_extension", "supports"]
