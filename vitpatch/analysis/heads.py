"""Head importance by pruning, k-hop attention strength and attention patterns (paper 003; docs/math.md §9).

Metrics of one layer's map (streamed from :func:`vitpatch.analysis.attention_maps`)::

    from vitpatch import analysis
    for A in analysis.attention_maps(model, x):                                        # (B, h, N, N)
        mad = analysis.mean_attention_distance(A, (14, 14), 16, num_prefix_tokens=1)   # (B, h) pixels
        s = analysis.khop_strength(A, (14, 14), num_prefix_tokens=1)                   # eq. 7-8, (B, h, K)
        H = analysis.strength_entropy(s)                                               # (B, h) in [0, 1]

Head importance (§5.2, eq. 3–6) by zeroing a head's post-softmax map in a region::

    res = analysis.head_importance(model, x, labels, modes=(1, 2, 3, 4, 5))
    res.prob, res.jsd, res.cls, res.patch                                              # (B, L, h, modes)

The blocks before ``l`` run once (each block's input is cached from one unpruned forward), the
``h x len(modes)`` pruned variants of block ``l`` run as one batch from that cached input, and
the layer-level metrics come from block ``l``'s own output in that same pass: no rerun.
:func:`head_importance_loop` is the plain one-full-forward-per-head version (the oracle).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ._attn import check_attention
from .maps import attention_modules, check_prefix

__all__ = ["PRUNE_MODES", "mean_attention_distance", "ring_sizes", "khop_strength", "strength_entropy",
           "layer_strengths", "LayerStrengths", "region_mask", "prune_attention", "HeadImportance",
           "head_importance", "head_importance_loop", "js_divergence", "image_overview", "tsne",
           "cls_patterns", "binarize_patterns", "PatternAutoencoder", "pattern_latents", "context_masks"]

#: pruning modes (SPEC §9): 0 none, 1 all, 2 R1 CLS->CLS, 3 R2 CLS<->patches, 4 R3 patches->patches, 5 R1 ∪ R2
PRUNE_MODES = {0: "none", 1: "all", 2: "cls->cls", 3: "cls<->patches", 4: "patches->patches", 5: "cls->cls + cls<->patches"}


# ----------------------------------------------------------------------------------- geometry
def _positions(grid, device=None) -> torch.Tensor:
    from ..masks import check_grid

    gh, gw = check_grid(grid)
    p = torch.arange(gh * gw, device=device)
    return torch.stack([p // gw, p % gw], -1)  # (n, 2) rows, cols


def _check_patch_size(patch_size) -> float:
    if isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Real) or not float(patch_size) > 0:
        raise ValueError(f"patch_size must be a positive number of pixels, got {patch_size!r}")
    return float(patch_size)


def mean_attention_distance(attn, grid, patch_size, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Mean attention distance in pixels (paper 003 §2, the ViT paper's convention; docs/math.md §9): ``(..., h)``.

    ``MAD = (1/n) sum_i sum_j Ap_ij * patch_size * ||pos_i - pos_j||_2`` over the patch block
    ``Ap = A[..., P:, P:]`` (not renormalised: attention given to prefix tokens counts as distance 0).
    """
    ps = _check_patch_size(patch_size)
    attn, P = check_attention(attn, num_prefix_tokens, grid)
    pos = _positions(grid, attn.device).double()
    dist = torch.cdist(pos, pos) * ps
    Ap = attn[..., P:, P:].double()
    return (Ap * dist).sum(-1).mean(-1)


def _chebyshev(grid, device=None) -> torch.Tensor:
    pos = _positions(grid, device)
    return (pos[:, None, :] - pos[None, :, :]).abs().amax(-1)  # (n, n)


def ring_sizes(grid) -> torch.Tensor:
    """``|N_k(u)|`` for every patch ``u`` and ring ``k = 0 .. max(gh, gw) - 1``: ``(n, K)`` int64 (eq. 7)."""
    from ..masks import check_grid

    gh, gw = check_grid(grid)
    D = _chebyshev(grid)
    K = max(gh, gw)
    return torch.stack([(D == k).sum(1) for k in range(K)], 1)


def khop_strength(attn, grid, num_prefix_tokens: int = 0) -> torch.Tensor:
    """k-hop attention strength (paper 003 §5.3, eq. 7–8; docs/math.md §9): ``(..., h, K)``, ``K = max(gh, gw)``.

    ``N_k(u) = {v : max(|r_u - r_v|, |c_u - c_v|) = k}`` (Chebyshev ring), ``s_k(u) = mean_{v in N_k(u)}
    Ap[u, v]`` and ``s_k`` the mean of ``s_k(u)`` over the patches ``u`` whose ring ``k`` is not empty.
    """
    attn, P = check_attention(attn, num_prefix_tokens, grid)
    D = _chebyshev(grid, attn.device)
    K = int(D.max()) + 1
    onehot = torch.nn.functional.one_hot(D, K).double()  # (n, n, K)
    size = onehot.sum(1)  # (n, K)
    Ap = attn[..., P:, P:].double()
    lead = Ap.shape[:-2]
    n = Ap.shape[-1]
    # per query u: sum over v of Ap[u, v] grouped by ring -> (n, ..., K) as a batched matmul over u
    sums = torch.bmm(Ap.reshape(-1, n, n).transpose(0, 1), onehot)  # (n, M, K)
    has = size > 0
    per_u = sums / size.clamp_min(1)[:, None, :]
    s = (per_u * has[:, None, :]).sum(0) / has.sum(0).clamp_min(1)
    return s.reshape(*lead, K)


def strength_entropy(strength) -> torch.Tensor:
    """Normalised entropy of the k-hop strengths (paper 003 §5.3; docs/math.md §9): ``(..., h)`` in ``[0, 1]``.

    ``q = s / sum_k s_k``, ``H = -sum_k q_k ln q_k / ln K`` (``0 ln 0 = 0``); 1 for flat strength, 0 when
    one ring holds all of it.
    """
    if not isinstance(strength, torch.Tensor) or not strength.is_floating_point():
        raise TypeError(f"strength must be a floating-point tensor, got {type(strength).__name__}")
    if strength.dim() < 1 or strength.shape[-1] < 2:
        raise ValueError(f"strength must have shape (..., K) with K >= 2 rings, got {tuple(strength.shape)}")
    if strength.numel() and bool((strength < 0).any()):
        raise ValueError("strength must be non-negative (attention strengths)")
    s = strength.double()
    tot = s.sum(-1, keepdim=True)
    q = s / tot.clamp_min(1e-300)
    H = -torch.special.xlogy(q, q).sum(-1) / math.log(s.shape[-1])
    return torch.where(tot.squeeze(-1) > 0, H, torch.full_like(H, float("nan")))


class LayerStrengths(NamedTuple):
    """Per layer and head, from :func:`layer_strengths`: ``strength (B, L, h, K)``, ``entropy`` and ``mad`` ``(B, L, h)``."""

    strength: torch.Tensor
    entropy: torch.Tensor
    mad: torch.Tensor


def layer_strengths(maps: Iterable[torch.Tensor], grid, patch_size, num_prefix_tokens: int = 0) -> LayerStrengths:
    """k-hop strength, its entropy and the mean attention distance of every layer from streamed maps.

    Each ``(B, h, N, N)`` map is reduced to ``(B, h, K)`` before the next one exists (docs/math.md §9).
    """
    st, mad = [], []
    for A in maps:
        st.append(khop_strength(A, grid, num_prefix_tokens).cpu())
        mad.append(mean_attention_distance(A, grid, patch_size, num_prefix_tokens).cpu())
    if not st:
        raise ValueError("maps yielded no attention map")
    s = torch.stack(st, 1)
    return LayerStrengths(s, strength_entropy(s), torch.stack(mad, 1))


# ------------------------------------------------------------------------------------ pruning
def _check_modes(modes) -> Tuple[int, ...]:
    if isinstance(modes, (int, np.integer)) and not isinstance(modes, bool):
        modes = (modes,)
    try:
        modes = tuple(modes)
    except TypeError:
        raise ValueError(f"modes must be a sequence of pruning modes in {sorted(PRUNE_MODES)}, got {modes!r}") from None
    if not modes:
        raise ValueError("modes must name at least one pruning mode")
    for m in modes:
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or int(m) not in PRUNE_MODES:
            raise ValueError(f"modes must be drawn from {sorted(PRUNE_MODES)} ({PRUNE_MODES}), got {m!r}")
    return tuple(int(m) for m in modes)


def region_mask(mode: int, N: int, num_prefix_tokens: int = 1, device=None) -> torch.Tensor:
    """Bool ``(N, N)``: the entries of a head's map that pruning ``mode`` zeroes (paper 003 §5.2; SPEC §9).

    R1 = ``A[0, 0]``; R2 = ``A[0, P:]`` and ``A[P:, 0]``; R3 = ``A[P:, P:]``. Modes: 0 none, 1 all,
    2 R1, 3 R2, 4 R3, 5 R1 ∪ R2. Decision (SPEC §9): the paper does not name modes 2–5; this order
    is ours. With ``P = 0`` there is no CLS token and R1, R2 are empty.
    """
    (mode,) = _check_modes((mode,))
    P = check_prefix(num_prefix_tokens)
    r = torch.zeros(N, N, dtype=torch.bool, device=device)
    if mode == 1:
        r[:] = True
    if P >= 1 and mode in (2, 5):
        r[0, 0] = True
    if P >= 1 and mode in (3, 5):
        r[0, P:] = True
        r[P:, 0] = True
    if mode == 4:
        r[P:, P:] = True
    return r


def prune_attention(attn: torch.Tensor, heads: Sequence[int], modes: Sequence[int], num_prefix_tokens: int
                    ) -> torch.Tensor:
    """Zero head ``heads[v]`` of ``attn`` in the region of ``modes[v]`` for variant ``v`` (no renormalisation).

    ``attn`` is ``(V * B, h, N, N)`` with the variant as the outer batch index; returns a new tensor.
    """
    VB, h, N, _ = attn.shape
    V = len(heads)
    keep = torch.ones(V, h, N, N, dtype=attn.dtype, device=attn.device)
    regions = {m: region_mask(m, N, num_prefix_tokens, attn.device) for m in set(modes)}
    for v, (j, m) in enumerate(zip(heads, modes)):
        keep[v, j] = (~regions[m]).to(attn.dtype)
    return (attn.reshape(V, VB // V, h, N, N) * keep[:, None]).reshape(VB, h, N, N)


@dataclass
class HeadImportance:
    """Result of :func:`head_importance`: every metric ``(B, L, h, len(modes))`` (paper 003 eq. 3–6).

    ``prob`` ``I_prob = p[y] - p_pruned[y]``; ``jsd`` ``I_JSD`` in ``[0, ln 2]``; ``cls`` ``I_cls`` (NaN
    without a prefix token); ``patch`` ``I_patch``; ``p_pruned`` ``p_pruned[y]`` (the image overview of
    §5.1); ``p`` ``(B,)`` the unpruned ``p[y]``; ``labels`` ``(B,)`` the ``y`` used; ``modes``.
    """

    prob: torch.Tensor
    jsd: torch.Tensor
    cls: torch.Tensor
    patch: torch.Tensor
    p_pruned: torch.Tensor
    p: torch.Tensor
    labels: torch.Tensor
    modes: Tuple[int, ...]

    def to_dict(self) -> dict:
        return {"modes": list(self.modes), "mode_names": [PRUNE_MODES[m] for m in self.modes],
                "labels": self.labels.tolist(), "p": self.p.tolist(),
                **{k: getattr(self, k).tolist() for k in ("prob", "jsd", "cls", "patch", "p_pruned")}}


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``JSD(p || q) = KL(p || m) / 2 + KL(q || m) / 2``, ``m = (p + q) / 2``, natural logs, over the last dim.

    In ``[0, ln 2]`` (paper 003 eq. 4; docs/math.md §9), clamped there against rounding.
    """
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)
    kl = lambda a: (torch.special.xlogy(a, a) - torch.special.xlogy(a, m)).sum(-1)  # noqa: E731
    return (0.5 * kl(p) + 0.5 * kl(q)).clamp(0.0, math.log(2.0))


def _staged(model: nn.Module):
    from .maps import _is_staged_vit

    if not _is_staged_vit(model):
        raise ValueError("model must be a timm VisionTransformer (blocks in an nn.Sequential), possibly built with "
                         "a vitpatch attention layer (attn_layer=WindowAttention): its blocks are rerun one at a time")
    mods = [blk.attn for blk in model.blocks]
    if any(m not in attention_modules(model) for m in mods):
        raise ValueError("every block's attn must be timm Attention-like (fused_attn switch and attn_drop module)")
    return mods


def _embed(model, images):
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def _head(model, x):
    return model.forward_head(model.norm(x))


def _repeat_kwargs(kwargs: dict, V: int) -> dict:
    """Repeat per-image forward kwargs (a per-image WindowMask) for ``V`` variants of a batch."""
    from ..masks import WindowMask

    out = {}
    for k, v in kwargs.items():
        if isinstance(v, WindowMask) and v.batch_size is not None:
            w = v.windows.repeat(V, 1, 1) if v.windows.dim() == 3 else v.windows
            kk = None if v.key_keep is None else v.key_keep.repeat(V, 1)
            tk = None if v.token_keep is None else v.token_keep.repeat(V, 1)
            v = WindowMask(w, v.grid, v.num_prefix_tokens, kk, token_keep=tk)
        elif isinstance(v, torch.Tensor) and v.dim() >= 1:
            raise ValueError(f"forward kwarg {k!r} is a tensor: per-image tensors cannot be repeated for the "
                             f"batched variants (pass a WindowMask or use head_importance_loop)")
        out[k] = v
    return out


@contextlib.contextmanager
def _unfused(model: nn.Module):
    """All attention modules unfused and in eval mode, restored afterwards."""
    mods = attention_modules(model)
    saved = [m.fused_attn for m in mods]
    training = [(m, m.training) for m in model.modules()]
    try:
        for m in mods:
            m.fused_attn = False
        model.eval()
        yield mods
    finally:
        for m, f in zip(mods, saved):
            m.fused_attn = f
        for m, t in training:
            m.training = t


def _pruning_hook(attn_module: nn.Module, heads, modes, P: int):
    def hook(_mod, _args, out):
        return prune_attention(out, heads, modes, P)
    return attn_module.attn_drop.register_forward_hook(hook)


def _capture_output(module: nn.Module, store: list):
    def hook(_mod, _args, out):
        store.append(out)
    return module.register_forward_hook(hook)


def _check_images(images, labels):
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (B, C, H, W), got {getattr(images, 'shape', type(images).__name__)}")
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape (B,) = ({images.shape[0]},), got {tuple(labels.shape)}")
    return labels


class _Collector:
    """Turns each pruned variant's logits and attention output into its metrics at once (nothing large is kept)."""

    def __init__(self, logits0, z0, labels, P, modes, B, L, h):
        self.p0 = logits0.double().softmax(-1)
        self.y = self.p0.argmax(-1) if labels is None else labels.to(self.p0.device).long()
        self.p0y = self.p0.gather(1, self.y[:, None])[:, 0]
        self.z0, self.P, self.modes = z0, P, tuple(modes)
        shape = (B, L, h, len(modes))
        self.prob, self.jsd, self.pp, self.cls, self.patch = (torch.empty(shape, dtype=torch.float64)
                                                              for _ in range(5))

    def add(self, l: int, j: int, mi: int, logits: torch.Tensor, z_pruned: torch.Tensor) -> None:
        q = logits.double().softmax(-1)
        qy = q.gather(1, self.y[:, None])[:, 0]
        self.pp[:, l, j, mi] = qy.cpu()
        self.prob[:, l, j, mi] = (self.p0y - qy).cpu()
        self.jsd[:, l, j, mi] = js_divergence(self.p0, q).cpu()
        cos = torch.nn.functional.cosine_similarity(self.z0[l].double(), z_pruned.double(), dim=-1, eps=1e-12)
        self.cls[:, l, j, mi] = (1 - cos[:, 0]).cpu() if self.P >= 1 else float("nan")
        self.patch[:, l, j, mi] = (1 - cos[:, self.P:]).mean(-1).cpu()

    def result(self) -> HeadImportance:
        return HeadImportance(self.prob, self.jsd, self.cls, self.patch, self.pp, self.p0y.cpu(), self.y.cpu(),
                              self.modes)


@torch.no_grad()
def head_importance(model: nn.Module, images: torch.Tensor, labels=None, modes: Sequence[int] = (1,),
                    max_batch: int = 256, progress: bool = False, **forward_kwargs) -> HeadImportance:
    """Head importance by pruning (paper 003 §5.2, eq. 3–6; docs/math.md §9), batched.

    Pruning head ``(l, j)`` in mode ``m`` zeroes its post-softmax map in the region of
    :func:`region_mask` (no renormalisation; the hook sits on ``attn_drop`` of block ``l``, run
    unfused). Model level: ``I_prob = p[y] - p_pruned[y]`` and ``I_JSD = JSD(p || p_pruned)``
    (softmax probabilities, natural logs; ``y = labels`` or the unpruned argmax). Layer level, on
    the attention module's output ``z`` (after the projection): ``I_cls = 1 - cos(z_0, z'_0)``,
    ``I_patch = mean_i (1 - cos(z_i, z'_i))`` over patch tokens.

    Cost: one unpruned forward caches every block's input; for each block ``l`` the
    ``h * len(modes)`` variants run as one batch (in chunks of at most ``max_batch`` images, at least one variant each)
    from that cached input through blocks ``l .. L-1`` and the head. Every attention module runs
    unfused (explicit softmax) in all passes, so pruned and unpruned numbers share one code path.

    Args:
        model: a timm ``VisionTransformer`` (also with ``attn_layer=WindowAttention`` etc.).
        images: ``(B, C, H, W)`` model inputs.
        labels: ``(B,)`` class indices, or None for the unpruned prediction.
        modes: pruning modes from :data:`PRUNE_MODES`.
        **forward_kwargs: passed to every block, e.g. ``attn_mask=WindowMask(...)``.

    Returns a :class:`HeadImportance` with ``prob``, ``jsd``, ``cls``, ``patch`` ``(B, L, h, len(modes))``.
    """
    modes = _check_modes(modes)
    labels = _check_images(images, labels)
    attn_mods = _staged(model)
    P = check_prefix(model.num_prefix_tokens)
    dev = next(model.parameters()).device
    x = images.to(dev)
    B, L, h = x.shape[0], len(model.blocks), attn_mods[0].num_heads
    variants = [(j, mi) for j in range(h) for mi in range(len(modes))]
    V = len(variants)
    if isinstance(max_batch, bool) or not isinstance(max_batch, numbers.Integral) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer (images per pruned-variant batch), got {max_batch!r}")
    chunk = max(1, int(max_batch) // B)
    with _unfused(model):
        inputs, z0 = [], []
        t = _embed(model, x)
        for blk in model.blocks:
            inputs.append(t)
            store: list = []
            handle = _capture_output(blk.attn, store)
            try:
                t = blk(t, **forward_kwargs)
            finally:
                handle.remove()
            z0.append(store[0])
        out = _Collector(_head(model, t), z0, labels, P, modes, B, L, h)
        steps = [(l, s) for l in range(L) for s in range(0, V, chunk)]
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="pruned variants", unit="batch", leave=False)
        for l, s in steps:
            part = variants[s:s + chunk]
            Vc = len(part)
            kw = _repeat_kwargs(forward_kwargs, Vc)
            tv = inputs[l].repeat(Vc, 1, 1)
            store = []
            hooks = [_pruning_hook(attn_mods[l], [j for j, _ in part], [modes[mi] for _, mi in part], P),
                     _capture_output(attn_mods[l], store)]
            try:
                tv = model.blocks[l](tv, **kw)
            finally:
                for hk in hooks:
                    hk.remove()
            for blk in model.blocks[l + 1:]:
                tv = blk(tv, **kw)
            logits = _head(model, tv).reshape(Vc, B, -1)
            zs = store[0].reshape(Vc, B, *store[0].shape[1:])
            for v, (j, mi) in enumerate(part):
                out.add(l, j, mi, logits[v], zs[v])
        del inputs
    return out.result()


@torch.no_grad()
def head_importance_loop(model: nn.Module, images: torch.Tensor, labels=None, modes: Sequence[int] = (1,),
                         **forward_kwargs) -> HeadImportance:
    """:func:`head_importance` the plain way: one full forward of the batch per pruned ``(l, head, mode)``.

    Same definitions and result; it reruns every block for every pruned head
    (``L * h * len(modes)`` full forwards). Kept as the oracle of the batched version and as the
    baseline of ``bench/heads.py``. Works on any model whose attention modules are timm-like.
    """
    modes = _check_modes(modes)
    labels = _check_images(images, labels)
    attn_mods = [m for m in attention_modules(model)]
    if not attn_mods:
        raise ValueError("model has no timm Attention-like module")
    P = check_prefix(getattr(model, "num_prefix_tokens", 0))
    dev = next(model.parameters()).device
    x = images.to(dev)
    B, L, h = x.shape[0], len(attn_mods), attn_mods[0].num_heads
    with _unfused(model):
        z0: list = []
        hs = [_capture_output(m, z0) for m in attn_mods]
        try:
            logits0 = model(x, **forward_kwargs)
        finally:
            for hk in hs:
                hk.remove()
        out = _Collector(logits0, z0, labels, P, modes, B, L, h)
        for l in range(L):
            for j in range(h):
                for mi, m in enumerate(modes):
                    store: list = []
                    hooks = [_pruning_hook(attn_mods[l], [j], [m], P), _capture_output(attn_mods[l], store)]
                    try:
                        logits = model(x, **forward_kwargs)
                    finally:
                        for hk in hooks:
                            hk.remove()
                    out.add(l, j, mi, logits, store[0])
    return out.result()


# ---------------------------------------------------------------------------- overview, t-SNE
def tsne(features, perplexity: Optional[float] = None, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (scikit-learn) of ``features (M, D)``; perplexity ``min(30, (M - 1) / 3)`` unless given."""
    from sklearn.manifold import TSNE

    f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, float)
    if f.ndim != 2 or len(f) < 3:
        raise ValueError(f"features must have shape (M, D) with M >= 3 points, got {f.shape}")
    f = np.nan_to_num(f)
    perp = min(30.0, max(1.0, (len(f) - 1) / 3.0)) if perplexity is None else float(perplexity)
    if not 0 < perp < len(f):
        raise ValueError(f"perplexity must be in (0, {len(f)}), got {perp}")
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(f)


def image_overview(result: HeadImportance, mode: int = 1, perplexity: Optional[float] = None, seed: int = 0
                   ) -> np.ndarray:
    """Image overview (paper 003 §5.1, Fig. 1A): t-SNE of each image's ``L*h`` vector of ``p_pruned[y]``, ``(B, 2)``."""
    if mode not in result.modes:
        raise ValueError(f"mode must be one of the result's modes {result.modes}, got {mode!r}")
    v = result.p_pruned[..., result.modes.index(mode)].reshape(result.p_pruned.shape[0], -1)
    return tsne(v, perplexity, seed)


# --------------------------------------------------------------------------------- patterns (§5.4)
def cls_patterns(attn, num_prefix_tokens: int = 1) -> torch.Tensor:
    """CLS pattern of every head (paper 003 §5.4, Fig. 6B): ``concat(A[0, :], A[P:, 0])``, ``(..., h, N + n)``."""
    attn, P = check_attention(attn, num_prefix_tokens)
    if P < 1:
        raise ValueError("num_prefix_tokens must be >= 1 for CLS patterns (token 0 is the CLS token)")
    return torch.cat([attn[..., 0, :], attn[..., P:, 0]], -1)


def binarize_patterns(attn, num_prefix_tokens: int = 0, top: float = 0.01) -> torch.Tensor:
    """Patch pattern of every head (paper 003 §5.4, Fig. 6C): the top ``top`` share of ``Ap``'s entries
    set to 1, the rest 0, ``(..., h, n, n)`` float (at least one entry per head)."""
    if isinstance(top, bool) or not isinstance(top, numbers.Real) or not 0 < float(top) <= 1:
        raise ValueError(f"top must be a fraction in (0, 1], got {top!r}")
    attn, P = check_attention(attn, num_prefix_tokens)
    Ap = attn[..., P:, P:]
    n = Ap.shape[-1]
    flat = Ap.reshape(*Ap.shape[:-2], n * n)
    k = max(1, int(math.ceil(float(top) * n * n)))
    idx = flat.topk(k, -1).indices
    out = torch.zeros_like(flat, dtype=torch.float32).scatter_(-1, idx, 1.0)
    return out.reshape(Ap.shape)


class PatternAutoencoder(nn.Module):
    """Small conv autoencoder of binarised ``n x n`` patch patterns (paper 003 §5.4; SPEC §9 decision).

    Encoder: conv 1->8 (3x3, stride 2) + ReLU, conv 8->16 (3x3, stride 2) + ReLU, linear to a
    ``latent``-d code (64). Decoder mirrored: linear, two transposed convs (4x4, stride 2), cropped
    to ``n x n``; trained with BCE on logits.
    """

    def __init__(self, n: int, latent: int = 64):
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n must be a positive integer (patches), got {n!r}")
        self.n = int(n)
        s = (self.n + 1) // 2
        self.s = (s + 1) // 2
        self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(16 * self.s * self.s, latent))
        self.dec_fc = nn.Linear(latent, 16 * self.s * self.s)
        self.dec = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(8, 1, 4, 2, 1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x.reshape(-1, 1, self.n, self.n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encode(x)
        y = self.dec(self.dec_fc(z).reshape(-1, 16, self.s, self.s))
        return y[..., :self.n, :self.n]


def pattern_latents(patterns: torch.Tensor, epochs: int = 30, latent: int = 64, lr: float = 3e-3,
                    batch_size: int = 32, seed: int = 0) -> Tuple[torch.Tensor, List[float]]:
    """Train :class:`PatternAutoencoder` on ``patterns (M, n, n)`` (0/1) and return ``(latents (M, latent), losses)``."""
    if not isinstance(patterns, torch.Tensor) or patterns.dim() != 3 or patterns.shape[1] != patterns.shape[2]:
        raise ValueError(f"patterns must have shape (M, n, n), got {getattr(patterns, 'shape', None)}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = patterns.detach().float().cpu()
    model = PatternAutoencoder(x.shape[-1], latent)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    with torch.enable_grad():
        for _ in range(max(1, int(epochs))):
            tot = 0.0
            for idx in torch.randperm(len(x), generator=g).split(batch_size):
                xb = x[idx]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb)[:, 0], xb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(idx)
            losses.append(tot / len(x))
    with torch.no_grad():
        return model.encode(x), losses


def context_masks(attn, grid, num_prefix_tokens: int = 1, patch: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Image-context masks (paper 003 Fig. 6D/E) of every head, each ``(..., h, gh, gw)``.

    ``cls_to_patches`` ``A[0, P:]`` and ``patches_to_cls`` ``A[P:, 0]`` (with a CLS token), and for
    ``patch`` ``p``: ``patch_row`` ``A[P + p, P:]`` (what ``p`` attends to) and ``patch_col``
    ``A[P:, P + p]`` (who attends to ``p``).
    """
    from ..masks import check_grid

    gh, gw = check_grid(grid)
    attn, P = check_attention(attn, num_prefix_tokens, grid)
    shape = (*attn.shape[:-2], gh, gw)
    out = {}
    if P >= 1:
        out["cls_to_patches"] = attn[..., 0, P:].reshape(shape)
        out["patches_to_cls"] = attn[..., P:, 0].reshape(shape)
    if patch is not None:
        if isinstance(patch, bool) or not isinstance(patch, numbers.Integral) or not 0 <= patch < gh * gw:
            raise ValueError(f"patch must be a patch index in [0, {gh * gw}), got {patch!r}")
        out["patch_row"] = attn[..., P + patch, P:].reshape(shape)
        out["patch_col"] = attn[..., P:, P + patch].reshape(shape)
    return out
