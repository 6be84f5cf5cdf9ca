"""The window-attention Triton kernel itself (docs/math.md §1): tile skipping, both tile branches, layouts,
head widths, torch.compile. Runs in Triton's interpreter on CPU (fp32, small tiles)."""
import importlib.util
import math

import numpy as np
import pytest
import torch

from vitpatch import WindowMask, functional, reference
from vitpatch.masks import synthetic_awd_windows

from _helpers import DEVICE, TOL, assert_close, check_against_reference, needs_interpreter, qkv, require_kernel

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
              needs_interpreter()]

OP = "window_attention"


@pytest.fixture(scope="module")
def wa():
    require_kernel(OP, "triton")
    from vitpatch.kernels import window_attention as module
    return module


@pytest.fixture(scope="module")
def ws(wa):
    from vitpatch.kernels.window import schedule as module
    return module


@pytest.fixture(scope="module")
def wl(wa):
    from vitpatch.kernels.window import layout as module
    return module


@pytest.fixture(scope="module")
def wg(wa):
    from vitpatch.kernels.window import grouping as module
    return module


@pytest.fixture(scope="module")
def tiles(wa):
    from vitpatch import tiles as module
    return module


# ----------------------------------------------------------------------------------- helpers
def local_windows(B, grid, gen, max_radius=2):
    """Per-image random windows of radius 0..max_radius around each patch: small, so tiles get skipped."""
    gh, gw = grid
    p = torch.arange(gh * gw)
    x, y = p % gw, p // gw
    r = torch.randint(0, max_radius + 1, (B, gh * gw, 4), generator=gen)
    return torch.stack([(x - r[..., 0]).clamp(min=0), (y - r[..., 1]).clamp(min=0),
                        (x + r[..., 2]).clamp(max=gw - 1), (y + r[..., 3]).clamp(max=gh - 1)], -1)


def pad_to(t, length):
    return torch.cat([t, t.new_full(t.shape[:-1] + (length - t.shape[-1],), -1)], -1)


def dense_tile_codes(mask, B, q_slots, k_slots, bm, bn):
    """From ``mask.dense()`` alone: per (query tile, key tile), 0 untouched, 1 touched (some allowed
    pair), 2 every valid query of the tile allows every key slot of the tile.

    ``q_slots (B, Sq)``: the token in each query slot of each image; ``k_slots (Sk,)``: of each key
    slot (-1 = padding)."""
    Sq, Sk = -(-q_slots.shape[1] // bm) * bm, -(-k_slots.numel() // bn) * bn
    q_slots, k_slots = pad_to(q_slots.cpu(), Sq), pad_to(k_slots.cpu(), Sk)
    dense = mask.dense(B).cpu()
    kv = k_slots >= 0
    out = []
    for b in range(B):
        qv = q_slots[b] >= 0
        a = dense[b][q_slots[b].clamp(min=0)][:, k_slots.clamp(min=0)] & qv[:, None] & kv[None, :]
        a = a.reshape(Sq // bm, bm, Sk // bn, bn)
        touched = a.any(3).any(1)
        every = (a | ~qv.reshape(-1, bm, 1, 1)).all(3).all(1) & kv.reshape(1, -1, bn).all(2)
        out.append(touched.to(torch.int8) + (touched & every).to(torch.int8))
    return torch.stack(out)


def reference_grads(q, k, v, mask, scale, dout):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = reference.window_attention(*leaves, mask, scale=scale)
    return out, torch.autograd.grad(out, leaves, dout.double())


# (block_m, block_n, key order, unit, query order): the pinned config, each query order, row-major
# key runs (3 rectangles per key tile), a key tile of two squares, sub-square tiles of 8 x 8 squares
CONFIGS = {
    "pinned": (16, 16, 1, 16, "auto"),
    "tiled4x4_sorted": (16, 16, 1, 16, "sorted"),
    "row_major_spatial": (16, 16, 0, 64, "spatial"),
    "row_major_32x16_sorted": (32, 16, 0, 64, "sorted"),
    "tiled4x4_16x32_spatial": (16, 32, 1, 16, "spatial"),
    "tiled8x8_32x16_auto": (32, 16, 1, 64, "auto"),
    "tiled4x4_best": (16, 16, 1, 16, "best"),
    "tiled4x4_grouped": (16, 16, 1, 16, "grouped"),
    "tiled8x8_16x16_grouped": (16, 16, 1, 64, "grouped"),  # key tiles of 8 x 2 patches
}
CASES = [("pinned", "local"), ("pinned", "keep"), ("pinned", "awd"), ("tiled4x4_sorted", "shared_square"),
         ("row_major_spatial", "keep"), ("row_major_32x16_sorted", "local"), ("tiled4x4_16x32_spatial", "keep"),
         ("tiled8x8_32x16_auto", "shared_square"), ("tiled4x4_grouped", "keep"), ("tiled4x4_grouped", "awd"),
         ("tiled8x8_16x16_grouped", "local"), ("tiled4x4_best", "awd")]


def masks_for(kind, B, grid, P):
    gen = torch.Generator().manual_seed(11)
    n = grid[0] * grid[1]
    if kind == "local":
        return WindowMask(local_windows(B, grid, gen), grid, P)
    if kind == "awd":
        return WindowMask(synthetic_awd_windows(grid, B, 0.23, seed=2), grid, P)
    if kind == "shared_square":
        return WindowMask.square(grid, 2, P)
    if kind == "keep":
        kk = torch.rand(B, P + n, generator=gen) > 0.4
        kk[1, P:P + 2 * grid[1]] = False  # the first two grid rows of image 1 dropped entirely
        return WindowMask(local_windows(B, grid, gen), grid, P, kk)
    raise AssertionError(kind)


# ----------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("grid", [(1, 1), (5, 7), (9, 11), (8, 8)])
@pytest.mark.parametrize("order,unit", [(0, 64), (1, 16), (1, 64), (1, 32)])
def test_slot_layout(wl, grid, order, unit):
    """Every patch sits in exactly one slot; a tiled square holds a TW x TH rectangle of the grid."""
    gh, gw = grid
    P = 2
    slots = wl.slot_tokens(grid, P, order, unit)
    valid = slots[slots >= 0]
    assert torch.equal(valid.sort().values, torch.arange(P, P + gh * gw))
    if order == 0:
        assert torch.equal(slots, torch.arange(P, P + gh * gw))
        return
    tw = {16: 4, 32: 8, 64: 8}[unit]
    th = unit // tw
    assert slots.numel() % unit == 0
    for sq in slots.reshape(-1, unit):
        p = sq[sq >= 0] - P
        if p.numel() == 0:
            continue
        x, y = p % gw, p // gw
        x0, y0 = int(x.min()), int(y.min())
        assert x0 % tw == 0 and y0 % th == 0
        exp = [(yy, xx) for yy in range(y0, min(y0 + th, gh)) for xx in range(x0, min(x0 + tw, gw))]
        assert sorted(zip(y.tolist(), x.tolist())) == exp


# ----------------------------------------------------------------------------------- skipping
def check_schedule_and_values(wa, ws, tiles, cfg, mask, B, P, h=1, d=16, scale=0.3):
    """Run the forward and backward kernels with ``record``: every patch query sits in exactly one
    query slot; the schedule's codes equal the tiles ``mask.dense()`` touches for that slot assignment
    (a superset with key_keep); every program visits exactly its schedule row; output, LSE and
    dq, dk, dv match the float64 reference for every token. Returns the schedule."""
    bm, bn = cfg.block_m, cfg.block_n
    N = P + mask.num_patches
    sched = ws.build_schedule(mask.windows, mask.key_keep, mask.grid, P, B, cfg)
    q, k, v = qkv(B, h, N, d)
    out, lse, rec = wa._forward(q, k, v, mask.windows, mask.key_keep, mask.grid, P, scale, cfg, record=True,
                                sched=sched)
    dout = torch.randn(B, h, N, d, dtype=torch.float64).to(q)
    dq, dk, dv, rec_q, rec_k = wa._backward(dout, q, k, v, out, lse, mask.windows, mask.key_keep, mask.grid, P,
                                            scale, cfg, record=True, sched=sched)

    from vitpatch.kernels.window import slot_tokens
    q_slots = sched.query_tokens().expand(B, -1).cpu()
    assert q_slots.shape[1] == sched.tq * bm
    for b in range(B):  # every patch query sits in exactly one slot
        assert torch.equal(q_slots[b][q_slots[b] >= 0].sort().values, torch.arange(P, N))
    expected = dense_tile_codes(mask, B, q_slots, slot_tokens(mask.grid, P, cfg.order, cfg.unit), bm, bn)
    codes = sched.chosen_codes().expand(B, -1, -1).cpu()
    assert torch.equal(codes, tiles.tile_codes(mask, B, bm, bn, order=cfg.order, unit=cfg.unit,
                                               query_order=cfg.query_order).cpu())
    rec, rec_q, rec_k = rec.cpu(), rec_q.cpu(), rec_k.cpu()
    assert codes.shape == expected.shape
    for r in (rec, rec_q):  # every head visits the schedule's tiles, with the schedule's branch
        assert torch.equal(r, codes[:, None].expand_as(r))
    assert torch.equal(rec_k, codes[:, None].transpose(-1, -2).expand_as(rec_k))
    if mask.key_keep is None:
        assert torch.equal(codes, expected)
    else:
        assert bool(((codes > 0) | (expected == 0)).all()), "a touched tile was skipped"
        assert torch.equal(codes == 2, expected == 2)
    assert (codes > 0).sum().item() < codes.numel(), "these windows should let the kernel skip tiles"

    ref_out, ref_grads = reference_grads(q, k, v, mask, scale, dout)
    assert_close(out, ref_out, TOL[torch.float32], "output")
    for name, g, gr in zip("qkv", (dq, dk, dv), ref_grads):
        assert_close(g, gr, TOL[torch.float32], f"d{name}")
    logits = scale * (q.double() @ k.double().transpose(-1, -2))
    allowed = mask.dense(B).to(logits.device)[:, None]
    ref_lse = logits.masked_fill(~allowed, float("-inf")).logsumexp(-1) / math.log(2)
    has = allowed.any(-1).expand_as(ref_lse)
    assert bool(torch.isinf(lse[~has]).all() and (lse[~has] > 0).all()), "LSE of a query with no allowed key"
    assert_close(lse[has], ref_lse[has], TOL[torch.float32], "LSE")
    return sched


@pytest.mark.parametrize("config,kind", CASES, ids=lambda c: c if isinstance(c, str) else None)
def test_visited_tiles_are_the_touched_tiles(wa, ws, tiles, config, kind):
    """The key tiles each program visits (recorded by the kernels themselves: forward, dq and dk/dv)
    equal the tiles the windows touch in mask.dense() (a superset with key_keep); the "full" tiles
    are exactly those every query of the tile fully allows; the results match the reference."""
    bm, bn, order, unit, query_order = CONFIGS[config]
    B, P = 2, 1
    grid = (8, 9) if kind != "awd" else (8, 8)
    mask = masks_for(kind, B, grid, P).to(DEVICE)
    check_schedule_and_values(wa, ws, tiles, ws.Config(bm, bn, order, unit, query_order), mask, B, P)


def test_auto_and_best_query_orders_take_the_cheaper_schedule_per_image(tiles):
    """``best`` builds every query order, ``auto`` spatial and sorted; each image runs the one that
    visits fewest tiles."""
    grid, B = (12, 12), 2
    p = torch.arange(144)
    x, y = p % 12, p // 12
    big = torch.stack([(x - 3).clamp(min=0), (y - 3).clamp(min=0), (x + 3).clamp(max=11), (y + 3).clamp(max=11)], -1)
    w = torch.stack([big, synthetic_awd_windows(grid, 1, 0.23, seed=4)[0]])
    mask = WindowMask(w, grid, 0).to(DEVICE)
    visited = {qo: (tiles.tile_codes(mask, B, 16, 16, unit=16, query_order=qo) > 0).sum((1, 2)).cpu()
               for qo in ("spatial", "sorted", "grouped", "auto", "best")}
    best = torch.minimum(visited["spatial"], torch.minimum(visited["sorted"], visited["grouped"]))
    assert torch.equal(visited["best"], best)
    assert torch.equal(visited["auto"], torch.minimum(visited["spatial"], visited["sorted"]))
    assert visited["spatial"][0] == best[0] and visited["spatial"][1] > best[1], visited  # different orders


def square_windows(grid, r):
    gh, gw = grid
    p = torch.arange(gh * gw)
    x, y = p % gw, p // gw
    return torch.stack([(x - r).clamp(min=0), (y - r).clamp(min=0), (x + r).clamp(max=gw - 1),
                        (y + r).clamp(max=gh - 1)], -1)


# (config, windows of image 0): image 1 always has AWD windows whose grouped order needs 7 tiles of
# 16 on the 8 x 9 grid (n = 72, cdiv(n, 16) = 5) and visits fewer tiles than spatial, so every
# other row of TQ = 7 ends in empty tiles. ``best`` also builds ``sorted``, whose cut has room for
# cdiv(72, 16 / 2) = 9 tiles (TQ = 9) and which ties with grouped on image 1 (17 key tiles; ties
# go to sorted), while grouped wins image 0 with radius-1 squares (13 against 15).
PADDED = {
    "grouped_r0": ((16, 16, 1, 16, "grouped"), 0, False),   # image 0: 6 grouped tiles, 1 empty one
    "grouped_r1_keep": ((16, 16, 1, 16, "grouped"), 1, True),
    "best_spatial_r0": ((16, 16, 1, 16, "best"), 0, False),  # image 0 runs spatial, image 1 sorted (5 tiles)
    "best_grouped_r1": ((16, 16, 1, 16, "best"), 1, False),  # image 0 runs grouped (5 tiles), image 1 sorted
}


@pytest.mark.parametrize("case", list(PADDED))
def test_padded_and_empty_query_tiles(wa, ws, tiles, case):
    """Partly filled and empty query tiles (``grouped``, and ``best`` mixing orders of different tile
    counts): an empty tile visits nothing and stores nothing; every patch query is in exactly one slot
    (some past slot n); outputs, LSE and gradients of every token match the reference."""
    (bm, bn, order, unit, query_order), r, with_keep = PADDED[case]
    grid, P, B = (8, 9), 1, 2
    w = torch.stack([square_windows(grid, r), synthetic_awd_windows(grid, 1, 0.23, seed=23)[0]])
    keep = None
    if with_keep:
        keep = torch.rand(B, P + 72, generator=torch.Generator().manual_seed(3)) > 0.3
    mask = WindowMask(w, grid, P, keep).to(DEVICE)
    cfg = ws.Config(bm, bn, order, unit, query_order)
    sched = check_schedule_and_values(wa, ws, tiles, cfg, mask, B, P, h=2)
    assert sched.tq == (9 if query_order == "best" else 7)
    slots = sched.query_tokens().cpu().reshape(B, sched.tq, bm)
    filled = (slots >= 0).sum(2)
    codes = sched.chosen_codes().cpu()
    assert bool((filled == 0).any()), "no empty query tile"
    assert bool(((filled > 0) & (filled < bm)).any()), "no partly filled query tile"
    cnt = sched.cnt[sched.choice.long(), torch.arange(B)] if query_order in ("auto", "best") else sched.cnt[0]
    assert bool((codes[filled == 0] == 0).all()) and bool((cnt.cpu()[filled == 0] == 0).all())
    if query_order == "grouped":  # image 1's 7 tiles reach past slot n (under best it runs sorted)
        assert bool((slots[:, 72 // bm + 1:] >= 0).any()), "no valid query past slot n"
    if query_order in ("auto", "best"):
        expect = {"best_spatial_r0": [0, 1], "best_grouped_r1": [2, 1]}[case]
        assert sched.choice.cpu().tolist() == expect


def test_grouped_order_is_a_permutation_and_beats_sorted_on_awd(ws, tiles):
    """At n = 576 (24 x 24) with 64 x 64 tiles, the grouped order holds every patch exactly once and
    visits fewer tiles than the window-sorted order on AWD windows; best is never worse than any."""
    grid, B = (24, 24), 2
    mask = WindowMask(synthetic_awd_windows(grid, B, 0.23, seed=0), grid, 1).to(DEVICE)
    cfg = ws.Config(64, 64, ws.TILED, 64, "grouped")
    perm = ws.grouped_perm(mask.windows, grid, cfg).cpu()
    assert perm.shape[1] % 64 == 0
    for b in range(B):
        assert torch.equal(perm[b][perm[b] >= 0].sort().values, torch.arange(576))
    visited = {qo: (tiles.tile_codes(mask, B, 64, 64, query_order=qo) > 0).sum((1, 2)).cpu()
               for qo in ("spatial", "sorted", "grouped", "best")}
    assert visited["grouped"].sum() < visited["sorted"].sum(), visited
    assert bool((visited["best"] <= torch.minimum(visited["sorted"], visited["grouped"])).all()), visited
    assert bool((visited["best"] <= visited["spatial"]).all()), visited


def _best_cut(sig, bm, lmin, lam):
    """The least cost of cutting the signature sequence ``sig`` (``(n, 4)`` key-tile boxes) into runs
    of ``lmin .. bm`` (the last: ``1 .. bm``), a run costing its bounding box's area plus ``lam``:
    the plain O(n * bm) dynamic programme, in Python."""
    n = len(sig)
    inf = float("inf")
    f = [0.0] + [inf] * n
    for j in range(1, n + 1):
        x0 = y0 = 1 << 30
        x1 = y1 = -1
        for i in range(j - 1, max(-1, j - bm - 1), -1):
            x0, y0 = min(x0, sig[i][0]), min(y0, sig[i][1])
            x1, y1 = max(x1, sig[i][2]), max(y1, sig[i][3])
            if j - i >= lmin or j == n:
                f[j] = min(f[j], f[i] + (x1 - x0 + 1) * (y1 - y0 + 1) + lam)
    return f[n]


@pytest.mark.parametrize("grid,bm,bn,unit", [((9, 11), 16, 16, 16), ((12, 7), 32, 16, 64), ((5, 3), 32, 32, 64)])
def test_sorted_order_is_cut_at_least_cost(ws, grid, bm, bn, unit):
    """The ``sorted`` order's tiles (``_cut_kernel``): each image's patches once each, in Morton order
    of their windows, in runs of ``bm / 2 .. bm`` (the last of an image: ``1 .. bm``) at the start of
    their tiles, and the runs' summed cost is the least any such cut has (a plain DP in Python).
    Odd grids; the last one has fewer patches than a tile."""
    gen = torch.Generator().manual_seed(7)
    B = 3
    windows = local_windows(B, grid, gen, max_radius=3).to(DEVICE)
    cfg = ws.Config(bm, bn, ws.TILED, unit, "sorted")
    n = grid[0] * grid[1]
    perm = ws._sorted_perm(windows.contiguous(), grid, n * 4, cfg).cpu()
    assert perm.shape == (B, -(-n // (bm // 2)) * bm)
    kw = ws._unit_shape(unit)[0]
    kh = bn // kw
    for b in range(B):
        w = windows[b].cpu()
        code = torch.zeros(n, dtype=torch.int64)
        bits = max(1, (max(grid) - 1).bit_length())
        for c in range(4):
            for bit in range(bits):
                code |= ((w[:, c] >> bit) & 1) << (4 * bit + c)
        order = torch.argsort(code, stable=True)
        tiles_ = perm[b].view(-1, bm)
        runs = [t[t >= 0] for t in tiles_ if (t >= 0).any()]
        for t in tiles_:  # a run fills its tile from the start
            k = int((t >= 0).sum())
            assert bool((t[:k] >= 0).all()) and bool((t[k:] < 0).all())
        assert torch.equal(torch.cat(runs[::-1]), order)  # runs are written from the last one
        lengths = [len(r) for r in runs]
        assert all(bm // 2 <= x <= bm for x in lengths[1:]) and 1 <= lengths[0] <= bm, lengths
        sig = torch.stack([w[:, 0] // kw, w[:, 1] // kh, w[:, 2] // kw, w[:, 3] // kh], 1)
        cost = 0
        for r in runs:
            s = sig[r]
            cost += ((s[:, 2].max() - s[:, 0].min() + 1) * (s[:, 3].max() - s[:, 1].min() + 1)).item()
            cost += ws.CUT_TILE_COST
        assert cost == _best_cut(sig[order].tolist(), bm, bm // 2, ws.CUT_TILE_COST)


def test_grouped_tiles_on_the_host(ws, wg):
    """The greedy itself: whole tiles, each query once, deterministic, empty windows only in spare slots."""
    grid = (16, 16)
    w = synthetic_awd_windows(grid, 1, 0.23, seed=1)[0].numpy()
    a = wg.grouped_tiles(w, 64, 8, 8)
    assert a.size % 64 == 0 and sorted(a[a >= 0].tolist()) == list(range(256))
    assert (a == wg.grouped_tiles(w.copy(), 64, 8, 8)).all()
    tiles_ = a.reshape(-1, 64)
    assert all(t[t >= 0].size for t in tiles_), "a tile without a query"
    e = w.copy()
    e[:5] = [3, 3, 2, 2]  # empty windows (raw tensors are not validated here)
    b = wg.grouped_tiles(e, 64, 8, 8)
    assert sorted(b[b >= 0].tolist()) == list(range(256))
    assert np.isin(np.arange(5), b).all()


def union_cost(w, perm, bm, kw, kh):
    """Sum over the tiles of ``perm`` of the key tiles (kw x kh patches) their windows touch, counted
    cell by cell (independent of the schedule's own helpers); empty windows touch nothing."""
    total = 0
    for tile in perm.reshape(-1, bm):
        cells = set()
        for x0, y0, x1, y1 in w[tile[tile >= 0]].tolist():
            cells.update((cx, cy) for cx in range(x0 // kw, x1 // kw + 1) for cy in range(y0 // kh, y1 // kh + 1))
        total += len(cells)
    return total


def random_windows(rng, grid, n_empty):
    """Random rectangles anywhere on the grid (not around their patch), ``n_empty`` of them empty."""
    gh, gw = grid
    n = gh * gw
    xs, ys = np.sort(rng.integers(0, gw, (n, 2)), 1), np.sort(rng.integers(0, gh, (n, 2)), 1)
    small = rng.random(n) < 0.6  # most windows small, so that tiles have something to share
    xs[small, 1] = np.minimum(xs[small, 0] + rng.integers(0, 3, small.sum()), gw - 1)
    ys[small, 1] = np.minimum(ys[small, 0] + rng.integers(0, 3, small.sum()), gh - 1)
    w = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1).astype(np.int64)
    e = rng.choice(n, n_empty, replace=False)
    w[e[: n_empty // 2]] = [3, 3, 2, 2]                        # x0 > x1
    w[e[n_empty // 2:], 1], w[e[n_empty // 2:], 3] = 4, 1      # y0 > y1
    return w


@pytest.mark.parametrize("bm,kw,kh", [(16, 4, 4), (32, 8, 2), (64, 8, 8), (64, 8, 4)])
def test_grouped_tiles_contract_on_random_windows(ws, wg, bm, kw, kh):
    """The refined grouped tiles keep the contract on arbitrary windows with empty ones: int64, whole
    tiles of bm slots, every query exactly once, no tile without a non-empty window before the spare
    tiles, empty windows only in slots the non-empty windows leave as padding (the tiles of the others
    are exactly those computed without the empty windows), deterministic, never more tiles nor a
    larger union cost than the plain cover greedy."""
    rng = np.random.default_rng(bm + kh)
    for grid, n_empty in [((5, 7), 4), ((16, 16), 0), ((13, 29), 40), ((4, 4), 16), ((1, 1), 0)]:
        n = grid[0] * grid[1]
        w = random_windows(rng, grid, n_empty)
        perm = wg.grouped_tiles(w, bm, kw, kh)
        assert perm.dtype == np.int64 and perm.ndim == 1 and perm.size % bm == 0
        assert np.array_equal(np.sort(perm[perm >= 0]), np.arange(n))
        assert np.array_equal(perm, wg.grouped_tiles(w.copy(), bm, kw, kh))
        empty = (w[:, 0] > w[:, 2]) | (w[:, 1] > w[:, 3])
        real = np.flatnonzero(~empty)
        sub = wg.grouped_tiles(w[real], bm, kw, kh)             # the same queries, renumbered
        alone = np.where(sub >= 0, real[np.maximum(sub, 0)], -1)
        head = perm[:alone.size].copy()
        head[(head >= 0) & empty[np.maximum(head, 0)]] = -1
        assert np.array_equal(head, alone), "empty windows moved a query of a non-empty window"
        tail = perm[alone.size:]
        assert empty[tail[tail >= 0]].all(), "a non-empty window in a spare tile"
        assert all((t >= 0).any() for t in alone.reshape(-1, bm)), "a tile without a query"
        greedy = wg.greedy_tiles(w, bm, kw, kh)
        assert perm.size <= greedy.size
        assert union_cost(w, perm, bm, kw, kh) <= union_cost(w, greedy, bm, kw, kh)


def test_grouped_tiles_refinement_beats_the_cover_greedy_on_awd(ws, wg):
    """At n = 576 (24 x 24) on AWD windows with 64 x 64 and 64 x 32 tiles of 8 x 8 squares, the refined
    tiles visit strictly fewer key tiles than the plain cover greedy's in every image, at least 5% fewer
    in all (measured: 112 -> 101 and 208 -> 195 over the two images); no tile holds more than 64 queries."""
    grid = (24, 24)
    windows = synthetic_awd_windows(grid, 2, 0.23, seed=0).numpy()
    for kh in (8, 4):
        new = old = 0
        for w in windows:
            perm, greedy = wg.grouped_tiles(w, 64, 8, kh), wg.greedy_tiles(w, 64, 8, kh)
            assert perm.size % 64 == 0 and np.array_equal(np.sort(perm[perm >= 0]), np.arange(576))
            assert int((perm.reshape(-1, 64) >= 0).sum(1).max()) <= 64
            c, g = union_cost(w, perm, 64, 8, kh), union_cost(w, greedy, 64, 8, kh)
            assert c < g, (kh, c, g)
            new, old = new + c, old + g
        assert new <= 0.95 * old, (kh, new, old)


def test_grouped_needs_rectangular_key_tiles(ws, tiles):
    mask = WindowMask.square((4, 4), 1)
    with pytest.raises(ValueError, match="grouped"):
        ws.Config(16, 32, ws.TILED, 16, "grouped")  # a key tile of two squares
    with pytest.raises(ValueError, match="grouped"):
        ws.Config(16, 16, ws.ROW_MAJOR, 64, "grouped")
    with pytest.raises(ValueError, match="grouped"):
        tiles.tile_schedule(mask, 1, 16, 64, unit=16, query_order="grouped")
    assert ws.Config(16, 32, ws.TILED, 16, "best").perm_orders == ("sorted",)  # best falls back
    assert ws.Config(16, 16, ws.TILED, 16, "auto").perm_orders == ("sorted",)  # auto: no host work


def test_full_and_masked_branches_in_one_call(wa, ws):
    """Query tiles whose windows contain two key tiles entirely (no element mask) and cut two
    others (element mask), in the same program, matching the reference in values and gradients."""
    grid, P, B, h, d = (8, 8), 1, 1, 2, 16
    gh, gw = grid
    p = torch.arange(gh * gw)
    x, y = p % gw, p // gw
    w = torch.stack([(x - 1).clamp(min=0), (y - 1).clamp(min=0), (x + 1).clamp(max=gw - 1),
                     (y + 1).clamp(max=gh - 1)], -1)
    w[x < 4] = torch.tensor([0, 0, 5, 7])  # the left half: covers the 4 x 4 squares 0 and 2, cuts 1 and 3
    mask = WindowMask(w, grid, P).to(DEVICE)
    q, k, v = qkv(B, h, P + gh * gw, d)
    from vitpatch.kernels import _launch
    cfg = ws.Config.of(_launch.INTERPRET["window_fwd"])  # what functional.window_attention runs here
    assert (cfg.block_m, cfg.block_n, cfg.order, cfg.unit) == (16, 16, ws.TILED, 16)
    for c in (cfg, ws.Config(16, 16, ws.TILED, 16, "spatial"), ws.Config(16, 16, ws.TILED, 16, "sorted")):
        _, _, rec = wa._forward(q, k, v, mask.windows, None, grid, P, 0.25, c, record=True)
        rows = rec[0, 0].tolist()
        assert [2, 1, 2, 1] in rows, (c, rows)
        assert any(r.count(1) and not r.count(2) for r in rows), (c, rows)
    check_against_reference(lambda q, k, v: functional.window_attention(q, k, v, mask, scale=0.25),
                            lambda q, k, v: reference.window_attention(q, k, v, mask, scale=0.25), [q, k, v])


def test_shared_windows_have_one_schedule_for_the_batch(tiles):
    """Shared windows without key_keep: one schedule row set for every image (batch stride 0)."""
    grid = (6, 6)
    shared = WindowMask.square(grid, 1, 1, device=DEVICE)
    codes = tiles.tile_codes(shared, 5, 16, 16)
    assert codes.shape[0] == 5 and codes.stride(0) == 0
    per_image = WindowMask(shared.windows.expand(5, -1, -1), grid, 1)
    assert per_image.per_image and tiles.tile_codes(per_image, 5, 16, 16).stride(0) != 0
    assert torch.equal(tiles.tile_codes(per_image, 5, 16, 16), codes)
    frac = tiles.visited_fraction(shared, 5, 16, 16)
    vis = tiles.tile_schedule(shared, 5, 16, 16)
    dense = -(-36 // 16) * vis.shape[2]  # the dense query-tile count, not the schedule's (padded) TQ
    assert 0 < frac < 1 and frac == pytest.approx(float(vis.sum((1, 2)).double().mean()) / dense)


def test_no_dense_mask_is_built(wa, monkeypatch):
    """The kernel path never asks the mask for dense rows (forward and backward)."""
    mask = WindowMask(local_windows(2, (5, 6), torch.Generator().manual_seed(0)), (5, 6), 1,
                      torch.rand(2, 31) > 0.2).to(DEVICE)

    def forbidden(*a, **kw):
        raise AssertionError("dense mask requested")

    monkeypatch.setattr(WindowMask, "rows", forbidden)
    monkeypatch.setattr(WindowMask, "dense", forbidden)
    monkeypatch.setenv("VITPATCH_BACKEND", "triton")
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 31, 16))
    functional.window_attention(q, k, v, mask).square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_schedule_is_reused_while_the_mask_is_unchanged(ws, monkeypatch):
    """Blocks sharing one mask share one schedule; an in-place change of the windows rebuilds it."""
    grid, P, B = (5, 6), 1, 2
    gen = torch.Generator().manual_seed(7)
    mask = WindowMask(local_windows(B, grid, gen), grid, P).to(DEVICE)
    builds = []
    real = ws.build_schedule
    monkeypatch.setattr(ws, "build_schedule", lambda *a: builds.append(1) or real(*a))
    monkeypatch.setenv("VITPATCH_BACKEND", "triton")
    ws._SCHEDULES.clear()
    q, k, v = qkv(B, 1, P + 30, 16)
    first = functional.window_attention(q, k, v, mask)
    assert torch.equal(functional.window_attention(q, k, v, mask), first)
    assert len(builds) == 1
    mask.windows.copy_(local_windows(B, grid, gen, max_radius=4))  # same tensor, new contents
    out = functional.window_attention(q, k, v, mask)
    assert len(builds) == 2
    assert_close(out, reference.window_attention(q.double(), k.double(), v.double(), mask), TOL[torch.float32],
                 "output after the windows changed")


def test_schedule_is_shared_by_configs_that_differ_in_warps_or_stages(ws):
    """The schedule depends on tiles, layout and query order only: a backward configuration that
    differs from the forward's in warps or stages reuses its schedule; other tiles do not."""
    grid, P, B = (5, 6), 1, 2
    windows = local_windows(B, grid, torch.Generator().manual_seed(3)).to(torch.int32).to(DEVICE)
    ws._SCHEDULES.clear()
    a = ws.cached_schedule(windows, None, grid, P, B, ws.Config(16, 16, num_warps=4, num_stages=3))
    assert ws.cached_schedule(windows, None, grid, P, B, ws.Config(16, 16, num_warps=8, num_stages=2)) is a
    assert ws.cached_schedule(windows, None, grid, P, B, ws.Config(32, 16, num_warps=4, num_stages=3)) is not a


# ----------------------------------------------------------------------------------- widths, dtypes
@pytest.mark.parametrize("d", [16, 32, 64, 48, 128])
def test_head_widths(d, monkeypatch):
    require_kernel(OP, "triton")
    monkeypatch.setenv("VITPATCH_BACKEND", "triton")
    grid, P, B = (3, 5), 1, 2
    mask = WindowMask(local_windows(B, grid, torch.Generator().manual_seed(d), 1), grid, P).to(DEVICE)
    q, k, v = qkv(B, 1, P + 15, d)
    check_against_reference(lambda q, k, v: functional.window_attention(q, k, v, mask),
                            lambda q, k, v: reference.window_attention(q, k, v, mask), [q, k, v])


@pytest.mark.parametrize("P", [20, 70])
def test_many_prefix_tokens(P, monkeypatch):
    """More prefix tokens than one narrow block (16 to 64 wide) holds: prefix blocks in a loop."""
    require_kernel(OP, "triton")
    monkeypatch.setenv("VITPATCH_BACKEND", "triton")
    grid, B = (3, 4), 2
    gen = torch.Generator().manual_seed(P)
    mask = WindowMask(local_windows(B, grid, gen, 1), grid, P, torch.rand(B, P + 12, generator=gen) > 0.3).to(DEVICE)
    q, k, v = qkv(B, 1, P + 12, 16)
    check_against_reference(lambda q, k, v: functional.window_attention(q, k, v, mask),
                            lambda q, k, v: reference.window_attention(q, k, v, mask), [q, k, v])


def test_float16_in_interpreter(monkeypatch):
    """float16 runs in the interpreter too (bfloat16 does not: numpy has none, so it is declined)."""
    require_kernel(OP, "triton")
    monkeypatch.setenv("VITPATCH_BACKEND", "triton")
    grid, P = (4, 5), 1
    mask = WindowMask(local_windows(2, grid, torch.Generator().manual_seed(1)), grid, P).to(DEVICE)
    q, k, v = qkv(2, 1, P + 20, 16, dtype=torch.float16)
    check_against_reference(lambda q, k, v: functional.window_attention(q, k, v, mask),
                            lambda q, k, v: reference.window_attention(q, k, v, mask), [q, k, v])


def test_unsupported_inputs_are_declined(wa, monkeypatch):
    mask = WindowMask.full((2, 2), 0)
    raw = (mask.windows, mask.key_keep, mask.grid, mask.num_prefix_tokens)
    q, k, v = qkv(1, 1, 4, 8, device="cpu")
    assert "head width 8" in wa.window_attention_unsupported(q, k, v, *raw, 0.3)
    q, k, v = qkv(1, 1, 4, 136, device="cpu")
    assert "head width 136" in wa.window_attention_unsupported(q, k, v, *raw, 0.3)
    q, k, v = qkv(1, 1, 4, 16, dtype=torch.float64, device="cpu")
    assert "float64" in wa.window_attention_unsupported(q, k, v, *raw, 0.3)
    q, k, v = qkv(1, 1, 4, 16, device="cpu")
    assert wa.window_attention_unsupported(q, k, v, *raw, 0.3) is None
    # auto choice falls back to the PyTorch path; a forced kernel says why it cannot run
    q8 = qkv(1, 1, 4, 8, device="cpu")
    monkeypatch.setenv("VITPATCH_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="head width 8"):
        functional.window_attention(*q8, mask)


def test_tile_schedule_arguments(tiles):
    mask = WindowMask.square((4, 4), 1)
    with pytest.raises(ValueError, match="block_m"):
        tiles.tile_schedule(mask, 1, 24, 16)
    with pytest.raises(ValueError, match="order"):
        tiles.tile_schedule(mask, 1, 16, 16, order="hilbert")
    with pytest.raises(TypeError, match="mask"):
        tiles.tile_schedule(mask.windows, 1, 16, 16)


# ----------------------------------------------------------------------------------- torch.compile
def test_compiled_vit_has_no_graph_break(monkeypatch):
    """torch.compile(fullgraph=True) of a timm ViT with WindowAttention and a WindowMask runs the
    kernel's custom op in one graph and matches eager, outputs and parameter gradients."""
    require_kernel(OP, "triton")
    timm = pytest.importorskip("timm")
    from torch._dynamo.testing import CompileCounterWithBackend

    from vitpatch.nn import WindowAttention

    monkeypatch.setenv("VITPATCH_BACKEND", "triton")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=3, attn_layer=WindowAttention).to(DEVICE)
    grid = (4, 4)
    kk = torch.ones(2, 17, dtype=torch.bool)
    kk[1, 3] = False
    mask = WindowMask(local_windows(2, grid, torch.Generator().manual_seed(5), 1), grid, 1, kk)
    images = torch.randn(2, 3, 32, 32, device=DEVICE)

    eager_out = model(images, attn_mask=mask)
    eager_out.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    out = compiled(images, attn_mask=mask)
    out.square().sum().backward()
    assert counter.frame_count == 1
    ops = [str(node.target) for g in counter.graphs for node in g.graph.nodes if node.op == "call_function"]
    assert sum("vitpatch.window_attention_forward" in o for o in ops) == 2, ops
    assert (out - eager_out).abs().max().item() < 1e-5
    for p, g in zip(model.parameters(), eager_grads):
        assert (p.grad - g).abs().max().item() < 1e-4
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------- slot tables, masked scores
@pytest.mark.parametrize("kind,query_order", [("awd", "auto"), ("local", "sorted"), ("keep", "spatial")])
def test_slot_tables_equal_brute_force(wa, ws, kind, query_order):
    """The per-slot tables the kernels read (``_slot_tables_kernel``): the patch in each slot, its
    window, and its outside indicators, one per grid column and grid row of the tiled layout
    (padding columns / rows and padding slots: outside), checked against the windows directly."""
    B, P, grid = 2, 1, (8, 9)
    mask = masks_for(kind, B, grid, P).to(DEVICE)
    cfg = ws.Config(16, 16, 1, 16, query_order)
    sched = ws.build_schedule(mask.windows, mask.key_keep, mask.grid, P, B, cfg)
    lay = sched.layout
    tokens = sched.query_tokens().cpu()
    qtab, qwin, qout = sched.qtab.cpu(), sched.qwin.cpu(), sched.qout.cpu()
    win = mask.windows.cpu()
    win = win if win.dim() == 3 else win[None].expand(qtab.shape[0], -1, -1)
    gwp, ghp = lay.nbx * lay.tw, lay.nby * lay.th
    assert qout.shape[-1] % 16 == 0 and qout.shape[-1] >= gwp + ghp + 16
    for b in range(qtab.shape[0]):
        for s in range(qtab.shape[1]):
            p = int(qtab[b, s])
            assert int(tokens[b, s]) == (p + P if p >= 0 else -1)
            x0, y0, x1, y1 = (win[b, p].tolist() if p >= 0 else (1, 1, 0, 0))
            assert qwin[b, s].tolist() == [x0, y0, x1, y1]
            want = [float(not x0 <= x <= x1) for x in range(gwp)] + [float(not y0 <= y <= y1) for y in range(ghp)]
            assert qout[b, s, :gwp + ghp].tolist() == want, (b, s)
            assert bool((qout[b, s, gwp + ghp:] == 1).all())


def test_masked_score_and_scale_range(wa):
    """The masked score is a power of two that makes ``masked * qk_scale`` about ``-2**60``; scales
    the kernel cannot mask exactly with it are declined (the PyTorch path runs)."""
    for qk_scale in (0.18, 1.0, 3e-9, 7e5):
        m = wa._masked_score(qk_scale)
        assert m < 0 and math.log2(-m) == round(math.log2(-m))
        assert 2.0 ** 59.5 <= -m * qk_scale <= 2.0 ** 60.5
    q = torch.zeros(1, 1, 5, 16, device=DEVICE)
    win = torch.zeros(4, 4, dtype=torch.int32, device=DEVICE)
    assert "scale" in wa.window_attention_unsupported(q, q, q, win, None, (2, 2), 1, 2.0 ** -70)
    assert "scale" in wa.window_attention_unsupported(q, q, q, win, None, (2, 2), 1, 2.0 ** 50)
    assert wa.window_attention_unsupported(q, q, q, win, None, (2, 2), 1, 0.25) is None


@pytest.mark.parametrize("magnitude", [1e-3, 300.0])
def test_extreme_scores_stay_masked(wa, ws, magnitude):
    """Scores far from 1 (tiny, and hundreds of units where a disallowed key scores far above
    every allowed one): the finite masked score still removes disallowed keys exactly, values and
    gradients against float64."""
    B, P, grid = 2, 1, (8, 8)
    mask = masks_for("local", B, grid, P).to(DEVICE)
    N = P + mask.num_patches
    gen = torch.Generator().manual_seed(5)
    q = (torch.randn(B, 1, N, 16, generator=gen) * magnitude).to(DEVICE)
    k = torch.randn(B, 1, N, 16, generator=gen).to(DEVICE)
    k[:, :, P + 27] *= 50  # one key that would dominate every row it is not allowed in
    v = torch.randn(B, 1, N, 16, generator=gen).to(DEVICE)
    cfg = ws.Config(16, 16, 1, 16, "auto")
    out, lse, _ = wa._forward(q, k, v, mask.windows, mask.key_keep, mask.grid, P, 1.0, cfg)
    dout = torch.randn(B, 1, N, 16, generator=gen).to(DEVICE)
    dq, dk, dv, _, _ = wa._backward(dout, q, k, v, out, lse, mask.windows, mask.key_keep, mask.grid, P, 1.0, cfg)
    ref_out, ref_grads = reference_grads(q, k, v, mask, 1.0, dout)
    tol = TOL[torch.float32] * max(1.0, magnitude)
    assert_close(out, ref_out, TOL[torch.float32], "output")
    for name, g, gr in zip("qkv", (dq, dk, dv), ref_grads):
        assert_close(g, gr, tol * 50, f"d{name}")


_FILL_CASES = [(case, qo) for case in [((9, 11), 16, 16, 1, 16), ((9, 7), 32, 16, 1, 16), ((5, 13), 16, 16, 0, 64),
                                        ((11, 6), 64, 16, 1, 16)]
               for qo in ("spatial", "sorted", "grouped", "auto", "best")
               if not (qo == "grouped" and case[3] == 0)]  # grouped needs the tiled key layout


@pytest.mark.parametrize("case,query_order", _FILL_CASES)
def test_query_tiles_fill_from_their_first_slot(ws, case, query_order):
    """Every query order fills a tile's slots from its start, so a tile holds a query iff its first
    slot does: the kernels skip the prefix work of empty tiles by that one slot (``_holds_query``).
    Odd grids, both key layouts, tiles smaller and larger than a layout square, with and without
    key_keep (per-image schedules) and with a window that touches nothing (grouped's spare queries)."""
    grid, bm, bn, order, unit = case
    B, P = 3, 1
    gen = torch.Generator().manual_seed(11)
    windows = local_windows(B, grid, gen, max_radius=3)
    windows[1, 4] = torch.tensor([3, 2, 1, 0])  # empty window
    keep = torch.rand(B, P + grid[0] * grid[1], generator=gen) > 0.2
    for key_keep in (None, keep.to(DEVICE)):  # raw tensors: a WindowMask refuses the empty window
        cfg = ws.Config(bm, bn, order, unit, query_order)
        sched = ws.build_schedule(windows.to(torch.int32).to(DEVICE), key_keep, grid, P, B, cfg)
        tiles = sched.qtab.reshape(sched.qtab.shape[0], sched.tq, bm).cpu()
        holds = (tiles >= 0).any(-1)
        assert torch.equal(tiles[..., 0] >= 0, holds)
        if order == 1 and query_order in ("sorted", "best"):  # the cut's unused tiles are met
            assert (~holds).any()
