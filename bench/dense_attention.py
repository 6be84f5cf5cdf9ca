"""The dense flash-attention forward the static cost model (``python -m bench.cost``) measures the
window kernels against: the cheapest loop a dense kernel of the same tile shape needs.

One program per (query tile, head, image); its loop walks every key tile with the online softmax
in base 2 (the scale folded into one multiply), the two products on tensor cores, no mask: the
sequence length must be a multiple of ``BLOCK_N`` (the model's reference is the steady state of a
dense kernel; a real one masks its last tile separately). Written for this project; it follows
the published flash-attention algorithm (Dao et al. 2022), not any code.

    attention(q, k, v, scale, block_m=64, block_n=64, num_warps=4, num_stages=3)  # (B, h, N, d)

It runs under Triton's interpreter too (``tests/test_cost.py`` checks it against SDPA).
"""
from __future__ import annotations

import triton.language as tl

from vitpatch.kernels._launch import helper, kernel

_LOG2E = 1.4426950408889634


@helper
def _tile(base, b, h, sb, sh, sn, rows, dd):
    """Pointers to rows ``rows`` (all ``d`` columns, unit stride) of head ``h`` of image ``b``."""
    return base + b * sb + h * sh + rows[:, None] * sn + dd[None, :]


@kernel
def _dense_fwd_kernel(Q, K, V, O, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb,
                      stride_vh, stride_vn, stride_ob, stride_oh, stride_on, N, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, HEAD_DIM)
    q = tl.load(_tile(Q, b, h, stride_qb, stride_qh, stride_qn, rows, dd))
    kb = _tile(K, b, h, stride_kb, stride_kh, stride_kn, cols, dd)
    vb = _tile(V, b, h, stride_vb, stride_vh, stride_vn, cols, dd)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, N, BLOCK_N):  # cost: dense
        k = tl.load(kb + start * stride_kn)
        v = tl.load(vb + start * stride_vn)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(_tile(O, b, h, stride_ob, stride_oh, stride_on, rows, dd), out.to(O.dtype.element_ty))


def attention(q, k, v, scale: float, block_m: int = 64, block_n: int = 64, num_warps: int = 4,
              num_stages: int = 3):
    """Dense softmax attention of ``(B, h, N, d)`` tensors (``N`` a multiple of both blocks, ``d``
    a power of two of at least 16, unit stride along ``d``)."""
    import torch
    B, H, N, d = q.shape
    if N % block_m or N % block_n:
        raise ValueError(f"N must be a multiple of block_m and block_n, got N = {N}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head width d must be a power of two >= 16, got {d}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k and v must have unit stride along the head width")
    out = torch.empty_like(q)
    _dense_fwd_kernel[(N // block_m, H, B)](
        q, k, v, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), N, scale * _LOG2E,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    return out



@kernel
def _dense_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, N, qk_scale,
                         sm_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``dq`` of one query tile: ``p`` from the saved base-2 ``lse``, ``ds = p (dout v^T - delta)``."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, HEAD_DIM)
    q_off = b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dd[None, :]
    q = tl.load(Q + q_off)
    do = tl.load(DO + q_off)
    lse = tl.load(LSE + (b * tl.num_programs(1) + h) * N + rows)
    delta = tl.load(DELTA + (b * tl.num_programs(1) + h) * N + rows)
    kb = _tile(K, b, h, stride_kb, stride_kh, stride_kn, cols, dd)
    vb = _tile(V, b, h, stride_vb, stride_vh, stride_vn, cols, dd)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, N, BLOCK_N):  # cost: dense
        k = tl.load(kb + start * stride_kn)
        v = tl.load(vb + start * stride_vn)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty))


@kernel
def _dense_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                           stride_kn, stride_vb, stride_vh, stride_vn, N,
                           qk_scale, sm_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``dk``, ``dv`` of one key tile over every query tile."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    keys = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    dd = tl.arange(0, HEAD_DIM)
    k = tl.load(_tile(K, b, h, stride_kb, stride_kh, stride_kn, keys, dd))
    v = tl.load(_tile(V, b, h, stride_vb, stride_vh, stride_vn, keys, dd))
    qb = _tile(Q, b, h, stride_qb, stride_qh, stride_qn, rows, dd)
    dob = _tile(DO, b, h, stride_qb, stride_qh, stride_qn, rows, dd)
    stats = (b * tl.num_programs(1) + h) * N + rows
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start in range(0, N, BLOCK_M):  # cost: dense
        q = tl.load(qb + start * stride_qn)
        do = tl.load(dob + start * stride_qn)
        lse = tl.load(LSE + stats + start)
        delta = tl.load(DELTA + stats + start)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    out = b * stride_kb + h * stride_kh + keys[:, None] * stride_kn + dd[None, :]  # one offset for both stores
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + out, dv.to(DV.dtype.element_ty))


def attention_backward(dout, q, k, v, scale: float, block_m: int = 64, block_n: int = 64, num_warps: int = 4,
                       num_stages: int = 2):
    """``(dq, dk, dv)`` of dense softmax attention (the same shape rules as :func:`attention`; the
    row statistics are recomputed here in PyTorch, the kernels do the per-tile work)."""
    import torch
    B, H, N, d = q.shape
    if N % block_m or N % block_n:
        raise ValueError(f"N must be a multiple of block_m and block_n, got N = {N}")
    if any(t.stride(-1) != 1 or t.shape != q.shape or t.stride() != q.stride() for t in (k, v, dout)):
        raise ValueError("q, k, v and dout must share one shape and one unit-stride layout")
    logits = (q.float() @ k.float().transpose(-2, -1)) * (scale * _LOG2E)
    lse = torch.logsumexp(logits * (1 / _LOG2E), -1) * _LOG2E  # base 2
    out = torch.softmax(logits * (1 / _LOG2E), -1) @ v.float()
    delta = (out * dout.float()).sum(-1)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), N, scale * _LOG2E, scale)
    meta = dict(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    _dense_bwd_dq_kernel[(N // block_m, H, B)](q, k, v, dout, lse.contiguous(), delta.contiguous(), dq, *strides,
                                               **meta)
    _dense_bwd_dkdv_kernel[(N // block_n, H, B)](q, k, v, dout, lse.contiguous(), delta.contiguous(), dk, dv,
                                                 *strides, **meta)
    return dq, dk, dv
