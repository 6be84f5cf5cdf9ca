"""Paper 003 (docs/math.md §9): head importance by pruning, k-hop attention strength, attention patterns,
and :func:`heads_report`, the body of ``vitpatch heads``.

The metrics live in :mod:`.pruning` (eq. 3–6, Fig. 4), :mod:`.strength` (eq. 7–8, MAD) and
:mod:`.patterns` (§5.4, the bit-packed pattern store); this module re-exports them. The report
streams a dataset once: per head it keeps running means and standard deviations over images
(:class:`RunningStats`, float64) and histograms of the strength entropy, appends every image's
values to memory-mapped ``.npy`` files and its binarised patch patterns, bit-packed, to another,
so its memory does not grow with the number of images::

    summary, figures = analysis.heads.heads_report(model, batches, out="runs/heads", modes=(1, 2, 3, 4, 5))
"""
from __future__ import annotations

import numbers
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .maps import attention_maps, model_layout
from .patterns import (NpyAppender, PackedPatterns, PatternAutoencoder, binarize_patterns, cls_patterns,
                       context_masks, encode_patterns, pack_patterns, packed_size, pattern_latents,
                       train_pattern_autoencoder, tsne, unpack_patterns)
from .pruning import (PRUNE_MODES, TOP_K, HeadImportance, _staged, check_modes, head_importance,
                      head_importance_loop, image_overview, js_divergence, prune_attention, region_mask)
from .strength import (LayerStrengths, khop_strength, layer_strengths, mean_attention_distance, ring_sizes,
                       strength_entropy)

__all__ = ["PRUNE_MODES", "TOP_K", "check_modes", "mean_attention_distance", "ring_sizes", "khop_strength",
           "strength_entropy", "layer_strengths", "LayerStrengths", "region_mask", "prune_attention",
           "HeadImportance", "head_importance", "head_importance_loop", "js_divergence", "image_overview", "tsne",
           "cls_patterns", "binarize_patterns", "PatternAutoencoder", "pattern_latents", "train_pattern_autoencoder",
           "encode_patterns", "context_masks", "NpyAppender", "packed_size", "pack_patterns", "unpack_patterns",
           "PackedPatterns", "RunningStats", "heads_report", "IMPORTANCE_METRICS"]

#: the per-head importance metrics the report streams: ``HeadImportance`` field names, each ``(L, h, modes)``
IMPORTANCE_METRICS = ("prob", "p_pruned", "jsd", "cls", "patch")


class RunningStats:
    """Per-element count, mean and standard deviation over a stream of batches, in float64 (docs/math.md §9).

    :meth:`update` takes ``(B, *shape)`` values and merges the batch's moments into the running
    ones (the pairwise form of Welford's algorithm, Chan, Golub & LeVeque 1979): with ``b`` values
    of mean ``m_b`` and sum of squared deviations ``M2_b``, ``n' = n + b``, ``d = m_b - m``,
    ``m' = m + d b / n'``, ``M2' = M2 + M2_b + d^2 n b / n'``. NaNs are skipped per element (their
    ``count`` is lower). ``std`` is the population standard deviation ``sqrt(M2 / n)`` (``ddof=0``,
    as ``np.std``); elements with no value have mean and std NaN. Memory: three arrays of ``shape``.
    """

    def __init__(self):
        self.shape: Optional[Tuple[int, ...]] = None
        self.count = self._mean = self._m2 = None

    def update(self, values) -> "RunningStats":
        x = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else \
            np.asarray(values, dtype=np.float64)
        if x.ndim < 1:
            raise ValueError(f"values must have shape (B, ...) with a batch dim, got {x.shape}")
        if self.shape is None:
            self.shape = x.shape[1:]
            self.count = np.zeros(self.shape, np.int64)
            self._mean = np.zeros(self.shape)
            self._m2 = np.zeros(self.shape)
        elif x.shape[1:] != self.shape:
            raise ValueError(f"values must have shape (B, *{self.shape}), got {x.shape}")
        ok = ~np.isnan(x)
        nb = ok.sum(0)
        mb = np.where(ok, x, 0.0).sum(0) / np.maximum(nb, 1)
        m2b = (np.where(ok, x - mb, 0.0) ** 2).sum(0)
        tot = self.count + nb
        d = mb - self._mean
        w = nb / np.maximum(tot, 1)
        self._mean = self._mean + d * w
        self._m2 = self._m2 + m2b + d * d * self.count * w
        self.count = tot
        return self

    def _need(self):
        if self.shape is None:
            raise ValueError("RunningStats has seen no values yet (call update first)")

    @property
    def mean(self) -> np.ndarray:
        self._need()
        return np.where(self.count > 0, self._mean, np.nan)

    def std(self, ddof: int = 0) -> np.ndarray:
        """``sqrt(M2 / (n - ddof))`` per element (NaN where ``n <= ddof``)."""
        self._need()
        return np.where(self.count > ddof, np.sqrt(self._m2 / np.maximum(self.count - ddof, 1)), np.nan)


class _Reservoir:
    """A uniform sample of at most ``k`` rows of a stream without replacement (Vitter's algorithm R), seeded."""

    def __init__(self, k: int, seed: int = 0):
        self.k, self.seen = int(k), 0
        self.rng = np.random.default_rng(seed)
        self.rows: Optional[np.ndarray] = None
        self.ids = np.full(self.k, -1, np.int64)

    def add(self, rows: np.ndarray, ids: np.ndarray) -> None:
        if self.k < 1 or len(rows) == 0:
            self.seen += len(rows)
            return
        if self.rows is None:
            self.rows = np.zeros((self.k, *rows.shape[1:]), rows.dtype)
        t = self.seen + np.arange(len(rows))
        slot = np.where(t < self.k, t, self.rng.integers(0, t + 1))
        for i in np.nonzero(slot < self.k)[0]:  # in stream order: a later row may replace an earlier one
            self.rows[slot[i]] = rows[i]
            self.ids[slot[i]] = ids[i]
        self.seen += len(rows)

    def sample(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(rows, ids)`` sorted by id."""
        n = min(self.k, self.seen)
        if n == 0 or self.rows is None:
            return np.zeros((0,)), np.zeros(0, np.int64)
        order = np.argsort(self.ids[:n])
        return self.rows[:n][order], self.ids[:n][order]


def _json(a):
    """Nested lists (NaN and inf as None: JSON has neither) of an array or scalar."""
    a = np.asarray(a)
    if a.dtype.kind != "f":
        return a.tolist()
    obj = a.astype(object)
    obj[~np.isfinite(a)] = None
    return obj.tolist()


def _check_int(value, name: str, lo: int, hi: Optional[int] = None, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo or \
            (hi is not None and value >= hi):
        rng = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {rng}, got {value!r}")
    return int(value)


def _importance_mode(modes: Tuple[int, ...]) -> int:
    """Index of the mode that ranks heads: full pruning (1) when run, else the first non-zero mode."""
    if 1 in modes:
        return modes.index(1)
    return next((i for i, m in enumerate(modes) if m != 0), 0)


def _unpack_batch(item, count: int):
    if isinstance(item, torch.Tensor):
        return None, item, None
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        names, x = item[0], item[1]
        return names, x, (item[2] if len(item) == 3 else None)
    raise ValueError(f"batches must yield (names, images, labels), (names, images) or an images tensor; batch "
                     f"at image {count} is a {type(item).__name__}")


@torch.no_grad()
def heads_report(model: nn.Module, batches: Iterable, *, out, modes: Sequence[int] = (1,), layer: Optional[int] = None,
                 head: Optional[int] = None, image: int = 0, ae_epochs: int = 30, top: float = 0.01,
                 tsne_max: int = 2000, class_names: Optional[Sequence[str]] = None, mean=None, std=None,
                 max_batch: int = 256, entropy_bins: int = 50, seed: int = 0, progress: bool = False
                 ) -> Tuple[dict, Dict[str, object]]:
    """Paper 003 over a stream of images: head importance, k-hop strength, patterns, and Fig. 1 / 7 (``vitpatch heads``).

    One pass over ``batches``, items ``(names, images, labels)`` with ``labels`` a LongTensor of true
    classes (eq. 3) or None to score against the model's unpruned prediction (also ``(names,
    images)`` or a bare images tensor). Per batch :func:`head_importance` (all ``modes``, top-5
    kept) and every layer's map give ``I_prob``, ``P_ij[y]``, ``I_JSD``, ``I_cls``, ``I_patch``,
    k-hop strength, its entropy and MAD per image; they update running means and stds per head
    (:class:`RunningStats`), entropy histograms per head, and are appended to ``out/per_image/*.npy``
    (memory-mapped, ``(images, ...)``). Binarised patch patterns (the top ``top`` of ``A[P:, P:]``)
    of every image, layer and head are appended bit-packed to ``out/patch_patterns.npy`` (row
    ``(image * L + layer) * h + head``), the autoencoder trains from that file for ``ae_epochs``
    epochs (0: skip it) and at most ``tsne_max`` of its rows (a seeded uniform sample, plus the
    selected image's) are laid out by t-SNE; CLS patterns are sampled the same way while streaming
    (reservoir). Image names are written to ``out/images.txt``. Nothing held grows with the number
    of images.

    The selected image is the ``image``-th of the stream; the selected head is ``(layer, head)``,
    by default the head of largest mean ``I_prob`` (full pruning, mode 1, when run) over all
    layers (or within ``layer`` when only ``layer`` is given; ``layer`` alone defaults to L // 2
    when only ``head`` is given).

    Returns ``(summary, figures)``: a JSON-ready dict (means and stds over images per head, the
    selected head and its top-5 predictions under pruning, the files written) and ``{file name:
    matplotlib Figure}``: ``head_importance.png`` (B1 / Fig. 7, every mode), ``b2_head_modes.png``,
    ``b3_top5.png``, ``mode_bars.png`` (more than one mode), ``top5_heads.png``, ``khop_strength.png``,
    ``entropy_layers.png`` (C1), ``c3_entropy_distribution.png``, ``tsne_images.png`` (Fig. 1A, at
    least 4 images), ``tsne_cls_patterns.png`` / ``d1_density_cls_patterns.png`` (with a CLS token),
    ``tsne_patch_patterns.png`` / ``d1_density_patch_patterns.png`` (``ae_epochs > 0``),
    ``context_masks.png`` (D2), ``attention_heatmap.png`` (D4, with a CLS token), ``d3_two_axes.png``,
    ``d5_threshold_histogram.png``. ``mean`` / ``std`` undo the input normalisation for display
    (default: the model's ``pretrained_cfg``).
    """
    from .plots import paper003 as plots
    from .plots._common import display_image

    modes = check_modes(modes)
    attn_mods = _staged(model)
    P, grid = model_layout(model)
    L, h = len(model.blocks), attn_mods[0].num_heads
    n = grid[0] * grid[1]
    layer = _check_int(layer, "layer", 0, L, allow_none=True)
    head = _check_int(head, "head", 0, h, allow_none=True)
    image = _check_int(image, "image", 0)
    ae_epochs = _check_int(ae_epochs, "ae_epochs", 0)
    tsne_max = _check_int(tsne_max, "tsne_max", 0)
    entropy_bins = _check_int(entropy_bins, "entropy_bins", 1)
    if isinstance(top, bool) or not isinstance(top, numbers.Real) or not 0 < float(top) <= 1:
        raise ValueError(f"top must be a fraction in (0, 1], got {top!r}")
    if out is None:
        raise ValueError("out must be a folder for the per-image files and the pattern store")
    out = os.fspath(out)
    per_dir = os.path.join(out, "per_image")
    os.makedirs(per_dir, exist_ok=True)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = cfg.get("mean") if mean is None else mean
    std = cfg.get("std") if std is None else std

    stats = {k: RunningStats() for k in (*IMPORTANCE_METRICS, "p", "strength", "entropy", "mad")}
    edges = np.linspace(0.0, 1.0, entropy_bins + 1)
    hist = np.zeros((L, h, entropy_bins), np.int64)
    writers: Dict[str, NpyAppender] = {}
    nb = packed_size(n)
    patterns_path = os.path.join(out, "patch_patterns.npy")
    pat_store = NpyAppender(patterns_path, np.uint8, (nb,))
    cls_res = _Reservoir(tsne_max, seed)
    count, correct, labelled, sel = 0, 0, None, None

    def write(name, arr, dtype):
        a = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
        if name not in writers:
            writers[name] = NpyAppender(os.path.join(per_dir, f"{name}.npy"), dtype, a.shape[1:])
        writers[name].append(a)

    names_file = open(os.path.join(out, "images.txt"), "w", encoding="utf-8")
    try:
        for item in batches:
            names, x, y = _unpack_batch(item, count)
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise ValueError(f"images must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
            B = x.shape[0]
            if labelled is None:
                labelled = y is not None
            elif labelled != (y is not None):
                raise ValueError("batches must give labels for every batch or for none (labels=None: predictions)")
            imp = head_importance(model, x, y, modes=modes, max_batch=max_batch)
            st, mads, packed, clsr = [], [], [], []
            patch_px = x.shape[-1] / grid[1]
            for A in attention_maps(model, x):
                st.append(khop_strength(A, grid, P).cpu())
                mads.append(mean_attention_distance(A, grid, patch_px, P).cpu())
                packed.append(pack_patterns(binarize_patterns(A, P, top)))  # (B, h, nb)
                if P >= 1:
                    clsr.append(cls_patterns(A, P).float().cpu().numpy())  # (B, h, N + n)
            S = torch.stack(st, 1)
            E = strength_entropy(S)
            MAD = torch.stack(mads, 1)
            for k in IMPORTANCE_METRICS:
                v = getattr(imp, k)
                stats[k].update(v)
                write(k, v, np.float32)
            stats["p"].update(imp.p)
            for k, v in (("strength", S), ("entropy", E), ("mad", MAD)):
                stats[k].update(v)
                write(k, v, np.float32)
            write("p", imp.p, np.float32)
            write("label", imp.labels, np.int64)
            write("pred", imp.pred, np.int64)
            write("top5_prob", imp.top5_prob, np.float32)
            write("top5_class", imp.top5_class, np.int32)
            write("top5_prob0", imp.top5_prob0, np.float32)
            write("top5_class0", imp.top5_class0, np.int32)
            correct += int((imp.labels == imp.pred).sum())
            e = E.numpy()
            ok = np.isfinite(e)
            b = np.clip(np.floor(np.where(ok, e, 0) * entropy_bins).astype(np.int64), 0, entropy_bins - 1)
            flat = (np.arange(L * h).reshape(1, L, h) * entropy_bins + b)[ok]
            hist += np.bincount(flat, minlength=L * h * entropy_bins).reshape(L, h, entropy_bins)
            pat_store.append(np.stack(packed, 1).reshape(B * L * h, nb))
            ids = count * L * h + np.arange(B * L * h)
            keep = np.ones(B * L * h, bool)
            i_sel = image - count
            if 0 <= i_sel < B:
                keep[i_sel * L * h:(i_sel + 1) * L * h] = False
                sel = {"name": str(names[i_sel]) if names is not None else f"#{image}", "x": x[i_sel:i_sel + 1].cpu(),
                       "label": int(imp.labels[i_sel]), "pred": int(imp.pred[i_sel]), "p": float(imp.p[i_sel]),
                       **{k: getattr(imp, k)[i_sel].numpy() for k in IMPORTANCE_METRICS},
                       **{k: getattr(imp, k)[i_sel].numpy() for k in ("top5_prob", "top5_class", "top5_prob0",
                                                                       "top5_class0")},
                       "entropy": e[i_sel], "strength": S[i_sel].numpy()}
                if P >= 1:
                    sel["cls_rows"] = np.stack(clsr, 1)[i_sel].reshape(L * h, -1)
            if P >= 1:
                rows = np.stack(clsr, 1).reshape(B * L * h, -1)
                cls_res.add(rows[keep], ids[keep])
            for i in range(B):
                names_file.write(f"{names[i] if names is not None else '#' + str(count + i)}\n")
            count += B
    finally:
        names_file.close()
        pat_store.close()
        for w in writers.values():
            w.close()
    if count == 0:
        raise ValueError("batches yielded no images")
    if sel is None:
        raise ValueError(f"image must be the index of one of the {count} images, got {image}")

    means = {k: stats[k].mean for k in stats}
    stds = {k: stats[k].std() for k in stats}
    mi = _importance_mode(modes)
    ranking = np.nan_to_num(means["prob"][..., mi], nan=-np.inf)
    chosen = "given"
    if head is None:
        if layer is None:
            layer, head = (int(t) for t in np.unravel_index(int(np.argmax(ranking)), (L, h)))
        else:
            head = int(np.argmax(ranking[layer]))
        chosen = f"largest mean I_prob (mode {modes[mi]})"
    elif layer is None:
        layer = L // 2

    # ------------------------------------------------------------------------ figures
    figs: Dict[str, object] = {}
    four = ("p_pruned", "jsd", "cls", "patch")
    figs["head_importance.png"] = plots.plot_importance_metrics(
        {k: means[k] for k in four}, {k: stds[k] for k in four}, modes, current={k: sel[k] for k in four},
        selected=(layer, head), unpruned=float(means["p"]))
    figs["b2_head_modes.png"] = plots.plot_head_modes(
        {k: means[k][layer, head] for k in four}, {k: stds[k][layer, head] for k in four}, modes,
        current={k: sel[k][layer, head] for k in four},
        title=f"layer {layer} head {head} per pruning mode, mean ± std over {count} images (paper 003 Fig. 1 B2)")
    label_kind = "true class" if labelled else "predicted class"
    figs["b3_top5.png"] = plots.plot_pruned_top5(
        sel["top5_prob"][layer, head], sel["top5_class"][layer, head], modes, label=sel["label"],
        class_names=class_names, unpruned=(sel["top5_prob0"], sel["top5_class0"]),
        title=f"image {image} ({os.path.basename(sel['name'])}): top-5 with layer {layer} head {head} pruned "
              f"({label_kind} in bold; paper 003 Fig. 1 B3)")
    if len(modes) > 1:
        figs["mode_bars.png"] = plots.plot_mode_bars(means["prob"], modes)
    figs["top5_heads.png"] = plots.plot_top_heads(means["prob"][..., mi], 5, f"I_prob (mode {modes[mi]})")
    figs["khop_strength.png"] = plots.plot_khop_strength(means["strength"][layer], layer)
    figs["entropy_layers.png"] = plots.plot_entropy_layers(means["entropy"])
    figs["c3_entropy_distribution.png"] = plots.plot_entropy_distribution(
        hist[layer, head], edges, current=float(sel["entropy"][layer, head]),
        title=f"layer {layer} head {head}: strength entropy over {int(hist[layer, head].sum())} images\n"
              f"(paper 003 Fig. 1 C3)")
    rng = np.random.default_rng(seed)
    layer_of = np.repeat(np.arange(L), h)
    tsne_info = {}
    if count >= 4 and tsne_max >= 4:
        img_ids = np.sort(rng.choice(count, min(count, tsne_max), replace=False))
        pp = np.load(os.path.join(per_dir, "p_pruned.npy"), mmap_mode="r")
        lab = np.load(os.path.join(per_dir, "label.npy"), mmap_mode="r")
        vec = np.asarray(pp[img_ids][..., mi], dtype=np.float64).reshape(len(img_ids), -1)
        figs["tsne_images.png"] = plots.plot_tsne(
            tsne(vec, seed=seed), np.asarray(lab[img_ids]),
            f"images by P_ij[y] over all heads, mode {modes[mi]} (paper 003 Fig. 1A)", label_kind)
        tsne_info["images"] = int(len(img_ids))
    own = np.arange(L * h)
    if P >= 1:
        rows, rids = cls_res.sample()
        feats = np.concatenate([rows.reshape(len(rids), -1), sel["cls_rows"]]) if len(rids) else sel["cls_rows"]
        if len(feats) >= 4:
            emb = tsne(feats, seed=seed)
            lay = np.concatenate([(rids // h) % L, layer_of])
            figs["tsne_cls_patterns.png"] = plots.plot_tsne(
                emb, lay, f"CLS patterns of {len(feats)} heads (paper 003 Fig. 6B, 12B)", "layer")
            figs["d1_density_cls_patterns.png"] = plots.plot_pattern_density(
                emb, emb[len(rids):], layer_of, layer * h + head,
                title=f"CLS patterns: density of {len(feats)} heads, selected image's heads on top\n"
                      f"(paper 003 Fig. 1 D1, 10A)")
            tsne_info["cls_patterns"] = int(len(feats))
    losses: List[float] = []
    if ae_epochs > 0:
        data = PackedPatterns(patterns_path, n)
        ae, losses = train_pattern_autoencoder(data, epochs=ae_epochs, seed=seed, progress=progress)
        sel_rows = image * L * h + own
        n_other = len(data) - L * h  # a sample of the other rows, drawn without listing them all
        pick = np.sort(rng.choice(n_other, min(n_other, tsne_max), replace=False)) if n_other else own[:0]
        pick = np.where(pick >= sel_rows[0], pick + L * h, pick)
        ids = np.concatenate([pick, sel_rows])
        latents = encode_patterns(ae, data, ids)
        data.close()
        if len(ids) >= 4:
            emb = tsne(latents, seed=seed)
            lay = (ids // h) % L
            figs["tsne_patch_patterns.png"] = plots.plot_tsne(
                emb, lay, f"patch patterns of {len(ids)} heads, AE latents (paper 003 Fig. 6C, 12A)", "layer")
            figs["d1_density_patch_patterns.png"] = plots.plot_pattern_density(
                emb, emb[len(pick):], layer_of, layer * h + head,
                title=f"patch patterns: density of {len(ids)} heads, selected image's heads on top\n"
                      f"(paper 003 Fig. 1 D1, 12A)")
            tsne_info["patch_patterns"] = int(len(ids))
    maps = list(attention_maps(model, sel["x"]))
    A = maps[layer]
    img = display_image(sel["x"][0], mean, std)
    cm = context_masks(A, grid, P, patch=n // 2 + grid[1] // 2)
    figs["context_masks.png"] = plots.plot_context_masks(img, {k: v[0, head] for k, v in cm.items()},
                                                         f"layer {layer}, head {head} (paper 003 Fig. 1 D2, 6D/E)")
    if P >= 1:
        figs["attention_heatmap.png"] = plots.plot_attention_heatmap(A[0, head], P, f"layer {layer}, head {head} "
                                                                                   f"(paper 003 Fig. 1 D4)")
    figs["d3_two_axes.png"] = plots.plot_two_axes(A[0, head], P, top)
    figs["d5_threshold_histogram.png"] = plots.plot_threshold_histogram(A[0, head], top)
    del maps, A

    def top5(prob, cls):
        d = {"prob": [float(v) for v in prob], "class": [int(c) for c in cls]}
        if class_names is not None:
            d["name"] = [str(class_names[int(c)]) if 0 <= int(c) < len(class_names) else None for c in cls]
        return d

    per_image = {k: {"file": os.path.join("per_image", f"{k}.npy"), "shape": [count, *w.row_shape],
                     "dtype": str(w.dtype)} for k, w in writers.items()}
    summary = {
        "grid": list(grid), "num_prefix_tokens": P, "layers": L, "heads": h, "images": count,
        "image_list": "images.txt", "label_source": "true" if labelled else "pred",
        "unpruned_accuracy": correct / count if labelled else None,
        "modes": list(modes), "mode_names": [PRUNE_MODES[m] for m in modes],
        "mean_over_images": {k: _json(means[k]) for k in IMPORTANCE_METRICS},
        "std_over_images": {k: _json(stds[k]) for k in IMPORTANCE_METRICS},
        "p_unpruned_mean": float(means["p"]), "p_unpruned_std": float(stds["p"]),
        "khop_strength_mean": _json(means["strength"]), "khop_strength_std": _json(stds["strength"]),
        "strength_entropy_mean": _json(means["entropy"]), "strength_entropy_std": _json(stds["entropy"]),
        "mad_px_mean": _json(means["mad"]), "mad_px_std": _json(stds["mad"]),
        "strength_entropy_histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
        "selected": {"image": image, "name": sel["name"], "layer": layer, "head": head, "chosen_by": chosen,
                     "label": sel["label"], "pred": sel["pred"], "p": sel["p"],
                     "top5_unpruned": top5(sel["top5_prob0"], sel["top5_class0"]),
                     "top5_pruned": {str(m): top5(sel["top5_prob"][layer, head, i], sel["top5_class"][layer, head, i])
                                     for i, m in enumerate(modes)}},
        "per_image": per_image,
        "patch_patterns": {"file": "patch_patterns.npy", "rows": count * L * h, "n": n, "bytes_per_row": nb,
                           "top": float(top), "order": "(image * layers + layer) * heads + head",
                           "packing": "np.packbits of the row-major n x n pattern"},
        "autoencoder": {"epochs": ae_epochs, "losses": losses},
        "tsne_points": tsne_info,
    }
    return summary, figs
