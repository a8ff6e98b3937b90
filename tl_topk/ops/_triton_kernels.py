"""Triton kernels for top-k attention (imported lazily: ``TRITON_INTERPRET`` is read at import).

Pass 1 (``_threshold_kernel``) streams over key tiles keeping each query row's running top-BLOCK_N
keys, packed as one int64 per key: the score's order-preserving int32 bits in the high word and
``2^32 - 1 - key index`` in the low word, so that a larger packed value means a larger score, or an
equal score at a smaller key index (the tie rule). Merging is a sort of [running | tile] and a split.
The row's threshold is the packed value of its k-th key (INT64_MIN when it has fewer valid keys).

Pass 2 is FlashAttention (online softmax) with the extra mask ``packed(s_ij) >= threshold_i``; the
backward is FlashAttention-2 style (dK/dV per key tile looping over query tiles and the query heads
of its K/V group, dQ per query tile), recomputing scores with the same tile shapes and the same
``_scores`` code so every kernel sees the same bits and the same selection.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

INT64_MIN = -(2**63)


@triton.jit
def _scores(q, K, k_base, offs_n, offs_d, n_k, stride_kn, stride_kd, scale, cap, PREC: tl.constexpr,
            SOFTCAP: tl.constexpr):
    kt = tl.load(K + k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                 mask=offs_n[None, :] < n_k, other=0.0)
    s = tl.dot(q, kt, input_precision=PREC, out_dtype=tl.float32) * scale
    if SOFTCAP:
        s = cap * (2.0 * tl.sigmoid(2.0 * s / cap) - 1.0)  # cap * tanh(s / cap)
    return s


@triton.jit
def _cap_slope(ds, s, cap, SOFTCAP: tl.constexpr):
    """d(score) from d(capped score): times 1 - tanh^2 = 1 - (s / cap)^2, s the capped score."""
    if SOFTCAP:
        ds = ds * (1.0 - (s / cap) * (s / cap))
    return ds


@triton.jit
def _pack(s, offs_n):
    s = s + 0.0  # -0.0 -> +0.0, so that equal scores pack equally
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | (4294967295 - offs_n.to(tl.int64))


@triton.jit
def _valid(offs_m, offs_n, n_q, n_k, offset, PAD, pad_base, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr):
    valid = (offs_m[:, None] < n_q) & (offs_n[None, :] < n_k)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + offset)
    if HAS_PAD:
        pad = tl.load(PAD + pad_base + offs_n, mask=offs_n < n_k, other=0)
        valid = valid & (pad[None, :] != 0)
    return valid


@triton.jit
def _key_end(pid_m, n_k, offset, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key any row of query tile ``pid_m`` can see."""
    hi = n_k
    if CAUSAL:
        hi = tl.minimum(n_k, (pid_m + 1) * BLOCK_M + offset)
    return hi


@triton.jit
def _kept(q, K, k_base, offs_m, offs_n, offs_d, n_q, n_k, offset, skn, skd, scale, cap, PAD, pad_base, thr,
          HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, SOFTCAP: tl.constexpr):
    """Scores of a (query tile, key tile) and the keys the rule keeps: valid and packed >= threshold."""
    s = _scores(q, K, k_base, offs_n, offs_d, n_k, skn, skd, scale, cap, PREC, SOFTCAP)
    valid = _valid(offs_m, offs_n, n_q, n_k, offset, PAD, pad_base, HAS_PAD, CAUSAL)
    return s, valid & (_pack(s, offs_n) >= thr[:, None])


@triton.jit
def _threshold_kernel(Q, K, PAD, KROWS, THR,
                      sqb, sqn, sqh, sqd, skb, skn, skh, skd,
                      n_q, n_k, offset, H, G, scale, cap,
                      HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
                      SOFTCAP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=offs_m[:, None] < n_q, other=0.0)
    k_base = b * skb + (h // G) * skh
    best = tl.full([BLOCK_M, BLOCK_N], INT64_MIN, tl.int64)
    hi = _key_end(pid_m, n_k, offset, BLOCK_M, CAUSAL)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s = _scores(q, K, k_base, offs_n, offs_d, n_k, skn, skd, scale, cap, PREC, SOFTCAP)
        valid = _valid(offs_m, offs_n, n_q, n_k, offset, PAD, b * n_k, HAS_PAD, CAUSAL)
        packed = tl.where(valid, _pack(s, offs_n), INT64_MIN)
        merged = tl.sort(tl.reshape(tl.join(best, packed), [BLOCK_M, 2 * BLOCK_N]), dim=1, descending=True)
        best, _ = tl.split(tl.permute(tl.reshape(merged, [BLOCK_M, 2, BLOCK_N]), [0, 2, 1]))
    kr = tl.load(KROWS + pid_bh * n_q + offs_m, mask=offs_m < n_q, other=1)
    cols = tl.arange(0, BLOCK_N)[None, :]
    thr = tl.sum(tl.where(cols == kr[:, None] - 1, best, 0), axis=1)
    tl.store(THR + pid_bh * n_q + offs_m, thr, mask=offs_m < n_q)


@triton.jit
def _fwd_kernel(Q, K, V, PAD, THR, O, LSE,
                sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
                n_q, n_k, offset, H, G, scale, cap,
                HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
                SOFTCAP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_ptrs = b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd
    q = tl.load(Q + q_ptrs, mask=offs_m[:, None] < n_q, other=0.0)
    thr = tl.load(THR + pid_bh * n_q + offs_m, mask=offs_m < n_q, other=0)
    k_base = b * skb + (h // G) * skh
    v_base = b * svb + (h // G) * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    hi = _key_end(pid_m, n_k, offset, BLOCK_M, CAUSAL)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s, keep = _kept(q, K, k_base, offs_m, offs_n, offs_d, n_q, n_k, offset, skn, skd, scale, cap, PAD,
                        b * n_k, thr, HAS_PAD, CAUSAL, PREC, SOFTCAP)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + v_base + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=offs_n[:, None] < n_k, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC, out_dtype=tl.float32)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("inf"))
    tl.store(O + q_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < n_q)
    tl.store(LSE + pid_bh * n_q + offs_m, lse, mask=offs_m < n_q)


@triton.jit
def _bwd_dq_kernel(Q, K, V, PAD, THR, LSE, DELTA, DO, DQ,
                   sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
                   n_q, n_k, offset, H, G, scale, cap,
                   HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
                   SOFTCAP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_ptrs = b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd
    q = tl.load(Q + q_ptrs, mask=offs_m[:, None] < n_q, other=0.0)
    do = tl.load(DO + q_ptrs, mask=offs_m[:, None] < n_q, other=0.0)
    thr = tl.load(THR + pid_bh * n_q + offs_m, mask=offs_m < n_q, other=0)
    lse = tl.load(LSE + pid_bh * n_q + offs_m, mask=offs_m < n_q, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * n_q + offs_m, mask=offs_m < n_q, other=0.0)
    k_base = b * skb + (h // G) * skh
    v_base = b * svb + (h // G) * svh
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    hi = _key_end(pid_m, n_k, offset, BLOCK_M, CAUSAL)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s, keep = _kept(q, K, k_base, offs_m, offs_n, offs_d, n_q, n_k, offset, skn, skd, scale, cap, PAD,
                        b * n_k, thr, HAS_PAD, CAUSAL, PREC, SOFTCAP)
        p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
        vt = tl.load(V + v_base + offs_n[None, :] * svn + offs_d[:, None] * svd,
                     mask=offs_n[None, :] < n_k, other=0.0)
        dp = tl.dot(do, vt, input_precision=PREC, out_dtype=tl.float32)
        ds = _cap_slope(p * (dp - delta[:, None]), s, cap, SOFTCAP)
        k = tl.load(K + k_base + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=offs_n[:, None] < n_k, other=0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC, out_dtype=tl.float32)
    tl.store(DQ + q_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=offs_m[:, None] < n_q)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, PAD, THR, LSE, DELTA, DO, DK, DV,
                     sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
                     n_q, n_k, offset, H, G, HKV, scale, cap,
                     HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
                     SOFTCAP: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k_base = b * skb + hk * skh
    v_base = b * svb + hk * svh
    vt = tl.load(V + v_base + offs_n[None, :] * svn + offs_d[:, None] * svd,
                 mask=offs_n[None, :] < n_k, other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = tl.maximum(0, start_n - offset) // BLOCK_M * BLOCK_M
    for gi in range(0, G):
        h = hk * G + gi
        row = (b * H + h) * n_q
        for start_m in range(lo, n_q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_ptrs = b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd
            q = tl.load(Q + q_ptrs, mask=offs_m[:, None] < n_q, other=0.0)
            do = tl.load(DO + q_ptrs, mask=offs_m[:, None] < n_q, other=0.0)
            thr = tl.load(THR + row + offs_m, mask=offs_m < n_q, other=0)
            lse = tl.load(LSE + row + offs_m, mask=offs_m < n_q, other=float("inf"))
            delta = tl.load(DELTA + row + offs_m, mask=offs_m < n_q, other=0.0)
            s, keep = _kept(q, K, k_base, offs_m, offs_n, offs_d, n_q, n_k, offset, skn, skd, scale, cap, PAD,
                            b * n_k, thr, HAS_PAD, CAUSAL, PREC, SOFTCAP)
            p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC, out_dtype=tl.float32)
            dp = tl.dot(do, vt, input_precision=PREC, out_dtype=tl.float32)
            ds = _cap_slope(p * (dp - delta[:, None]), s, cap, SOFTCAP)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC, out_dtype=tl.float32)
    out_k = b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
    out_v = b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd
    tl.store(DK + out_k, (dk * scale).to(DK.dtype.element_ty), mask=offs_n[:, None] < n_k)
    tl.store(DV + out_v, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < n_k)


def _blocks(q: torch.Tensor, kk: int) -> tuple[int, int]:
    interpret = q.device.type != "cuda"
    block_n = max(16 if interpret else 64, triton.next_power_of_2(kk))
    block_m = 16 if interpret else 64
    return block_m, block_n


def _on_device_of(t: torch.Tensor):
    """Launch context for ``t``'s GPU: Triton launches on the *current* CUDA device, and a model whose
    layers sit on several GPUs (HookedTransformer's ``n_devices``) calls this with tensors on any of
    them. On the CPU (``TRITON_INTERPRET=1``) nothing to switch."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


class TritonTopKAttention(torch.autograd.Function):
    """Top-k attention with the threshold pass and FlashAttention-style forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, k_rows, kk, causal, key_padding_mask, scale, softcap=None):
        b, n_q, h, d = q.shape
        n_k, h_kv = k.shape[1], k.shape[2]
        g = h // h_kv
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        block_m, block_n = _blocks(q, kk)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        has_pad = key_padding_mask is not None
        pad = (key_padding_mask.to(torch.int32).contiguous() if has_pad
               else torch.zeros(1, dtype=torch.int32, device=q.device))
        krows = k_rows.to(torch.int32).contiguous()
        thr = torch.empty(b, h, n_q, dtype=torch.int64, device=q.device)
        lse = torch.empty(b, h, n_q, dtype=torch.float32, device=q.device)
        out = torch.empty_like(q)
        offset = n_k - n_q
        grid = (triton.cdiv(n_q, block_m), b * h)
        cap = float(softcap) if softcap is not None else 1.0
        common = dict(HAS_PAD=has_pad, CAUSAL=bool(causal), BLOCK_M=block_m, BLOCK_N=block_n, D=d, PREC=prec,
                      SOFTCAP=softcap is not None)
        with _on_device_of(q):
            _threshold_kernel[grid](q, k, pad, krows, thr, *q.stride(), *k.stride(), n_q, n_k, offset, h, g,
                                    scale, cap, **common)
            _fwd_kernel[grid](q, k, v, pad, thr, out, lse, *q.stride(), *k.stride(), *v.stride(),
                              n_q, n_k, offset, h, g, scale, cap, **common)
        ctx.save_for_backward(q, k, v, pad, thr, lse, out)
        ctx.meta = (causal, has_pad, scale, cap, softcap is not None, block_m, block_n, prec)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, pad, thr, lse, out = ctx.saved_tensors
        causal, has_pad, scale, cap, has_cap, block_m, block_n, prec = ctx.meta
        b, n_q, h, d = q.shape
        n_k, h_kv = k.shape[1], k.shape[2]
        g = h // h_kv
        do = grad_out.contiguous()
        delta = (do.float() * out.float()).sum(-1).permute(0, 2, 1).contiguous()  # [b, h, n_q]
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        offset = n_k - n_q
        common = dict(HAS_PAD=has_pad, CAUSAL=bool(causal), BLOCK_M=block_m, BLOCK_N=block_n, D=d, PREC=prec,
                      SOFTCAP=has_cap)
        strides = (*q.stride(), *k.stride(), *v.stride())
        with _on_device_of(q):
            _bwd_dq_kernel[(triton.cdiv(n_q, block_m), b * h)](
                q, k, v, pad, thr, lse, delta, do, dq, *strides, n_q, n_k, offset, h, g, scale, cap, **common)
            _bwd_dkdv_kernel[(triton.cdiv(n_k, block_n), b * h_kv)](
                q, k, v, pad, thr, lse, delta, do, dk, dv, *strides, n_q, n_k, offset, h, g, h_kv, scale, cap,
                **common)
        return dq, dk, dv, None, None, None, None, None, None
