"""Keypoint interrelation, attention focus, mask as prompt and guided MAE masks (paper 002; docs/math.md §8).

Pipeline for one batch (``raw`` the uint8 images as the model sees them, ``x`` the normalised input)::

    from vitpatch import analysis
    counts = analysis.keypoint_counts(raw, patch_size=16)                         # §2.2, t_j per patch
    for A in analysis.attention_maps(model, x):                                   # one layer at a time
        theta = analysis.interrelation(A, counts, num_prefix_tokens=1)            # eq. 2-3, (B, h, n)
        s = analysis.interrelation_summary(theta, counts)                         # eq. 4, KK/KN/NK/NN (B, h)
        afi = analysis.focus_index(A, num_prefix_tokens=1)                        # eq. 5, (B, h)

:func:`layer_semantics` does exactly that loop and stacks only the small per-head results.
Over a dataset, :func:`semantic_report` (the ``vitpatch semantic`` command) streams batches and
keeps running sums only; :func:`mask_prompt_accuracy` / :class:`MaskPromptAccuracy` score mask as
prompt (§5.1) with counters. Keypoints come from OpenCV's SIFT, an optional extra:
``pip install -e ".[semantic]"`` (:func:`require_opencv` checks for it).
"""
from __future__ import annotations

import json
import math
import numbers
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ._attn import check_attention, check_counts, check_positive
from .maps import check_prefix

__all__ = ["sift_keypoints", "keypoint_counts", "attended_sets", "interrelation", "interrelation_summary",
           "Interrelation", "focus_index", "layer_semantics", "LayerSemantics", "patch_scores",
           "mask_patches", "mask_prompt_accuracy", "MaskPromptAccuracy", "guided_mae_mask", "curriculum_beta",
           "to_uint8", "require_opencv", "check_layers", "default_stages", "check_stages", "stage_layers",
           "semantic_report", "FOCUS_VARIANTS", "MASK_MODES", "MASK_RATIOS", "STAGE_NAMES", "PER_IMAGE_FILE"]

FOCUS_VARIANTS = ("renorm", "literal")
MASK_MODES = ("pixel", "drop_tokens")
MASK_RATIOS = (0.05, 0.1, 0.2, 0.3, 0.4)
_INSTALL = 'pip install -e ".[semantic]"'


# ------------------------------------------------------------------------------- keypoints (§2.2)
def require_opencv():
    """The ``cv2`` module (OpenCV, the ``semantic`` extra of vitpatch) that SIFT (§2.2) needs.

    Raises ``ImportError`` naming the install command when it is missing, so a command can fail
    before it loads a model.
    """
    try:
        import cv2
    except ImportError as exc:
        raise ImportError("SIFT keypoints need OpenCV, an optional extra of vitpatch: install it with "
                          f"`{_INSTALL}` (or `pip install opencv-python-headless`)") from exc
    return cv2


def _hwc_uint8(images, name: str = "images") -> np.ndarray:
    """``(B, H, W, 3)`` uint8 numpy array from uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)``."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 (the image as the model sees it, before normalisation), "
                        f"got dtype {images.dtype}; see vitpatch.analysis.to_uint8")
    if images.ndim != 4 or (images.shape[-1] != 3 and images.shape[1] != 3):
        raise ValueError(f"{name} must have shape (B, H, W, 3) or (B, 3, H, W), got {images.shape}")
    if images.shape[-1] != 3:
        images = np.transpose(images, (0, 2, 3, 1))
    return np.ascontiguousarray(images)


def sift_keypoints(images) -> List[np.ndarray]:
    """SIFT keypoint positions per image: a list of ``(k_b, 2)`` float arrays of ``(x, y)`` pixels.

    OpenCV SIFT with its defaults (``nfeatures=0, nOctaveLayers=3, contrastThreshold=0.04,
    edgeThreshold=10, sigma=1.6``) on the grayscale of each uint8 RGB image; keypoints at the
    same place with different orientations are kept as OpenCV returns them (002 §2.2).
    """
    cv2 = require_opencv()
    imgs = _hwc_uint8(images)
    sift = cv2.SIFT_create()
    out = []
    for im in imgs:
        gray = cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)
        kps = sift.detect(gray, None)
        out.append(np.array([k.pt for k in kps], dtype=np.float64).reshape(-1, 2))
    return out


def keypoint_counts(images, patch_size: int) -> torch.Tensor:
    """Keypoints per patch ``t_j`` (paper 002 §2.2, Fig. 3; docs/math.md §8): ``(B, n)`` int64.

    ``t_j`` counts the SIFT keypoints (:func:`sift_keypoints`) whose ``(x, y)`` falls in patch
    ``j`` with ``col = floor(x / patch_size)``, ``row = floor(y / patch_size)``, clipped to the
    grid ``(H // patch_size, W // patch_size)``; ``n = gh * gw`` in row-major order.

    Args:
        images: uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)``, exactly as the model sees them (after
            resize and crop, before normalisation; :func:`to_uint8` undoes a normalisation).
        patch_size: the patch size in pixels.
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Integral) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    imgs = _hwc_uint8(images)
    H, W = imgs.shape[1:3]
    gh, gw = H // patch_size, W // patch_size
    if gh < 1 or gw < 1:
        raise ValueError(f"images of {H}x{W} pixels are smaller than one patch of {patch_size} pixels")
    counts = np.zeros((len(imgs), gh * gw), dtype=np.int64)
    for b, pts in enumerate(sift_keypoints(imgs)):
        if len(pts):
            col = np.clip(np.floor(pts[:, 0] / patch_size).astype(np.int64), 0, gw - 1)
            row = np.clip(np.floor(pts[:, 1] / patch_size).astype(np.int64), 0, gh - 1)
            np.add.at(counts[b], row * gw + col, 1)
    return torch.from_numpy(counts)


def to_uint8(images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 from a normalised model input (``x * std + mean``, times 255, rounded).

    A 1-channel input is repeated to 3 channels. Without ``mean``/``std`` the input is taken to be in ``[0, 1]``.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be a (B, 3, H, W) or (B, 1, H, W) tensor, "
                         f"got {getattr(images, 'shape', type(images).__name__)}")
    x = images.detach().cpu().double()
    c = x.shape[1]
    if std is not None:
        x = x * torch.as_tensor(std, dtype=torch.float64).reshape(1, -1, 1, 1)[:, :c]
    if mean is not None:
        x = x + torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1, 1, 1)[:, :c]
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous() if c == 1 else x


# --------------------------------------------------------------------------- interrelation (eq. 2-4)
def _patch_block(attn: torch.Tensor, P: int) -> torch.Tensor:
    return attn[..., P:, P:]


def attended_sets(attn, num_prefix_tokens: int = 0, gamma: float = 1.0, include_self: bool = True) -> torch.Tensor:
    """Attended sets ``S_i`` (paper 002 eq. 2, Fig. 4; docs/math.md §8) as a bool ``(..., h, n, n)``.

    ``S_i = {j : Ap_ij >= gamma * (sum_j Ap_ij) / n}`` over the patch block ``Ap = A[..., P:, P:]``
    (not renormalised). ``j = i`` is included unless ``include_self=False``. A relative slack
    of 1e-6 on the threshold absorbs the rounding of the row sum (a uniform row keeps every patch
    at ``gamma = 1``).
    """
    gamma = check_positive(gamma, "gamma")
    attn, P = check_attention(attn, num_prefix_tokens)
    Ap = _patch_block(attn, P)
    n = Ap.shape[-1]
    thr = gamma * Ap.sum(-1, keepdim=True, dtype=torch.float64) / n
    S = Ap.double() >= thr * (1 - 1e-6)
    if not include_self:
        S = S & ~torch.eye(n, dtype=torch.bool, device=S.device)
    return S


def interrelation(attn, counts, num_prefix_tokens: int = 0, gamma: float = 1.0, weighted: bool = True,
                  include_self: bool = True) -> torch.Tensor:
    """Keypoint interrelation ``theta_i`` of every query patch (paper 002 eq. 3; docs/math.md §8): ``(..., h, n)``.

    Weighted (default): ``theta_i = K_i / (|S_i ∩ S_non| + K_i)`` with ``K_i = sum_{j in S_i ∩ S_key} t_j``;
    unweighted: ``theta_i = |S_i ∩ S_key| / |S_i|``. ``S_i`` from :func:`attended_sets`; NaN where
    ``S_i`` is empty.

    Args:
        attn: one layer's post-softmax map ``(B, h, N, N)``, or ``(B, ..., h, N, N)``; the first dim
            is the image.
        counts: keypoints per patch ``(B, n)`` (:func:`keypoint_counts`); ``t_j >= 1`` is a keypoint patch.
        num_prefix_tokens: ``P`` (CLS, registers) before the ``n = N - P`` patches.
        gamma: threshold factor of eq. 2, ``> 0``.
        weighted: weight keypoint patches by their counts (eq. 3) or count patches.
    """
    S = attended_sets(attn, num_prefix_tokens, gamma, include_self)
    n = S.shape[-1]
    t = check_counts(counts, n, S.shape[0]).to(device=S.device, dtype=torch.float64)
    t = t.reshape(t.shape[0], *([1] * (S.dim() - 3)), n, 1)
    key = (t > 0).double()
    Sd = S.double()
    size = Sd.sum(-1)
    with torch.no_grad():
        if weighted:
            k = (Sd @ t).squeeze(-1)
            non = (Sd @ (1 - key)).squeeze(-1)
            den = k + non
        else:
            k = (Sd @ key).squeeze(-1)
            den = size
    theta = k / den
    return torch.where(size > 0, theta, torch.full_like(theta, float("nan")))


class Interrelation(NamedTuple):
    """KK / KN / NK / NN per head (paper 002 eq. 4): each ``(..., h)``; NaN where a set is empty."""

    KK: torch.Tensor
    KN: torch.Tensor
    NK: torch.Tensor
    NN: torch.Tensor


def _nanmean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over its last dim where ``w`` (bool, broadcastable) is True and ``x`` is not NaN."""
    ok = w & ~torch.isnan(x)
    s = torch.where(ok, x, torch.zeros_like(x)).sum(-1)
    c = ok.sum(-1)
    return torch.where(c > 0, s / c.clamp_min(1), torch.full_like(s, float("nan")))


def interrelation_summary(theta, counts) -> Interrelation:
    """KK, KN, NK, NN (paper 002 eq. 4, Fig. 5 / 7a; docs/math.md §8) from ``theta (B, ..., h, n)``.

    ``KK = mean_{i in S_key} theta_i``, ``NK = mean_{i in S_non} theta_i`` (NaN thetas skipped),
    ``KN = 1 - KK``, ``NN = 1 - NK``; each ``(B, ..., h)``. Average over images with ``nanmean``.
    """
    if not isinstance(theta, torch.Tensor) or not theta.is_floating_point():
        raise TypeError(f"theta must be a floating-point tensor, got {type(theta).__name__}")
    if theta.dim() < 3:
        raise ValueError(f"theta must have shape (B, h, n) or (B, ..., h, n), got {tuple(theta.shape)}")
    t = check_counts(counts, theta.shape[-1], theta.shape[0]).to(theta.device)
    key = (t > 0).reshape(t.shape[0], *([1] * (theta.dim() - 2)), t.shape[1])
    kk = _nanmean(theta, key)
    nk = _nanmean(theta, ~key)
    return Interrelation(kk, 1 - kk, nk, 1 - nk)


# ----------------------------------------------------------------------------- focus index (eq. 5)
def focus_index(attn, num_prefix_tokens: int = 0, variant: str = "renorm", per_query: bool = False) -> torch.Tensor:
    """Attention focus index per head (paper 002 eq. 5, Fig. 6; docs/math.md §8): ``(..., h)``.

    Per query row of the patch block ``Ap``: ``m_ij = (Ap_ij - min_j) / (max_j - min_j)``;
    ``variant="renorm"`` (default): ``p_ij = m_ij / sum_j m_ij``, ``delta_i = -sum_j p_ij ln p_ij``;
    ``variant="literal"``: ``delta_i = -sum_j m_ij ln m_ij``. ``0 ln 0 = 0``. A constant row has no
    min-max normalisation; it is taken as uniform (``p_ij = m_ij = 1/n``), so it gives ``ln n`` in
    both variants. The head's AFI is ``mean_i delta_i``; higher = broader attention.
    Decision (SPEC §8): the printed formula is garbled, this is the entropy the text describes.
    ``per_query=True`` returns ``delta`` itself, ``(..., h, n)``.
    """
    if variant not in FOCUS_VARIANTS:
        raise ValueError(f"variant must be one of {FOCUS_VARIANTS}, got {variant!r}")
    attn, P = check_attention(attn, num_prefix_tokens)
    Ap = _patch_block(attn, P).double()
    n = Ap.shape[-1]
    lo = Ap.amin(-1, keepdim=True)
    span = Ap.amax(-1, keepdim=True) - lo
    const = span <= 1e-12 * Ap.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    m = torch.where(const, torch.full_like(Ap, 1.0 / n), (Ap - lo) / torch.where(const, torch.ones_like(span), span))
    p = m / m.sum(-1, keepdim=True) if variant == "renorm" else m
    ent = -torch.special.xlogy(p, p).sum(-1)
    return ent if per_query else ent.mean(-1)


# ----------------------------------------------------------------------------- one pass over layers
class LayerSemantics(NamedTuple):
    """Per-layer, per-head results of :func:`layer_semantics`; every field ``(B, L, h)``."""

    KK: torch.Tensor
    KN: torch.Tensor
    NK: torch.Tensor
    NN: torch.Tensor
    AFI: torch.Tensor
    theta_mean: Optional[torch.Tensor]  # (B, n): theta averaged over the chosen layers and heads (§5.1 score)


def check_layers(layers, num_layers: Optional[int] = None, name: str = "layers") -> Optional[List[int]]:
    """Layer indices as a sorted list without repeats (``None`` stays ``None``: every layer).

    Integers only; negative ones count from the end (``-1`` the last layer). With ``num_layers``
    every index must lie in ``[-num_layers, num_layers)`` and negative ones are made positive;
    without it only the types are checked.
    """
    if layers is None:
        return None
    if isinstance(layers, (numbers.Integral, str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(f"{name} must be a sequence of layer indices, got {layers!r}")
    layers = list(layers)
    if not layers:
        raise ValueError(f"{name} must name at least one layer (None for every layer)")
    for l in layers:
        if isinstance(l, bool) or not isinstance(l, numbers.Integral):
            raise ValueError(f"{name} must be integer layer indices, got {l!r}")
    if num_layers is None:
        return sorted({int(l) for l in layers})
    bad = [int(l) for l in layers if not -num_layers <= l < num_layers]
    if bad:
        raise ValueError(f"{name} must be layer indices in [{-num_layers}, {num_layers}) for a model with "
                         f"{num_layers} layers, got {bad}")
    return sorted({int(l) % num_layers for l in layers})


def layer_semantics(maps: Iterable[torch.Tensor], counts, num_prefix_tokens: int = 0, gamma: float = 1.0,
                    weighted: bool = True, variant: str = "renorm", score_layers: Optional[Sequence[int]] = None
                    ) -> LayerSemantics:
    """KK/KN/NK/NN (eq. 4) and AFI (eq. 5) of every layer and head from streamed maps (docs/math.md §8).

    ``maps`` yields one ``(B, h, N, N)`` map per layer (:func:`vitpatch.analysis.attention_maps`);
    each is reduced to ``(B, h)`` numbers (and the ``(B, n)`` head mean of ``theta``) before the
    next one is produced, so memory stays at one layer's map. ``theta_mean`` is the patch score of
    §5.1: ``theta`` averaged over heads and over ``score_layers`` (default: all layers; negative
    indices count from the last layer; an index past the last layer raises ``ValueError``).
    """
    P = check_prefix(num_prefix_tokens)
    score_layers = check_layers(score_layers, None, "score_layers")  # types now, the range after the last layer
    out: Dict[str, list] = {k: [] for k in ("KK", "KN", "NK", "NN", "AFI")}
    theta_layers = []  # (B, n) head mean of theta per layer: small, selected after the last layer
    for A in maps:
        theta = interrelation(A, counts, P, gamma, weighted)
        s = interrelation_summary(theta, counts)
        for k in ("KK", "KN", "NK", "NN"):
            out[k].append(getattr(s, k).cpu())
        out["AFI"].append(focus_index(A, P, variant).cpu())
        theta_layers.append(torch.nan_to_num(theta, nan=0.0).mean(-2).cpu())
    if not out["KK"]:
        raise ValueError("maps yielded no attention map")
    L = len(theta_layers)
    chosen = range(L) if score_layers is None else check_layers(score_layers, L, "score_layers")
    score = sum(theta_layers[l] for l in chosen) / len(chosen)
    st = {k: torch.stack(v, 1) for k, v in out.items()}
    return LayerSemantics(st["KK"], st["KN"], st["NK"], st["NN"], st["AFI"], score)


def patch_scores(model, images, counts, gamma: float = 1.0, weighted: bool = True,
                 layers: Optional[Sequence[int]] = None, **forward_kwargs) -> torch.Tensor:
    """Patch score ``theta_bar_i`` of §5.1 (docs/math.md §8): mean ``theta_i`` over heads and ``layers``, ``(B, n)``.

    ``layers``: layer indices (negative from the last), default all (the paper names none).
    """
    from .maps import attention_maps, model_layout

    P, _ = model_layout(model)
    res = layer_semantics(attention_maps(model, images, **forward_kwargs), counts, P, gamma, weighted,
                          score_layers=layers)
    return res.theta_mean


# ------------------------------------------------------------------------------- mask as prompt (§5.1)
def _round(x: float) -> int:
    from .windows import round_half_up

    return round_half_up(x)


def _check_ratio(r, name: str, lo_closed: bool = True) -> float:
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not (0 <= float(r) <= 1):
        raise ValueError(f"{name} must be a number in [0, 1], got {r!r}")
    return float(r)


def mask_patches(scores: torch.Tensor, ratio: float, which: str = "top") -> torch.Tensor:
    """Bool ``(B, n)``: the ``round(ratio n)`` patches with the highest (``"top"``) or lowest score (§5.1)."""
    if which not in ("top", "bottom"):
        raise ValueError(f"which must be 'top' or 'bottom', got {which!r}")
    ratio = _check_ratio(ratio, "ratio")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must have shape (B, n), got {getattr(scores, 'shape', None)}")
    B, n = scores.shape
    k = _round(ratio * n)
    order = torch.argsort(scores.double(), dim=1, descending=(which == "top"), stable=True)
    mask = torch.zeros(B, n, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, order[:, :k], True)
    return mask


def _masked_logits(model, images: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Logits with the patches in ``mask`` zeroed in the (normalised) pixels or dropped as tokens."""
    if mode == "pixel":
        gh, gw = model.patch_embed.grid_size
        ph, pw = images.shape[-2] // gh, images.shape[-1] // gw
        m = mask.reshape(-1, 1, gh, 1, gw, 1).expand(-1, 1, gh, ph, gw, pw).reshape(-1, 1, gh * ph, gw * pw)
        return model(images.masked_fill(m.to(images.device), 0.0))
    from .maps import _is_staged_vit

    if not _is_staged_vit(model):
        raise ValueError("mode='drop_tokens' needs a timm VisionTransformer (its blocks are run after dropping tokens)")
    P = model.num_prefix_tokens
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    keep = ~mask.to(x.device)
    k = int(keep[0].sum())
    if bool((keep.sum(1) != k).any()):
        raise ValueError("every image must mask the same number of patches for mode='drop_tokens'")
    idx = torch.nonzero(keep, as_tuple=False)[:, 1].reshape(len(keep), k) + P
    idx = torch.cat([torch.arange(P, device=x.device).expand(len(keep), P), idx], 1)
    x = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
    x = model.norm_pre(x)
    x = model.blocks(x)
    x = model.norm(x)
    return model.forward_head(x)


def _check_modes(modes) -> Tuple[str, ...]:
    if isinstance(modes, str) or not isinstance(modes, Iterable):
        raise ValueError(f"modes must be a sequence drawn from {MASK_MODES}, got {modes!r}")
    modes = tuple(modes)
    for m in modes:
        if m not in MASK_MODES:
            raise ValueError(f"modes must be drawn from {MASK_MODES}, got {m!r}")
    if not modes:
        raise ValueError(f"modes must name at least one of {MASK_MODES}")
    return modes


class MaskPromptAccuracy:
    """Running Top / Bottom "mask as prompt" accuracy (paper 002 §5.1, Fig. 8; docs/math.md §8).

    Holds integer counters only (correct predictions per mode, Top/Bottom and ratio, and the
    number of images), so a dataset of any size is scored batch by batch in constant memory::

        acc = MaskPromptAccuracy(ratios=(0.05, 0.1), modes=("pixel",))
        for images, labels, scores in ...:       # scores: (B, n) patch scores, e.g. patch_scores(...)
            acc.update(model, images, scores, labels)
        acc.result()

    Top (Bottom) masks the ``round(r n)`` patches with the highest (lowest) score
    (:func:`mask_patches`); mode ``"pixel"`` fills a masked patch with 0 in normalised space,
    ``"drop_tokens"`` drops its token after the position embedding.
    """

    def __init__(self, ratios: Sequence[float] = MASK_RATIOS, modes: Sequence[str] = MASK_MODES):
        self.modes = _check_modes(modes)
        if isinstance(ratios, (str, numbers.Number)) or not isinstance(ratios, Iterable):
            raise ValueError(f"ratios must be a sequence of numbers in [0, 1], got {ratios!r}")
        self.ratios = [_check_ratio(r, "ratios") for r in ratios]
        if not self.ratios:
            raise ValueError("ratios must name at least one masking ratio")
        self.correct = {m: {w: [0] * len(self.ratios) for w in ("top", "bottom")} for m in self.modes}
        self.unmasked = 0
        self.total = 0
        self.label_sources: set = set()

    @torch.no_grad()
    def update(self, model, images: torch.Tensor, scores: torch.Tensor, labels=None) -> None:
        """Add one batch: normalised ``images (B, 3, H, W)``, patch ``scores (B, n)`` and ``labels (B,)``
        class indices, or ``None`` for the model's prediction on the unmasked images."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (B, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
        B = images.shape[0]
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] != B:
            raise ValueError(f"scores must have shape (B, n) = ({B}, n), got {getattr(scores, 'shape', None)}")
        dev = next(model.parameters()).device
        training = model.training
        model.eval()
        try:
            images = images.to(dev)
            scores = scores.to(dev)
            pred = model(images).argmax(-1)
            if labels is None:
                labels, src = pred, "unmasked prediction"
            else:
                labels, src = torch.as_tensor(labels).to(dev), "true"
                if labels.shape != (B,) or labels.is_floating_point():
                    raise ValueError(f"labels must be ({B},) integer class indices, got {tuple(labels.shape)} "
                                     f"{labels.dtype}")
            self.label_sources.add(src)
            self.unmasked += int((pred == labels).sum())
            self.total += B
            for m in self.modes:
                for i, r in enumerate(self.ratios):
                    for which in ("top", "bottom"):
                        out = _masked_logits(model, images, mask_patches(scores, r, which), m).argmax(-1)
                        self.correct[m][which][i] += int((out == labels).sum())
        finally:
            model.train(training)

    def result(self) -> Dict[str, Dict[str, object]]:
        """``{mode: {"ratios", "top", "bottom", "unmasked", "images", "labels"}}``: accuracies in ``[0, 1]``;
        ``labels`` is ``"true"``, ``"unmasked prediction"`` or ``"mixed"``."""
        if self.total == 0:
            raise ValueError("batches yielded no images")
        src = next(iter(self.label_sources)) if len(self.label_sources) == 1 else "mixed"
        return {m: {"ratios": list(self.ratios), "top": [c / self.total for c in self.correct[m]["top"]],
                    "bottom": [c / self.total for c in self.correct[m]["bottom"]],
                    "unmasked": self.unmasked / self.total, "images": self.total, "labels": src}
                for m in self.modes}


@torch.no_grad()
def mask_prompt_accuracy(model, batches, ratios: Sequence[float] = MASK_RATIOS, modes: Sequence[str] = MASK_MODES,
                         gamma: float = 1.0, weighted: bool = True, layers: Optional[Sequence[int]] = None,
                         mean=None, std=None, progress: bool = False) -> Dict[str, Dict[str, object]]:
    """Top / Bottom "mask as prompt" top-1 accuracy over a dataset (paper 002 §5.1, Fig. 8; docs/math.md §8).

    Streams: ``batches`` may be any iterable or iterator (a generator over an image folder); each
    batch is scored and dropped, only the counters of :class:`MaskPromptAccuracy` are kept, so
    memory does not grow with the number of images. For each image the patch score is
    :func:`patch_scores` of the unmasked forward over ``layers`` (default all; see
    :func:`layer_semantics`).

    Args:
        model: a timm ``VisionTransformer``.
        batches: iterable of ``(images, labels)`` or ``(images, labels, counts)``; images are
            normalised ``(B, 3, H, W)``; ``labels`` ``(B,)`` class indices, or ``None`` to score
            against the model's prediction on the unmasked image. Without counts they are computed
            with SIFT on :func:`to_uint8` of the images with ``mean``/``std`` (default: the
            model's pretrained_cfg).

    Returns ``{mode: {"ratios": [...], "top": [acc...], "bottom": [acc...], "unmasked": acc,
    "images": count, "labels": "true" | "unmasked prediction" | "mixed"}}``.
    """
    from .maps import model_layout

    acc = MaskPromptAccuracy(ratios, modes)
    check_positive(gamma, "gamma")
    layers = check_layers(layers, None, "layers")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = cfg.get("mean") if mean is None else mean
    std = cfg.get("std") if std is None else std
    P, grid = model_layout(model)
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="mask as prompt", unit="batch")
    for batch in it:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise ValueError("batches must yield (images, labels) or (images, labels, counts)")
        images, labels = batch[0], batch[1]
        counts = batch[2] if len(batch) > 2 and batch[2] is not None else \
            keypoint_counts(to_uint8(images, mean, std), images.shape[-1] // grid[1])
        score = patch_scores(model, images, counts, gamma, weighted, layers)
        acc.update(model, images, score, labels)
    return acc.result()


# ------------------------------------------------------------------------------ guided MAE mask (§5.2)
def curriculum_beta(epoch: int) -> float:
    """Share of keypoint patches among the masked ones at ``epoch`` (paper 002 §5.2; docs/math.md §8):
    ``beta = min(0.5, 0.1 (1 + floor(epoch / 10)))``."""
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    return min(0.5, 0.1 * (1 + int(epoch) // 10))


def guided_mae_mask(counts, ratio: float = 0.5, beta: float = 0.1, generator: Optional[torch.Generator] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keypoint-guided MAE mask (paper 002 §5.2, Fig. 9; docs/math.md §8).

    ``n_mask = round(n ratio)`` patches are masked per image, ``n_key = min(round(n_mask beta), |S_key|)``
    of them keypoint patches (``counts >= 1``) and the rest non-keypoint patches (more keypoint
    patches when ``S_non`` runs out), chosen uniformly at random within each set.

    Returns ``(mask, ids_shuffle, ids_restore)`` as in MAE's ``random_masking``: ``mask (B, n)``
    bool (True = masked), ``ids_shuffle (B, n)`` with the ``n - n_mask`` kept patches first (in
    random order) and then the masked ones, and ``ids_restore = argsort(ids_shuffle)``, so
    ``ids_keep = ids_shuffle[:, :n - n_mask]``. Use :func:`curriculum_beta` for the schedule.
    """
    if isinstance(counts, torch.Tensor) and counts.dim() != 2:
        raise ValueError(f"counts must have shape (B, n), got {tuple(counts.shape)}")
    t = torch.as_tensor(counts)
    if t.dim() != 2:
        raise ValueError(f"counts must have shape (B, n), got {tuple(t.shape)}")
    t = check_counts(t, t.shape[1], None)
    ratio = _check_ratio(ratio, "ratio")
    beta = _check_ratio(beta, "beta")
    B, n = t.shape
    dev = t.device
    key = t > 0
    n_mask = _round(n * ratio)
    nk = key.sum(1)
    want = torch.full((B,), _round(n_mask * beta), dtype=torch.long, device=dev)
    n_key = torch.minimum(want, nk)
    n_non = torch.minimum(n_mask - n_key, n - nk)
    n_key = n_mask - n_non  # more keypoint patches where S_non runs out
    r = torch.rand(B, n, generator=generator, device=dev if generator is None else generator.device).to(dev)
    # rank inside each set: keypoint patches first (random order), then the others
    order = torch.argsort(r + 2.0 * (~key).double(), dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=dev).expand(B, n).contiguous())
    in_key = rank < n_key[:, None]
    non_rank = rank - nk[:, None]
    in_non = (~key) & (non_rank < n_non[:, None])
    mask = (key & in_key) | in_non
    noise = torch.rand(B, n, generator=generator, device=dev if generator is None else generator.device).to(dev)
    ids_shuffle = torch.argsort(noise.double() + 2.0 * mask.double(), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return mask, ids_shuffle, ids_restore


# ------------------------------------------------------------------------- stages (§4.3) and the report
def default_stages(num_layers: int) -> List[int]:
    """Stage boundaries when none are given: three equal parts for the paper's Retrieval, Capture and
    Coach stages (§4.3, Fig. 7), i.e. the first layers of stages 2 and 3 at ``L // 3`` and ``2 L // 3``
    (ViT-L/16's 24 layers: ``[8, 16]``). The paper draws the stages but gives no layer numbers."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    L = int(num_layers)
    return sorted({b for b in (L // 3, 2 * L // 3) if 0 < b < L})


def check_stages(stages, num_layers: int) -> List[int]:
    """Stage boundaries (the first layer of each new stage) as a sorted list, each in ``(0, num_layers)``."""
    if isinstance(stages, (str, numbers.Number)) or not isinstance(stages, Iterable):
        raise ValueError(f"stages must be a sequence of layer indices, got {stages!r}")
    stages = list(stages)
    for s in stages:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise ValueError(f"stages must be integer layer indices, got {s!r}")
    bad = [int(s) for s in stages if not 0 < s < num_layers]
    if bad:
        raise ValueError(f"stages must be layer indices in (0, {num_layers}) (the first layer of each new stage), "
                         f"got {bad}")
    return sorted({int(s) for s in stages})


def stage_layers(stages: Sequence[int], num_layers: int) -> List[int]:
    """The layer drawn for each stage in Fig. 7b: the middle one, ``(first + last) // 2``."""
    edges = [0] + check_stages(stages, num_layers) + [int(num_layers)]
    return [(a + b - 1) // 2 for a, b in zip(edges[:-1], edges[1:])]


#: the paper's names of its three stages (§4.3), used when there are exactly three
STAGE_NAMES = ("Retrieval", "Capture", "Coach")
#: the per-image rows of :func:`semantic_report`, one JSON object per line, under ``out``
PER_IMAGE_FILE = "semantic_images.jsonl"
_FIELDS = ("KK", "KN", "NK", "NN", "AFI")


def _nan_none(t) -> list:
    """Nested lists with NaN / inf as None (JSON has no NaN)."""
    def conv(v):
        if isinstance(v, list):
            return [conv(x) for x in v]
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return conv(t.tolist())


def _unpack(batch):
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError("batches must yield (names, images) or (names, images, labels)")
    names, x = batch[0], batch[1]
    y = batch[2] if len(batch) == 3 else None
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"batches: images must be a (B, 3, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    B = x.shape[0]
    names = [None] * B if names is None else [str(n) for n in names]
    if len(names) != B:
        raise ValueError(f"batches: {len(names)} names for {B} images")
    if y is not None:
        y = torch.as_tensor(y)
        if y.shape != (B,) or y.is_floating_point():
            raise ValueError(f"batches: labels must be ({B},) integer class indices or None, got "
                             f"{tuple(y.shape)} {y.dtype}")
    return names, x, y


@torch.no_grad()
def semantic_report(model, batches, *, gamma: float = 1.0, weighted: bool = True, variant: str = "renorm",
                    score_layers: Optional[Sequence[int]] = None, stages: Optional[Sequence[int]] = None,
                    mask_prompt: bool = False, ratios: Sequence[float] = MASK_RATIOS,
                    modes: Sequence[str] = MASK_MODES, mean=None, std=None, figures: bool = True,
                    progress: bool = False, out=None):
    """Paper 002 over a dataset, streamed: what ``vitpatch semantic`` writes (docs/math.md §8).

    One pass over ``batches``; per batch: SIFT counts (§2.2), KK/KN/NK/NN (eq. 4) and AFI (eq. 5)
    of every layer and head (:func:`layer_semantics`), the patch score ``theta_bar`` of §5.1 over
    ``score_layers`` and, with ``mask_prompt``, the Top/Bottom accuracies (:class:`MaskPromptAccuracy`).
    Only running sums are kept (memory does not grow with the number of images); with ``out`` each
    image's row is appended to ``out/semantic_images.jsonl`` as the batch is done.

    Args:
        model: a timm ``VisionTransformer`` (``num_prefix_tokens``, ``patch_embed.grid_size``).
        batches: iterable of ``(names, images)`` or ``(names, images, labels)``: ``names`` the B
            image names (or ``None``), ``images`` normalised ``(B, 3, H, W)``, ``labels`` ``(B,)``
            class indices or ``None`` (mask as prompt then scores against the unmasked prediction).
        gamma, weighted, variant: eq. 2 threshold, eq. 3 weighting, eq. 5 variant.
        score_layers: layers averaged into the patch score (default all; negative from the end).
        stages: first layer of each new stage (Fig. 7a/7b); default :func:`default_stages`.
        mask_prompt, ratios, modes: Top/Bottom mask as prompt (§5.1, Fig. 8).
        mean, std: the input normalisation (default the model's pretrained_cfg), to recover the
            uint8 image SIFT sees.
        figures: build the figures (from the first image, and the dataset means).
        progress: a tqdm bar over batches.
        out: folder for the per-image rows (created if needed); ``None`` keeps none.

    Returns ``(summary, figures)``: ``summary`` a JSON-ready dict (per layer and head means and
    standard deviations over images, NaN as None; ``mask_prompt`` when asked); ``figures`` maps
    file names to ``matplotlib`` figures: ``fig3_keypoints.png``, ``fig4_attended_row.png``,
    ``fig5_interrelation.png``, ``fig6_focus_index.png``, ``fig7a_stages.png``,
    ``fig7b_stage_heatmaps.png`` and, with ``mask_prompt``, ``fig8_mask_prompt.png`` (accuracy vs
    ratio) and ``fig8_masked_images.png`` (the first image under Top/Bottom masks).
    """
    import os

    from .maps import attention_maps, count_layers, model_layout

    require_opencv()
    gamma = check_positive(gamma, "gamma")
    if variant not in FOCUS_VARIANTS:
        raise ValueError(f"variant must be one of {FOCUS_VARIANTS}, got {variant!r}")
    P, grid = model_layout(model)
    L = count_layers(model)
    layers = check_layers(score_layers, L, "score_layers")
    bounds = default_stages(L) if stages is None else check_stages(stages, L)
    acc = MaskPromptAccuracy(ratios, modes) if mask_prompt else None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = cfg.get("mean") if mean is None else mean
    std = cfg.get("std") if std is None else std
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="semantic", unit="batch")
    sums = {k: 0.0 for k in _FIELDS}
    sq = {k: 0.0 for k in _FIELDS}
    cnt = {k: 0 for k in _FIELDS}
    images = keypoints = key_patches = 0
    first = None
    rows = None
    if out is not None:
        os.makedirs(out, exist_ok=True)
        rows = open(os.path.join(out, PER_IMAGE_FILE), "w", encoding="utf-8")
    try:
        for batch in it:
            names, x, y = _unpack(batch)
            raw = to_uint8(x, mean, std)
            counts = keypoint_counts(raw, x.shape[-1] // grid[1])
            res = layer_semantics(attention_maps(model, x), counts, P, gamma, weighted, variant, layers)
            for k in _FIELDS:
                v = getattr(res, k).double()  # (B, L, h)
                ok = ~torch.isnan(v)
                v0 = torch.where(ok, v, torch.zeros_like(v))
                sums[k] = sums[k] + v0.sum(0)
                sq[k] = sq[k] + (v0 * v0).sum(0)
                cnt[k] = cnt[k] + ok.sum(0)
            images += len(x)
            keypoints += int(counts.sum())
            key_patches += int((counts > 0).sum())
            if rows is not None:
                for b, name in enumerate(names):
                    row = {"image": name, "label": None if y is None else int(y[b]),
                           "keypoints": int(counts[b].sum()), "keypoint_patches": int((counts[b] > 0).sum()),
                           "counts": counts[b].tolist(), **{k: _nan_none(getattr(res, k)[b]) for k in _FIELDS}}
                    rows.write(json.dumps(row) + "\n")
                rows.flush()
            if acc is not None:
                acc.update(model, x, res.theta_mean, y)
            if first is None and figures:
                first = (x[:1].clone(), raw[:1].clone(), counts[:1].clone(), res.theta_mean[:1].clone())
    finally:
        if rows is not None:
            rows.close()
    if images == 0:
        raise ValueError("batches yielded no images")
    mean_lh, std_lh = {}, {}
    for k in _FIELDS:
        c = cnt[k].double()
        m = torch.where(c > 0, sums[k] / c.clamp_min(1), torch.full_like(c, float("nan")))
        var = (sq[k] / c.clamp_min(1) - m * m).clamp_min(0)
        mean_lh[k] = m
        std_lh[k] = torch.where(c > 0, var.sqrt(), torch.full_like(c, float("nan")))
    per_layer = {k: torch.nanmean(v, 1) for k, v in mean_lh.items()}
    summary = {
        "images": images, "layers": L, "heads": int(mean_lh["AFI"].shape[1]), "grid": list(grid),
        "num_prefix_tokens": P, "gamma": gamma, "weighted": bool(weighted), "afi_variant": variant,
        "afi_direction": "higher = broader attention (entropy; docs/math.md §8)",
        "score_layers": "all" if layers is None else layers, "stages": bounds,
        "stage_layers": stage_layers(bounds, L),
        "keypoints_per_image": keypoints / images, "keypoint_patches_per_image": key_patches / images,
        "per_layer": {k: _nan_none(v) for k, v in per_layer.items()},
        "per_layer_head": {k: _nan_none(v) for k, v in mean_lh.items()},
        "per_layer_head_std": {k: _nan_none(v) for k, v in std_lh.items()},
        "per_image_file": None if out is None else PER_IMAGE_FILE,
    }
    prompt = None
    if acc is not None:
        prompt = acc.result()
        summary["mask_prompt"] = prompt
        summary["mask_prompt_labels"] = next(iter(prompt.values()))["labels"]
    figs = {}
    if figures:
        figs = _report_figures(model, first, mean_lh, per_layer, bounds, prompt, P, grid, gamma, variant, mean,
                               None if acc is None else acc.ratios)
    return summary, figs


def _report_figures(model, first, mean_lh, per_layer, bounds, prompt, P, grid, gamma, variant, mean, ratios):
    """The figures of :func:`semantic_report` from the first image and the dataset means."""
    from . import plots
    from .maps import attention_maps
    from .plots import paper002

    x0, raw0, c0, s0 = first
    img = plots.display_image(raw0[0])
    q = int(torch.argmax(c0[0])) if int(c0.sum()) else 0  # the query: the patch with the most keypoints
    rows, deltas = [], []
    for A in attention_maps(model, x0):
        rows.append(A[0, :, P + q, P:].double().mean(0).cpu())  # the head mean of query q's row, (n,)
        deltas.append(float(focus_index(A, P, variant, per_query=True)[0, :, q].mean()))
    L = len(rows)
    mid = rows[L // 2]
    reps = stage_layers(bounds, L)
    names = list(STAGE_NAMES) if len(reps) == 3 else [f"stage {i + 1}" for i in range(len(reps))]
    figs = {
        "fig3_keypoints.png": plots.plot_keypoints(img, sift_keypoints(raw0)[0], grid, c0[0]),
        "fig4_attended_row.png": plots.plot_attended_row(img, mid, grid, gamma, q),
        "fig5_interrelation.png": plots.plot_layer_points({"KK": mean_lh["KK"], "NK": mean_lh["NK"]},
                                                          "interrelation", "KK and NK per head (paper 002 Fig. 5)"),
        "fig6_focus_index.png": plots.plot_layer_points({"AFI": mean_lh["AFI"]}, "attention focus index",
                                                        "AFI per head (paper 002 Fig. 6; higher = broader)"),
        "fig7a_stages.png": plots.plot_stage_summary(*(per_layer[k] for k in _FIELDS), stages=bounds),
        "fig7b_stage_heatmaps.png": paper002.plot_stage_heatmaps(
            img, torch.stack([rows[l] for l in reps]), grid, reps, query=q, names=names,
            afi=[deltas[l] for l in reps]),
    }
    if prompt is not None:
        figs["fig8_mask_prompt.png"] = plots.plot_mask_prompt(prompt)
        mode = "pixel" if "pixel" in prompt else next(iter(prompt))
        figs["fig8_masked_images.png"] = paper002.plot_masked_images(
            img, s0[0], grid, ratios, result=prompt[mode], fill=mean if mean is not None else (0.5, 0.5, 0.5),
            title=f"mask as prompt, mode={mode} (paper 002 Fig. 8)")
    return figs
