"""The tile schedule of window-masked attention (paper 000 §4.1 eq. 4; docs/math.md §1).

Three modules: :mod:`.layout` (the key slots' layout and :class:`Config`), :mod:`.schedule`
(the device schedule: query orders, tile classification, per-slot tables, cache) and
:mod:`.grouping` (the host-side search behind the ``grouped`` order; numpy only).

The attention kernels (:mod:`vitpatch.kernels.window_attention`) never store the mask: they
evaluate it from the ``O(n)`` windows and, above all, skip whole tiles. This module decides
which tiles, on the device, before the attention kernels run:

* **Key tiles** are compact pieces of the patch grid: patches are laid out in *slots*,
  ``TILED`` (default) grouping the grid into ``TH x TW`` squares of ``unit`` slots (8 x 8 for
  64) and ``ROW_MAJOR`` keeping the token order. A key tile is then one rectangle of the grid
  (at most three for a row-major run), which a rectangular window covers entirely or misses
  far more often than a strip of rows. Slots past the grid's edge are padding. The layout is
  index arithmetic in the kernels (``_slot_patch``): nothing is copied, results land in token
  order.
* **Query tiles** (``Config.query_order``) are ``spatial`` (the same squares), ``sorted``,
  ``grouped``, ``auto`` or ``best``:

  - ``sorted``: the patch queries ordered by a 4-D Morton code of their windows ``(x_left,
    y_top, x_right, y_bottom)``, so a tile holds queries with similar windows and the union of
    its windows stays small. Where key tiles are rectangles (``TILED``, ``BN <= unit``) the order
    is cut where the windows change rather than every ``BM``: runs of ``BM / 2 .. BM`` queries
    chosen by a dynamic programme on the device (``_cut_kernel``: least summed bounding box of
    the runs' windows in key tiles), one run per tile, so ``TQ = cdiv(n, BM / 2)`` with padding
    slots and unused tiles (they visit nothing). On AWD windows at 128-row tiles this visits
    0.74 instead of 0.84 of the dense tile pairs at ``n = 576`` and 0.31 instead of 0.35 at
    ``n = 4096``, density 0.05; elsewhere the chunks are every ``BM``.
  - ``grouped``: tiles made on the host (:func:`grouped_perm`) to minimise the key tiles they
    visit. A query's *signature* is its window quantised to the key-tile grid, exactly the
    rectangle of key tiles it touches, and a tile visits the union of its queries' signatures.
    A cover greedy makes the tiles (each new tile takes up to ``BM`` queries whose signatures lie
    inside one signature rectangle ``R``, the ``R`` with the most such queries, at most ``BM``,
    per key tile); a local search then moves whole signature groups between tiles, merges partly
    filled tiles, and cuts a row, a column or a whole tile out of a tile's union where the
    displaced queries fit into tiles whose unions already hold them
    (:func:`vitpatch.kernels.window.grouping.grouped_tiles`).
    Tiles may be partly filled (padding slots, ``-1`` in ``perm``), so there can be more than
    ``cdiv(n, BM)`` of them (1.0 to 1.5x on AWD windows, up to 2.8x on radius-1 squares); ``TQ``
    is the largest count over the images. Only for ``TILED`` keys with ``BN <= unit`` (a key
    tile is one rectangle). It costs one device-to-host copy of the windows per schedule build
    (one sync on CUDA; the schedule is cached, see below).
  - ``auto`` (default): ``spatial`` and ``sorted`` are scheduled and each image runs the one
    with fewer visited tiles (ties: spatial), decided on the device: no host work, no sync.
  - ``best``: ``auto`` plus ``grouped`` (where it applies), ties to spatial, then sorted. No
    single order wins: AWD windows (a patch plus far-away partners) defeat spatial tiles and
    favour ``grouped`` (at density 0.23 with 64 x 64 tiles, 0.62 instead of ``auto``'s 0.73 of
    the tiles at ``n = 576``, 0.42 instead of 0.50 at ``n = 4096``), large square windows
    favour spatial, small squares and small grids often ``sorted``
    (``bench/window_tile_order.py``). It is not the default because ``grouped`` runs on the
    host: 15-25 ms per image at ``n = 576`` and 85-170 ms at ``n = 4096`` (one CPU thread)
    plus a sync, every time per-image windows change, against a 15% cut of the attention
    kernels' tile visits; whether that pays needs GPU timings.

  Every ``perm`` has ``TQ * BM`` slots; the kernels bound their ``perm`` reads by that length,
  so a valid query may sit in a slot ``>= n``, and a tile with no valid query visits nothing.
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

Because the schedule depends on the block sizes, the window kernels tune their configuration
with the schedule build included (``window_attention._pick_config``).

Helpers for tests and benchmarks, built by the launchers' own code path and taking the raw
mask tensors: :func:`tile_codes`, :func:`tile_schedule`, :func:`visited_fraction`,
:func:`query_tokens`, :func:`slot_tokens` (``vitpatch.tiles`` offers them on a ``WindowMask``).
"""
from .layout import ORDERS, QUERY_ORDERS, ROW_MAJOR, TILED, Config, slot_tokens
from .schedule import (Schedule, build_schedule, cached_schedule, grouped_perm, query_tokens, resolve_config,
                       tile_codes, tile_schedule, visited_fraction)

__all__ = ["Config", "ROW_MAJOR", "TILED", "ORDERS", "QUERY_ORDERS", "slot_tokens", "tile_codes", "tile_schedule",
           "visited_fraction", "query_tokens", "grouped_perm", "build_schedule", "cached_schedule", "Schedule",
           "resolve_config"]
