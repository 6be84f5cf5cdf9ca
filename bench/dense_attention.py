"""The dense flash-attention forward the static cost model (``python -m bench.cost``) measures the
window kernels against: the cheapest loop a dense kernel of the same tile shape needs.

One program per (query tile, head, image); its loop walks every key tile with the online softmax
in base 2 (the scale folded into one multiply), the two products on tensor cores, no mask: the
sequence length must be a multiple of ``BN`` (the model's reference is the steady state of a
dense kernel; a real one masks its last tile separately). Written for this project; it follows
the published flash-attention algorithm (Dao et al. 2022), not any code.

    attention(q, k, v, scale, block_m=64, block_n=64, num_warps=4, num_stages=3)  # (B, h, N, d)

It runs under Triton's interpreter too (``tests/test_cost.py`` checks it against SDPA).
"""
from __future__ import annotations

import triton.language as tl

from vitpatch.kernels._launch import kernel

_LOG2E = 1.4426950408889634


@kernel
def _dense_fwd_kernel(Q, K, V, O, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, N, qk_scale,
                      HEAD_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM)
    cols = tl.arange(0, BN)
    dd = tl.arange(0, HEAD_D)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dd[None, :])
    kb = K + b * skb + h * skh + cols[:, None] * skn + dd[None, :]
    vb = V + b * svb + h * svh + cols[:, None] * svn + dd[None, :]
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, HEAD_D], tl.float32)
    for start in range(0, N, BN):  # cost: dense
        k = tl.load(kb + start * skn)
        v = tl.load(vb + start * svn)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * son + dd[None, :], out.to(O.dtype.element_ty))


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
        HEAD_D=d, BM=block_m, BN=block_n, num_warps=num_warps, num_stages=num_stages)
    return out

