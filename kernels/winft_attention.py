"""Triton kernels of WinfT gated attention (paper 000 §5 eq. 8–11; docs/math.md §6).

Math (per image ``b``, heads ``h``, queries ``i``, keys ``j``)::

    g_ij  = (1/h) sum_heads q_i . k_j                      eq. 8, raw dot products, no 1/sqrt(d)
    t_i   = (1/N) sum_j sigmoid(g_ij)                      threshold over all N keys
    W_ij  = [sigmoid(g_ij) > t_i]                          hard, held constant (no gradient)
    s_ij  = scale q_i . k_j * W_ij                         eq. 9, mode="multiply" (logit 0 when gated off)
    s_ij  = scale q_i . k_j if W_ij or i == j else -inf    mode="mask" (gated-off keys removed)
    out_i = sum_j softmax_j(s_ij) v_j
    T_ij  = the "allowed" rule of docs/math.md §1 built from (windows, key_keep)          eq. 10
    L     = mean_{b,i,j} softplus(g_ij) - T_ij g_ij  (= BCE(sigmoid(g), T))       eq. 11
    gate_sum_b = sum_ij W_ij (diagonal included in mask mode)                    Table 3's EO

Kernels (nothing ``N x N`` in floating point is ever stored; the target is never dense):

1. ``_threshold_kernel`` (pass 1), one program per (query block, image): streams key tiles,
   computes the gate tile ``g`` as one GEMM over the full width ``C = h d`` (a loop over the
   heads), and accumulates ``sum_j sigmoid(g)`` and, with a target, the BCE row sums, the target
   tile being derived in registers from the ``O(n)`` windows and ``key_keep``.
2. ``_gate_bits_kernel`` (pass 2a), same grid: recomputes ``g`` tile by tile, thresholds it and
   packs ``W`` (with the diagonal in mask mode) into 32-bit words, ``(B, N, ceil(N/32))``, and
   counts it (``gate_sum``). ``W`` is shared by all heads, so this is one bit per pair and
   image: ``32 h`` times smaller than one float32 attention matrix of the layer.
3. ``_attn_fwd_kernel`` (pass 2b), one program per (query block, image x head): flash-style
   online softmax with the ``W`` tile read from the bits; saves the log-sum-exp.
4. Backward: ``_delta_kernel`` (``rowsum(dO * O)``), ``_attn_dkdv_kernel`` (one program per key
   block, loops over query tiles) and ``_attn_dq_kernel`` (per query block, loops over key
   tiles), with ``W`` read from the same bits (held constant). With a target, ``_bce_grad_kernel``
   runs twice (per query block for ``dq``, per key block on ``g^T`` tiles for ``dk``), recomputes
   ``g`` tile by tile and adds
   ``dL/dq_h = c (sigmoid(g) - T) k_h / h`` and ``dL/dk_h = c (sigmoid(g) - T)^T q_h / h``
   (``c = dL_out / (B N^2)``) into one float32 buffer that the attention kernels fold in (used
   for ``dq``, then reused for ``dk``).

Why ``W`` is recomputed once into bits instead of inside every head's program: ``g`` needs all
``h`` heads, so a per-head attention program that recomputed it would do ``h`` extra head-dots
per tile, ``h^2`` over the heads (12x the QK^T work of ViT-B). Computing ``g`` once per tile
for all heads in one program (pass 2a, a plain GEMM with K = C) costs as much as pass 1; the
attention then runs as ordinary per-head flash attention with large tiles, and the backward
reuses the bits instead of recomputing ``g`` per head. Counted in head-dot products of one
(query tile, key tile) pair: forward ``h`` (pass 1) + ``h`` (pass 2a) + ``2h`` (attention)
= ``4h``, twice dense flash attention's ``2h``; backward ``7h`` (``s, dv, dp, dk`` in the
key-block kernel, ``s, dp, dq`` in the query-block kernel, as in Triton's fused-attention
tutorial) plus ``4h`` with a target (``g`` twice, ``dq``, ``dk``). A single all-heads attention program that reuses its
per-head logits for ``g`` would save the ``h`` of pass 2a but needs ``(h, BM, d)`` accumulators
in registers (and ``h`` padded to a power of two), which forces small query tiles; without a
GPU to measure on, the bits design was chosen as the one whose every kernel is a standard
GEMM or flash-attention tile loop.

Tile sizes come from the launch policy (:mod:`vitpatch.kernels._launch`, units ``winft_gate``,
``winft_fwd``, ``winft_dq``, ``winft_dkdv``): one configuration per dtype and head width,
untuned; small pinned tiles under the interpreter. The gate logits ``g`` (passes 1 and 2a and
the BCE gradient's recomputation) always use ``dot_precision(dtype, exact=True)`` (three-pass
TF32 for float32 inputs, about float32 accuracy), because ``W`` is decided by comparing
``sigmoid(g)`` with its row mean; the attention dots follow the float32 policy
(``torch.get_float32_matmul_precision()``).

The op is registered with ``torch.library`` (``vitpatch::winft_fwd``, ``vitpatch::winft_bwd``,
fake implementations and ``register_autograd``), so ``torch.compile`` treats it as one opaque
node without graph breaks.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import dot_precision, helper, interpreting, kernel

__all__ = ["winft_attention", "winft_attention_unsupported"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 128


# =============================================================================== jit helpers
@helper
def _gate_tile(a_ptr, sa_h, sa_n, sa_d, offs_a, b_ptr, sb_h, sb_n, sb_d, offs_b, offs_d, N, H, D, inv_h,
               BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PREC: tl.constexpr):
    """``(1/H) sum_heads a_h[offs_a] . b_h[offs_b]``: a gate tile of eq. 8 (``g`` or ``g^T``), float32.

    One GEMM with reduction width ``C = H * D``, done as a loop over the heads.
    """
    a_mask = (offs_a[:, None] < N) & (offs_d[None, :] < D)
    b_mask = (offs_b[:, None] < N) & (offs_d[None, :] < D)
    a_off = offs_a[:, None] * sa_n + offs_d[None, :] * sa_d
    b_off = offs_b[:, None] * sb_n + offs_d[None, :] * sb_d
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for hh in range(H):
        a = tl.load(a_ptr + hh * sa_h + a_off, mask=a_mask, other=0.0)
        b = tl.load(b_ptr + hh * sb_h + b_off, mask=b_mask, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc * inv_h


@helper
def _target_tile(win_ptr, sw_n, sw_c, keep_ptr, qi, kj, N, P, GW, HAS_KEEP: tl.constexpr):
    """``T[qi, kj]`` (eq. 10 = the allowed rule of docs/math.md §1) for broadcastable index tensors.

    ``win_ptr`` points at this image's windows ``(n, 4)`` (x_left, y_top, x_right, y_bottom);
    ``keep_ptr`` at its ``key_keep`` row (uint8). ``T = keep[j] and (i < P or j < P or patch
    j - P inside window i - P)``. Pass ``qi`` as a column and ``kj`` as a row for a ``T`` tile,
    the other way round for a ``T^T`` tile.
    """
    ok_i = qi < N
    wp = win_ptr + tl.maximum(qi - P, 0) * sw_n
    xl = tl.load(wp, mask=ok_i, other=0)
    yt = tl.load(wp + sw_c, mask=ok_i, other=0)
    xr = tl.load(wp + 2 * sw_c, mask=ok_i, other=0)
    yb = tl.load(wp + 3 * sw_c, mask=ok_i, other=0)
    pj = tl.maximum(kj - P, 0)
    kx = pj % GW
    ky = pj // GW
    t = (kx >= xl) & (kx <= xr) & (ky >= yt) & (ky <= yb)
    t = t | (qi < P) | (kj < P)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + kj, mask=kj < N, other=0)
        t = t & (keep != 0)
    return t


@helper
def _bits_tile(bits_ptr, NW, qi, kj, valid):
    """``W[qi, kj]`` read from the packed gate (bit ``j % 32`` of word ``(i, j // 32)``), as bool."""
    words = tl.load(bits_ptr + qi * NW + kj // 32, mask=valid, other=0)
    return ((words >> (kj % 32)) & 1) != 0


@helper
def _sigmoid(x):
    """``1 / (1 + exp(-x))`` from ``exp(-|x|)``, so no intermediate overflows for large ``|x|``."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, e) / (1.0 + e)


@helper
def _softplus(x):
    """``log(1 + exp(x))`` without overflow: ``max(x, 0) + log(1 + exp(-|x|))``."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


# =============================================================================== forward
@kernel
def _threshold_kernel(Q, K, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd,
                      WIN, s_wb, s_wn, s_wc, KEEP, s_keep,
                      THR, BCE_ROWS, N, H, D, P, GW, inv_h, inv_n,
                      HAS_TARGET: tl.constexpr, HAS_KEEP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Pass 1: ``t_i = mean_j sigmoid(g_ij)`` and the BCE row sums ``sum_j softplus(g_ij) - T_ij g_ij``."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    q_base = Q + b * s_qb
    k_base = K + b * s_kb
    w_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    bce = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):  # cost: gate_threshold
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid = row_ok[:, None] & (offs_n[None, :] < N)
        g = _gate_tile(q_base, s_qh, s_qn, s_qd, offs_m, k_base, s_kh, s_kn, s_kd, offs_n, offs_d,
                       N, H, D, inv_h, BLOCK_M, BLOCK_N, PREC)
        w_sum += tl.sum(tl.where(valid, _sigmoid(g), 0.0), axis=1)
        if HAS_TARGET:
            tgt = _target_tile(WIN + b * s_wb, s_wn, s_wc, KEEP + b * s_keep, offs_m[:, None], offs_n[None, :],
                               N, P, GW, HAS_KEEP)
            bce += tl.sum(tl.where(valid, _softplus(g) - tl.where(tgt, g, 0.0), 0.0), axis=1)
    tl.store(THR + b * N + offs_m, w_sum * inv_n, mask=row_ok)
    if HAS_TARGET:
        tl.store(BCE_ROWS + b * N + offs_m, bce, mask=row_ok)


@kernel
def _gate_bits_kernel(Q, K, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd,
                      THR, BITS, COUNT, N, NW, H, D, inv_h,
                      MASK_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Pass 2a: ``W = [sigmoid(g) > t]`` (plus the diagonal in mask mode) packed 32 keys a word; row counts."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    q_base = Q + b * s_qb
    k_base = K + b * s_kb
    thr = tl.load(THR + b * N + offs_m, mask=row_ok, other=2.0)  # > 1: nothing passes on padding rows
    shift = tl.arange(0, BLOCK_N) % 32
    word = tl.arange(0, BLOCK_N // 32)
    bits_base = BITS + b * N * NW
    count = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for start_n in range(0, N, BLOCK_N):  # cost: gate_bits
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid = row_ok[:, None] & (offs_n[None, :] < N)
        g = _gate_tile(q_base, s_qh, s_qn, s_qd, offs_m, k_base, s_kh, s_kn, s_kd, offs_n, offs_d,
                       N, H, D, inv_h, BLOCK_M, BLOCK_N, PREC)
        w = (_sigmoid(g) > thr[:, None]) & valid
        if MASK_MODE:
            w = w | ((offs_m[:, None] == offs_n[None, :]) & valid)
        wi = w.to(tl.int32)
        count += tl.sum(wi, axis=1)
        # distinct powers of two: the sum is the bitwise or (bit 31 wraps to the sign bit)
        packed = tl.sum(tl.reshape(wi << shift[None, :], (BLOCK_M, BLOCK_N // 32, 32)), axis=2)
        wcol = start_n // 32 + word
        tl.store(bits_base + offs_m[:, None] * NW + wcol[None, :], packed,
                 mask=row_ok[:, None] & (wcol[None, :] < NW))
    tl.store(COUNT + b * N + offs_m, count, mask=row_ok)


@kernel
def _attn_fwd_kernel(Q, K, V, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                     BITS, OUT, LSE, N, NW, H, D, scale,
                     MASK_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Pass 2b: ``out = softmax(s) v`` with ``s`` gated by ``W`` (eq. 9), online softmax; saves the LSE.

    ``OUT`` is contiguous ``(B, H, N, D)``, ``LSE`` float32 ``(B, H, N)``.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hh = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    d_ok = offs_d < D
    q = tl.load(Q + b * s_qb + hh * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * s_kb + hh * s_kh
    v_base = V + b * s_vb + hh * s_vh
    bits_base = BITS + b * N * NW
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):  # cost: main
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        valid = row_ok[:, None] & col_ok[None, :]
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        w = _bits_tile(bits_base, NW, offs_m[:, None], offs_n[None, :], valid)
        if MASK_MODE:
            s = tl.where(w, s, float("-inf"))
        else:
            s = tl.where(col_ok[None, :], tl.where(w, s, 0.0), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptr = OUT + pid_bh * N * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * N + offs_m, m_i + tl.log(l_safe), mask=row_ok)


# =============================================================================== backward
@kernel
def _delta_kernel(OUT, DO, s_db, s_dh, s_dn, s_dd, DELTA, N, H, D,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``delta_i = sum_d dO_i * O_i`` (float32), the softmax backward's row term."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hh = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < D)
    o = tl.load(OUT + pid_bh * N * D + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * s_db + hh * s_dh + offs_m[:, None] * s_dn + offs_d[None, :] * s_dd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh * N + offs_m, delta, mask=offs_m < N)


@kernel
def _attn_dkdv_kernel(Q, K, V, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                      DO, s_db, s_dh, s_dn, s_dd, LSE, DELTA, BITS, DK_EXTRA, DK, DV, N, NW, H, D, scale,
                      MASK_MODE: tl.constexpr, HAS_EXTRA: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """``dK, dV`` of one key block with ``W`` held constant (transposed tiles, ``s^T = k q^T``).

    ``dV = P^T dO``; ``dS = P * (dP - delta)`` (times ``W`` in multiply mode, since
    ``s = scale q.k W``); ``dK = scale dS^T Q`` (+ ``DK_EXTRA``, the BCE part, when given).
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hh = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < N
    d_ok = offs_d < D
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * s_kb + hh * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * s_vb + hh * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
    q_base = Q + b * s_qb + hh * s_qh
    do_base = DO + b * s_db + hh * s_dh
    bits_base = BITS + b * N * NW
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):  # cost: main
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * s_dn + offs_d[None, :] * s_dd, mask=q_mask, other=0.0)
        lse = tl.load(LSE + pid_bh * N + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + pid_bh * N + offs_m, mask=row_ok, other=0.0)
        valid = col_ok[:, None] & row_ok[None, :]
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * scale
        w_t = _bits_tile(bits_base, NW, offs_m[None, :], offs_n[:, None], valid)
        if MASK_MODE:
            s_t = tl.where(w_t, s_t, float("-inf"))
        else:
            s_t = tl.where(valid, tl.where(w_t, s_t, 0.0), float("-inf"))
        p_t = tl.exp(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        if not MASK_MODE:
            ds_t = tl.where(w_t, ds_t, 0.0)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    dk = dk * scale
    out_off = pid_bh * N * D + offs_n[:, None] * D + offs_d[None, :]
    if HAS_EXTRA:
        dk += tl.load(DK_EXTRA + out_off, mask=kv_mask, other=0.0)
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@kernel
def _attn_dq_kernel(Q, K, V, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                    DO, s_db, s_dh, s_dn, s_dd, LSE, DELTA, BITS, DQ_EXTRA, DQ, N, NW, H, D, scale,
                    MASK_MODE: tl.constexpr, HAS_EXTRA: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """``dQ = scale dS K`` of one query block with ``W`` held constant (+ ``DQ_EXTRA``, the BCE part)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hh = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    d_ok = offs_d < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * s_qb + hh * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
    do = tl.load(DO + b * s_db + hh * s_dh + offs_m[:, None] * s_dn + offs_d[None, :] * s_dd, mask=q_mask, other=0.0)
    lse = tl.load(LSE + pid_bh * N + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh * N + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * s_kb + hh * s_kh
    v_base = V + b * s_vb + hh * s_vh
    bits_base = BITS + b * N * NW
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):  # cost: main
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
        valid = row_ok[:, None] & col_ok[None, :]
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        w = _bits_tile(bits_base, NW, offs_m[:, None], offs_n[None, :], valid)
        if MASK_MODE:
            s = tl.where(w, s, float("-inf"))
        else:
            s = tl.where(valid, tl.where(w, s, 0.0), float("-inf"))
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        if not MASK_MODE:
            ds = tl.where(w, ds, 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq = dq * scale
    out_off = pid_bh * N * D + offs_m[:, None] * D + offs_d[None, :]
    if HAS_EXTRA:
        dq += tl.load(DQ_EXTRA + out_off, mask=q_mask, other=0.0)
    tl.store(DQ + out_off, dq.to(DQ.dtype.element_ty), mask=q_mask)


@kernel
def _bce_grad_kernel(A, B_, s_ab, s_ah, s_an, s_ad, s_bb, s_bh, s_bn, s_bd,
                     WIN, s_wb, s_wn, s_wc, KEEP, s_keep, DLOSS, GRAD,
                     N, H, D, P, GW, inv_h, inv_count,
                     A_IS_QUERY: tl.constexpr, HAS_KEEP: tl.constexpr,
                     BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                     GATE_PREC: tl.constexpr):
    """BCE gradient through ``g`` for the rows ``offs_a`` of ``A`` (eq. 11 differentiated).

    With ``A = q``, ``B_ = k`` (``A_IS_QUERY``): ``dq_h[i] += c sum_j (sigmoid(g_ij) - T_ij) k_h[j] / H``;
    with ``A = k``, ``B_ = q``: ``dk_h[j] += c sum_i (sigmoid(g_ij) - T_ij) q_h[i] / H``, on ``g^T``
    tiles. ``c = dL_out / (B N^2)``. ``GRAD`` is a float32 ``(B, H, N, D)`` buffer (its old content
    is ignored: the first key tile initialises it); this program owns its rows, so the per-tile
    read-modify-write needs no atomics.
    """
    pid_a = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, BLOCK_D)
    a_ok = offs_a < N
    d_ok = offs_d < D
    a_base = A + b * s_ab
    b_base = B_ + b * s_bb
    c = tl.load(DLOSS).to(tl.float32) * inv_count * inv_h
    grad_base = GRAD + b * H * N * D
    out_off = offs_a[:, None] * D + offs_d[None, :]
    out_mask = a_ok[:, None] & d_ok[None, :]
    for start_b in range(0, N, BLOCK_B):  # cost: main
        offs_b = start_b + tl.arange(0, BLOCK_B)
        b_ok = offs_b < N
        valid = a_ok[:, None] & b_ok[None, :]
        g = _gate_tile(a_base, s_ah, s_an, s_ad, offs_a, b_base, s_bh, s_bn, s_bd, offs_b, offs_d,
                       N, H, D, inv_h, BLOCK_A, BLOCK_B, GATE_PREC)
        if A_IS_QUERY:
            tgt = _target_tile(WIN + b * s_wb, s_wn, s_wc, KEEP + b * s_keep, offs_a[:, None], offs_b[None, :],
                               N, P, GW, HAS_KEEP)
        else:
            tgt = _target_tile(WIN + b * s_wb, s_wn, s_wc, KEEP + b * s_keep, offs_b[None, :], offs_a[:, None],
                               N, P, GW, HAS_KEEP)
        dg = tl.where(valid, _sigmoid(g) - tgt.to(tl.float32), 0.0)  # in [-1, 1]: safe in half precision
        b_mask = b_ok[:, None] & d_ok[None, :]
        b_off = offs_b[:, None] * s_bn + offs_d[None, :] * s_bd
        for hh in range(H):  # cost: heads
            bh = tl.load(b_base + hh * s_bh + b_off, mask=b_mask, other=0.0)
            part = tl.dot(dg.to(bh.dtype), bh, input_precision=PREC)
            ptr = grad_base + hh * N * D + out_off
            prev = tl.load(ptr, mask=out_mask & (start_b > 0), other=0.0)  # the first tile initialises
            tl.store(ptr, prev + part * c, mask=out_mask)
            tl.debug_barrier()  # the next key tile's load of these rows may run on other threads of the CTA


# =============================================================================== launchers
def _head_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _config(unit: str, dtype: torch.dtype, d: int) -> _launch.LaunchConfig:
    """The one configuration of ``unit`` the policy ships for ``dtype`` and head width ``d`` (untuned)."""
    return _launch.configs(unit, dtype, d)[0]


def _meta(cfg: _launch.LaunchConfig, **names) -> dict:
    """Launch keywords: the config's tiles under the kernel's own parameter names, warps and stages."""
    out = {names.get(k, k): v for k, v in cfg.params}
    if not interpreting():
        out.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _s4(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _target_args(windows: Optional[torch.Tensor], key_keep: Optional[torch.Tensor], fallback: torch.Tensor):
    """Pointers and strides of the O(n) target description (dummies when absent)."""
    if windows is None:
        return (fallback, 0, 0, 0, fallback, 0), False, False
    s_wb = windows.stride(0) if windows.dim() == 3 else 0
    win = (windows, s_wb, windows.stride(-2), windows.stride(-1))
    if key_keep is None:
        return win + (fallback, 0), True, False
    keep = key_keep.contiguous()
    keep = keep.view(torch.uint8) if keep.dtype == torch.bool else keep
    s_keep = keep.stride(0) if keep.shape[0] > 1 else 0
    return win + (keep, s_keep), True, True


def _forward(q, k, v, windows, key_keep, scale: float, mode: str, num_prefix: int, grid_w: int):
    B, H, N, D = q.shape
    dev = q.device
    BD = _head_block(D)
    prec, gate_prec = dot_precision(q.dtype), dot_precision(q.dtype, exact=True)
    NW = triton.cdiv(N, 32)
    mask_mode = mode == "mask"
    thr = torch.empty(B, N, dtype=torch.float32, device=dev)
    bce_rows = torch.empty(B, N, dtype=torch.float32, device=dev)
    bits = torch.empty(B, N, NW, dtype=torch.int32, device=dev)
    counts = torch.empty(B, N, dtype=torch.int32, device=dev)
    out = torch.empty(B, H, N, D, dtype=q.dtype, device=dev)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=dev)
    tgt, has_target, has_keep = _target_args(windows, key_keep, thr)
    gate = _config("winft_gate", q.dtype, D)
    gm = gate["BLOCK_M"]
    _threshold_kernel[(triton.cdiv(N, gm), B)](
        q, k, *_s4(q), *_s4(k), *tgt, thr, bce_rows, N, H, D, num_prefix, max(grid_w, 1), 1.0 / H, 1.0 / N,
        HAS_TARGET=has_target, HAS_KEEP=has_keep, BLOCK_D=BD, PREC=gate_prec, **_meta(gate))
    _gate_bits_kernel[(triton.cdiv(N, gm), B)](
        q, k, *_s4(q), *_s4(k), thr, bits, counts, N, NW, H, D, 1.0 / H,
        MASK_MODE=mask_mode, BLOCK_D=BD, PREC=gate_prec, **_meta(gate))
    fwd = _config("winft_fwd", q.dtype, D)
    _attn_fwd_kernel[(triton.cdiv(N, fwd["BLOCK_M"]), B * H)](
        q, k, v, *_s4(q), *_s4(k), *_s4(v), bits, out, lse, N, NW, H, D, scale,
        MASK_MODE=mask_mode, BLOCK_D=BD, PREC=prec, **_meta(fwd))
    if has_target:
        loss = (bce_rows.sum() / (B * N * N)).to(q.dtype)
    else:
        loss = torch.zeros((), dtype=q.dtype, device=dev)
    gate_sum = counts.sum(1).to(torch.float32)
    return out, loss, gate_sum, lse, bits


def _backward(dout, dloss, q, k, v, out, lse, bits, windows, key_keep, scale: float, mode: str,
              num_prefix: int, grid_w: int):
    B, H, N, D = q.shape
    dev = q.device
    BD = _head_block(D)
    prec, gate_prec = dot_precision(q.dtype), dot_precision(q.dtype, exact=True)
    NW = bits.shape[-1]
    mask_mode = mode == "mask"
    with_bce = windows is not None and dloss is not None
    # one float32 buffer holds the BCE part of dq, then (after dq is final) that of dk
    extra = torch.empty(B, H, N, D, dtype=torch.float32, device=dev) if with_bce else None
    gate = _config("winft_gate", q.dtype, D)

    def bce_grad(rows, cols, is_query):
        tgt, _, has_keep = _target_args(windows, key_keep, lse)
        _bce_grad_kernel[(triton.cdiv(N, gate["BLOCK_M"]), B)](
            rows, cols, *_s4(rows), *_s4(cols), *tgt, dloss.reshape(1), extra, N, H, D, num_prefix,
            max(grid_w, 1), 1.0 / H, 1.0 / (B * N * N), A_IS_QUERY=is_query, HAS_KEEP=has_keep,
            BLOCK_D=BD, PREC=prec, GATE_PREC=gate_prec, **_meta(gate, BLOCK_M="BLOCK_A", BLOCK_N="BLOCK_B"))

    if dout is None:  # only the loss is used: the attention contributes nothing
        zeros = torch.zeros(B, H, N, D, dtype=q.dtype, device=dev)
        if not with_bce:
            return zeros, zeros.clone(), zeros.clone()
        bce_grad(q, k, True)
        dq = extra.to(q.dtype, copy=True)  # extra is reused for dk
        bce_grad(k, q, False)
        return dq, extra.to(k.dtype), zeros
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=dev)
    dk = torch.empty(B, H, N, D, dtype=k.dtype, device=dev)
    dv = torch.empty(B, H, N, D, dtype=v.dtype, device=dev)
    delta = torch.empty(B, H, N, dtype=torch.float32, device=dev)
    rows = _config("winft_fwd", q.dtype, D)["BLOCK_M"]
    _delta_kernel[(triton.cdiv(N, rows), B * H)](out, dout, *_s4(dout), delta, N, H, D, BLOCK_M=rows, BLOCK_D=BD)
    if with_bce:
        bce_grad(q, k, True)
    dq_cfg = _config("winft_dq", q.dtype, D)
    _attn_dq_kernel[(triton.cdiv(N, dq_cfg["BLOCK_M"]), B * H)](
        q, k, v, *_s4(q), *_s4(k), *_s4(v), dout, *_s4(dout), lse, delta, bits,
        extra if with_bce else delta, dq, N, NW, H, D, scale,
        MASK_MODE=mask_mode, HAS_EXTRA=with_bce, BLOCK_D=BD, PREC=prec, **_meta(dq_cfg))
    if with_bce:
        bce_grad(k, q, False)
    kv_cfg = _config("winft_dkdv", q.dtype, D)
    _attn_dkdv_kernel[(triton.cdiv(N, kv_cfg["BLOCK_N"]), B * H)](
        q, k, v, *_s4(q), *_s4(k), *_s4(v), dout, *_s4(dout), lse, delta, bits,
        extra if with_bce else delta, dk, dv, N, NW, H, D, scale,
        MASK_MODE=mask_mode, HAS_EXTRA=with_bce, BLOCK_D=BD, PREC=prec, **_meta(kv_cfg))
    return dq, dk, dv


# =============================================================================== torch.library op
@torch.library.custom_op("vitpatch::winft_fwd", mutates_args=())
def winft_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: Optional[torch.Tensor],
              key_keep: Optional[torch.Tensor], scale: float, mode: str, num_prefix_tokens: int,
              grid_w: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """WinfT forward (docs/math.md §6): ``(out, loss, gate_sum, lse, bits)``; the last two are saved for backward."""
    return _forward(q, k, v, windows, key_keep, scale, mode, num_prefix_tokens, grid_w)


@winft_fwd.register_fake
def _winft_fwd_fake(q, k, v, windows, key_keep, scale, mode, num_prefix_tokens, grid_w):
    B, H, N, D = q.shape
    return (q.new_empty(B, H, N, D), q.new_empty(()), q.new_empty(B, dtype=torch.float32),
            q.new_empty(B, H, N, dtype=torch.float32), q.new_empty(B, N, (N + 31) // 32, dtype=torch.int32))


@torch.library.custom_op("vitpatch::winft_bwd", mutates_args=())
def winft_bwd(dout: Optional[torch.Tensor], dloss: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, bits: torch.Tensor,
              windows: Optional[torch.Tensor], key_keep: Optional[torch.Tensor], scale: float, mode: str,
              num_prefix_tokens: int, grid_w: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """WinfT backward: ``(dq, dk, dv)`` of the attention with ``W`` held constant plus the BCE through ``g``."""
    return _backward(dout, dloss, q, k, v, out, lse, bits, windows, key_keep, scale, mode,
                     num_prefix_tokens, grid_w)


@winft_bwd.register_fake
def _winft_bwd_fake(dout, dloss, q, k, v, out, lse, bits, windows, key_keep, scale, mode, num_prefix_tokens,
                    grid_w):
    B, H, N, D = q.shape
    return q.new_empty(B, H, N, D), k.new_empty(B, H, N, D), v.new_empty(B, H, N, D)


def _setup_context(ctx, inputs, output):
    q, k, v, windows, key_keep, scale, mode, num_prefix_tokens, grid_w = inputs
    out, _loss, gate_sum, lse, bits = output
    ctx.save_for_backward(q, k, v, out, lse, bits, windows, key_keep)
    ctx.scale, ctx.mode, ctx.num_prefix_tokens, ctx.grid_w = scale, mode, num_prefix_tokens, grid_w
    ctx.mark_non_differentiable(gate_sum, lse, bits)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: its kernels are skipped


def _winft_fwd_backward(ctx, dout, dloss, _dgate_sum, _dlse, _dbits):
    q, k, v, out, lse, bits, windows, key_keep = ctx.saved_tensors
    dq, dk, dv = winft_bwd(dout, dloss, q, k, v, out, lse, bits, windows, key_keep, ctx.scale, ctx.mode,
                           ctx.num_prefix_tokens, ctx.grid_w)
    return dq, dk, dv, None, None, None, None, None, None


winft_fwd.register_autograd(_winft_fwd_backward, setup_context=_setup_context)


# =============================================================================== entry points
def winft_attention_unsupported(q, k, v, scale, mode, windows, key_keep, num_prefix_tokens, grid_w) -> Optional[str]:
    """Why the kernel cannot run these (validated) inputs, or ``None`` when it can."""
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16 and float32)"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"head width {q.shape[-1]} > {_MAX_HEAD_DIM}"
    if q.numel() == 0:
        return f"empty input of shape {tuple(q.shape)}"
    return _launch.supports(("winft_gate", "winft_fwd", "winft_dq", "winft_dkdv"), q.dtype, q.shape[-1])


def winft_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mode: str,
                    windows: Optional[torch.Tensor] = None, key_keep: Optional[torch.Tensor] = None,
                    num_prefix_tokens: int = 0, grid_w: int = 1):
    """WinfT gated attention (docs/math.md §6, paper 000 eq. 8–11) with the Triton kernels: ``(out, loss, gate_sum)``.

    ``g = Q K^T / h`` over the full width (eq. 8), ``W = [sigmoid(g) > mean_j sigmoid(g)]`` held
    constant; ``mode="multiply"``: ``softmax(scale q.k * W)`` (eq. 9); ``mode="mask"``: keys with
    ``W = 0`` removed, the diagonal kept. ``loss = mean_{b,i,j} softplus(g) - T g`` (eq. 11)
    against the window target (eq. 10) that ``windows`` (int ``(n, 4)`` or ``(B, n, 4)``),
    ``key_keep``, ``num_prefix_tokens`` and the grid width ``grid_w`` describe, a zero tensor
    when ``windows`` is ``None``; ``gate_sum (B,)`` float32 = ``sum_ij W_ij``. ``out`` and
    ``loss`` are differentiable with respect to ``q, k, v`` (the loss through ``g`` into ``q``
    and ``k``).
    """
    out, loss, gate_sum, _lse, _bits = winft_fwd(q, k, v, windows, key_keep, float(scale), mode,
                                                 num_prefix_tokens, grid_w)
    return out, loss, gate_sum
