"""Figures of ``vitpatch train``: loss, top-1 and accuracy vs EO per epoch; paper 000 Fig. 13 for WinfT."""
from __future__ import annotations

import os
from typing import List, Sequence

import numpy as np

__all__ = ["training_figures", "plot_winft_gates"]


def _single():
    """A one-panel figure and its axes (:func:`vitpatch.analysis.plots._common._figure`)."""
    from ..analysis.plots._common import _figure

    fig, axes = _figure(1, 1, 5.0, 3.4)
    return fig, axes[0, 0]


def training_figures(out: str, records: Sequence[dict], attention: str) -> List[str]:
    """``loss.png`` (training loss per logged step, validation loss per epoch), ``top1.png`` (validation
    top-1 / top-5 per epoch) and ``accuracy_vs_eo.png`` (top-1 against EO over patch pairs, one point per
    epoch, the full-attention count marked) from ``metrics.jsonl``'s records."""
    from ..analysis.plots import save_figure

    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    paths = []
    fig, ax = _single()
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, label="train (logged steps)")
    if epochs:
        per_epoch = max(1, steps[-1]["step"] // max(1, epochs[-1]["epoch"] + 1)) if steps else 1
        ax.plot([(r["epoch"] + 1) * per_epoch for r in epochs], [r["val_loss"] for r in epochs], "o-",
                label="validation (end of epoch)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{attention}: loss", fontsize=9)
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, os.path.join(out, "loss.png")))
    if not epochs:
        return paths
    fig, ax = _single()
    e = [r["epoch"] + 1 for r in epochs]
    ax.plot(e, [r["val_top1"] for r in epochs], "o-", label="top-1")
    ax.plot(e, [r["val_top5"] for r in epochs], "s--", label="top-5")
    if "val_ema_top1" in epochs[0]:
        ax.plot(e, [r["val_ema_top1"] for r in epochs], "^:", label="EMA top-1")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{attention}: validation accuracy", fontsize=9)
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, os.path.join(out, "top1.png")))
    eo = [(r.get("val_eo_patch"), r["val_top1"], r["epoch"] + 1) for r in epochs if r.get("val_eo_patch") is not None]
    if eo:
        fig, ax = _single()
        sc = ax.scatter([p[0] for p in eo], [p[1] for p in eo], c=[p[2] for p in eo], cmap="viridis")
        fig.colorbar(sc, ax=ax, label="epoch")
        full = epochs[-1].get("val_eo_full_patch")
        if full:
            ax.axvline(full, color="0.5", ls="--", lw=1, label=f"full attention, n^2 = {full:.0f}")
            ax.legend(fontsize=8)
        ax.set_xlabel("EO: patch-to-patch operations per image and layer")
        ax.set_ylabel("validation top-1 (%)")
        ax.set_title(f"{attention}: accuracy vs effective operations", fontsize=9)
        paths.append(save_figure(fig, os.path.join(out, "accuracy_vs_eo.png")))
    return paths


def plot_winft_gates(image, target, gates, grid, num_prefix_tokens: int, patches=None, mean=None, std=None):
    """Paper 000 Fig. 13: for a few patches, the window ground truth (``target``, the ``(N, N)`` bool mask
    of the image's windows) beside ``sum_l W_l`` (``gates`` ``(L, N, N)``, the per-layer gates of the
    same image), both drawn over the patch grid."""
    import torch

    from ..analysis.plots import default_patches, display_image
    from ..analysis.plots._common import _figure

    gh, gw = grid
    P = int(num_prefix_tokens)
    target = torch.as_tensor(target).bool()
    gates = torch.as_tensor(gates).float()
    if gates.dim() != 3 or gates.shape[1:] != target.shape or target.shape[0] != P + gh * gw:
        raise ValueError(f"gates must be (L, N, N) and target (N, N) with N = {P + gh * gw}, got "
                         f"{tuple(gates.shape)} and {tuple(target.shape)}")
    patches = list(default_patches((gh, gw)) if patches is None else patches)
    img = display_image(image, mean, std)
    fig, axes = _figure(2, len(patches) + 1, width=2.4, height=2.5)
    axes[0, 0].imshow(img)
    axes[0, 0].set_title("image", fontsize=8)
    axes[1, 0].axis("off")
    L = gates.shape[0]
    for c, p in enumerate(patches, start=1):
        gt = target[P + p, P:].reshape(gh, gw).numpy()
        w = gates[:, P + p, P:].sum(0).reshape(gh, gw).numpy()
        for r, (data, title, vmax) in enumerate(((gt, f"patch {p}: window", 1), (w, f"sum of W over {L} layers", L))):
            ax = axes[r, c]
            ax.imshow(np.asarray(data, dtype=np.float64), vmin=0, vmax=vmax, cmap="magma")
            ax.plot([p % gw], [p // gw], "c+", ms=8, mew=2)
            ax.set_title(title, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("WinfT gates against the window ground truth (paper 000 Fig. 13)", fontsize=9)
    return fig
