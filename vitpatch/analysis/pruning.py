"""Head importance by pruning (paper 003 §5.2, eq. 3–6; docs/math.md §9).

Pruning head ``(l, j)`` in mode ``m`` zeroes its post-softmax map in a region (Fig. 4)::

    res = analysis.head_importance(model, x, labels, modes=(1, 2, 3, 4, 5))
    res.prob, res.jsd, res.cls, res.patch                                              # (B, L, h, modes)
    res.top5_prob, res.top5_class                                                      # (B, L, h, modes, 5)

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
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .maps import attention_modules, check_prefix

__all__ = ["PRUNE_MODES", "TOP_K", "check_modes", "region_mask", "prune_attention", "HeadImportance",
           "head_importance", "head_importance_loop", "js_divergence", "image_overview"]

#: pruning modes (paper 003 Fig. 4): 0 none, 1 all, 2 R1 CLS->CLS, 3 R2 CLS<->patches, 4 R3 patches->patches, 5 R1 ∪ R2
PRUNE_MODES = {0: "none", 1: "all", 2: "cls->cls", 3: "cls<->patches", 4: "patches->patches", 5: "cls->cls + cls<->patches"}
#: how many of the most probable classes are kept per pruned variant (paper 003 Fig. 1 B3: top 5)
TOP_K = 5


def check_modes(modes) -> Tuple[int, ...]:
    """``modes`` (one mode or a sequence of them, keys of :data:`PRUNE_MODES`) as a tuple of ints.

    Raises ``ValueError`` naming ``modes`` for an empty sequence or a mode outside ``0..5`` (Fig. 4).
    """
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
    (mode,) = check_modes((mode,))
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

    The top-``k`` predictions (``k = min(5, classes)``, Fig. 1 B3) with the head pruned: ``top5_prob``
    and ``top5_class`` ``(B, L, h, len(modes), k)``, most probable first; unpruned: ``top5_prob0`` and
    ``top5_class0`` ``(B, k)``; ``pred`` ``(B,)`` the unpruned argmax. These are None in results built
    by hand without them.
    """

    prob: torch.Tensor
    jsd: torch.Tensor
    cls: torch.Tensor
    patch: torch.Tensor
    p_pruned: torch.Tensor
    p: torch.Tensor
    labels: torch.Tensor
    modes: Tuple[int, ...]
    top5_prob: Optional[torch.Tensor] = None
    top5_class: Optional[torch.Tensor] = None
    top5_prob0: Optional[torch.Tensor] = None
    top5_class0: Optional[torch.Tensor] = None
    pred: Optional[torch.Tensor] = None

    def to_dict(self) -> dict:
        extra = {k: getattr(self, k).tolist() for k in ("top5_prob", "top5_class", "top5_prob0", "top5_class0", "pred")
                 if getattr(self, k) is not None}
        return {"modes": list(self.modes), "mode_names": [PRUNE_MODES[m] for m in self.modes],
                "labels": self.labels.tolist(), "p": self.p.tolist(),
                **{k: getattr(self, k).tolist() for k in ("prob", "jsd", "cls", "patch", "p_pruned")}, **extra}


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
        C = self.p0.shape[-1]
        if labels is not None and labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < C):
            raise ValueError(f"labels must be class indices in [0, {C}) (the model's classes), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        self.y = self.p0.argmax(-1) if labels is None else labels.to(self.p0.device).long()
        self.p0y = self.p0.gather(1, self.y[:, None])[:, 0]
        self.z0, self.P, self.modes = z0, P, tuple(modes)
        shape = (B, L, h, len(modes))
        self.prob, self.jsd, self.pp, self.cls, self.patch = (torch.empty(shape, dtype=torch.float64)
                                                              for _ in range(5))
        self.k = min(TOP_K, C)
        self.top_p = torch.empty(*shape, self.k, dtype=torch.float64)
        self.top_c = torch.empty(*shape, self.k, dtype=torch.long)
        self.top0 = self.p0.topk(self.k, -1)

    def add(self, l: int, j: int, mi: int, logits: torch.Tensor, z_pruned: torch.Tensor) -> None:
        q = logits.double().softmax(-1)
        qy = q.gather(1, self.y[:, None])[:, 0]
        self.pp[:, l, j, mi] = qy.cpu()
        self.prob[:, l, j, mi] = (self.p0y - qy).cpu()
        self.jsd[:, l, j, mi] = js_divergence(self.p0, q).cpu()
        cos = torch.nn.functional.cosine_similarity(self.z0[l].double(), z_pruned.double(), dim=-1, eps=1e-12)
        self.cls[:, l, j, mi] = (1 - cos[:, 0]).cpu() if self.P >= 1 else float("nan")
        self.patch[:, l, j, mi] = (1 - cos[:, self.P:]).mean(-1).cpu()
        top = q.topk(self.k, -1)
        self.top_p[:, l, j, mi] = top.values.cpu()
        self.top_c[:, l, j, mi] = top.indices.cpu()

    def result(self) -> HeadImportance:
        return HeadImportance(self.prob, self.jsd, self.cls, self.patch, self.pp, self.p0y.cpu(), self.y.cpu(),
                              self.modes, self.top_p, self.top_c, self.top0.values.cpu(), self.top0.indices.cpu(),
                              self.p0.argmax(-1).cpu())


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

    Returns a :class:`HeadImportance` with ``prob``, ``jsd``, ``cls``, ``patch`` ``(B, L, h, len(modes))``
    and the top-5 predictions of every pruned variant (Fig. 1 B3) ``top5_prob`` / ``top5_class``.
    """
    modes = check_modes(modes)
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
    modes = check_modes(modes)
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


def image_overview(result: HeadImportance, mode: int = 1, perplexity: Optional[float] = None, seed: int = 0
                   ) -> np.ndarray:
    """Image overview (paper 003 §5.1, Fig. 1A): t-SNE of each image's ``L*h`` vector of ``p_pruned[y]``, ``(B, 2)``."""
    if mode not in result.modes:
        raise ValueError(f"mode must be one of the result's modes {result.modes}, got {mode!r}")
    v = result.p_pruned[..., result.modes.index(mode)].reshape(result.p_pruned.shape[0], -1)
    from .patterns import tsne

    return tsne(v, perplexity, seed)
