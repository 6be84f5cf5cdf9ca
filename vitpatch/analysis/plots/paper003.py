"""Paper 003's figures (docs/math.md §9, Fig. 1, 5, 6): head importance, mode bars, top heads, k-hop
strength, entropy per layer, t-SNE, context masks, the attention heatmap."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ._common import _np, _image, _figure, _overlay

__all__ = ["plot_head_importance", "plot_mode_bars", "plot_top_heads", "plot_khop_strength", "plot_entropy_layers",
           "plot_tsne", "plot_context_masks", "plot_attention_heatmap"]


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
    from ..heads import PRUNE_MODES

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
