"""Stored AWD windows and DIP keep masks that follow the image through crop, resize and flip.

``vitpatch windows`` stores, per image, one window ``(x_left, y_top, x_right, y_bottom)``
(inclusive) and one keep flag per patch of the *analysis grid* (paper 000 §4.1–4.2,
docs/math.md §3–4), computed on the image as the analysis model's timm eval transform showed
it. Training crops, resizes and flips the image, and evaluation may use another model's eval
transform; the windows must move with the pixels. The rule (docs/math.md §4, "Windows under
crop, resize and flip"): each output patch ``p'`` is sent, through its centre, to the analysis
patch ``a(p')`` that contains it (clamped to the analysis grid), takes ``keep[a(p')]``, and its
window is the set of output patches ``q'`` with ``a(q')`` inside the stored window of ``a(p')``.

- :class:`AnalysisView`: where the analysis saw the image (input size, grid, crop_pct, crop_mode);
- :func:`remap_windows`: the rule above, vectorised per axis;
- :func:`eval_crop`: the region of the original image an eval transform shows;
- :class:`WindowFollowingTransform` (train) and :class:`WindowFollowingEvalTransform`
  (``WindowFollowingTransform.eval``): timm's transforms with the windows carried along.

Conventions: sizes are ``(height, width)`` (never PIL's ``(width, height)``), crops are
``(top, left, height, width)`` in original pixels, pixel coordinates are continuous (pixel
``k`` covers ``[k, k + 1)``), as in PIL's and torchvision's resizing.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import random
from typing import Optional, Tuple

import numpy as np
import torch

from ..masks import check_grid

__all__ = ["AnalysisView", "remap_windows", "eval_crop", "WindowFollowingTransform",
           "WindowFollowingEvalTransform", "GEOMETRIC_AUGMENT_OPS"]

_DEFAULT_CROP_PCT = 0.875  # timm's DEFAULT_CROP_PCT, used when crop_pct is None
_CROP_MODES = ("center", "squash")
# A tie (a centre exactly on a cell border, e.g. a 2x coarser output grid) goes to the higher
# cell; this slack, in analysis patches, keeps that choice immune to float rounding.
_EPS = 1e-9
# timm auto-augment ops that move pixels (auto_augment.py); every other op acts per pixel/colour.
GEOMETRIC_AUGMENT_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel",
                         "TranslateYRel")


def _pair(value, name: str, integer: bool = True) -> Tuple:
    """``(h, w)`` from an int, a pair, or a timm ``(3, h, w)`` input size; positive entries."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) not in (2, 3):
        raise ValueError(f"{name} must be (height, width), got {value!r}")
    value = tuple(value)[-2:]
    kind = numbers.Integral if integer else numbers.Real
    if any(isinstance(v, bool) or not isinstance(v, kind) or not v > 0 or not math.isfinite(v) for v in value):
        what = "integers" if integer else "numbers"
        raise ValueError(f"{name} must be (height, width) of positive {what}, got {value!r}")
    return tuple(int(v) if integer else float(v) for v in value)


def _crop_pct(crop_pct) -> float:
    if crop_pct is None:
        return _DEFAULT_CROP_PCT
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, numbers.Real) or not (
            math.isfinite(crop_pct) and crop_pct > 0):
        raise ValueError(f"crop_pct must be a positive number (or None for timm's {_DEFAULT_CROP_PCT}), "
                         f"got {crop_pct!r}")
    return float(crop_pct)


def _crop_mode(crop_mode) -> str:
    crop_mode = "center" if crop_mode is None else crop_mode
    if crop_mode not in _CROP_MODES:
        raise ValueError(f"crop_mode must be one of {_CROP_MODES} (None = 'center', as in timm), got {crop_mode!r}")
    return crop_mode


def _center_offset(size: int, crop: int) -> int:
    """torchvision's ``center_crop`` offset along one axis; negative when it pads (crop > size)."""
    return -((crop - size) // 2) if crop > size else int(round((size - crop) / 2.0))


def _frame(image_size, input_size, crop_pct: float, crop_mode: str):
    """``(scale_y, scale_x, top, left)`` of timm's eval transform; see :meth:`AnalysisView.frame`."""
    h, w = _pair(image_size, "image_size")
    th, tw = input_size
    sh, sw = math.floor(th / crop_pct), math.floor(tw / crop_pct)  # transforms_imagenet_eval's scale_size
    if crop_mode == "squash":                      # Resize((sh, sw))
        nh, nw = sh, sw
    elif sh == sw:                                 # Resize(int): shorter side -> sh (torchvision)
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(sh * long / short)
        nh, nw = (new_long, sh) if w <= h else (sh, new_long)
    else:                                          # timm ResizeKeepRatio(scale_size, longest=0)
        ratio = min(h / sh, w / sw)
        nh, nw = round(h / ratio), round(w / ratio)
    return nh / h, nw / w, _center_offset(nh, th), _center_offset(nw, tw)


@dataclasses.dataclass(frozen=True)
class AnalysisView:
    """How the analysis model saw each image: timm's eval transform and the patch grid.

    Fields: ``input_size (H_a, W_a)`` (a timm ``(3, H_a, W_a)`` or an int is accepted),
    ``grid (gh, gw)``, ``crop_pct`` (None = timm's 0.875; above 1 timm pads, which is
    supported), ``crop_mode`` ``"center"`` or ``"squash"`` (None = ``"center"``, as in timm;
    ``"border"`` is not supported). Analysis patch size is ``input_size / grid`` (need not be
    an integer).
    """

    input_size: Tuple[int, int]
    grid: Tuple[int, int]
    crop_pct: Optional[float] = _DEFAULT_CROP_PCT
    crop_mode: Optional[str] = "center"

    def __post_init__(self):
        object.__setattr__(self, "input_size", _pair(self.input_size, "input_size"))
        object.__setattr__(self, "grid", check_grid(self.grid))
        object.__setattr__(self, "crop_pct", _crop_pct(self.crop_pct))
        object.__setattr__(self, "crop_mode", _crop_mode(self.crop_mode))

    @classmethod
    def from_meta(cls, meta: dict) -> "AnalysisView":
        """From a ``vitpatch windows`` meta.json (``input_size``, ``grid``, ``crop_pct``, ``crop_mode``)."""
        for key in ("input_size", "grid"):
            if meta.get(key) is None:
                raise ValueError(f"meta has no {key!r}; it is needed to place the stored windows")
        return cls(meta["input_size"], meta["grid"], meta.get("crop_pct"), meta.get("crop_mode"))

    def frame(self, image_size) -> Tuple[float, float, int, int]:
        """``(scale_y, scale_x, top, left)``: original pixel ``(y_o, x_o)`` of an image of
        ``image_size (H, W)`` lands at ``(y_o * scale_y - top, x_o * scale_x - left)`` of the
        analysis input. ``scale`` = resized size / original size, the resized size computed as
        timm/torchvision compute it (Resize of the shorter side to ``floor(H_a / crop_pct)`` for
        "center", timm's ResizeKeepRatio for a non-square "center", both sides for "squash");
        ``top, left``: torchvision's CenterCrop offsets (``int(round((h - th) / 2.0))``).
        """
        return _frame(image_size, self.input_size, self.crop_pct, self.crop_mode)


def eval_crop(image_size, view) -> Tuple[float, float, float, float]:
    """``(top, left, height, width)`` in original pixels of what an eval transform shows.

    ``view``: an :class:`AnalysisView` or ``(input_size, crop_pct, crop_mode)``. With it,
    ``remap_windows(..., crop=eval_crop(image_size, view), out_size=view's input_size, flip=False)``
    maps windows into that eval transform. For ``crop_pct > 1`` timm pads, the region extends
    past the image, and :func:`remap_windows` needs ``allow_padding=True``.
    """
    if isinstance(view, AnalysisView):
        size, pct, mode = view.input_size, view.crop_pct, view.crop_mode
    else:
        if not isinstance(view, (tuple, list)) or len(view) != 3:
            raise ValueError(f"view must be an AnalysisView or (input_size, crop_pct, crop_mode), got {view!r}")
        size, pct, mode = _pair(view[0], "input_size"), _crop_pct(view[1]), _crop_mode(view[2])
    sy, sx, top, left = _frame(image_size, size, pct, mode)
    return top / sy, left / sx, size[0] / sy, size[1] / sx


def _analysis_cells(n_out: int, size_out: int, flip: bool, start: float, length: float, scale: float,
                    offset: int, n_a: int, size_a: int) -> np.ndarray:
    """Analysis patch index, along one axis, of each output patch's centre (clamped); monotone."""
    c = (np.arange(n_out, dtype=np.float64) + 0.5) * (size_out / n_out)   # centre, model-input px
    if flip:
        c = size_out - c                                                  # undo the flip
    orig = start + c * (length / size_out)                                # through the crop
    ana = orig * scale - offset                                           # into the analysis input
    return np.clip(np.floor(ana * (n_a / size_a) + _EPS), 0, n_a - 1).astype(np.int64)


def _intervals(cells: np.ndarray, lo: np.ndarray, hi: np.ndarray, flip: bool):
    """First and last output index ``i`` with ``lo <= cells[i] <= hi``, for each (lo, hi); empty: first > last."""
    m = len(cells)
    ordered = cells[::-1] if flip else cells                  # non-decreasing either way
    first = np.searchsorted(ordered, lo, side="left")
    last = np.searchsorted(ordered, hi, side="right") - 1
    return (m - 1 - last, m - 1 - first) if flip else (first, last)


def _as_numpy(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(value).__name__}")


def remap_windows(windows, keep, *, image_size, view: AnalysisView, crop, flip: bool, out_size, out_grid,
                  allow_padding: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Windows and keep mask of one image after crop, resize and flip (docs/math.md §4).

    Args:
        windows: integer ``(n, 4)`` stored AWD windows ``(x_left, y_top, x_right, y_bottom)``,
            inclusive, on ``view.grid`` (``n = gh * gw``, row-major; paper 000 §4.1), numpy or torch.
        keep: bool ``(n,)`` DIP keep mask (False = indiscriminative patch, paper 000 §4.2).
        image_size: the original image's ``(H, W)``.
        view: the :class:`AnalysisView` the windows were computed in.
        crop: ``(top, left, height, width)`` of the original image resized to ``out_size``
            (RandomResizedCrop's parameters, or :func:`eval_crop` for an eval transform).
        flip: whether the resized crop was then flipped horizontally.
        out_size: the model input ``(H_m, W_m)``; out_grid: its patch grid ``(gh_m, gw_m)``.
        allow_padding: accept a crop reaching past the image (timm's eval transform pads
            for ``crop_pct > 1``); otherwise it must lie inside the image.

    The rule: output patch ``p'`` has its centre undone through the flip (``x -> W_m - x``) and
    the crop (``x_o = left + x * width / W_m``), mapped into the analysis input
    (:meth:`AnalysisView.frame`) and into the analysis patch ``a(p')`` whose cell contains it
    (a tie goes to the higher index), clamped to the grid when it falls outside the analysis
    view. ``keep_out[p'] = keep[a(p')]``; the window of ``p'`` is the set of ``q'`` with
    ``a(q')`` inside the stored window of ``a(p')``. ``a`` is monotone per axis (decreasing in
    ``x`` under the flip), so that set is a rectangle, found per axis by binary search; it holds
    ``p'`` whenever the stored window holds its own patch (as AWD windows do). If it is empty
    (only possible for a stored window without its own patch), the window is ``p'`` alone.
    Identity parameters (``out_size, out_grid`` = the view's, ``crop = eval_crop(image_size,
    view)``, no flip) return the stored windows and keep exactly.

    Returns ``(windows_out int64 (gh_m * gw_m, 4), keep_out bool (gh_m * gw_m,))``, torch.
    """
    if not isinstance(view, AnalysisView):
        raise TypeError(f"view must be an AnalysisView, got {type(view).__name__}")
    gh, gw = view.grid
    w = _as_numpy(windows, "windows")
    k = _as_numpy(keep, "keep")
    if w.dtype.kind not in "iu":
        raise TypeError(f"windows must be integer, got dtype {w.dtype}")
    if w.ndim != 2 or w.shape[1] != 4:
        raise ValueError(f"windows must have shape (n, 4), got {tuple(w.shape)}")
    if w.shape[0] != gh * gw:
        raise ValueError(f"windows has {w.shape[0]} rows but view.grid {view.grid} has {gh * gw} patches")
    w = w.astype(np.int64)
    if ((w[:, 0] < 0) | (w[:, 2] >= gw) | (w[:, 1] < 0) | (w[:, 3] >= gh)
            | (w[:, 0] > w[:, 2]) | (w[:, 1] > w[:, 3])).any():
        raise ValueError(f"windows must be inclusive boxes inside view.grid {view.grid} with left <= right "
                         f"and top <= bottom")
    if k.dtype != np.bool_:
        raise TypeError(f"keep must be bool, got dtype {k.dtype}")
    if k.shape != (gh * gw,):
        raise ValueError(f"keep must have shape ({gh * gw},), got {tuple(k.shape)}")
    img_h, img_w = _pair(image_size, "image_size")
    out_h, out_w = _pair(out_size, "out_size")
    ogh, ogw = check_grid(out_grid, "out_grid")
    if not isinstance(crop, (tuple, list)) or len(crop) != 4:
        raise ValueError(f"crop must be (top, left, height, width), got {crop!r}")
    top, left = (float(c) for c in crop[:2])
    ch, cw = _pair(crop[2:], "crop (height, width)", integer=False)
    if not allow_padding:
        tol_h, tol_w = 1e-6 * img_h, 1e-6 * img_w
        if top < -tol_h or left < -tol_w or top + ch > img_h + tol_h or left + cw > img_w + tol_w:
            raise ValueError(f"crop (top, left, height, width) = {tuple(crop)} must lie inside the image "
                             f"of (H, W) = {(img_h, img_w)}")
    sy, sx, oy, ox = view.frame((img_h, img_w))
    ah, aw = view.input_size
    ay = _analysis_cells(ogh, out_h, False, top, ch, sy, oy, gh, ah)
    ax = _analysis_cells(ogw, out_w, bool(flip), left, cw, sx, ox, gw, aw)
    # Per stored window, the rows and columns of the output grid whose cells it holds.
    x0, x1 = _intervals(ax, w[:, 0], w[:, 2], bool(flip))
    y0, y1 = _intervals(ay, w[:, 1], w[:, 3], False)
    src = (ay[:, None] * gw + ax[None, :]).reshape(-1)           # a(p') for each output patch
    rows, cols = np.divmod(np.arange(ogh * ogw), ogw)
    out = np.stack([x0[src], y0[src], x1[src], y1[src]], axis=1)
    empty = (out[:, 0] > out[:, 2]) | (out[:, 1] > out[:, 3])
    out[empty] = np.stack([cols, rows, cols, rows], axis=1)[empty]
    return torch.from_numpy(out.astype(np.int64)), torch.from_numpy(k[src].copy())


def _augment_ops(transform):
    """Names of the timm auto-augment ops inside ``transform`` (a Compose of timm transforms)."""
    names = []
    for t in getattr(transform, "transforms", [transform]):
        ops = list(getattr(t, "ops", []))                          # RandAugment, AugMixAugment
        for sub in getattr(t, "policy", []):                       # AutoAugment
            ops.extend(sub)
        names.extend(getattr(op, "name", type(op).__name__) for op in ops)
    return names


class WindowFollowingTransform:
    """timm's training transform, with the image's AWD windows and DIP mask moved along.

    Built from ``timm.data.transforms_imagenet_train(..., separate=True)``: its primary stage
    (RandomResizedCropAndInterpolation + horizontal flip) is replaced by one step that draws
    the crop once with timm's ``get_params`` (and the interpolation as timm does, including
    ``'random'``), then the flip with ``torch.rand(1) < hflip`` (the draws in timm's order, so
    a seeded run gives timm's own image), applies them with torchvision's ``resized_crop`` /
    ``hflip`` and maps the windows with :func:`remap_windows` (paper 000 §4.1–4.2,
    docs/math.md §4). timm's secondary (colour jitter, photometric auto-augment) and final
    (ToTensor, Normalize, RandomErasing) stages run unchanged. vflip is not supported; an
    ``auto_augment`` policy with ops that move pixels (:data:`GEOMETRIC_AUGMENT_OPS`: the default
    RandAugment, AutoAugment and AugMix policies) is refused, photometric ones such as
    ``'rand-m9-t3a'`` are accepted.

    ``__call__(img, windows, keep) -> (tensor (3, H_m, W_m), windows_out int64 (n_m, 4),
    keep_out bool (n_m,))`` with ``img`` a PIL image and ``windows, keep`` as stored for it.
    Picklable, for DataLoader workers.
    """

    def __init__(self, view: AnalysisView, *, input_size, out_grid, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 hflip: float = 0.5, interpolation: str = "bilinear", color_jitter=0.0,
                 auto_augment: Optional[str] = None, mean, std, re_prob: float = 0.0):
        from timm.data.transforms_factory import transforms_imagenet_train
        from timm.data.transforms import RandomResizedCropAndInterpolation

        if not isinstance(view, AnalysisView):
            raise TypeError(f"view must be an AnalysisView, got {type(view).__name__}")
        if isinstance(hflip, bool) or not isinstance(hflip, numbers.Real) or not 0 <= hflip <= 1:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
        if auto_augment is not None and not isinstance(auto_augment, str):
            raise ValueError(f"auto_augment must be a timm policy string or None, got {auto_augment!r}")
        self.view = view
        self.input_size = _pair(input_size, "input_size")
        self.out_grid = check_grid(out_grid, "out_grid")
        self.hflip = float(hflip)
        primary, self.secondary, self.final = transforms_imagenet_train(
            self.input_size, scale=tuple(scale), ratio=tuple(ratio), hflip=self.hflip, vflip=0.0,
            color_jitter=color_jitter, auto_augment=auto_augment or None, interpolation=interpolation,
            mean=tuple(mean), std=tuple(std), re_prob=re_prob, separate=True)
        self.rrc = primary.transforms[0]
        if not isinstance(self.rrc, RandomResizedCropAndInterpolation):
            raise ValueError(f"unexpected timm primary transform {primary}")
        moving = sorted(set(_augment_ops(self.secondary)) & set(GEOMETRIC_AUGMENT_OPS))
        if moving:
            raise ValueError(f"auto_augment {auto_augment!r} has ops that move pixels ({', '.join(moving)}), which "
                             f"would misalign the windows; use None, a photometric policy (e.g. 'rand-m9-t3a') "
                             f"or color_jitter (colour changes are fine)")

    @classmethod
    def eval(cls, view: AnalysisView, *, input_size, out_grid, crop_pct, crop_mode, interpolation="bilinear",
             mean, std) -> "WindowFollowingEvalTransform":
        """The validation counterpart: timm's eval transform, windows mapped with :func:`eval_crop`."""
        return WindowFollowingEvalTransform(view, input_size=input_size, out_grid=out_grid, crop_pct=crop_pct,
                                            crop_mode=crop_mode, interpolation=interpolation, mean=mean, std=std)

    def draw(self, img):
        """Draw ``(crop (top, left, height, width), interpolation, flip)`` as timm would, consuming the RNGs."""
        crop = self.rrc.get_params(img, self.rrc.scale, self.rrc.ratio)
        interp = self.rrc.interpolation
        if isinstance(interp, (tuple, list)):
            interp = random.choice(interp)
        flip = self.hflip > 0 and bool(torch.rand(1) < self.hflip)
        return crop, interp, flip

    def __call__(self, img, windows, keep):
        from torchvision.transforms import functional as F

        size = tuple(F.get_dimensions(img)[1:])
        crop, interp, flip = self.draw(img)
        img = F.resized_crop(img, *crop, list(self.input_size), interp)
        if flip:
            img = F.hflip(img)
        windows, keep = remap_windows(windows, keep, image_size=size, view=self.view, crop=crop, flip=flip,
                                      out_size=self.input_size, out_grid=self.out_grid)
        return self.final(self.secondary(img)), windows, keep


class WindowFollowingEvalTransform:
    """timm's eval transform (resize, centre crop or squash, normalise), windows moved along.

    The windows follow :func:`remap_windows` with ``crop = eval_crop(image_size, (input_size,
    crop_pct, crop_mode))`` and no flip (docs/math.md §4). Same call signature as
    :class:`WindowFollowingTransform`; picklable.
    """

    def __init__(self, view: AnalysisView, *, input_size, out_grid, crop_pct, crop_mode, interpolation="bilinear",
                 mean, std):
        from timm.data.transforms_factory import transforms_imagenet_eval

        if not isinstance(view, AnalysisView):
            raise TypeError(f"view must be an AnalysisView, got {type(view).__name__}")
        self.view = view
        self.input_size = _pair(input_size, "input_size")
        self.out_grid = check_grid(out_grid, "out_grid")
        self.crop_pct, self.crop_mode = _crop_pct(crop_pct), _crop_mode(crop_mode)
        self.transform = transforms_imagenet_eval(self.input_size, crop_pct=self.crop_pct, crop_mode=self.crop_mode,
                                                  interpolation=interpolation, mean=tuple(mean), std=tuple(std))

    def __call__(self, img, windows, keep):
        from torchvision.transforms import functional as F

        size = tuple(F.get_dimensions(img)[1:])
        crop = eval_crop(size, (self.input_size, self.crop_pct, self.crop_mode))
        windows, keep = remap_windows(windows, keep, image_size=size, view=self.view, crop=crop, flip=False,
                                      out_size=self.input_size, out_grid=self.out_grid, allow_padding=True)
        return self.transform(img), windows, keep
