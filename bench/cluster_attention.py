"""Patch-to-cluster attention (PaCa, paper 004 §3.3, docs/math.md §7) against its anchors.

Three ops, at a ViT width (``C = h * 64``), with ``M = 49`` clusters and PVTv2's
spatial-reduction ratio chosen so that it also keeps 49 key tokens (``sr = side / 7``):

``cluster_pool``       ``z = softmax_over_tokens(logits)^T x``: ``vitpatch``, ``reference``, and
                       ``pvt_sra``: the reduction PVTv2 uses instead (timm ``pvt_v2.Attention``'s
                       strided ``sr`` conv + ``norm``), producing the same ``(B, 49, C)``.
``cluster_attention``  ``N`` queries over ``M`` keys: ``vitpatch``, ``reference``, and ``sdpa``
                       (``F.scaled_dot_product_attention``, what PVTv2's attention runs over its
                       reduced keys).
``paca_layer``         the whole layer, :class:`vitpatch.nn.PaCaAttention` (``clustering="paper"``):
                       ``vitpatch`` (default backends), ``reference`` (the same module with
                       ``VITPATCH_BACKEND=reference``), and ``pvt_sra`` (timm
                       ``pvt_v2.Attention(dim, num_heads, sr_ratio)`` on the same tokens).
"""
from __future__ import annotations

from typing import Any, Dict, List

from .common import autograd_case, forced_backend, max_abs_err, randn, torch_dtype
from .harness import Case, Config, Prepared

MODULE = "bench.cluster_attention"
OPS = ("cluster_pool", "cluster_attention", "paca_layer")
IMPLS = {"cluster_pool": ("vitpatch", "reference", "pvt_sra"),
         "cluster_attention": ("vitpatch", "reference", "sdpa"),
         "paca_layer": ("vitpatch", "reference", "pvt_sra")}
CLUSTERS = 49
HEAD_DIM = 64


def problem_sizes(cfg: Config) -> List[Dict[str, int]]:
    """``B``, grid ``side`` (``n = side^2`` patch tokens, no prefix), heads ``h`` (``C = 64 h``)."""
    if cfg.quick:
        return [{"B": 2, "side": 14, "h": 3}, {"B": 2, "side": 28, "h": 3}]          # ViT-Ti width, n = 196, 784
    return [{"B": 64, "side": 14, "h": 12}, {"B": 16, "side": 28, "h": 12}, {"B": 4, "side": 56, "h": 12}]  # ViT-B


def shape_for(op: str, size: Dict[str, int]) -> Dict[str, Any]:
    B, side, h = size["B"], size["side"], size["h"]
    n, C = side * side, h * HEAD_DIM
    if op == "cluster_pool":
        return {"B": B, "n": n, "M": CLUSTERS, "C": C, "grid": [side, side]}
    if op == "cluster_attention":
        return {"B": B, "h": h, "N": n, "M": CLUSTERS, "d": HEAD_DIM}
    return {"B": B, "N": n, "C": C, "h": h, "M": CLUSTERS, "grid": [side, side]}


def cases(cfg: Config) -> List[Case]:
    out = []
    for size in problem_sizes(cfg):
        for op in OPS:
            for impl in IMPLS[op]:
                for mode in ("fwd", "bwd", "fwd+bwd"):
                    out.append(Case(MODULE, op, impl, mode, shape_for(op, size), cfg.device, cfg.dtype))
    return out


def _sr_ratio(side: int) -> int:
    return max(1, side // 7)


def _pvt_attention(C: int, h: int, side: int, device, dtype):
    from timm.models.pvt_v2 import Attention
    return Attention(C, num_heads=h, sr_ratio=_sr_ratio(side)).to(device=device, dtype=dtype)


def build(case: Case, check: bool = True) -> Prepared:
    import torch
    import torch.nn.functional as F
    from vitpatch import functional, reference

    s, impl = case.shape, case.impl
    device, dtype = torch.device(case.device), torch_dtype(case.dtype)
    grad = case.mode != "fwd"
    info: Dict[str, Any] = {"extra": {}}

    if case.op == "cluster_pool":
        B, n, M, C = s["B"], s["n"], s["M"], s["C"]
        side = s["grid"][0]
        x = randn(B, n, C, device=device, dtype=dtype, grad=grad)
        if impl == "pvt_sra":
            attn = _pvt_attention(C, 1, side, device, dtype)
            sr, norm = attn.sr, attn.norm
            info["extra"]["anchor"] = f"timm pvt_v2.Attention sr (Conv2d k=s=stride {_sr_ratio(side)}) + norm"

            def fwd():
                img = x.transpose(1, 2).reshape(B, C, side, side)
                return norm(sr(img).flatten(2).transpose(1, 2))
            return autograd_case(fwd, [x, *attn.parameters()], case.mode, info=info)
        logits = randn(B, n, M, device=device, dtype=dtype, grad=grad)
        if impl == "vitpatch":
            info["backend"] = functional.backend_for("cluster_pool", logits, x)
            fn = functional.cluster_pool
        elif impl == "reference":
            fn = reference.cluster_pool
        else:
            raise ValueError(f"unknown impl {impl!r} for cluster_pool")
        if check and impl == "vitpatch" and not grad:
            with torch.no_grad():
                info["max_abs_err"] = max_abs_err(fn(logits, x), reference.cluster_pool(logits, x, upcast=True))
        return autograd_case(lambda: fn(logits, x), (logits, x), case.mode, info=info)

    if case.op == "cluster_attention":
        B, h, N, M, d = s["B"], s["h"], s["N"], s["M"], s["d"]
        q = randn(B, h, N, d, device=device, dtype=dtype, grad=grad)
        k, v = (randn(B, h, M, d, device=device, dtype=dtype, grad=grad) for _ in range(2))
        scale = d ** -0.5
        if impl == "vitpatch":
            info["backend"] = functional.backend_for("cluster_attention", q, k, v, scale=scale)

            def fwd():
                return functional.cluster_attention(q, k, v, scale=scale)
        elif impl == "reference":
            def fwd():
                return reference.cluster_attention(q, k, v, scale=scale)
        elif impl == "sdpa":
            def fwd():
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            raise ValueError(f"unknown impl {impl!r} for cluster_attention")
        if check and impl in ("vitpatch", "sdpa") and not grad:
            with torch.no_grad():
                info["max_abs_err"] = max_abs_err(fwd(), reference.cluster_attention(q, k, v, scale=scale, upcast=True))
        return autograd_case(fwd, (q, k, v), case.mode, info=info)

    if case.op == "paca_layer":
        from vitpatch.nn import PaCaAttention
        B, N, C, h, M = s["B"], s["N"], s["C"], s["h"], s["M"]
        side = s["grid"][0]
        x = randn(B, N, C, device=device, dtype=dtype, grad=grad)
        if impl == "pvt_sra":
            layer = _pvt_attention(C, h, side, device, dtype)
            info["extra"]["anchor"] = f"timm pvt_v2.Attention(dim={C}, num_heads={h}, sr_ratio={_sr_ratio(side)})"

            def fwd():
                return layer(x, [side, side])
            return autograd_case(fwd, [x, *layer.parameters()], case.mode, info=info)
        layer = PaCaAttention(C, h, num_clusters=M, clustering="paper", grid=(side, side),
                              num_prefix_tokens=0).to(device=device, dtype=dtype)
        info["extra"]["layer"] = f"vitpatch.nn.PaCaAttention(dim={C}, num_heads={h}, num_clusters={M}, clustering='paper')"
        if impl == "vitpatch":
            probe_logits = torch.zeros(B, N, M, device=device, dtype=dtype)
            qh = torch.zeros(B, h, N, C // h, device=device, dtype=dtype)
            kh = torch.zeros(B, h, M, C // h, device=device, dtype=dtype)
            pool = functional.backend_for("cluster_pool", probe_logits, x)
            attn = functional.backend_for("cluster_attention", qh, kh, kh, scale=(C // h) ** -0.5)
            info["backend"] = pool if pool == attn else f"cluster_pool={pool},cluster_attention={attn}"
            context = None
        elif impl == "reference":
            info["backend"] = None

            def context():
                return forced_backend("reference")
        else:
            raise ValueError(f"unknown impl {impl!r} for paca_layer")
        if check and impl == "vitpatch" and not grad:
            with torch.no_grad():
                out = layer(x)
                with forced_backend("reference"):
                    ref = layer(x)
                info["max_abs_err"] = max_abs_err(out, ref)
        return autograd_case(lambda: layer(x), [x, *layer.parameters()], case.mode, info=info, context=context)

    raise ValueError(f"unknown op {case.op!r}")
