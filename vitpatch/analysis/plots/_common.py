"""Helpers shared by the papers' figure modules: image conversion, grids, figures, overlays, saving."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

__all__ = ["display_image", "default_patches", "save_figure"]


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu()
        if a.dtype.is_floating_point:
            a = a.double()
        a = a.numpy()
    return np.asarray(a)


def display_image(image, mean=None, std=None) -> np.ndarray:
    """An ``(H, W, 3)`` float image in ``[0, 1]`` from a ``(3, H, W)`` model input.

    ``mean``/``std`` (per channel) undo the input normalisation; uint8 images are scaled by 1/255.
    """
    raw = _np(image)
    if raw.ndim != 3:
        raise ValueError(f"image must have shape (3, H, W) or (H, W, 3), got {raw.shape}")
    img = raw.astype(np.float64) / (255.0 if raw.dtype == np.uint8 else 1.0)
    if img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.transpose(img, (1, 2, 0))
    if std is not None:
        img = img * np.asarray(std, dtype=np.float64).reshape(1, 1, -1)
    if mean is not None:
        img = img + np.asarray(mean, dtype=np.float64).reshape(1, 1, -1)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, -1)
    return np.clip(img, 0.0, 1.0)


def _image(image) -> np.ndarray:
    img = _np(image)
    if img.ndim != 3 or 3 not in (img.shape[0], img.shape[-1]):
        raise ValueError(f"image must have shape (H, W, 3) or (3, H, W), got {img.shape}")
    return display_image(image)


def _grid(grid, n: Optional[int] = None):
    from ...masks import check_grid

    gh, gw = check_grid(grid)
    if n is not None and gh * gw != n:
        raise ValueError(f"grid {(gh, gw)} has gh * gw = {gh * gw} patches but the data has n = {n}")
    return gh, gw


def default_patches(grid, k: int = 4) -> list:
    """``k`` (at most 4) well-spread patch indices: centre, then three off-centre points."""
    gh, gw = _grid(grid)
    spots = [(0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.4)]
    out = []
    for fy, fx in spots[:max(1, min(k, 4))]:
        p = min(int(fy * gh), gh - 1) * gw + min(int(fx * gw), gw - 1)
        if p not in out:
            out.append(p)
    return out


def _check_patches(patches, n: int) -> list:
    patches = [int(p) for p in patches]
    if not patches:
        raise ValueError("patches must name at least one patch")
    bad = [p for p in patches if not 0 <= p < n]
    if bad:
        raise ValueError(f"patches must be in [0, {n}), got {bad}")
    return patches


def _figure(nrows: int, ncols: int, width: float = 3.2, height: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))
    return fig, axes


def _cell(img: np.ndarray, grid):
    H, W = img.shape[:2]
    return W / grid[1], H / grid[0], H, W


def _box(ax, x0, y0, x1, y1, cw, ch, **kw):
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x0 * cw, y0 * ch), (x1 - x0 + 1) * cw, (y1 - y0 + 1) * ch, **kw))


def _overlay(ax, img, heat, title, cmap="jet", alpha=0.55, log=False, colorbar=True):
    from matplotlib.colors import LogNorm

    H, W = img.shape[:2]
    ax.imshow(img, extent=(0, W, H, 0))
    norm = None
    if log:
        pos = heat[heat > 0]
        if pos.size:
            norm = LogNorm(vmin=max(pos.min(), pos.max() * 1e-6), vmax=pos.max())
            heat = np.where(heat > 0, heat, norm.vmin)
    im = ax.imshow(heat, extent=(0, W, H, 0), cmap=cmap, alpha=alpha, interpolation="nearest", norm=norm)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    return im


def save_figure(fig, path, dpi: int = 110) -> str:
    """Write ``fig`` as a PNG (Agg) to ``path`` and release it; returns the path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    fig.clear()
    return path
