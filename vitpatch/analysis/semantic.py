"""Keypoint interrelation, attention focus, mask as prompt and guided MAE masks (paper 002; docs/math.md §8).

Pipeline for one batch (``raw`` the uint8 images as the model sees them, ``x`` the normalised input)::

    from vitpatch import analysis
    counts = analysis.keypoint_counts(raw, patch_size=16)                         # §2.2, t_j per patch
    for A in analysis.attention_maps(model, x):                                   # one layer at a time
        theta = analysis.interrelation(A, counts, num_prefix_tokens=1)            # eq. 2-3, (B, h, n)
        s = analysis.interrelation_summary(theta, counts)                         # eq. 4, KK/KN/NK/NN (B, h)
        afi = analysis.focus_index(A, num_prefix_tokens=1)                        # eq. 5, (B, h)

:func:`layer_semantics` does exactly that loop and stacks only the small per-head results.
Keypoints come from OpenCV's SIFT, an optional extra: ``pip install -e ".[semantic]"``.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ._attn import check_attention, check_counts, check_positive
from .maps import check_prefix

__all__ = ["sift_keypoints", "keypoint_counts", "attended_sets", "interrelation", "interrelation_summary",
           "Interrelation", "focus_index", "layer_semantics", "LayerSemantics", "patch_scores",
           "mask_patches", "mask_prompt_accuracy", "guided_mae_mask", "curriculum_beta", "to_uint8",
           "FOCUS_VARIANTS", "MASK_MODES", "MASK_RATIOS"]

FOCUS_VARIANTS = ("renorm", "literal")
MASK_MODES = ("pixel", "drop_tokens")
MASK_RATIOS = (0.05, 0.1, 0.2, 0.3, 0.4)
_INSTALL = 'pip install -e ".[semantic]"'


# ------------------------------------------------------------------------------- keypoints (§2.2)
def _cv2():
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
    cv2 = _cv2()
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


def layer_semantics(maps: Iterable[torch.Tensor], counts, num_prefix_tokens: int = 0, gamma: float = 1.0,
                    weighted: bool = True, variant: str = "renorm", score_layers: Optional[Sequence[int]] = None
                    ) -> LayerSemantics:
    """KK/KN/NK/NN (eq. 4) and AFI (eq. 5) of every layer and head from streamed maps (docs/math.md §8).

    ``maps`` yields one ``(B, h, N, N)`` map per layer (:func:`vitpatch.analysis.attention_maps`);
    each is reduced to ``(B, h)`` numbers before the next one is produced, so memory stays at one
    layer's map. ``theta_mean`` is the patch score of §5.1: ``theta`` averaged over heads and
    over ``score_layers`` (default: all layers).
    """
    P = check_prefix(num_prefix_tokens)
    out: Dict[str, list] = {k: [] for k in ("KK", "KN", "NK", "NN", "AFI")}
    score, used = None, 0
    for l, A in enumerate(maps):
        theta = interrelation(A, counts, P, gamma, weighted)
        s = interrelation_summary(theta, counts)
        for k in ("KK", "KN", "NK", "NN"):
            out[k].append(getattr(s, k).cpu())
        out["AFI"].append(focus_index(A, P, variant).cpu())
        if score_layers is None or l in score_layers:
            th = torch.nan_to_num(theta, nan=0.0).mean(-2).cpu()
            score = th if score is None else score + th
            used += 1
    if not out["KK"]:
        raise ValueError("maps yielded no attention map")
    st = {k: torch.stack(v, 1) for k, v in out.items()}
    return LayerSemantics(st["KK"], st["KN"], st["NK"], st["NN"], st["AFI"],
                          None if score is None else score / used)


def patch_scores(model, images, counts, gamma: float = 1.0, weighted: bool = True,
                 layers: Optional[Sequence[int]] = None, **forward_kwargs) -> torch.Tensor:
    """Patch score ``theta_bar_i`` of §5.1 (docs/math.md §8): mean ``theta_i`` over heads and ``layers``, ``(B, n)``."""
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


@torch.no_grad()
def mask_prompt_accuracy(model, batches, ratios: Sequence[float] = MASK_RATIOS, modes: Sequence[str] = MASK_MODES,
                         gamma: float = 1.0, weighted: bool = True, layers: Optional[Sequence[int]] = None,
                         mean=None, std=None, progress: bool = False) -> Dict[str, Dict[str, List[float]]]:
    """Top / Bottom "mask as prompt" top-1 accuracy over a dataset (paper 002 §5.1, Fig. 8; docs/math.md §8).

    For each image the patch score is :func:`patch_scores` of the unmasked forward; Top (Bottom)
    masks the ``round(r n)`` patches with the highest (lowest) score, in each ``mode``:
    ``"pixel"`` fills the patch with 0 in normalised space, ``"drop_tokens"`` drops its token after
    the position embedding.

    Args:
        model: a timm ``VisionTransformer``.
        batches: iterable of ``(images, labels)`` or ``(images, labels, counts)``; images are
            normalised ``(B, 3, H, W)``. Without counts they are computed with SIFT on
            :func:`to_uint8` of the images with ``mean``/``std`` (default: the model's pretrained_cfg).

    Returns ``{mode: {"ratios": [...], "top": [acc...], "bottom": [acc...], "unmasked": acc}}``.
    """
    from .maps import model_layout

    for m in modes:
        if m not in MASK_MODES:
            raise ValueError(f"modes must be drawn from {MASK_MODES}, got {m!r}")
    ratios = [_check_ratio(r, "ratios") for r in ratios]
    check_positive(gamma, "gamma")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = cfg.get("mean") if mean is None else mean
    std = cfg.get("std") if std is None else std
    P, grid = model_layout(model)
    patch = None
    model.eval()
    dev = next(model.parameters()).device
    correct = {m: {"top": np.zeros(len(ratios)), "bottom": np.zeros(len(ratios))} for m in modes}
    plain, total = 0, 0
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="mask as prompt", unit="batch")
    for batch in it:
        images, labels = batch[0].to(dev), torch.as_tensor(batch[1]).to(dev)
        if len(batch) > 2 and batch[2] is not None:
            counts = batch[2]
        else:
            if patch is None:
                patch = images.shape[-1] // grid[1]
            counts = keypoint_counts(to_uint8(images, mean, std), patch)
        score = patch_scores(model, images, counts, gamma, weighted, layers).to(dev)
        plain += int((model(images).argmax(-1) == labels).sum())
        total += len(labels)
        for m in modes:
            for i, r in enumerate(ratios):
                for which in ("top", "bottom"):
                    mask = mask_patches(score, r, which)
                    pred = _masked_logits(model, images, mask, m).argmax(-1)
                    correct[m][which][i] += int((pred == labels).sum())
    if total == 0:
        raise ValueError("batches yielded no images")
    return {m: {"ratios": ratios, "top": list(correct[m]["top"] / total),
                "bottom": list(correct[m]["bottom"] / total), "unmasked": plain / total, "images": total}
            for m in modes}


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
