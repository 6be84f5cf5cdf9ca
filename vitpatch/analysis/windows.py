"""From ``U`` to attention windows, dropped patches and responsive fields (paper 000 §4; docs/math.md §3–5).

Every function here is vectorised over patches (no Python loop over ``p``) and runs on the
device of its input. Patch ``p`` sits at column ``x_p = p % gw`` and row ``y_p = p // gw``;
a window is ``(x_left, y_top, x_right, y_bottom)``, inclusive.
"""
from __future__ import annotations

import math
import numbers
from typing import Tuple

import torch

from ..masks import WindowMask, _window_counts, check_grid, effective_operations

__all__ = ["adaptive_windows", "indiscriminative_patches", "responsive_field", "effective_operations",
           "num_selected", "num_dropped", "round_half_up", "dip_sweep"]


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: the rounding used for ``T = round(alpha n^2)`` and ``round(beta n)``.

    Decision (docs/math.md §3–4 say "round"): halves round up, not to even, so ``beta = 0.25, n = 10``
    drops 3 patches. A relative slack of 1e-9 absorbs binary error (``0.1 * 30`` is 3, not 3.0000000000000004).
    """
    return int(math.floor(x + 0.5 + 1e-9 * max(1.0, abs(x))))


def _check_fraction(value, name: str, lo_open: bool, hi_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    lo_ok = v > 0 if lo_open else v >= 0
    hi_ok = v < 1 if hi_open else v <= 1
    if not (lo_ok and hi_ok):
        rng = ("(" if lo_open else "[") + "0, 1" + (")" if hi_open else "]")
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


def num_selected(alpha: float, n: int) -> int:
    """``T = round(alpha * n^2)``: how many entries of ``U`` eq. 4 keeps (docs/math.md §3)."""
    return round_half_up(_check_fraction(alpha, "alpha", True, False) * n * n)


def num_dropped(beta: float, n: int) -> int:
    """``round(beta * n)``: how many patches DIP drops (docs/math.md §4)."""
    return round_half_up(_check_fraction(beta, "beta", False, True) * n)


def _check_u(U, name: str = "U") -> Tuple[torch.Tensor, bool]:
    if not isinstance(U, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(U).__name__}")
    if U.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (B, n, n) or (n, n), got {tuple(U.shape)}")
    if not U.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {U.dtype}")
    if U.shape[-1] != U.shape[-2]:
        raise ValueError(f"{name} must be square in its last two dimensions (n, n), got {tuple(U.shape)}")
    if U.numel() and bool(torch.isnan(U).any()):
        raise ValueError(f"{name} contains NaN")
    batched = U.dim() == 3
    return (U if batched else U.unsqueeze(0)), batched


def _check_grid_n(grid, n: int, what: str) -> Tuple[int, int]:
    gh, gw = check_grid(grid)
    if gh * gw != n:
        raise ValueError(f"grid {(gh, gw)} has gh * gw = {gh * gw} patches but {what} has n = {n}")
    return gh, gw


def _coords(n: int, gw: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    p = torch.arange(n, device=device)
    return p % gw, torch.div(p, gw, rounding_mode="floor")


def adaptive_windows(U: torch.Tensor, alpha: float, grid) -> torch.Tensor:
    """Adaptive attention windows (AWD) of paper 000 §4.1 eq. 4 (docs/math.md §3): int64 ``(B, n, 4)``.

    Per image, ``U'`` is the set of the ``T = round(alpha n^2)`` largest entries of ``U``
    (``U`` ``(B, n, n)``, or ``(n, n)`` giving ``(n, 4)``); equal values are ranked by their
    flat index ``p * n + i`` (lower first), so the choice is deterministic. Patch ``p``'s
    window is the bounding box of ``B_p = {p} ∪ {i : (p, i) in U'}``:
    ``(min x, min y, max x, max y)`` over ``B_p``. A patch with no entry in ``U'`` gets the
    window of itself alone. Rounding of ``T``: :func:`round_half_up`.
    """
    U3, batched = _check_u(U)
    alpha = _check_fraction(alpha, "alpha", True, False)
    B, n, _ = U3.shape
    gh, gw = _check_grid_n(grid, n, "U")
    T = num_selected(alpha, n)
    dev = U3.device
    flat = U3.reshape(B, n * n)
    # stable descending sort: among equal values the lower flat index comes first
    top = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :T]
    sel = torch.zeros(B, n * n, dtype=torch.bool, device=dev).scatter_(1, top, True).view(B, n, n)
    x, y = _coords(n, gw, dev)
    xi, yi = x.view(1, 1, n), y.view(1, 1, n)
    windows = torch.stack([
        torch.where(sel, xi, gw).amin(-1).minimum(x),
        torch.where(sel, yi, gh).amin(-1).minimum(y),
        torch.where(sel, xi, -1).amax(-1).maximum(x),
        torch.where(sel, yi, -1).amax(-1).maximum(y),
    ], -1)
    return windows if batched else windows[0]


def indiscriminative_patches(U: torch.Tensor, beta: float) -> torch.Tensor:
    """Keep mask of DIP, paper 000 §4.2 (docs/math.md §4): bool ``(B, n)`` (``(n,)`` for ``(n, n)`` input).

    ``v_p = var_i U[i, p]`` is the population variance of column ``p``; the
    ``round(beta n)`` patches with the smallest ``v_p`` (ties: lower index first) are
    indiscriminative and get ``keep[p] = False``.
    """
    U3, batched = _check_u(U)
    beta = _check_fraction(beta, "beta", False, True)
    B, n, _ = U3.shape
    D = num_dropped(beta, n)
    v = _column_variance(U3)
    drop = torch.sort(v, dim=1, stable=True).indices[:, :D]
    keep = torch.ones(B, n, dtype=torch.bool, device=U3.device).scatter_(1, drop, False)
    return keep if batched else keep[0]


def dip_sweep(U: torch.Tensor, betas) -> torch.Tensor:
    """Keep masks of DIP for several ``beta`` at once: paper 000 Fig. 6 (docs/math.md §4).

    ``U``: ``(B, n, n)`` or ``(n, n)``; ``betas``: a sequence of fractions in ``[0, 1)``.
    Returns bool ``(len(betas), B, n)`` (``(len(betas), n)`` for ``(n, n)`` input) with
    ``out[k]`` equal to :func:`indiscriminative_patches` ``(U, betas[k])``: the column
    variances ``v_p`` are sorted once (stable, ties to the lower index) and ``beta_k`` drops
    the first ``round(beta_k n)`` of that order, so the dropped sets are nested: a larger
    ``beta`` drops a superset of what a smaller one drops.
    """
    U3, batched = _check_u(U)
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__iter__"):
        raise ValueError(f"betas must be a sequence of fractions in [0, 1), got {betas!r}")
    betas = [_check_fraction(b, "betas", False, True) for b in betas]
    if not betas:
        raise ValueError("betas must hold at least one fraction in [0, 1)")
    B, n, _ = U3.shape
    order = torch.sort(_column_variance(U3), dim=1, stable=True).indices  # (B, n), least informative first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=U3.device).expand(B, n))
    dropped = torch.tensor([num_dropped(b, n) for b in betas], device=U3.device)
    keep = rank.unsqueeze(0) >= dropped.view(-1, 1, 1)  # (K, B, n): patch p kept when its rank >= round(beta n)
    return keep if batched else keep[:, 0]


def column_variance(U: torch.Tensor) -> torch.Tensor:
    """``v_p = var_i U[i, p]`` (population), ``(B, n)``: the DIP score of paper 000 §4.2 (Fig. 5 b)."""
    U3, batched = _check_u(U)
    v = _column_variance(U3)
    return v if batched else v[0]


def _column_variance(U3: torch.Tensor) -> torch.Tensor:
    """Two-pass population variance of each column of ``(B, n, n)``: ``mean_i (U[i, p] - mean_i U[i, p])^2``.

    Written out (rather than ``torch.var``) so equal columns, and columns whose values make the
    arithmetic exact, get bit-equal variances: ties are then broken by index as documented.
    """
    return (U3 - U3.mean(1, keepdim=True)).square().mean(1)


def responsive_field(windows, keep, grid, *, return_raw: bool = False):
    """Responsive field size and tendency, paper 000 §4.3 eq. 6–7 (docs/math.md §5).

    ``S_p = {p} ∪ {i inside window_p : keep[i]}``.

    Args:
        windows: int ``(B, n, 4)`` or ``(n, 4)``.
        keep: bool ``(B, n)`` or ``(n,)``, ``False`` = dropped (:func:`indiscriminative_patches`),
            or ``None`` (nothing dropped).
        grid: ``(gh, gw)`` with ``gh * gw = n``.
        return_raw: also return the raw integer vectors ``R``.

    Returns:
        ``(size, tendency)``, or ``(size, tendency, R)`` with ``return_raw``: ``size`` int64
        ``(B, n)`` is ``|S_p|``; ``R`` int64 ``(B, n, 2)`` is
        ``((x_max - x_p) - (x_p - x_min), (y_max - y_p) - (y_p - y_min))`` over the extremes
        of ``S_p`` (``y`` grows downwards, row index); ``tendency`` float32 ``(B, n, 2)`` is
        ``R / |R|``, zero where ``R = 0``. Unbatched inputs give unbatched outputs.

    Cost ``O(B n (gh + gw))``: the extremes of kept patches inside each window are read off
    per-column and per-row prefix counts of the keep grid, never an ``n x n`` mask.
    """
    mask = WindowMask(windows, grid)  # validates shape, dtype, grid size and bounds
    gh, gw = mask.grid
    n = mask.num_patches
    batched = mask.windows.dim() == 3 or (keep is not None and getattr(keep, "dim", lambda: 1)() == 2)
    w = mask.windows.long()
    w = w if w.dim() == 3 else w.unsqueeze(0)
    dev = w.device
    if keep is None:
        keep = torch.ones(w.shape[0], n, dtype=torch.bool, device=dev)
    else:
        if not isinstance(keep, torch.Tensor):
            raise TypeError(f"keep must be a bool torch.Tensor or None, got {type(keep).__name__}")
        if keep.dtype != torch.bool:
            raise TypeError(f"keep must be a bool tensor, got dtype {keep.dtype}")
        if keep.dim() not in (1, 2) or keep.shape[-1] != n:
            raise ValueError(f"keep must have shape (B, {n}) or ({n},), got {tuple(keep.shape)}")
        keep = keep.to(dev)
        keep = keep if keep.dim() == 2 else keep.unsqueeze(0)
    if w.shape[0] != keep.shape[0]:
        if w.shape[0] == 1:
            w = w.expand(keep.shape[0], -1, -1)
        elif keep.shape[0] == 1:
            keep = keep.expand(w.shape[0], -1)
        else:
            raise ValueError(f"keep has batch {keep.shape[0]} but windows have batch {w.shape[0]}")
    B = w.shape[0]
    xl, yt, xr, yb = w.unbind(-1)  # (B, n)
    x, y = _coords(n, gw, dev)
    kk = keep.reshape(B, gh, gw).long()

    # size: kept patches inside the window, plus p itself when it is not already counted (eq. 6)
    counts = _window_counts(w, (gh, gw), keep)
    self_counted = (xl <= x) & (x <= xr) & (yt <= y) & (y <= yb) & keep
    size = counts + (~self_counted).long()

    # columns c holding a kept patch in rows yt..yb: per-column prefix counts over rows
    col_cs = torch.zeros(B, gh + 1, gw, dtype=torch.long, device=dev)
    col_cs[:, 1:] = kk.cumsum(1)
    col_hits = col_cs.gather(1, (yb + 1)[..., None].expand(B, n, gw)) - col_cs.gather(1, yt[..., None].expand(B, n, gw))
    c = torch.arange(gw, device=dev)
    col_occ = (col_hits > 0) & (c >= xl[..., None]) & (c <= xr[..., None])  # (B, n, gw)
    # rows r holding a kept patch in columns xl..xr: per-row prefix counts over columns
    row_cs = torch.zeros(B, gw + 1, gh, dtype=torch.long, device=dev)
    row_cs[:, 1:] = kk.cumsum(2).transpose(1, 2)
    row_hits = row_cs.gather(1, (xr + 1)[..., None].expand(B, n, gh)) - row_cs.gather(1, xl[..., None].expand(B, n, gh))
    r = torch.arange(gh, device=dev)
    row_occ = (row_hits > 0) & (r >= yt[..., None]) & (r <= yb[..., None])  # (B, n, gh)

    x_min = torch.where(col_occ, c, gw).amin(-1).minimum(x)
    x_max = torch.where(col_occ, c, -1).amax(-1).maximum(x)
    y_min = torch.where(row_occ, r, gh).amin(-1).minimum(y)
    y_max = torch.where(row_occ, r, -1).amax(-1).maximum(y)
    R = torch.stack([(x_max - x) - (x - x_min), (y_max - y) - (y - y_min)], -1)  # eq. 7
    norm = R.double().norm(dim=-1, keepdim=True)
    tendency = torch.where(norm > 0, R.double() / norm.clamp(min=1e-300), torch.zeros((), dtype=torch.float64,
                                                                                    device=dev)).float()
    if not batched:
        size, tendency, R = size[0], tendency[0], R[0]
    return (size, tendency, R) if return_raw else (size, tendency)
