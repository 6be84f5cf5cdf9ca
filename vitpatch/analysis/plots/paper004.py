"""Paper 004's figures: PaCa cluster assignments as heatmaps over the image (Fig. 1, 4-6) and cluster importance
(§3.5)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ._common import _np, _image, _grid, _check_patches, _figure, _overlay

__all__ = ["plot_cluster_heatmaps", "plot_cluster_importance", "plot_top_clusters"]


def plot_cluster_heatmaps(image, assignment, grid, clusters: Optional[Sequence[int]] = None, importance=None):
    """PaCa cluster assignments (paper 004 eq. 7) as heatmaps: column ``m`` of ``A (n, M)`` over the image.

    ``assignment`` is the softmax over the ``n`` tokens of one image (each column sums to 1);
    ``clusters`` picks which to show. Default: with ``importance`` (``(M,)``, e.g. the accuracy drop
    of :func:`vitpatch.analysis.clusters.cluster_importance`, §3.5) the 8 most important, named with
    their importance; without it the 8 with the most peaked assignment.
    """
    A = _np(assignment)
    if A.ndim != 2:
        raise ValueError(f"assignment must have shape (n, M), got {A.shape}")
    n, M = A.shape
    gh, gw = _grid(grid, n)
    img = _image(image)
    imp = None
    if importance is not None:
        imp = _np(importance).astype(np.float64).reshape(-1)
        if imp.shape != (M,):
            raise ValueError(f"importance must have one value per cluster ({M}), got shape {imp.shape}")
    if clusters is None:
        if imp is not None:
            clusters = list(np.argsort(-np.nan_to_num(imp, nan=-np.inf), kind="stable")[: min(8, M)])
        else:
            clusters = list(np.argsort(-A.max(0))[: min(8, M)])
    clusters = _check_patches(clusters, M)
    ncols = min(4, len(clusters))
    nrows = -(-len(clusters) // ncols)
    fig, axes = _figure(nrows, ncols, 2.6, 2.6)
    for ax in axes.ravel()[len(clusters):]:
        ax.axis("off")
    for ax, m in zip(axes.ravel(), clusters):
        title = f"cluster {m} (max {A[:, m].max():.2f})" if imp is None else f"cluster {m} (importance {imp[m]:.3f})"
        _overlay(ax, img, A[:, m].reshape(gh, gw), title, cmap="magma", colorbar=False)
    fig.suptitle("PaCa cluster assignments: softmax over tokens per cluster", fontsize=10)
    return fig


def plot_cluster_importance(acc_drop, prob_drop, prob_drop_std=None, ranking: Optional[Sequence[int]] = None,
                            top: Optional[int] = None, title: Optional[str] = None):
    """Cluster importance of one PaCa layer (paper 004 §3.5): per cluster, in ranked order, the accuracy drop
    when it is masked out of the images (bars) and the drop of the label's probability ``p_y(x) - p_y(x~^m)``
    (bars, with its standard deviation over images as error bars).

    ``ranking`` orders the clusters (default: as given); ``top`` shows only the first ``top``.
    """
    acc = _np(acc_drop).astype(np.float64).reshape(-1)
    dp = _np(prob_drop).astype(np.float64).reshape(-1)
    M = acc.size
    if dp.size != M:
        raise ValueError(f"acc_drop and prob_drop must have one value per cluster, got {M} and {dp.size}")
    sd = None if prob_drop_std is None else _np(prob_drop_std).astype(np.float64).reshape(-1)
    if sd is not None and sd.size != M:
        raise ValueError(f"prob_drop_std must have {M} values, got {sd.size}")
    order = list(range(M)) if ranking is None else _check_patches(ranking, M)
    if top is not None:
        if int(top) < 1:
            raise ValueError(f"top must be a positive integer, got {top!r}")
        order = order[:int(top)]
    k = len(order)
    fig, axes = _figure(1, 1, max(4.0, 0.32 * k + 1.5), 3.2)
    ax = axes[0, 0]
    xs = np.arange(k)
    ax.bar(xs - 0.2, acc[order], 0.4, label="accuracy drop", color="tab:red")
    ax.bar(xs + 0.2, dp[order], 0.4, yerr=None if sd is None else sd[order], capsize=2,
           label="p_y(x) - p_y(x~), mean +- std over images", color="tab:blue", alpha=0.8)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"c{m}" for m in order], rotation=90, fontsize=7)
    ax.set_xlabel("cluster (most important first)")
    ax.set_ylabel("degradation when masked")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title or "cluster importance (paper 004 §3.5)", fontsize=9)
    return fig


def plot_top_clusters(images, heatmaps, clusters, titles=None, row_titles=None, masked=None,
                      upsample: str = "bilinear", suptitle: Optional[str] = None):
    """Clusters as heatmaps over images, one row per image (paper 004 Figs. 4-6): the image, then the min-max
    normalised heatmap ``H^m`` of each cluster in ``clusters[i]`` over it.

    Args:
        images: display images ``(H, W, 3)`` in ``[0, 1]`` (see :func:`display_image`).
        heatmaps: per image ``(M, gh, gw)`` (:func:`vitpatch.analysis.clusters.cluster_heatmaps`).
        clusters: per image the cluster indices to draw (the same number per image).
        titles: per image one title per drawn cluster (default ``"cluster m"``).
        row_titles: per image the title of its image panel.
        masked: per image a cluster ``m`` (or ``None``): a last panel shows the image masked by it,
            ``x * (1 - up(H^m))`` (§3.5), upsampled with ``upsample``.
        suptitle: figure title.
    """
    import torch

    from ..clusters import cluster_masks

    if len(images) == 0:
        raise ValueError("images must hold at least one image")
    if not (len(heatmaps) == len(clusters) == len(images)):
        raise ValueError(f"images, heatmaps and clusters must have one entry per image, got {len(images)}, "
                         f"{len(heatmaps)}, {len(clusters)}")
    K = max(len(c) for c in clusters)
    extra = masked is not None
    if extra and len(masked) != len(images):
        raise ValueError(f"masked must have one entry per image ({len(images)}), got {len(masked)}")
    fig, axes = _figure(len(images), 1 + K + int(extra), 2.3, 2.3)
    for i, (image, heat, cl) in enumerate(zip(images, heatmaps, clusters)):
        img = _image(image)
        H = _np(heat).astype(np.float64)
        if H.ndim != 3:
            raise ValueError(f"heatmaps[{i}] must have shape (M, gh, gw), got {H.shape}")
        cl = _check_patches(cl, H.shape[0])
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(row_titles[i] if row_titles is not None else f"image {i}", fontsize=8)
        axes[i, 0].set_xticks([])
        axes[i, 0].set_yticks([])
        for j in range(K):
            ax = axes[i, 1 + j]
            if j >= len(cl):
                ax.axis("off")
                continue
            m = cl[j]
            t = titles[i][j] if titles is not None else f"cluster {m}"
            _overlay(ax, img, H[m], t, cmap="jet", alpha=0.5, colorbar=False)
            ax.title.set_fontsize(7)
        if extra:
            ax = axes[i, -1]
            if masked[i] is None:
                ax.axis("off")
                continue
            m = _check_patches([masked[i]], H.shape[0])[0]
            keep = cluster_masks(torch.from_numpy(H[m][None, None]), img.shape[:2], upsample)[0, 0].numpy()
            ax.imshow(img * keep[..., None])
            ax.set_title(f"x~ masked by c{m}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return fig


# =========================================================================== paper 002 (docs/math.md §8)
