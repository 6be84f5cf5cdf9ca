"""Patch-interaction uncertainty ``U`` over a batch (paper 000 eq. 2–3, docs/math.md §2): streaming vs stacking.

``U`` needs the attention maps of every layer. Two ways to get it from a timm ViT, both
timed end to end (the model's forward with explicit attention included):

``streaming``  :func:`vitpatch.analysis.uncertainty` over :func:`vitpatch.analysis.attention_maps`:
               one layer's ``(B, h, N, N)`` maps at a time, running moments in float64
               (memory ``O(B h n^2)`` whatever the depth).
``stacked``    every layer's maps collected and stacked to ``(L, B, h, n, n)`` float64, then the
               population variance over layers and over heads (memory ``O(L B h n^2)``).

Mode ``fwd`` only (no gradient). The error column is ``max |U_streaming - U_stacked|``.
"""
from __future__ import annotations

from typing import Any, Dict, List

from .common import torch_dtype
from .harness import Case, Config, Prepared

MODULE = "bench.uncertainty"
OPS = ("uncertainty",)
IMPLS = ("streaming", "stacked")


def problem_sizes(cfg: Config) -> List[Dict[str, Any]]:
    if cfg.quick:
        return [{"model": "vit_tiny_patch16_224", "img": 96, "B": 2}, {"model": "vit_tiny_patch16_224", "img": 224, "B": 2}]
    return [{"model": "vit_base_patch16_224", "img": 224, "B": 8}, {"model": "vit_base_patch16_224", "img": 384, "B": 2}]


def cases(cfg: Config) -> List[Case]:
    return [Case(MODULE, "uncertainty", impl, "fwd", dict(size), cfg.device, cfg.dtype)
            for size in problem_sizes(cfg) for impl in IMPLS]


def stacked_uncertainty(maps, num_prefix_tokens: int):
    """``U`` from all layers at once: ``var_h(var_l(A))`` over the stacked ``(L, B, h, n, n)`` maps."""
    import torch
    P = num_prefix_tokens
    A = torch.stack([m[:, :, P:, P:].double() for m in maps])
    return A.var(0, unbiased=False).var(1, unbiased=False)


def build(case: Case, check: bool = True) -> Prepared:
    import timm
    import torch
    from vitpatch import analysis

    s, impl = case.shape, case.impl
    device, dtype = torch.device(case.device), torch_dtype(case.dtype)
    model = timm.create_model(s["model"], pretrained=False, img_size=s["img"]).to(device=device, dtype=dtype).eval()
    images = torch.randn(s["B"], 3, s["img"], s["img"], device=device, dtype=dtype)
    P = model.num_prefix_tokens
    n = model.patch_embed.num_patches
    info: Dict[str, Any] = {"extra": {"layers": len(model.blocks), "heads": model.blocks[0].attn.num_heads,
                                      "tokens": P + n, "weights": "random"}}

    def streaming():
        return analysis.uncertainty(analysis.attention_maps(model, images), P)

    def stacked():
        return stacked_uncertainty(list(analysis.attention_maps(model, images)), P)

    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r} for uncertainty")
    if check and impl == "streaming":
        info["max_abs_err"] = float((streaming() - stacked()).abs().max())
    fn = streaming if impl == "streaming" else stacked

    def step():
        with torch.no_grad():
            return fn()
    return Prepared(step=step, info=info, items_per_step=s["B"])
