"""The window kernels' tile schedule for a :class:`~vitpatch.WindowMask` (tests, benchmarks, studies).

Thin wrappers over :mod:`vitpatch.kernels.window`, which takes the raw mask tensors.
The schedule is built by the very launches the kernels use: on CUDA tensors on the GPU, on CPU
tensors in Triton's interpreter, so the visited-tile counts of benchmark rows are available on a
machine without a GPU. The interpreter needs ``TRITON_INTERPRET=1`` before triton is imported;
a process without it (a CPU benchmark run) gets the schedule from a short-lived child process
that has it (a few seconds).

``block_m`` / ``block_n`` are the query / key tiles in patch slots; ``order`` ``"tiled"``
(default) or ``"row_major"`` is the key layout; ``unit`` the tiled square (default 64 = 8 x 8);
``query_order`` ``"spatial"``, ``"sorted"``, ``"grouped"`` (``TILED`` keys with ``block_n <=
unit`` only; ``sorted`` and ``grouped`` tiles may be partly filled there, so ``TQ`` can exceed
``cdiv(n, block_m)``) or
``"auto"`` (default: each image runs whichever of spatial and sorted visits fewer tiles, on the
device) or ``"best"`` (the same among all three; ``grouped`` runs on the host).
See docs/math.md §1 for what is allowed and the kernel module's docstring for what the codes
and orders mean.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
from typing import Optional

import torch

from .masks import WindowMask

__all__ = ["tile_codes", "tile_schedule", "visited_fraction", "query_tokens", "slot_tokens"]


def _schedule_module():
    return importlib.import_module("vitpatch.kernels.window")


_CHILD = """
import sys, torch
from vitpatch.kernels import _launch, window
args, kwargs = torch.load(sys.argv[1])
with _launch.interpreter():
    torch.save(getattr(window, sys.argv[3])(*args, **kwargs), sys.argv[2])
"""


def _in_child(name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """``window.<name>(*args, **kwargs)`` in a child process with ``TRITON_INTERPRET=1``."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "args.pt"), os.path.join(tmp, "out.pt")
        torch.save((args, kwargs), src)
        env = dict(os.environ, TRITON_INTERPRET="1")
        done = subprocess.run([sys.executable, "-c", _CHILD, src, dst, name], env=env, capture_output=True,
                              text=True)
        if done.returncode != 0:
            lines = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            if "ValueError" in lines:
                raise ValueError(lines.split("ValueError: ", 1)[-1])
            raise RuntimeError(f"the tile schedule failed in the interpreter: {lines}")
        return torch.load(dst)


def _call(name: str, mask: WindowMask, batch_size: Optional[int], block_m: int, block_n: int, **layout):
    if not isinstance(mask, WindowMask):
        raise TypeError(f"mask must be a vitpatch.WindowMask, got {type(mask).__name__}")
    B = mask._batch(batch_size)
    from vitpatch.kernels import _launch
    ws = _schedule_module()
    ws.resolve_config(block_m, block_n, **layout)  # bad arguments fail here, in this process
    args = (mask.windows, mask.key_keep, mask.grid, mask.num_prefix_tokens, B, block_m, block_n)
    if mask.windows.device.type != "cpu":
        return getattr(ws, name)(*args, **layout)
    if not _launch.interpreter_ready():
        return _in_child(name, args, layout)
    with _launch.interpreter():
        return getattr(ws, name)(*args, **layout)


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
    """Visited patch tile pairs over the dense tile count ``cdiv(n, block_m) * TK``, averaged over images.

    Dense, not the schedule's ``TQ`` (which counts the padding tiles of the spatial and ``grouped``
    orders): the same denominator for every query order."""
    vis = tile_schedule(mask, batch_size, block_m, block_n, order=order, unit=unit, query_order=query_order)
    return _schedule_module().schedule._dense_fraction(vis, mask.grid, block_m)


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
