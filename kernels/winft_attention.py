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

Kernels (nothing ``N x N`` per head is ever stored; the target is never dense):

1. ``_threshold_kernel`` (pass 1), one program per (query block, image, key split): streams
   key tiles, computes the gate tile ``g`` as one GEMM over the full width ``C = h d`` (a loop
   over the heads), and accumulates ``sum_j sigmoid(g)`` and, with a target, the BCE row sums,
   the target tile built in registers from each query's window (read once per program) and
   each key's grid position (worked out once per key tile). When the loss will be
   differentiated it also stores ``sigmoid(g) - T`` (eq. 11's gradient through ``g`` without
   its factor, in ``[-1, 1]``) once, in the inputs' dtype, ``(B, N, ceil(N/16)*16)``: one
   ``N x N`` per image, ``1/h`` of one attention matrix, kept for the backward.
2. ``_gate_bits_kernel`` (pass 2a), same grid: recomputes ``g`` tile by tile, tests it against
   ``logit(t_i)`` (one compare per element) and packs ``W`` (with the diagonal in mask mode)
   into 32-bit words, twice: per query row (``W``) and per key row (``W^T``), ``(2, B, N, NW)``
   with ``NW`` even, and counts it (``gate_sum``). ``W`` is shared by all heads: one bit per
   pair and image.
3. ``_attn_fwd_kernel`` (pass 2b), one program per (query block, image x head): flash-style
   online softmax in base 2 (the scale folded into one multiply-add), ``W`` read as each row's
   word(s) per key tile (one 8-byte read for a 64-key tile) and expanded in registers against
   loop-constant lane masks; the last, partial key tile is peeled off so full tiles carry no
   key mask. Saves the natural log-sum-exp.
4. Backward: ``_delta_kernel`` (``rowsum(dO * O)``), ``_attn_dq_kernel`` (per query block, loops
   over key tiles, ``W`` from the row words) and ``_attn_dkdv_kernel`` (per key block, loops over
   query tiles, ``W^T`` from the key-row words). With the loss, the tile of ``sigmoid(g) - T``
   kept by pass 1 is folded into their last products: ``dq = scale (dS + (c / scale)(sigmoid(g)
   - T)) K`` with ``c = dL_out / (B N^2 h)``, and the same transposed for ``dk``; no float32
   buffer, no read-modify-write, no recomputation of ``g``. That is the bfloat16 path up to head
   width 64; in float16 the factor ``c / scale`` underflows in an operand, and in float32 or
   above head width 64 the tile would make dk/dv spill, so there two batched products
   (``torch.matmul``, every head) add the loss's part after the kernels. When the
   forward did not keep the tile (``keep_grad=False``), the backward runs pass 1 again for it.
   When only the loss is used, two batched products (``torch.matmul``) give the gradients.

Why ``W`` is recomputed once into bits instead of inside every head's program: ``g`` needs all
``h`` heads, so a per-head attention program that recomputed it would do ``h`` extra head-dots
per tile, ``h^2`` over the heads (12x the QK^T work of ViT-B). Computing ``g`` once per tile
for all heads in one program (pass 2a, a plain GEMM with K = C) costs as much as pass 1; the
attention then runs as ordinary per-head flash attention with large tiles, and the backward
reuses the bits instead of recomputing ``g`` per head. Counted in head-dot products of one
(query tile, key tile) pair: forward ``h`` (pass 1) + ``h`` (pass 2a) + ``2h`` (attention)
= ``4h``, twice dense flash attention's ``2h``; backward ``7h`` (``s, dv, dp, dk`` in the
key-block kernel, ``s, dp, dq`` in the query-block kernel, as in Triton's fused-attention
tutorial), the loss's gradient riding on the last two. Pass 2a cannot join pass 1: ``t_i``
needs every key of the row first; keeping ``g`` between them (``B N^2`` float32 written and read
back from DRAM) would save at most a quarter of pass 2a in the static model (docs/cost_model.md).
The cost model (``python -m bench.cost``, docs/cost_model.md "WinfT") prices each kernel.

Tile sizes come from the launch policy (:mod:`vitpatch.kernels._launch`, units
``winft_threshold`` (pass 1), ``winft_gate`` (pass 2a), ``winft_fwd``, ``winft_dq``, ``winft_dkdv``),
each chosen by :func:`vitpatch.kernels._launch.select` (timed on the GPU where several ship);
small pinned tiles under the interpreter. The gate passes split their keys over a third
grid axis when row blocks x images would make fewer than two waves. The gate logits ``g``
(passes 1 and 2a) always use ``dot_precision(dtype, exact=True)`` (three-pass
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
from triton.language.extra import libdevice

from . import _launch
from ._flash import online_step
from ._launch import dot_precision, helper, interpreting, kernel, keywords, strides

__all__ = ["winft_attention", "winft_attention_unsupported"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 128


# =============================================================================== jit helpers
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# The online softmax's running maximum starts at this finite value instead of -inf: a row whose
# first key tiles are all gated off (mask mode) keeps it with exp2(m_i - m_new) = 1, never NaN.
# Scaled scores are assumed above it.
_M_START = tl.constexpr(-1.0e30)


@helper
def _gate_tile(a_ptr, sa_h, sa_n, sa_d, offs_a, b_ptr, sb_h, sb_n, sb_d, offs_b, offs_d, N, H, HEAD_DIM, inv_h,
               BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PREC: tl.constexpr):
    """``(1/H) sum_heads a_h[offs_a] . b_h[offs_b]``: a tile of the gate logits ``g`` (eq. 8), float32.

    One GEMM with reduction width ``C = H * HEAD_DIM``, done as a loop over the heads.
    """
    a_mask = (offs_a[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    b_mask = (offs_b[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    a_off = offs_a[:, None] * sa_n + offs_d[None, :] * sa_d
    b_off = offs_b[:, None] * sb_n + offs_d[None, :] * sb_d
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for hh in range(H):  # cost: gate_heads
        a = tl.load(a_ptr + hh * sa_h + a_off, mask=a_mask, other=0.0)
        b = tl.load(b_ptr + hh * sb_h + b_off, mask=b_mask, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc * inv_h


@helper
def _query_windows(win_ptr, sw_n, sw_c, qi, N, P, GW, GH):
    """The target rule's per-query half (eq. 10 = the allowed rule of docs/math.md §1), read once
    per program: the window ``(x_left, y_top, x_right, y_bottom)`` of each query row ``qi`` (a
    vector), the whole grid for a prefix query (it may attend to every kept key) and for a padding
    row (masked by its caller)."""
    ok = (qi >= P) & (qi < N)
    wp = win_ptr + tl.maximum(qi - P, 0) * sw_n
    xl = tl.where(ok, tl.load(wp, mask=ok, other=0), 0)
    yt = tl.where(ok, tl.load(wp + sw_c, mask=ok, other=0), 0)
    xr = tl.where(ok, tl.load(wp + 2 * sw_c, mask=ok, other=0), GW - 1)
    yb = tl.where(ok, tl.load(wp + 3 * sw_c, mask=ok, other=0), GH - 1)
    return xl, yt, xr, yb


@helper
def _key_coords(keep_ptr, kj, N, P, GW, inv_gw, HAS_KEEP: tl.constexpr):
    """The target rule's per-key half for the key vector ``kj``: the patch key's grid column and row
    (``-1``, outside every window, for a prefix key or a dropped one) and whether it is a kept
    prefix key (allowed for every query). The row is ``floor((j - P + 0.5) / GW)`` in float32,
    exact while the grid has fewer than 4 million patches, instead of an integer division."""
    pj = kj - P
    ky = ((pj.to(tl.float32) + 0.5) * inv_gw).to(tl.int32)
    kx = pj - ky * GW
    kept = kj < N
    if HAS_KEEP:
        kept = kept & (tl.load(keep_ptr + kj, mask=kj < N, other=0) != 0)
    patch = kept & (pj >= 0)
    return tl.where(patch, kx, -1), tl.where(patch, ky, -1), kept & (pj < 0)


@helper
def _target(xl, yt, xr, yb, kx, ky, kpre):
    """``T`` of a tile from the rows' windows (:func:`_query_windows`) and the keys' coordinates
    (:func:`_key_coords`): four compares and an or per element."""
    return (((kx[None, :] >= xl[:, None]) & (kx[None, :] <= xr[:, None]) & (ky[None, :] >= yt[:, None])
             & (ky[None, :] <= yb[:, None])) | kpre[None, :])


@helper
def _key_range(N, per_split):
    """The keys ``[lo, hi)`` of this program's split (grid axis 2) of a gate pass: whole key tiles."""
    lo = tl.program_id(2) * per_split
    return lo, tl.minimum(lo + per_split, N)


@helper
def _words(row_ptr, n0, rmask, NW, BLOCK_N: tl.constexpr):
    """The gate words that cover keys ``[n0, n0 + BLOCK_N)`` of each row (``row_ptr``: the rows'
    first words), read once per row and tile: ``(lo, hi)``. With ``BLOCK_N <= 32`` (a divisor of
    32) ``lo`` is shifted so that key ``n0`` is bit 0 and ``hi`` is ``lo``; with ``BLOCK_N = 64``
    the tile's keys are the 32 bits of ``lo`` then those of ``hi``, read as one 8-byte word (rows
    hold an even number of words)."""
    tl.static_assert(BLOCK_N <= 64)
    w0 = n0 // 32
    if BLOCK_N > 32:
        w = tl.load((row_ptr + w0).to(tl.pointer_type(tl.int64)), mask=rmask & (w0 < NW), other=0)
        lo = w.to(tl.int32)
        hi = (w >> 32).to(tl.int32)
    else:
        lo = tl.load(row_ptr + w0, mask=rmask & (w0 < NW), other=0) >> (n0 % 32)
        hi = lo
    return lo, hi


@helper
def _keep(lo, hi, lanes, BLOCK_N: tl.constexpr):
    """``W`` of a tile as bool, expanded in registers from the rows' words (:func:`_words`): bit
    ``lanes`` (the key's place in the tile). ``lo``/``hi`` and ``lanes`` broadcast against each
    other (rows along one axis, keys along the other); the per-lane bit masks are loop constants."""
    if BLOCK_N > 32:
        return (tl.where(lanes < 32, lo, hi) & (1 << (lanes % 32))) != 0
    else:
        return (lo & (1 << lanes)) != 0


@helper
def _log(x, FAST: tl.constexpr):
    """``log(x)``: on a GPU (``FAST``) ``lg2.approx`` times ``ln 2`` (about 2^-22 relative error;
    libdevice's ``logf`` is a long polynomial); ``tl.log`` in the interpreter."""
    if FAST:
        return libdevice.fast_logf(x)
    else:
        return tl.log(x)


@helper
def _div(a, b, FAST: tl.constexpr):
    """``a / b``: on a GPU (``FAST``) ``div.approx`` (a reciprocal and a product, about 2 ulp);
    ``tl.fdiv`` in the interpreter."""
    if FAST:
        return libdevice.fast_dividef(a, b)
    else:
        return tl.fdiv(a, b)


# =============================================================================== gate passes
@kernel
def _threshold_kernel(Q, K, stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                      WIN, stride_wb, stride_wn, stride_wc, KEEP, stride_keep_b,
                      THR, BCE_ROWS, DG, stride_gb, stride_gn, B, N, H, HEAD_DIM, P, GW, GH, inv_gw, inv_h, per_split,
                      HAS_TARGET: tl.constexpr, HAS_KEEP: tl.constexpr, SAVE_DG: tl.constexpr, FAST: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Pass 1 over one split of the keys: ``sum_j sigmoid(g_ij)`` and, with a target, the BCE row sums
    ``sum_j softplus(g_ij) - T_ij g_ij`` (partial sums ``(splits, B, N)``, added in split order).
    ``SAVE_DG``: also the BCE's gradient through ``g`` without its factor, ``sigmoid(g) - T`` (eq. 11
    differentiated, in ``[-1, 1]``), stored in ``DG``'s dtype for the backward's dq and dk/dv
    kernels to fold into their products: ``g`` is formed here anyway, so the backward never
    recomputes it."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    q_base = Q + b * stride_qb
    k_base = K + b * stride_kb
    lo, hi = _key_range(N, per_split)
    w_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    bce = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_TARGET:
        xl, yt, xr, yb = _query_windows(WIN + b * stride_wb, stride_wn, stride_wc, offs_m, N, P, GW, GH)
    for start_n in range(lo, hi, BLOCK_N):  # cost: gate_threshold
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid = row_ok[:, None] & (offs_n[None, :] < hi)
        g = _gate_tile(q_base, stride_qh, stride_qn, stride_qd, offs_m, k_base, stride_kh, stride_kn, stride_kd, offs_n,
                       offs_d, N, H, HEAD_DIM, inv_h, BLOCK_M, BLOCK_N, PREC)
        e = tl.exp(-tl.abs(g))  # shared by the sigmoid and the softplus
        sig = _div(tl.where(g >= 0, 1.0, e), 1.0 + e, FAST)
        w_sum += tl.sum(tl.where(valid, sig, 0.0), axis=1)
        if HAS_TARGET:
            kx, ky, kpre = _key_coords(KEEP + b * stride_keep_b, offs_n, N, P, GW, inv_gw, HAS_KEEP)
            tgt = _target(xl, yt, xr, yb, kx, ky, kpre)
            # softplus(g) - T g = max(g, 0) + log(1 + e) - T g
            bce += tl.sum(tl.where(valid, tl.maximum(g, 0.0) + _log(1.0 + e, FAST) - tl.where(tgt, g, 0.0), 0.0),
                          axis=1)
            if SAVE_DG:
                tl.store(DG + b * stride_gb + offs_m[:, None] * stride_gn + offs_n[None, :],
                         (sig - tgt.to(tl.float32)).to(DG.dtype.element_ty), mask=valid)
    part = (tl.program_id(2) * B + b) * N + offs_m
    tl.store(THR + part, w_sum, mask=row_ok)
    if HAS_TARGET:
        tl.store(BCE_ROWS + part, bce, mask=row_ok)


@kernel
def _gate_bits_kernel(Q, K, stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                      THR, BITS, COUNT, B, N, NW, H, HEAD_DIM, inv_h, inv_n, per_split, splits,
                      MASK_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Pass 2a over one split of the keys: ``W = [sigmoid(g) > t]`` (plus the diagonal in mask mode),
    ``t_i`` the mean of pass 1's ``splits`` partial sums, tested as ``g > logit(t)``; partial row
    counts (this pass's own key splits).
    ``BITS`` is ``(2, B, N, NW)`` int32: ``W`` packed 32 keys a word per query row, then ``W^T``
    packed 32 queries a word per key row (what the dk/dv kernel reads, a key block's words per
    query tile, as the forward reads ``W``). ``BLOCK_M`` and ``BLOCK_N`` are multiples of 32."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    q_base = Q + b * stride_qb
    k_base = K + b * stride_kb
    thr = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for z in range(splits):
        thr += tl.load(THR + (z * B + b) * N + offs_m, mask=row_ok, other=0.0)
    thr = tl.where(row_ok, thr * inv_n, 0.5)
    # sigmoid(g) > t  <=>  g > log(t / (1 - t)): one compare per element (+inf on padding rows)
    logit = tl.where(row_ok, tl.log(thr) - tl.log(1.0 - thr), float("inf"))
    shift = tl.arange(0, BLOCK_N) % 32
    word = tl.arange(0, BLOCK_N // 32)
    shift_t = tl.arange(0, BLOCK_M) % 32
    word_t = pid_m * (BLOCK_M // 32) + tl.arange(0, BLOCK_M // 32)
    bits_base = BITS + b * N * NW
    bits_t = BITS + (B + b) * N * NW
    lo, hi = _key_range(N, per_split)
    count = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for start_n in range(lo, hi, BLOCK_N):  # cost: gate_bits
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid = row_ok[:, None] & (offs_n[None, :] < hi)
        g = _gate_tile(q_base, stride_qh, stride_qn, stride_qd, offs_m, k_base, stride_kh, stride_kn, stride_kd, offs_n,
                       offs_d, N, H, HEAD_DIM, inv_h, BLOCK_M, BLOCK_N, PREC)
        w = (g > logit[:, None]) & valid
        if MASK_MODE:
            w = w | ((offs_m[:, None] == offs_n[None, :]) & valid)
        wi = w.to(tl.int32)
        count += tl.sum(wi, axis=1)
        # distinct powers of two: the sum is the bitwise or (bit 31 wraps to the sign bit)
        packed = tl.sum(tl.reshape(wi << shift[None, :], (BLOCK_M, BLOCK_N // 32, 32)), axis=2)
        wcol = start_n // 32 + word
        tl.store(bits_base + offs_m[:, None] * NW + wcol[None, :], packed,
                 mask=row_ok[:, None] & (wcol[None, :] < NW))
        packed_t = tl.sum(tl.reshape(wi << shift_t[:, None], (BLOCK_M // 32, 32, BLOCK_N)), axis=1)
        tl.store(bits_t + offs_n[None, :] * NW + word_t[:, None], packed_t,
                 mask=(offs_n[None, :] < hi) & (word_t[:, None] < NW))
    tl.store(COUNT + (tl.program_id(2) * B + b) * N + offs_m, count, mask=row_ok)


# =============================================================================== attention
@helper
def _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, n0, lo, hi, lanes, d_ok, N, stride_kn, stride_vn, qk2,
              MASK_MODE: tl.constexpr, EDGE: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """One key tile of the gated online softmax (base 2, ``qk2 = scale log2(e)`` applied to the row
    maximum and inside the ``exp2`` argument). ``EDGE``: the last, partial key tile (its keys are
    checked against ``N``; full tiles load and compute without a key mask)."""
    if EDGE:
        col_ok = (n0 + lanes) < N
        kv_mask = col_ok[:, None] & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    k = tl.load(k_ptrs + n0 * stride_kn, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs + n0 * stride_vn, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    keep = _keep(lo[:, None], hi[:, None], lanes[None, :], BLOCK_N)
    if MASK_MODE:  # gated-off keys removed (their bits, and those of keys >= N, are 0)
        s = tl.where(keep, s, float("-inf"))
    else:  # eq. 9: a gated-off logit is 0
        s = tl.where(keep, s, 0.0)
        if EDGE:
            s = tl.where(col_ok[None, :], s, float("-inf"))
    return online_step(acc, m_i, l_i, s, qk2, v, PREC)


@kernel
def _attn_fwd_kernel(Q, K, V, stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     BITS, O, LSE, N, NW, H, HEAD_DIM, qk2,
                     MASK_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Pass 2b: ``out = softmax(s) v`` with ``s`` gated by ``W`` (eq. 9), online softmax; saves the
    natural log-sum-exp. ``O`` is contiguous ``(B, H, N, HEAD_DIM)``, ``LSE`` float32 ``(B, H, N)``.
    ``W`` comes as each row's word(s) per key tile, read one tile ahead."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hh = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    lanes = tl.arange(0, BLOCK_N)
    row_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + hh * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = K + b * stride_kb + hh * stride_kh + lanes[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + hh * stride_vh + lanes[:, None] * stride_vn + offs_d[None, :] * stride_vd
    rows = BITS + b * N * NW + offs_m * NW
    m_i = tl.full((BLOCK_M,), _M_START, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    n_full = N - N % BLOCK_N
    lo, hi = _words(rows, 0, row_ok, NW, BLOCK_N)
    for n0 in range(0, n_full, BLOCK_N):  # cost: main
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, n0, lo, hi, lanes, d_ok, N, stride_kn, stride_vn,
                                  qk2,
                                  MASK_MODE, False, BLOCK_N, PREC)
        lo, hi = _words(rows, n0 + BLOCK_N, row_ok, NW, BLOCK_N)
    if n_full < N:
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, n_full, lo, hi, lanes, d_ok, N, stride_kn,
                                  stride_vn,
                                  qk2, MASK_MODE, True, BLOCK_N, PREC)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptr = O + pid_bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * N + offs_m, (m_i + tl.log2(l_safe)) * _LN2, mask=row_ok)


# =============================================================================== backward
@kernel
def _delta_kernel(O, DO, stride_dob, stride_doh, stride_don, stride_dod, DELTA, N, H, HEAD_DIM,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``delta_i = sum_d dO_i * O_i`` (float32), the softmax backward's row term."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hh = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + pid_bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + hh * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh * N + offs_m, delta, mask=offs_m < N)


@helper
def _grad_scores(s, dp, lse2, delta, keep, qk2, MASK_MODE: tl.constexpr):
    """``dS / scale`` of one tile with ``W`` held constant: ``p (dp - delta)``, ``p`` recomputed as
    ``exp2(qk2 s - lse2)`` from the gated logits; in multiply mode also times ``W`` (``s = scale
    q.k W``). ``s``, ``dp`` and the broadcast row terms ``lse2 = log2(e) lse`` and ``delta`` in one
    orientation (a tile or its transpose)."""
    if MASK_MODE:
        p = tl.where(keep, tl.math.exp2(s * qk2 - lse2), 0.0)
        return p, p * (dp - delta)
    else:
        p = tl.math.exp2(tl.where(keep, s, 0.0) * qk2 - lse2)
        return p, tl.where(keep, p * (dp - delta), 0.0)


@helper
def _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, g_ptrs, g_rows, n0, lo, hi, lanes, d_ok, N,
             stride_kn, stride_vn, qk2, fold, MASK_MODE: tl.constexpr, EDGE: tl.constexpr, FOLD: tl.constexpr,
             BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """One key tile of ``dq``: ``dq += (dS / scale) k``; with ``FOLD`` the loss's ``sigmoid(g) - T``
    tile rides on the same product (``fold`` = its factor over ``scale``)."""
    if EDGE:
        col_ok = (n0 + lanes) < N
        kv_mask = col_ok[:, None] & d_ok[None, :]
        g_mask = g_rows[:, None] & col_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
        g_mask = g_rows[:, None]
    k = tl.load(k_ptrs + n0 * stride_kn, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs + n0 * stride_vn, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    keep = _keep(lo[:, None], hi[:, None], lanes[None, :], BLOCK_N)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    p, ds = _grad_scores(s, dp, lse2[:, None], delta[:, None], keep, qk2, MASK_MODE)  # 0 at keys >= N (no bits)
    if FOLD:
        ds += fold * tl.load(g_ptrs + n0, mask=g_mask, other=0.0).to(tl.float32)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)


@kernel
def _attn_dq_kernel(Q, K, V, stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    DO, stride_dob, stride_doh, stride_don, stride_dod, LSE, DELTA, BITS, DG, stride_gb, stride_gn,
                    DLOSS, DQ, N, NW, H, HEAD_DIM, scale, qk2, bce_coef, MASK_MODE: tl.constexpr, FOLD: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """``dQ = scale dS K`` of one query block with ``W`` held constant, plus (``FOLD``) the loss's
    ``dL_out bce_coef (sigmoid(g) - T) K`` (``bce_coef = 1 / (B N^2 H)``), the tile of
    ``sigmoid(g) - T`` read from ``DG`` and folded into the product."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hh = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    lanes = tl.arange(0, BLOCK_N)
    row_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + hh * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + hh * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + pid_bh * N + offs_m, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(DELTA + pid_bh * N + offs_m, mask=row_ok, other=0.0)
    k_ptrs = K + b * stride_kb + hh * stride_kh + lanes[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + hh * stride_vh + lanes[:, None] * stride_vn + offs_d[None, :] * stride_vd
    g_ptrs = DG + b * stride_gb + offs_m[:, None] * stride_gn + lanes[None, :]
    rows = BITS + b * N * NW + offs_m * NW
    kappa = 0.0
    if FOLD:
        kappa = tl.load(DLOSS).to(tl.float32) * bce_coef
    fold = kappa / scale
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    n_full = N - N % BLOCK_N
    lo, hi = _words(rows, 0, row_ok, NW, BLOCK_N)
    for n0 in range(0, n_full, BLOCK_N):  # cost: main
        dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, g_ptrs, row_ok, n0, lo, hi, lanes,
                              d_ok, N, stride_kn, stride_vn, qk2, fold, MASK_MODE, False, FOLD, BLOCK_N, PREC)
        lo, hi = _words(rows, n0 + BLOCK_N, row_ok, NW, BLOCK_N)
    if n_full < N:
        dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, g_ptrs, row_ok, n_full, lo, hi, lanes,
                              d_ok, N, stride_kn, stride_vn, qk2, fold, MASK_MODE, True, FOLD, BLOCK_N, PREC)
    dq = dq * scale
    tl.store(DQ + pid_bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_mask)


@helper
def _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, g_ptrs, lse_ptr, delta_ptr, m0, lo, hi, lanes, d_ok,
               g_cols, N, stride_qn, stride_don, stride_gn, qk2, fold, MASK_MODE: tl.constexpr, EDGE: tl.constexpr,
               FOLD: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    """One query tile of a key block's ``dk``, ``dv`` on transposed tiles (``s^T = k q^T``):
    ``dv += P^T dO``, ``dk += (dS^T / scale) q`` with the BCE's ``(sigmoid(g) - T)^T`` folded in as
    in :func:`_dq_tile`. ``EDGE``: the last, partial query tile (rows >= N read as zeros, their
    log-sum-exp as +inf, so they add nothing)."""
    if EDGE:
        row_ok = (m0 + lanes) < N
        qd_mask = row_ok[:, None] & d_ok[None, :]
        g_mask = row_ok[:, None] & g_cols[None, :]
        lse2 = tl.load(lse_ptr + m0 + lanes, mask=row_ok, other=float("inf")) * _LOG2E
        delta = tl.load(delta_ptr + m0 + lanes, mask=row_ok, other=0.0)
    else:
        qd_mask = d_ok[None, :]
        g_mask = g_cols[None, :]
        lse2 = tl.load(lse_ptr + m0 + lanes) * _LOG2E
        delta = tl.load(delta_ptr + m0 + lanes)
    q = tl.load(q_ptrs + m0 * stride_qn, mask=qd_mask, other=0.0)
    do = tl.load(do_ptrs + m0 * stride_don, mask=qd_mask, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=PREC)
    keep_t = _keep(lo[:, None], hi[:, None], lanes[None, :], BLOCK_M)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    p_t, ds_t = _grad_scores(s_t, dp_t, lse2[None, :], delta[None, :], keep_t, qk2, MASK_MODE)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
    if FOLD:  # the tile read as stored (query rows, contiguous keys), then transposed
        ds_t += fold * tl.trans(tl.load(g_ptrs + m0 * stride_gn, mask=g_mask, other=0.0)).to(tl.float32)
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@kernel
def _attn_dkdv_kernel(Q, K, V, stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd,
                      DO, stride_dob, stride_doh, stride_don, stride_dod, LSE, DELTA, BITS, DG, stride_gb, stride_gn,
                      DLOSS, DK, DV, N, NW, H, HEAD_DIM, scale, qk2, bce_coef, MASK_MODE: tl.constexpr,
                      FOLD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      PREC: tl.constexpr):
    """``dK, dV`` of one key block with ``W`` held constant: ``dV = P^T dO``; ``dS = P * (dP - delta)``
    (times ``W`` in multiply mode, since ``s = scale q.k W``); ``dK = scale dS^T Q`` plus
    ``dL_out bce_coef (sigmoid(g) - T)^T Q`` (``FOLD``). ``W^T`` comes as each key row's word(s) per query
    tile (the transposed bits), read one tile ahead."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hh = pid_bh % H
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    lanes = tl.arange(0, BLOCK_M)
    col_ok = offs_n < N
    d_ok = offs_d < HEAD_DIM
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + hh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    q_ptrs = Q + b * stride_qb + hh * stride_qh + lanes[:, None] * stride_qn + offs_d[None, :] * stride_qd
    do_ptrs = DO + b * stride_dob + hh * stride_doh + lanes[:, None] * stride_don + offs_d[None, :] * stride_dod
    g_ptrs = DG + b * stride_gb + lanes[:, None] * stride_gn + offs_n[None, :]
    lse_ptr = LSE + pid_bh * N
    delta_ptr = DELTA + pid_bh * N
    rows = BITS + (tl.num_programs(1) // H + b) * N * NW + offs_n * NW
    kappa = 0.0
    if FOLD:
        kappa = tl.load(DLOSS).to(tl.float32) * bce_coef
    fold = kappa / scale
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    m_full = N - N % BLOCK_M
    lo, hi = _words(rows, 0, col_ok, NW, BLOCK_M)
    for m0 in range(0, m_full, BLOCK_M):  # cost: main
        dk, dv = _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, g_ptrs, lse_ptr, delta_ptr, m0, lo, hi, lanes, d_ok,
                            col_ok, N, stride_qn, stride_don, stride_gn, qk2, fold, MASK_MODE, False, FOLD, BLOCK_M,
                            PREC)
        lo, hi = _words(rows, m0 + BLOCK_M, col_ok, NW, BLOCK_M)
    if m_full < N:
        dk, dv = _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, g_ptrs, lse_ptr, delta_ptr, m_full, lo, hi, lanes, d_ok,
                            col_ok, N, stride_qn, stride_don, stride_gn, qk2, fold, MASK_MODE, True, FOLD, BLOCK_M,
                            PREC)
    dk = dk * scale
    out_off = pid_bh * N * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


# =============================================================================== launchers
def _head_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _target_args(windows: Optional[torch.Tensor], key_keep: Optional[torch.Tensor], device: torch.device) -> dict:
    """Pass 1's O(n) target description by its argument names (dummy float32 pointers when absent)."""
    dummy = torch.empty(1, dtype=torch.float32, device=device)
    if windows is None:
        return dict(WIN=dummy, stride_wb=0, stride_wn=0, stride_wc=0, KEEP=dummy, stride_keep_b=0)
    win = dict(WIN=windows, stride_wb=windows.stride(0) if windows.dim() == 3 else 0, stride_wn=windows.stride(-2),
               stride_wc=windows.stride(-1))
    if key_keep is None:
        return dict(win, KEEP=dummy, stride_keep_b=0)
    keep = key_keep.contiguous()
    keep = keep.view(torch.uint8) if keep.dtype == torch.bool else keep
    return dict(win, KEEP=keep, stride_keep_b=keep.stride(0) if keep.shape[0] > 1 else 0)


# programs per SM the gate passes aim for: two waves
_GATE_PROGRAMS_PER_SM = 2


def _gate_grid(N: int, B: int, cfg: _launch.LaunchConfig, device: torch.device) -> Tuple[Tuple[int, int, int], int]:
    """The gate passes' grid ``(row blocks, B, splits)`` and keys per split (whole key tiles). The
    keys are split only when ``row blocks x B`` programs would make fewer than two waves over the
    SMs (for example B = 16, N = 1025, 128-row tiles: 144 programs on 132 SMs). Under the
    interpreter this counts 132 SMs too, so small test shapes split their keys."""
    rows, tiles = triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"])
    want = _GATE_PROGRAMS_PER_SM * _launch.num_sms(device)
    splits = max(1, min(tiles, triton.cdiv(want, rows * B)))
    per_split = triton.cdiv(tiles, splits) * cfg["BLOCK_N"]
    return (rows, B, triton.cdiv(N, per_split)), per_split


def _gate_pass1(q, k, windows, key_keep, num_prefix: int, grid_w: int, save_dg: bool):
    """Launch pass 1 (:func:`_threshold_kernel`): ``(thr, bce_rows, dg)``, the
    partial row sums ``(splits, B, N)`` and, with ``save_dg`` (a target given), ``sigmoid(g) - T`` as
    a ``(B, N, ceil(N / 16) * 16)`` tensor in ``q``'s dtype (rows 16-element aligned for the
    backward's tile loads; the padding columns are never read), else an empty tensor."""
    B, H, N, D = q.shape
    dev = q.device
    has_target = windows is not None
    save_dg = save_dg and has_target
    dg = torch.empty(B, N, triton.cdiv(N, 16) * 16 if save_dg else 0, dtype=q.dtype, device=dev)
    target = _target_args(windows, key_keep, dev)
    gw = max(grid_w, 1)

    def launch(cfg):
        grid, per_split = _gate_grid(N, B, cfg, dev)
        thr = torch.empty(grid[2], B, N, dtype=torch.float32, device=dev)
        bce_rows = torch.empty(grid[2], B, N, dtype=torch.float32, device=dev) if has_target else thr
        _threshold_kernel[grid](
            Q=q, K=k, **strides("q", q), **strides("k", k), **target, THR=thr, BCE_ROWS=bce_rows, DG=dg,
            stride_gb=dg.stride(0), stride_gn=dg.stride(1), B=B, N=N, H=H, HEAD_DIM=D, P=num_prefix, GW=gw,
            GH=max((N - num_prefix) // gw, 1), inv_gw=1.0 / gw, inv_h=1.0 / H, per_split=per_split,
            HAS_TARGET=has_target, HAS_KEEP=key_keep is not None and has_target, SAVE_DG=save_dg,
            FAST=not interpreting(), BLOCK_D=_head_block(D), PREC=dot_precision(q.dtype, exact=True), **keywords(cfg))
        return thr, bce_rows

    cfg = _launch.select("winft_threshold", q.dtype, D, key=(B, N, has_target, save_dg), device=dev, run=launch)
    thr, bce_rows = launch(cfg)
    return thr, bce_rows, dg


def _forward(q, k, v, windows, key_keep, scale: float, mode: str, num_prefix: int, grid_w: int, save_dg: bool):
    B, H, N, D = q.shape
    dev = q.device
    BD = _head_block(D)
    prec, gate_prec = dot_precision(q.dtype), dot_precision(q.dtype, exact=True)
    NW = 2 * triton.cdiv(N, 64)  # words per row, even: a 64-key tile's two words are one 8-byte read
    mask_mode = mode == "mask"
    thr, bce_rows, dg = _gate_pass1(q, k, windows, key_keep, num_prefix, grid_w, save_dg)
    bits = torch.zeros(2, B, N, NW, dtype=torch.int32, device=dev)  # the padding words stay 0
    out = torch.empty(B, H, N, D, dtype=q.dtype, device=dev)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=dev)

    def gate(cfg):
        grid, per_split = _gate_grid(N, B, cfg, dev)
        counts = torch.empty(grid[2], B, N, dtype=torch.int32, device=dev)
        _gate_bits_kernel[grid](
            Q=q, K=k, **strides("q", q), **strides("k", k), THR=thr, BITS=bits, COUNT=counts, B=B, N=N, NW=NW, H=H,
            HEAD_DIM=D, inv_h=1.0 / H, inv_n=1.0 / N, per_split=per_split, splits=thr.shape[0], MASK_MODE=mask_mode,
            BLOCK_D=BD, PREC=gate_prec, **keywords(cfg))
        return counts

    def attend(cfg):
        _attn_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_M"]), B * H)](
            Q=q, K=k, V=v, **strides("q", q), **strides("k", k), **strides("v", v), BITS=bits, O=out, LSE=lse, N=N,
            NW=NW, H=H, HEAD_DIM=D, qk2=scale * _LOG2E.value, MASK_MODE=mask_mode, BLOCK_D=BD, PREC=prec,
            **keywords(cfg))

    counts = gate(_launch.select("winft_gate", q.dtype, D, key=(B, N, mask_mode), device=dev, run=gate))
    attend(_launch.select("winft_fwd", q.dtype, D, key=(N, mask_mode), device=dev, run=attend))
    if windows is not None:
        loss = (bce_rows.sum() / (B * N * N)).to(q.dtype)
    else:
        loss = torch.zeros((), dtype=q.dtype, device=dev)
    gate_sum = counts.sum((0, 2)).to(torch.float32)
    return out, loss, gate_sum, lse, bits, dg


def _backward(dout, dloss, q, k, v, out, lse, bits, dg, windows, key_keep, scale: float, mode: str,
              num_prefix: int, grid_w: int):
    B, H, N, D = q.shape
    dev = q.device
    BD = _head_block(D)
    prec = dot_precision(q.dtype)
    NW = bits.shape[-1]  # bits: (2, B, N, NW), W then W^T
    mask_mode = mode == "mask"
    with_bce = windows is not None and dloss is not None
    bce_coef = 1.0 / (B * N * N * H)
    if with_bce and dg.numel() == 0:  # the forward did not keep sigmoid(g) - T: pass 1 again
        dg = _gate_pass1(q, k, windows, key_keep, num_prefix, grid_w, True)[2]
    if dout is None:  # only the loss is used: the attention contributes nothing
        zeros = torch.zeros(B, H, N, D, dtype=q.dtype, device=dev)
        if not with_bce:
            return zeros, zeros.clone(), zeros.clone()
        dq, dk = _bce_products(dg, q, k, dloss, bce_coef)
        return dq.to(q.dtype), dk.to(k.dtype), zeros
    # sigmoid(g) - T rides on the attention's dq and dk products in bfloat16 up to head width 64;
    # in float16 its factor dL_out / (B N^2 H scale) underflows in an operand, and in float32 or
    # above head width 64 its tile would make the dk/dv kernel spill: there two batched products
    # add it after the kernels
    fold = with_bce and q.dtype == torch.bfloat16 and D <= 64
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=dev)
    dk = torch.empty(B, H, N, D, dtype=k.dtype, device=dev)
    dv = torch.empty(B, H, N, D, dtype=v.dtype, device=dev)
    delta = torch.empty(B, H, N, dtype=torch.float32, device=dev)
    rows = 16 if interpreting() else 64
    _delta_kernel[(triton.cdiv(N, rows), B * H)](O=out, DO=dout, **strides("do", dout), DELTA=delta, N=N, H=H,
                                                HEAD_DIM=D, BLOCK_M=rows, BLOCK_D=BD)
    loss_args = (dict(DG=dg, stride_gb=dg.stride(0), stride_gn=dg.stride(1), DLOSS=dloss.reshape(1)) if with_bce
                 else dict(DG=delta, stride_gb=0, stride_gn=0, DLOSS=delta))
    common = dict(Q=q, K=k, V=v, **strides("q", q), **strides("k", k), **strides("v", v), DO=dout,
                  **strides("do", dout), LSE=lse, DELTA=delta, BITS=bits, **loss_args, N=N, NW=NW, H=H, HEAD_DIM=D,
                  scale=scale, qk2=scale * _LOG2E.value, bce_coef=bce_coef, MASK_MODE=mask_mode, FOLD=fold,
                  BLOCK_D=BD, PREC=prec)

    def grad_q(cfg):
        _attn_dq_kernel[(triton.cdiv(N, cfg["BLOCK_M"]), B * H)](DQ=dq, **common, **keywords(cfg))

    def grad_kv(cfg):
        _attn_dkdv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), B * H)](DK=dk, DV=dv, **common, **keywords(cfg))

    key = (N, mask_mode, fold)
    grad_q(_launch.select("winft_dq", q.dtype, D, key=key, device=dev, run=grad_q))
    grad_kv(_launch.select("winft_dkdv", q.dtype, D, key=key, device=dev, run=grad_kv))
    if with_bce and not fold:
        dq_bce, dk_bce = _bce_products(dg, q, k, dloss, bce_coef)
        dq, dk = (dq.float() + dq_bce).to(q.dtype), (dk.float() + dk_bce).to(k.dtype)
    return dq, dk, dv


def _bce_products(dg, q, k, dloss, bce_coef: float):
    """The loss's gradients alone, float32: ``c (sigmoid(g) - T) K`` and ``c (sigmoid(g) - T)^T Q`` per
    head (``c = dL_out bce_coef``), as two batched products of the kept tile with every head."""
    N = q.shape[2]
    g = dg[:, None, :, :N]
    kappa = dloss.float() * bce_coef
    return torch.matmul(g, k).float() * kappa, torch.matmul(g.transpose(-2, -1), q).float() * kappa


# =============================================================================== torch.library op
@torch.library.custom_op("vitpatch::winft_fwd", mutates_args=())
def winft_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: Optional[torch.Tensor],
              key_keep: Optional[torch.Tensor], scale: float, mode: str, num_prefix_tokens: int,
              grid_w: int, keep_grad: bool = False
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """WinfT forward (docs/math.md §6): ``(out, loss, gate_sum, lse, bits, dg)``; the last three are
    saved for backward. ``dg`` is ``sigmoid(g) - T`` (``(B, N, ceil(N/16)*16)``, q's dtype) when
    ``keep_grad`` and a target are given (the loss will be differentiated), else empty."""
    return _forward(q, k, v, windows, key_keep, scale, mode, num_prefix_tokens, grid_w, keep_grad)


@winft_fwd.register_fake
def _winft_fwd_fake(q, k, v, windows, key_keep, scale, mode, num_prefix_tokens, grid_w, keep_grad=False):
    B, H, N, D = q.shape
    dg_cols = (N + 15) // 16 * 16 if keep_grad and windows is not None else 0
    return (q.new_empty(B, H, N, D), q.new_empty(()), q.new_empty(B, dtype=torch.float32),
            q.new_empty(B, H, N, dtype=torch.float32), q.new_empty(2, B, N, (N + 63) // 64 * 2, dtype=torch.int32),
            q.new_empty(B, N, dg_cols))


@torch.library.custom_op("vitpatch::winft_bwd", mutates_args=())
def winft_bwd(dout: Optional[torch.Tensor], dloss: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, bits: torch.Tensor, dg: torch.Tensor,
              windows: Optional[torch.Tensor], key_keep: Optional[torch.Tensor], scale: float, mode: str,
              num_prefix_tokens: int, grid_w: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """WinfT backward: ``(dq, dk, dv)`` of the attention with ``W`` held constant plus the BCE through
    ``g`` (from the forward's ``dg``; recomputed by pass 1 when it is empty)."""
    return _backward(dout, dloss, q, k, v, out, lse, bits, dg, windows, key_keep, scale, mode,
                     num_prefix_tokens, grid_w)


@winft_bwd.register_fake
def _winft_bwd_fake(dout, dloss, q, k, v, out, lse, bits, dg, windows, key_keep, scale, mode, num_prefix_tokens,
                    grid_w):
    B, H, N, D = q.shape
    return q.new_empty(B, H, N, D), k.new_empty(B, H, N, D), v.new_empty(B, H, N, D)


def _setup_context(ctx, inputs, output):
    q, k, v, windows, key_keep, scale, mode, num_prefix_tokens, grid_w, _keep_grad = inputs
    out, _loss, gate_sum, lse, bits, dg = output
    ctx.save_for_backward(q, k, v, out, lse, bits, dg, windows, key_keep)
    ctx.scale, ctx.mode, ctx.num_prefix_tokens, ctx.grid_w = scale, mode, num_prefix_tokens, grid_w
    ctx.mark_non_differentiable(gate_sum, lse, bits, dg)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: its kernels are skipped


def _winft_fwd_backward(ctx, dout, dloss, _dgate_sum, _dlse, _dbits, _ddg):
    q, k, v, out, lse, bits, dg, windows, key_keep = ctx.saved_tensors
    dq, dk, dv = winft_bwd(dout, dloss, q, k, v, out, lse, bits, dg, windows, key_keep, ctx.scale, ctx.mode,
                           ctx.num_prefix_tokens, ctx.grid_w)
    return dq, dk, dv, None, None, None, None, None, None, None


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
    return _launch.supports(("winft_threshold", "winft_gate", "winft_fwd", "winft_dq", "winft_dkdv"), q.dtype,
                            q.shape[-1])


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
    keep_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    out, loss, gate_sum, _lse, _bits, _dg = winft_fwd(q, k, v, windows, key_keep, float(scale), mode,
                                                      num_prefix_tokens, grid_w, keep_grad)
    return out, loss, gate_sum
