"""Cluster importance of a PaCa model by masking (paper 004 §3.5; docs/math.md §7).

For an image ``x`` with label ``y`` and a layer's cluster assignment ``C (n, M)`` (eq. 7, the
softmax over the ``n`` patch tokens), cluster ``m``'s heatmap is its column on the patch grid,
min-max normalised per image, ``H^m = (C[:, m] - min) / (max - min)``; the masked image is
``x~^m = x * (1 - up(H^m))`` (``up``: bilinear upsampling to the image size); the importance of
``m`` is the degradation from ``x`` to ``x~^m`` over the images the model classifies correctly:
the drop in accuracy, and the drop ``p_y(x) - p_y(x~^m)`` of the label's softmax probability
(the paper's figure of merit for classification)::

    from vitpatch.analysis.clusters import cluster_importance
    res = cluster_importance(model, images, labels)        # one ClusterImportance per chosen layer
    res[0].ranking[:6], res[0].acc_drop, res[0].prob_drop  # the six most important clusters

Works on any model with :class:`vitpatch.nn.PaCaAttention` layers: a registered ``paca_vit_*``
or a timm ViT built with ``attn_layer=PaCaAttention...`` (as ``vitpatch train --attention paca``
builds it). Images are streamed: :class:`ClusterImportanceAccumulator` keeps running sums per
cluster and a few example images, so memory does not grow with the number of images.
:func:`clusters_report` is the ``vitpatch clusters`` command: the sums, the ranking and the
figures (paper 004 Figs. 4-6).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["paca_layers", "cluster_heatmaps", "cluster_masks", "mask_images", "rank_clusters",
           "ClusterExample", "ClusterImportance", "ClusterImportanceAccumulator", "cluster_importance",
           "clusters_report", "load_paca_model", "RANKING_KEY", "UPSAMPLE_MODES"]

UPSAMPLE_MODES = ("bilinear", "nearest")
RANKING_KEY = ("acc_drop descending (the fraction of the counted images that masking the cluster makes "
               "misclassified), then prob_drop descending (the mean drop p_y(x) - p_y(x~) of the label's "
               "probability), then entropy ascending (the more concentrated cluster first, §3.5), then the index")


# ------------------------------------------------------------------------------------ pieces
def paca_layers(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every :class:`vitpatch.nn.PaCaAttention` of ``model``, in model order.

    The index of a layer in this list is what ``layer`` of :func:`cluster_importance` counts.
    """
    from ..nn import PaCaAttention

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PaCaAttention)]


def _choose_layers(model, layer) -> List[Tuple[int, str, torch.nn.Module]]:
    layers = paca_layers(model)
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no PaCaAttention layer: cluster importance needs a "
                         f"PaCa model (a registered paca_vit_*, or a ViT trained with --attention paca)")
    K = len(layers)
    if layer is None:
        idx = [K - 1]
    elif isinstance(layer, str):
        if layer != "all":
            raise ValueError(f"layer must be None (the last PaCa layer), 'all', or indices into the model's {K} "
                             f"PaCa layers, got {layer!r}")
        idx = list(range(K))
    else:
        seq = list(layer) if isinstance(layer, (list, tuple)) else [layer]
        if not seq:
            raise ValueError("layer must name at least one PaCa layer")
        idx = []
        for v in seq:
            if isinstance(v, bool) or not isinstance(v, int) or not -K <= v < K:
                raise ValueError(f"layer must hold indices in [-{K}, {K}) (the model's PaCa layers: "
                                 f"{[n for n, _ in layers]}), got {layer!r}")
            if v % K not in idx:
                idx.append(v % K)
    return [(i, layers[i][0], layers[i][1]) for i in idx]


def cluster_heatmaps(assignment: torch.Tensor, grid) -> torch.Tensor:
    """``H^m`` of §3.5: each cluster's assignment column on the patch grid, min-max normalised per image.

    ``assignment (B, n, M)`` (eq. 7: each column a distribution over the ``n`` tokens) →
    ``(B, M, gh, gw)`` in ``[0, 1]``: ``(C[:, m] - min_n C[:, m]) / (max_n C[:, m] - min_n C[:, m])``,
    minimum and maximum over the ``n`` positions of that image and cluster. A constant column
    (``max == min``) gives ``H^m = 0``: nothing of the image is masked.
    """
    from ..masks import check_grid

    if not isinstance(assignment, torch.Tensor) or assignment.dim() != 3:
        got = tuple(assignment.shape) if isinstance(assignment, torch.Tensor) else type(assignment).__name__
        raise ValueError(f"assignment must be a tensor (B, n, M), got {got}")
    gh, gw = check_grid(grid)
    B, n, M = assignment.shape
    if gh * gw != n:
        raise ValueError(f"grid {(gh, gw)} has {gh * gw} patches but assignment has n = {n}")
    a = assignment.detach().float()
    lo, hi = a.amin(1, keepdim=True), a.amax(1, keepdim=True)
    span = hi - lo
    h = torch.where(span > 0, (a - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(a))
    return h.transpose(1, 2).reshape(B, M, gh, gw)


def cluster_masks(heatmaps: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """``1 - up(H^m)`` of §3.5: ``heatmaps (B, M, gh, gw)`` upsampled to ``size = (H, W)`` → ``(B, M, H, W)``.

    ``mode``: ``"bilinear"`` (``align_corners=False``: a smooth mask) or ``"nearest"`` (every pixel
    of a patch takes its patch's value); both keep the values in ``[0, 1]``.
    """
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {mode!r}")
    if not isinstance(heatmaps, torch.Tensor) or heatmaps.dim() != 4:
        raise ValueError("heatmaps must be a tensor (B, M, gh, gw)")
    size = tuple(int(s) for s in size) if isinstance(size, (tuple, list, torch.Size)) else size
    if not isinstance(size, tuple) or len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (H, W), two positive integers, got {size!r}")
    kw = {"align_corners": False} if mode == "bilinear" else {}
    up = F.interpolate(heatmaps.float(), size=size, mode=mode, **kw)
    return 1.0 - up.clamp(0.0, 1.0)


def mask_images(x: torch.Tensor, masks: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """``x~ = x * mask`` (§3.5) for model inputs ``x (B, C, H, W)`` and ``masks (B, H, W)``.

    With the input normalisation ``mean``/``std`` (per channel) the mask multiplies the image
    itself, ``normalise(unnormalise(x) * mask)``: masked pixels go to black. Without them it
    multiplies ``x`` as given.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("x must be a tensor of images (B, C, H, W)")
    if tuple(masks.shape) != (x.shape[0], *x.shape[-2:]):
        raise ValueError(f"masks must have shape (B, H, W) = {(x.shape[0], *x.shape[-2:])}, got {tuple(masks.shape)}")
    if (mean is None) != (std is None):
        raise ValueError("mean and std must be given together (or neither)")
    m = masks.to(device=x.device, dtype=x.dtype).unsqueeze(1)
    if mean is None:
        return x * m
    mu = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    sd = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    if mu.shape[1] not in (1, x.shape[1]) or sd.shape[1] not in (1, x.shape[1]):
        raise ValueError(f"mean and std must have 1 or {x.shape[1]} entries, got {mu.shape[1]} and {sd.shape[1]}")
    return ((x * sd + mu) * m - mu) / sd


def _entropy(assignment: torch.Tensor) -> torch.Tensor:
    """``-sum_n C log C`` per image and cluster, ``(B, M)`` in nats (``0 log 0 = 0``)."""
    a = assignment.float()
    return -(a * torch.log(a.clamp_min(1e-30))).sum(1)


def rank_clusters(acc_drop=None, prob_drop=None, entropy=None) -> List[int]:
    """Cluster indices from most to least important (:data:`RANKING_KEY`).

    Lexicographic: ``acc_drop`` descending, ``prob_drop`` descending, ``entropy`` ascending, then
    the index; a key given as ``None`` is skipped, NaN sorts last. For one image pass its
    ``prob_drop`` and ``entropy`` (the paper's per-image figure of merit; equal merits go to the
    lower entropy, §3.5).
    """
    given = [(k, s) for k, s in ((acc_drop, -1.0), (prob_drop, -1.0), (entropy, 1.0)) if k is not None]
    if not given:
        raise ValueError("rank_clusters needs at least one of acc_drop, prob_drop, entropy")
    vals = [(torch.as_tensor(k, dtype=torch.float64).reshape(-1).tolist(), s) for k, s in given]
    M = len(vals[0][0])
    if any(len(v) != M for v, _ in vals):
        raise ValueError(f"acc_drop, prob_drop and entropy must have one value per cluster, got sizes "
                         f"{[len(v) for v, _ in vals]}")

    def key(m):
        out = []
        for v, s in vals:
            out += [math.isnan(v[m]), 0.0 if math.isnan(v[m]) else s * v[m]]
        return (*out, m)
    return sorted(range(M), key=key)


def _nan_none(values) -> list:
    return [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]


# ------------------------------------------------------------------------------------ results
@dataclass
class ClusterExample:
    """One image as a layer clustered it (for the figures): model input, label, heatmaps, merits."""

    name: Optional[str]
    image: torch.Tensor        # (C, H, W) the model input, on the CPU
    label: int                 # y: the given label, or the prediction
    pred: int                  # the prediction on x
    prob: float                # p_y(x)
    heatmaps: torch.Tensor     # (M, gh, gw) H^m, min-max normalised
    prob_drop: torch.Tensor    # (M,) p_y(x) - p_y(x~^m)
    wrong_after: torch.Tensor  # (M,) bool: x~^m is misclassified
    entropy: torch.Tensor      # (M,) entropy of C[:, m] (nats)
    counted: bool              # whether the image enters the importances (correct, or correct_only=False)

    @property
    def ranking(self) -> List[int]:
        """This image's clusters by its own figure of merit: prob_drop descending, then entropy ascending."""
        return rank_clusters(prob_drop=self.prob_drop, entropy=self.entropy)


@dataclass
class ClusterImportance:
    """Cluster importance of one PaCa layer over a set of images (§3.5).

    ``acc_drop[m]``: accuracy on the counted images minus accuracy on them with cluster ``m``
    masked (with ``correct_only``: the fraction that masking makes misclassified);
    ``prob_drop[m]`` / ``prob_drop_std[m]``: mean and standard deviation (over the counted
    images, ddof 0) of ``p_y(x) - p_y(x~^m)``; ``entropy[m]``: mean entropy of ``C[:, m]``;
    ``ranking``: all clusters by :data:`RANKING_KEY`. NaN where no image was counted.
    """

    layer: str
    index: int
    grid: Tuple[int, int]
    num_clusters: int
    images: int
    counted: int
    acc_drop: torch.Tensor
    prob_drop: torch.Tensor
    prob_drop_std: torch.Tensor
    entropy: torch.Tensor
    ranking: List[int]
    examples: List[ClusterExample] = field(default_factory=list)

    def to_dict(self, top: Optional[int] = None) -> dict:
        """JSON-ready (NaN as ``None``), with the ``top`` most important clusters spelled out and, per
        example image, its own ``top`` clusters by ``p_y(x) - p_y(x~^m)``."""
        top = len(self.ranking) if top is None else top
        acc, prob, sd, ent = (_nan_none(t.tolist()) for t in (self.acc_drop, self.prob_drop, self.prob_drop_std,
                                                                self.entropy))
        return {"layer": self.layer, "index": self.index, "grid": list(self.grid), "num_clusters": self.num_clusters,
                "images": self.images, "counted": self.counted, "ranking": list(self.ranking),
                "top": [{"cluster": m, "acc_drop": acc[m], "prob_drop": prob[m], "prob_drop_std": sd[m],
                         "entropy": ent[m]} for m in self.ranking[:top]],
                "acc_drop": acc, "prob_drop": prob, "prob_drop_std": sd, "entropy": ent,
                "examples": [{"name": e.name, "label": e.label, "pred": e.pred, "prob": e.prob, "counted": e.counted,
                              "top": [{"cluster": m, "prob_drop": float(e.prob_drop[m]),
                                       "wrong_after": bool(e.wrong_after[m])} for m in e.ranking[:top]]}
                             for e in self.examples]}


class _LayerSums:
    def __init__(self, M: int, grid):
        self.M, self.grid, self.counted = M, tuple(grid), 0
        self.flip = torch.zeros(M, dtype=torch.float64)
        self.dp = torch.zeros(M, dtype=torch.float64)
        self.dp2 = torch.zeros(M, dtype=torch.float64)
        self.ent = torch.zeros(M, dtype=torch.float64)
        self.examples: List[ClusterExample] = []
        self.others: List[ClusterExample] = []


class ClusterImportanceAccumulator:
    """Streaming cluster importance (§3.5): feed batches with :meth:`update`, read :meth:`result`.

    Per batch: one forward with ``store_assignment`` on the chosen layers (their assignment ``C``
    and patch grid), then, for every image and cluster ``m`` of every chosen layer, a forward of
    ``x~^m = x * (1 - up(H^m))``, in chunks of ``batch_size`` masked images. Kept: per layer and
    cluster the running sums (accuracy flips, ``dp``, ``dp^2``, entropy) over the counted images,
    and the first ``keep`` counted images (then, if short, uncounted ones) for the figures.

    Args:
        model: a model with :class:`vitpatch.nn.PaCaAttention` layers; run in eval mode (its mode
            is restored after each batch), without gradients.
        layer: ``None`` (the last PaCa layer), ``"all"``, or an index / indices into
            :func:`paca_layers` (negative from the last).
        batch_size: masked images per forward.
        mean, std: the input normalisation, so that the mask multiplies the image's pixels (masked
            pixels black); default the model's ``pretrained_cfg``. Pass ``mean=(0,) * C,
            std=(1,) * C`` to multiply the input tensor as given.
        upsample: ``"bilinear"`` or ``"nearest"`` (:func:`cluster_masks`).
        correct_only: count only the images the model classifies correctly (the paper); else all.
        keep: example images kept per layer for the figures.
    """

    def __init__(self, model: torch.nn.Module, layer=None, *, batch_size: int = 64, mean=None, std=None,
                 upsample: str = "bilinear", correct_only: bool = True, keep: int = 4):
        self.layers = _choose_layers(model, layer)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ValueError(f"keep must be a non-negative integer, got {keep!r}")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if mean is None and std is None:
            mean, std = cfg.get("mean"), cfg.get("std")
        if (mean is None) != (std is None):
            raise ValueError("mean and std must be given together (or neither)")
        self.model, self.batch_size, self.mean, self.std = model, batch_size, mean, std
        self.upsample, self.correct_only, self.keep = upsample, bool(correct_only), keep
        self.images = self.correct = 0
        self.sums: Dict[int, _LayerSums] = {}

    # -------------------------------------------------------------- forward passes
    def _device(self):
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _clean_pass(self, x):
        captured: Dict[int, tuple] = {}
        handles, flags = [], []

        def hook_for(i):
            def hook(module, args, kwargs, output):
                grid = kwargs.get("grid")
                if grid is None and len(args) > 3:
                    grid = args[3]
                if grid is None:
                    grid = module.grid
                captured[i] = (module.last_assignment, grid)
            return hook
        try:
            for i, _name, mod in self.layers:
                flags.append((mod, mod.store_assignment))
                mod.store_assignment = True
                handles.append(mod.register_forward_hook(hook_for(i), with_kwargs=True))
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
            for mod, flag in flags:
                mod.store_assignment = flag
        return logits, captured

    def _masked_probs(self, x, heat, y):
        """``p_y`` and predictions of ``x~^m`` for every image and cluster: two ``(B, M)`` tensors."""
        B, M = heat.shape[:2]
        pairs = [(b, m) for b in range(B) for m in range(M)]
        py = torch.empty(B, M, dtype=torch.float64)
        pred = torch.empty(B, M, dtype=torch.long)
        for s in range(0, len(pairs), self.batch_size):
            chunk = pairs[s:s + self.batch_size]
            bi = torch.tensor([b for b, _ in chunk], device=x.device)
            mi = torch.tensor([m for _, m in chunk], device=x.device)
            masks = cluster_masks(heat[bi, mi].unsqueeze(1), x.shape[-2:], self.upsample)[:, 0]
            out = self.model(mask_images(x[bi], masks, self.mean, self.std)).float()
            p = torch.softmax(out, -1)
            py[bi.cpu(), mi.cpu()] = p.gather(1, y[bi].unsqueeze(1))[:, 0].double().cpu()
            pred[bi.cpu(), mi.cpu()] = p.argmax(-1).cpu()
        return py, pred

    @staticmethod
    def _grid(grid, n: int, name: str):
        if grid is None:
            s = math.isqrt(n)
            if s * s != n:
                raise ValueError(f"cannot tell the patch grid of layer {name} ({n} tokens): call "
                                 f"vitpatch.nn.set_token_layout(model)")
            return s, s
        return int(grid[0]), int(grid[1])

    def update(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
               names: Optional[Sequence[str]] = None) -> None:
        """Add a batch: ``images (B, C, H, W)`` model inputs, ``labels (B,)`` class indices or ``None``
        (then the prediction on the unmasked image is the label), ``names`` for the examples."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a tensor (B, C, H, W), got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        B = images.shape[0]
        if names is not None and len(names) != B:
            raise ValueError(f"names must have one entry per image ({B}), got {len(names)}")
        dev = self._device()
        x = images.to(dev)
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                logits, captured = self._clean_pass(x)
                num_classes = logits.shape[-1]
                p = torch.softmax(logits.float(), -1)
                pred = p.argmax(-1)
                if labels is None:
                    y = pred
                else:
                    y = torch.as_tensor(labels).to(dev).long().reshape(-1)
                    if y.numel() != B:
                        raise ValueError(f"labels must have one entry per image ({B}), got {y.numel()}")
                    if B and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                        raise ValueError(f"labels must be class indices in [0, {num_classes}), got "
                                         f"{y.min().item()}..{y.max().item()}")
                correct = (pred == y).cpu()
                p_y = p.gather(1, y.unsqueeze(1))[:, 0].double().cpu()
                counted = correct if self.correct_only else torch.ones(B, dtype=torch.bool)
                for i, name, _mod in self.layers:
                    if i not in captured or captured[i][0] is None:
                        raise RuntimeError(f"PaCa layer {name} did not run in the model's forward")
                    A, grid = captured[i]
                    grid = self._grid(grid, A.shape[1], name)
                    heat = cluster_heatmaps(A, grid).to(dev)  # (B, M, gh, gw)
                    ent = _entropy(A).double().cpu()
                    pm, predm = self._masked_probs(x, heat, y)
                    dp = p_y[:, None] - pm
                    wrong = predm != y.cpu()[:, None]
                    st = self.sums.setdefault(i, _LayerSums(A.shape[2], grid))
                    if st.M != A.shape[2] or st.grid != tuple(grid):
                        raise ValueError(f"layer {name}: the images' patch grid changed from {st.grid} to {grid} "
                                         f"(feed images of one size)")
                    c = counted
                    st.counted += int(c.sum())
                    st.flip += (correct[c].double()[:, None] - (~wrong[c]).double()).sum(0)
                    st.dp += dp[c].sum(0)
                    st.dp2 += (dp[c] ** 2).sum(0)
                    st.ent += ent[c].sum(0)
                    for b in range(B):
                        pool = st.examples if bool(c[b]) else st.others
                        if len(pool) < self.keep:
                            pool.append(ClusterExample(
                                None if names is None else names[b], images[b].detach().cpu(), int(y[b]),
                                int(pred[b]), float(p_y[b]), heat[b].cpu(), dp[b].clone(), wrong[b].clone(),
                                ent[b].clone(), bool(c[b])))
        finally:
            self.model.train(was)
        self.images += B
        self.correct += int(correct.sum())

    def result(self) -> List[ClusterImportance]:
        """One :class:`ClusterImportance` per chosen layer (in the order asked)."""
        if not self.sums:
            raise ValueError("no images: call update() with at least one batch")
        out = []
        for i, name, _mod in self.layers:
            st = self.sums[i]
            n = st.counted
            nan = torch.full((st.M,), float("nan"), dtype=torch.float64)
            acc, dp, ent = (nan.clone(), nan.clone(), nan.clone()) if n == 0 else (st.flip / n, st.dp / n, st.ent / n)
            sd = nan.clone() if n == 0 else (st.dp2 / n - dp ** 2).clamp_min(0).sqrt()
            examples = (st.examples + st.others)[:self.keep]
            out.append(ClusterImportance(name, i, st.grid, st.M, self.images, n, acc, dp, sd, ent,
                                         rank_clusters(acc, dp, ent), examples))
        return out


def _batches(images, labels, batch_size: int):
    """``(names, x, y)`` from a tensor (chunks of ``batch_size``) or an iterable of batches."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be a tensor (N, C, H, W), got shape {tuple(images.shape)}")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.dim() != 1 or labels.numel() != images.shape[0]:
                raise ValueError(f"labels must be a 1-D tensor of {images.shape[0]} class indices, got shape "
                                 f"{tuple(labels.shape)}")
        for s in range(0, images.shape[0], batch_size):
            yield None, images[s:s + batch_size], None if labels is None else labels[s:s + batch_size]
        return
    if labels is not None:
        raise ValueError("labels must be None when images is an iterable of batches (give (x, y) batches)")
    for item in images:
        if isinstance(item, torch.Tensor):
            yield None, item, None
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            yield None, item[0], item[1]
        elif isinstance(item, (tuple, list)) and len(item) == 3:
            yield item[0], item[1], item[2]
        else:
            raise ValueError("images must be a tensor (N, C, H, W) or an iterable of x, (x, y) or (names, x, y)")


def cluster_importance(model: torch.nn.Module, images, labels=None, *, layer=None, batch_size: int = 64,
                       progress: bool = True, mean=None, std=None, upsample: str = "bilinear",
                       correct_only: bool = True, keep: int = 4) -> List[ClusterImportance]:
    """Importance of every cluster of a PaCa model's layer(s) by masking (paper 004 §3.5).

    For every image ``x`` (label ``y``), chosen layer and cluster ``m``: ``H^m`` the min-max
    normalised assignment column on the patch grid (:func:`cluster_heatmaps`), ``x~^m = x * (1 -
    up(H^m))`` (:func:`cluster_masks`, :func:`mask_images`), and the degradation from ``x`` to
    ``x~^m``: the accuracy drop and ``p_y(x) - p_y(x~^m)``, averaged over the images the model
    classifies correctly (``correct_only``, as the paper: "we focus on images for which the
    trained model has correct prediction"). Clusters are ranked by the accuracy drop, then the
    probability drop, then the lower entropy (:data:`RANKING_KEY`).

    Args:
        model: a model with :class:`vitpatch.nn.PaCaAttention` layers.
        images: model inputs ``(N, C, H, W)`` (processed in chunks of ``batch_size``) or an iterable
            of batches ``x``, ``(x, y)`` or ``(names, x, y)`` (streamed; ``labels`` then ``None``).
        labels: ``(N,)`` class indices, or ``None``: the prediction on the unmasked image.
        layer, batch_size, mean, std, upsample, correct_only, keep: see
            :class:`ClusterImportanceAccumulator`.
        progress: a tqdm bar over images.

    Returns one :class:`ClusterImportance` per chosen layer.
    """
    acc = ClusterImportanceAccumulator(model, layer, batch_size=batch_size, mean=mean, std=std, upsample=upsample,
                                       correct_only=correct_only, keep=keep)
    from tqdm.auto import tqdm

    total = images.shape[0] if isinstance(images, torch.Tensor) else None
    with tqdm(total=total, desc="clusters", unit="img", disable=not progress) as bar:
        for names, x, y in _batches(images, labels, batch_size):
            acc.update(x, y, names)
            bar.update(x.shape[0])
    return acc.result()


# ------------------------------------------------------------------------------------ report
def clusters_report(model: torch.nn.Module, batches: Iterable, *, layer=None, top: int = 6, keep: int = 4,
                    batch_size: int = 64, mean=None, std=None, upsample: str = "bilinear", correct_only: bool = True,
                    figures: bool = True, progress: bool = False):
    """``vitpatch clusters``: cluster importance (§3.5) over a stream of images, and its figures.

    Args:
        model: a model with :class:`vitpatch.nn.PaCaAttention` layers.
        batches: iterable of ``(names, images, labels)`` (or ``(images, labels)``): ``labels``
            ``(B,)`` class indices or ``None`` (the unmasked prediction is the label).
        layer, batch_size, mean, std, upsample, correct_only, keep: see
            :class:`ClusterImportanceAccumulator`.
        top: clusters drawn per image and spelled out in the summary (paper 004 Fig. 6: 6).
        figures: build the figures.
        progress: a tqdm bar over batches.

    Returns ``(summary, figures)``: ``summary`` a JSON-ready dict (per layer: importances per
    cluster, ranking, the ``top`` clusters; the images used, their count and accuracy; the
    masking rule and ranking key); ``figures`` maps file names to figures, for each chosen
    PaCa layer ``k`` (its index among the model's PaCa layers):

    - ``clusters_importance_layer{k}.png``: accuracy drop and probability drop (mean +- std over
      images) of the ``max(top, 16)`` most important clusters, ranked;
    - ``clusters_top_layer{k}.png``: the layer's ``top`` most important clusters (over all images)
      as heatmaps ``H^m`` over each example image, their importance in the titles (Fig. 4 and
      Fig. 6 row 1 style: a model's clusters over its input);
    - ``clusters_per_image_layer{k}.png``: each example image's own ``top`` clusters by
      ``p_y(x) - p_y(x~^m)`` (Fig. 5/6: "top-k clusters ... using the method of Sec. 3.5"), and the
      image masked by its most important cluster, ``x~^m``.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    acc = ClusterImportanceAccumulator(model, layer, batch_size=batch_size, mean=mean, std=std, upsample=upsample,
                                       correct_only=correct_only, keep=keep)
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="clusters", unit="batch")
    names: List[str] = []
    for item in it:
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise ValueError("batches must yield (names, images, labels) or (images, labels)")
        bnames, x, y = (None, *item) if len(item) == 2 else item
        if bnames is not None:
            bnames = [str(n) for n in bnames]
            names += bnames
        acc.update(x, y, bnames)
    results = acc.result()
    summary = {
        "paper": "004 §3.5 (docs/math.md §7)",
        "masking": {"rule": "x~ = x * (1 - up(H^m)), H^m the min-max normalised assignment column (eq. 7) of "
                            "cluster m on the patch grid, per image",
                    "upsample": upsample, "space": "image pixels" if acc.mean is not None else "model input",
                    "mean": None if acc.mean is None else list(acc.mean),
                    "std": None if acc.std is None else list(acc.std)},
        "ranking_key": RANKING_KEY, "correct_only": acc.correct_only,
        "num_images": acc.images, "correct": acc.correct, "accuracy": acc.correct / max(acc.images, 1),
        "images": names,
        "layers": [r.to_dict(top) for r in results],
    }
    figs = _figures(results, top, acc.mean, acc.std, upsample) if figures else {}
    return summary, figs


def _figures(results: List[ClusterImportance], top: int, mean, std, upsample: str) -> dict:
    from .plots._common import display_image
    from .plots.paper004 import plot_cluster_importance, plot_top_clusters

    figs = {}
    for r in results:
        k = r.index
        figs[f"clusters_importance_layer{k}.png"] = plot_cluster_importance(
            r.acc_drop, r.prob_drop, r.prob_drop_std, r.ranking, top=max(top, 16),
            title=f"cluster importance, PaCa layer {k} ({r.layer}), {r.counted} of {r.images} images counted")
        if not r.examples:
            continue
        imgs = [display_image(e.image, mean, std) for e in r.examples]
        heat = [e.heatmaps for e in r.examples]
        rows = [f"{_short(e.name)}y={e.label} pred={e.pred}\np_y={e.prob:.2f}" for e in r.examples]
        shared = r.ranking[:top]

        def fmt(v):
            return "nan" if not math.isfinite(float(v)) else f"{float(v):.2f}"
        titles = [[f"c{m}: dAcc {fmt(r.acc_drop[m])}, dp {fmt(r.prob_drop[m])}" if i == 0 else
                   f"c{m}: dp {fmt(e.prob_drop[m])}" for m in shared] for i, e in enumerate(r.examples)]
        figs[f"clusters_top_layer{k}.png"] = plot_top_clusters(
            imgs, heat, [shared] * len(imgs), titles, rows,
            suptitle=f"PaCa layer {k} ({r.layer}): the {len(shared)} most important clusters (§3.5, ranked by "
                     f"accuracy drop over {r.counted} images), H^m over each image")
        own = [e.ranking[:top] for e in r.examples]
        titles = [[f"c{m}: dp {fmt(e.prob_drop[m])}"
                   f"{' -> wrong' if e.pred == e.label and bool(e.wrong_after[m]) else ''}" for m in o]
                  for e, o in zip(r.examples, own)]
        figs[f"clusters_per_image_layer{k}.png"] = plot_top_clusters(
            imgs, heat, own, titles, rows, masked=[o[0] for o in own], upsample=upsample,
            suptitle=f"PaCa layer {k} ({r.layer}): each image's top clusters by p_y(x) - p_y(x~) (§3.5); last: "
                     f"x~ = x (1 - H^m) for its top cluster")
    return figs


def _short(name: Optional[str]) -> str:
    if not name:
        return ""
    parts = str(name).replace(os.sep, "/").split("/")
    return "/".join(parts[-2:]) + "\n"


# ------------------------------------------------------------------------------------ loading
def load_paca_model(checkpoint, model_name: Optional[str] = None, *, img_size: Optional[int] = None,
                    device="cpu"):
    """A trained PaCa model for :func:`clusters_report`, its evaluation transform and data config.

    ``model_name`` given: a registered timm model (e.g. ``paca_vit_b0``) with the weights of
    ``checkpoint``, by :func:`vitpatch.analysis.pipeline.load_model`. ``model_name`` omitted: the
    model of a ``vitpatch train`` run, rebuilt from the ``train_config.json`` beside the checkpoint
    (:func:`vitpatch.train.engine.build_model`: e.g. a digits ViT with PaCa attention), with the
    checkpoint's ``state_dict``. The transform is timm's evaluation transform at the run's input
    size (``img_size`` overrides it).

    Returns ``(model, weights, transform, data_config)``: the model in eval mode on ``device``,
    ``weights`` a description (file name, start of its SHA-256, the run's model and attention).
    """
    from timm.data import create_transform, resolve_data_config

    if checkpoint is None:
        raise ValueError("checkpoint is required: the clusters of a model with random weights mean nothing")
    checkpoint = os.fspath(checkpoint)
    if not os.path.isfile(checkpoint):
        raise ValueError(f"checkpoint {checkpoint!r} is not a file")
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1):
        raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
    from .pipeline import sha256_file

    digest = f"sha256 {sha256_file(checkpoint)[:16]}"
    if model_name is not None:
        from .pipeline import load_model

        pyramid = str(model_name).startswith("paca_vit")  # no img_size argument: the transform sets the size
        model, weights = load_model(model_name, checkpoint, None if pyramid else img_size, device)
        size = img_size if pyramid else None
    else:
        from dataclasses import replace

        from ..train.config import CONFIG_FILE, load_run_config
        from ..train.engine import build_model

        path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), CONFIG_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"no --model given and no {CONFIG_FILE} beside checkpoint {checkpoint!r}: pass --model "
                             f"NAME (a registered paca_vit_*), or a checkpoint written by `vitpatch train`")
        cfg = load_run_config(path)
        ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = ck.get("state_dict", ck) if isinstance(ck, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"checkpoint {checkpoint!r} holds no state dict")
        head = state.get("head.weight", state.get("head.fc.weight"))
        if isinstance(head, torch.Tensor) and head.dim() == 2:
            num_classes = int(head.shape[0])
        else:
            with open(path, encoding="utf-8") as f:
                num_classes = json.load(f).get("num_classes")
            if not isinstance(num_classes, int):
                raise ValueError(f"cannot tell the number of classes of checkpoint {checkpoint!r}")
        model = build_model(replace(cfg, checkpoint=None), num_classes)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {checkpoint!r} does not fit {cfg.model} ({cfg.attention}, from {path}): "
                             f"{exc}") from None
        model = model.eval().to(device)
        weights = f"checkpoint {os.path.basename(checkpoint)} ({digest}), {cfg.model} with --attention {cfg.attention}"
        size = img_size if img_size is not None else cfg.img_size
    if not paca_layers(model):
        raise ValueError(f"{type(model).__name__} from {checkpoint!r} has no PaCaAttention layer: vitpatch clusters "
                         f"needs a PaCa model (paca_vit_*, or a run trained with --attention paca)")
    if size is None:
        own = getattr(getattr(model, "patch_embed", None), "img_size", None)
        size = own if own is None or isinstance(own, int) else tuple(own)
    args = {}
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        args["input_size"] = (3, int(h), int(w))
    data_cfg = resolve_data_config(args, model=model)
    return model, weights, create_transform(**data_cfg, is_training=False), data_cfg
