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

The mask is never stored, neither dense nor per tile element: the kernels visit only the key
tiles the schedule of :mod:`vitpatch.kernels.window` lists for their query tile (the
backward's ``dk, dv`` kernel reads the transposed lists). A *full* tile (inside every window of
its query tile) runs without a mask; a *masked* tile adds the window bias as one more
tensor-core product (:func:`_mask_window`): the query rows' outside indicators for the tile's
grid columns and rows, read from the schedule's per-slot table, times a constant matrix of
per-lane masked scores. A disallowed score is a finite power of two far below every allowed one
(:func:`_masked_score`), so both kinds of tile share one online-softmax step. Query tiles read
their patches and windows from per-slot tables (one load per row, no layout arithmetic); list
entries are read ahead of their use, so the loops' copies pipeline (python -m bench.cost).
Launch configurations come from the policy in :mod:`vitpatch.kernels._launch` (units
``window_fwd`` and ``window_bwd``); since the schedule depends on the block sizes, the
configuration is timed with the schedule build included (:func:`_pick_config`).

The kernel entry points take raw tensors and sizes (windows, ``key_keep``, grid, prefix count);
``vitpatch.functional`` unpacks a ``WindowMask`` into them.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _launch
from ._flash import online_step
from ._launch import dot_precision, helper, interpreting, kernel, strides
from .window import Config, Schedule, cached_schedule
from .window.layout import _prefix_block, _slot_patch

__all__ = ["window_attention", "window_attention_unsupported", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (16, 128)
_LOG2E = 1.4426950408889634
# Masked scores. A score element that is not allowed is set (or lowered) to ``masked_score``, a
# finite power of two with ``masked_score * qk_scale = -2**60`` (:func:`_masked_score`), instead
# of ``-inf``: the window bias then comes from a tensor-core product (:func:`_mask_window`) and
# masked and full tiles share one softmax step. Allowed scaled scores are assumed above
# ``-2**50`` (``|scale * q . k| < 2**50 / log2(e)``); a row whose running maximum stays below
# ``_EMPTY_BELOW`` met no allowed key and outputs zeros.
_MASKED_SCALED = 2.0 ** 60
_EMPTY_BELOW = tl.constexpr(-2.0 ** 59)


@helper
def _load_rows(base, tok, valid, s_n, d_off, dmask):
    """Rows ``tok`` of an ``(N, d)`` slice: zeros where not ``valid`` and past the head width."""
    return tl.load(base + tok[:, None] * s_n + d_off[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)


@helper
def _load_real_rows(base, tok, s_n, d_off, dmask):
    """Rows ``tok`` of an ``(N, d)`` slice, every one a real token (a padding lane of a patch tile
    points at a real row, whose scores the window masks: ``p = 0``), zeros past the head width."""
    return tl.load(base + tok[:, None] * s_n + d_off[None, :], mask=dmask[None, :], other=0.0)


@helper
def _patch_keys(kt, keep_b, P, GH, GW, NBX, BLOCK_N: tl.constexpr, ORDER: tl.constexpr, TW: tl.constexpr,
                TH: tl.constexpr, HAS_KEEP: tl.constexpr, FULL: tl.constexpr = False):
    """Key tile ``kt``: ``(tokens, x0, y0, lx, ly, valid, allowed)``, the key at lane ``j`` being the
    patch at column ``x0 + lx[j]``, row ``y0 + ly[j]`` (allowed: valid and kept).

    In the tiled layout, when ``BLOCK_N`` divides a ``TW x TH`` unit, a tile is ``BLOCK_N / TW`` rows of one
    unit: ``x0, y0`` are scalars (one division by the run-time unit count ``NBX`` per tile) and
    ``lx, ly`` depend on the lane alone (``j % TW``, ``j // TW``: compile-time shifts), so window
    tests against them need per-row bounds relative to ``x0, y0`` and no per-element division.
    Otherwise ``x0 = y0 = 0`` and ``lx, ly`` are the patch coordinates. Padding lanes get a column
    or row outside the grid, so they lie outside every window. ``FULL``: a tile the
    schedule found inside every window of its query tile, which holds no padding and no dropped key
    (its validity is not computed: every lane is a patch).
    """
    j = tl.arange(0, BLOCK_N)
    if ORDER == 1 and (TW * TH) % BLOCK_N == 0:
        first = kt * BLOCK_N
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
        kp, lx, ly, kv = _slot_patch(kt * BLOCK_N + j, GH, GW, NBX, ORDER, TW, TH)
        lx = tl.where(kv, lx, GW)  # padding lies outside every window (as in the tiled layout)
        x0 = 0
        y0 = 0
    kok = kv
    if HAS_KEEP:
        kok = kv & (tl.load(keep_b + P + kp, mask=kv, other=0) != 0)
    return P + kp, x0, y0, lx, ly, kv, kok


@helper
def _prefix_keys(p0, keep_b, P, BLOCK_P: tl.constexpr, HAS_KEEP: tl.constexpr):
    """Token index, validity and allowed-ness of the prefix block starting at ``p0``."""
    tok = p0 + tl.arange(0, BLOCK_P)
    kv = tok < P
    kok = kv
    if HAS_KEEP:
        kok = kv & (tl.load(keep_b + tok, mask=kv, other=0) != 0)
    return tok, kv, kok


@helper
def _list_entry(lst, i, end):
    """Entry ``i`` of a visit list whose valid entries end before ``end`` (0 past it: a list is
    read ahead of its use, and its middle, between the masked and the full entries, is unset)."""
    return tl.load(lst + i, mask=i < end, other=0)


@helper
def _slot_query(qtab_b, slot):
    """Patch index and validity of query slots, read from the schedule's query table (``-1``:
    padding; ``Schedule.qtab``): one load per row, whatever the query order."""
    pq = tl.load(qtab_b + slot)
    qv = pq >= 0
    return tl.where(qv, pq, 0), qv


@helper
def _holds_query(qtab_b, first_slot):
    """Whether the query tile whose slots start at ``first_slot`` holds a query: one scalar load,
    since every query order fills a tile's slots from its start (``Schedule.qtab``). The empty tiles
    (the ``sorted`` cut's and ``grouped``'s unused ones) store nothing, so the dk/dv kernel's loop
    over every query tile skips them before loading their rows."""
    return tl.load(qtab_b + first_slot) >= 0


@helper
def _prefix_end(P, qv):
    """End of a query tile's prefix-key loop: ``P``, or 0 when the tile holds no query. Its row
    validity ``qv`` is in registers already; testing it (a reduction across the warps) left the
    sm_80 float32 forward at head width 128 spill-free where the first slot's load made it spill
    (python -m bench.compile)."""
    return tl.where(tl.max(qv.to(tl.int32), 0) > 0, P, 0)


@helper
def _slot_window(qwin_b, slot, BLOCK_M: tl.constexpr):
    """``(x0, y0, x1, y1)`` of the window of each query slot, from the schedule's slot-ordered
    window table (:func:`vitpatch.kernels.window.schedule._slot_tables`): one 16-byte load per row, no gather."""
    w = tl.load(qwin_b + slot[:, None] * 4 + tl.arange(0, 4)[None, :])
    xs, ys = tl.split(tl.reshape(w, (BLOCK_M, 2, 2)))
    x0, x1 = tl.split(xs)
    y0, y1 = tl.split(ys)
    return x0, y0, x1, y1


@helper
def _ext_cast(x, EXT_BF16: tl.constexpr):
    if EXT_BF16:
        y = x.to(tl.bfloat16)
    else:
        y = x
    return y


@helper
def _lane_masks(BLOCK_N: tl.constexpr, TW: tl.constexpr, KE: tl.constexpr, masked_score, EXT_BF16: tl.constexpr):
    """``[KE, BLOCK_N]``, the key side of the window bias as a product: column ``j`` holds
    ``masked_score`` at row ``j % TW`` (the key's column in its tile) and at row ``TW + j // TW``
    (its grid row in the tile), 0 elsewhere; the same for every tile of the tiled layout (see
    :func:`_patch_keys`)."""
    j = tl.arange(0, BLOCK_N)
    c = tl.arange(0, KE)
    hit = (c[:, None] == (j % TW)[None, :]) | (c[:, None] == (TW + j // TW)[None, :])
    return _ext_cast(tl.where(hit, masked_score, 0.0), EXT_BF16)


@helper
def _outside_cols(x0, y0, TW: tl.constexpr, KE: tl.constexpr, GWP: tl.constexpr, KA: tl.constexpr):
    """``[KE]``: the columns of the schedule's outside table
    (:func:`vitpatch.kernels.window.schedule._slot_tables`) that
    hold the key tile at ``(x0, y0)``: its ``TW`` grid columns, then its grid rows (columns past
    the tile's rows meet zeros of :func:`_lane_masks`; the table's rows have slack for them). Runs
    of ``TW`` contiguous columns, each starting at a multiple of ``KA`` (the tile origin's
    alignment): vector loads, copied asynchronously like ``q`` and ``k``."""
    c = tl.arange(0, KE)
    cols = tl.where(c < TW, x0 + c, GWP + y0 + c - TW)
    return tl.max_contiguous(tl.multiple_of(cols, KA), TW)


@helper
def _window_bias(wx0, wy0, wx1, wy1, kx, ky, masked_score):
    """``[BLOCK_M, BLOCK_N]``: 0 where key ``(kx, ky)`` lies inside the query's window, ``masked_score``
    (or twice it) elsewhere, element by element: the layouts whose tiles are not squares of one
    unit (row-major), where the product of :func:`_mask_window` does not apply."""
    bx = tl.where((kx[None, :] >= wx0[:, None]) & (kx[None, :] <= wx1[:, None]), 0.0, masked_score)
    by = tl.where((ky[None, :] >= wy0[:, None]) & (ky[None, :] <= wy1[:, None]), 0.0, masked_score)
    return bx + by


@helper
def _mask_window(s, out_rows, cols, win, x0, y0, lx, ly, kok, kmask, masked_score, EXT: tl.constexpr,
                 HAS_KEEP: tl.constexpr):
    """Unscaled scores ``s`` of a masked tile with the window (and dropped keys) applied: elements
    that are not allowed get ``masked_score`` or less.

    ``EXT``: the bias is one more tensor-core product accumulated onto the scores, the outside
    indicators of the query rows (``out_rows``: row pointers into the schedule's outside table,
    ``cols`` from :func:`_outside_cols`; a ``BLOCK_M x KE`` tile loaded like ``q``) times ``kmask``
    (:func:`_lane_masks`): ``masked_score`` times the number of the key's coordinates outside the
    query's window, with no per-element compare. Else ``win = (wx0, wy0, wx1, wy1)`` and
    :func:`_window_bias`, element by element."""
    if EXT:
        s = tl.dot(tl.load(out_rows + cols[None, :]), kmask, s)
    else:
        wx0, wy0, wx1, wy1 = win
        s += _window_bias(wx0 - x0, wy0 - y0, wx1 - x0, wy1 - y0, lx, ly, masked_score)
    return _mask_keys(s, kok, masked_score, HAS_KEEP)


@helper
def _mask_operands(qout_b, qwin_b, slots, masked_score, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TW: tl.constexpr,
                   KE: tl.constexpr, RW: tl.constexpr, EXT: tl.constexpr, EXT_BF16: tl.constexpr):
    """What the masked key tiles of query slots ``slots`` need (:func:`_mask_window`): with ``EXT``
    the per-lane masked scores and the slots' rows of the outside table, else their windows."""
    if EXT:
        kmask = _lane_masks(BLOCK_N, TW, KE, masked_score, EXT_BF16)
        out_rows = qout_b + slots[:, None] * RW
        win = 0
    else:
        kmask = 0
        out_rows = qout_b
        win = _slot_window(qwin_b, slots, BLOCK_M)
    return kmask, out_rows, win


@helper
def _mask_keys(s, kok, masked_score, HAS_KEEP: tl.constexpr):
    """``s`` with ``masked_score`` at padding and dropped keys (``kok`` false)."""
    if HAS_KEEP:
        s = tl.where(kok[None, :], s, masked_score)
    return s


@helper
def _key_tile(kt, q, Kb, Vb, keep_b, out_rows, win, kmask, masked_score, P, GH, GW, stride_kn, stride_vn, kd, vd, dmask,
              NBX: tl.constexpr, BLOCK_N: tl.constexpr, ORDER: tl.constexpr, TW: tl.constexpr, TH: tl.constexpr,
              KE: tl.constexpr, KA: tl.constexpr, EXT: tl.constexpr, HAS_KEEP: tl.constexpr, KIND: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """Key tile ``kt`` of the patch keys against a query tile's ``q``: ``(s, k, v)``, ``s`` the
    unscaled scores with what the tile needs masked. ``KIND`` 0: every valid and kept key allowed
    (prefix queries; padding lanes load zeros); 1: a masked tile of the schedule (the window,
    :func:`_mask_window`); 2: a full tile (nothing masked, no validity computed). The forward and
    dq kernels share it; their loops differ only in the step they take with the scores."""
    if KIND == 2:
        tok_k, x0, y0, lx, ly, kv, kok = _patch_keys(kt, keep_b, P, GH, GW, NBX, BLOCK_N, ORDER, TW, TH, False, True)
    else:
        tok_k, x0, y0, lx, ly, kv, kok = _patch_keys(kt, keep_b, P, GH, GW, NBX, BLOCK_N, ORDER, TW, TH, HAS_KEEP)
    if KIND == 0:
        k = _load_rows(Kb, tok_k, kv, stride_kn, kd, dmask)
        v = _load_rows(Vb, tok_k, kv, stride_vn, vd, dmask)
    else:
        k = _load_real_rows(Kb, tok_k, stride_kn, kd, dmask)
        v = _load_real_rows(Vb, tok_k, stride_vn, vd, dmask)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if KIND == 0:
        s = _mask_keys(s, kok, masked_score, True)
    elif KIND == 1:
        s = _mask_window(s, out_rows, _outside_cols(x0, y0, TW, KE, NBX * TW, KA), win, x0, y0, lx, ly, kok, kmask,
                         masked_score, EXT, HAS_KEEP)
    return s, k, v


@kernel
def _fwd_kernel(Q, K, V, O, LSE, QWIN, KEEP, QTAB, QOUT, CHOICE, LIST, CNT, REC,
                stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on, stride_od,
                H, N, P, GH, GW, NBX: tl.constexpr, TQ, TK, BS,
                stride_qwin_b, stride_keep_b, stride_qtab_b, stride_qout_b, stride_sched_b, qk_scale, masked_score,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_P: tl.constexpr,
                ORDER: tl.constexpr, TW: tl.constexpr, TH: tl.constexpr, HAS_KEEP: tl.constexpr,
                QMODE: tl.constexpr, EXT: tl.constexpr, KE: tl.constexpr, KA: tl.constexpr, RW: tl.constexpr,
                EXT_BF16: tl.constexpr,
                PREFIX_Q: tl.constexpr, RECORD: tl.constexpr, DOT_PREC: tl.constexpr):
    """Forward of one query tile (patch slots, or with ``PREFIX_Q`` a block of prefix queries) of one head."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    kd = offs_d * stride_kd
    vd = offs_d * stride_vd
    keep_b = KEEP + b * stride_keep_b
    Kb = K + b64 * stride_kb + h * stride_kh
    Vb = V + b64 * stride_vb + h * stride_vh
    bsch = b * stride_sched_b
    if PREFIX_Q:
        tok_q = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        qv = tok_q < P
    else:
        vsel = 0
        if QMODE == 2:
            vsel = tl.load(CHOICE + bsch)
        pq, qv = _slot_query(QTAB + b * stride_qtab_b, pid * BLOCK_M + tl.arange(0, BLOCK_M))
        tok_q = P + pq
    q = _load_rows(Q + b64 * stride_qb + h * stride_qh, tok_q, qv, stride_qn, offs_d * stride_qd, dmask)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # prefix keys: every query attends them (minus dropped ones); an empty query tile skips them
    p_end = _prefix_end(P, qv)
    for p0 in range(0, p_end, BLOCK_P):  # cost: prefix
        tok_k, kv, kok = _prefix_keys(p0, keep_b, P, BLOCK_P, HAS_KEEP)
        k = _load_rows(Kb, tok_k, kv, stride_kn, kd, dmask)
        v = _load_rows(Vb, tok_k, kv, stride_vn, vd, dmask)
        s = _mask_keys(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), kok, masked_score, True)
        acc, m_i, l_i = online_step(acc, m_i, l_i, s, qk_scale, v, DOT_PREC)
    if PREFIX_Q:
        # prefix queries attend every patch key: all tiles, mask = valid and kept
        for kt in range(0, TK):  # cost: prefix_query
            s, k, v = _key_tile(kt, q, Kb, Vb, keep_b, 0, 0, 0, masked_score, P, GH, GW, stride_kn, stride_vn, kd, vd,
                                dmask, NBX, BLOCK_N, ORDER, TW, TH, KE, KA, EXT, HAS_KEEP, 0, DOT_PREC)
            acc, m_i, l_i = online_step(acc, m_i, l_i, s, qk_scale, v, DOT_PREC)
    else:
        kmask, out_rows, win = _mask_operands(QOUT + b * stride_qout_b, QWIN + b * stride_qwin_b,
                                              pid * BLOCK_M + tl.arange(0, BLOCK_M), masked_score, BLOCK_M, BLOCK_N,
                                              TW, KE, RW, EXT, EXT_BF16)
        row = (vsel * BS + bsch) * TQ + pid
        n_m = tl.load(CNT + row * 2)
        n_f = tl.load(CNT + row * 2 + 1)
        rec = REC + ((b * H + h) * TQ + pid) * TK
        # key tiles that cut some window (or hold padding / dropped keys): the window applied
        lst = LIST + row * TK
        kt_next = _list_entry(lst, 0, n_m)  # each list entry is read one iteration ahead of its use
        for i in range(0, n_m):  # cost: masked
            kt = kt_next
            kt_next = _list_entry(lst, i + 1, n_m)
            s, k, v = _key_tile(kt, q, Kb, Vb, keep_b, out_rows, win, kmask, masked_score, P, GH, GW, stride_kn,
                                stride_vn, kd, vd, dmask, NBX, BLOCK_N, ORDER, TW, TH, KE, KA, EXT, HAS_KEEP, 1, DOT_PREC)
            acc, m_i, l_i = online_step(acc, m_i, l_i, s, qk_scale, v, DOT_PREC)
            if RECORD:
                tl.store(rec + kt, 1)
        # key tiles inside every window of the query tile: no mask
        kt_next = _list_entry(lst, TK - n_f, TK)
        for i in range(TK - n_f, TK):  # cost: full
            kt = kt_next
            kt_next = _list_entry(lst, i + 1, TK)
            s, k, v = _key_tile(kt, q, Kb, Vb, keep_b, out_rows, win, kmask, masked_score, P, GH, GW, stride_kn,
                                stride_vn, kd, vd, dmask, NBX, BLOCK_N, ORDER, TW, TH, KE, KA, EXT, HAS_KEEP, 2, DOT_PREC)
            acc, m_i, l_i = online_step(acc, m_i, l_i, s, qk_scale, v, DOT_PREC)
            if RECORD:
                tl.store(rec + kt, 2)
    # a row that met no allowed key holds masked scores only (or none): it outputs zeros
    has = m_i > _EMPTY_BELOW
    l_safe = tl.where(has, l_i, 1.0)
    out = tl.where(has[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has, m_i + tl.math.log2(l_safe), float("inf"))
    ob = O + b64 * stride_ob + h * stride_oh
    tl.store(ob + tok_q[:, None] * stride_on + (offs_d * stride_od)[None, :], out.to(O.dtype.element_ty),
             mask=qv[:, None] & dmask[None, :])
    tl.store(LSE + (b64 * H + h) * N + tok_q, lse, mask=qv)


@kernel
def _delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_od,
                  stride_dob, stride_doh, stride_don, stride_dod, H, N,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """``delta_i = sum_d out_i * dout_i`` (fp32): the row term of the softmax gradient."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    valid = rows < N
    o = _load_rows(O + b * stride_ob + h * stride_oh, rows, valid, stride_on, offs_d * stride_od, dmask).to(tl.float32)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, rows, valid, stride_don, offs_d * stride_dod,
                    dmask).to(tl.float32)
    tl.store(DELTA + (b * H + h) * N + rows, tl.sum(o * do, 1), mask=valid)


@helper
def _dq_step(dq, s, do, lse, delta, k, v, qk_scale, DOT_PREC: tl.constexpr):
    """``dq += (p * (dout . v - delta)) k`` for one key tile, ``p = exp2(scale s - lse)`` recomputed
    from the unscaled scores ``s`` (masked elements at the masked score: ``p = 0``)."""
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)


@kernel
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, QWIN, KEEP, QTAB, QOUT, CHOICE, LIST, CNT, REC,
                   stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_don, stride_dod,
                   stride_gb, stride_gh, stride_gn, stride_gd, H, N, P, GH, GW, NBX: tl.constexpr, TQ, TK, BS,
                   stride_qwin_b, stride_keep_b, stride_qtab_b, stride_qout_b, stride_sched_b,
                   qk_scale, masked_score, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_P: tl.constexpr,
                   ORDER: tl.constexpr, TW: tl.constexpr, TH: tl.constexpr, HAS_KEEP: tl.constexpr,
                   QMODE: tl.constexpr, EXT: tl.constexpr, KE: tl.constexpr, KA: tl.constexpr, RW: tl.constexpr,
                EXT_BF16: tl.constexpr,
                   PREFIX_Q: tl.constexpr, RECORD: tl.constexpr, DOT_PREC: tl.constexpr):
    """``dq_i = scale * sum_j p_ij (dp_ij - delta_i) k_j`` over the key tiles query tile ``pid`` visits."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    kd = offs_d * stride_kd
    vd = offs_d * stride_vd
    keep_b = KEEP + b * stride_keep_b
    Kb = K + b64 * stride_kb + h * stride_kh
    Vb = V + b64 * stride_vb + h * stride_vh
    bsch = b * stride_sched_b
    if PREFIX_Q:
        tok_q = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        qv = tok_q < P
    else:
        vsel = 0
        if QMODE == 2:
            vsel = tl.load(CHOICE + bsch)
        pq, qv = _slot_query(QTAB + b * stride_qtab_b, pid * BLOCK_M + tl.arange(0, BLOCK_M))
        tok_q = P + pq
    q = _load_rows(Q + b64 * stride_qb + h * stride_qh, tok_q, qv, stride_qn, offs_d * stride_qd, dmask)
    do = _load_rows(DO + b64 * stride_dob + h * stride_doh, tok_q, qv, stride_don, offs_d * stride_dod, dmask)
    lse = tl.load(LSE + (b64 * H + h) * N + tok_q, mask=qv, other=float("inf"))
    delta = tl.load(DELTA + (b64 * H + h) * N + tok_q, mask=qv, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    p_end = _prefix_end(P, qv)
    for p0 in range(0, p_end, BLOCK_P):  # cost: prefix
        tok_k, kv, kok = _prefix_keys(p0, keep_b, P, BLOCK_P, HAS_KEEP)
        k = _load_rows(Kb, tok_k, kv, stride_kn, kd, dmask)
        v = _load_rows(Vb, tok_k, kv, stride_vn, vd, dmask)
        s = _mask_keys(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), kok, masked_score, True)
        dq = _dq_step(dq, s, do, lse, delta, k, v, qk_scale, DOT_PREC)
    if PREFIX_Q:
        for kt in range(0, TK):  # cost: prefix_query
            s, k, v = _key_tile(kt, q, Kb, Vb, keep_b, 0, 0, 0, masked_score, P, GH, GW, stride_kn, stride_vn, kd, vd,
                                dmask, NBX, BLOCK_N, ORDER, TW, TH, KE, KA, EXT, HAS_KEEP, 0, DOT_PREC)
            dq = _dq_step(dq, s, do, lse, delta, k, v, qk_scale, DOT_PREC)
    else:
        kmask, out_rows, win = _mask_operands(QOUT + b * stride_qout_b, QWIN + b * stride_qwin_b,
                                              pid * BLOCK_M + tl.arange(0, BLOCK_M), masked_score, BLOCK_M, BLOCK_N,
                                              TW, KE, RW, EXT, EXT_BF16)
        row = (vsel * BS + bsch) * TQ + pid
        n_m = tl.load(CNT + row * 2)
        n_f = tl.load(CNT + row * 2 + 1)
        rec = REC + ((b * H + h) * TQ + pid) * TK
        lst = LIST + row * TK
        kt_next = _list_entry(lst, 0, n_m)  # each list entry is read one iteration ahead of its use
        for i in range(0, n_m):  # cost: masked
            kt = kt_next
            kt_next = _list_entry(lst, i + 1, n_m)
            s, k, v = _key_tile(kt, q, Kb, Vb, keep_b, out_rows, win, kmask, masked_score, P, GH, GW, stride_kn,
                                stride_vn, kd, vd, dmask, NBX, BLOCK_N, ORDER, TW, TH, KE, KA, EXT, HAS_KEEP, 1, DOT_PREC)
            dq = _dq_step(dq, s, do, lse, delta, k, v, qk_scale, DOT_PREC)
            if RECORD:
                tl.store(rec + kt, 1)
        kt_next = _list_entry(lst, TK - n_f, TK)
        for i in range(TK - n_f, TK):  # cost: full
            kt = kt_next
            kt_next = _list_entry(lst, i + 1, TK)
            s, k, v = _key_tile(kt, q, Kb, Vb, keep_b, out_rows, win, kmask, masked_score, P, GH, GW, stride_kn,
                                stride_vn, kd, vd, dmask, NBX, BLOCK_N, ORDER, TW, TH, KE, KA, EXT, HAS_KEEP, 2, DOT_PREC)
            dq = _dq_step(dq, s, do, lse, delta, k, v, qk_scale, DOT_PREC)
            if RECORD:
                tl.store(rec + kt, 2)
    gb = DQ + b64 * stride_gb + h * stride_gh
    tl.store(gb + tok_q[:, None] * stride_gn + (offs_d * stride_gd)[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=qv[:, None] & dmask[None, :])


@helper
def _dkdv_step(dk, dv, s, q, do, lse, delta, v, qk_scale, DOT_PREC: tl.constexpr):
    """``dv += p^T dout`` and ``dk += (p * (dout . v - delta))^T q`` for one query tile (``s`` as in
    :func:`_dq_step`)."""
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    dv = dv + tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dk = dk + tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    return dk, dv


@helper
def _load_query_side(Qb, DOb, LSEb, DELTAb, tok_q, qv, stride_qn, stride_don, qd, dd, dmask):
    """``q, dout, lse, delta`` of query rows ``tok_q`` (zeros and ``lse = inf`` where not ``qv``)."""
    q = _load_rows(Qb, tok_q, qv, stride_qn, qd, dmask)
    do = _load_rows(DOb, tok_q, qv, stride_don, dd, dmask)
    lse = tl.load(LSEb + tok_q, mask=qv, other=float("inf"))
    delta = tl.load(DELTAb + tok_q, mask=qv, other=0.0)
    return q, do, lse, delta


@helper
def _load_slot_queries(Qb, DOb, LSEb, DELTAb, tok_q, qv, stride_qn, stride_don, qd, dd, dmask):
    """:func:`_load_query_side` for query slots, whose rows are all real tokens (a padding slot
    points at a real row): the rows load unmasked, ``lse = inf`` at padding makes ``p = 0`` there."""
    q = _load_real_rows(Qb, tok_q, stride_qn, qd, dmask)
    do = _load_real_rows(DOb, tok_q, stride_don, dd, dmask)
    lse = tl.where(qv, tl.load(LSEb + tok_q), float("inf"))
    delta = tl.load(DELTAb + tok_q)
    return q, do, lse, delta


@kernel
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, QWIN, KEEP, QTAB, QOUT, CHOICE, LIST_T, CNT_T, REC,
                     stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_don, stride_dod,
                     stride_gb, stride_gh, stride_gn, stride_gd, H, N, P, GH, GW, NBX: tl.constexpr, TQ, TK, BS,
                     stride_qwin_b, stride_keep_b, stride_qtab_b, stride_qout_b, stride_sched_b,
                     qk_scale, masked_score, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_P: tl.constexpr,
                     ORDER: tl.constexpr, TW: tl.constexpr, TH: tl.constexpr, HAS_KEEP: tl.constexpr,
                     QMODE: tl.constexpr, EXT: tl.constexpr, KE: tl.constexpr, KA: tl.constexpr, RW: tl.constexpr,
                EXT_BF16: tl.constexpr,
                     PREFIX_K: tl.constexpr, RECORD: tl.constexpr, DOT_PREC: tl.constexpr):
    """``dv_j = sum_i p_ij dout_i``, ``dk_j = scale * sum_i p_ij (dp_ij - delta_i) q_i`` over the
    query tiles that reach key tile ``pid`` (with ``PREFIX_K``, a block of prefix keys: every tile)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    qd = offs_d * stride_qd
    dd = offs_d * stride_dod
    keep_b = KEEP + b * stride_keep_b
    bsch = b * stride_sched_b
    qtab_b = QTAB + b * stride_qtab_b
    if PREFIX_K:
        tok_k, kv, kok = _prefix_keys(pid * BLOCK_N, keep_b, P, BLOCK_N, HAS_KEEP)
    else:
        tok_k, x0, y0, lx, ly, kv, kok = _patch_keys(pid, keep_b, P, GH, GW, NBX, BLOCK_N, ORDER, TW, TH, HAS_KEEP)
    k = _load_rows(K + b64 * stride_kb + h * stride_kh, tok_k, kv, stride_kn, offs_d * stride_kd, dmask)
    v = _load_rows(V + b64 * stride_vb + h * stride_vh, tok_k, kv, stride_vn, offs_d * stride_vd, dmask)
    Qb = Q + b64 * stride_qb + h * stride_qh
    DOb = DO + b64 * stride_dob + h * stride_doh
    LSEb = LSE + (b64 * H + h) * N
    DELTAb = DELTA + (b64 * H + h) * N
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # prefix queries attend every key
    for p0 in range(0, P, BLOCK_P):  # cost: prefix
        tok_q = p0 + tl.arange(0, BLOCK_P)
        q, do, lse, delta = _load_query_side(Qb, DOb, LSEb, DELTAb, tok_q, tok_q < P, stride_qn, stride_don, qd, dd,
                                             dmask)
        s = _mask_keys(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), kok, masked_score, True)
        dk, dv = _dkdv_step(dk, dv, s, q, do, lse, delta, v, qk_scale, DOT_PREC)
    if PREFIX_K:
        # every patch query attends the prefix keys
        for qt in range(0, TQ):  # cost: prefix_query
            if _holds_query(qtab_b, qt * BLOCK_M):  # empty query tiles (partly filled orders) are skipped
                pq, qv = _slot_query(qtab_b, qt * BLOCK_M + tl.arange(0, BLOCK_M))
                q, do, lse, delta = _load_slot_queries(Qb, DOb, LSEb, DELTAb, P + pq, qv, stride_qn, stride_don, qd, dd,
                                                       dmask)
                s = _mask_keys(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), kok, masked_score, True)
                dk, dv = _dkdv_step(dk, dv, s, q, do, lse, delta, v, qk_scale, DOT_PREC)
    else:
        qwin_b = QWIN + b * stride_qwin_b
        qout_b = QOUT + b * stride_qout_b
        if EXT:
            kmask = _lane_masks(BLOCK_N, TW, KE, masked_score, EXT_BF16)
            cols = _outside_cols(x0, y0, TW, KE, NBX * TW, KA)
        else:
            kmask = 0
            cols = 0
        row = bsch * TK + pid
        n_m = tl.load(CNT_T + row * 2)
        n_f = tl.load(CNT_T + row * 2 + 1)
        rec = REC + ((b * H + h) * TK + pid) * TQ
        lst = LIST_T + row * TQ
        # list entries are read two iterations ahead of their use, the query table one: no load in
        # an iteration waits for another load of the same iteration
        qt_next = _list_entry(lst, 0, n_m)
        qt_after = _list_entry(lst, 1, n_m)
        slots_next = qt_next * BLOCK_M + tl.arange(0, BLOCK_M)
        pq_next, qv_next = _slot_query(qtab_b, slots_next)
        for i in range(0, n_m):  # cost: masked
            qt = qt_next
            pq = pq_next
            qv = qv_next
            slots = slots_next
            slots_next = qt_after * BLOCK_M + tl.arange(0, BLOCK_M)
            pq_next, qv_next = _slot_query(qtab_b, slots_next)
            qt_next = qt_after
            qt_after = _list_entry(lst, i + 2, n_m)
            q, do, lse, delta = _load_slot_queries(Qb, DOb, LSEb, DELTAb, P + pq, qv, stride_qn, stride_don, qd, dd,
                                                   dmask)
            if EXT:
                win = 0
            else:
                win = _slot_window(qwin_b, slots, BLOCK_M)
            s = _mask_window(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), qout_b + slots[:, None] * RW, cols, win,
                             x0, y0, lx, ly, kok, kmask, masked_score, EXT, HAS_KEEP)
            dk, dv = _dkdv_step(dk, dv, s, q, do, lse, delta, v, qk_scale, DOT_PREC)
            if RECORD:
                tl.store(rec + qt, 1)
        qt_next = _list_entry(lst, TQ - n_f, TQ)
        qt_after = _list_entry(lst, TQ - n_f + 1, TQ)
        pq_next, qv_next = _slot_query(qtab_b, qt_next * BLOCK_M + tl.arange(0, BLOCK_M))
        for i in range(TQ - n_f, TQ):  # cost: full
            qt = qt_next
            pq = pq_next
            qv = qv_next
            pq_next, qv_next = _slot_query(qtab_b, qt_after * BLOCK_M + tl.arange(0, BLOCK_M))
            qt_next = qt_after
            qt_after = _list_entry(lst, i + 2, TQ)
            q, do, lse, delta = _load_slot_queries(Qb, DOb, LSEb, DELTAb, P + pq, qv, stride_qn, stride_don, qd, dd,
                                                   dmask)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            dk, dv = _dkdv_step(dk, dv, s, q, do, lse, delta, v, qk_scale, DOT_PREC)
            if RECORD:
                tl.store(rec + qt, 2)
    out_mask = kv[:, None] & dmask[None, :]
    g_off = b64 * stride_gb + h * stride_gh + tok_k[:, None] * stride_gn + (offs_d * stride_gd)[None, :]
    tl.store(DK + g_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=out_mask)


def _record_buffer(shape, record: bool, device) -> torch.Tensor:
    # visited-tile codes for tests (zeros = not visited); a dummy pointer, never written, otherwise
    return torch.zeros(shape, dtype=torch.int8, device=device) if record else torch.empty(1, dtype=torch.int8,
                                                                                          device=device)


def _constexprs(sched: Schedule, q: torch.Tensor, record: bool, cfg: Config) -> dict:
    """The launch's constexprs (those of the patch-tile launches; :func:`_ext` sets the block
    sizes) and, on a GPU, warps and stages of ``cfg`` (the schedule may have been built for a
    configuration that differs from it in those only)."""
    lay = sched.layout
    d = q.shape[-1]
    opts = {} if interpreting() else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_P=_prefix_block(sched.P),
                ORDER=lay.order, TW=lay.tw, TH=lay.th, HAS_KEEP=sched.keep_sb > 0, QMODE=sched.qmode, RECORD=record,
                DOT_PREC=dot_precision(q.dtype), EXT_BF16=not interpreting(), RW=sched.qout.shape[-1], **opts)


def _ext(meta: dict, bm: int, bn: int) -> dict:
    """``meta`` with the block sizes and the window product's constexprs: ``EXT`` where a key tile
    is ``bn / TW`` rows of one tiled-layout unit (its lanes' coordinates relative to the tile
    origin are compile-time constants), and its width ``KE`` (``TW`` column plus ``bn / TW`` row
    indicators, rounded up to a tensor-core step). The interpreter (numpy has no bfloat16) takes
    the product in float32; masked scores are powers of two, exact in both."""
    ext = meta["ORDER"] == 1 and (meta["TW"] * meta["TH"]) % bn == 0 and bn >= meta["TW"]
    rows = bn // meta["TW"] if ext else 1
    ke = max(16, triton.next_power_of_2(meta["TW"] + rows)) if ext else 16
    ka = math.gcd(meta["TW"], rows & -rows, 8)  # tile origins' alignment in the outside table
    return dict(meta, BLOCK_M=bm, BLOCK_N=bn, EXT=ext, KE=ke, KA=ka)


def _masked_score(qk_scale: float) -> float:
    """The masked score: ``-2**e`` with ``e`` the integer nearest to ``60 - log2(qk_scale)``, so that
    ``masked_score * qk_scale`` is about ``-2**60`` (see ``_MASKED_SCALED``)."""
    return -(2.0 ** round(math.log2(_MASKED_SCALED / qk_scale)))


def _schedule_args(sched: Schedule, H: int, N: int) -> dict:
    """The schedule's tables and sizes, by the names every window kernel gives them."""
    gh, gw = sched.grid
    return dict(QWIN=sched.qwin, KEEP=sched.keep, QTAB=sched.qtab, QOUT=sched.qout, CHOICE=sched.choice, H=H, N=N,
                P=sched.P, GH=gh, GW=gw, NBX=sched.layout.nbx, TQ=sched.tq, TK=sched.tk, BS=sched.bs,
                stride_qwin_b=sched.qwin_sb, stride_keep_b=sched.keep_sb, stride_qtab_b=sched.qtab_sb,
                stride_qout_b=sched.qout_sb, stride_sched_b=int(sched.bs > 1))


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
    args = dict(Q=q, K=k, V=v, O=out, LSE=lse, LIST=sched.lst, CNT=sched.cnt, REC=rec, **_schedule_args(sched, H, N),
                **strides("q", q), **strides("k", k), **strides("v", v), **strides("o", out),
                qk_scale=scale * _LOG2E, masked_score=_masked_score(scale * _LOG2E))
    meta = _constexprs(sched, q, record, cfg)
    _fwd_kernel[(sched.tq, H, B)](**args, PREFIX_Q=False, **_ext(meta, cfg.block_m, cfg.block_n))
    if P:
        pb = meta["BLOCK_P"]
        _fwd_kernel[(triton.cdiv(P, pb), H, B)](**args, PREFIX_Q=True, **_ext(meta, pb, cfg.block_n))
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
    _delta_kernel[(triton.cdiv(N, br), H, B)](O=out, DO=dout, DELTA=delta, **strides("o", out),
                                             **strides("do", dout), H=H, N=N, HEAD_DIM=d,
                                             BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=br)
    dq = torch.empty((B, H, N, d), dtype=q.dtype, device=dev)
    dk = torch.empty((B, H, N, d), dtype=k.dtype, device=dev)
    dv = torch.empty((B, H, N, d), dtype=v.dtype, device=dev)
    rec_q = _record_buffer((B, H, sched.tq, sched.tk), record, dev)
    rec_k = _record_buffer((B, H, sched.tk, sched.tq), record, dev)
    meta = _constexprs(sched, q, record, cfg)
    pb = meta["BLOCK_P"]
    common = dict(Q=q, K=k, V=v, DO=dout, LSE=lse, DELTA=delta, **_schedule_args(sched, H, N), **strides("q", q),
                  **strides("k", k), **strides("v", v), **strides("do", dout), qk_scale=scale * _LOG2E,
                  masked_score=_masked_score(scale * _LOG2E), sm_scale=scale)
    dq_args = dict(common, DQ=dq, LIST=sched.lst, CNT=sched.cnt, REC=rec_q, **strides("g", dq))
    _bwd_dq_kernel[(sched.tq, H, B)](**dq_args, PREFIX_Q=False, **_ext(meta, cfg.block_m, cfg.block_n))
    if P:
        _bwd_dq_kernel[(triton.cdiv(P, pb), H, B)](**dq_args, PREFIX_Q=True, **_ext(meta, pb, cfg.block_n))
    kv_args = dict(common, DK=dk, DV=dv, LIST_T=lst_t, CNT_T=cnt_t, REC=rec_k, **strides("g", dk))
    _bwd_dkdv_kernel[(sched.tk, H, B)](**kv_args, PREFIX_K=False, **_ext(meta, cfg.block_m, cfg.block_n))
    if P:
        _bwd_dkdv_kernel[(triton.cdiv(P, pb), H, B)](**kv_args, PREFIX_K=True, **_ext(meta, cfg.block_m, pb))
    return dq, dk, dv, (rec_q if record else None), (rec_k if record else None)


# -------------------------------------------------------------------------------- configuration
def _pick_config(kind: str, q: torch.Tensor, run) -> Config:
    """The launch config for ``kind`` (``"fwd"``/``"bwd"``) from the policy's unit ``window_<kind>``
    (:func:`vitpatch.kernels._launch.select`). When several ship, each is timed on the call's own
    inputs with its schedule build (the schedule depends on the block sizes), once per ``N``."""
    B, H, N, d = q.shape
    chosen = _launch.select(f"window_{kind}", q.dtype, d, key=(N,), device=q.device,
                            run=lambda c: run(Config.of(c)))
    return Config.of(chosen)


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
    if not 2.0 ** -60 <= scale <= 2.0 ** 40:
        return f"scale {scale:g} (the kernel's masked score needs 2**-60 <= scale <= 2**40)"
    reason = _launch.supports(("window_fwd", "window_bwd"), q.dtype, d)
    if reason:
        return reason
    if not q.is_cuda:
        if not interpreting():
            return "CPU tensors need TRITON_INTERPRET=1"
        if q.dtype == torch.bfloat16:
            return "bfloat16 in Triton's CPU interpreter (numpy has no bfloat16)"
    return None
