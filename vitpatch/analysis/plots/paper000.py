"""Paper 000's figures: inner / outer pairs (Fig. 2), attention rows and U rows (Fig. 3 a, b), U matrix
(Fig. 5), windows (Fig. 4), the beta sweep of DIP (Fig. 6), responsive field (Fig. 11, 12)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ._common import _np, _image, _grid, default_patches, _check_patches, _figure, _cell, _box, _overlay

__all__ = ["plot_uncertainty_rows", "plot_uncertainty_matrix", "plot_windows", "plot_field_size", "plot_field_tendency",
           "plot_inner_outer", "plot_attention_rows", "plot_beta_sweep"]


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


# ------------------------------------------------------------------------- Fig. 2, Fig. 3 (a), Fig. 6
def _layer_vector(v, name: str, L=None) -> np.ndarray:
    a = _np(v).astype(np.float64)
    if a.ndim != 1 or a.size == 0 or (L is not None and a.size != L):
        want = f"({L},)" if L is not None else "(L,) with L >= 1"
        raise ValueError(f"{name} must have shape {want}, got {a.shape}")
    return a


def plot_inner_outer(inner_mean, outer_mean, inner_std=None, outer_std=None, *, num_images=None, image=None,
                     grid=None, objects=None, triple=None, triple_scores=None):
    """Fig. 2: attention between inner-object patch pairs and inner-outer pairs, layer by layer.

    ``inner_mean``/``outer_mean`` ``(L,)``: the mean score per layer
    (:class:`vitpatch.analysis.paper000_stats.InnerOuterStats`), drawn with a +-``*_std`` band
    (the std over images) when given; ``num_images``: ``(images with inner pairs, images with
    outer pairs)`` for the legend. With ``image`` (and ``grid``, ``objects`` bool ``(n,)``,
    ``triple = (A, B, C)`` and ``triple_scores`` ``(L, 2)``: ``A -> B``, ``A -> C`` per layer)
    two panels come first, as in the paper: (a) the image with the object's patches outlined,
    target A red, inner B blue, outer C orange; (b) the example's two scores per layer.
    """
    im = _layer_vector(inner_mean, "inner_mean")
    L = im.size
    om = _layer_vector(outer_mean, "outer_mean", L)
    ist = None if inner_std is None else _layer_vector(inner_std, "inner_std", L)
    ost = None if outer_std is None else _layer_vector(outer_std, "outer_std", L)
    layers = np.arange(1, L + 1)
    panels = 1 if image is None else 3
    fig, axes = _figure(1, panels, width=4.2, height=3.6)
    if image is not None:
        if grid is None or objects is None or triple is None or triple_scores is None:
            raise ValueError("image needs grid, objects, triple and triple_scores")
        img = _image(image)
        obj = _np(objects).astype(bool)
        gh, gw = _grid(grid, obj.size)
        a, b, c = (int(t) for t in triple)
        _check_patches([a, b, c], obj.size)
        ts = _np(triple_scores).astype(np.float64)
        if ts.shape != (L, 2):
            raise ValueError(f"triple_scores must have shape ({L}, 2), got {ts.shape}")
        cw, ch, H, W = _cell(img, (gh, gw))
        ax = axes[0, 0]
        ax.imshow(img, extent=(0, W, H, 0))
        for q in np.flatnonzero(obj):
            _box(ax, q % gw, q // gw, q % gw, q // gw, cw, ch, fill=False, edgecolor="white", linewidth=0.6,
                 alpha=0.8)
        for q, colour, label in ((a, "red", "A"), (b, "tab:blue", "B"), (c, "tab:orange", "C")):
            _box(ax, q % gw, q // gw, q % gw, q // gw, cw, ch, facecolor=colour, alpha=0.8, edgecolor=colour)
            ax.text((q % gw + 0.5) * cw, (q // gw + 0.5) * ch, label, ha="center", va="center", fontsize=8,
                    color="white", fontweight="bold")
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"(a) object patches (white, {int(obj.sum())} of {obj.size}); A, B inner, C outer", fontsize=9)
        ax = axes[0, 1]
        ax.plot(layers, ts[:, 0], marker="o", color="tab:blue", label=f"A->B (inner pair, {a}->{b})")
        ax.plot(layers, ts[:, 1], marker="s", color="tab:orange", label=f"A->C (inner-outer, {a}->{c})")
        ax.set_xlabel("layer")
        ax.set_ylabel("attention score (mean over heads)")
        ax.set_xticks(layers)
        ax.set_title("(b) this image's pairs", fontsize=9)
        ax.legend(fontsize=8)
    ax = axes[0, -1]
    ni, no = (None, None) if num_images is None else (int(num_images[0]), int(num_images[1]))
    for mean, sd, colour, marker, label, cnt in ((im, ist, "tab:blue", "o", "inner-inner pairs", ni),
                                                 (om, ost, "tab:orange", "s", "inner-outer pairs", no)):
        text = label if cnt is None else f"{label} ({cnt} images)"
        ax.plot(layers, mean, marker=marker, color=colour, label=text)
        if sd is not None:
            ax.fill_between(layers, mean - sd, mean + sd, color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention score per image")
    ax.set_xticks(layers)
    band = " +- std over images" if ist is not None or ost is not None else ""
    ax.set_title(f"{'(c) ' if image is not None else ''}mean over images{band}", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle("Inner-object vs inner-outer patch pairs across layers (paper 000 Fig. 2)")
    return fig


def plot_attention_rows(image, rows, grid, patches: Sequence[int], U=None):
    """Fig. 3 (a): for each patch ``p`` (red box, one row of panels) its attention row in every
    layer, ``A_l[p, :]`` over the image (columns ``A_1 .. A_L``, each scaled to its own maximum,
    so a "tight" or "loose" layer shows as such), and with ``U`` ``(n, n)`` the row ``U[p, :]``
    (eq. 3, log scale) in a last column.

    ``rows``: ``(L, k, n)`` (already averaged over heads) or ``(L, h, k, n)`` (averaged here), for
    one image and the ``k`` patches ``patches`` (:func:`vitpatch.analysis.attention_rows`).
    """
    img = _image(image)
    r = _np(rows).astype(np.float64)
    if r.ndim == 4:
        r = r.mean(1)
    if r.ndim != 3:
        raise ValueError(f"rows must have shape (L, k, n) or (L, h, k, n) for one image, got {_np(rows).shape}")
    L, k, n = r.shape
    gh, gw = _grid(grid, n)
    patches = _check_patches(patches, n)
    if len(patches) != k:
        raise ValueError(f"rows hold {k} patches but patches names {len(patches)}")
    u = None
    if U is not None:
        u = _np(U).astype(np.float64)
        if u.shape != (n, n):
            raise ValueError(f"U must have shape ({n}, {n}) for one image, got {u.shape}")
    cols = L + (u is not None)
    cw, ch, _, _ = _cell(img, (gh, gw))
    fig, axes = _figure(k, cols, width=1.9, height=2.0)
    for j, p in enumerate(patches):
        for li in range(L):
            heat = r[li, j].reshape(gh, gw)
            title = f"A{li + 1} (max {heat.max():.2g})" if j == 0 else f"max {heat.max():.2g}"
            _overlay(axes[j, li], img, heat, title, colorbar=False)
            _box(axes[j, li], p % gw, p // gw, p % gw, p // gw, cw, ch, fill=False, edgecolor="red", linewidth=1.5)
        if u is not None:
            _overlay(axes[j, L], img, u[p].reshape(gh, gw), "U (eq. 3)" if j == 0 else "", log=True,
                     cmap="viridis", colorbar=False)
            _box(axes[j, L], p % gw, p // gw, p % gw, p // gw, cw, ch, fill=False, edgecolor="red", linewidth=1.5)
        axes[j, 0].set_ylabel(f"patch {p}", fontsize=9)
    fig.suptitle("Attention rows of selected patches per layer, and U (paper 000 Fig. 3 a)")
    return fig


def plot_beta_sweep(image, keeps, betas, grid, stored_beta=None):
    """Fig. 6: the indiscriminative patches (black, outlined red) dropped by DIP for each ``beta`` over the image.

    ``keeps``: bool ``(K, n)`` (:func:`vitpatch.analysis.windows.dip_sweep` of one image), False =
    dropped; ``betas``: the ``K`` fractions. ``stored_beta``: the ``beta`` of a stored
    ``vitpatch windows`` run, whose panel is marked. Two rows of panels, as in the paper.
    """
    img = _image(image)
    kk = _np(keeps).astype(bool)
    b = [float(x) for x in betas]
    if kk.ndim != 2 or kk.shape[0] != len(b) or not b:
        raise ValueError(f"keeps must have shape (len(betas), n) = ({len(b)}, n), got {kk.shape}")
    K, n = kk.shape
    gh, gw = _grid(grid, n)
    cw, ch, H, W = _cell(img, (gh, gw))
    rows_ = 1 if K <= 3 else 2
    cols = -(-K // rows_)
    fig, axes = _figure(rows_, cols, width=3.0, height=3.2)
    for i in range(rows_ * cols):
        ax = axes[i // cols, i % cols]
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= K:
            ax.set_axis_off()
            continue
        ax.imshow(img, extent=(0, W, H, 0))
        for q in np.flatnonzero(~kk[i]):  # black as in the paper, outlined so it shows on dark backgrounds too
            _box(ax, q % gw, q // gw, q % gw, q // gw, cw, ch, facecolor="black", edgecolor="red", linewidth=0.6)
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        mark = " (stored run)" if stored_beta is not None and abs(b[i] - float(stored_beta)) < 1e-12 else ""
        ax.set_title(f"beta = {100 * b[i]:g}%: {int((~kk[i]).sum())} of {n} dropped{mark}", fontsize=9)
    fig.suptitle("Dropping indiscriminative patches (black, outlined red) for several beta (paper 000 Fig. 6)")
    return fig
