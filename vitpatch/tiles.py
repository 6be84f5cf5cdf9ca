"""The window kernels' tile schedule for a :class:`~vitpatch.WindowMask` (tests, benchmarks, studies).

Thin wrappers over :mod:`vitpatch.kernels.window_schedule`, which takes the raw mask tensors.
The schedule is built by the very launches the kernels use: on CUDA tensors on the GPU, on CPU
tensors in Triton's interpreter (entered here for the call, whatever ``TRITON_INTERPRET`` says),
so the visited-tile counts of benchmark rows are available on a machine without a GPU.

``block_m`` / ``block_n`` are the query / key tiles in patch slots; ``order`` ``"tiled"``
(default) or ``"row_major"`` is the key layout; ``unit`` the tiled square (default 64 = 8 x 8);
``query_order`` ``"auto"`` (default), ``"spatial"`` or ``"sorted"``. See docs/math.md §1 for
what is allowed and the kernel module's docstring for what the codes mean.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Optional

import torch

from .masks import WindowMask

__all__ = ["tile_codes", "tile_schedule", "visited_fraction", "query_tokens", "slot_tokens"]


def _schedule_module():
    return importlib.import_module("vitpatch.kernels.window_schedule")


def _call(name: str, mask: WindowMask, batch_size: Optional[int], block_m: int, block_n: int, **layout):
    if not isinstance(mask, WindowMask):
        raise TypeError(f"mask must be a vitpatch.WindowMask, got {type(mask).__name__}")
    B = mask._batch(batch_size)
    from vitpatch.kernels import _launch
    ctx = _launch.interpreter() if mask.windows.device.type == "cpu" else contextlib.nullcontext()
    with ctx:
        return getattr(_schedule_module(), name)(mask.windows, mask.key_keep, mask.grid, mask.num_prefix_tokens, B,
                                                 block_m, block_n, **layout)


def tile_codes(mask: WindowMask, batch_size: Optional[int] = None, block_m: int = 64, block_n: int = 64, *,
               order=None, unit: Optional[int] = None, query_order: Optional[str] = None) -> torch.Tensor:
    """int8 ``(B, TQ, TK)`` over the patch tiles: 0 skipped, 1 visited with the element mask, 2 visited whole."""
    return _call("tile_codes", mask, batch_size, block_m, block_n, order=order, unit=unit, query_order=query_order)


def tile_schedule(mask: WindowMask, batch_size: Optional[int] = None, block_m: int = 64, block_n: int = 64, *,
                  order=None, unit: Optional[int] = None, query_order: Optional[str] = None) -> torch.Tensor:
    """bool ``(B, TQ, TK)``: which (query tile, key tile) pairs of patch slots the kernels visit."""
    return tile_codes(mask, batch_size, block_m, block_n, order=order, unit=unit, query_order=query_order) > 0


def visited_fraction(mask: WindowMask, batch_size: Optional[int] = None, block_m: int = 64, block_n: int = 64, *,
                     order=None, unit: Optional[int] = None, query_order: Optional[str] = None) -> float:
    """Fraction of the patch tile pairs the kernels visit, averaged over images."""
    vis = tile_schedule(mask, batch_size, block_m, block_n, order=order, unit=unit, query_order=query_order)
    return float(vis.double().mean())


def query_tokens(mask: WindowMask, batch_size: Optional[int] = None, block_m: int = 64, block_n: int = 64, *,
                 order=None, unit: Optional[int] = None, query_order: Optional[str] = None) -> torch.Tensor:
    """int64 ``(B, TQ * block_m)``: the token in each query slot of each image (``-1`` padding)."""
    return _call("query_tokens", mask, batch_size, block_m, block_n, order=order, unit=unit,
                 query_order=query_order)


def slot_tokens(grid, num_prefix_tokens: int = 0, order="tiled", unit: int = 64) -> torch.Tensor:
    """int64 ``(slots,)``: the token held by each key slot of the layout (``-1`` padding)."""
    ws = _schedule_module()
    if isinstance(order, str):
        if order not in ws.ORDERS:
            raise ValueError(f"order must be one of {sorted(ws.ORDERS)}, got {order!r}")
        order = ws.ORDERS[order]
    return ws.slot_tokens(grid, num_prefix_tokens, order, unit)
