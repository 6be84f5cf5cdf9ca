"""Token order study for the window-attention kernel: how many tiles does each order visit?

The kernel (``kernels/window_attention.py``) computes a (query tile, key tile) block only when
some window of the query tile reaches the key tile. Which patch tokens share a tile is the
kernel's choice, on both sides:

* key tiles: ``row_major`` (a 64-token tile is a strip of rows) or ``tiled`` (the grid cut into
  2-D squares: ``tiled_8x8`` = 64 patches per square; ``tiled_4x4`` = 16-patch squares, so a
  64-token tile is a 16 x 4 strip of four of them);
* query tiles: ``spatial`` (the same layout as the keys), ``sorted`` (queries ordered by a 4-D
  Morton code of their windows, so a tile holds queries with similar windows), ``grouped`` (made on
  the host: a cover greedy, each tile taking up to BM queries whose key-tile rectangles lie
  inside one rectangle, then a local search that shrinks the tiles' unions; tiles may be partly
  filled, so there can be more than ``cdiv(n, BM)``), or ``auto``
  (``spatial`` and ``sorted`` built, each image runs the one that visits fewer tiles; the
  default) or ``best`` (the same over all three).
  ``tiled_8x8/auto`` is derived from the spatial and sorted rows (per image the cheaper, ties to
  spatial: what the kernels' ``auto`` computes on the device).

This script counts, with no timing, for AWD-like windows (``synthetic_awd_windows`` at
density 0.23) and square windows of radius 1, 3, 7, at n = 196, 576, 1024, 4096 patches:

* ``visited_tiles``: patch tile pairs visited per image (mean over images); ``query_tiles`` and
  ``total_tiles`` (``TQ * TK``) of the schedule; ``dense_tiles = cdiv(n, BM) * TK``;
* ``visited_fraction``: ``visited_tiles / dense_tiles``. The dense count, not ``total_tiles``:
  the padded schedule's ``TQ`` (the spatial order's padding tiles, partly filled ``grouped``
  tiles) would shrink the fraction by adding tiles that visit nothing;
* ``density_over_visited``: ``mask_density / visited_fraction`` (higher is better; at most
  about 1 when every visited tile pair were fully allowed);
* ``lower_bound_visited``: ``sum over patch queries of the key tiles their window touches / BM
  / dense_tiles``: no query order can visit fewer tile pairs (mean over images);
* ``work_vs_dense``: ``visited_tiles * BM * BN / n^2``: the kernel's patch-to-patch work
  relative to dense attention (padding slots included). This decides the order;
* ``tile_efficiency``: allowed patch pairs / (``visited_tiles * BM * BN``);
* ``full_fraction``: visited tiles that skip the element mask (inside every window);
* ``mask_density``: allowed pairs / N^2 of the whole mask (one CLS prefix token).

Every kernel order's counts come from the kernel's own schedule launch (``tile_codes``) and
are checked against the tiles that ``mask.dense()`` touches for the same slot assignment
(``query_tokens``, ``slot_tokens``); ``morton_packed`` (both sides in 2-D Z-order, no padding)
is counted from the dense mask only, as an outside reference. Prefix tokens are not in the
table: the kernel handles them in separate narrow blocks for every order.

Run: ``python bench/window_tile_order.py`` (CPU: the schedule runs in Triton's interpreter;
about 15 to 40 minutes on 2 busy cores). Writes ``bench/results/window_tile_order.json`` and
prints a table.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import triton  # noqa: E402

from vitpatch import WindowMask  # noqa: E402
from vitpatch.kernels import window as wa  # noqa: E402
from vitpatch.masks import synthetic_awd_windows  # noqa: E402

GRIDS = [(14, 14), (24, 24), (32, 32), (64, 64)]
BLOCKS = [(64, 64), (128, 64), (64, 32), (32, 64)]
# name -> (key order, unit, query order) for the kernel's orders; None: counted from the dense mask only
ORDERS = {
    "row_major/spatial": (wa.ROW_MAJOR, 64, "spatial"),
    "row_major/sorted": (wa.ROW_MAJOR, 64, "sorted"),
    "tiled_4x4/spatial": (wa.TILED, 16, "spatial"),
    "tiled_8x8/spatial": (wa.TILED, 64, "spatial"),
    "tiled_8x8/sorted": (wa.TILED, 64, "sorted"),
    "tiled_8x8/grouped": (wa.TILED, 64, "grouped"),
    "tiled_8x8/best": (wa.TILED, 64, "best"),
    "tiled_8x8/auto": "derived",
    "morton_packed": None,
}
IMAGES = 2
PREFIX = 1
OUT = Path(__file__).resolve().parent / "results" / "window_tile_order.json"


def window_kinds(grid, device):
    """``(name, WindowMask)`` pairs: AWD-like windows at density 0.23 and square windows."""
    kinds = [("awd_0.23", WindowMask(synthetic_awd_windows(grid, IMAGES, 0.23, seed=0), grid, PREFIX))]
    for r in (1, 3, 7):
        kinds.append((f"square_r{r}", WindowMask.square(grid, r, PREFIX)))
    return [(name, m.to(device)) for name, m in kinds]


def morton_slots(grid, block: int) -> torch.Tensor:
    """Patch tokens in Z-order (interleaved x, y bits), packed: ``(slots,)`` with -1 padding at the end."""
    gh, gw = grid
    p = torch.arange(gh * gw)
    x, y = p % gw, p // gw
    code = torch.zeros_like(p)
    for bit in range(16):
        code |= ((x >> bit) & 1) << (2 * bit) | ((y >> bit) & 1) << (2 * bit + 1)
    order = p[torch.argsort(code)] + PREFIX
    slots = triton.cdiv(gh * gw, block) * block
    return torch.cat([order, torch.full((slots - gh * gw,), -1)])


def dense_codes(mask: WindowMask, q_slots: torch.Tensor, k_slots: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """Tile codes from the dense mask: 0 untouched, 1 touched, 2 every valid query allows every key slot.

    ``q_slots (B, Sq)``: the token in each query slot of each image; ``k_slots (Sk,)``: of each key
    slot (``-1`` = padding)."""
    pad = lambda s, L: torch.cat([s, s.new_full(s.shape[:-1] + (L - s.shape[-1],), -1)], -1)
    q_slots = pad(q_slots.cpu(), triton.cdiv(q_slots.shape[-1], bm) * bm)
    k_slots = pad(k_slots.cpu(), triton.cdiv(k_slots.shape[-1], bn) * bn)
    dense = mask.dense(IMAGES).cpu()
    kv = k_slots >= 0
    out = []
    for b in range(IMAGES):
        qs = q_slots[b]
        qv = qs >= 0
        a = dense[b][qs.clamp(min=0)][:, k_slots.clamp(min=0)] & qv[:, None] & kv[None, :]
        a = a.reshape(qs.numel() // bm, bm, k_slots.numel() // bn, bn)
        touched = a.any(3).any(1)
        ok = (a | ~qv.reshape(-1, bm, 1, 1)).all(3).all(1) & kv.reshape(1, -1, bn).all(2)
        out.append(touched.to(torch.int8) + (touched & ok).to(torch.int8))
    return torch.stack(out)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def touched_bound(mask: WindowMask, k_slots: torch.Tensor, bm: int, bn: int, dense_tiles: int) -> float:
    """``lower_bound_visited``: per patch query the key tiles it touches (dense mask), summed, over
    ``bm * dense_tiles``; mean over images."""
    k_slots = k_slots.cpu()
    k_slots = torch.cat([k_slots, k_slots.new_full((triton.cdiv(k_slots.numel(), bn) * bn - k_slots.numel(),), -1)])
    dense = mask.dense(IMAGES).cpu()
    kv = k_slots >= 0
    out = []
    for b in range(IMAGES):
        a = dense[b][PREFIX:][:, k_slots.clamp(min=0)] & kv[None, :]
        out.append(float(a.reshape(a.shape[0], -1, bn).any(2).sum()) / bm / dense_tiles)
    return sum(out) / len(out)


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = {"device": "cpu (counting, no timing)" if device.type == "cpu" else
            f"{torch.cuda.get_device_name()} (counting, no timing)", "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit()}
    rows = []
    t0 = time.time()
    for grid in GRIDS:
        n = grid[0] * grid[1]
        for kind, mask in window_kinds(grid, device):
            allowed_patch = float(mask.effective_operations())  # patch-to-patch allowed pairs per image
            density = mask.density(IMAGES)
            for bm, bn in BLOCKS:
                per_order = {}
                bounds = {}
                for order, spec in ORDERS.items():
                    auto_choice = None
                    if spec is None:
                        slots = morton_slots(grid, max(bm, bn))
                        codes = dense_codes(mask, slots.expand(IMAGES, -1), slots, bm, bn)
                        k_slots, layout = slots, "morton"
                        source = "dense mask"
                        key_order = query_order = "morton_packed"
                    elif spec == "derived":
                        sp, so = per_order["tiled_8x8/spatial"], per_order["tiled_8x8/sorted"]
                        vs, vo = (sp > 0).sum((1, 2)), (so > 0).sum((1, 2))
                        tq = max(sp.shape[1], so.shape[1])
                        pad = lambda c: torch.cat([c, c.new_zeros(c.shape[0], tq - c.shape[1], c.shape[2])], 1)
                        codes = torch.where((vo < vs)[:, None, None], pad(so), pad(sp))
                        k_slots, layout = wa.slot_tokens(grid, PREFIX, wa.TILED, 64), (wa.TILED, 64)
                        source = "derived: per image the cheaper tiled_8x8 spatial or sorted row (ties: spatial), what auto runs"
                        key_order, query_order = order.split("/")
                        auto_choice = {"spatial": int((vo >= vs).sum()), "sorted": int((vo < vs).sum())}
                    else:
                        k_order, unit, q_order = spec
                        # one schedule launch, as in tile_codes / query_tokens
                        sched = wa.schedule._schedule_for(mask.windows, mask.key_keep, mask.grid, mask.num_prefix_tokens, IMAGES, bm, bn,
                                                 k_order, unit, q_order)
                        codes = sched.chosen_codes().expand(IMAGES, -1, -1).cpu()
                        q_slots = sched.query_tokens().expand(IMAGES, -1)
                        k_slots, layout = wa.slot_tokens(grid, PREFIX, k_order, unit), (k_order, unit)
                        ref = dense_codes(mask, q_slots, k_slots, bm, bn)
                        if not torch.equal(codes, ref):
                            raise AssertionError(f"kernel schedule differs from the dense mask: {grid} {kind} "
                                                 f"{order} {bm}x{bn}")
                        source = "kernel schedule (checked against the dense mask)"
                        key_order, query_order = order.split("/")
                        if q_order in ("auto", "best"):
                            names = ("spatial",) + sched.cfg.perm_orders
                            chosen = sched.choice.cpu().expand(IMAGES).tolist() if sched.bs == 1 else \
                                sched.choice.cpu().tolist()
                            auto_choice = {name: chosen.count(v) for v, name in enumerate(names)}
                    codes = codes.cpu()
                    per_order[order] = codes
                    tk = codes.shape[2]
                    dense_tiles = triton.cdiv(n, bm) * tk
                    if layout not in bounds:
                        bounds[layout] = touched_bound(mask, k_slots, bm, bn, dense_tiles)
                    visited = float((codes > 0).sum((1, 2)).double().mean())
                    full = float((codes == 2).sum((1, 2)).double().mean())
                    fraction = visited / dense_tiles
                    rows.append({
                        "n": n, "grid": list(grid), "num_prefix_tokens": PREFIX, "window": kind, "order": order,
                        "key_order": key_order, "query_order": query_order, "auto_choice": auto_choice,
                        "block_m": bm, "block_n": bn, "visited_tiles": visited, "query_tiles": codes.shape[1],
                        "total_tiles": codes.shape[1] * tk, "dense_tiles": dense_tiles,
                        "visited_fraction": fraction, "density_over_visited": density / fraction,
                        "lower_bound_visited": bounds[layout], "work_vs_dense": visited * bm * bn / n ** 2,
                        "tile_efficiency": allowed_patch / (visited * bm * bn), "full_fraction": full / visited,
                        "mask_density": density, "images": IMAGES, "source": source, **meta})
            print(f"  {grid} {kind} done ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows)
    print(f"\nwrote {len(rows)} rows to {OUT}")
    return 0


def print_table(rows) -> None:
    names = [o.replace("tiled_8x8/", "8x8/").replace("row_major/", "rm/").replace("tiled_4x4/", "4x4/") for o in ORDERS]
    key = {(r["n"], r["window"], r["block_m"], r["block_n"], r["order"]): r for r in rows}
    for title, field in (("visited_fraction (visited / (cdiv(n, BM) * TK); lower is better)", "visited_fraction"),
                         ("density_over_visited (mask density / visited fraction; higher is better)",
                          "density_over_visited")):
        print(f"\n{title}; lb = lower_bound_visited of the tiled_8x8 key layout")
        print(f"{'n':>5} {'window':<10} {'BMxBN':>7} " + " ".join(f"{o:>12}" for o in names) + f" {'lb':>6}")
        for n in sorted({r["n"] for r in rows}):
            for kind in dict.fromkeys(r["window"] for r in rows if r["n"] == n):
                for bm, bn in BLOCKS:
                    cells = [f"{key[(n, kind, bm, bn, o)][field]:.3f}" for o in ORDERS]
                    lb = key[(n, kind, bm, bn, "tiled_8x8/spatial")]["lower_bound_visited"]
                    print(f"{n:>5} {kind:<10} {bm:>3}x{bn:<3} " + " ".join(f"{c:>12}" for c in cells) + f" {lb:>6.3f}")
    dens = {(r["n"], r["window"]): r["mask_density"] for r in rows}
    print("\nmask density (N = n + 1): " + ", ".join(f"n={n} {k}: {d:.3f}" for (n, k), d in dens.items()))


if __name__ == "__main__":
    sys.exit(main())
