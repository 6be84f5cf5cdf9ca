"""Model throughput: ViT vs AWD-ViT vs WinfT, and PaCa-ViT vs PVTv2 (timm benchmark style).

``vit_model``: one timm ViT built three ways, ``vit`` (timm's attention), ``awd_vit``
(:class:`vitpatch.nn.WindowAttention` with synthetic AWD windows at density 0.23, one mask
per batch, built outside the timing) and ``winft_vit`` (:class:`vitpatch.nn.WinfTAttention`;
in training with the BCE loss against the same windows).
``pyramid_model``: ``paca_vit`` (``paca_vit_b0/b1/b2``, registered with timm by
``import vitpatch.models``) vs ``pvt_v2`` (timm ``pvt_v2_b0/b1/b2``). Until PaCa-ViT is
registered its rows are absent (the run says so); the PVTv2 rows are still measured.

Modes: ``fwd`` = inference (``eval``, ``no_grad``): the row's ``img_per_s`` is batch / median;
``fwd+bwd`` = one training step (forward, cross-entropy (+ WinfT BCE), backward, SGD step).
GPU: AMP in the run's half dtype, channels_last, large batches; inference at 224 and 384,
training of the pyramids at 800x1216 (detection-sized inputs, batch 2). CPU ``--quick``: tiny
models and images (the GPU-only sizes are not run on CPU).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Dict, List, Optional

from .harness import Case, Config, Prepared, Unsupported

MODULE = "bench.models"
AWD_DENSITY = 0.23
VARIANTS = ("b0", "b1", "b2")


def paca_registered(variant: str) -> bool:
    """Whether ``paca_vit_<variant>`` is a timm model after ``import vitpatch.models``."""
    import timm
    try:
        import vitpatch.models  # noqa: F401 - registers the PaCa-ViT models, when present
    except ImportError:
        return False
    return bool(timm.is_model(f"paca_vit_{variant}"))


def _vit_plan(cfg: Config):
    """``(timm name, shape, mode)`` of the ViT-family cases."""
    if cfg.device == "cuda" and not cfg.quick:
        name = "vit_base_patch16_224"
        return [(name, {"model": "vit_base_patch16", "img": [224, 224], "batch": 256}, "fwd"),
                (name, {"model": "vit_base_patch16", "img": [384, 384], "batch": 64}, "fwd"),
                (name, {"model": "vit_base_patch16", "img": [224, 224], "batch": 64}, "fwd+bwd")]
    name = "vit_tiny_patch16_224"
    return [(name, {"model": "vit_tiny_patch16", "img": [64, 64], "batch": 4}, "fwd"),
            (name, {"model": "vit_tiny_patch16", "img": [96, 96], "batch": 4}, "fwd"),
            (name, {"model": "vit_tiny_patch16", "img": [64, 64], "batch": 2}, "fwd+bwd")]


def _pyramid_plan(cfg: Config):
    """``(variant, shape, mode)`` of the PaCa-ViT / PVTv2 cases."""
    if cfg.device == "cuda" and not cfg.quick:
        out = []
        for v in VARIANTS:
            out += [(v, {"variant": v, "img": [224, 224], "batch": 256}, "fwd"),
                    (v, {"variant": v, "img": [384, 384], "batch": 64}, "fwd"),
                    (v, {"variant": v, "img": [800, 1216], "batch": 2}, "fwd+bwd")]
        return out
    return [("b0", {"variant": "b0", "img": [64, 64], "batch": 4}, "fwd"),
            ("b0", {"variant": "b0", "img": [64, 96], "batch": 2}, "fwd+bwd")]


def cases(cfg: Config) -> List[Case]:
    out = []
    for name, shape, mode in _vit_plan(cfg):
        for impl in ("vit", "awd_vit", "winft_vit"):
            out.append(Case(MODULE, "vit_model", impl, mode, dict(shape), cfg.device, cfg.dtype,
                            {"timm_name": name}))
    plan = _pyramid_plan(cfg)
    variants = sorted({v for v, _, _ in plan})
    absent = [v for v in variants if not paca_registered(v)]
    if absent:
        print(f"  PaCa-ViT rows absent: {', '.join(f'paca_vit_{v}' for v in absent)} not registered with timm "
              f"after `import vitpatch.models`; no rows are written for them (PVTv2 rows are still measured)")
    for variant, shape, mode in plan:
        out.append(Case(MODULE, "pyramid_model", "pvt_v2", mode, dict(shape), cfg.device, cfg.dtype,
                        {"timm_name": f"pvt_v2_{variant}"}))
        if variant not in absent:
            out.append(Case(MODULE, "pyramid_model", "paca_vit", mode, dict(shape), cfg.device, cfg.dtype,
                            {"timm_name": f"paca_vit_{variant}"}))
    return out


@functools.lru_cache(maxsize=4)
def _windows(grid: tuple, batch: int):
    from vitpatch.masks import synthetic_awd_windows
    return synthetic_awd_windows(grid, batch, AWD_DENSITY, seed=0)


def _probe_backend(op: str, model, N: int, device, dtype) -> Optional[str]:
    """The backend ``op`` picks for one layer's ``q, k, v`` of this model (probed on zeros)."""
    import torch
    from vitpatch import WindowMask, functional
    blk = model.blocks[0].attn
    h, d = blk.num_heads, blk.head_dim
    q = torch.zeros(1, h, N, d, device=device, dtype=dtype)
    if op == "window_attention":
        P = model.num_prefix_tokens
        gh, gw = model.patch_embed.grid_size
        mask = WindowMask.full((gh, gw), P).to(device)
        return functional.backend_for(op, q, q, q, mask, scale=d ** -0.5)
    return functional.backend_for(op, q, q, q, scale=d ** -0.5, mode="multiply")


def build(case: Case, check: bool = True) -> Prepared:
    import timm
    import torch
    import torch.nn.functional as F

    s, impl = case.shape, case.impl
    device = torch.device(case.device)
    B, (H, W) = s["batch"], s["img"]
    on_cuda = device.type == "cuda"
    half = case.dtype in ("float16", "bfloat16")
    if not on_cuda and half:
        raise Unsupported("model rows on CPU run in float32 (no CPU AMP in this harness)")
    amp_dtype = getattr(torch, case.dtype) if (on_cuda and half) else None
    info: Dict[str, Any] = {"extra": {"timm_name": case.options["timm_name"],
                                      "amp": case.dtype if amp_dtype is not None else None,
                                      "channels_last": on_cuda}}
    kwargs: Dict[str, Any] = {"pretrained": False}
    mask = None
    winft = False
    if case.op == "vit_model":
        from vitpatch import WindowMask
        from vitpatch.nn import WindowAttention, WinfTAttention
        kwargs["img_size"] = (H, W)
        if impl == "awd_vit":
            kwargs["attn_layer"] = WindowAttention
        elif impl == "winft_vit":
            kwargs["attn_layer"] = WinfTAttention
            winft = True
        elif impl != "vit":
            raise ValueError(f"unknown impl {impl!r} for vit_model")
    elif case.op == "pyramid_model":
        if impl == "paca_vit":
            import vitpatch.models  # noqa: F401 - registers paca_vit_*
            if not timm.is_model(case.options["timm_name"]):
                raise Unsupported(f"{case.options['timm_name']} is not registered with timm")
        elif impl != "pvt_v2":
            raise ValueError(f"unknown impl {impl!r} for pyramid_model")
    else:
        raise ValueError(f"unknown op {case.op!r}")

    model = timm.create_model(case.options["timm_name"], **kwargs)
    info["extra"]["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    model = model.to(device)
    x = torch.randn(B, 3, H, W, device=device)
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if case.op == "vit_model":
        grid = tuple(model.patch_embed.grid_size)
        N = model.num_prefix_tokens + grid[0] * grid[1]
        if impl == "awd_vit" or (winft and case.mode != "fwd"):
            mask = WindowMask(_windows(grid, B), grid, model.num_prefix_tokens).to(device)
            info["density"] = mask.density(B)
        if impl != "vit":
            op = "window_attention" if impl == "awd_vit" else "winft_attention"
            info["backend"] = _probe_backend(op, model, N, device, amp_dtype or torch.float32)
        info["extra"]["tokens"] = N

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=amp_dtype)

    def forward():
        return model(x) if mask is None else model(x, attn_mask=mask)

    if case.mode == "fwd":
        model.eval()

        def step():
            with torch.no_grad(), autocast():
                forward()
        return Prepared(step=step, info=info, items_per_step=B)
    if case.mode != "fwd+bwd":
        raise ValueError(f"model cases are fwd (inference) or fwd+bwd (a training step), got {case.mode!r}")
    model.train()
    labels = torch.randint(0, model.num_classes, (B,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    info["extra"]["train_step"] = ("SGD(momentum=0.9) step on cross-entropy" +
                                   (" + WinfT BCE (winft_loss)" if winft else ""))

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(forward(), labels)
            if winft:
                from vitpatch.nn import winft_loss
                loss = loss + winft_loss(model)
        loss.backward()
        opt.step()
    return Prepared(step=train_step, info=info, items_per_step=B)
