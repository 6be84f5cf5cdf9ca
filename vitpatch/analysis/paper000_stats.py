"""Paper 000's statistics over many images, inner / outer object patch pairs per layer (Fig. 2), and
the one-image report of ``vitpatch analyze`` (Fig. 3 a, b, 4, 5, 6, 11, 12: :func:`analyze_report`).

Paper 000 §3.2: "we randomly sampled target patch A (in red color) inner object for analysis
the patch interactions between the inner-object patch B (in blue color) and outer-object patch
C (in orange color) ... although the irrelevance patch pair (inner-outer object patch pair)
consistently has low response, the patch-to-patch attention score between relevance pair varies
a lot across different layer, as the statistical results shown in Fig. 2." What is computed
(docs/math.md §2, *Fig. 2*):

- the object: a bool mask over the ``n`` patches per image, from a segmentation mask file
  (:class:`ObjectMasks`, a patch is inner when at least ``threshold`` of its pixels are object)
  or a fixed box of the input (:func:`box_objects`, default the central half);
- per layer ``l`` and image, the head-mean post-softmax score ``a_l(p, i) = mean_h A_l[h, p, i]``
  over the patch block (prefix rows and columns dropped, not renormalised, as in eq. 2), read
  from the target's row (``p`` the inner query, ``i`` the key);
- the *inner* pairs are every ordered ``(A, B)`` of two different inner patches, the *outer*
  pairs every ``(A, C)`` with ``A`` inner and ``C`` outer; every pair is used, which is the
  expectation of the paper's random sampling. Per image the mean score over its pairs; over
  images the mean and (population) std of that per-image mean per layer, the pooled mean and std
  over all pairs, and the mean over images of the std across layers (the paper's "varies a lot
  across different layers").

:class:`InnerOuterStats` keeps running sums per layer (float64, ``O(L)`` memory): no layer's
map outlives its update, and no image's, whatever the number of images.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Callable, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..masks import check_grid
from .interactions import _check_layer, _layers, attention_rows
from .maps import attention_maps, check_prefix, model_layout

__all__ = ["InnerOuterStats", "inner_outer_statistics", "box_objects", "mask_objects", "ObjectMasks",
           "sample_pair", "inner_outer_report", "run_entry", "analyze_report", "PAPER_BETAS"]

KINDS = ("inner", "outer")
#: the beta values of paper 000 Fig. 6
PAPER_BETAS = (0.05, 0.07, 0.10, 0.15, 0.20, 0.50)


def box_objects(grid, box: Sequence[float] = (0.25, 0.25, 0.75, 0.75)) -> torch.Tensor:
    """Bool ``(n,)``: the patches whose centre lies in ``box = (x0, y0, x1, y1)``, fractions of the
    input's width and height, half-open ``[x0, x1) x [y0, y1)``.

    The default (the central half of each side) is a stand-in object for object-centric,
    centre-cropped images (ImageNet) when no segmentation is at hand (paper 000 Fig. 2 picks its
    inner and outer patches by eye).
    """
    gh, gw = check_grid(grid)
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must be four fractions (x0, y0, x1, y1), got {box!r}") from None
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box!r}")
    cx = (torch.arange(gw, dtype=torch.float64) + 0.5) / gw
    cy = (torch.arange(gh, dtype=torch.float64) + 0.5) / gh
    inside = ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]
    return inside.reshape(-1)


def mask_objects(masks, grid, threshold: float = 0.5) -> torch.Tensor:
    """Bool ``(B, n)`` (``(n,)`` for one ``(H, W)`` mask): patch ``p`` is inner when the mean of
    ``masks`` over its cell is at least ``threshold``.

    ``masks``: ``(B, H, W)`` or ``(H, W)``, bool or floats in ``[0, 1]`` (object = 1), on the
    model input's pixels. Cells are ``H / gh`` by ``W / gw`` (adaptive average pooling when they
    do not divide evenly).
    """
    if not isinstance(masks, torch.Tensor):
        masks = torch.as_tensor(np.asarray(masks))
    if masks.dim() not in (2, 3):
        raise ValueError(f"masks must have shape (B, H, W) or (H, W), got {tuple(masks.shape)}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 < float(threshold) <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    gh, gw = check_grid(grid)
    m = masks if masks.dim() == 3 else masks.unsqueeze(0)
    if m.shape[-2] < gh or m.shape[-1] < gw:
        raise ValueError(f"masks of {tuple(m.shape[-2:])} pixels are smaller than the grid {(gh, gw)}")
    m = m.to(torch.float64)
    if m.numel() and (float(m.min()) < 0 or float(m.max()) > 1):
        raise ValueError("masks must be bool or floats in [0, 1] (object = 1)")
    frac = torch.nn.functional.adaptive_avg_pool2d(m.unsqueeze(1), (gh, gw)).reshape(m.shape[0], gh * gw)
    out = frac >= float(threshold) - 1e-12
    return out if masks.dim() == 3 else out[0]


def spatial_transform(transform) -> Callable:
    """The geometric steps of an eval transform (those before its first ``ToTensor``): what the
    image went through, applied to a mask image so that it lands on the same pixels."""
    steps = getattr(transform, "transforms", None)
    if steps is None:
        raise ValueError("transform must be a torchvision Compose (timm's eval transform)")
    kept = []
    for t in steps:
        if "ToTensor" in type(t).__name__:
            break
        kept.append(t)

    def apply(img):
        for t in kept:
            img = t(img)
        return img
    return apply


class ObjectMasks:
    """Object patches of each image from segmentation mask files (paper 000 Fig. 2's inner object).

    The mask of image ``ROOT/rel/name.ext`` (``ROOT`` one of ``roots``; an image outside every
    root is matched by its file name) is ``mask_dir/rel/name.*`` with any image extension, the
    same size as the image; its non-zero pixels are the object. It goes through the geometric
    part of ``transform`` (resize, crop: :func:`spatial_transform`), so it covers the pixels the
    model sees, and :func:`mask_objects` turns it into patches. ``masks(names, x)`` returns bool
    ``(B, n)`` for the image paths ``names``.
    """

    def __init__(self, mask_dir, transform, grid, *, roots: Sequence = (), threshold: float = 0.5):
        mask_dir = os.fspath(mask_dir)
        if not os.path.isdir(mask_dir):
            raise ValueError(f"mask_dir {mask_dir!r} is not a folder")
        self.mask_dir = mask_dir
        self.grid = check_grid(grid)
        self.roots = [os.path.abspath(os.fspath(r)) for r in roots]
        mask_objects(torch.zeros(self.grid), self.grid, threshold)  # validates threshold
        self.threshold = float(threshold)
        self._spatial = spatial_transform(transform)

    def path(self, image) -> str:
        """The mask file of ``image`` (``ValueError`` naming the places looked at when there is none)."""
        from .pipeline import IMAGE_EXTENSIONS

        full = os.path.abspath(os.fspath(image))
        rel = os.path.basename(full)
        for root in sorted(self.roots, key=len, reverse=True):
            if full.startswith(root.rstrip(os.sep) + os.sep):
                rel = os.path.relpath(full, root)
                break
        stem = os.path.join(self.mask_dir, os.path.splitext(rel)[0])
        for ext in (".png",) + tuple(e for e in IMAGE_EXTENSIONS if e != ".png"):
            for cand in (stem + ext, stem + ext.upper()):
                if os.path.isfile(cand):
                    return cand
        raise ValueError(f"object mask for {image!r} not found: looked for {stem}.png (or another image "
                         f"extension) under mask_dir {self.mask_dir!r}")

    def mask(self, image) -> torch.Tensor:
        """Float ``(H, W)`` in ``[0, 1]`` on the model input's pixels."""
        from PIL import Image

        path = self.path(image)
        with Image.open(os.fspath(image)) as im:
            size = im.size
        with Image.open(path) as m:
            if m.size != size:
                raise ValueError(f"object mask {path!r} is {m.size[0]}x{m.size[1]} pixels but its image {image!r} "
                                 f"is {size[0]}x{size[1]}")
            binary = np.asarray(m.convert("L")) > 0
        geo = self._spatial(Image.fromarray((binary * 255).astype(np.uint8), mode="L"))
        return torch.from_numpy(np.asarray(geo, dtype=np.float64) / 255.0)

    def __call__(self, names: Sequence, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        masks = torch.stack([self.mask(f) for f in names])
        if x is not None and tuple(masks.shape[-2:]) != tuple(x.shape[-2:]):
            raise ValueError(f"object masks come out {tuple(masks.shape[-2:])} but the images are "
                             f"{tuple(x.shape[-2:])}: pass the images' own transform")
        return mask_objects(masks, self.grid, self.threshold)


def _check_inner(inner, B: int, n: int) -> torch.Tensor:
    if not isinstance(inner, torch.Tensor):
        raise TypeError(f"inner must be a bool torch.Tensor, got {type(inner).__name__}")
    if inner.dtype != torch.bool:
        raise TypeError(f"inner must be a bool tensor, got dtype {inner.dtype}")
    if inner.dim() == 1:
        inner = inner.unsqueeze(0).expand(B, -1)
    if tuple(inner.shape) != (B, n):
        raise ValueError(f"inner must have shape ({B}, {n}) (or ({n},)) for maps of batch {B} and n = {n} "
                         f"patches, got {tuple(inner.shape)}")
    return inner


def _moments(acc) -> Tuple[np.ndarray, np.ndarray]:
    """``(mean, population std)`` per layer from running ``(count, sum, sum of squares)``; NaN where the count is 0."""
    c, s, q = acc
    n = np.maximum(c, 1)
    mu = s / n
    return np.where(c > 0, mu, np.nan), np.where(c > 0, np.sqrt(np.maximum(q / n - mu * mu, 0)), np.nan)


class InnerOuterStats:
    """Running inner / outer pair statistics per layer, paper 000 Fig. 2 (module docstring).

    ``update(maps, inner)`` takes one batch: ``maps`` the layers ``(B, h, N, N)`` as an iterable
    (consumed once, e.g. :func:`vitpatch.analysis.attention_maps`) or a tensor ``(L, B, h, N, N)``,
    and ``inner`` bool ``(B, n)`` (or ``(n,)`` for every image), True on the object's patches.
    An image with fewer than two inner patches has no inner pair and one with no outer patch
    no outer pair; it counts only for the kind it has. Read the results with :meth:`mean`,
    :meth:`std`, :meth:`pair_mean`, :meth:`pair_std`, :meth:`layer_std` (NumPy ``(L,)`` or a
    float, NaN where no image contributed) and :meth:`summary`.
    """

    def __init__(self, num_prefix_tokens: int = 0):
        self.num_prefix_tokens = check_prefix(num_prefix_tokens)
        self.num_layers: Optional[int] = None
        self.num_images = 0
        # per kind: float64 rows (images, sum, sum of squares) of the per-image means, per layer;
        # (pairs, sum, sum of squares) of the pair scores, per layer; (images, sum) of the std across layers
        self._img = {k: None for k in KINDS}
        self._pair = {k: None for k in KINDS}
        self._across = {k: np.zeros(2) for k in KINDS}

    def update(self, maps: Union[torch.Tensor, Iterable[torch.Tensor]], inner: torch.Tensor) -> None:
        P = self.num_prefix_tokens
        layers = _layers(maps)
        per_layer = {k: [] for k in KINDS}  # per layer: (per-image mean (B,), count (B,), sum (B,), sumsq (B,))
        shape0, m = None, None
        try:
            for layer in layers:
                _check_layer(layer, P, shape0, len(per_layer["inner"]))
                shape0 = tuple(layer.shape)
                B, n = layer.shape[0], layer.shape[-1] - P
                if m is None:
                    inner = _check_inner(inner, B, n).to(layer.device)
                    m = inner.to(torch.float64)
                    k = m.sum(1)
                    counts = {"inner": k * (k - 1), "outer": k * (n - k)}
                a = layer[:, :, P:, P:].to(torch.float64).mean(1)  # (B, n, n): head-mean score, query row
                d = a.diagonal(dim1=1, dim2=2)  # (B, n)
                a2 = a.square()
                sums = {"inner": torch.einsum("bi,bij,bj->b", m, a, m) - (m * d).sum(1),
                        "outer": torch.einsum("bi,bij,bj->b", m, a, 1 - m)}
                sqs = {"inner": torch.einsum("bi,bij,bj->b", m, a2, m) - (m * d.square()).sum(1),
                       "outer": torch.einsum("bi,bij,bj->b", m, a2, 1 - m)}
                for kind in KINDS:
                    c = counts[kind]
                    mean = torch.where(c > 0, sums[kind] / c.clamp(min=1), torch.full_like(c, math.nan))
                    per_layer[kind].append((mean.cpu(), c.cpu(), sums[kind].cpu(), sqs[kind].cpu()))
                del a, a2, d
        finally:
            close = getattr(layers, "close", None)
            if callable(close):
                close()
        L = len(per_layer["inner"])
        if L == 0:
            raise ValueError("maps must contain at least one layer")
        if self.num_layers is None:
            self.num_layers = L
            for kind in KINDS:
                self._img[kind] = np.zeros((3, L))
                self._pair[kind] = np.zeros((3, L))
        elif L != self.num_layers:
            raise ValueError(f"maps has {L} layers but earlier batches had {self.num_layers}")
        for kind in KINDS:
            means = torch.stack([t[0] for t in per_layer[kind]], 1).numpy()  # (B, L)
            has = ~np.isnan(means[:, 0])
            vals = np.where(has[:, None], means, 0.0)
            img = self._img[kind]
            img[0] += has.sum()
            img[1] += vals.sum(0)
            img[2] += np.square(vals).sum(0)
            pair = self._pair[kind]
            for li, (_, c, s, q) in enumerate(per_layer[kind]):
                pair[0, li] += float(c.sum())
                pair[1, li] += float(s.sum())
                pair[2, li] += float(q.sum())
            if has.any():
                self._across[kind] += [has.sum(), means[has].std(axis=1).sum()]
        self.num_images += int(per_layer["inner"][0][0].shape[0])

    # ------------------------------------------------------------------------------------ results
    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if self.num_layers is None:
            raise ValueError("no batch has been added: call update(maps, inner) first")

    def images(self, kind: str) -> int:
        """How many images have at least one ``kind`` pair."""
        self._check_kind(kind)
        return int(self._img[kind][0, 0])

    def mean(self, kind: str) -> np.ndarray:
        """``(L,)``: mean over images of the per-image mean ``kind`` pair score."""
        self._check_kind(kind)
        return _moments(self._img[kind])[0]

    def std(self, kind: str) -> np.ndarray:
        """``(L,)``: population std over images of the per-image mean ``kind`` pair score."""
        self._check_kind(kind)
        return _moments(self._img[kind])[1]

    def pair_mean(self, kind: str) -> np.ndarray:
        """``(L,)``: mean score over every ``kind`` pair of every image (pooled)."""
        self._check_kind(kind)
        return _moments(self._pair[kind])[0]

    def pair_std(self, kind: str) -> np.ndarray:
        """``(L,)``: population std of the score over every ``kind`` pair of every image (pooled)."""
        self._check_kind(kind)
        return _moments(self._pair[kind])[1]

    def layer_std(self, kind: str) -> float:
        """Mean over images of the population std across layers of the per-image mean ``kind`` score."""
        self._check_kind(kind)
        c, s = self._across[kind]
        return float(s / c) if c > 0 else math.nan

    def summary(self) -> dict:
        """JSON-able results (NaN as ``None``)."""
        def arr(v):
            return [None if not math.isfinite(x) else float(x) for x in np.asarray(v, dtype=np.float64)]

        out = {"num_images": self.num_images, "num_layers": self.num_layers,
               "score": "head-mean post-softmax attention of the inner target patch (query) to the other patch "
                        "(key), prefix tokens dropped, not renormalised"}
        for kind in KINDS:
            lstd = self.layer_std(kind)
            out[kind] = {"images": self.images(kind), "mean": arr(self.mean(kind)), "std": arr(self.std(kind)),
                         "pair_mean": arr(self.pair_mean(kind)), "pair_std": arr(self.pair_std(kind)),
                         "std_across_layers": lstd if math.isfinite(lstd) else None}
        return out


def inner_outer_statistics(maps, inner, num_prefix_tokens: int = 0) -> InnerOuterStats:
    """Paper 000 Fig. 2's statistics of one batch: an :class:`InnerOuterStats` after one ``update``."""
    stats = InnerOuterStats(num_prefix_tokens)
    stats.update(maps, inner)
    return stats


def sample_pair(inner: torch.Tensor, generator: Optional[torch.Generator] = None) -> Optional[Tuple[int, int, int]]:
    """Paper 000 Fig. 2's random patches ``(A, B, C)`` of one image: target ``A`` and ``B`` two
    different inner patches, ``C`` an outer one, each uniform; ``None`` when the image has fewer
    than two inner patches or no outer patch. ``inner``: bool ``(n,)``."""
    if not isinstance(inner, torch.Tensor) or inner.dtype != torch.bool or inner.dim() != 1:
        raise ValueError("inner must be a bool tensor of shape (n,)")
    ins = torch.nonzero(inner.cpu()).flatten()
    outs = torch.nonzero(~inner.cpu()).flatten()
    if ins.numel() < 2 or outs.numel() == 0:
        return None
    pick = torch.randperm(ins.numel(), generator=generator)[:2]
    c = outs[torch.randint(outs.numel(), (1,), generator=generator)]
    return int(ins[pick[0]]), int(ins[pick[1]]), int(c)


def inner_outer_report(model: torch.nn.Module, batches: Iterable, *, objects: Optional[Callable] = None,
                       mean=None, std=None, seed: int = 0, num_prefix_tokens: Optional[int] = None,
                       grid=None) -> Tuple[dict, dict]:
    """Paper 000 Fig. 2 over many images (the ``vitpatch interactions`` command): ``(summary, figures)``.

    ``batches``: ``(names, images)`` pairs, ``images`` ``(B, 3, H, W)`` model inputs (one batch
    in memory at a time). ``objects(names, images)`` gives the inner patches, bool ``(B, n)``
    (:class:`ObjectMasks`); default :func:`box_objects` of the grid. The example panel shows the
    first image that has an inner pair and an outer pair, with ``(A, B, C)`` from
    :func:`sample_pair` (seeded by ``seed``) and their per-layer scores (one more forward of that
    image). ``mean``/``std`` undo the input normalisation for display. ``figures`` maps
    ``fig2_inner_outer.png`` to the figure.
    """
    from .plots import display_image
    from .plots.paper000 import plot_inner_outer

    P, grid = model_layout(model, num_prefix_tokens, grid)
    n = grid[0] * grid[1]
    stats = InnerOuterStats(P)
    gen = torch.Generator().manual_seed(int(seed))
    box = box_objects(grid) if objects is None else None
    example = None
    for names, x in batches:
        inner = box.expand(x.shape[0], n) if objects is None else objects(names, x)
        inner = _check_inner(inner, x.shape[0], n)
        stats.update(attention_maps(model, x), inner)
        if example is None:
            for b in range(x.shape[0]):
                triple = sample_pair(inner[b], gen)
                if triple is None:
                    continue
                a, bb, c = triple
                rows = attention_rows(attention_maps(model, x[b:b + 1]), [a], P)  # (L, 1, h, 1, n)
                scores = rows[:, 0, :, 0].double().mean(1)[:, [bb, c]]  # (L, 2): A -> B, A -> C
                example = {"image": os.path.abspath(os.fspath(names[b])), "A": a, "B": bb, "C": c,
                           "scores": scores, "pixels": display_image(x[b], mean, std), "inner": inner[b].cpu()}
                break
    if stats.num_layers is None:
        raise ValueError("batches is empty: no image to analyse")
    summary = {"grid": list(grid), "num_prefix_tokens": P, "seed": int(seed), **stats.summary()}
    kw = {}
    if example is not None:
        summary["example"] = {"image": example["image"], "A": example["A"], "B": example["B"], "C": example["C"],
                              "inner_patches": int(example["inner"].sum()),
                              "score_A_B": example["scores"][:, 0].tolist(),
                              "score_A_C": example["scores"][:, 1].tolist()}
        kw = dict(image=example["pixels"], grid=grid, objects=example["inner"],
                  triple=(example["A"], example["B"], example["C"]), triple_scores=example["scores"])
    fig = plot_inner_outer(stats.mean("inner"), stats.mean("outer"), stats.std("inner"), stats.std("outer"),
                           num_images=(stats.images("inner"), stats.images("outer")), **kw)
    return summary, {"fig2_inner_outer.png": fig}


def run_entry(run_dir, image):
    """The stored row of ``image`` in a ``vitpatch windows`` run: ``(index, windows, keep, meta)``.

    The run stores paths relative to its data folder (``files.npy``); ``image`` is found as the
    longest stored path that ends the image's absolute path. ``windows`` int64 ``(n, 4)`` and
    ``keep`` bool ``(n,)`` are tensors (the keep mask of the run's one ``beta``).
    """
    from .pipeline import read_windows

    windows, keep, files, meta = read_windows(run_dir)
    full = os.path.abspath(os.fspath(image)).replace(os.sep, "/")
    best = None
    for i, f in enumerate(files):
        f = str(f)
        if (full == f or full.endswith("/" + f)) and (best is None or len(f) > len(str(files[best]))):
            best = i
    if best is None:
        raise ValueError(f"IMAGE {os.fspath(image)!r} is not among the {len(files)} images of the windows run "
                         f"{os.fspath(run_dir)!r} (files.npy holds paths relative to its data folder)")
    return (best, torch.from_numpy(np.asarray(windows[best], dtype=np.int64)),
            torch.from_numpy(np.array(keep[best], dtype=np.bool_)), meta)


def analyze_report(model: torch.nn.Module, image: torch.Tensor, *, alpha: float = 0.1, beta: float = 0.2,
                   patches: Optional[Sequence[int]] = None, betas: Sequence[float] = PAPER_BETAS, mean=None,
                   std=None, stored=None, num_prefix_tokens: Optional[int] = None, grid=None) -> Tuple[dict, dict]:
    """Paper 000's figures for one image (the ``vitpatch analyze`` command): ``(summary, figures)``.

    One pass over the layers (:func:`vitpatch.analysis.attention_rows` with ``uncertainty=True``)
    gives ``U`` (eq. 2–3) and the per-layer attention rows of ``patches`` (default
    :func:`vitpatch.analysis.plots.default_patches`); then AWD windows (eq. 4), DIP (§4.2) and the
    responsive field (eq. 6–7). ``image``: one model input ``(3, H, W)`` or ``(1, 3, H, W)``;
    ``mean``/``std`` undo its normalisation for display. ``betas``: the DIP sweep of Fig. 6
    (:func:`vitpatch.analysis.windows.dip_sweep`, default the paper's :data:`PAPER_BETAS`).

    ``stored = (windows (n, 4), keep (n,))``: the image's row of a ``vitpatch windows`` run made
    with this ``alpha`` and ``beta`` (:func:`run_entry`). Its windows and keep mask are drawn
    (Fig. 4, 5, 11, 12) instead of the recomputed ones, ``beta`` joins the sweep and its panel is
    marked, and ``summary["windows_run"]`` counts the patches whose recomputed window or keep
    differs from the stored one (0 when the run used these weights and transform).

    ``figures`` (file name -> figure): ``fig3a_attention_rows.png``, ``fig3_uncertainty_rows.png``,
    ``fig4_windows.png``, ``fig5_indiscriminative.png``, ``fig6_beta_sweep.png``,
    ``fig11_field_tendency.png``, ``fig12_field_size.png``.
    """
    from . import plots
    from .windows import (_check_fraction, adaptive_windows, dip_sweep, effective_operations,
                          indiscriminative_patches, num_dropped, responsive_field)

    alpha = _check_fraction(alpha, "alpha", True, False)
    beta = _check_fraction(beta, "beta", False, True)
    if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4) or (image.dim() == 4 and image.shape[0] != 1):
        raise ValueError(f"image must be one model input (3, H, W) or (1, 3, H, W), got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    x = image if image.dim() == 4 else image.unsqueeze(0)
    P, grid = model_layout(model, num_prefix_tokens, grid)
    n = grid[0] * grid[1]
    patches = plots.default_patches(grid) if patches is None else [int(p) for p in patches]
    bad = [p for p in patches if not 0 <= p < n]
    if bad or not patches:
        raise ValueError(f"patches must name patches in [0, {n}) for the grid {grid}, got {patches}")
    betas = [_check_fraction(b, "betas", False, True) for b in betas]
    rows, U = attention_rows(attention_maps(model, x), patches, P, uncertainty=True)
    if U.shape[-1] != n:
        raise ValueError(f"grid {grid} has {n} patches but the model's maps have n = {U.shape[-1]} patch tokens "
                         f"after {P} prefix tokens")
    U0 = U[0].cpu()
    w_new, k_new = adaptive_windows(U0, alpha, grid), indiscriminative_patches(U0, beta)
    run = None
    if stored is None:
        w0, k0 = w_new, k_new
    else:
        w0, k0 = (torch.as_tensor(t).cpu() for t in stored)
        if tuple(w0.shape) != (n, 4) or tuple(k0.shape) != (n,) or k0.dtype != torch.bool:
            raise ValueError(f"stored must be (windows (n, 4), keep bool (n,)) with n = {n}, got shapes "
                             f"{tuple(w0.shape)}, {tuple(k0.shape)}")
        w0 = w0.long()
        run = {"windows_differ": int((w0 != w_new).any(-1).sum()), "keep_differ": int((k0 != k_new).sum())}
        if all(abs(b - beta) > 1e-12 for b in betas):
            betas = sorted(betas + [beta])
    sweep = dip_sweep(U0, betas)  # (K, n), nested
    size, tendency = responsive_field(w0, k0, grid)
    img = plots.display_image(x[0], mean, std)
    figs = {
        "fig3a_attention_rows.png": plots.paper000.plot_attention_rows(img, rows[:, 0], grid, patches, U0),
        "fig3_uncertainty_rows.png": plots.plot_uncertainty_rows(img, U0, grid, patches),
        "fig4_windows.png": plots.plot_windows(img, w0, grid, patches, keep=k0),
        "fig5_indiscriminative.png": plots.plot_uncertainty_matrix(U0, k0, img, grid),
        "fig6_beta_sweep.png": plots.paper000.plot_beta_sweep(img, sweep, betas, grid,
                                                             stored_beta=beta if stored is not None else None),
        "fig11_field_tendency.png": plots.plot_field_tendency(img, tendency, grid, keep=k0),
        "fig12_field_size.png": plots.plot_field_size(img, size, grid),
    }
    summary = {
        "grid": list(grid), "num_prefix_tokens": P, "alpha": alpha, "beta": beta, "patches": patches,
        "effective_operations": effective_operations(w0.unsqueeze(0), grid),
        "effective_operations_with_dip": effective_operations(w0.unsqueeze(0), grid, k0.unsqueeze(0)),
        "full_attention_operations": n * n, "dropped_patches": int((~k0).sum()),
        "mean_field_size": float(size.double().mean()),
        "beta_sweep": [{"beta": b, "dropped": num_dropped(b, n), "dropped_patches": torch.nonzero(~k).flatten().tolist()}
                       for b, k in zip(betas, sweep)],
    }
    if run is not None:
        summary["windows_run"] = run
    return summary, figs
