"""Paper 003's figures (docs/math.md §9, Fig. 1, 5, 6, 7): head importance with its spread over images
(B1, Fig. 7), one head per pruning mode (B2), top-5 predictions under pruning (B3), mode bars, top heads,
k-hop strength (C2), entropy per layer (C1) and over images (C3), t-SNE and its density view (D1),
context masks (D2), the two-axes view (D3), the attention heatmap (D4), the threshold histogram (D5)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ._common import _np, _image, _figure, _overlay

__all__ = ["plot_head_importance", "plot_mode_bars", "plot_top_heads", "plot_khop_strength", "plot_entropy_layers",
           "plot_tsne", "plot_context_masks", "plot_attention_heatmap", "plot_importance_metrics", "plot_head_modes",
           "plot_pruned_top5", "plot_entropy_distribution", "plot_pattern_density", "plot_two_axes",
           "plot_threshold_histogram", "attention_threshold", "METRIC_NAMES"]


#: panel titles of the importance metrics (paper 003 eq. 3-6; Fig. 7 shows p_pruned[y] as "Probability")
METRIC_NAMES = {"p_pruned": "probability P_ij[y]", "prob": "I_prob (eq. 3)", "jsd": "I_JSD (eq. 4)",
                "cls": "I_cls, CLS distance (eq. 5)", "patch": "I_patch, patch distance (eq. 6)"}


def _importance_panel(ax, v, s=None, current=None, selected=None, name="", unpruned=None, legend=True):
    """One line chart of paper 003 Fig. 7 / Fig. 1 B1 on ``ax``: ``v`` ``(L, h)`` over the ``L*h`` heads."""
    L, h = v.shape
    x = np.arange(L * h)
    ax.plot(x, v.reshape(-1), "o-", color="#1f77b4", lw=1.2, ms=2.5, label="mean over images" if s is not None
            else name)
    if s is not None:
        lo, hi = (v - s).reshape(-1), (v + s).reshape(-1)
        ax.fill_between(x, lo, hi, color="#1f77b4", alpha=0.25, lw=0, label="± std over images")
    if current is not None:
        ax.plot(x, current.reshape(-1), "-", color="#444444", lw=0.8, alpha=0.8, label="selected image")
    if unpruned is not None:
        ax.axhline(float(unpruned), color="#2ca02c", ls="--", lw=0.9, label="unpruned P[y]")
    for l in range(1, L):
        ax.axvline(l * h - 0.5, color="k", lw=0.4, alpha=0.4)
    if selected is not None:
        ax.axvline(selected[0] * h + selected[1], color="#d62728", lw=1.0, label=f"L{selected[0]}H{selected[1]}")
    step = max(1, L // 12)
    ax.set_xticks(np.arange(0, L, step) * h + (h - 1) / 2)
    ax.set_xticklabels([str(l) for l in range(0, L, step)], fontsize=7)
    ax.set_xlabel("layer (its heads in order)", fontsize=8)
    ax.set_ylabel(name, fontsize=8)
    if legend:
        ax.legend(fontsize=6)


def plot_head_importance(values, name: str = "I_prob", std=None, *, current=None, selected=None):
    """Paper 003 Fig. 1 B1 / Fig. 7: a head importance metric over all ``L*h`` heads in layer order.

    ``values``: ``(L, h)``, the metric per head (its mean over images); ``std``: ``(L, h)``, its
    standard deviation over images per head, drawn as the band ``values ± std`` (Fig. 7's blue band;
    no band without it); ``current``: ``(L, h)`` one image's values (thin line); ``selected``:
    ``(layer, head)`` marked by a vertical line.
    """
    v = _np(values).astype(np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must have shape (L, h), got {v.shape}")
    s = None if std is None else _np(std).astype(np.float64)
    if s is not None and s.shape != v.shape:
        raise ValueError(f"std must have the shape of values {v.shape}, got {s.shape}")
    cur = None if current is None else _np(current).astype(np.float64)
    if cur is not None and cur.shape != v.shape:
        raise ValueError(f"current must have the shape of values {v.shape}, got {cur.shape}")
    sel = _check_head(selected, v.shape)
    L, h = v.shape
    fig, axes = _figure(1, 1, 7.0, 3.2)
    _importance_panel(axes[0, 0], v, s, cur, sel, name)
    axes[0, 0].set_title(f"head importance {name} over all {L * h} heads (paper 003 Fig. 1 B1, Fig. 7)", fontsize=9)
    return fig


def _check_head(selected, shape):
    if selected is None:
        return None
    try:
        l, j = (int(t) for t in selected)
    except (TypeError, ValueError):
        raise ValueError(f"selected must be a (layer, head) pair, got {selected!r}") from None
    if not (0 <= l < shape[0] and 0 <= j < shape[1]):
        raise ValueError(f"selected must be a (layer, head) in [0, {shape[0]}) x [0, {shape[1]}), got {selected!r}")
    return l, j


def plot_importance_metrics(mean, std, modes: Sequence[int], *, current=None, selected=None, unpruned=None):
    """Paper 003 Fig. 7 for every pruning mode: one row per mode, one column per metric.

    ``mean`` / ``std``: ``{metric: (L, h, M)}`` over images (metrics from :data:`METRIC_NAMES`, e.g.
    ``p_pruned``, ``jsd``, ``cls``, ``patch``); each panel is the mean curve over the ``L*h`` heads
    with the band ± std over images. ``current``: the same for one image (thin line); ``selected``:
    ``(layer, head)``; ``unpruned``: the mean unpruned ``P[y]`` (dashed line in the ``p_pruned`` panels).
    """
    if not isinstance(mean, dict) or not mean:
        raise ValueError("mean must be a non-empty dict {metric: (L, h, M)}")
    if not isinstance(std, dict) or set(std) != set(mean):
        raise ValueError(f"std must be a dict with the keys of mean {sorted(mean)}")
    modes = [int(m) for m in modes]
    names = [k for k in METRIC_NAMES if k in mean] + [k for k in mean if k not in METRIC_NAMES]
    arrs = {}
    for k in names:
        arrs[k] = (_np(mean[k]).astype(np.float64), _np(std[k]).astype(np.float64),
                   None if current is None or k not in current else _np(current[k]).astype(np.float64))
        if arrs[k][0].ndim != 3 or arrs[k][0].shape[-1] != len(modes) or arrs[k][1].shape != arrs[k][0].shape:
            raise ValueError(f"mean[{k!r}] and std[{k!r}] must have shape (L, h, len(modes) = {len(modes)}), got "
                             f"{arrs[k][0].shape} and {arrs[k][1].shape}")
    L, h, M = arrs[names[0]][0].shape
    sel = _check_head(selected, (L, h))
    from ..pruning import PRUNE_MODES

    fig, axes = _figure(M, len(names), 4.6, 2.6)
    for i, m in enumerate(modes):
        for c, k in enumerate(names):
            v, s, cur = arrs[k]
            if np.isnan(v[..., i]).all():
                axes[i, c].set_axis_off()
                axes[i, c].set_title(f"{k}: undefined (no CLS token)", fontsize=8)
                continue
            _importance_panel(axes[i, c], v[..., i], s[..., i], None if cur is None else cur[..., i], sel,
                              METRIC_NAMES.get(k, k), unpruned if k == "p_pruned" else None, legend=(i == 0))
            axes[i, c].set_title(f"mode {m} ({PRUNE_MODES.get(m, '?')}): {METRIC_NAMES.get(k, k)}", fontsize=8)
    fig.suptitle("head importance, mean ± std over images (paper 003 Fig. 7, Fig. 1 B1)", fontsize=10)
    return fig


_SHORT_MODES = {0: "none", 1: "all", 2: "C→C", 3: "C↔P", 4: "P→P", 5: "C→C,\nC↔P"}


def plot_head_modes(mean, std, modes: Sequence[int], *, current=None, title: str = ""):
    """Paper 003 Fig. 1 B2: one head's importance in each pruning mode (bars), one panel per metric.

    ``mean`` / ``std``: ``{metric: (M,)}`` that head's mean and std over images per mode (error bars);
    ``current``: ``{metric: (M,)}`` one image's values (dots).
    """
    if not isinstance(mean, dict) or not mean:
        raise ValueError("mean must be a non-empty dict {metric: (M,)}")
    modes = [int(m) for m in modes]
    names = [k for k in METRIC_NAMES if k in mean] + [k for k in mean if k not in METRIC_NAMES]
    from ..pruning import PRUNE_MODES

    fig, axes = _figure(1, len(names), 3.2, 3.0)
    x = np.arange(len(modes))
    for ax, k in zip(axes[0], names):
        v = _np(mean[k]).astype(np.float64).reshape(-1)
        s = None if std is None else _np(std[k]).astype(np.float64).reshape(-1)
        if v.shape != (len(modes),) or (s is not None and s.shape != v.shape):
            raise ValueError(f"mean[{k!r}] and std[{k!r}] must have shape (len(modes) = {len(modes)},), got {v.shape}")
        ax.bar(x, np.nan_to_num(v), yerr=None if s is None else np.nan_to_num(s), capsize=3, color="#4c72b0",
               label="mean ± std over images")
        if current is not None and k in current:
            ax.plot(x, _np(current[k]).astype(np.float64).reshape(-1), "o", color="#d62728", ms=4,
                    label="selected image")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{m}\n{_SHORT_MODES.get(m, PRUNE_MODES.get(m, '?'))}" for m in modes], fontsize=6)
        ax.set_xlabel("pruning mode", fontsize=8)
        ax.set_title(METRIC_NAMES.get(k, k), fontsize=8)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(title or "importance of one head per pruning mode (paper 003 Fig. 1 B2)", fontsize=9)
    return fig


def plot_pruned_top5(top_prob, top_class, modes: Sequence[int], *, label=None, class_names=None, unpruned=None,
                     title: str = ""):
    """Paper 003 Fig. 1 B3: the top-5 predicted probabilities of one image with one head pruned, per mode.

    ``top_prob`` / ``top_class``: ``(M, k)`` most probable first; ``unpruned``: ``(prob (k,), class (k,))``
    of the unpruned model (first panel); ``label``: the true class, set in bold (and green) where it
    is among the top ``k``; ``class_names``: names by class index.
    """
    p, c = _np(top_prob).astype(np.float64), _np(top_class).astype(np.int64)
    modes = [int(m) for m in modes]
    if p.ndim != 2 or p.shape != c.shape or p.shape[0] != len(modes):
        raise ValueError(f"top_prob and top_class must have shape (len(modes) = {len(modes)}, k), got {p.shape}, "
                         f"{c.shape}")
    from ..pruning import PRUNE_MODES

    rows = [("unpruned", _np(unpruned[0]).astype(np.float64), _np(unpruned[1]).astype(np.int64))] \
        if unpruned is not None else []
    rows += [(f"mode {m}: {PRUNE_MODES.get(m, '?')}", p[i], c[i]) for i, m in enumerate(modes)]
    fig, axes = _figure(1, len(rows), 2.6, 2.4)
    for ax, (name, pp, cc) in zip(axes[0], rows):
        y = np.arange(len(pp))[::-1]
        hit = [label is not None and int(k) == int(label) for k in cc]
        ax.barh(y, pp, color=["#2ca02c" if t else "#8c8c8c" for t in hit])
        ax.set_yticks(y)
        ax.set_yticklabels([str(class_names[k]) if class_names is not None and 0 <= k < len(class_names)
                            else f"class {k}" for k in cc], fontsize=7)
        for tick, t in zip(ax.get_yticklabels(), hit):
            tick.set_fontweight("bold" if t else "normal")
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability", fontsize=7)
        ax.set_title(name, fontsize=8)
    fig.suptitle(title or "top-5 predictions under pruning (paper 003 Fig. 1 B3; true class in bold)", fontsize=9)
    return fig


def plot_mode_bars(values, modes: Sequence[int], name: str = "I_prob"):
    """Paper 003 Fig. 1: mean importance per layer for each pruning mode (grouped bars).
    ``values``: ``(L, h, M)``; ``modes``: the ``M`` mode numbers."""
    from ..pruning import PRUNE_MODES

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


def plot_entropy_distribution(counts, edges=None, current=None, title: str = ""):
    """Paper 003 Fig. 1 C3: the distribution of one head's strength entropy over all images (area plot).

    ``counts``: ``(bins,)`` histogram counts over images; ``edges``: ``(bins + 1,)`` (default: equal bins
    on ``[0, 1]``, the range of the normalised entropy); ``current``: the selected image's entropy
    (vertical line).
    """
    c = _np(counts).astype(np.float64).reshape(-1)
    if c.size < 1 or (c < 0).any():
        raise ValueError(f"counts must be a non-empty histogram of non-negative counts, got shape {c.shape}")
    e = np.linspace(0.0, 1.0, c.size + 1) if edges is None else _np(edges).astype(np.float64).reshape(-1)
    if e.shape != (c.size + 1,) or not (np.diff(e) > 0).all():
        raise ValueError(f"edges must be {c.size + 1} increasing bin edges, got shape {e.shape}")
    width = np.diff(e)
    dens = c / max(c.sum(), 1.0) / width
    mid = (e[:-1] + e[1:]) / 2
    fig, axes = _figure(1, 1, 4.6, 2.8)
    ax = axes[0, 0]
    xs = np.concatenate([[e[0]], mid, [e[-1]]])
    ys = np.concatenate([[dens[0]], dens, [dens[-1]]])
    ax.fill_between(xs, 0, ys, color="#8172b2", alpha=0.45, lw=0)
    ax.plot(xs, ys, color="#8172b2", lw=1.0)
    if current is not None and np.isfinite(float(current)):
        ax.axvline(float(current), color="#d62728", lw=1.2, label=f"selected image: {float(current):.3f}")
        ax.legend(fontsize=7)
    ax.set_xlim(e[0], e[-1])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("strength entropy (normalised)", fontsize=8)
    ax.set_ylabel("density over images", fontsize=8)
    ax.set_title(title or f"strength entropy over {int(c.sum())} images (paper 003 Fig. 1 C3)", fontsize=9)
    return fig


def _blur(h: np.ndarray, sigma: float) -> np.ndarray:
    r = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    h = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 0, h)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, h)


def plot_pattern_density(embedding, points=None, point_labels=None, highlight: Optional[int] = None,
                         title: str = "", label_name: str = "layer", bins: int = 80):
    """Paper 003 Fig. 1 D1 (and Fig. 10A): the t-SNE layout of all heads' patterns over all images as a
    density plot (filled contours of a smoothed 2-D histogram), with one image's heads on top as points
    coloured by ``point_labels`` (their layer) and the ``highlight``-th point (the selected head) ringed.

    ``embedding``: ``(M, 2)`` every laid-out head; ``points``: ``(S, 2)`` the selected image's heads.
    """
    e = _np(embedding).astype(np.float64)
    if e.ndim != 2 or e.shape[1] != 2 or len(e) < 1:
        raise ValueError(f"embedding must have shape (M, 2) with M >= 1, got {e.shape}")
    pts = None if points is None else _np(points).astype(np.float64)
    if pts is not None and (pts.ndim != 2 or pts.shape[1] != 2):
        raise ValueError(f"points must have shape (S, 2), got {pts.shape}")
    allp = e if pts is None else np.concatenate([e, pts])
    lo, hi = allp.min(0), allp.max(0)
    pad = np.maximum((hi - lo) * 0.08, 1e-6)
    lo, hi = lo - pad, hi + pad
    H, xe, ye = np.histogram2d(e[:, 0], e[:, 1], bins=int(bins), range=[[lo[0], hi[0]], [lo[1], hi[1]]])
    D = _blur(H, max(1.0, bins / 40))
    fig, axes = _figure(1, 1, 4.8, 4.0)
    ax = axes[0, 0]
    if D.max() > 0:
        ax.contourf((xe[:-1] + xe[1:]) / 2, (ye[:-1] + ye[1:]) / 2, D.T, levels=np.linspace(D.max() * 0.02, D.max(), 9),
                    cmap="Greys", alpha=0.8, extend="neither")
    if pts is not None:
        lab = None if point_labels is None else _np(point_labels).reshape(-1)
        if lab is not None and lab.size != len(pts):
            raise ValueError(f"point_labels must have one entry per point ({len(pts)}), got {lab.size}")
        sc = ax.scatter(pts[:, 0], pts[:, 1], c=lab, s=16, cmap="viridis", edgecolors="k", linewidths=0.3, zorder=3)
        if lab is not None:
            fig.colorbar(sc, ax=ax, label=label_name)
        if highlight is not None:
            if not 0 <= int(highlight) < len(pts):
                raise ValueError(f"highlight must index points [0, {len(pts)}), got {highlight!r}")
            q = pts[int(highlight)]
            ax.scatter([q[0]], [q[1]], s=120, facecolors="none", edgecolors="#d62728", linewidths=1.5, zorder=4,
                       label="selected head")
            ax.legend(fontsize=7, loc="lower right")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"density of {len(e)} heads' patterns (paper 003 Fig. 1 D1)", fontsize=9)
    return fig


def attention_threshold(values, top: float = 0.01) -> float:
    """The threshold of Fig. 1 D5: the smallest of the top ``top`` share of ``values`` (``k = ceil(top * size)``
    largest entries are at or above it; the cutoff :func:`vitpatch.analysis.binarize_patterns` uses)."""
    v = _np(values).astype(np.float64).reshape(-1)
    if isinstance(top, bool) or not 0 < float(top) <= 1:
        raise ValueError(f"top must be a fraction in (0, 1], got {top!r}")
    if v.size < 1:
        raise ValueError("values must not be empty")
    k = max(1, int(np.ceil(float(top) * v.size)))
    return float(np.partition(v, v.size - k)[v.size - k])


def _check_map(attn, num_prefix_tokens):
    A = _np(attn).astype(np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"attn must have shape (N, N), got {A.shape}")
    P = int(num_prefix_tokens)
    if not 0 <= P < A.shape[0]:
        raise ValueError(f"num_prefix_tokens must be in [0, N), got {num_prefix_tokens}")
    return A, P


def plot_two_axes(attn, num_prefix_tokens: int = 1, top: float = 0.01, title: str = ""):
    """Paper 003 Fig. 1 D3 (and Fig. 14B): the two-axes view of one head's ``(N, N)`` map.

    Source tokens on the top axis, target tokens on the bottom; a line from source ``i`` to target
    ``j`` for every entry at or above the D5 threshold (the top ``top`` share of the ``N^2`` values),
    light to dark by magnitude: blue for the CLS-related entries (row or column of a prefix token,
    ``A_cls``), orange for ``A_patch``.
    """
    A, P = _check_map(attn, num_prefix_tokens)
    N = A.shape[0]
    thr = attention_threshold(A, top)
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize

    fig, axes = _figure(1, 1, 7.0, 2.6)
    ax = axes[0, 0]
    src, dst = np.nonzero(A >= thr)
    val = A[src, dst]
    order = np.argsort(val)  # dark lines on top
    src, dst, val = src[order], dst[order], val[order]
    norm = Normalize(vmin=thr, vmax=max(float(val.max()), thr + 1e-12))
    cls = (src < P) | (dst < P)
    for mask, cmap, name in ((~cls, "Oranges", "A_patch"), (cls, "Blues", "A_cls")):
        if mask.any():
            segs = np.stack([np.stack([src[mask], np.ones(mask.sum())], -1),
                             np.stack([dst[mask], np.zeros(mask.sum())], -1)], 1)
            colours = colormaps[cmap](0.3 + 0.7 * norm(val[mask]))
            ax.add_collection(LineCollection(segs, colors=colours, linewidths=0.8, label=name))
    ax.scatter(np.arange(N), np.ones(N), s=4, c=["#1f77b4" if i < P else "#ff7f0e" for i in range(N)], zorder=3)
    ax.scatter(np.arange(N), np.zeros(N), s=4, c=["#1f77b4" if i < P else "#ff7f0e" for i in range(N)], zorder=3)
    ax.set_xlim(-1, N)
    ax.set_ylim(-0.15, 1.15)
    ax.set_yticks([0, 1])
    ax.set_yticklabels(["target", "source"], fontsize=8)
    ax.set_xlabel("token (CLS first)", fontsize=8)
    if len(val):
        ax.legend(fontsize=7, loc="center right")
    ax.set_title(title or f"two-axes view, {len(val)} lines >= {thr:.3g} (top {100 * float(top):g}%; paper 003 "
                 f"Fig. 1 D3)", fontsize=9)
    return fig


def plot_threshold_histogram(attn, top: float = 0.01, bins: int = 60, title: str = ""):
    """Paper 003 Fig. 1 D5: histogram of the ``N^2`` values of one head's map (log counts) with the
    threshold of the two-axes view (D3) as a vertical bar: the top ``top`` share lies at or above it."""
    A = _np(attn).astype(np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"attn must have shape (N, N), got {A.shape}")
    thr = attention_threshold(A, top)
    fig, axes = _figure(1, 1, 4.6, 2.8)
    ax = axes[0, 0]
    ax.hist(A.reshape(-1), bins=int(bins), color="#ff7f0e", alpha=0.8, log=True)
    ax.axvline(thr, color="k", lw=1.2, label=f"threshold {thr:.3g}: top {100 * float(top):g}%")
    ax.set_xlabel("attention value", fontsize=8)
    ax.set_ylabel("entries (log)", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title(title or f"distribution of the {A.size} attention values (paper 003 Fig. 1 D5)", fontsize=9)
    return fig
