"""Paper 004's figures: PaCa cluster assignments as heatmaps over the image (Fig. 1)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ._common import _np, _image, _grid, _check_patches, _figure, _overlay

__all__ = ["plot_cluster_heatmaps"]


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
