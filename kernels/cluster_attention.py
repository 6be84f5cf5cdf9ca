"""Triton kernels for patch-to-cluster attention (PaCa; paper 004 §3.3 eq. 6–8, docs/math.md §7).

Two operations, each a ``torch.library`` custom op with a fake (meta) implementation and a
registered autograd formula, so ``torch.compile`` keeps them in one graph:

``cluster_pool(logits, x) -> z`` (eq. 7–8 before the LayerNorm)
    ``a[b, :, m] = softmax_i(logits[b, i, m])`` over the ``n`` tokens, ``z[b, m] = sum_i a[b, i, m] x[b, i]``.
    Forward is one pass of online softmax over the tokens, split-K style: the token axis is cut
    into ``S`` ranges handled by different programs, each keeping a running max ``mx``, a running
    sum ``l`` and an unnormalised accumulator ``acc`` for its range and its tile of clusters and
    channels; a combine kernel merges the ``S`` partial states
    (``z = sum_s e^(mx_s - mx) acc_s / sum_s e^(mx_s - mx) l_s``, ``mx = max_s mx_s``) and
    writes the per-cluster softmax statistics ``(mx_m, log l_m)`` (their sum is the log-sum-exp;
    kept apart, a large ``mx_m`` does not cost backward the float32 rounding of ``lse_m``). With
    one range the first kernel finishes the job itself. The ``(B, n, M)`` probabilities are never
    stored: backward recomputes ``a_im = exp((logits_im - mx_m) - log l_m)`` and forms
    ``dx_i = sum_m a_im dz_m`` and ``dlogits_im = a_im (dz_m . x_i - dz_m . z_m)``.
    Logits whose rows are padded to a multiple of 16 elements (what :func:`vitpatch.nn.cluster_logits`
    writes) are read to the padded width (:func:`logits_width`), so each row is 16-byte vectors;
    the padding only ever reaches rows of a tile that are not stored.

``cluster_attention(q, k, v, scale) -> out`` (attention of the queries over the cluster tokens)
    ``out_i = sum_m softmax_m(scale q_i . k_m) v_m`` with all ``M <= 256`` keys of a head in one
    tile, so each query row's softmax is exact in one step (no online rescaling); queries are
    streamed in tiles. Because a whole row of scores sits in one tile, backward needs no saved
    statistics: it recomputes the row's softmax ``p_im`` whole (max and sum included; the same
    cancellation at the row maximum as eager, so recomputed scores that round differently from
    the forward's cost nothing) and, with ``delta_i = sum_m p_im dp_im`` (``= do_i . o_i``, so
    ``out`` is neither saved nor read; ``dp_im = do_i . v_m``),
    ``ds_im = p_im (do_i . v_m - delta_i)``, ``dq_i = scale sum_m ds_im k_m``,
    ``dk_m = scale sum_i ds_im q_i``, ``dv_m = sum_i p_im do_i``.
    One backward kernel does all three: each program owns a (batch, head) and a contiguous range
    of query tiles, writes ``dq`` for its rows directly (no other program touches them) and
    accumulates ``dk``/``dv`` in registers over its query tiles. With one range (``S = 1``) it
    writes ``dk`` and ``dv`` themselves; else the per-range partial sums go to a float32 buffer
    ``(B*h, S, M, d)`` that one more launch (``_attn_bwd_reduce_kernel``) sums over ``S`` into
    both. That is deterministic (no atomics), reads ``q`` and ``do`` once, and the range count
    ``S`` is chosen so that ``B * h * S`` programs fill the GPU even when ``B * h`` is small.
    The query tiles are 64 rows (the candidates of ``paca_attn_bwd``), so on sm_90a all five
    products of an iteration are warpgroup MMAs (``wgmma``; 32-row tiles put three of them on
    ``mma.sync``).

Accumulation is float32 for float32, float16 and bfloat16 inputs; float32 products follow the
policy of :mod:`vitpatch.kernels._launch` (three-pass TF32 on tensor cores at PyTorch's default
``"highest"`` matmul precision, one-pass TF32 at ``"high"``/``"medium"``). Inputs may be
non-contiguous: every kernel takes strides. On a GPU the block sizes are chosen among the
policy's candidates (units ``paca_*``) by :func:`vitpatch.kernels._launch.select`, timed once per
token and cluster count; under ``TRITON_INTERPRET=1`` (CPU tensors) exactly one small pinned
configuration runs.

Kernels and launchers only; validation and the backend choice live in ``vitpatch.functional``.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import dot_precision, interpreting, kernel, keywords, strides

__all__ = ["cluster_pool", "cluster_attention", "cluster_pool_unsupported", "cluster_attention_unsupported",
           "MAX_CLUSTERS", "MAX_HEAD_DIM"]

MAX_CLUSTERS = 256  # keys of one head held in one tile by the attention kernels
MAX_HEAD_DIM = 128  # widest head the attention kernels accept (padded to a power of two >= 16)

# Under the interpreter: small cluster and channel tiles (the token/query tile is the policy's
# pinned BLOCK_N = 16), and split sizes that are not a multiple of it, so the split boundaries
# and the combine step are exercised.
_INTERP = {"pool_block_m": 32, "pool_block_c": 16, "pool_split": 24, "attn_split": 24}


# ---------------------------------------------------------------------------------------------
# cluster pooling kernels
# ---------------------------------------------------------------------------------------------

@kernel
def _pool_fwd_kernel(L, X, Z, STATS, PACC, PMAX, PSUM,
                     n, M, M_pad, C, tokens_per_split, num_splits, plane,
                     stride_lb, stride_ln, stride_lm, stride_xb, stride_xn, stride_xc,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                     SINGLE: tl.constexpr, PREC: tl.constexpr):
    """One token range x one tile of clusters x one tile of channels: online softmax over the tokens.

    ``SINGLE``: the range is all ``n`` tokens, so write ``z`` and the stats directly; otherwise write
    the partial state (``acc``, running max, running sum) for the combine kernel.
    """
    pid_bm = tl.program_id(0)
    split = tl.program_id(1)
    pid_c = tl.program_id(2)
    m_tiles = tl.cdiv(M, BLOCK_M)
    b = pid_bm // m_tiles
    offs_m = (pid_bm % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C
    row_m = offs_m < M_pad  # readable logits columns (M, or the padded row width)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n)
    l_base = L + b.to(tl.int64) * stride_lb
    x_base = X + b.to(tl.int64) * stride_xb

    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for t0 in range(start, end, BLOCK_N):  # cost: main
        offs_n = t0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        # columns M..M_pad are padding: they only reach the rows of acc that are never stored
        lg = tl.load(l_base + offs_n[:, None] * stride_ln + offs_m[None, :] * stride_lm,
                     mask=mask_n[:, None] & row_m[None, :], other=0.0).to(tl.float32)
        lg = tl.where(mask_n[:, None], lg, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(lg, axis=0))
        # a cluster whose logits so far are all -inf keeps a zero state instead of NaN
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(run_max - shift)
        p = tl.exp(lg - shift[None, :])
        run_sum = run_sum * alpha + tl.sum(p, axis=0)
        xt = tl.load(x_base + offs_n[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                     mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(tl.trans(p.to(xt.dtype)), xt, input_precision=PREC)
        run_max = new_max

    if SINGLE:
        z = acc / run_sum[:, None]
        z_ptr = Z + (b.to(tl.int64) * M + offs_m[:, None]) * C + offs_c[None, :]
        tl.store(z_ptr, z.to(Z.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])
        if pid_c == 0:
            st = STATS + b.to(tl.int64) * M + offs_m
            tl.store(st, run_max, mask=mask_m)
            tl.store(st + plane, tl.log(run_sum), mask=mask_m)
    else:
        row = (b.to(tl.int64) * num_splits + split) * M + offs_m
        tl.store(PACC + row[:, None] * C + offs_c[None, :], acc, mask=mask_m[:, None] & mask_c[None, :])
        if pid_c == 0:
            tl.store(PMAX + row, run_max, mask=mask_m)
            tl.store(PSUM + row, run_sum, mask=mask_m)


@kernel
def _pool_combine_kernel(Z, STATS, PACC, PMAX, PSUM, M, C, num_splits, plane,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the partial online-softmax states of the ``num_splits`` token ranges."""
    pid_bm = tl.program_id(0)
    pid_c = tl.program_id(1)
    m_tiles = tl.cdiv(M, BLOCK_M)
    b = pid_bm // m_tiles
    offs_m = (pid_bm % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C
    row0 = b.to(tl.int64) * num_splits * M + offs_m

    g_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(0, num_splits):
        g_max = tl.maximum(g_max, tl.load(PMAX + row0 + s * M, mask=mask_m, other=0.0))
    shift = tl.where(g_max == float("-inf"), 0.0, g_max)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for s in range(0, num_splits):
        row = row0 + s * M
        w = tl.exp(tl.load(PMAX + row, mask=mask_m, other=0.0) - shift)
        total += w * tl.load(PSUM + row, mask=mask_m, other=0.0)
        part = tl.load(PACC + row[:, None] * C + offs_c[None, :], mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        acc += w[:, None] * part
    total = tl.where(mask_m, total, 1.0)  # padding clusters: keep them finite
    z = acc / total[:, None]
    tl.store(Z + (b.to(tl.int64) * M + offs_m[:, None]) * C + offs_c[None, :], z.to(Z.dtype.element_ty),
             mask=mask_m[:, None] & mask_c[None, :])
    if pid_c == 0:
        st = STATS + b.to(tl.int64) * M + offs_m
        tl.store(st, g_max, mask=mask_m)
        tl.store(st + plane, tl.log(total), mask=mask_m)


@kernel
def _pool_bwd_dlogits_kernel(L, X, Z, DZ, STATS, DL, n, M, M_pad, C, plane,
                             stride_lb, stride_ln, stride_lm, stride_xb, stride_xn, stride_xc,
                             stride_dzb, stride_dzm, stride_dzc,
                             BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                             PREC: tl.constexpr):
    """``dlogits_im = a_im (dz_m . x_i - dz_m . z_m)`` for a tile of tokens x a tile of clusters (loop over C)."""
    pid_bm = tl.program_id(0)
    pid_n = tl.program_id(1)
    m_tiles = tl.cdiv(M, BLOCK_M)
    b = pid_bm // m_tiles
    offs_m = (pid_bm % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < n
    mask_nm = mask_n[:, None] & mask_m[None, :]

    st = STATS + b.to(tl.int64) * M + offs_m
    mx = tl.load(st, mask=mask_m, other=0.0)
    log_sum = tl.load(st + plane, mask=mask_m, other=0.0)
    lg = tl.load(L + b.to(tl.int64) * stride_lb + offs_n[:, None] * stride_ln + offs_m[None, :] * stride_lm,
                 mask=mask_n[:, None] & (offs_m < M_pad)[None, :], other=0.0).to(tl.float32)
    a = tl.where(mask_nm, tl.exp((lg - mx[None, :]) - log_sum[None, :]), 0.0)

    x_base = X + b.to(tl.int64) * stride_xb
    dz_base = DZ + b.to(tl.int64) * stride_dzb
    z_base = Z + b.to(tl.int64) * M * C
    xdz = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    zdz = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, C, BLOCK_C):  # cost: main
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        xt = tl.load(x_base + offs_n[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                     mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        mask_mc = mask_m[:, None] & mask_c[None, :]
        dzt = tl.load(dz_base + offs_m[:, None] * stride_dzm + offs_c[None, :] * stride_dzc, mask=mask_mc, other=0.0)
        zt = tl.load(z_base + offs_m[:, None] * C + offs_c[None, :], mask=mask_mc, other=0.0)
        xdz += tl.dot(xt, tl.trans(dzt.to(xt.dtype)), input_precision=PREC)
        zdz += tl.sum(dzt.to(tl.float32) * zt.to(tl.float32), axis=1)
    dl = a * (xdz - zdz[None, :])
    tl.store(DL + (b.to(tl.int64) * n + offs_n[:, None]) * M + offs_m[None, :], dl.to(DL.dtype.element_ty),
             mask=mask_nm)


@kernel
def _pool_bwd_dx_kernel(L, DZ, STATS, DX, n, M, M_pad, C, plane,
                        stride_lb, stride_ln, stride_lm, stride_dzb, stride_dzm, stride_dzc,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                        PREC: tl.constexpr):
    """``dx_i = sum_m a_im dz_m`` for a tile of tokens x a tile of channels (loop over the clusters)."""
    pid_bn = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_tiles = tl.cdiv(n, BLOCK_N)
    b = pid_bn // n_tiles
    offs_n = (pid_bn % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_n = offs_n < n
    mask_c = offs_c < C
    l_base = L + b.to(tl.int64) * stride_lb
    dz_base = DZ + b.to(tl.int64) * stride_dzb
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for m0 in range(0, M, BLOCK_M):  # cost: main
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        mask_nm = mask_n[:, None] & mask_m[None, :]
        st = STATS + b.to(tl.int64) * M + offs_m
        mx = tl.load(st, mask=mask_m, other=0.0)
        log_sum = tl.load(st + plane, mask=mask_m, other=0.0)
        lg = tl.load(l_base + offs_n[:, None] * stride_ln + offs_m[None, :] * stride_lm,
                     mask=mask_n[:, None] & (offs_m < M_pad)[None, :], other=0.0)
        a = tl.where(mask_nm, tl.exp((lg.to(tl.float32) - mx[None, :]) - log_sum[None, :]), 0.0)
        dzt = tl.load(dz_base + offs_m[:, None] * stride_dzm + offs_c[None, :] * stride_dzc,
                      mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        acc += tl.dot(a.to(dzt.dtype), dzt, input_precision=PREC)
    tl.store(DX + (b.to(tl.int64) * n + offs_n[:, None]) * C + offs_c[None, :], acc.to(DX.dtype.element_ty),
             mask=mask_n[:, None] & mask_c[None, :])


# ---------------------------------------------------------------------------------------------
# attention over the cluster keys
# ---------------------------------------------------------------------------------------------

@kernel
def _attn_fwd_kernel(Q, K, V, O, scale, H, N, M, HEAD_DIM,
                     stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PREC: tl.constexpr):
    """A tile of queries against all ``M`` keys of its head: exact softmax in one tile."""
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(N, BLOCK_M)
    bh = pid // m_tiles
    b = bh // H
    hh = bh % H
    offs_m = (pid % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < M
    mask_md = (offs_m < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    # all M keys and values of the head, zero-padded to one (BLOCK_N, BLOCK_D) tile each
    kv_mask = mask_n[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kb + hh.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hh.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + hh.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
    # softmax_m(scale q_i . k_m) over the whole row at once (padding keys get probability 0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    s = tl.where(mask_n[None, :], s, float("-inf"))
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    p = p * (1.0 / tl.sum(p, axis=1))[:, None]
    o = tl.dot(p.to(v.dtype), v, input_precision=PREC)
    rows = bh.to(tl.int64) * N + offs_m
    tl.store(O + rows[:, None] * HEAD_DIM + offs_d[None, :], o.to(O.dtype.element_ty), mask=mask_md)


@kernel
def _attn_bwd_kernel(Q, K, V, DO, DQ, PDK, PDV, scale, H, N, M, HEAD_DIM, rows_per_split, num_splits,
                     stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_dob, stride_doh, stride_don, stride_dod,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PREC: tl.constexpr):
    """One (batch, head) x one range of query rows: dq for those rows, partial dk and dv over them.

    Every key is in the tile, so each row's softmax is recomputed whole (max and sum included)
    and ``delta_i = sum_m p_im dp_im`` (``= do_i . o_i``) comes from the same tile.
    """
    pid = tl.program_id(0)
    bh = pid // num_splits
    split = pid % num_splits
    b = bh // H
    hh = bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < M
    mask_d = offs_d < HEAD_DIM
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kb + hh.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hh.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    q_base = Q + b.to(tl.int64) * stride_qb + hh.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + hh.to(tl.int64) * stride_doh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, N)
    for m0 in range(start, end, BLOCK_M):  # cost: main
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0)
        # the same row softmax as the forward, recomputed whole; rows past the range get p = 0
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        p = tl.exp(s - tl.max(s, axis=1)[:, None])
        p = tl.where(mask_m[:, None], p * (1.0 / tl.sum(p, axis=1))[:, None], 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v.to(do.dtype)), input_precision=PREC)
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC) * scale
        rows = bh.to(tl.int64) * N + offs_m
        tl.store(DQ + rows[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=mask_md)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    # one range (num_splits == 1): PDK / PDV are dk and dv themselves, in their dtype; else float32 partials
    part = (pid.to(tl.int64) * M + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(PDK + part, (dk * scale).to(PDK.dtype.element_ty), mask=kv_mask)
    tl.store(PDV + part, dv.to(PDV.dtype.element_ty), mask=kv_mask)


@kernel
def _attn_bwd_reduce_kernel(PDK, PDV, DK, DV, num_splits, MD, BLOCK: tl.constexpr):
    """dk and dv of one (batch, head), ``BLOCK`` elements of each: the sum of the query ranges'
    float32 partials, stored in the outputs' dtype (one launch for both)."""
    bh = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MD
    acc_k = tl.zeros([BLOCK], tl.float32)
    acc_v = tl.zeros([BLOCK], tl.float32)
    for sp in range(0, num_splits):
        part = (bh * num_splits + sp) * MD + offs
        acc_k += tl.load(PDK + part, mask=mask, other=0.0)
        acc_v += tl.load(PDV + part, mask=mask, other=0.0)
    tl.store(DK + bh * MD + offs, acc_k.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + bh * MD + offs, acc_v.to(DV.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launch helpers: the configuration of a unit (pinned, single or timed), split sizes
# ---------------------------------------------------------------------------------------------

def _require_cuda(t: torch.Tensor) -> None:
    if not t.is_cuda and not _launch.is_recording():
        raise RuntimeError("the cluster_attention Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 "
                           "to run them on CPU tensors in Triton's interpreter")


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def _split_size(total: int, programs: int, t: torch.Tensor, interp: bool, key: str,
                override: Optional[int]) -> Tuple[int, int]:
    """Rows (tokens or queries) per split and the number of splits, so ``programs * splits`` fills the GPU."""
    if override is not None:
        size = max(1, int(override))
    elif interp:
        size = _INTERP[key]
    else:
        want = triton.cdiv(2 * _launch.num_sms(t.device), max(1, programs))
        splits = max(1, min(want, triton.cdiv(total, 256)))  # at least 256 rows of work per program
        size = triton.cdiv(triton.cdiv(total, splits), 128) * 128  # whole tiles for every tuned block size
    size = min(size, total)
    return size, triton.cdiv(total, size)


def attn_tile_fits(block_m: int, block_n: int, block_d: int) -> bool:
    """Whether a query tile of ``block_m`` rows against ``block_n`` keys of width ``block_d`` fits in registers."""
    return block_m * max(block_n, block_d) <= 128 * 128


def _attn_tiles(M: int, D: int):
    """The attention's key tile (all ``M`` clusters), padded head width, and the filter that keeps
    the query tiles whose score and operand tiles fit in registers (:func:`attn_tile_fits`)."""
    bn, bd = _pow2(M), _pow2(D)
    return bn, bd, lambda cfg: attn_tile_fits(cfg["BLOCK_M"], bn, bd)


def _select(unit: str, t: torch.Tensor, width: int, key: tuple, run, fits=None) -> _launch.LaunchConfig:
    """The configuration of ``unit`` for this call (:func:`vitpatch.kernels._launch.select`, timed
    over the clean candidates on a GPU, keyed on the sizes that change the best one)."""
    if not interpreting():
        _require_cuda(t)
    return _launch.select(unit, t.dtype, width, key=key, device=t.device, run=run, fits=fits)


# ---------------------------------------------------------------------------------------------
# launchers (tensors in, tensors out)
# ---------------------------------------------------------------------------------------------

def logits_width(logits: torch.Tensor) -> int:
    """How many columns of each ``(B, n, M)`` logits row the pooling kernels may read: ``M``, or the
    padded width when the rows are cluster-contiguous, 16-element aligned and lie in storage that
    holds the padding (:func:`vitpatch.nn.cluster_logits` writes them so). A width divisible by 16
    lets the kernels load the logits as 16-byte vectors (and pipeline them); Triton specialises on it."""
    B, n, M = logits.shape
    width = logits.stride(1)
    if logits.stride(2) != 1 or width <= M or width % 16 or n == 0 or B == 0:
        return M
    end = logits.storage_offset() + (B - 1) * logits.stride(0) + n * width  # one past the last padded row
    return width if end * logits.element_size() <= logits.untyped_storage().nbytes() else M


def _pool_tiles(M: int, C: int, interp: bool) -> Tuple[int, int]:
    if interp:
        return min(_INTERP["pool_block_m"], _pow2(M)), min(_INTERP["pool_block_c"], _pow2(C))
    return min(64, _pow2(M)), min(128, _pow2(C))


def _pool_forward(logits: torch.Tensor, x: torch.Tensor, *, tokens_per_split: Optional[int] = None):
    """``(z (B, M, C) in x's dtype, stats (2, B, M) float32)``; ``tokens_per_split`` overrides the split size.

    ``stats[0]`` is each cluster's largest logit ``mx_m``, ``stats[1]`` is ``log sum_i exp(logits_im - mx_m)``,
    so ``lse_m = stats[0] + stats[1]``. Keeping the two apart lets backward form
    ``(logits_im - mx_m) - stats[1]`` without the rounding of a large ``lse_m`` to float32.
    """
    B, n, M = logits.shape
    C = x.shape[2]
    z = torch.empty((B, M, C), dtype=x.dtype, device=x.device)
    stats = torch.empty((2, B, M), dtype=torch.float32, device=x.device)
    if B == 0 or C == 0:  # nothing to pool (backward of an empty z gives zero gradients)
        return z, stats.zero_()
    interp = interpreting()
    bm, bc = _pool_tiles(M, C, interp)
    m_tiles, c_tiles = triton.cdiv(M, bm), triton.cdiv(C, bc)
    tps, splits = _split_size(n, B * m_tiles * c_tiles, x, interp, "pool_split", tokens_per_split)
    single = splits == 1
    if single:
        pacc = pmax = psum = z  # unused
    else:
        pacc = torch.empty((B, splits, M, C), dtype=torch.float32, device=x.device)
        pmax = torch.empty((B, splits, M), dtype=torch.float32, device=x.device)
        psum = torch.empty((B, splits, M), dtype=torch.float32, device=x.device)

    width = logits_width(logits)

    def pool(cfg):
        _pool_fwd_kernel[(B * m_tiles, splits, c_tiles)](
            L=logits, X=x, Z=z, STATS=stats, PACC=pacc, PMAX=pmax, PSUM=psum, n=n, M=M, M_pad=width, C=C,
            tokens_per_split=tps, num_splits=splits, plane=B * M, **strides("l", logits, "bnm"),
            **strides("x", x, "bnc"), BLOCK_M=bm, BLOCK_C=bc, SINGLE=single, PREC=dot_precision(x.dtype),
            **keywords(cfg))

    pool(_select("paca_pool_fwd", x, C, (n, M, C), pool))
    if not single:
        _pool_combine_kernel[(B * m_tiles, c_tiles)](Z=z, STATS=stats, PACC=pacc, PMAX=pmax, PSUM=psum, M=M, C=C,
                                                     num_splits=splits, plane=B * M, BLOCK_M=bm, BLOCK_C=bc)
    return z, stats


def _pool_backward(dz, logits, x, z, stats):
    """``(dlogits, dx)`` from the saved per-cluster softmax statistics; probabilities recomputed on the fly."""
    B, n, M = logits.shape
    C = x.shape[2]
    dz = dz.to(x.dtype)
    z, stats = z.contiguous(), stats.contiguous()  # written by the forward (contiguous): no copy
    dlogits = torch.empty((B, n, M), dtype=logits.dtype, device=logits.device)
    dx = torch.empty((B, n, C), dtype=x.dtype, device=x.device)
    if B == 0:
        return dlogits, dx
    if C == 0:  # z is empty, so nothing depends on the logits
        return dlogits.zero_(), dx
    bm, bc = _pool_tiles(M, C, interpreting())
    prec = dot_precision(x.dtype)
    m_tiles, c_tiles = triton.cdiv(M, bm), triton.cdiv(C, bc)
    common = dict(L=logits, DZ=dz, STATS=stats, n=n, M=M, M_pad=logits_width(logits), C=C, plane=B * M,
                  **strides("l", logits, "bnm"), **strides("dz", dz, "bmc"), BLOCK_M=bm, BLOCK_C=bc, PREC=prec)

    def grad_logits(cfg):
        _pool_bwd_dlogits_kernel[(B * m_tiles, triton.cdiv(n, cfg["BLOCK_N"]))](
            X=x, Z=z, DL=dlogits, **strides("x", x, "bnc"), **common, **keywords(cfg))

    def grad_x(cfg):
        _pool_bwd_dx_kernel[(B * triton.cdiv(n, cfg["BLOCK_N"]), c_tiles)](DX=dx, **common, **keywords(cfg))

    grad_logits(_select("paca_pool_dlogits", x, C, (n, M, C), grad_logits))
    grad_x(_select("paca_pool_dx", x, C, (n, M, C), grad_x))
    return dlogits, dx


def _attn_forward(q, k, v, scale: float):
    """``out (B, h, N, d)`` in q's dtype."""
    B, H, N, D = q.shape
    M = k.shape[2]
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    if B * H * N == 0:
        return out
    bn, bd, fits = _attn_tiles(M, D)

    def attend(cfg):
        _attn_fwd_kernel[(B * H * triton.cdiv(N, cfg["BLOCK_M"]),)](
            Q=q, K=k, V=v, O=out, scale=scale, H=H, N=N, M=M, HEAD_DIM=D, **strides("q", q), **strides("k", k),
            **strides("v", v), BLOCK_N=bn, BLOCK_D=bd, PREC=dot_precision(q.dtype), **keywords(cfg))

    attend(_select("paca_attn_fwd", q, D, (N, M), attend, fits))
    return out


def _attn_backward(do, q, k, v, scale: float, *, rows_per_split: Optional[int] = None):
    """``(dq, dk, dv)``: dq per query tile, dk and dv summed over query ranges (see the module docstring)."""
    B, H, N, D = q.shape
    M = k.shape[2]
    do = do.to(q.dtype)
    dq = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    if B * H == 0 or N == 0:
        return dq, torch.zeros((B, H, M, D), dtype=k.dtype, device=k.device), \
            torch.zeros((B, H, M, D), dtype=v.dtype, device=v.device)
    interp = interpreting()
    rps, splits = _split_size(N, B * H, q, interp, "attn_split", rows_per_split)
    dk = torch.empty((B, H, M, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, M, D), dtype=v.dtype, device=v.device)
    if splits == 1:  # the kernel writes dk and dv themselves
        pdk, pdv = dk, dv
    else:
        pdk = torch.empty((B * H, splits, M, D), dtype=torch.float32, device=q.device)
        pdv = torch.empty((B * H, splits, M, D), dtype=torch.float32, device=q.device)
    bn, bd, fits = _attn_tiles(M, D)

    def grad(cfg):
        _attn_bwd_kernel[(B * H * splits,)](
            Q=q, K=k, V=v, DO=do, DQ=dq, PDK=pdk, PDV=pdv, scale=scale, H=H, N=N, M=M, HEAD_DIM=D,
            rows_per_split=rps, num_splits=splits, **strides("q", q), **strides("k", k), **strides("v", v),
            **strides("do", do), BLOCK_N=bn, BLOCK_D=bd, PREC=dot_precision(q.dtype), **keywords(cfg))

    grad(_select("paca_attn_bwd", q, D, (N, M), grad, fits))
    if splits > 1:  # one launch sums the ranges' partials of dk and dv
        block = 256 if interp else 1024
        _attn_bwd_reduce_kernel[(B * H, triton.cdiv(M * D, block))](PDK=pdk, PDV=pdv, DK=dk, DV=dv,
                                                                   num_splits=splits, MD=M * D, BLOCK=block)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: fake implementations and autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("vitpatch::cluster_pool_fwd", mutates_args=())
def _pool_fwd_op(logits: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _pool_forward(logits, x)


@_pool_fwd_op.register_fake
def _(logits, x):
    B, n, M = logits.shape
    return x.new_empty((B, M, x.shape[2])), x.new_empty((2, B, M), dtype=torch.float32)


@torch.library.custom_op("vitpatch::cluster_pool_bwd", mutates_args=())
def _pool_bwd_op(dz: torch.Tensor, logits: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
                 stats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _pool_backward(dz, logits, x, z, stats)


@_pool_bwd_op.register_fake
def _(dz, logits, x, z, stats):
    return logits.new_empty(logits.shape), x.new_empty(x.shape)


def _pool_setup_context(ctx, inputs, output):
    logits, x = inputs
    z, stats = output
    ctx.save_for_backward(logits, x, z, stats)
    ctx.mark_non_differentiable(stats)


def _pool_grad(ctx, dz, _dstats):
    logits, x, z, stats = ctx.saved_tensors
    return tuple(torch.ops.vitpatch.cluster_pool_bwd(dz, logits, x, z, stats))


_pool_fwd_op.register_autograd(_pool_grad, setup_context=_pool_setup_context)


@torch.library.custom_op("vitpatch::cluster_attention_fwd", mutates_args=())
def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return _attn_forward(q, k, v, scale)


@_attn_fwd_op.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("vitpatch::cluster_attention_bwd", mutates_args=())
def _attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attn_backward(do, q, k, v, scale)


@_attn_bwd_op.register_fake
def _(do, q, k, v, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _attn_grad(ctx, do):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = torch.ops.vitpatch.cluster_attention_bwd(do, q, k, v, ctx.scale)
    return dq, dk, dv, None


_attn_fwd_op.register_autograd(_attn_grad, setup_context=_attn_setup_context)


# ---------------------------------------------------------------------------------------------
# the interface vitpatch._backend calls
# ---------------------------------------------------------------------------------------------

def cluster_pool(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Cluster pooling ``z[b, m] = sum_i softmax_i(logits[b, :, m])_i x[b, i]`` (paper 004 eq. 7–8, docs/math.md §7).

    ``logits (B, n, M)``, ``x (B, n, C)`` (same dtype: float32, float16 or bfloat16; any strides)
    → ``(B, M, C)`` in x's dtype. Differentiable in ``logits`` and ``x``; the softmax over the
    tokens is never materialised (split-K online softmax forward, recomputed in backward).
    """
    return torch.ops.vitpatch.cluster_pool_fwd(logits, x)[0]


def cluster_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``out_i = sum_m softmax_m(scale q_i . k_m) v_m`` over the ``M`` cluster tokens (paper 004 §3.3, docs/math.md §7).

    ``q (B, h, N, d)``, ``k, v (B, h, M, d)`` with ``M <= 256`` and ``d <= 128`` → ``(B, h, N, d)``
    in q's dtype. Differentiable in ``q``, ``k`` and ``v``.
    """
    return torch.ops.vitpatch.cluster_attention_fwd(q, k, v, float(scale))


def _dtype_reason(t: torch.Tensor, name: str) -> Optional[str]:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"{name} has dtype {t.dtype}; the kernels take float32, float16 or bfloat16"
    return None


def cluster_pool_unsupported(logits: torch.Tensor, x: torch.Tensor) -> Optional[str]:
    """Why the pooling kernels cannot run these (validated) inputs, or ``None`` when they can."""
    return _dtype_reason(x, "x") or _launch.supports(("paca_pool_fwd", "paca_pool_dlogits", "paca_pool_dx"),
                                                      x.dtype, x.shape[2])


def cluster_attention_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Optional[str]:
    """Why the attention kernels cannot run these (validated) inputs, or ``None`` when they can.

    They hold all keys of a head in one tile: ``M <= 256``; head width ``d <= 128``.
    """
    reason = _dtype_reason(q, "q")
    if reason:
        return reason
    if k.shape[2] > MAX_CLUSTERS:
        return f"{k.shape[2]} keys > {MAX_CLUSTERS} (all keys of a head must fit in one tile)"
    if q.shape[3] > MAX_HEAD_DIM:
        return f"head width {q.shape[3]} > {MAX_HEAD_DIM}"
    return _launch.supports(("paca_attn_fwd", "paca_attn_bwd"), q.dtype, q.shape[3])
