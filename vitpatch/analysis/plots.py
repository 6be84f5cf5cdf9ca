"""The figures of paper 000 from in-memory data (``vitpatch analyze`` and the demo use these).

Every function takes plain arrays or tensors (one image, not a batch) and returns a
``matplotlib.figure.Figure`` built without pyplot (no global state, no GUI backend: PNGs are
rendered by Agg); :func:`save_figure` writes and closes it.

- :func:`plot_uncertainty_rows`  Fig. 3 (b): rows ``U[p, :]`` over the image for a few patches.
- :func:`plot_uncertainty_matrix` Fig. 5: the ``n x n`` U, column variances, dropped patches.
- :func:`plot_windows`           Fig. 4 (c): adaptive windows of a few patches, window areas.
- :func:`plot_field_size`        Fig. 12: responsive-field size ``|S_p|`` (eq. 6) per patch.
- :func:`plot_field_tendency`    Fig. 11: tendency ``R_p / |R_p|`` (eq. 7) as arrows and flow colours.
- :func:`plot_cluster_heatmaps`  PaCa (paper 004 Fig. 1): each cluster's assignment over the image.

The image is ``(H, W, 3)`` floats in ``[0, 1]`` (or ``(3, H, W)``, or uint8), already resized
to the model's input so that the patch grid ``(gh, gw)`` tiles it; :func:`display_image`
undoes the normalisation of a model input.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

__all__ = ["display_image", "default_patches", "plot_uncertainty_rows", "plot_uncertainty_matrix",
           "plot_windows", "plot_field_size", "plot_field_tendency", "plot_cluster_heatmaps", "save_figure"]


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
    from ..masks import check_grid

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


def plot_uncertainty_rows(image, U, grid, patches: Optional[Sequence[int]] = None):
    """Fig. 3 (b): for each patch ``p`` (red box), the row ``U[p, :]`` (eq. 3) over the image.

    Top row: the row on the image (log colour scale); bottom row: the same values on the bare grid.
    ``U``: ``(n, n)``; ``patches``: indices, default :func:`default_patches`.
    """
    img = _image(image)
    u = _np(U)
    if u.ndim != 2 or u.shape[0] != u.shape[1]:
        raise ValueError(f"U must have shape (n, n) for one image, got {u.shape}")
    gh, gw = _grid(grid, u.shape[0])
    patches = _check_patches(default_patches((gh, gw)) if patches is None else patches, u.shape[0])
    cw, ch, _, _ = _cell(img, (gh, gw))
    fig, axes = _figure(2, len(patches))
    for j, p in enumerate(patches):
        row = u[p].reshape(gh, gw)
        _overlay(axes[0, j], img, row, f"U[{p}, :] (x={p % gw}, y={p // gw})", log=True)
        _box(axes[0, j], p % gw, p // gw, p % gw, p // gw, cw, ch, fill=False, edgecolor="red", linewidth=2)
        im = axes[1, j].imshow(row, cmap="viridis", interpolation="nearest")
        axes[1, j].plot([p % gw], [p // gw], marker="s", color="red", markersize=4)
        axes[1, j].set_title("row on the patch grid", fontsize=9)
        fig.colorbar(im, ax=axes[1, j], fraction=0.046, pad=0.02)
    fig.suptitle("Patch-interaction uncertainty U (paper 000 eq. 2-3), rows of selected patches")
    return fig


def plot_uncertainty_matrix(U, keep, image=None, grid=None, variance=None):
    """Fig. 5: (a) the ``n x n`` U with dropped patches' columns marked, (b) sorted column
    variances ``v_p`` (§4.2) with the dropped ones in black, (c) the image with the dropped
    patches blacked out (when ``image`` and ``grid`` are given)."""
    u = _np(U)
    if u.ndim != 2 or u.shape[0] != u.shape[1]:
        raise ValueError(f"U must have shape (n, n) for one image, got {u.shape}")
    n = u.shape[0]
    k = _np(keep).astype(bool)
    if k.shape != (n,):
        raise ValueError(f"keep must have shape ({n},), got {k.shape}")
    v = u.var(axis=0) if variance is None else _np(variance)
    panels = 3 if image is not None else 2
    fig, axes = _figure(1, panels, width=4.0, height=3.8)
    from matplotlib.colors import LogNorm

    pos = u[u > 0]
    norm = LogNorm(vmin=max(pos.min(), pos.max() * 1e-6), vmax=pos.max()) if pos.size else None
    im = axes[0, 0].imshow(np.where(u > 0, u, norm.vmin) if norm else u, cmap="magma", norm=norm,
                           interpolation="nearest")
    dropped = np.flatnonzero(~k)
    from matplotlib.patches import Rectangle

    for c in dropped:  # a dropped patch's column: it feeds every row about equally (the paper's red box)
        axes[0, 0].add_patch(Rectangle((c - 0.5, -0.5), 1.0, n, fill=False, edgecolor="cyan", linewidth=0.8))
    axes[0, 0].set_title("(a) U (rows: patch p, columns: i); dropped columns boxed", fontsize=9)
    axes[0, 0].set_xlabel("column i")
    axes[0, 0].set_ylabel("row p")
    fig.colorbar(im, ax=axes[0, 0], fraction=0.046, pad=0.02)
    order = np.argsort(v, kind="stable")
    colors = np.where(k[order], "tab:blue", "black")
    axes[0, 1].bar(np.arange(n), v[order], color=colors, width=1.0)
    axes[0, 1].set_yscale("log" if np.all(v > 0) else "linear")
    axes[0, 1].set_title(f"(b) column variance, sorted; {dropped.size} dropped (black)", fontsize=9)
    axes[0, 1].set_xlabel("patches, by variance")
    if image is not None:
        if grid is None:
            raise ValueError("grid is required with image")
        img = _image(image)
        gh, gw = _grid(grid, n)
        cw, ch, H, W = _cell(img, (gh, gw))
        axes[0, 2].imshow(img, extent=(0, W, H, 0))
        for p in dropped:
            _box(axes[0, 2], p % gw, p // gw, p % gw, p // gw, cw, ch, color="black")
        axes[0, 2].set_title("(c) indiscriminative patches (black)", fontsize=9)
        axes[0, 2].set_xticks([])
        axes[0, 2].set_yticks([])
    fig.suptitle("Indiscriminative patches (paper 000 §4.2)")
    return fig


def plot_windows(image, windows, grid, patches: Optional[Sequence[int]] = None, keep=None):
    """Fig. 4 (c): the adaptive window (yellow) of each selected patch (green), plus a panel of
    every patch's window area (eq. 5 per patch); dropped patches (``keep`` False) hatched."""
    img = _image(image)
    w = _np(windows).astype(np.int64)
    if w.ndim != 2 or w.shape[1] != 4:
        raise ValueError(f"windows must have shape (n, 4) for one image, got {w.shape}")
    n = w.shape[0]
    gh, gw = _grid(grid, n)
    patches = _check_patches(default_patches((gh, gw)) if patches is None else patches, n)
    cw, ch, H, W = _cell(img, (gh, gw))
    k = None if keep is None else _np(keep).astype(bool)
    fig, axes = _figure(1, len(patches) + 1)
    for j, p in enumerate(patches):
        ax = axes[0, j]
        ax.imshow(img, extent=(0, W, H, 0))
        xl, yt, xr, yb = w[p]
        _box(ax, xl, yt, xr, yb, cw, ch, facecolor="yellow", alpha=0.35, edgecolor="yellow", linewidth=2)
        if k is not None:
            for q in np.flatnonzero(~k):
                _box(ax, q % gw, q // gw, q % gw, q // gw, cw, ch, fill=False, hatch="///", edgecolor="black",
                     linewidth=0)
        _box(ax, p % gw, p // gw, p % gw, p // gw, cw, ch, facecolor="lime", alpha=0.8, edgecolor="green")
        area = (xr - xl + 1) * (yb - yt + 1)
        ax.set_title(f"patch {p}: window {area} of {n} patches", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    areas = ((w[:, 2] - w[:, 0] + 1) * (w[:, 3] - w[:, 1] + 1)).reshape(gh, gw)
    _overlay(axes[0, -1], img, areas.astype(np.float64), f"window area per patch (mean {areas.mean():.1f})",
             cmap="viridis", alpha=0.7)
    fig.suptitle("Adaptive attention windows (paper 000 eq. 4)")
    return fig


def plot_field_size(image, size, grid):
    """Fig. 12: responsive-field size ``|S_p|`` (eq. 6) of every patch, over the image."""
    img = _image(image)
    s = _np(size).astype(np.float64)
    if s.ndim != 1:
        raise ValueError(f"size must have shape (n,) for one image, got {s.shape}")
    gh, gw = _grid(grid, s.shape[0])
    fig, axes = _figure(1, 2, width=4.0, height=3.6)
    axes[0, 0].imshow(img)
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, 0].set_xticks([])
    axes[0, 0].set_yticks([])
    _overlay(axes[0, 1], img, s.reshape(gh, gw), f"|S_p| (mean {s.mean():.1f}, max {int(s.max())})",
             cmap="jet", alpha=0.6)
    fig.suptitle("Responsive field size (paper 000 eq. 6)")
    return fig


def _flow_colours(t: np.ndarray) -> np.ndarray:
    """Optical-flow colouring of unit vectors ``(.., 2)``: hue = direction, black where zero."""
    from matplotlib.colors import hsv_to_rgb

    ang = np.arctan2(-t[..., 1], t[..., 0])  # y grows downwards on the grid: flip for the usual angle
    mag = np.clip(np.hypot(t[..., 0], t[..., 1]), 0, 1)
    hsv = np.stack([(ang / (2 * np.pi)) % 1.0, np.ones_like(ang), mag], -1)
    return hsv_to_rgb(hsv)


def plot_field_tendency(image, tendency, grid, keep=None):
    """Fig. 11: tendency ``R_p / |R_p|`` (eq. 7) as arrows at the patch centres over the image,
    and as an optical-flow colour map (hue = direction, black = no tendency, wheel inset)."""
    img = _image(image)
    t = _np(tendency).astype(np.float64)
    if t.ndim != 2 or t.shape[1] != 2:
        raise ValueError(f"tendency must have shape (n, 2) for one image, got {t.shape}")
    n = t.shape[0]
    gh, gw = _grid(grid, n)
    cw, ch, H, W = _cell(img, (gh, gw))
    fig, axes = _figure(1, 2, width=4.2, height=4.0)
    ax = axes[0, 0]
    ax.imshow(img, extent=(0, W, H, 0))
    p = np.arange(n)
    cx, cy = (p % gw + 0.5) * cw, (p // gw + 0.5) * ch
    moving = np.hypot(t[:, 0], t[:, 1]) > 0
    if keep is not None:
        moving &= _np(keep).astype(bool)
    ax.quiver(cx[moving], cy[moving], t[moving, 0] * 0.8 * cw, t[moving, 1] * 0.8 * ch, angles="xy",
              scale_units="xy", scale=1.0, color="red", width=0.006)
    ax.plot(cx[~moving], cy[~moving], linestyle="none", marker=".", color="white", markersize=2)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_title("tendency arrows (dots: R_p = 0 or dropped)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    axes[0, 1].imshow(_flow_colours(t.reshape(gh, gw, 2)), interpolation="nearest")
    axes[0, 1].set_title("tendency as optical-flow colours", fontsize=9)
    axes[0, 1].set_xticks([])
    axes[0, 1].set_yticks([])
    inset = axes[0, 1].inset_axes([0.78, 0.78, 0.2, 0.2])
    yy, xx = np.mgrid[-1:1:64j, -1:1:64j]
    r = np.hypot(xx, yy)
    wheel = _flow_colours(np.stack([xx, yy], -1) / np.maximum(r, 1e-9)[..., None])
    wheel[r > 1] = 1.0
    inset.imshow(wheel)
    inset.set_axis_off()
    fig.suptitle("Responsive field tendency (paper 000 eq. 7)")
    return fig


def plot_cluster_heatmaps(image, assignment, grid, clusters: Optional[Sequence[int]] = None):
    """PaCa cluster assignments (paper 004 eq. 7) as heatmaps: column ``m`` of ``A (n, M)`` over the image.

    ``assignment`` is the softmax over the ``n`` tokens of one image (each column sums to 1);
    ``clusters`` picks which to show (default: the 8 with the most peaked assignment).
    """
    A = _np(assignment)
    if A.ndim != 2:
        raise ValueError(f"assignment must have shape (n, M), got {A.shape}")
    n, M = A.shape
    gh, gw = _grid(grid, n)
    img = _image(image)
    if clusters is None:
        clusters = list(np.argsort(-A.max(0))[: min(8, M)])
    clusters = _check_patches(clusters, M)
    ncols = min(4, len(clusters))
    nrows = -(-len(clusters) // ncols)
    fig, axes = _figure(nrows, ncols, 2.6, 2.6)
    for ax in axes.ravel()[len(clusters):]:
        ax.axis("off")
    for ax, m in zip(axes.ravel(), clusters):
        _overlay(ax, img, A[:, m].reshape(gh, gw), f"cluster {m} (max {A[:, m].max():.2f})", cmap="magma",
                 colorbar=False)
    fig.suptitle("PaCa cluster assignments: softmax over tokens per cluster", fontsize=10)
    return fig


def save_figure(fig, path, dpi: int = 110) -> str:
    """Write ``fig`` as a PNG (Agg) to ``path`` and release it; returns the path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    fig.clear()
    return path
