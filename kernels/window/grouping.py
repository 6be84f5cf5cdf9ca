"""The host-side search behind the ``grouped`` query order of the window kernels (numpy only).

Given one image's windows, :func:`grouped_tiles` packs the patch queries into query tiles of
``bm`` slots so that the union of the key tiles (``kw x kh`` squares of the grid) their windows
touch is small: a greedy cover by window signatures (the key tiles a window touches), then a
local search that moves whole signature groups between tiles and cuts tiles whose union grew
too large (see ``vitpatch.kernels.window`` for where it is used and what it costs).
No torch, no Triton: it runs on the host, once per schedule build.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["grouped_tiles", "greedy_tiles"]


def _contains(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """``[i, j]``: rectangle ``inner[j]`` lies inside ``outer[i]`` (rows ``(x0, y0, x1, y1)``, inclusive)."""
    return ((outer[:, None, 0] <= inner[None, :, 0]) & (outer[:, None, 1] <= inner[None, :, 1]) &
            (outer[:, None, 2] >= inner[None, :, 2]) & (outer[:, None, 3] >= inner[None, :, 3]))


def _cover_greedy(us: np.ndarray, cnt: np.ndarray, bm: int) -> np.ndarray:
    """The cover greedy over the ``S`` distinct signatures ``us`` (``cnt`` queries each): ``(m, S)`` int64,
    the queries of each signature in each tile, tiles in the order the greedy makes them.

    While queries are left, every signature ``R`` is a candidate with ``cov(R) = min(bm, unassigned
    queries whose signature lies inside R)``; the one with the largest ``cov(R) / area(R)`` (the first
    such) gets a new tile of up to ``bm`` of those queries, larger signatures first (then lexicographic).
    A tile takes at least one query, so ``m <= n``. ``cov`` is updated incrementally from the queries a
    tile took: ``O(S^2)`` once, then ``O(S * bm)`` per tile, no loop over queries.
    """
    S = us.shape[0]
    area = ((us[:, 2] - us[:, 0] + 1) * (us[:, 3] - us[:, 1] + 1)).astype(np.float64)
    cnt_f = cnt.astype(np.float32)
    inside_all = _contains(us, us) if S <= 3072 else None     # [R, s]: s inside R (at most 9.4 MB)
    raw = np.empty(S, np.int64)        # raw[R]: unassigned queries whose signature lies inside R
    step = max(1, (1 << 22) // S)      # chunks: memory O(S * 4096)
    for a in range(0, S, step):
        inside = inside_all[a:a + step] if inside_all is not None else _contains(us[a:a + step], us)
        raw[a:a + step] = _count_product(inside, cnt_f)
    left = cnt.astype(np.int64)
    by_size = np.argsort(-area, kind="stable")               # larger signatures first, then lexicographic
    remaining = int(left.sum())
    rows = []
    while remaining:
        r = int(np.argmax(np.minimum(raw, bm) / area))
        inside = inside_all[r] if inside_all is not None else _contains(us[r:r + 1], us)[0]
        cand = by_size[inside[by_size] & (left[by_size] > 0)]
        lc = left[cand]
        take = np.clip(bm - (np.cumsum(lc) - lc), 0, lc)
        cand, take = cand[take > 0], take[take > 0]
        if not take.size:  # cannot happen: signature r lies inside itself and raw[r] > 0
            raise RuntimeError("grouped query order: a tile took no query")
        row = np.zeros(S, np.int64)
        row[cand] = take
        rows.append(row)
        left[cand] -= take
        holders = inside_all[:, cand] if inside_all is not None else _contains(us, us[cand])
        raw -= _count_product(holders, take)
        remaining -= int(take.sum())
    return np.array(rows, np.int64).reshape(-1, S)


def _sig_cells(us: np.ndarray) -> Tuple[np.ndarray, int, int]:
    """The key-tile cells of each signature: bool ``(S, ny * nx)`` on the ``ny x nx`` box of key tiles
    the signatures span (row-major), with ``ny, nx``."""
    x0, y0 = int(us[:, 0].min()), int(us[:, 1].min())
    nx, ny = int(us[:, 2].max()) - x0 + 1, int(us[:, 3].max()) - y0 + 1
    inx = (np.arange(nx)[None] >= us[:, 0:1] - x0) & (np.arange(nx)[None] <= us[:, 2:3] - x0)
    iny = (np.arange(ny)[None] >= us[:, 1:2] - y0) & (np.arange(ny)[None] <= us[:, 3:4] - y0)
    return (iny[:, :, None] & inx[:, None, :]).reshape(us.shape[0], ny * nx), ny, nx


def _count_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` of count (or 0/1) matrices, exactly, as int64: float32 products (BLAS) are exact since
    every partial sum is an integer below 2^24 (at most n queries). E.g. ``_count_product(H, sig)[t, c]``:
    the members of tile ``t`` whose signature covers cell ``c``."""
    return np.rint(a.astype(np.float32, copy=False) @ b.astype(np.float32, copy=False)).astype(np.int64)


def _group_moves(H: np.ndarray, sig: np.ndarray, bm: int, max_rounds: int = 64) -> np.ndarray:
    """Local search over whole signature groups of the tiles ``H (T, S)``; returns the new ``H``.

    With ``cnt[t, c]`` the members of tile ``t`` covering cell ``c`` (its union: ``cnt > 0``), moving all
    ``h`` queries of signature ``s`` from tile ``a`` into tile ``b`` (which needs room for ``h``) gains the
    cells of ``s`` where ``cnt[a] == h`` minus those where ``cnt[b] == 0``: one matrix product for every
    pair of group and tile. Each round applies the improving moves best first, at most one per tile (so
    every gain stays exact); when none improves, it merges pairs of tiles whose fills fit one tile and
    whose unions overlap, largest overlap first (a merge gains the overlap). The cost only falls.
    """
    H = H.copy()
    T = H.shape[0]
    sig_f = sig.astype(np.float32)
    cnt = _count_product(H, sig_f)
    for _ in range(max_rounds):
        fill = H.sum(1)
        open_ = np.flatnonzero((fill > 0) & (fill < bm))     # only these can take a query or merge
        if not open_.size:
            break
        a_i, s_i = np.nonzero(H)
        h_i = H[a_i, s_i]
        freed = (sig[s_i] & (cnt[a_i] == h_i[:, None])).sum(1)
        added = _count_product(sig_f, (cnt[open_] == 0).T)   # (S, open)
        gain = freed[:, None] - added[s_i]
        ok = ((bm - fill[open_])[None, :] >= h_i[:, None]) & (a_i[:, None] != open_[None, :])
        gain = np.where(ok, gain, 0)
        merge = gain.max(initial=0) <= 0
        if merge:
            occ = (cnt[open_] > 0).astype(np.float32)
            gain = _count_product(occ, occ.T)
            ok = fill[open_][:, None] + fill[open_][None, :] <= bm
            np.fill_diagonal(ok, False)
            gain = np.where(ok, gain, 0)
            if gain.max(initial=0) <= 0:
                break
        order = np.argsort(-gain, axis=None, kind="stable")
        order = order[gain.reshape(-1)[order] > 0]
        used = np.zeros(T, bool)
        for k in order.tolist():
            i, j = divmod(k, open_.size)
            a, b = (int(open_[i]) if merge else int(a_i[i])), int(open_[j])
            if used[a] or used[b]:
                continue
            used[a] = used[b] = True
            if merge:
                H[b] += H[a]
                H[a] = 0
                cnt[b] += cnt[a]
                cnt[a] = 0
            else:
                s, h = s_i[i], h_i[i]
                H[a, s] -= h
                H[b, s] += h
                cnt[a] -= h * sig[s]
                cnt[b] += h * sig[s]
    return H[H.sum(1) > 0]


class _CutSearch:
    """Local search on the tiles' unions, with flow repair (``grouped_tiles``).

    A move takes a *strip* out of one tile's union: one row or one column of the key-tile box, or all
    of it (the tile is deleted). The tile's queries whose signatures touch the strip are displaced and
    placed again by augmenting paths over the tiles: a displaced group goes into a tile whose union
    already holds its signature and that has room, or into one that hands as many of its own queries
    on to another such tile, and so on (``depth`` hand-overs at most). Queries only ever enter tiles
    whose unions hold their signatures, so no union grows and a move gains at least its strip (more
    where cells or whole tiles empty on the way). A move that cannot be repaired is undone and not
    tried again while its tile's union is unchanged; a strip holding a strip that failed in the same
    state is skipped without a try (it displaces more queries and leaves a smaller union: where the
    smaller cut has no assignment, it has none either).

    State: ``H (T, S)`` queries per tile and signature, ``fill (T,)``, ``M (T, C)`` the unions,
    ``F (S, T)`` 1 where a signature lies inside a union, ``A = H @ F (T, T)`` the queries of one tile
    that fit another. ``checks`` counts the tried moves (the budget: deterministic, not wall time).
    """

    def __init__(self, H: np.ndarray, sig: np.ndarray, bm: int, ny: int, nx: int, depth: int):
        self.H = H.copy()
        self.sig_f = sig.astype(np.float32)
        self.bm, self.ny, self.nx, self.depth = bm, ny, nx, depth
        self.fill = self.H.sum(1)
        self.M = _count_product(self.H, self.sig_f) > 0
        self.F = self._fits(self.M.T)
        self.A = _count_product(self.H, self.F)
        self.checks = 0
        self.touched = []

    def _fits(self, cells: np.ndarray) -> np.ndarray:
        """``cells (C, k)`` bool: int64 ``(S, k)``, 1 where the signature lies inside the cell set."""
        return (self.sig_f @ (~cells).astype(np.float32) < 0.5).astype(np.int64)

    def _set_fits(self, t: int, col: np.ndarray):
        self.F[:, t] = col
        self.A[:, t] = self.H[:, col > 0].sum(1)

    def _add(self, t: int, g: int, q: int, journal: list):
        self.H[t, g] += q
        self.fill[t] += q
        self.A[t] += q * self.F[g]
        journal.append((t, g, q))

    def _undo(self, journal: list):
        for t, g, q in reversed(journal[1:]):
            self.H[t, g] -= q
            self.fill[t] -= q
            self.A[t] -= q * self.F[g]
        t, gs, ks = journal[0]                 # the displaced groups, taken out in one step
        self.H[t, gs] -= ks
        self.fill[t] -= int(ks.sum())
        self.A[t] -= ks @ self.F[gs]

    def _place(self, g: int, k: int, journal: list) -> bool:
        """Place ``k`` queries of signature ``g`` by augmenting paths; False if they do not all fit."""
        T = self.H.shape[0]
        start = self.F[g] > 0
        starts = np.flatnonzero(start)
        if not starts.size:
            return False
        while k > 0:
            room = self.bm - self.fill
            if room[starts].max() > 0:
                c = int(starts[np.argmax(room[starts])])
                q = min(k, int(room[c]))
                self._add(c, g, q, journal)
                k -= q
                continue
            reach = self.A > 0
            parent = np.full(T, -1)
            seen = start.copy()
            frontier = starts
            found = -1
            for _ in range(self.depth):
                nxt = reach[frontier] & ~seen[None, :]
                new = np.flatnonzero(nxt.any(0))
                if not new.size:
                    break
                # parent: the frontier tile that can hand on the most
                parent[new] = frontier[np.argmax(np.where(nxt[:, new], self.A[frontier][:, new], -1), 0)]
                seen[new] = True
                r = new[room[new] > 0]
                if r.size:
                    found = int(r[np.argmax(room[r])])
                    break
                frontier = new
            if found < 0:
                return False
            path = [found]
            while parent[path[-1]] >= 0:
                path.append(int(parent[path[-1]]))
            path.reverse()
            q = min(k, int(room[found]))
            for b, c in zip(path[:-1], path[1:]):
                q = min(q, int(self.A[b, c]))
            self._add(path[0], g, q, journal)
            for b, c in zip(path[:-1], path[1:]):
                cand = np.flatnonzero((self.H[b] > 0) & (self.F[:, c] > 0))
                left = q
                for gg in cand[np.argsort(-self.H[b, cand], kind="stable")].tolist():
                    r = min(left, int(self.H[b, gg]))
                    self._add(b, gg, -r, journal)
                    self._add(c, gg, r, journal)
                    left -= r
                    if not left:
                        break
            k -= q
        return True

    def try_cut(self, t: int, strip: np.ndarray) -> bool:
        """Take ``strip`` out of tile ``t``'s union: True (applied) if the displaced queries fit elsewhere."""
        self.checks += 1
        old = self.F[:, t].copy()
        col = self._fits((self.M[t] & ~strip)[:, None])[:, 0]
        self._set_fits(t, col)
        gs = np.flatnonzero((self.H[t] > 0) & (col == 0))
        ks = self.H[t, gs].copy()
        journal = [(t, gs, -ks)]
        self.H[t, gs] = 0
        self.fill[t] -= int(ks.sum())
        self.A[t] -= ks @ self.F[gs]
        # enough room in the tiles the displaced queries fit into or reach in ``depth`` hand-overs
        reach = self.A > 0
        seen = self.F[gs].any(0)
        frontier = seen
        for _ in range(self.depth):
            frontier = reach[frontier].any(0) & ~seen
            if not frontier.any():
                break
            seen |= frontier
        ok = int((self.bm - self.fill)[seen].sum()) >= int(ks.sum())
        for i in np.argsort(self.F[gs].sum(1), kind="stable").tolist():    # fewest places first
            if not ok:
                break
            ok = self._place(int(gs[i]), int(ks[i]), journal)
        if not ok:
            self._undo(journal)
            self._set_fits(t, old)
            return False
        self.touched = sorted({e[0] for e in journal})
        occ = _count_product(self.H[self.touched], self.sig_f) > 0
        self.M[self.touched] = occ
        cols = self._fits(occ.T)
        for j, tt in enumerate(self.touched):
            self._set_fits(tt, cols[:, j])
        return True

    def _strips(self, t: int) -> list:
        """Tile ``t``'s strips (its rows, its columns, all of it): ``(cells, displaced queries, t, j, strip)``."""
        m = self.M[t].reshape(self.ny, self.nx)
        ys, xs = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        strips = np.zeros((ys.size + xs.size + 1, self.ny, self.nx), bool)
        strips[np.arange(ys.size), ys] = m[ys]
        strips[ys.size + np.arange(xs.size), :, xs] = m[:, xs].T
        strips[-1] = m
        strips = strips.reshape(len(strips), -1)
        gs = np.flatnonzero(self.H[t] > 0)
        disp = self.H[t, gs] @ ((self.sig_f[gs] @ strips.T.astype(np.float32)) > 0.5)
        return [(int(c), int(d), t, j, s) for j, (c, d, s) in enumerate(zip(strips.sum(1), disp, strips))]

    def run(self, order: str, max_checks: int) -> np.ndarray:
        """First-improvement search until no strip can be cut or ``max_checks`` moves were tried.
        ``order``: ``"ratio"`` tries strips by cells gained per displaced query (``cells / (disp + 4)``),
        ``"disp"`` by fewest displaced queries (then most cells). Returns ``H`` without empty tiles."""
        if order == "ratio":
            key = lambda c: (-c[0] / (c[1] + 4.0), c[1], c[2], c[3])  # noqa: E731
        else:
            key = lambda c: (c[1], -c[0], c[2], c[3])  # noqa: E731
        cache, failed = {}, set()
        moved = True
        while moved and self.checks < max_checks:
            cands = []
            for t in np.flatnonzero(self.fill > 0).tolist():
                if t not in cache:
                    cache[t] = self._strips(t)
                cands.extend(cache[t])
            cands.sort(key=key)
            moved, fails = False, {}
            for cells, disp, t, j, strip in cands:
                tag = (t, strip.tobytes(), self.M[t].tobytes())
                if tag in failed:
                    continue
                if any(not (f & ~strip).any() for f in fails.get(t, ())):
                    failed.add(tag)
                    continue
                if self.checks >= max_checks:
                    break
                if self.try_cut(t, strip):
                    for tt in self.touched:
                        cache.pop(tt, None)
                    moved = True
                    break
                failed.add(tag)
                fails.setdefault(t, []).append(strip)
        return self.H[self.fill > 0]


# The refinement after the cover greedy: (candidate order, tried moves) per cut-search pass, and the
# hand-overs per augmenting path. 32 tries in all keep the host time at 15-25 ms per image at n = 576
# and 85-170 ms at n = 4096 (one CPU thread, AWD windows; the greedy alone: 2 ms, 25-50 ms); a pass
# ends earlier where no strip can be cut. More tries found nothing more at n = 576 and under 0.5%
# fewer visited tiles at n = 4096.
_CUT_PASSES = (("ratio", 16), ("disp", 16))
_CUT_DEPTH = 3
_REFINE_MAX = 1 << 27      # no refinement where signatures x cells x tiles (a group-move round) exceed this


def grouped_tiles(win: np.ndarray, bm: int, kw: int, kh: int, refine: bool = True) -> np.ndarray:
    """One image's ``grouped`` query tiles: int64 ``(m * bm,)`` patch indices, ``-1`` in padding slots.

    A tile of queries visits the union of their *signatures*, the windows quantised to the key-tile grid
    (``kw`` columns x ``kh`` rows per key tile): ``(x0 // kw, y0 // kh, x1 // kw, y1 // kh)`` is exactly
    the rectangle of key tiles a window touches. The cost to lower is the sum over tiles of their
    unions' cells. Queries with one signature are interchangeable, so everything works on the ``S``
    distinct signatures and the count of each in each tile:

    1. the cover greedy (:func:`_cover_greedy`); ``refine=False`` stops here (the order before the
       refinement, :func:`_greedy_tiles`), and so do problems past ``_REFINE_MAX`` (from about
       ``n = 96 x 96`` with 8 x 4 key tiles, where the refinement would cost seconds for well under 1%);
    2. group moves and merges of partly filled tiles (:func:`_group_moves`);
    3. cut search with flow repair (:class:`_CutSearch`, passes ``_CUT_PASSES``), group moves again
       after each pass.

    Every step only lowers the cost, never grows a tile past ``bm`` and never opens a tile, so ``m`` is
    at most the greedy's (tiles may be partly filled; ``m`` may exceed ``cdiv(n, bm)``). Inside a tile,
    larger signatures come first, each signature's queries in patch order. Deterministic (the search
    budget counts tried moves, not time). Empty windows (touching nothing) fill the padding slots last,
    then whole tiles of their own.
    """
    n = win.shape[0]
    x0, y0, x1, y1 = (win[:, c].astype(np.int64) for c in range(4))
    empty = (x0 > x1) | (y0 > y1)
    real = np.flatnonzero(~empty)
    perm = np.empty(0, np.int64)
    if real.size:
        sig = np.stack([x0 // kw, y0 // kh, x1 // kw, y1 // kh], 1)[real]
        us, inv, cnt = np.unique(sig, axis=0, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        H = _cover_greedy(us, cnt, bm)
        if refine:
            cells, ny, nx = _sig_cells(us)
            if us.shape[0] * cells.shape[1] * H.shape[0] <= _REFINE_MAX:
                H = _group_moves(H, cells, bm)
                for order, checks in _CUT_PASSES:
                    H = _CutSearch(H, cells, bm, ny, nx, _CUT_DEPTH).run(order, checks)
                    H = _group_moves(H, cells, bm)
        area = (us[:, 2] - us[:, 0] + 1) * (us[:, 3] - us[:, 1] + 1)
        by_size = np.argsort(-area, kind="stable")               # larger signatures first, then lexicographic
        # entries (tile, signature, count) in slot order; a signature hands out its queries (by patch
        # index: queue[start[s]:start[s] + cnt[s]]) in that order
        take = H[:, by_size].reshape(-1)
        of = np.tile(by_size, H.shape[0])
        of, take = of[take > 0], take[take > 0]
        order = np.argsort(of, kind="stable")
        before = np.empty_like(take)
        ends = np.cumsum(take[order])
        seg = np.r_[0, np.flatnonzero(np.diff(of[order])) + 1]
        before[order] = ends - take[order] - np.repeat((ends - take[order])[seg], np.diff(np.r_[seg, take.size]))
        queue = real[np.argsort(inv, kind="stable")]             # queries by signature, then patch index
        first = np.cumsum(cnt)[of] - cnt[of] + before
        total = int(take.sum())
        within = np.arange(total) - np.repeat(np.cumsum(take) - take, take)
        fills = H.sum(1)
        slot = np.repeat(np.arange(H.shape[0]) * bm - (np.cumsum(fills) - fills), fills) + np.arange(total)
        perm = np.full(H.shape[0] * bm, -1, np.int64)
        perm[slot] = queue[np.repeat(first, take) + within]
    spare = np.flatnonzero(empty)
    if spare.size:
        holes = np.flatnonzero(perm < 0)[:spare.size]
        perm[holes] = spare[:holes.size]
        rest = spare[holes.size:]
        if rest.size:
            perm = np.concatenate([perm, rest, np.full((-rest.size) % bm, -1, np.int64)])
    assert perm.size % bm == 0 and np.count_nonzero(perm >= 0) == n
    return perm


def greedy_tiles(win: np.ndarray, bm: int, kw: int, kh: int) -> np.ndarray:
    """The plain cover greedy's tiles (``grouped_tiles`` without the refinement), for comparisons."""
    return grouped_tiles(win, bm, kw, kh, refine=False)
