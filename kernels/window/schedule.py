"""The device tile schedule of the window kernels (see :mod:`vitpatch.kernels.window` for what it
decides and why): the query orders (``sorted`` built and cut on the device, ``grouped`` by the
host search of :mod:`.grouping`), the classification of every (query tile, key tile) pair, the
per-slot tables the attention kernels read, the schedule cache, and the helpers that expose the
schedule to tests and benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from vitpatch._cache import TensorCache

from .._launch import combine, helper, interpreting, kernel
from .grouping import grouped_tiles as _grouped_tiles
from .layout import ORDERS, ROW_MAJOR, TILED, Config, _Layout, _layout, _slot_patch, _unit_shape

__all__ = ["tile_codes", "tile_schedule", "visited_fraction", "query_tokens", "grouped_perm", "build_schedule",
           "cached_schedule", "Schedule", "resolve_config"]


# ================================================================================ grouped query order (host)
def grouped_perm(windows: torch.Tensor, grid: Tuple[int, int], cfg: Config) -> torch.Tensor:
    """The ``grouped`` query order of each image: int64 ``(Bw, tq * block_m)`` on the windows' device,
    patch indices (``0 .. n-1``, each once per row) or ``-1`` for padding slots; ``tq`` is the
    largest tile count over the images (shorter rows end in whole padding tiles).

    Computed on the host (:func:`vitpatch.kernels.window.grouping.grouped_tiles`): CUDA windows cost
    one device-to-host copy of the ``(Bw, n, 4)`` windows, i.e. one synchronisation per schedule
    build (``cached_schedule`` builds once per mask). ``meta`` windows (the compile gate) give ``tq = cdiv(n, block_m)``
    padding-only rows. Needs :attr:`Config.groups_queries`.
    """
    if not cfg.groups_queries:
        raise ValueError(f"query_order 'grouped' needs the TILED key layout with block_n <= unit, got {cfg}")
    gh, gw = grid
    n = gh * gw
    bm = cfg.block_m
    win = windows if windows.dim() == 3 else windows[None]
    if win.device.type == "meta":
        return torch.full((win.shape[0], triton.cdiv(n, bm) * bm), -1, dtype=torch.int64, device=win.device)
    kw = _unit_shape(cfg.unit)[0]
    kh = cfg.block_n // kw
    host = win.detach().to("cpu", torch.int64).numpy()
    rows = [_grouped_tiles(host[b], bm, kw, kh) for b in range(host.shape[0])]
    width = max(r.size for r in rows) if rows else 0
    out = np.full((len(rows), width), -1, np.int64)
    for b, r in enumerate(rows):
        out[b, :r.size] = r
    return torch.from_numpy(out).to(win.device)



@helper
def _query_patch(slot, PERM, n, GH, GW, NBX, use_sorted, ORDER: tl.constexpr, TW: tl.constexpr, TH: tl.constexpr,
                 QMODE: tl.constexpr):
    """Patch index and validity of query slots: ``QMODE`` 0 spatial (the key layout), 1 ``PERM``
    (this image's ``sorted`` or ``grouped`` order, ``n`` slots long, ``-1`` = padding), 2 per image
    (``use_sorted`` picks ``PERM``)."""
    if QMODE != 1:
        ps, _, _, vs = _slot_patch(slot, GH, GW, NBX, ORDER, TW, TH)
    if QMODE != 0:
        pw = tl.load(PERM + slot, mask=slot < n, other=-1).to(tl.int32)
        vw = pw >= 0
        pw = tl.where(vw, pw, 0)
    if QMODE == 0:
        pq = ps
        qv = vs
    elif QMODE == 1:
        pq = pw
        qv = vw
    else:
        pq = tl.where(use_sorted, pw, ps)
        qv = tl.where(use_sorted, vw, vs)
    return pq, qv


@helper
def _ktile_rect(kt, r: tl.constexpr, GH, GW, NBX, BLOCK_N: tl.constexpr, ORDER: tl.constexpr, TW: tl.constexpr,
                TH: tl.constexpr):
    """Rectangle ``r`` of the footprint of key tiles ``kt`` on the grid: ``(x0, y0, x1, y1)``, inclusive.

    A row-major run of ``BLOCK_N`` patches is at most three rectangles (partial first row, full
    middle rows, partial last row); a ``TILED`` tile is one rectangle (rows of a square) or
    ``BLOCK_N / unit`` whole squares. Empty rectangles have ``y0 > y1``.
    """
    zero = kt * 0
    if ORDER == 0:
        n = GH * GW
        a = kt * BLOCK_N
        e = tl.minimum(a + BLOCK_N, n) - 1
        ya = a // GW
        ye = e // GW
        if r == 0:
            x0 = a % GW
            x1 = tl.where(ye > ya, GW - 1, e % GW)
            y0 = ya
            y1 = ya
        elif r == 1:
            x0 = zero
            x1 = zero + GW - 1
            y0 = ya + 1
            y1 = ye - 1
        else:
            x0 = zero
            x1 = e % GW
            y0 = tl.where(ye > ya, ye, ye + 1)
            y1 = ye
        y1 = tl.where(a < n, y1, -1)
    else:
        if BLOCK_N <= TW * TH:
            start = kt * BLOCK_N
            blk = start // (TW * TH)
            y_off = ((start % (TW * TH)) // BLOCK_N) * (BLOCK_N // TW)
            rows = BLOCK_N // TW
        else:
            blk = kt * (BLOCK_N // (TW * TH)) + r
            y_off = zero
            rows = TH
        x0 = (blk % NBX) * TW
        x1 = tl.minimum(x0 + TW, GW) - 1
        y0 = (blk // NBX) * TH + y_off
        y1 = tl.minimum(y0 + rows, GH) - 1
    return x0, y0, x1, y1


@helper
def _append_visits(lst, width, idx, masked, full, n_m, n_f):
    """Compact one chunk of a visit list of ``width`` slots: ``idx`` where ``masked`` after the ``n_m``
    masked entries so far (from the front), where ``full`` before the ``n_f`` full ones (from the
    back). Returns the new counts."""
    cm = tl.cumsum(masked.to(tl.int32), 0)
    cf = tl.cumsum(full.to(tl.int32), 0)
    tl.store(lst + n_m + cm - 1, idx, mask=masked)
    tl.store(lst + width - n_f - cf, idx, mask=full)
    return n_m + tl.sum(masked.to(tl.int32), 0), n_f + tl.sum(full.to(tl.int32), 0)


@kernel
def _window_code_kernel(WIN, CODE, n, stride_win_b, BITS: tl.constexpr, BR: tl.constexpr):
    """4-D Morton code of each window ``(x_left, y_top, x_right, y_bottom)`` (bits interleaved), int64."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    b = tl.program_id(1)
    valid = rows < n
    code = tl.zeros([BR], tl.int64)
    for c in tl.static_range(4):
        coord = tl.load(WIN + b * stride_win_b + rows * 4 + c, mask=valid, other=0).to(tl.int64)
        for bit in tl.static_range(BITS):
            code = code | (((coord >> bit) & 1) << (4 * bit + c))
    tl.store(CODE + b * n + rows, code, mask=valid)


@combine
def _min2(a, b):
    return tl.minimum(a, b)


@combine
def _max2(a, b):
    return tl.maximum(a, b)


@helper
def _signature(SIG, n, pos, valid):
    """The signatures at sorted positions ``pos`` (``_cut_kernel``'s table: windows in key tiles,
    ``(x0, y0, x1 + 1, y1 + 1)``); invalid positions give the empty box, the identity of the union."""
    big = 1 << 20
    return (tl.load(SIG + pos, mask=valid, other=big), tl.load(SIG + n + pos, mask=valid, other=big),
            tl.load(SIG + 2 * n + pos, mask=valid, other=0), tl.load(SIG + 3 * n + pos, mask=valid, other=0))


@helper
def _suffix_boxes(SIG, n, pos, valid):
    """Per position ``a`` of the vector, the bounding box of the signatures at positions ``a ..`` its end."""
    x0, y0, x1, y1 = _signature(SIG, n, pos, valid)
    return (tl.associative_scan(x0, 0, _min2, reverse=True), tl.associative_scan(y0, 0, _min2, reverse=True),
            tl.associative_scan(x1, 0, _max2, reverse=True), tl.associative_scan(y1, 0, _max2, reverse=True))


@kernel
def _cut_kernel(PERM, WIN, SIG, F, LEN, OUT, n, stride_win_b, stride_out_b, KW, KH, BLOCK_M: tl.constexpr,
                LMIN: tl.constexpr, TQC: tl.constexpr, LAM: tl.constexpr):
    """Image ``b``'s ``sorted`` order cut into query tiles by dynamic programming (``_cut_perm``).

    Over the positions of the Morton order, ``f[j]`` is the least cost of cutting positions
    ``0 .. j-1`` into runs of ``LMIN .. BLOCK_M`` queries (the last run: ``1 .. BLOCK_M``), a run costing the
    area, in key tiles, of the bounding box of its queries' signatures (windows in key tiles) plus
    ``LAM``. A run that ends at ``j`` starts at ``i <= j - LMIN``, so the ``LMIN`` ends of one block
    ``(J, J + LMIN]`` need only ``f`` up to ``J``: each block is one vector step over the
    ``LMIN x BLOCK_M`` pairs (end, start): the boxes of ``i .. J-1`` by a reverse scan, of ``J .. j-1``
    by a forward scan. A pair's key is ``512 (f[i] + LAM + area) + a`` (``a`` the start's index in
    the block, so ties take the longer run), its row minimum gives ``f[j]`` and the run. Then the
    runs are walked back from ``n`` and written as tiles, ``BLOCK_M`` slots each (``-1`` past a run),
    at most ``TQC = cdiv(n, LMIN)`` of them."""
    b = tl.program_id(0)
    perm = PERM + b * n
    win = WIN + b * stride_win_b
    sig = SIG + b * 4 * n
    f_row = F + b * (n + 1)
    len_row = LEN + b * (n + 1)
    out = OUT + b * stride_out_b
    inf = 1 << 21
    a = tl.arange(0, BLOCK_M)          # candidate starts i = J + 1 - BLOCK_M + a
    c = tl.arange(0, LMIN)        # ends j = J + 1 + c: runs j - i = BLOCK_M + c - a
    for t in range(0, TQC):
        tl.store(out + t * BLOCK_M + a, tl.full([BLOCK_M], -1, tl.int64))
    for p0 in range(0, n, BLOCK_M):  # the signature of each sorted position, once
        pos = p0 + a
        valid = pos < n
        p = tl.load(perm + pos, mask=valid, other=0)
        tl.store(sig + pos, tl.load(win + p * 4, mask=valid, other=0).to(tl.int32) // KW, mask=valid)
        tl.store(sig + n + pos, tl.load(win + p * 4 + 1, mask=valid, other=0).to(tl.int32) // KH, mask=valid)
        tl.store(sig + 2 * n + pos, tl.load(win + p * 4 + 2, mask=valid, other=0).to(tl.int32) // KW + 1, mask=valid)
        tl.store(sig + 3 * n + pos, tl.load(win + p * 4 + 3, mask=valid, other=0).to(tl.int32) // KH + 1, mask=valid)
    tl.store(f_row + c, tl.where(c == 0, 0, inf), mask=c <= n)  # f[0] = 0; only the last run is shorter than LMIN
    band = (a[None, :] >= c[:, None]) & (a[None, :] <= c[:, None] + (BLOCK_M - LMIN))   # LMIN <= run <= BLOCK_M
    for J in range(0, n, LMIN):  # cost: steps
        tl.debug_barrier()
        i = J + 1 - BLOCK_M + a
        sx0, sy0, sx1, sy1 = _suffix_boxes(sig, n, i, (i >= 0) & (i < J))
        fa = (tl.load(f_row + i, mask=i >= 0, other=inf) + LAM) * 512 + a
        px0, py0, px1, py1 = _signature(sig, n, J + c, J + c < n)
        px0 = tl.associative_scan(px0, 0, _min2)
        py0 = tl.associative_scan(py0, 0, _min2)
        px1 = tl.associative_scan(px1, 0, _max2)
        py1 = tl.associative_scan(py1, 0, _max2)
        w = tl.maximum(sx1[None, :], px1[:, None]) - tl.minimum(sx0[None, :], px0[:, None])
        h = tl.maximum(sy1[None, :], py1[:, None]) - tl.minimum(sy0[None, :], py0[:, None])
        key = tl.where(band, fa[None, :] + (w * h) * 512, 2147483647)
        best = tl.min(key, 1)
        j = J + 1 + c
        tl.debug_barrier()
        tl.store(f_row + j, tl.minimum(best // 512, inf), mask=j <= n)
        tl.store(len_row + j, BLOCK_M + c - best % 512, mask=j <= n)
    # the last run may be shorter than LMIN: f[n] over every start in [n - BLOCK_M, n - 1]
    tl.debug_barrier()
    i = n - BLOCK_M + a
    sx0, sy0, sx1, sy1 = _suffix_boxes(sig, n, i, i >= 0)
    fa = (tl.load(f_row + i, mask=i >= 0, other=inf) + LAM) * 512 + a
    last = BLOCK_M - tl.min(tl.where(i >= 0, fa + ((sx1 - sx0) * (sy1 - sy0)) * 512, 2147483647), 0) % 512
    # walk the runs back from n: run t (from the end) fills tile t
    j = n
    t = 0
    while j > 0:
        ln = tl.where(j == n, last, tl.load(len_row + j))
        start = j - ln
        tl.store(out + t * BLOCK_M + a, tl.load(perm + start + a, mask=a < ln, other=-1))
        j = start
        t += 1


@kernel
def _schedule_kernel(WIN, KEEP, PERM, CODES, LIST, CNT, stride_win_b, stride_keep_b, stride_perm_b, stride_perm_v, P,
                     GH, GW, NBX, TQ, TK, BS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr,
                     R: tl.constexpr, ORDER: tl.constexpr, TW: tl.constexpr, TH: tl.constexpr, HAS_KEEP: tl.constexpr,
                     QMODE: tl.constexpr):
    """Row ``qt`` of image ``b`` (query order ``v``) of the schedule: codes (0 skip, 1 masked,
    2 full) and the visit list. ``O(BLOCK_M * TK * R)`` integer tests: windows against key-tile
    rectangles, never against individual keys (apart from the tile's ``key_keep`` bits).
    ``QMODE`` 2: order ``v = 0`` is spatial, ``v >= 1`` reads perm ``v - 1`` (stride ``stride_perm_v``)."""
    qt = tl.program_id(0)
    b = tl.program_id(1)
    v = tl.program_id(2)
    perm_v = PERM + tl.maximum(v - 1, 0) * stride_perm_v + b * stride_perm_b
    pq, qv = _query_patch(qt * BLOCK_M + tl.arange(0, BLOCK_M), perm_v, TQ * BLOCK_M, GH, GW, NBX, v >= 1, ORDER, TW,
                          TH, QMODE)
    wp = WIN + b * stride_win_b + pq * 4
    wx0 = tl.load(wp + 0, mask=qv, other=0)
    wy0 = tl.load(wp + 1, mask=qv, other=0)
    wx1 = tl.load(wp + 2, mask=qv, other=0)
    wy1 = tl.load(wp + 3, mask=qv, other=0)
    row = (v * BS + b) * TQ + qt
    n_m = 0
    n_f = 0
    for c in range(0, TK, KC):
        kt = c + tl.arange(0, KC)
        kin = kt < TK
        kp, _, _, kv = _slot_patch(kt[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], GH, GW, NBX, ORDER, TW, TH)
        kv = kv & kin[:, None]
        if HAS_KEEP:
            kok = kv & (tl.load(KEEP + b * stride_keep_b + P + kp, mask=kv, other=0) != 0)
        else:
            kok = kv
        any_kept = tl.max(kok.to(tl.int32), 1) > 0
        all_kept = tl.min(kok.to(tl.int32), 1) > 0
        hit = tl.zeros([BLOCK_M, KC], tl.int32)
        outside = tl.zeros([BLOCK_M, KC], tl.int32)
        for r in tl.static_range(R):
            x0, y0, x1, y1 = _ktile_rect(kt, r, GH, GW, NBX, BLOCK_N, ORDER, TW, TH)
            ne = ((x0 <= x1) & (y0 <= y1))[None, :] & qv[:, None]
            meets = (x0[None, :] <= wx1[:, None]) & (x1[None, :] >= wx0[:, None]) & \
                    (y0[None, :] <= wy1[:, None]) & (y1[None, :] >= wy0[:, None])
            within = (x0[None, :] >= wx0[:, None]) & (x1[None, :] <= wx1[:, None]) & \
                     (y0[None, :] >= wy0[:, None]) & (y1[None, :] <= wy1[:, None])
            hit = hit | (ne & meets).to(tl.int32)
            outside = outside | (ne & (within == 0)).to(tl.int32)
        visit = (tl.max(hit, 0) > 0) & any_kept & kin
        full = visit & all_kept & (tl.max(outside, 0) == 0)
        masked = visit & (full == 0)
        tl.store(CODES + row * TK + kt, (visit.to(tl.int32) + full.to(tl.int32)).to(tl.int8), mask=kin)
        n_m, n_f = _append_visits(LIST + row * TK, TK, kt, masked, full, n_m, n_f)
    tl.store(CNT + row * 2, n_m)
    tl.store(CNT + row * 2 + 1, n_f)


@kernel
def _choice_kernel(CNT, CHOICE, BS, TQ, NV: tl.constexpr, C: tl.constexpr):
    """Per image: the query order ``v`` (0 spatial, then the perm orders) that visits the fewest tiles
    (the first such: ties keep the earlier order)."""
    b = tl.program_id(0)
    best = b * 0
    choice = b * 0
    for v in tl.static_range(NV):
        tot = 0
        for c in range(0, TQ * 2, C):
            i = c + tl.arange(0, C)
            tot += tl.sum(tl.load(CNT + (v * BS + b) * TQ * 2 + i, mask=i < TQ * 2, other=0), 0)
        if v == 0:
            best = tot
        else:
            better = tot < best
            choice = tl.where(better, v, choice)
            best = tl.where(better, tot, best)
    tl.store(CHOICE + b, choice)


@kernel
def _transpose_kernel(CODES, CHOICE, LIST_T, CNT_T, TQ, TK, BS, QC: tl.constexpr, QMODE: tl.constexpr):
    """Column ``kt`` of the code table of the image's query order as a list of query tiles
    (masked first, full at the end)."""
    kt = tl.program_id(0)
    b = tl.program_id(1)
    v = 0
    if QMODE == 2:
        v = tl.load(CHOICE + b)
    row = b * TK + kt
    n_m = 0
    n_f = 0
    for c in range(0, TQ, QC):
        qt = c + tl.arange(0, QC)
        qin = qt < TQ
        code = tl.load(CODES + ((v * BS + b) * TQ + qt) * TK + kt, mask=qin, other=0).to(tl.int32)
        n_m, n_f = _append_visits(LIST_T + row * TQ, TQ, qt, code == 1, code == 2, n_m, n_f)
    tl.store(CNT_T + row * 2, n_m)
    tl.store(CNT_T + row * 2 + 1, n_f)


@kernel
def _slot_tables_kernel(WIN, PERM, CHOICE, QTAB, QWIN, QOUT, stride_win_b, stride_perm_b, S, GH, GW, NBX,
                        ORDER: tl.constexpr, TW: tl.constexpr, TH: tl.constexpr, QMODE: tl.constexpr,
                        GWP: tl.constexpr, GHP: tl.constexpr, RW: tl.constexpr, RWP: tl.constexpr,
                        BR: tl.constexpr):
    """Slots ``pid * BR ...`` of image ``b``'s query order (the chosen one under ``auto``): the
    patch in each slot (``-1`` padding), its window (padding: the empty ``(1, 1, 0, 0)``) and, in
    the tiled layout, its outside indicators (see :func:`_slot_tables`)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    slot = pid * BR + tl.arange(0, BR)
    inside = slot < S
    use_sorted = False
    if QMODE == 2:
        use_sorted = tl.load(CHOICE + b) != 0
    pq, qv = _query_patch(slot, PERM + b * stride_perm_b, S, GH, GW, NBX, use_sorted, ORDER, TW, TH, QMODE)
    qv = qv & inside
    row = b * S + slot
    tl.store(QTAB + row, tl.where(qv, pq, -1), mask=inside)
    wp = WIN + b * stride_win_b + pq * 4
    x0 = tl.load(wp, mask=qv, other=1)
    y0 = tl.load(wp + 1, mask=qv, other=1)
    x1 = tl.load(wp + 2, mask=qv, other=0)
    y1 = tl.load(wp + 3, mask=qv, other=0)
    tl.store(QWIN + row * 4, x0, mask=inside)
    tl.store(QWIN + row * 4 + 1, y0, mask=inside)
    tl.store(QWIN + row * 4 + 2, x1, mask=inside)
    tl.store(QWIN + row * 4 + 3, y1, mask=inside)
    if ORDER == 1:
        c = tl.arange(0, RWP)[None, :]
        y = c - GWP
        out = tl.where(c < GWP, (c < x0[:, None]) | (c > x1[:, None]),
                       tl.where(y < GHP, (y < y0[:, None]) | (y > y1[:, None]), True))
        tl.store(QOUT + row[:, None] * RW + c, tl.where(out, 1.0, 0.0), mask=inside[:, None] & (c < RW))


def _keep_arg(key_keep: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``key_keep`` as uint8 (a view), or a dummy pointer when there is none."""
    if key_keep is None:
        return torch.empty(1, dtype=torch.uint8, device=like.device)
    return key_keep.contiguous().view(torch.uint8)


_QMODES = {"spatial": 0, "sorted": 1, "grouped": 1, "auto": 2, "best": 2}


@dataclass
class Schedule:
    """The tile schedule of one (mask, batch, config): what every kernel launch reads.

    ``V`` query orders are scheduled (``auto``/``best``: spatial, then ``cfg.perm_orders``, i.e. 2,
    or 3 for ``best`` with ``grouped``; else 1); ``Bs`` is 1 for shared windows without ``key_keep``,
    else the batch. ``TQ`` is the largest number of query tiles of the orders built: ``grouped``
    tiles may be partly filled, so it can exceed ``cdiv(n, BM)``; rows without a valid query
    visit nothing and store nothing.
    """

    cfg: Config
    layout: _Layout
    grid: Tuple[int, int]
    P: int
    tq: int
    tk: int
    bs: int
    qmode: int
    keep: torch.Tensor     # uint8 key_keep (B, N), or a dummy
    keep_sb: int
    choice: torch.Tensor   # (Bs,) int32 (auto): the order each image runs, 0 spatial, v >= 1 cfg.perm_orders[v-1]
    codes: torch.Tensor    # (V, Bs, TQ, TK) int8: 0 skip, 1 masked, 2 full
    lst: torch.Tensor      # (V, Bs, TQ, TK) int32: visited key tiles, masked ones first, full ones last
    cnt: torch.Tensor      # (V, Bs, TQ, 2) int32: numbers of masked and full key tiles
    # (Bs, TQ * BM) int32: the patch in each query slot of the image's order (-1 padding); every order
    # fills a tile's slots from its start, so a tile holds a query iff its first slot does
    qtab: torch.Tensor
    qwin: torch.Tensor     # (Bs, TQ * BM, 4) int32: that patch's window (padding: the empty (1, 1, 0, 0))
    qout: torch.Tensor     # (Bs, TQ * BM, RW) bf16 (fp32 interpreted): outside indicators (_slot_tables)
    _transposed: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def _image_stride(self, table: torch.Tensor) -> int:
        return table.stride(0) if table.shape[0] > 1 else 0

    @property
    def qtab_sb(self) -> int:
        return self._image_stride(self.qtab)

    @property
    def qwin_sb(self) -> int:
        return self._image_stride(self.qwin)

    @property
    def qout_sb(self) -> int:
        return self._image_stride(self.qout)

    def transposed(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per key tile, the query tiles that visit it: ``(list (Bs, TK, TQ), counts (Bs, TK, 2))`` (built once)."""
        if self._transposed is not None:
            return self._transposed
        dev = self.codes.device
        lst = torch.empty((self.bs, self.tk, self.tq), dtype=torch.int32, device=dev)
        cnt = torch.empty((self.bs, self.tk, 2), dtype=torch.int32, device=dev)
        qc = min(triton.next_power_of_2(self.tq), 128)
        _transpose_kernel[(self.tk, self.bs)](CODES=self.codes, CHOICE=self.choice, LIST_T=lst, CNT_T=cnt, TQ=self.tq,
                                              TK=self.tk, BS=self.bs, QC=qc, QMODE=self.qmode)
        self._transposed = (lst, cnt)
        return lst, cnt

    def chosen_codes(self) -> torch.Tensor:
        """``(Bs, TQ, TK)``: the codes of the query order each image runs."""
        if self.qmode != 2:
            return self.codes[0]
        return self.codes[self.choice.long(), torch.arange(self.bs, device=self.codes.device)]

    def query_tokens(self) -> torch.Tensor:
        """``(Bs, TQ * BM)`` int64: the token in each query slot of each image (``-1`` padding)."""
        return torch.where(self.qtab >= 0, self.qtab.long() + self.P, -1)


def _sorted_perm(win: torch.Tensor, grid: Tuple[int, int], win_sb: int, cfg: Config) -> torch.Tensor:
    """The ``sorted`` query order: per image, the patches by 4-D Morton code of their windows, cut
    into query tiles (:func:`_cut_perm` where :attr:`Config.groups_queries`, else every ``BM``):
    ``(Bw, width)`` int64, ``-1`` in padding slots."""
    gh, gw = grid
    n = gh * gw
    bw = win.shape[0] if win.dim() == 3 else 1
    code = torch.empty((bw, n), dtype=torch.int64, device=win.device)
    br = 16 if interpreting() else 256
    _window_code_kernel[(triton.cdiv(n, br), bw)](WIN=win, CODE=code, n=n, stride_win_b=win_sb,
                                                  BITS=max(1, (max(gh, gw) - 1).bit_length()), BR=br)
    order = torch.argsort(code, dim=1, stable=True)
    return _cut_perm(order, win, win_sb, cfg) if cfg.groups_queries else order


CUT_WARPS = 16  # _cut_kernel: a lone program per image, its steps latency-bound (bench.cost)
CUT_TILE_COST = 1  # LAM of _cut_kernel: a query tile's own cost (its prefix block, its epilogue), in key tiles


def _cut_perm(order: torch.Tensor, win: torch.Tensor, win_sb: int, cfg: Config) -> torch.Tensor:
    """``order`` (``(Bw, n)``, patches in Morton order of their windows) cut into query tiles of
    ``BM / 2 .. BM`` queries (the last of an image: ``1 .. BM``) where the sum over the tiles of
    the key tiles in the bounding box of their windows' key tiles (plus :data:`CUT_TILE_COST` per
    tile) is least: one ``_cut_kernel`` program per image (``_cut_kernel`` says how), on the
    device, no sync. ``(Bw, cdiv(n, BM / 2) * BM)`` int64, ``-1`` in the padding slots of partly
    filled tiles and in the unused tiles at the end.

    Cutting where the windows change instead of every ``BM`` visits fewer tiles: on AWD windows
    (``synthetic_awd_windows``, the ``auto`` order) at 128-row tiles, 0.74 instead of 0.84 of the dense pairs
    at n = 576 (density 0.23), 0.54 instead of 0.57 at n = 4096 and 0.31 instead of 0.35 at
    n = 4096, density 0.05 (``docs/cost_model.md``). The bounding box stands in for the union of
    the windows' key tiles: it is what a scan can carry, and it leaves the cut within 2% of the
    union's in the visited count."""
    bw, n = order.shape
    bm = cfg.block_m
    lmin = bm // 2
    tqc = triton.cdiv(n, lmin)
    kw = _unit_shape(cfg.unit)[0]
    kh = cfg.block_n // kw
    out = torch.empty((bw, tqc * bm), dtype=torch.int64, device=order.device)
    sig = torch.empty((bw, 4, n), dtype=torch.int32, device=order.device)
    f = torch.empty((bw, n + 1), dtype=torch.int32, device=order.device)
    ln = torch.empty((bw, n + 1), dtype=torch.int32, device=order.device)
    _cut_kernel[(bw,)](PERM=order, WIN=win, SIG=sig, F=f, LEN=ln, OUT=out, n=n, stride_win_b=win_sb,
                       stride_out_b=tqc * bm, KW=kw, KH=kh, BLOCK_M=bm, LMIN=lmin, TQC=tqc, LAM=CUT_TILE_COST,
                       num_warps=CUT_WARPS)
    return out


def build_schedule(windows: torch.Tensor, key_keep: Optional[torch.Tensor], grid: Tuple[int, int], P: int,
                   batch_size: int, cfg: Config) -> Schedule:
    """The query order(s) and the tile schedule: at most five small launches, a sort and a host grouping.

    ``sorted``: ``_window_code_kernel`` (Morton codes of the windows), an argsort per image and
    ``_cut_kernel`` (the cut into tiles, where key tiles are rectangles);
    ``grouped``: :func:`grouped_perm` on the host (one device-to-host copy of the windows). Every
    ``perm`` is padded with ``-1`` to ``TQ * BM`` slots, ``TQ`` the largest tile count of the
    orders built (the spatial order's tiles past its slots and a short ``grouped`` image's last
    tiles hold no query). Then one ``_schedule_kernel`` launch schedules every order; ``auto``
    (spatial and ``sorted``) and ``best`` (also ``grouped``, where it applies) then run
    ``_choice_kernel``, and ``best`` gathers the chosen perm of each image on the device.
    """
    gh, gw = grid
    n = gh * gw
    lay = _layout(grid, cfg)
    qmode = _QMODES[cfg.query_order]
    per_image = windows.dim() == 3 or key_keep is not None
    bs = batch_size if per_image else 1
    dev = windows.device
    interp = interpreting()
    win = windows.contiguous()
    win_sb = n * 4 if win.dim() == 3 else 0
    keep = _keep_arg(key_keep, win)
    keep_sb = P + n if key_keep is not None else 0
    tq = triton.cdiv(lay.slots, cfg.block_m) if qmode != 1 else 0  # the spatial order's tiles
    orders = cfg.perm_orders
    nv = 1 + len(orders) if qmode == 2 else 1
    if orders:
        built = [grouped_perm(win, grid, cfg) if o == "grouped" else _sorted_perm(win, grid, win_sb, cfg)
                 for o in orders]
        tq = max([tq] + [triton.cdiv(p.shape[1], cfg.block_m) for p in built])
        S = tq * cfg.block_m
        perms = torch.stack([torch.cat([p, p.new_full((p.shape[0], S - p.shape[1]), -1)], 1) for p in built])
        bw = perms.shape[1]
        perm_sb, perm_vs = (S if bw > 1 else 0), bw * S
    else:
        perms, perm_sb, perm_vs = torch.empty(1, dtype=torch.int64, device=dev), 0, 0
    tk = triton.cdiv(lay.slots, cfg.block_n)
    codes = torch.empty((nv, bs, tq, tk), dtype=torch.int8, device=dev)
    lst = torch.empty((nv, bs, tq, tk), dtype=torch.int32, device=dev)
    cnt = torch.empty((nv, bs, tq, 2), dtype=torch.int32, device=dev)
    rects = 3 if lay.order == ROW_MAJOR else max(1, cfg.block_n // lay.unit)
    kc = min(triton.next_power_of_2(tk), 64)
    _schedule_kernel[(tq, bs, nv)](WIN=win, KEEP=keep, PERM=perms, CODES=codes, LIST=lst, CNT=cnt,
                                   stride_win_b=win_sb, stride_keep_b=keep_sb, stride_perm_b=perm_sb,
                                   stride_perm_v=perm_vs, P=P, GH=gh, GW=gw, NBX=lay.nbx, TQ=tq, TK=tk, BS=bs,
                                   BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, KC=kc, R=rects, ORDER=lay.order,
                                   TW=lay.tw, TH=lay.th, HAS_KEEP=key_keep is not None, QMODE=qmode)
    choice = torch.empty(1, dtype=torch.int32, device=dev)  # unused unless auto
    perm = perms[0] if orders else perms
    if qmode == 2:
        choice = torch.empty(bs, dtype=torch.int32, device=dev)
        _choice_kernel[(bs,)](CNT=cnt, CHOICE=choice, BS=bs, TQ=tq, NV=nv,
                              C=min(triton.next_power_of_2(2 * tq), 16 if interp else 1024))
        if len(orders) > 1:  # the kernels read one perm per image: the chosen order's (on the device, no sync)
            img = torch.arange(bs, device=dev) if bw > 1 else torch.zeros(bs, dtype=torch.int64, device=dev)
            perm = perms[(choice.long() - 1).clamp(min=0), img]
            perm_sb = S if bs > 1 else 0
    qtab, qwin, qout = _slot_tables(win, win_sb, perm, perm_sb, choice, grid, lay, tq * cfg.block_m, bs, qmode)
    return Schedule(cfg, lay, grid, P, tq, tk, bs, qmode, keep, keep_sb, choice, codes, lst, cnt, qtab, qwin, qout)


def _slot_tables(win, win_sb, perm, perm_sb, choice, grid, lay: _Layout, S: int, bs: int, qmode: int):
    """The per-slot tables the kernels read (one ``_slot_tables_kernel`` launch): the query table,
    the slot-ordered windows and the outside indicators. The outside table's rows (``RW``) hold
    ``GWP = nbx * tw`` column and ``GHP = nby * th`` row indicators and at least 16 spare columns,
    a multiple of 16 in all; bfloat16 on a GPU (float32 in the interpreter, which has no
    bfloat16). Row-major layouts get a dummy outside table."""
    gh, gw = grid
    dev = win.device
    qtab = torch.empty((bs, S), dtype=torch.int32, device=dev)
    qwin = torch.empty((bs, S, 4), dtype=torch.int32, device=dev)
    gwp, ghp = lay.nbx * lay.tw, lay.nby * lay.th
    rw = (gwp + ghp) // 16 * 16 + 32 if lay.order == TILED else 16
    qout = torch.empty((bs, S, rw) if lay.order == TILED else (1, 1, rw),
                       dtype=torch.float32 if interpreting() else torch.bfloat16, device=dev)
    br = 16  # slots per program: a 16 x RW indicator tile, no spills on sm_80 with 4 warps
    _slot_tables_kernel[(triton.cdiv(S, br), bs)](WIN=win, PERM=perm, CHOICE=choice, QTAB=qtab, QWIN=qwin, QOUT=qout,
                                                  stride_win_b=win_sb, stride_perm_b=perm_sb, S=S, GH=gh, GW=gw,
                                                  NBX=lay.nbx, ORDER=lay.order, TW=lay.tw, TH=lay.th, QMODE=qmode,
                                                  GWP=gwp, GHP=ghp, RW=rw, RWP=triton.next_power_of_2(rw), BR=br)
    return qtab, qwin, qout


_SCHEDULES = TensorCache(8)


def cached_schedule(windows: torch.Tensor, key_keep: Optional[torch.Tensor], grid: Tuple[int, int], P: int,
                    batch_size: int, cfg: Config) -> Schedule:
    """:func:`build_schedule`, reused while the same ``windows`` / ``key_keep`` tensors are unchanged
    (:class:`vitpatch._cache.TensorCache`): the blocks of a ViT, and the backward pass, see the same
    mask tensors, so one schedule serves them all."""
    return _SCHEDULES.get_or_build((windows, key_keep), (grid, P, batch_size, cfg.schedule_key, windows.device),
                                   lambda: build_schedule(windows, key_keep, grid, P, batch_size, cfg))


# ================================================================================ tile helpers
def resolve_config(block_m: int, block_n: int, order=None, unit: Optional[int] = None,
                   query_order: Optional[str] = None) -> Config:
    """A :class:`Config` from block sizes and optional layout choices (names or constants)."""
    if isinstance(order, str):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {sorted(ORDERS)}, got {order!r}")
        order = ORDERS[order]
    return Config(block_m, block_n, TILED if order is None else order, 64 if unit is None else unit,
                  "auto" if query_order is None else query_order)


def _schedule_for(windows, key_keep, grid, num_prefix_tokens, batch_size, block_m, block_n, order, unit,
                  query_order) -> Schedule:
    if not isinstance(windows, torch.Tensor):
        raise TypeError(f"windows must be an integer tensor (n, 4) or (B, n, 4), got {type(windows).__name__}")
    cfg = resolve_config(block_m, block_n, order, unit, query_order)
    return build_schedule(windows, key_keep, tuple(grid), num_prefix_tokens, batch_size, cfg)


def tile_codes(windows: torch.Tensor, key_keep: Optional[torch.Tensor], grid: Tuple[int, int],
               num_prefix_tokens: int, batch_size: int, block_m: int = 64, block_n: int = 64, *, order=None,
               unit: Optional[int] = None, query_order: Optional[str] = None) -> torch.Tensor:
    """The kernels' tile schedule over the patch tiles: int8 ``(B, TQ, TK)``, 0 skip / 1 masked / 2 full.

    Built by the launch the kernels use (:func:`build_schedule`), for the query order each image
    runs (:func:`query_tokens` says which query sits in which slot). Prefix tokens are not part
    of it: the kernels always visit the prefix keys (one narrow block) and the prefix queries
    visit every key tile. ``order`` ``"tiled"`` (default) or ``"row_major"`` (key layout);
    ``unit`` the tiled square (default 64, 8 x 8); ``query_order`` ``"auto"`` (default),
    ``"spatial"``, ``"sorted"``, ``"grouped"`` or ``"best"`` (with ``grouped``, ``TQ`` may exceed
    ``cdiv(n, block_m)``).
    """
    sched = _schedule_for(windows, key_keep, grid, num_prefix_tokens, batch_size, block_m, block_n, order, unit,
                          query_order)
    return sched.chosen_codes().expand(batch_size, -1, -1)


def query_tokens(windows: torch.Tensor, key_keep: Optional[torch.Tensor], grid: Tuple[int, int],
                 num_prefix_tokens: int, batch_size: int, block_m: int = 64, block_n: int = 64, *, order=None,
                 unit: Optional[int] = None, query_order: Optional[str] = None) -> torch.Tensor:
    """The token in each query slot of each image, int64 ``(B, TQ * block_m)`` (``-1`` padding)."""
    sched = _schedule_for(windows, key_keep, grid, num_prefix_tokens, batch_size, block_m, block_n, order, unit,
                          query_order)
    return sched.query_tokens().expand(batch_size, -1)


def tile_schedule(*args, **kwargs) -> torch.Tensor:
    """Which (query tile, key tile) pairs of patch slots the kernels visit: bool ``(B, TQ, TK)`` (args of :func:`tile_codes`)."""
    return tile_codes(*args, **kwargs) > 0


def visited_fraction(windows: torch.Tensor, key_keep: Optional[torch.Tensor], grid: Tuple[int, int],
                     num_prefix_tokens: int, batch_size: int, block_m: int = 64, block_n: int = 64, **layout) -> float:
    """Visited patch tile pairs over the dense count ``cdiv(n, block_m) * TK``, averaged over images
    (args of :func:`tile_codes`).

    The denominator is the dense query-tile count, not the schedule's ``TQ``: ``TQ`` includes the
    spatial order's padding tiles and partly filled ``grouped`` tiles, and would shrink the
    fraction by adding tiles that visit nothing.
    """
    vis = tile_schedule(windows, key_keep, grid, num_prefix_tokens, batch_size, block_m, block_n, **layout)
    return _dense_fraction(vis, grid, block_m)


def _dense_fraction(vis: torch.Tensor, grid: Tuple[int, int], block_m: int) -> float:
    """``vis (B, TQ, TK)``: visited pairs per image over ``cdiv(n, block_m) * TK``, mean over images."""
    dense = triton.cdiv(grid[0] * grid[1], block_m) * vis.shape[-1]
    return float(vis.sum((1, 2)).double().mean()) / dense
