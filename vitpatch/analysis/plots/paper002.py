"""Paper 002's figures (docs/math.md §8): keypoints (Fig. 3), an attended row (Fig. 4), per-layer points
(Fig. 5/6), the stage summary (Fig. 7a), attention heatmaps per stage (Fig. 7b), mask as prompt (Fig. 8:
accuracy vs ratio, and the masked images)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ._common import _np, _image, _grid, _figure, _cell, _box, _overlay

__all__ = ["plot_keypoints", "plot_attended_row", "plot_layer_points", "plot_stage_summary", "plot_stage_heatmaps",
           "plot_mask_prompt", "plot_masked_images"]


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



def plot_stage_heatmaps(image, rows, grid, layers: Sequence[int], query: Optional[int] = None,
                        names: Optional[Sequence[str]] = None, afi: Optional[Sequence[float]] = None):
    """Paper 002 Fig. 7b: one attention heatmap per stage (Retrieval, Capture, Coach, §4.3).

    ``rows``: ``(S, n)``, for each stage the attention row ``Ap[query, :]`` of the layer drawn for
    it (``layers[s]``; :func:`vitpatch.analysis.semantic.stage_layers` picks the middle layer),
    over the image; ``afi`` optionally that row's focus index ``delta_query`` (eq. 5, higher =
    broader), written in the title. ``names`` default ``stage 1`` ... The query patch is boxed in red.
    """
    R = _np(rows).astype(np.float64)
    if R.ndim != 2:
        raise ValueError(f"rows must have shape (S, n): one attention row per stage, got {R.shape}")
    S, n = R.shape
    gh, gw = _grid(grid, n)
    layers = [int(l) for l in layers]
    if len(layers) != S:
        raise ValueError(f"layers must name one layer per stage ({S}), got {len(layers)}")
    names = [f"stage {i + 1}" for i in range(S)] if names is None else [str(v) for v in names]
    if len(names) != S:
        raise ValueError(f"names must have one entry per stage ({S}), got {len(names)}")
    if afi is not None and len(afi) != S:
        raise ValueError(f"afi must have one value per stage ({S}), got {len(afi)}")
    if query is not None and not 0 <= int(query) < n:
        raise ValueError(f"query must be a patch index in [0, {n}), got {query}")
    img = _image(image)
    cw, ch, _, _ = _cell(img, grid)
    fig, axes = _figure(1, S, 3.4, 3.3)
    for s in range(S):
        ax = axes[0, s]
        title = f"{names[s]}: layer {layers[s]}"
        if afi is not None:
            title += f"\nAFI delta of the row {float(afi[s]):.3g} (eq. 5)"
        _overlay(ax, img, R[s].reshape(gh, gw), title)
        if query is not None:
            y, x = divmod(int(query), gw)
            _box(ax, x, y, x, y, cw, ch, fill=False, edgecolor="red", lw=1.5)
    who = "" if query is None else f" of patch {int(query)}"
    fig.suptitle(f"Attention{who} per stage, mean over heads (paper 002 Fig. 7b)", fontsize=10)
    return fig


def plot_masked_images(image, scores, grid, ratios: Optional[Sequence[float]] = None, result=None,
                       fill=(0.5, 0.5, 0.5), title: Optional[str] = None):
    """Paper 002 Fig. 8a/8b: the image under Top (row 1) and Bottom (row 2) masks at each ratio.

    Top masks the ``round(r n)`` patches with the highest patch score ``theta_bar`` (§5.1), Bottom
    the lowest (:func:`vitpatch.analysis.mask_patches`, so the masks are those the accuracy was
    measured with). Masked patches are painted ``fill`` (RGB in ``[0, 1]``; the dataset mean is
    what the model sees in ``"pixel"`` mode, 0 after normalisation) and outlined. ``result``: one mode's entry of
    :func:`vitpatch.analysis.mask_prompt_accuracy`, whose accuracies go into the titles (its ratios
    are the default ``ratios``).
    """
    from ..semantic import MASK_RATIOS, mask_patches

    import torch

    sc = torch.as_tensor(_np(scores).astype(np.float64)).reshape(-1)
    n = sc.numel()
    gh, gw = _grid(grid, n)
    if result is not None and (not isinstance(result, dict) or not {"ratios", "top", "bottom"} <= set(result)):
        raise ValueError("result must be one mode's dict of mask_prompt_accuracy (ratios, top, bottom, unmasked)")
    if ratios is None:
        ratios = result["ratios"] if result is not None else MASK_RATIOS
    ratios = [float(r) for r in ratios]
    if not ratios:
        raise ValueError("ratios must name at least one masking ratio")
    accs = None
    if result is not None:
        known = [float(r) for r in result["ratios"]]
        accs = {w: {r: a for r, a in zip(known, result[w])} for w in ("top", "bottom")}
    colour = np.asarray(fill, dtype=np.float64).reshape(-1)
    if colour.size != 3 or not np.all((colour >= 0) & (colour <= 1)):
        raise ValueError(f"fill must be an RGB colour in [0, 1], got {fill!r}")
    img = _image(image)
    H, W = img.shape[:2]
    ys = np.round(np.arange(gh + 1) * H / gh).astype(int)
    xs = np.round(np.arange(gw + 1) * W / gw).astype(int)
    fig, axes = _figure(2, len(ratios) + 1, 2.3, 2.5)
    for row, which in enumerate(("top", "bottom")):
        ax = axes[row, 0]
        ax.imshow(img, extent=(0, W, H, 0))
        head = "original"
        if result is not None and "unmasked" in result:
            head += f"\nacc {100 * float(result['unmasked']):.1f}%"
        ax.set_title(head, fontsize=8)
        ax.set_ylabel("Top (highest score masked)" if which == "top" else "Bottom (lowest score masked)", fontsize=8)
        for c, r in enumerate(ratios, start=1):
            m = mask_patches(sc[None], r, which)[0].numpy()
            out = img.copy()
            for p in np.nonzero(m)[0]:
                y, x = divmod(int(p), gw)
                out[ys[y]:ys[y + 1], xs[x]:xs[x + 1]] = colour
            ax = axes[row, c]
            ax.imshow(out, extent=(0, W, H, 0))
            for p in np.nonzero(m)[0]:  # outlined too, so a fill close to the background stays visible
                y, x = divmod(int(p), gw)
                _box(ax, x, y, x, y, W / gw, H / gh, fill=False, edgecolor="black", lw=0.6)
            k = int(m.sum())
            t = f"{which.capitalize()} r = {100 * r:g}% ({k} patch{'' if k == 1 else 'es'})"
            if accs is not None and r in accs[which]:
                t += f"\nacc {100 * float(accs[which][r]):.1f}%"
            ax.set_title(t, fontsize=8)
    for ax in axes.reshape(-1):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or "Top / Bottom masks of the patch score (paper 002 Fig. 8)", fontsize=10)
    return fig
