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

Paper 002 (docs/math.md §8): :func:`plot_keypoints` (Fig. 3), :func:`plot_attended_row` (Fig. 4),
:func:`plot_layer_points` (Fig. 5/6), :func:`plot_stage_summary` (Fig. 7a), :func:`plot_mask_prompt`
(Fig. 8). Paper 003 (docs/math.md §9, Fig. 1, 5, 6): :func:`plot_head_importance`,
:func:`plot_mode_bars`, :func:`plot_top_heads`, :func:`plot_khop_strength`,
:func:`plot_entropy_layers`, :func:`plot_tsne`, :func:`plot_context_masks`, :func:`plot_attention_heatmap`.

The image is ``(H, W, 3)`` floats in ``[0, 1]`` (or ``(3, H, W)``, or uint8), already resized
to the model's input so that the patch grid ``(gh, gw)`` tiles it; :func:`display_image`
undoes the normalisation of a model input.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

__all__ = ["display_image", "default_patches", "plot_uncertainty_rows", "plot_uncertainty_matrix",
           "plot_windows", "plot_field_size", "plot_field_tendency", "plot_cluster_heatmaps", "save_figure",
           # paper 002
           "plot_keypoints", "plot_attended_row", "plot_layer_points", "plot_stage_summary", "plot_mask_prompt",
           # paper 003
           "plot_head_importance", "plot_mode_bars", "plot_top_heads", "plot_khop_strength", "plot_entropy_layers",
           "plot_tsne", "plot_context_masks", "plot_attention_heatmap"]


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


# =========================================================================== paper 002 (docs/math.md §8)
def plot_keypoints(image, keypoints, grid, counts=None):
    """Paper 002 Fig. 3: SIFT keypoints (dots) over the image with the patch grid; keypoint patches shaded.

    ``keypoints``: ``(k, 2)`` ``(x, y)`` pixels (:func:`vitpatch.analysis.sift_keypoints`);
    ``counts``: optional ``(n,)`` keypoints per patch, written into the patches.
    """
    img = _image(image)
    gh, gw = _grid(grid)
    kp = _np(keypoints).reshape(-1, 2)
    cw, ch, H, W = _cell(img, grid)
    fig, axes = _figure(1, 1, 4.6, 4.6)
    ax = axes[0, 0]
    ax.imshow(img, extent=(0, W, H, 0))
    if counts is not None:
        c = _np(counts).reshape(-1)
        if c.size != gh * gw:
            raise ValueError(f"counts must have n = gh * gw = {gh * gw} entries, got {c.size}")
        for p in np.nonzero(c)[0]:
            y, x = divmod(int(p), gw)
            _box(ax, x, y, x, y, cw, ch, facecolor="yellow", alpha=0.25, edgecolor="none")
            ax.text((x + 0.5) * cw, (y + 0.5) * ch, str(int(c[p])), ha="center", va="center", fontsize=6)
    for i in range(1, gw):
        ax.axvline(i * cw, color="white", lw=0.4, alpha=0.7)
    for i in range(1, gh):
        ax.axhline(i * ch, color="white", lw=0.4, alpha=0.7)
    if len(kp):
        ax.scatter(kp[:, 0], kp[:, 1], s=10, c="red", marker="o", linewidths=0)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    nkey = "" if counts is None else f", {int((_np(counts) > 0).sum())} keypoint patches"
    ax.set_title(f"SIFT keypoints: {len(kp)}{nkey} (paper 002 Fig. 3)", fontsize=9)
    return fig


def plot_attended_row(image, attn_row, grid, gamma: float = 1.0, query: Optional[int] = None):
    """Paper 002 Fig. 4: one query's row ``Ap[i, :]`` as a heatmap over the image, and its values with
    the detection line ``gamma * mean_j Ap_ij`` (eq. 2); patches above the line form ``S_i``."""
    row = _np(attn_row).reshape(-1).astype(np.float64)
    gh, gw = _grid(grid, row.size)
    img = _image(image)
    thr = gamma * row.sum() / row.size
    fig, axes = _figure(1, 2, 3.8, 3.4)
    _overlay(axes[0, 0], img, row.reshape(gh, gw), "attention row" + ("" if query is None else f" of patch {query}"))
    cw, ch, _, _ = _cell(img, grid)
    for p in np.nonzero(row >= thr)[0]:
        y, x = divmod(int(p), gw)
        _box(axes[0, 0], x, y, x, y, cw, ch, fill=False, edgecolor="white", lw=0.6)
    if query is not None:
        y, x = divmod(int(query), gw)
        _box(axes[0, 0], x, y, x, y, cw, ch, fill=False, edgecolor="red", lw=1.5)
    ax = axes[0, 1]
    ax.bar(np.arange(row.size), row, width=1.0, color=np.where(row >= thr, "#c44e52", "#8c8c8c"))
    ax.axhline(thr, color="k", ls="--", lw=1, label=f"gamma * mean = {thr:.3g}")
    ax.set_xlabel("key patch j")
    ax.set_ylabel("A_ij")
    ax.legend(fontsize=7)
    ax.set_title(f"|S_i| = {int((row >= thr).sum())} of {row.size}", fontsize=9)
    fig.suptitle("Attended set (paper 002 eq. 2, Fig. 4)", fontsize=10)
    return fig


def plot_layer_points(series, ylabel: str = "", title: str = ""):
    """Paper 002 Fig. 5 / 6: per layer, every head as a point, the mean over heads as a line and a
    linear trend (dashed). ``series``: ``{name: (L, h)}`` values (e.g. ``{"KK": ..., "NK": ...}``)."""
    if not isinstance(series, dict) or not series:
        raise ValueError("series must be a non-empty dict {name: (L, h) values}")
    fig, axes = _figure(1, 1, 6.0, 3.6)
    ax = axes[0, 0]
    colours = ["#4c72b0", "#c44e52", "#55a868", "#8172b2", "#ccb974"]
    for c, (name, vals) in zip(colours * 4, series.items()):
        v = _np(vals).astype(np.float64)
        if v.ndim != 2:
            raise ValueError(f"series[{name!r}] must have shape (L, h), got {v.shape}")
        L, h = v.shape
        xs = np.repeat(np.arange(L), h) + np.tile(np.linspace(-0.12, 0.12, h), L)
        ax.scatter(xs, v.reshape(-1), s=9, color=c, alpha=0.45)
        mean = np.nanmean(v, 1)
        ax.plot(np.arange(L), mean, color=c, lw=1.8, label=f"{name} (mean over heads)")
        ok = np.isfinite(mean)
        if ok.sum() >= 2:
            a, b = np.polyfit(np.arange(L)[ok], mean[ok], 1)
            ax.plot(np.arange(L), a * np.arange(L) + b, color=c, ls="--", lw=1, label=f"{name} trend ({a:+.3f}/layer)")
    ax.set_xlabel("layer")
    ax.set_xticks(np.arange(L))
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return fig


def plot_stage_summary(KK, KN, NK, NN, AFI, stages: Sequence[int] = ()):
    """Paper 002 Fig. 7a: per-layer KK, KN, NK, NN (left axis) and AFI (right axis); ``stages`` are the
    user's stage boundaries (first layer of each new stage, the paper gives none), shaded alternately."""
    vals = {k: _np(v).astype(np.float64).reshape(-1) for k, v in (("KK", KK), ("KN", KN), ("NK", NK), ("NN", NN))}
    afi = _np(AFI).astype(np.float64).reshape(-1)
    L = afi.size
    if any(v.size != L for v in vals.values()):
        raise ValueError("KK, KN, NK, NN and AFI must each have one value per layer")
    bounds = sorted(int(s) for s in stages)
    if any(not 0 < s < L for s in bounds):
        raise ValueError(f"stages must be layer indices in (0, {L}), got {list(stages)}")
    fig, axes = _figure(1, 1, 6.4, 3.6)
    ax = axes[0, 0]
    edges = [0] + bounds + [L]
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        ax.axvspan(a - 0.5, b - 0.5, color="#dddddd" if i % 2 else "#f4f4f4", zorder=0)
        ax.text((a + b - 1) / 2, 1.02, f"stage {i + 1}", ha="center", va="bottom", fontsize=7,
                transform=ax.get_xaxis_transform())
    styles = {"KK": ("#4c72b0", "-"), "KN": ("#4c72b0", ":"), "NK": ("#c44e52", "-"), "NN": ("#c44e52", ":")}
    for k, v in vals.items():
        ax.plot(np.arange(L), v, color=styles[k][0], ls=styles[k][1], marker="o", ms=3, label=k)
    ax.set_xlabel("layer")
    ax.set_ylabel("interrelation (eq. 4)")
    ax2 = ax.twinx()
    ax2.plot(np.arange(L), afi, color="k", marker="s", ms=3, lw=1.2, label="AFI")
    ax2.set_ylabel("attention focus index (eq. 5)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    ax.set_xlim(-0.5, L - 0.5)
    ax.set_xticks(np.arange(L))
    return fig


def plot_mask_prompt(result):
    """Paper 002 Fig. 8: top-1 accuracy vs masking ratio, Top and Bottom masking, one panel per mode
    (``result`` from :func:`vitpatch.analysis.mask_prompt_accuracy`)."""
    if not isinstance(result, dict) or not result:
        raise ValueError("result must be the dict returned by mask_prompt_accuracy")
    fig, axes = _figure(1, len(result), 3.6, 3.2)
    for ax, (mode, r) in zip(axes[0], result.items()):
        x = 100 * np.asarray(r["ratios"], dtype=np.float64)
        ax.plot(x, 100 * np.asarray(r["top"]), "o-", color="#c44e52", label="Top (highest theta masked)")
        ax.plot(x, 100 * np.asarray(r["bottom"]), "s-", color="#4c72b0", label="Bottom (lowest theta masked)")
        ax.axhline(100 * r["unmasked"], color="k", ls=":", lw=1, label="unmasked")
        ax.set_xlabel("masking ratio (%)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"mask as prompt, mode={mode}", fontsize=9)
        ax.legend(fontsize=7)
    return fig


# =========================================================================== paper 003 (docs/math.md §9)
def plot_head_importance(values, name: str = "I_prob"):
    """Paper 003 Fig. 1: importance of every head in layer order (points), the mean ± std per layer
    (line and band) and layer separators. ``values``: ``(L, h)`` (already averaged over images)."""
    v = _np(values).astype(np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must have shape (L, h), got {v.shape}")
    L, h = v.shape
    fig, axes = _figure(1, 1, 7.0, 3.2)
    ax = axes[0, 0]
    x = np.arange(L * h)
    ax.bar(x, v.reshape(-1), width=0.8, color="#4c72b0")
    centres = np.arange(L) * h + (h - 1) / 2
    m, s = np.nanmean(v, 1), np.nanstd(v, 1)
    ax.plot(centres, m, "o-", color="#c44e52", lw=1.5, ms=3, label="layer mean")
    ax.fill_between(centres, m - s, m + s, color="#c44e52", alpha=0.2, label="± std")
    for l in range(1, L):
        ax.axvline(l * h - 0.5, color="k", lw=0.5, alpha=0.5)
    ax.set_xticks(centres)
    ax.set_xticklabels([str(l) for l in range(L)], fontsize=7)
    ax.set_xlabel("layer (heads in order within each)")
    ax.set_ylabel(name)
    ax.legend(fontsize=7)
    ax.set_title(f"head importance {name} over all {L * h} heads (paper 003 Fig. 1)", fontsize=9)
    return fig


def plot_mode_bars(values, modes: Sequence[int], name: str = "I_prob"):
    """Paper 003 Fig. 1: mean importance per layer for each pruning mode (grouped bars).
    ``values``: ``(L, h, M)``; ``modes``: the ``M`` mode numbers."""
    from .heads import PRUNE_MODES

    v = _np(values).astype(np.float64)
    if v.ndim != 3 or v.shape[-1] != len(modes):
        raise ValueError(f"values must have shape (L, h, len(modes) = {len(modes)}), got {v.shape}")
    L, _, M = v.shape
    fig, axes = _figure(1, 1, 7.0, 3.2)
    ax = axes[0, 0]
    w = 0.8 / M
    for i, m in enumerate(modes):
        ax.bar(np.arange(L) + (i - (M - 1) / 2) * w, np.nanmean(v[..., i], 1), width=w,
               label=f"mode {m}: {PRUNE_MODES.get(int(m), '?')}")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean {name} over heads")
    ax.legend(fontsize=6)
    ax.set_title("importance per pruning region (paper 003 §5.2)", fontsize=9)
    return fig


def plot_top_heads(values, k: int = 5, name: str = "I_prob"):
    """Paper 003 Fig. 1: the ``k`` most important heads as bars labelled ``L<l>H<h>``. ``values``: ``(L, h)``."""
    v = _np(values).astype(np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must have shape (L, h), got {v.shape}")
    flat = np.nan_to_num(v.reshape(-1), nan=-np.inf)
    top = np.argsort(-flat, kind="stable")[: max(1, min(int(k), flat.size))]
    fig, axes = _figure(1, 1, 3.8, 3.0)
    ax = axes[0, 0]
    ax.bar([f"L{p // v.shape[1]}H{p % v.shape[1]}" for p in top], flat[top], color="#55a868")
    ax.set_ylabel(name)
    ax.set_title(f"top-{len(top)} heads by {name}", fontsize=9)
    return fig


def plot_khop_strength(strength, layer: Optional[int] = None):
    """Paper 003 Fig. 5: k-hop attention strength ``s_k`` (eq. 8) as bars per ring ``k``, one group per
    head. ``strength``: ``(h, K)`` of one layer."""
    s = _np(strength).astype(np.float64)
    if s.ndim != 2:
        raise ValueError(f"strength must have shape (h, K), got {s.shape}")
    h, K = s.shape
    fig, axes = _figure(1, 1, 6.0, 3.0)
    ax = axes[0, 0]
    w = 0.8 / h
    for j in range(h):
        ax.bar(np.arange(K) + (j - (h - 1) / 2) * w, s[j], width=w, label=f"head {j}")
    ax.set_xlabel("hop k (Chebyshev ring)")
    ax.set_ylabel("s_k")
    ax.set_xticks(np.arange(K))
    if h <= 12:
        ax.legend(fontsize=6, ncol=2)
    ax.set_title("k-hop attention strength" + ("" if layer is None else f", layer {layer}"), fontsize=9)
    return fig


def plot_entropy_layers(entropy):
    """Paper 003 Fig. 5: strength entropy of every head against its layer (scatter) with the layer mean.
    ``entropy``: ``(L, h)``."""
    e = _np(entropy).astype(np.float64)
    if e.ndim != 2:
        raise ValueError(f"entropy must have shape (L, h), got {e.shape}")
    L, h = e.shape
    fig, axes = _figure(1, 1, 4.6, 3.2)
    ax = axes[0, 0]
    ax.scatter(np.repeat(np.arange(L), h), e.reshape(-1), s=12, alpha=0.6, color="#8172b2")
    ax.plot(np.arange(L), np.nanmean(e, 1), color="k", lw=1.2, label="mean")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("strength entropy (normalised)")
    ax.legend(fontsize=7)
    ax.set_title("k-hop strength entropy per head", fontsize=9)
    return fig


def plot_tsne(embedding, labels=None, title: str = "t-SNE", label_name: str = "class"):
    """Paper 003 Fig. 1A / 6B / 6C: a 2-D t-SNE scatter coloured by ``labels`` (class, layer, ...)."""
    e = _np(embedding).astype(np.float64)
    if e.ndim != 2 or e.shape[1] != 2:
        raise ValueError(f"embedding must have shape (M, 2), got {e.shape}")
    fig, axes = _figure(1, 1, 4.2, 3.6)
    ax = axes[0, 0]
    if labels is None:
        ax.scatter(e[:, 0], e[:, 1], s=12)
    else:
        lab = _np(labels).reshape(-1)
        if lab.size != len(e):
            raise ValueError(f"labels must have one entry per point ({len(e)}), got {lab.size}")
        sc = ax.scatter(e[:, 0], e[:, 1], c=lab, s=12, cmap="tab10" if len(np.unique(lab)) <= 10 else "viridis")
        fig.colorbar(sc, ax=ax, label=label_name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    return fig


def plot_context_masks(image, masks, title: str = ""):
    """Paper 003 Fig. 6D/E: image-context masks of one head over the image.
    ``masks``: ``{name: (gh, gw)}`` (one head of :func:`vitpatch.analysis.context_masks`)."""
    if not isinstance(masks, dict) or not masks:
        raise ValueError("masks must be a non-empty dict {name: (gh, gw) map}")
    img = _image(image)
    fig, axes = _figure(1, len(masks), 2.8, 2.8)
    for ax, (name, m) in zip(axes[0], masks.items()):
        m = _np(m).astype(np.float64)
        if m.ndim != 2:
            raise ValueError(f"masks[{name!r}] must have shape (gh, gw), got {m.shape}")
        _overlay(ax, img, m, name.replace("_", " "), colorbar=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_attention_heatmap(attn, num_prefix_tokens: int = 1, title: str = ""):
    """Paper 003 Fig. 6A: one head's ``(N, N)`` map with the CLS row and column set apart: the patch
    block and the CLS strips each get their own colour scale, separated by white gaps."""
    A = _np(attn).astype(np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"attn must have shape (N, N), got {A.shape}")
    P = int(num_prefix_tokens)
    if not 1 <= P < A.shape[0]:
        raise ValueError(f"num_prefix_tokens must be in [1, N) for the CLS row and column, got {num_prefix_tokens}")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4, 5.0), layout="constrained")
    gs = fig.add_gridspec(2, 3, width_ratios=[1, 12, 0.5], height_ratios=[1, 12])
    ax_row, ax_col, ax_main = fig.add_subplot(gs[0, 1]), fig.add_subplot(gs[1, 0]), fig.add_subplot(gs[1, 1])
    im = ax_main.imshow(A[P:, P:], cmap="viridis", aspect="auto", interpolation="nearest")
    ax_row.imshow(A[:1, P:], cmap="magma", aspect="auto", interpolation="nearest")
    ax_col.imshow(A[P:, :1], cmap="magma", aspect="auto", interpolation="nearest")
    ax_row.set_title("CLS -> patches (row 0)", fontsize=8)
    ax_col.set_ylabel("patches -> CLS (column 0)", fontsize=8)
    for a in (ax_row, ax_col):
        a.set_xticks([])
        a.set_yticks([])
    ax_main.set_xlabel("key patch")
    ax_main.set_yticks([])
    fig.colorbar(im, cax=fig.add_subplot(gs[1, 2]))
    fig.suptitle(title or f"attention map; CLS->CLS = {A[0, 0]:.3g}", fontsize=9)
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
