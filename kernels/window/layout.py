"""The slot layout of the window kernels' key tiles, and their launch configuration.

Patches are laid out in *slots*: ``TILED`` (default) groups the patch grid into ``TH x TW``
squares of ``unit`` slots (8 x 8 for 64), row-major inside each square and over the squares;
``ROW_MAJOR`` keeps the token order. A key tile of ``block_n <= unit`` slots is then one
rectangle of the grid. The layout is index arithmetic in the kernels (:func:`_slot_patch`);
:func:`slot_tokens` states it on the host. :class:`Config` is a window launch configuration
(tiles, layout, query order; see :mod:`vitpatch.kernels.window`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import triton
import triton.language as tl

from .._launch import LaunchConfig, helper

__all__ = ["Config", "ROW_MAJOR", "TILED", "ORDERS", "QUERY_ORDERS", "slot_tokens"]

ROW_MAJOR, TILED = 0, 1
ORDERS = {"row_major": ROW_MAJOR, "tiled": TILED}
QUERY_ORDERS = ("spatial", "sorted", "grouped", "auto", "best")


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
    ``"spatial"``, ``"sorted"``, ``"grouped"`` (``TILED`` with ``block_n <= unit`` only) or
    ``"auto"`` or ``"best"`` (see the module docstring); ``num_warps``, ``num_stages`` (GPU only).
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
        if self.query_order == "grouped" and not self.groups_queries:
            raise ValueError("query_order 'grouped' needs the TILED key layout with block_n <= unit (a key tile is "
                             f"then one rectangle of the grid), got order {self.order}, block_n {self.block_n}, "
                             f"unit {self.unit}")

    @property
    def groups_queries(self) -> bool:
        """Whether the ``grouped`` query order applies: ``TILED`` keys with ``block_n <= unit``, so that
        every key tile is one rectangle of the grid (``block_n / TW`` rows of a square)."""
        return self.order == TILED and self.block_n <= self.unit

    @property
    def perm_orders(self) -> Tuple[str, ...]:
        """The query orders given by a ``perm`` that this config schedules, besides ``spatial``:
        ``auto`` builds ``sorted``; ``best`` builds ``sorted`` and ``grouped`` (``sorted`` only where
        ``grouped`` does not apply)."""
        if self.query_order == "auto":
            return ("sorted",)
        if self.query_order == "best":
            return ("sorted", "grouped") if self.groups_queries else ("sorted",)
        return () if self.query_order == "spatial" else (self.query_order,)

    @property
    def schedule_key(self) -> Tuple[int, int, int, int, str]:
        """What the schedule depends on: tiles, layout and query order (not warps or stages, so the
        forward and a backward configuration that differs in those only share one schedule)."""
        return (self.block_m, self.block_n, self.order, self.unit, self.query_order)

    @classmethod
    def of(cls, launch: LaunchConfig) -> "Config":
        """The window configuration a policy entry (``kernels/_launch.py``, units ``window_fwd``/``window_bwd``) names."""
        return cls(launch["BLOCK_M"], launch["BLOCK_N"], launch["ORDER"], launch["UNIT"], launch["QUERY_ORDER"],
                   launch.num_warps, launch.num_stages)


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




@helper
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

