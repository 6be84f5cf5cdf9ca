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
``O(n)`` windows. What makes the kernel fast is tile skipping:

* **Key tiles** are compact pieces of the patch grid: patches are laid out in *slots*,
  ``TILED`` (default) grouping the grid into ``TH x TW`` squares of ``unit`` slots (8 x 8 for
  64) and ``ROW_MAJOR`` keeping the token order. A key tile is then one rectangle of the grid
  (at most three for a row-major run), which a rectangular window covers entirely or misses
  far more often than a strip of rows. Slots past the grid's edge are padding. The layout is
  index arithmetic in the kernels (``_slot_patch``): nothing is copied, results land in token
  order.
* **Query tiles** are ``spatial`` (the same squares) or ``sorted``: the patch queries ordered
  by a 4-D Morton code of their windows ``(x_left, y_top, x_right, y_bottom)``, so a tile holds
  queries with similar windows and the union of its windows stays small. AWD windows (a patch
  plus far-away partners) defeat spatial query tiles, large square windows favour them
  (``bench/window_tile_order.py``), so by default (``auto``) both schedules are built and each
  image uses the one with fewer visited tiles, decided on the device (no host sync).
* **Prefix tokens** stay out of the tiles: every patch-query tile visits the ``P`` prefix keys
  in one narrow block (16 to 64 wide), and the prefix queries have their own narrow block that
  visits every key tile.
* **Schedule.** One launch (``_schedule_kernel``, a program per query tile, image and query
  order) classifies every (query tile, key tile) pair by testing the tile's windows against
  the key tile's rectangles: ``0`` skip (no window reaches it, or all its keys are dropped),
  ``1`` masked (the element mask is evaluated), ``2`` full (the key tile lies inside every
  window of the query tile and has no padding and no dropped key: no element mask at all). It
  writes the ``(V, Bs, TQ, TK)`` int8 code table and, per query tile, the compacted list of key
  tiles (masked first, full at the end of the row). The backward pass compacts the columns
  (``_transpose_kernel``), so a key tile visits only the query tiles that reach it. ``Bs = 1``
  for shared windows without ``key_keep``: one schedule for the batch (batch stride 0). A
  schedule is kept (weakly keyed on the mask tensors and their version counters) and reused
  by every block of a model that passes the same mask, forward and backward.

Helpers for tests and benchmarks, built by the launcher's own code path: :func:`tile_codes`,
:func:`tile_schedule`, :func:`visited_fraction`, :func:`query_tokens`, :func:`slot_tokens`.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from vitpatch import _env
from vitpatch.masks import WindowMask

__all__ = ["window_attention", "window_attention_unsupported", "tile_codes", "tile_schedule", "visited_fraction",
           "query_tokens", "slot_tokens", "Config", "ROW_MAJOR", "TILED", "QUERY_ORDERS", "SUPPORTED_HEAD_DIMS"]

ROW_MAJOR, TILED = 0, 1
ORDERS = {"row_major": ROW_MAJOR, "tiled": TILED}
QUERY_ORDERS = ("spatial", "sorted", "auto")
SUPPORTED_HEAD_DIMS = (16, 128)
_LOG2E = 1.4426950408889634


# ================================================================================ configuration
def _unit_shape(unit: int) -> Tuple[int, int]:
    """``(TW, TH)`` of a ``TILED`` square of ``unit`` slots: ``TW = 2^ceil(log2(unit) / 2)``."""
    tw = 1 << ((unit.bit_length() - 1 + 1) // 2)
    return tw, unit // tw


@dataclass(frozen=True)
class Config:
    """One launch configuration.

    ``block_m`` query slots and ``block_n`` key slots per tile (powers of two, >= 16);
    ``order`` the key layout, ``ROW_MAJOR`` or ``TILED``; ``unit`` the slots of one ``TILED``
    square (``TH x TW``, ``TW = 2^ceil(log2(unit) / 2)``: 8 x 8 for 64); ``query_order``
    ``"spatial"``, ``"sorted"`` or ``"auto"``; ``num_warps``, ``num_stages`` (GPU only).
    """

    block_m: int
    block_n: int
    order: int = TILED
    unit: int = 64
    query_order: str = "auto"
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n", "unit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a positive power of two, got {value!r}")
        for name in ("block_m", "block_n"):
            if getattr(self, name) < 16:
                raise ValueError(f"{name} must be at least 16 (tl.dot), got {getattr(self, name)}")
        if self.order not in (ROW_MAJOR, TILED):
            raise ValueError(f"order must be ROW_MAJOR (0) or TILED (1), got {self.order!r}")
        if self.order == TILED and self.unit < 4:
            raise ValueError(f"unit must be at least 4 for the TILED order, got {self.unit}")
        if self.query_order not in QUERY_ORDERS:
            raise ValueError(f"query_order must be one of {QUERY_ORDERS}, got {self.query_order!r}")
        if self.order == TILED:
            tw = _unit_shape(self.unit)[0]
            for name in ("block_m", "block_n"):
                b = getattr(self, name)
                if b < self.unit and b % tw:
                    raise ValueError(f"{name} = {b} must be a multiple of the square width {tw} (unit {self.unit})")


# The interpreter (CPU) runs exactly this config: small tiles, 4 x 4 squares.
INTERPRET_CONFIG = Config(16, 16, TILED, 16, "auto", 1, 1)
# Timed on GPU per (N, d, dtype); 8 x 8 squares throughout (bench/window_tile_order.py).
FWD_CONFIGS = [Config(64, 64, TILED, 64, "auto", 4, 3), Config(128, 64, TILED, 64, "auto", 8, 3),
               Config(64, 32, TILED, 64, "auto", 4, 3), Config(32, 64, TILED, 64, "auto", 4, 3),
               Config(32, 32, TILED, 64, "auto", 2, 3)]
BWD_CONFIGS = [Config(64, 64, TILED, 64, "auto", 4, 2), Config(32, 64, TILED, 64, "auto", 4, 2),
               Config(64, 32, TILED, 64, "auto", 4, 2), Config(32, 32, TILED, 64, "auto", 2, 2)]


@dataclass(frozen=True)
class _Layout:
    """Slot layout of the patch keys: ``slots`` slots in ``nbx x nby`` squares of ``tw x th``."""

    order: int
    unit: int
    tw: int
    th: int
    nbx: int
    nby: int
    slots: int


def _layout(grid: Tuple[int, int], cfg: Config) -> _Layout:
    gh, gw = grid
    if cfg.order == ROW_MAJOR:
        return _Layout(ROW_MAJOR, cfg.unit, 1, 1, 1, 1, gh * gw)
    tw, th = _unit_shape(cfg.unit)
    nbx, nby = triton.cdiv(gw, tw), triton.cdiv(gh, th)
    return _Layout(TILED, cfg.unit, tw, th, nbx, nby, nbx * nby * cfg.unit)


def slot_tokens(grid, num_prefix_tokens: int = 0, order: int = TILED, unit: int = 64) -> torch.Tensor:
    """The token index held by each key slot (``-1`` for a padding slot), int64 ``(slots,)``.

    The host-side statement of the layout the kernels compute by index arithmetic
    (``_slot_patch``): ``ROW_MAJOR`` is the patch order itself; ``TILED`` walks ``TH x TW``
    squares in row-major order of squares, row-major inside each square.
    """
    gh, gw = grid
    lay = _layout((gh, gw), Config(16, 16, order, unit))
    s = torch.arange(lay.slots)
    if order == ROW_MAJOR:
        return s + num_prefix_tokens
    blk, loc = s // unit, s % unit
    x = (blk % lay.nbx) * lay.tw + loc % lay.tw
    y = (blk // lay.nbx) * lay.th + loc // lay.tw
    valid = (x < gw) & (y < gh)
    return torch.where(valid, num_prefix_tokens + y * gw + x, torch.full_like(s, -1))


def _prefix_block(P: int) -> int:
    """Width of the narrow block that holds prefix tokens: a power of two in [16, 64]."""
    return min(64, max(16, triton.next_power_of_2(max(P, 1))))


# ================================================================================ kernels
def _device_fn(fn):
    """``@triton.jit`` for a device helper; under the interpreter, the plain function.

    Triton's interpreter re-patches ``triton.language`` on every call of a jitted helper (about
    half a millisecond each), a large share of the CPU test time; a plain function called from
    an interpreted kernel runs the same source in the language the kernel already patched. On
    GPU this is exactly ``triton.jit``.
    """
    jitted = triton.jit(fn)
    return fn if type(jitted).__name__ == "InterpretedFunction" else jitted


@_device_fn
def _slot_patch(slot, GH, GW, NBX, ORDER: tl.constexpr, TW: tl.constexpr, TH: tl.constexpr):
    """Patch index, column, row and validity of key-layout slots (the in-kernel ``slot_tokens``)."""
    if ORDER == 0:
        valid = slot < GH * GW
        p = tl.where(valid, slot, 0)
        x = p % GW
        y = p // GW
    else:
        blk = slot // (TW * TH)
        loc = slot % (TW * TH)
        x = (blk % NBX) * TW + loc % TW
        y = (blk // NBX) * TH + loc // TW
        valid = (x < GW) & (y < GH)
        p = tl.where(valid, y * GW + x, 0)
    return p, x, y, valid


@_device_fn
def _query_patch(slot, PERM, n, GH, GW, NBX, use_sorted, ORDER: tl.constexpr, TW: tl.constexpr, TH: tl.constexpr,
                 QMODE: tl.constexpr):
    """Patch index and validity of query slots: ``QMODE`` 0 spatial (the key layout), 1 sorted
    (``PERM``, this image's queries by window code), 2 per image (``use_sorted`` picks)."""
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


@_device_fn
def _ktile_rect(kt, r: tl.constexpr, GH, GW, NBX, BN: tl.constexpr, ORDER: tl.constexpr, TW: tl.constexpr,
                TH: tl.constexpr):
    """Rectangle ``r`` of the footprint of key tiles ``kt`` on the grid: ``(x0, y0, x1, y1)``, inclusive.

    A row-major run of ``BN`` patches is at most three rectangles (partial first row, full
    middle rows, partial last row); a ``TILED`` tile is one rectangle (rows of a square) or
    ``BN / unit`` whole squares. Empty rectangles have ``y0 > y1``.
    """
    zero = kt * 0
    if ORDER == 0:
        n = GH * GW
        a = kt * BN
        e = tl.minimum(a + BN, n) - 1
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
        if BN <= TW * TH:
            start = kt * BN
            blk = start // (TW * TH)
            y_off = ((start % (TW * TH)) // BN) * (BN // TW)
            rows = BN // TW
        else:
            blk = kt * (BN // (TW * TH)) + r
            y_off = zero
            rows = TH
        x0 = (blk % NBX) * TW
        x1 = tl.minimum(x0 + TW, GW) - 1
        y0 = (blk // NBX) * TH + y_off
        y1 = tl.minimum(y0 + rows, GH) - 1
    return x0, y0, x1, y1


@triton.jit
def _window_code_kernel(WIN, CODE, n, win_sb, BITS: tl.constexpr, BR: tl.constexpr):
    """4-D Morton code of each window ``(x_left, y_top, x_right, y_bottom)`` (bits interleaved), int64."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    b = tl.program_id(1)
    valid = rows < n
    code = tl.zeros([BR], tl.int64)
    for c in tl.static_range(4):
        coord = tl.load(WIN + b * win_sb + rows * 4 + c, mask=valid, other=0).to(tl.int64)
        for bit in tl.static_range(BITS):
            code = code | (((coord >> bit) & 1) << (4 * bit + c))
    tl.store(CODE + b * n + rows, code, mask=valid)


@triton.jit
def _schedule_kernel(WIN, KEEP, PERM, CODES, LIST, CNT, win_sb, keep_sb, perm_sb, P, GH, GW, NBX, TQ, TK, BS,
                     BM: tl.constexpr, BN: tl.constexpr, KC: tl.constexpr, R: tl.constexpr, ORDER: tl.constexpr,
                     TW: tl.constexpr, TH: tl.constexpr, HAS_KEEP: tl.constexpr, QMODE: tl.constexpr):
    """Row ``qt`` of image ``b`` (query order ``v``) of the schedule: codes (0 skip, 1 masked,
    2 full) and the visit list. ``O(BM * TK * R)`` integer tests: windows against key-tile
    rectangles, never against individual keys (apart from the tile's ``key_keep`` bits)."""
    qt = tl.program_id(0)
    b = tl.program_id(1)
    v = tl.program_id(2)
    pq, qv = _query_patch(qt * BM + tl.arange(0, BM), PERM + b * perm_sb, GH * GW, GH, GW, NBX, v == 1, ORDER, TW,
                          TH, QMODE)
    wp = WIN + b * win_sb + pq * 4
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
        kp, _, _, kv = _slot_patch(kt[:, None] * BN + tl.arange(0, BN)[None, :], GH, GW, NBX, ORDER, TW, TH)
        kv = kv & kin[:, None]
        if HAS_KEEP:
            kok = kv & (tl.load(KEEP + b * keep_sb + P + kp, mask=kv, other=0) != 0)
        else:
            kok = kv
        any_kept = tl.max(kok.to(tl.int32), 1) > 0
        all_kept = tl.min(kok.to(tl.int32), 1) > 0
        hit = tl.zeros([BM, KC], tl.int32)
        outside = tl.zeros([BM, KC], tl.int32)
        for r in tl.static_range(R):
            x0, y0, x1, y1 = _ktile_rect(kt, r, GH, GW, NBX, BN, ORDER, TW, TH)
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
        cm = tl.cumsum(masked.to(tl.int32), 0)
        cf = tl.cumsum(full.to(tl.int32), 0)
        tl.store(LIST + row * TK + n_m + cm - 1, kt, mask=masked)
        tl.store(LIST + row * TK + TK - n_f - cf, kt, mask=full)
        n_m += tl.sum(masked.to(tl.int32), 0)
        n_f += tl.sum(full.to(tl.int32), 0)
    tl.store(CNT + row * 2, n_m)
    tl.store(CNT + row * 2 + 1, n_f)


@triton.jit
def _choice_kernel(CNT, CHOICE, BS, TQ, C: tl.constexpr):
    """Per image: 1 if the sorted query order visits fewer tiles than the spatial one, else 0."""
    b = tl.program_id(0)
    tot0 = 0
    tot1 = 0
    for c in range(0, TQ * 2, C):
        i = c + tl.arange(0, C)
        m = i < TQ * 2
        tot0 += tl.sum(tl.load(CNT + b * TQ * 2 + i, mask=m, other=0), 0)
        tot1 += tl.sum(tl.load(CNT + (BS + b) * TQ * 2 + i, mask=m, other=0), 0)
    tl.store(CHOICE + b, (tot1 < tot0).to(tl.int32))


@triton.jit
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
        masked = code == 1
        full = code == 2
        cm = tl.cumsum(masked.to(tl.int32), 0)
        cf = tl.cumsum(full.to(tl.int32), 0)
        tl.store(LIST_T + row * TQ + n_m + cm - 1, qt, mask=masked)
        tl.store(LIST_T + row * TQ + TQ - n_f - cf, qt, mask=full)
        n_m += tl.sum(masked.to(tl.int32), 0)
        n_f += tl.sum(full.to(tl.int32), 0)
    tl.store(CNT_T + row * 2, n_m)
    tl.store(CNT_T + row * 2 + 1, n_f)


@_device_fn
def _load_rows(base, tok, valid, s_n, d_off, dmask):
    """Rows ``tok`` of an ``(N, d)`` slice: zeros where not ``valid`` and past the head width."""
    return tl.load(base + tok[:, None] * s_n + d_off[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)


@_device_fn
def _patch_keys(kt, keep_b, P, GH, GW, NBX, BN: tl.constexpr, ORDER: tl.constexpr, TW: tl.constexpr,
                TH: tl.constexpr, HAS_KEEP: tl.constexpr):
    """Token index, column, row, validity and allowed-ness (valid and kept) of key tile ``kt``."""
    kp, kx, ky, kv = _slot_patch(kt * BN + tl.arange(0, BN), GH, GW, NBX, ORDER, TW, TH)
    kok = kv
    if HAS_KEEP:
        kok = kv & (tl.load(keep_b + P + kp, mask=kv, other=0) != 0)
    return P + kp, kx, ky, kv, kok


@_device_fn
def _prefix_keys(p0, keep_b, P, PB: tl.constexpr, HAS_KEEP: tl.constexpr):
    """Token index, validity and allowed-ness of the prefix block starting at ``p0``."""
    tok = p0 + tl.arange(0, PB)
    kv = tok < P
    kok = kv
    if HAS_KEEP:
        kok = kv & (tl.load(keep_b + tok, mask=kv, other=0) != 0)
    return tok, kv, kok


@_device_fn
def _load_window(WIN, win_b, pq, qv):
    wp = WIN + win_b + pq * 4
    return (tl.load(wp + 0, mask=qv, other=0), tl.load(wp + 1, mask=qv, other=0),
            tl.load(wp + 2, mask=qv, other=0), tl.load(wp + 3, mask=qv, other=0))


@_device_fn
def _inside(wx0, wy0, wx1, wy1, kx, ky):
    """``[BM, BN]``: key patch ``(kx, ky)`` lies inside the query's window (docs/math.md §1)."""
    return (kx[None, :] >= wx0[:, None]) & (kx[None, :] <= wx1[:, None]) & \
           (ky[None, :] >= wy0[:, None]) & (ky[None, :] <= wy1[:, None])


@_device_fn
def _online_step(acc, m_i, l_i, s, v, DOT_PREC: tl.constexpr):
    """One key tile of the online softmax (base 2; ``s`` already scaled, ``-inf`` where not allowed)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
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
        pq, qv = _query_patch(pid * BM + tl.arange(0, BM), PERM + b * perm_sb, GH * GW, GH, GW, NBX, vsel != 0,
                              ORDER, TW, TH, QMODE)
        tok_q = P + pq
        wx0, wy0, wx1, wy1 = _load_window(WIN, b * win_sb, pq, qv)
    q = _load_rows(Q + b64 * sqb + h * sqh, tok_q, qv, sqn, offs_d * sqd, dmask)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    # prefix keys: every query attends them (minus dropped ones)
    for p0 in range(0, P, PB):
        tok_k, kv, kok = _prefix_keys(p0, keep_b, P, PB, HAS_KEEP)
        k = _load_rows(Kb, tok_k, kv, skn, kd, dmask)
        v = _load_rows(Vb, tok_k, kv, svn, vd, dmask)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(kok[None, :], s, float("-inf"))
        acc, m_i, l_i = _online_step(acc, m_i, l_i, s, v, DOT_PREC)
    if PREFIX_Q:
        # prefix queries attend every patch key: all tiles, mask = valid and kept
        for kt in range(0, TK):
            tok_k, _, _, kv, kok = _patch_keys(kt, keep_b, P, GH, GW, NBX, BN, ORDER, TW, TH, HAS_KEEP)
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
        for i in range(0, n_m):
            kt = tl.load(LIST + row * TK + i)
            tok_k, kx, ky, kv, kok = _patch_keys(kt, keep_b, P, GH, GW, NBX, BN, ORDER, TW, TH, HAS_KEEP)
            k = _load_rows(Kb, tok_k, kv, skn, kd, dmask)
            v = _load_rows(Vb, tok_k, kv, svn, vd, dmask)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            s = tl.where(_inside(wx0, wy0, wx1, wy1, kx, ky) & kok[None, :], s, float("-inf"))
            acc, m_i, l_i = _online_step(acc, m_i, l_i, s, v, DOT_PREC)
            if RECORD:
                tl.store(rec + kt, 1)
        # key tiles inside every window of the query tile: no element mask
        for i in range(TK - n_f, TK):
            kt = tl.load(LIST + row * TK + i)
            tok_k, _, _, kv, _ = _patch_keys(kt, keep_b, P, GH, GW, NBX, BN, ORDER, TW, TH, False)
            k = _load_rows(Kb, tok_k, kv, skn, kd, dmask)
            v = _load_rows(Vb, tok_k, kv, svn, vd, dmask)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            acc, m_i, l_i = _online_step(acc, m_i, l_i, s, v, DOT_PREC)
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


@triton.jit
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


@_device_fn
def _dq_step(dq, q, do, lse, delta, k, v, allowed, qk_scale, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """``dq += (p * (dout . v - delta)) k`` for one key tile (``p`` recomputed from ``lse``)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)


@triton.jit
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
        pq, qv = _query_patch(pid * BM + tl.arange(0, BM), PERM + b * perm_sb, GH * GW, GH, GW, NBX, vsel != 0,
                              ORDER, TW, TH, QMODE)
        tok_q = P + pq
        wx0, wy0, wx1, wy1 = _load_window(WIN, b * win_sb, pq, qv)
    q = _load_rows(Q + b64 * sqb + h * sqh, tok_q, qv, sqn, offs_d * sqd, dmask)
    do = _load_rows(DO + b64 * sdb + h * sdh, tok_q, qv, sdn, offs_d * sdd, dmask)
    lse = tl.load(LSE + (b64 * H + h) * N + tok_q, mask=qv, other=float("inf"))
    delta = tl.load(DELTA + (b64 * H + h) * N + tok_q, mask=qv, other=0.0)
    dq = tl.zeros([BM, BD], tl.float32)
    for p0 in range(0, P, PB):
        tok_k, kv, kok = _prefix_keys(p0, keep_b, P, PB, HAS_KEEP)
        k = _load_rows(Kb, tok_k, kv, skn, kd, dmask)
        v = _load_rows(Vb, tok_k, kv, svn, vd, dmask)
        dq = _dq_step(dq, q, do, lse, delta, k, v, kok[None, :], qk_scale, True, DOT_PREC)
    if PREFIX_Q:
        for kt in range(0, TK):
            tok_k, _, _, kv, kok = _patch_keys(kt, keep_b, P, GH, GW, NBX, BN, ORDER, TW, TH, HAS_KEEP)
            k = _load_rows(Kb, tok_k, kv, skn, kd, dmask)
            v = _load_rows(Vb, tok_k, kv, svn, vd, dmask)
            dq = _dq_step(dq, q, do, lse, delta, k, v, kok[None, :], qk_scale, True, DOT_PREC)
    else:
        row = (vsel * BS + bsch) * TQ + pid
        n_m = tl.load(CNT + row * 2)
        n_f = tl.load(CNT + row * 2 + 1)
        rec = REC + ((b * H + h) * TQ + pid) * TK
        for i in range(0, n_m):
            kt = tl.load(LIST + row * TK + i)
            tok_k, kx, ky, kv, kok = _patch_keys(kt, keep_b, P, GH, GW, NBX, BN, ORDER, TW, TH, HAS_KEEP)
            k = _load_rows(Kb, tok_k, kv, skn, kd, dmask)
            v = _load_rows(Vb, tok_k, kv, svn, vd, dmask)
            allowed = _inside(wx0, wy0, wx1, wy1, kx, ky) & kok[None, :]
            dq = _dq_step(dq, q, do, lse, delta, k, v, allowed, qk_scale, True, DOT_PREC)
            if RECORD:
                tl.store(rec + kt, 1)
        for i in range(TK - n_f, TK):
            kt = tl.load(LIST + row * TK + i)
            tok_k, _, _, kv, _ = _patch_keys(kt, keep_b, P, GH, GW, NBX, BN, ORDER, TW, TH, False)
            k = _load_rows(Kb, tok_k, kv, skn, kd, dmask)
            v = _load_rows(Vb, tok_k, kv, svn, vd, dmask)
            dq = _dq_step(dq, q, do, lse, delta, k, v, kv[None, :], qk_scale, False, DOT_PREC)
            if RECORD:
                tl.store(rec + kt, 2)
    gb = DQ + b64 * sgb + h * sgh
    tl.store(gb + tok_q[:, None] * sgn + (offs_d * sgd)[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=qv[:, None] & dmask[None, :])


@_device_fn
def _dkdv_step(dk, dv, q, do, lse, delta, k, v, allowed, qk_scale, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """``dv += p^T dout`` and ``dk += (p * (dout . v - delta))^T q`` for one query tile."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    dv = dv + tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dk = dk + tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    return dk, dv


@_device_fn
def _load_query_side(Qb, DOb, LSEb, DELTAb, tok_q, qv, sqn, sdn, qd, dd, dmask):
    q = _load_rows(Qb, tok_q, qv, sqn, qd, dmask)
    do = _load_rows(DOb, tok_q, qv, sdn, dd, dmask)
    lse = tl.load(LSEb + tok_q, mask=qv, other=float("inf"))
    delta = tl.load(DELTAb + tok_q, mask=qv, other=0.0)
    return q, do, lse, delta


@triton.jit
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
        tok_k, kx, ky, kv, kok = _patch_keys(pid, keep_b, P, GH, GW, NBX, BN, ORDER, TW, TH, HAS_KEEP)
    k = _load_rows(K + b64 * skb + h * skh, tok_k, kv, skn, offs_d * skd, dmask)
    v = _load_rows(V + b64 * svb + h * svh, tok_k, kv, svn, offs_d * svd, dmask)
    Qb = Q + b64 * sqb + h * sqh
    DOb = DO + b64 * sdb + h * sdh
    LSEb = LSE + (b64 * H + h) * N
    DELTAb = DELTA + (b64 * H + h) * N
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    # prefix queries attend every key
    for p0 in range(0, P, PB):
        tok_q = p0 + tl.arange(0, PB)
        q, do, lse, delta = _load_query_side(Qb, DOb, LSEb, DELTAb, tok_q, tok_q < P, sqn, sdn, qd, dd, dmask)
        dk, dv = _dkdv_step(dk, dv, q, do, lse, delta, k, v, kok[None, :], qk_scale, True, DOT_PREC)
    if PREFIX_K:
        # every patch query attends the prefix keys
        for qt in range(0, TQ):
            pq, qv = _query_patch(qt * BM + tl.arange(0, BM), perm_b, GH * GW, GH, GW, NBX, vsel != 0, ORDER, TW, TH,
                                  QMODE)
            q, do, lse, delta = _load_query_side(Qb, DOb, LSEb, DELTAb, P + pq, qv, sqn, sdn, qd, dd, dmask)
            dk, dv = _dkdv_step(dk, dv, q, do, lse, delta, k, v, kok[None, :], qk_scale, True, DOT_PREC)
    else:
        row = bsch * TK + pid
        n_m = tl.load(CNT_T + row * 2)
        n_f = tl.load(CNT_T + row * 2 + 1)
        rec = REC + ((b * H + h) * TK + pid) * TQ
        for i in range(0, n_m):
            qt = tl.load(LIST_T + row * TQ + i)
            pq, qv = _query_patch(qt * BM + tl.arange(0, BM), perm_b, GH * GW, GH, GW, NBX, vsel != 0, ORDER, TW, TH,
                                  QMODE)
            q, do, lse, delta = _load_query_side(Qb, DOb, LSEb, DELTAb, P + pq, qv, sqn, sdn, qd, dd, dmask)
            wx0, wy0, wx1, wy1 = _load_window(WIN, b * win_sb, pq, qv)
            allowed = _inside(wx0, wy0, wx1, wy1, kx, ky) & kok[None, :]
            dk, dv = _dkdv_step(dk, dv, q, do, lse, delta, k, v, allowed, qk_scale, True, DOT_PREC)
            if RECORD:
                tl.store(rec + qt, 1)
        for i in range(TQ - n_f, TQ):
            qt = tl.load(LIST_T + row * TQ + i)
            pq, qv = _query_patch(qt * BM + tl.arange(0, BM), perm_b, GH * GW, GH, GW, NBX, vsel != 0, ORDER, TW, TH,
                                  QMODE)
            q, do, lse, delta = _load_query_side(Qb, DOb, LSEb, DELTAb, P + pq, qv, sqn, sdn, qd, dd, dmask)
            dk, dv = _dkdv_step(dk, dv, q, do, lse, delta, k, v, kok[None, :], qk_scale, False, DOT_PREC)
            if RECORD:
                tl.store(rec + qt, 2)
    out_mask = kv[:, None] & dmask[None, :]
    g_off = b64 * sgb + h * sgh + tok_k[:, None] * sgn + (offs_d * sgd)[None, :]
    tl.store(DK + g_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=out_mask)


# ================================================================================ launchers
def _interpreting(t: torch.Tensor) -> bool:
    return not t.is_cuda


def _keep_arg(key_keep: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``key_keep`` as uint8 (a view), or a dummy pointer when there is none."""
    if key_keep is None:
        return torch.empty(1, dtype=torch.uint8, device=like.device)
    return key_keep.contiguous().view(torch.uint8)


_QMODES = {"spatial": 0, "sorted": 1, "auto": 2}


@dataclass
class _Schedule:
    """The tile schedule of one (mask, batch, config): what every kernel launch reads.

    ``V`` query orders are scheduled (2 for ``auto``: spatial then sorted, else 1); ``Bs`` is 1
    for shared windows without ``key_keep``, else the batch.
    """

    cfg: Config
    layout: _Layout
    grid: Tuple[int, int]
    P: int
    tq: int
    tk: int
    bs: int
    qmode: int
    windows: torch.Tensor  # contiguous int32 (n, 4) or (B, n, 4)
    win_sb: int
    keep: torch.Tensor     # uint8 key_keep (B, N), or a dummy
    keep_sb: int
    perm: torch.Tensor     # (Bw, n) int64: queries sorted by window code (sorted/auto), or a dummy
    perm_sb: int
    choice: torch.Tensor   # (Bs,) int32: 1 = sorted order (auto), or a dummy
    codes: torch.Tensor    # (V, Bs, TQ, TK) int8: 0 skip, 1 masked, 2 full
    lst: torch.Tensor      # (V, Bs, TQ, TK) int32: visited key tiles, masked ones first, full ones last
    cnt: torch.Tensor      # (V, Bs, TQ, 2) int32: numbers of masked and full key tiles
    _transposed: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def kernel_args(self) -> tuple:
        return (self.windows, self.keep, self.perm, self.choice)

    def transposed(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per key tile, the query tiles that visit it: ``(list (Bs, TK, TQ), counts (Bs, TK, 2))`` (built once)."""
        if self._transposed is not None:
            return self._transposed
        dev = self.codes.device
        lst = torch.empty((self.bs, self.tk, self.tq), dtype=torch.int32, device=dev)
        cnt = torch.empty((self.bs, self.tk, 2), dtype=torch.int32, device=dev)
        qc = min(triton.next_power_of_2(self.tq), 128)
        _transpose_kernel[(self.tk, self.bs)](self.codes, self.choice, lst, cnt, self.tq, self.tk, self.bs, QC=qc,
                                              QMODE=self.qmode)
        self._transposed = (lst, cnt)
        return lst, cnt

    def chosen_codes(self) -> torch.Tensor:
        """``(Bs, TQ, TK)``: the codes of the query order each image runs."""
        if self.qmode != 2:
            return self.codes[0]
        return self.codes[self.choice.long(), torch.arange(self.bs, device=self.codes.device)]

    def query_tokens(self) -> torch.Tensor:
        """``(Bs, TQ * BM)`` int64: the token in each query slot of each image (``-1`` padding)."""
        n = self.grid[0] * self.grid[1]
        S = self.tq * self.cfg.block_m
        dev = self.codes.device
        if self.qmode != 1:
            spatial = slot_tokens(self.grid, self.P, self.cfg.order, self.cfg.unit).to(dev)
            spatial = torch.cat([spatial, spatial.new_full((S - spatial.numel(),), -1)])[None].expand(self.bs, S)
            if self.qmode == 0:
                return spatial
        perm = self.perm.expand(self.bs, n) if self.perm_sb == 0 else self.perm
        srt = torch.cat([perm + self.P, perm.new_full((self.bs, S - n), -1)], 1)
        if self.qmode == 1:
            return srt
        return torch.where(self.choice[:, None] != 0, srt, spatial)


def _build_schedule(windows: torch.Tensor, key_keep: Optional[torch.Tensor], grid: Tuple[int, int], P: int,
                    batch_size: int, cfg: Config) -> _Schedule:
    """The query order(s) and the tile schedule: at most four small launches and one sort.

    ``sorted``/``auto``: ``_window_code_kernel`` (Morton codes of the windows) and an argsort
    per image; ``_schedule_kernel`` for each query order; ``auto``: ``_choice_kernel``.
    """
    gh, gw = grid
    n = gh * gw
    lay = _layout(grid, cfg)
    qmode = _QMODES[cfg.query_order]
    tq = triton.cdiv(n if qmode == 1 else lay.slots, cfg.block_m)
    tk = triton.cdiv(lay.slots, cfg.block_n)
    per_image = windows.dim() == 3 or key_keep is not None
    bs = batch_size if per_image else 1
    nv = 2 if qmode == 2 else 1
    dev = windows.device
    interp = _interpreting(windows)
    win = windows.contiguous()
    win_sb = n * 4 if win.dim() == 3 else 0
    keep = _keep_arg(key_keep, win)
    keep_sb = P + n if key_keep is not None else 0
    if qmode:
        bw = win.shape[0] if win.dim() == 3 else 1
        code = torch.empty((bw, n), dtype=torch.int64, device=dev)
        br = 16 if interp else 256
        _window_code_kernel[(triton.cdiv(n, br), bw)](win, code, n, win_sb, BITS=max(1, (max(gh, gw) - 1).bit_length()),
                                                      BR=br)
        perm = torch.argsort(code, dim=1, stable=True)
        perm_sb = n if win.dim() == 3 else 0
    else:
        perm, perm_sb = torch.empty(1, dtype=torch.int64, device=dev), 0
    codes = torch.empty((nv, bs, tq, tk), dtype=torch.int8, device=dev)
    lst = torch.empty((nv, bs, tq, tk), dtype=torch.int32, device=dev)
    cnt = torch.empty((nv, bs, tq, 2), dtype=torch.int32, device=dev)
    rects = 3 if lay.order == ROW_MAJOR else max(1, cfg.block_n // lay.unit)
    kc = min(triton.next_power_of_2(tk), 64)
    _schedule_kernel[(tq, bs, nv)](win, keep, perm, codes, lst, cnt, win_sb, keep_sb, perm_sb, P, gh, gw, lay.nbx,
                                   tq, tk, bs, BM=cfg.block_m, BN=cfg.block_n, KC=kc, R=rects, ORDER=lay.order,
                                   TW=lay.tw, TH=lay.th, HAS_KEEP=key_keep is not None, QMODE=qmode)
    choice = torch.empty(1, dtype=torch.int32, device=dev)  # unused unless auto
    if qmode == 2:
        choice = torch.empty(bs, dtype=torch.int32, device=dev)
        _choice_kernel[(bs,)](cnt, choice, bs, tq, C=min(triton.next_power_of_2(2 * tq), 16 if interp else 1024))
    return _Schedule(cfg, lay, grid, P, tq, tk, bs, qmode, win, win_sb, keep, keep_sb, perm, perm_sb, choice, codes,
                     lst, cnt)


_SCHEDULES: "OrderedDict[tuple, tuple]" = OrderedDict()
_SCHEDULE_CACHE_SIZE = 8


def _cached_schedule(windows: torch.Tensor, key_keep: Optional[torch.Tensor], grid: Tuple[int, int], P: int,
                     batch_size: int, cfg: Config) -> _Schedule:
    """:func:`_build_schedule`, reused while the same ``windows`` / ``key_keep`` tensors are unchanged.

    The blocks of a ViT (and the backward pass, when its config matches) see the same mask
    tensors, so one schedule serves them all. An entry holds weak references and the tensors'
    version counters: a freed, replaced or modified-in-place mask tensor never matches.
    """
    key = (id(windows), None if key_keep is None else id(key_keep), grid, P, batch_size, cfg, windows.device)
    hit = _SCHEDULES.get(key)
    if hit is not None:
        w_ref, w_ver, k_ref, k_ver, sched = hit
        if w_ref() is windows and w_ver == windows._version and (
                key_keep is None or (k_ref() is key_keep and k_ver == key_keep._version)):
            _SCHEDULES.move_to_end(key)
            return sched
    sched = _build_schedule(windows, key_keep, grid, P, batch_size, cfg)
    _SCHEDULES[key] = (weakref.ref(windows), windows._version, None if key_keep is None else weakref.ref(key_keep),
                       None if key_keep is None else key_keep._version, sched)
    while len(_SCHEDULES) > _SCHEDULE_CACHE_SIZE:
        _SCHEDULES.popitem(last=False)
    return sched


def _record_buffer(shape, record: bool, device) -> torch.Tensor:
    # visited-tile codes for tests (zeros = not visited); a dummy pointer, never written, otherwise
    return torch.zeros(shape, dtype=torch.int8, device=device) if record else torch.empty(1, dtype=torch.int8,
                                                                                          device=device)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep full precision (the tests hold fp32 to 1e-4); fp16/bf16 use tensor cores anyway
    return "ieee" if dtype == torch.float32 else "tf32"


def _constexprs(sched: _Schedule, q: torch.Tensor, record: bool) -> dict:
    lay, cfg = sched.layout, sched.cfg
    d = q.shape[-1]
    opts = {} if _interpreting(q) else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return dict(HEAD_D=d, BD=max(16, triton.next_power_of_2(d)), PB=_prefix_block(sched.P), ORDER=lay.order,
                TW=lay.tw, TH=lay.th, HAS_KEEP=sched.keep_sb > 0, QMODE=sched.qmode, RECORD=record,
                DOT_PREC=_dot_precision(q.dtype), **opts)


def _layout_args(sched: _Schedule, H: int, N: int) -> tuple:
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
        sched = _cached_schedule(windows, key_keep, grid, P, B, cfg)
    out = torch.empty((B, H, N, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    rec = _record_buffer((B, H, sched.tq, sched.tk), record, q.device)
    args = (q, k, v, out, lse, *sched.kernel_args, sched.lst, sched.cnt, rec, *q.stride(), *k.stride(), *v.stride(),
            *out.stride(), *_layout_args(sched, H, N), scale * _LOG2E)
    meta = _constexprs(sched, q, record)
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
        sched = _cached_schedule(windows, key_keep, grid, P, B, cfg)
    lst_t, cnt_t = sched.transposed()
    dev = q.device
    delta = torch.empty((B, H, N), dtype=torch.float32, device=dev)
    br = 16 if _interpreting(q) else 64
    _delta_kernel[(triton.cdiv(N, br), H, B)](out, dout, delta, *out.stride(), *dout.stride(), H, N,
                                             HEAD_D=d, BD=max(16, triton.next_power_of_2(d)), BR=br)
    dq = torch.empty((B, H, N, d), dtype=q.dtype, device=dev)
    dk = torch.empty((B, H, N, d), dtype=k.dtype, device=dev)
    dv = torch.empty((B, H, N, d), dtype=v.dtype, device=dev)
    rec_q = _record_buffer((B, H, sched.tq, sched.tk), record, dev)
    rec_k = _record_buffer((B, H, sched.tk, sched.tq), record, dev)
    meta = _constexprs(sched, q, record)
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
    """The launch config for ``kind`` (``"fwd"``/``"bwd"``): pinned in the interpreter, else timed once per key.

    On GPU every candidate runs on the call's own inputs (schedule build included) under
    ``triton.testing.do_bench``; the fastest is kept per ``(kind, N, d, dtype, device)``.
    """
    if _interpreting(q):
        return INTERPRET_CONFIG
    B, H, N, d = q.shape
    key = (kind, N, d, q.dtype, q.device.index)
    cfg = _TUNED.get(key)
    if cfg is None:
        best = None
        for cand in (FWD_CONFIGS if kind == "fwd" else BWD_CONFIGS):
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
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: WindowMask, scale: float) -> torch.Tensor:
    """Window-masked attention (docs/math.md §1, paper 000 §4.1 eq. 4) on validated inputs, ``(B, h, N, d)``.

    ``out_i = sum_j softmax_j(scale * q_i . k_j over allowed j) v_j`` with the allowed set of
    docs/math.md §1; a query with no allowed key outputs zeros with zero gradient. Differentiable in
    ``q, k, v`` through the ``vitpatch::window_attention_forward`` custom op (fake kernel and
    autograd registered, so ``torch.compile`` traces it without a graph break).
    """
    out, _ = torch.ops.vitpatch.window_attention_forward(q, k, v, mask.windows, mask.key_keep, mask.grid[0],
                                                         mask.grid[1], mask.num_prefix_tokens, float(scale))
    return out


def window_attention_unsupported(q, k, v, mask: WindowMask, scale: float) -> Optional[str]:
    """Why the kernel cannot run these (validated) inputs, or ``None`` when it can."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16 and float32)"
    d = q.shape[-1]
    lo, hi = SUPPORTED_HEAD_DIMS
    if not lo <= d <= hi:
        return f"head width {d} (the kernel takes {lo} to {hi})"
    if not q.is_cuda:
        if not _env.triton_interpret():
            return "CPU tensors need TRITON_INTERPRET=1"
        if q.dtype == torch.bfloat16:
            return "bfloat16 in Triton's CPU interpreter (numpy has no bfloat16)"
    return None


def _resolve_config(block_m: int, block_n: int, order, unit, query_order) -> Config:
    if isinstance(order, str):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {sorted(ORDERS)}, got {order!r}")
        order = ORDERS[order]
    return Config(block_m, block_n, TILED if order is None else order, 64 if unit is None else unit,
                  "auto" if query_order is None else query_order)


def _schedule_for(mask: WindowMask, batch_size, block_m, block_n, order, unit, query_order) -> Tuple[_Schedule, int]:
    if not isinstance(mask, WindowMask):
        raise TypeError(f"mask must be a vitpatch.WindowMask, got {type(mask).__name__}")
    B = mask._batch(batch_size)
    cfg = _resolve_config(block_m, block_n, order, unit, query_order)
    return _build_schedule(mask.windows, mask.key_keep, mask.grid, mask.num_prefix_tokens, B, cfg), B


def tile_codes(mask: WindowMask, batch_size: Optional[int] = None, block_m: int = 64, block_n: int = 64, *,
               order=None, unit: Optional[int] = None, query_order: Optional[str] = None) -> torch.Tensor:
    """The kernel's tile schedule over the patch tiles: int8 ``(B, TQ, TK)``, 0 skip / 1 masked / 2 full.

    Built by the launch the kernels use (``_build_schedule``), for the query order each image
    runs (:func:`query_tokens` says which query sits in which slot). Prefix tokens are not part
    of it: the kernels always visit the prefix keys (one narrow block) and the prefix queries
    visit every key tile. ``order`` ``"tiled"`` (default) or ``"row_major"`` (key layout);
    ``unit`` the tiled square (default 64, 8 x 8); ``query_order`` ``"auto"`` (default),
    ``"spatial"`` or ``"sorted"``.
    """
    sched, B = _schedule_for(mask, batch_size, block_m, block_n, order, unit, query_order)
    return sched.chosen_codes().expand(B, -1, -1)


def query_tokens(mask: WindowMask, batch_size: Optional[int] = None, block_m: int = 64, block_n: int = 64, *,
                 order=None, unit: Optional[int] = None, query_order: Optional[str] = None) -> torch.Tensor:
    """The token in each query slot of each image, int64 ``(B, TQ * block_m)`` (``-1`` padding)."""
    sched, B = _schedule_for(mask, batch_size, block_m, block_n, order, unit, query_order)
    return sched.query_tokens().expand(B, -1)


def tile_schedule(mask: WindowMask, batch_size: Optional[int] = None, block_m: int = 64, block_n: int = 64, *,
                  order=None, unit: Optional[int] = None, query_order: Optional[str] = None) -> torch.Tensor:
    """Which (query tile, key tile) pairs of patch slots the kernel visits: bool ``(B, TQ, TK)``."""
    return tile_codes(mask, batch_size, block_m, block_n, order=order, unit=unit, query_order=query_order) > 0


def visited_fraction(mask: WindowMask, batch_size: Optional[int] = None, block_m: int = 64, block_n: int = 64, *,
                     order=None, unit: Optional[int] = None, query_order: Optional[str] = None) -> float:
    """Fraction of the patch tile pairs the kernel visits, averaged over images."""
    vis = tile_schedule(mask, batch_size, block_m, block_n, order=order, unit=unit, query_order=query_order)
    return float(vis.double().mean())
