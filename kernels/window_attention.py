"""Window-masked attention (AWD-ViT, paper 000 §4.1 eq. 4; docs/math.md §1) as Triton kernels.

Query ``i`` attends to key ``j`` iff ``key_keep[b, j]`` and (``i < P`` or ``j < P`` or patch
``j - P`` lies inside ``windows[b, i - P]``)::

    out_i = sum_j softmax_j(scale * q_i . k_j over allowed j) v_j

FlashAttention-style: one program per (query tile, head, image) keeps a running max ``m``,
normaliser ``l`` and an fp32 accumulator (online softmax, base 2) and visits key tiles one at a
time; the backward pass recomputes the probabilities from the saved log-sum-exp
``lse_i = m_i + log2 l_i`` (``+inf`` for a query with no allowed key, so its probabilities,
output and gradients are exactly zero, never NaN). Separate kernels give ``dq`` (per query
tile) and ``dk, dv`` (per key tile), so no atomics are needed.

The mask is never stored, neither dense nor per tile element: the kernels evaluate it from the
``O(n)`` windows and visit only the key tiles the schedule of
:mod:`vitpatch.kernels.window_schedule` lists for their query tile (masked tiles with the
element mask, full tiles without it; the backward's ``dk, dv`` kernel reads the transposed
lists). Launch configurations come from the policy in :mod:`vitpatch.kernels._launch` (units
``window_fwd`` and ``window_bwd``); since the schedule depends on the block sizes, the
configuration is tuned here, schedule build included (:func:`_pick_config`), not by
``triton.autotune``.

The kernel entry points take raw tensors and sizes (windows, ``key_keep``, grid, prefix count);
``vitpatch.functional`` unpacks a ``WindowMask`` into them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import dot_precision, helper, interpreting, kernel
from .window_schedule import Config, Schedule, _prefix_block, _query_patch, _slot_patch, cached_schedule

__all__ = ["window_attention", "window_attention_unsupported", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (16, 128)
_LOG2E = 1.4426950408889634


@helper
def _load_rows(base, tok, valid, s_n, d_off, dmask):
    """Rows ``tok`` of an ``(N, d)`` slice: zeros where not ``valid`` and past the head width."""
    return tl.load(base + tok[:, None] * s_n + d_off[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)


@helper
def _patch_keys(kt, keep_b, P, GH, GW, NBX, BN: tl.constexpr, ORDER: tl.constexpr, TW: tl.constexpr,
                TH: tl.constexpr, HAS_KEEP: tl.constexpr, FULL: tl.constexpr = False):
    """Key tile ``kt``: ``(tokens, x0, y0, lx, ly, valid, allowed)``, the key at lane ``j`` being the
    patch at column ``x0 + lx[j]``, row ``y0 + ly[j]`` (allowed: valid and kept).

    In the tiled layout, when ``BN`` divides a ``TW x TH`` unit, a tile is ``BN / TW`` rows of one
    unit: ``x0, y0`` are scalars (one division by the run-time unit count ``NBX`` per tile) and
    ``lx, ly`` depend on the lane alone (``j % TW``, ``j // TW``: compile-time shifts), so window
    tests against them need per-row bounds relative to ``x0, y0`` and no per-element division.
    Otherwise ``x0 = y0 = 0`` and ``lx, ly`` are the patch coordinates. Padding lanes get a column
    or row outside the grid, so they lie outside every window. ``FULL``: a tile the
    schedule found inside every window of its query tile, which holds no padding and no dropped key
    (its validity is not computed: every lane is a patch).
    """
    j = tl.arange(0, BN)
    if ORDER == 1 and (TW * TH) % BN == 0:
        first = kt * BN
        blk = first // (TW * TH)
        x0 = (blk % NBX) * TW
        y0 = (blk // NBX) * TH + (first % (TW * TH)) // TW
        lx = j % TW
        ly = j // TW
        kx = x0 + lx
        ky = y0 + ly
        if FULL:
            kv = lx >= 0
            kp = ky * GW + kx
        else:
            kv = (kx < GW) & (ky < GH)
            kp = tl.where(kv, ky * GW + kx, 0)
    else:
        kp, lx, ly, kv = _slot_patch(kt * BN + j, GH, GW, NBX, ORDER, TW, TH)
        lx = tl.where(kv, lx, GW)  # padding lies outside every window (as in the tiled layout)
        x0 = 0
        y0 = 0
    kok = kv
    if HAS_KEEP:
        kok = kv & (tl.load(keep_b + P + kp, mask=kv, other=0) != 0)
    return P + kp, x0, y0, lx, ly, kv, kok


@helper
def _prefix_keys(p0, keep_b, P, PB: tl.constexpr, HAS_KEEP: tl.constexpr):
    """Token index, validity and allowed-ness of the prefix block starting at ``p0``."""
    tok = p0 + tl.arange(0, PB)
    kv = tok < P
    kok = kv
    if HAS_KEEP:
        kok = kv & (tl.load(keep_b + tok, mask=kv, other=0) != 0)
    return tok, kv, kok


@helper
def _load_window(WIN, win_b, pq, qv):
    wp = WIN + win_b + pq * 4
    return (tl.load(wp + 0, mask=qv, other=0), tl.load(wp + 1, mask=qv, other=0),
            tl.load(wp + 2, mask=qv, other=0), tl.load(wp + 3, mask=qv, other=0))


@helper
def _window_bias(wx0, wy0, wx1, wy1, kx, ky):
    """``[BM, BN]`` float: 0 where key ``(kx, ky)`` lies inside the query's window, ``-inf`` elsewhere
    (docs/math.md §1), as the sum of a column term and a row term. Added to the scores, it masks
    with two additions per element; each term depends on a query row and one lane coordinate, of
    which a thread holds few distinct values (coordinates relative to the key tile's origin, see
    :func:`_patch_keys`)."""
    bx = tl.where((kx[None, :] >= wx0[:, None]) & (kx[None, :] <= wx1[:, None]), 0.0, float("-inf"))
    by = tl.where((ky[None, :] >= wy0[:, None]) & (ky[None, :] <= wy1[:, None]), 0.0, float("-inf"))
    return bx + by


@helper
def _keep_bias(kok):
    """``[1, BN]``: 0 for allowed keys, ``-inf`` for padding and dropped ones."""
    return tl.where(kok, 0.0, float("-inf"))[None, :]


@helper
def _online_step_unmasked(acc, m_i, l_i, s, qk_scale, v, DOT_PREC: tl.constexpr):
    """:func:`_online_step` for a tile without masked scores: ``s`` unscaled (``qk_scale > 0`` is
    applied to the row maximum, and to the scores inside the ``exp2`` argument by one fused
    multiply-add per element); every row gets a finite maximum."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@helper
def _online_step(acc, m_i, l_i, s, v, DOT_PREC: tl.constexpr):
    """One key tile of the online softmax (base 2; ``s`` already scaled, ``-inf`` where not allowed)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@kernel
def _fwd_kernel(Q, K, V, O, LSE, WIN, KEEP, PERM, CHOICE, LIST, CNT, REC,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                H, N, P, GH, GW, NBX, TQ, TK, BS, win_sb, keep_sb, perm_sb, sched_sb, qk_scale,
                HEAD_D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PB: tl.constexpr,
                ORDER: tl.constexpr, TW: tl.constexpr, TH: tl.constexpr, HAS_KEEP: tl.constexpr,
                QMODE: tl.constexpr, PREFIX_Q: tl.constexpr, RECORD: tl.constexpr, DOT_PREC: tl.constexpr):
    """Forward of one query tile (patch slots, or with ``PREFIX_Q`` a block of prefix queries) of one head."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < HEAD_D
    kd = offs_d * skd
    vd = offs_d * svd
    keep_b = KEEP + b * keep_sb
    Kb = K + b64 * skb + h * skh
    Vb = V + b64 * svb + h * svh
    bsch = b * sched_sb
    if PREFIX_Q:
        tok_q = pid * BM + tl.arange(0, BM)
        qv = tok_q < P
    else:
        vsel = 0
        if QMODE == 2:
            vsel = tl.load(CHOICE + bsch)
        pq, qv = _query_patch(pid * BM + tl.arange(0, BM), PERM + b * perm_sb, TQ * BM, GH, GW, NBX, vsel != 0,
                              ORDER, TW, TH, QMODE)
        tok_q = P + pq
        wx0, wy0, wx1, wy1 = _load_window(WIN, b * win_sb, pq, qv)
    q = _load_rows(Q + b64 * sqb + h * sqh, tok_q, qv, sqn, offs_d * sqd, dmask)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    # prefix keys: every query attends them (minus dropped ones)
    for p0 in range(0, P, PB):  # cost: prefix
        tok_k, kv, kok = _prefix_keys(p0, keep_b, P, PB, HAS_KEEP)
        k = _load_rows(Kb, tok_k, kv, skn, kd, dmask)
        v = _load_rows(Vb, tok_k, kv, svn, vd, dmask)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(kok[None, :], s, float("-inf"))
        acc, m_i, l_i = _online_step(acc, m_i, l_i, s, v, DOT_PREC)
    if PREFIX_Q:
        # prefix queries attend every patch key: all tiles, mask = valid and kept
        for kt in range(0, TK):  # cost: prefix_query
            tok_k, _, _, _, _, kv, kok = _patch_keys(kt, keep_b, P, GH, GW, NBX, BN, ORDER, TW, TH, HAS_KEEP)
            k = _load_rows(Kb, tok_k, kv, skn, kd, dmask)
            v = _load_rows(Vb, tok_k, kv, svn, vd, dmask)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            s = tl.where(kok[None, :], s, float("-inf"))
            acc, m_i, l_i = _online_step(acc, m_i, l_i, s, v, DOT_PREC)
    else:
        row = (vsel * BS + bsch) * TQ + pid
        n_m = tl.load(CNT + row * 2)
        n_f = tl.load(CNT + row * 2 + 1)
        rec = REC + ((b * H + h) * TQ + pid) * TK
        # key tiles that cut some window (or hold padding / dropped keys): element mask
        lst = LIST + row * TK
        kt_next = tl.load(lst)  # each list entry is read one iteration ahead of its use
        for i in range(0, n_m):  # cost: masked
            kt = kt_next
            kt_next = tl.load(lst + tl.minimum(i + 1, TK - 1))
            tok_k, x0, y0, lx, ly, kv, kok = _patch_keys(kt, keep_b, P, GH, GW, NBX, BN, ORDER, TW, TH, HAS_KEEP)
            k = _load_rows(Kb, tok_k, kv, skn, kd, dmask)
            v = _load_rows(Vb, tok_k, kv, svn, vd, dmask)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            s += _window_bias(wx0 - x0, wy0 - y0, wx1 - x0, wy1 - y0, lx, ly)
            if HAS_KEEP:
                s = tl.where(kok[None, :], s, float("-inf"))
            acc, m_i, l_i = _online_step(acc, m_i, l_i, s, v, DOT_PREC)
            if RECORD:
                tl.store(rec + kt, 1)
        # key tiles inside every window of the query tile: no element mask
        kt_next = tl.load(lst + TK - n_f)
        for i in range(TK - n_f, TK):  # cost: full
            kt = kt_next
            kt_next = tl.load(lst + tl.minimum(i + 1, TK - 1))
            tok_k, _, _, _, _, kv, _ = _patch_keys(kt, keep_b, P, GH, GW, NBX, BN, ORDER, TW, TH, False, True)
            k = _load_rows(Kb, tok_k, kv, skn, kd, dmask)
            v = _load_rows(Vb, tok_k, kv, svn, vd, dmask)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            acc, m_i, l_i = _online_step_unmasked(acc, m_i, l_i, s, qk_scale, v, DOT_PREC)
            if RECORD:
                tl.store(rec + kt, 2)
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, m_i + tl.math.log2(l_safe), float("inf"))
    ob = O + b64 * sob + h * soh
    tl.store(ob + tok_q[:, None] * son + (offs_d * sod)[None, :], out.to(O.dtype.element_ty),
             mask=qv[:, None] & dmask[None, :])
    tl.store(LSE + (b64 * H + h) * N + tok_q, lse, mask=qv)


@kernel
def _delta_kernel(O, DO, DELTA, sob, soh, son, sod, sdb, sdh, sdn, sdd, H, N,
                  HEAD_D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    """``delta_i = sum_d out_i * dout_i`` (fp32): the row term of the softmax gradient."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < HEAD_D
    valid = rows < N
    o = _load_rows(O + b * sob + h * soh, rows, valid, son, offs_d * sod, dmask).to(tl.float32)
    do = _load_rows(DO + b * sdb + h * sdh, rows, valid, sdn, offs_d * sdd, dmask).to(tl.float32)
    tl.store(DELTA + (b * H + h) * N + rows, tl.sum(o * do, 1), mask=valid)


@helper
def _dq_step(dq, q, do, lse, delta, k, v, bias, qk_scale, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """``dq += (p * (dout . v - delta)) k`` for one key tile (``p`` recomputed from ``lse``; with
    ``MASKED``, ``bias`` (0 or ``-inf``, broadcastable to the tile) is added to the scaled scores)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if MASKED:
        p = tl.math.exp2(s * qk_scale + bias - lse[:, None])
    else:
        p = tl.math.exp2(s * qk_scale - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)


@kernel
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, WIN, KEEP, PERM, CHOICE, LIST, CNT, REC,
                   sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
                   sgb, sgh, sgn, sgd, H, N, P, GH, GW, NBX, TQ, TK, BS, win_sb, keep_sb, perm_sb, sched_sb,
                   qk_scale, sm_scale,
                   HEAD_D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PB: tl.constexpr,
                   ORDER: tl.constexpr, TW: tl.constexpr, TH: tl.constexpr, HAS_KEEP: tl.constexpr,
                   QMODE: tl.constexpr, PREFIX_Q: tl.constexpr, RECORD: tl.constexpr, DOT_PREC: tl.constexpr):
    """``dq_i = scale * sum_j p_ij (dp_ij - delta_i) k_j`` over the key tiles query tile ``pid`` visits."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < HEAD_D
    kd = offs_d * skd
    vd = offs_d * svd
    keep_b = KEEP + b * keep_sb
    Kb = K + b64 * skb + h * skh
    Vb = V + b64 * svb + h * svh
    bsch = b * sched_sb
    if PREFIX_Q:
        tok_q = pid * BM + tl.arange(0, BM)
        qv = tok_q < P
    else:
        vsel = 0
        if QMODE == 2:
            vsel = tl.load(CHOICE + bsch)
        pq, qv = _query_patch(pid * BM + tl.arange(0, BM), PERM + b * perm_sb, TQ * BM, GH, GW, NBX, vsel != 0,
                              ORDER, TW, TH, QMODE)
        tok_q = P + pq
        wx0, wy0, wx1, wy1 = _load_window(WIN, b * win_sb, pq, qv)
    q = _load_rows(Q + b64 * sqb + h * sqh, tok_q, qv, sqn, offs_d * sqd, dmask)
    do = _load_rows(DO + b64 * sdb + h * sdh, tok_q, qv, sdn, offs_d * sdd, dmask)
    lse = tl.load(LSE + (b64 * H + h) * N + tok_q, mask=qv, other=float("inf"))
    delta = tl.load(DELTA + (b64 * H + h) * N + tok_q, mask=qv, other=0.0)
    dq = tl.zeros([BM, BD], tl.float32)
    for p0 in range(0, P, PB):  # cost: prefix
        tok_k, kv, kok = _prefix_keys(p0, keep_b, P, PB, HAS_KEEP)
        k = _load_rows(Kb, tok_k, kv, skn, kd, dmask)
        v = _load_rows(Vb, tok_k, kv, svn, vd, dmask)
        dq = _dq_step(dq, q, do, lse, delta, k, v, _keep_bias(kok), qk_scale, True, DOT_PREC)
    if PREFIX_Q:
        for kt in range(0, TK):  # cost: prefix_query
            tok_k, _, _, _, _, kv, kok = _patch_keys(kt, keep_b, P, GH, GW, NBX, BN, ORDER, TW, TH, HAS_KEEP)
            k = _load_rows(Kb, tok_k, kv, skn, kd, dmask)
            v = _load_rows(Vb, tok_k, kv, svn, vd, dmask)
            dq = _dq_step(dq, q, do, lse, delta, k, v, _keep_bias(kok), qk_scale, True, DOT_PREC)
    else:
        row = (vsel * BS + bsch) * TQ + pid
        n_m = tl.load(CNT + row * 2)
        n_f = tl.load(CNT + row * 2 + 1)
        rec = REC + ((b * H + h) * TQ + pid) * TK
        lst = LIST + row * TK
        kt_next = tl.load(lst)  # each list entry is read one iteration ahead of its use
        for i in range(0, n_m):  # cost: masked
            kt = kt_next
            kt_next = tl.load(lst + tl.minimum(i + 1, TK - 1))
            tok_k, x0, y0, lx, ly, kv, kok = _patch_keys(kt, keep_b, P, GH, GW, NBX, BN, ORDER, TW, TH, HAS_KEEP)
            k = _load_rows(Kb, tok_k, kv, skn, kd, dmask)
            v = _load_rows(Vb, tok_k, kv, svn, vd, dmask)
            bias = _window_bias(wx0 - x0, wy0 - y0, wx1 - x0, wy1 - y0, lx, ly)
            if HAS_KEEP:
                bias += _keep_bias(kok)
            dq = _dq_step(dq, q, do, lse, delta, k, v, bias, qk_scale, True, DOT_PREC)
            if RECORD:
                tl.store(rec + kt, 1)
        kt_next = tl.load(lst + TK - n_f)
        for i in range(TK - n_f, TK):  # cost: full
            kt = kt_next
            kt_next = tl.load(lst + tl.minimum(i + 1, TK - 1))
            tok_k, _, _, _, _, kv, _ = _patch_keys(kt, keep_b, P, GH, GW, NBX, BN, ORDER, TW, TH, False, True)
            k = _load_rows(Kb, tok_k, kv, skn, kd, dmask)
            v = _load_rows(Vb, tok_k, kv, svn, vd, dmask)
            dq = _dq_step(dq, q, do, lse, delta, k, v, 0.0, qk_scale, False, DOT_PREC)
            if RECORD:
                tl.store(rec + kt, 2)
    gb = DQ + b64 * sgb + h * sgh
    tl.store(gb + tok_q[:, None] * sgn + (offs_d * sgd)[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=qv[:, None] & dmask[None, :])


@helper
def _dkdv_step(dk, dv, q, do, lse, delta, k, v, bias, qk_scale, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """``dv += p^T dout`` and ``dk += (p * (dout . v - delta))^T q`` for one query tile (``bias`` as
    in :func:`_dq_step`)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if MASKED:
        p = tl.math.exp2(s * qk_scale + bias - lse[:, None])
    else:
        p = tl.math.exp2(s * qk_scale - lse[:, None])
    dv = dv + tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dk = dk + tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    return dk, dv


@helper
def _load_query_side(Qb, DOb, LSEb, DELTAb, tok_q, qv, sqn, sdn, qd, dd, dmask):
    q = _load_rows(Qb, tok_q, qv, sqn, qd, dmask)
    do = _load_rows(DOb, tok_q, qv, sdn, dd, dmask)
    lse = tl.load(LSEb + tok_q, mask=qv, other=float("inf"))
    delta = tl.load(DELTAb + tok_q, mask=qv, other=0.0)
    return q, do, lse, delta


@kernel
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, WIN, KEEP, PERM, CHOICE, LIST_T, CNT_T, REC,
                     sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
                     sgb, sgh, sgn, sgd, H, N, P, GH, GW, NBX, TQ, TK, BS, win_sb, keep_sb, perm_sb, sched_sb,
                     qk_scale, sm_scale,
                     HEAD_D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PB: tl.constexpr,
                     ORDER: tl.constexpr, TW: tl.constexpr, TH: tl.constexpr, HAS_KEEP: tl.constexpr,
                     QMODE: tl.constexpr, PREFIX_K: tl.constexpr, RECORD: tl.constexpr, DOT_PREC: tl.constexpr):
    """``dv_j = sum_i p_ij dout_i``, ``dk_j = scale * sum_i p_ij (dp_ij - delta_i) q_i`` over the
    query tiles that reach key tile ``pid`` (with ``PREFIX_K``, a block of prefix keys: every tile)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < HEAD_D
    qd = offs_d * sqd
    dd = offs_d * sdd
    keep_b = KEEP + b * keep_sb
    bsch = b * sched_sb
    vsel = 0
    if QMODE == 2:
        vsel = tl.load(CHOICE + bsch)
    perm_b = PERM + b * perm_sb
    if PREFIX_K:
        tok_k, kv, kok = _prefix_keys(pid * BN, keep_b, P, BN, HAS_KEEP)
    else:
        tok_k, x0, y0, lx, ly, kv, kok = _patch_keys(pid, keep_b, P, GH, GW, NBX, BN, ORDER, TW, TH, HAS_KEEP)
    k = _load_rows(K + b64 * skb + h * skh, tok_k, kv, skn, offs_d * skd, dmask)
    v = _load_rows(V + b64 * svb + h * svh, tok_k, kv, svn, offs_d * svd, dmask)
    Qb = Q + b64 * sqb + h * sqh
    DOb = DO + b64 * sdb + h * sdh
    LSEb = LSE + (b64 * H + h) * N
    DELTAb = DELTA + (b64 * H + h) * N
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    # prefix queries attend every key
    for p0 in range(0, P, PB):  # cost: prefix
        tok_q = p0 + tl.arange(0, PB)
        q, do, lse, delta = _load_query_side(Qb, DOb, LSEb, DELTAb, tok_q, tok_q < P, sqn, sdn, qd, dd, dmask)
        dk, dv = _dkdv_step(dk, dv, q, do, lse, delta, k, v, _keep_bias(kok), qk_scale, True, DOT_PREC)
    if PREFIX_K:
        # every patch query attends the prefix keys
        for qt in range(0, TQ):  # cost: prefix_query
            pq, qv = _query_patch(qt * BM + tl.arange(0, BM), perm_b, TQ * BM, GH, GW, NBX, vsel != 0, ORDER, TW, TH,
                                  QMODE)
            q, do, lse, delta = _load_query_side(Qb, DOb, LSEb, DELTAb, P + pq, qv, sqn, sdn, qd, dd, dmask)
            dk, dv = _dkdv_step(dk, dv, q, do, lse, delta, k, v, _keep_bias(kok), qk_scale, True, DOT_PREC)
    else:
        row = bsch * TK + pid
        n_m = tl.load(CNT_T + row * 2)
        n_f = tl.load(CNT_T + row * 2 + 1)
        rec = REC + ((b * H + h) * TK + pid) * TQ
        lst = LIST_T + row * TQ
        qt_next = tl.load(lst)  # each list entry is read one iteration ahead of its use
        for i in range(0, n_m):  # cost: masked
            qt = qt_next
            qt_next = tl.load(lst + tl.minimum(i + 1, TQ - 1))
            pq, qv = _query_patch(qt * BM + tl.arange(0, BM), perm_b, TQ * BM, GH, GW, NBX, vsel != 0, ORDER, TW, TH,
                                  QMODE)
            q, do, lse, delta = _load_query_side(Qb, DOb, LSEb, DELTAb, P + pq, qv, sqn, sdn, qd, dd, dmask)
            wx0, wy0, wx1, wy1 = _load_window(WIN, b * win_sb, pq, qv)
            bias = _window_bias(wx0 - x0, wy0 - y0, wx1 - x0, wy1 - y0, lx, ly)
            if HAS_KEEP:
                bias += _keep_bias(kok)
            dk, dv = _dkdv_step(dk, dv, q, do, lse, delta, k, v, bias, qk_scale, True, DOT_PREC)
            if RECORD:
                tl.store(rec + qt, 1)
        qt_next = tl.load(lst + TQ - n_f)
        for i in range(TQ - n_f, TQ):  # cost: full
            qt = qt_next
            qt_next = tl.load(lst + tl.minimum(i + 1, TQ - 1))
            pq, qv = _query_patch(qt * BM + tl.arange(0, BM), perm_b, TQ * BM, GH, GW, NBX, vsel != 0, ORDER, TW, TH,
                                  QMODE)
            q, do, lse, delta = _load_query_side(Qb, DOb, LSEb, DELTAb, P + pq, qv, sqn, sdn, qd, dd, dmask)
            dk, dv = _dkdv_step(dk, dv, q, do, lse, delta, k, v, 0.0, qk_scale, False, DOT_PREC)
            if RECORD:
                tl.store(rec + qt, 2)
    out_mask = kv[:, None] & dmask[None, :]
    g_off = b64 * sgb + h * sgh + tok_k[:, None] * sgn + (offs_d * sgd)[None, :]
    tl.store(DK + g_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=out_mask)



def _record_buffer(shape, record: bool, device) -> torch.Tensor:
    # visited-tile codes for tests (zeros = not visited); a dummy pointer, never written, otherwise
    return torch.zeros(shape, dtype=torch.int8, device=device) if record else torch.empty(1, dtype=torch.int8,
                                                                                          device=device)


def _constexprs(sched: Schedule, q: torch.Tensor, record: bool, cfg: Config) -> dict:
    """The launch's constexprs and, on a GPU, warps and stages of ``cfg`` (the schedule may have
    been built for a configuration that differs from it in those only)."""
    lay = sched.layout
    d = q.shape[-1]
    opts = {} if interpreting() else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return dict(HEAD_D=d, BD=max(16, triton.next_power_of_2(d)), PB=_prefix_block(sched.P), ORDER=lay.order,
                TW=lay.tw, TH=lay.th, HAS_KEEP=sched.keep_sb > 0, QMODE=sched.qmode, RECORD=record,
                DOT_PREC=dot_precision(q.dtype), **opts)


def _layout_args(sched: Schedule, H: int, N: int) -> tuple:
    gh, gw = sched.grid
    return (H, N, sched.P, gh, gw, sched.layout.nbx, sched.tq, sched.tk, sched.bs, sched.win_sb, sched.keep_sb,
            sched.perm_sb, int(sched.bs > 1))


def _forward(q, k, v, windows, key_keep, grid, P, scale, cfg: Config, record: bool = False, sched=None):
    """Launch the schedule and forward kernels: ``(out (B,h,N,d), lse (B,h,N) fp32 base 2, rec)``.

    ``record`` also returns ``rec (B, h, TQ, TK)`` int8, the code of every key tile each query
    tile's program actually visited (for tests); otherwise ``rec`` is ``None``.
    """
    B, H, N, d = q.shape
    if sched is None:
        sched = cached_schedule(windows, key_keep, grid, P, B, cfg)
    out = torch.empty((B, H, N, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    rec = _record_buffer((B, H, sched.tq, sched.tk), record, q.device)
    args = (q, k, v, out, lse, *sched.kernel_args, sched.lst, sched.cnt, rec, *q.stride(), *k.stride(), *v.stride(),
            *out.stride(), *_layout_args(sched, H, N), scale * _LOG2E)
    meta = _constexprs(sched, q, record, cfg)
    _fwd_kernel[(sched.tq, H, B)](*args, BM=cfg.block_m, BN=cfg.block_n, PREFIX_Q=False, **meta)
    if P:
        pb = meta["PB"]
        _fwd_kernel[(triton.cdiv(P, pb), H, B)](*args, BM=pb, BN=cfg.block_n, PREFIX_Q=True, **meta)
    return out, lse, (rec if record else None)


def _backward(dout, q, k, v, out, lse, windows, key_keep, grid, P, scale, cfg: Config, record: bool = False,
              sched=None):
    """Launch the backward kernels: ``(dq, dk, dv, rec_q, rec_k)`` (``rec_*`` only with ``record``).

    ``rec_q (B, h, TQ, TK)`` as in :func:`_forward` (from the ``dq`` kernel); ``rec_k (B, h, TK,
    TQ)`` the query tiles each key tile's ``dk, dv`` program visited.
    """
    B, H, N, d = q.shape
    if sched is None:
        sched = cached_schedule(windows, key_keep, grid, P, B, cfg)
    lst_t, cnt_t = sched.transposed()
    dev = q.device
    delta = torch.empty((B, H, N), dtype=torch.float32, device=dev)
    br = 16 if interpreting() else 64
    _delta_kernel[(triton.cdiv(N, br), H, B)](out, dout, delta, *out.stride(), *dout.stride(), H, N,
                                             HEAD_D=d, BD=max(16, triton.next_power_of_2(d)), BR=br)
    dq = torch.empty((B, H, N, d), dtype=q.dtype, device=dev)
    dk = torch.empty((B, H, N, d), dtype=k.dtype, device=dev)
    dv = torch.empty((B, H, N, d), dtype=v.dtype, device=dev)
    rec_q = _record_buffer((B, H, sched.tq, sched.tk), record, dev)
    rec_k = _record_buffer((B, H, sched.tk, sched.tq), record, dev)
    meta = _constexprs(sched, q, record, cfg)
    pb = meta["PB"]
    tail = (*_layout_args(sched, H, N), scale * _LOG2E, scale)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    dq_args = (q, k, v, dout, lse, delta, dq, *sched.kernel_args, sched.lst, sched.cnt, rec_q, *strides, *dq.stride(),
               *tail)
    _bwd_dq_kernel[(sched.tq, H, B)](*dq_args, BM=cfg.block_m, BN=cfg.block_n, PREFIX_Q=False, **meta)
    if P:
        _bwd_dq_kernel[(triton.cdiv(P, pb), H, B)](*dq_args, BM=pb, BN=cfg.block_n, PREFIX_Q=True, **meta)
    kv_args = (q, k, v, dout, lse, delta, dk, dv, *sched.kernel_args, lst_t, cnt_t, rec_k, *strides, *dk.stride(),
               *tail)
    _bwd_dkdv_kernel[(sched.tk, H, B)](*kv_args, BM=cfg.block_m, BN=cfg.block_n, PREFIX_K=False, **meta)
    if P:
        _bwd_dkdv_kernel[(triton.cdiv(P, pb), H, B)](*kv_args, BM=cfg.block_m, BN=pb, PREFIX_K=True, **meta)
    return dq, dk, dv, (rec_q if record else None), (rec_k if record else None)


# -------------------------------------------------------------------------------- autotuning
_TUNED: dict = {}


def _pick_config(kind: str, q: torch.Tensor, run) -> Config:
    """The launch config for ``kind`` (``"fwd"``/``"bwd"``) from the policy's unit ``window_<kind>``.

    In the interpreter (or under the compile gate's ``forcing``) the policy names one. On GPU,
    when several ship for the dtype and head width, every candidate runs once on the call's own
    inputs (schedule build included: it depends on the block sizes) under
    ``triton.testing.do_bench``; the fastest is kept per ``(kind, N, d, dtype, device)``.
    """
    B, H, N, d = q.shape
    cands = [Config.of(c) for c in _launch.configs(f"window_{kind}", q.dtype, d)]
    if len(cands) == 1:
        return cands[0]
    key = (kind, N, d, q.dtype, q.device.index)
    cfg = _TUNED.get(key)
    if cfg is None:
        best = None
        for cand in cands:
            try:
                t = triton.testing.do_bench(lambda: run(cand), warmup=3, rep=10)
            except triton.runtime.errors.OutOfResources:
                continue
            if best is None or t < best[0]:
                best = (t, cand)
        if best is None:
            raise RuntimeError(f"no window_attention {kind} config fits this device for d = {d}")
        cfg = _TUNED[key] = best[1]
    return cfg


# -------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("vitpatch::window_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: torch.Tensor,
                key_keep: Optional[torch.Tensor], grid_h: int, grid_w: int, num_prefix_tokens: int,
                scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    grid, P = (grid_h, grid_w), num_prefix_tokens
    cfg = _pick_config("fwd", q, lambda c: _forward(q, k, v, windows, key_keep, grid, P, scale, c))
    out, lse, _ = _forward(q, k, v, windows, key_keep, grid, P, scale, cfg)
    return out, lse


@_forward_op.register_fake
def _forward_fake(q, k, v, windows, key_keep, grid_h, grid_w, num_prefix_tokens, scale):
    B, H, N, d = q.shape
    return q.new_empty((B, H, N, d)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("vitpatch::window_attention_backward", mutates_args=())
def _backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, windows: torch.Tensor, key_keep: Optional[torch.Tensor], grid_h: int, grid_w: int,
                 num_prefix_tokens: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (dout, q, k, v, out, lse, windows, key_keep, (grid_h, grid_w), num_prefix_tokens, scale)
    cfg = _pick_config("bwd", q, lambda c: _backward(*args, c))
    dq, dk, dv, _, _ = _backward(*args, cfg)
    return dq, dk, dv


@_backward_op.register_fake
def _backward_fake(dout, q, k, v, out, lse, windows, key_keep, grid_h, grid_w, num_prefix_tokens, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, windows, key_keep, grid_h, grid_w, num_prefix_tokens, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, windows, key_keep)
    ctx.layout = (grid_h, grid_w, num_prefix_tokens, scale)


def _autograd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, windows, key_keep = ctx.saved_tensors
    dq, dk, dv = _backward_op(dout, q, k, v, out, lse, windows, key_keep, *ctx.layout)
    return dq, dk, dv, None, None, None, None, None, None


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ================================================================================ public
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: torch.Tensor,
                     key_keep: Optional[torch.Tensor], grid: Tuple[int, int], num_prefix_tokens: int,
                     scale: float) -> torch.Tensor:
    """Window-masked attention (docs/math.md §1, paper 000 §4.1 eq. 4) on validated inputs, ``(B, h, N, d)``.

    ``out_i = sum_j softmax_j(scale * q_i . k_j over allowed j) v_j`` with the allowed set of
    docs/math.md §1; a query with no allowed key outputs zeros with zero gradient. ``windows``
    int32 ``(n, 4)`` or ``(B, n, 4)``, ``key_keep`` bool ``(B, N)`` or ``None``, ``grid`` the
    patch grid ``(gh, gw)``. Differentiable in ``q, k, v`` through the
    ``vitpatch::window_attention_forward`` custom op (fake kernel and autograd registered, so
    ``torch.compile`` traces it without a graph break).
    """
    out, _ = torch.ops.vitpatch.window_attention_forward(q, k, v, windows, key_keep, grid[0], grid[1],
                                                         num_prefix_tokens, float(scale))
    return out


def window_attention_unsupported(q, k, v, windows, key_keep, grid, num_prefix_tokens, scale) -> Optional[str]:
    """Why the kernel cannot run these (validated) inputs, or ``None`` when it can."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16 and float32)"
    d = q.shape[-1]
    lo, hi = SUPPORTED_HEAD_DIMS
    if not lo <= d <= hi:
        return f"head width {d} (the kernel takes {lo} to {hi})"
    reason = _launch.supports(("window_fwd", "window_bwd"), q.dtype, d)
    if reason:
        return reason
    if not q.is_cuda:
        if not interpreting():
            return "CPU tensors need TRITON_INTERPRET=1"
        if q.dtype == torch.bfloat16:
            return "bfloat16 in Triton's CPU interpreter (numpy has no bfloat16)"
    return None
