"""Capture the post-softmax attention maps of a ViT, one block at a time (input of docs/math.md §2).

The maps ``A_l`` of paper 000 §3.2 (eq. 2) are the attention probabilities of every block.
timm's ``Attention`` (and vitpatch's ``WindowAttention``, ``WinfTAttention`` and
``PaCaAttention``, which subclass it) compute them explicitly when ``fused_attn`` is False and
pass them through ``self.attn_drop``; a forward pre-hook on that dropout reads them there.
"""
from __future__ import annotations

import numbers
from typing import Iterator, List, Optional

import torch
import torch.nn as nn

__all__ = ["attention_maps", "AttentionMaps", "attention_modules"]


def attention_modules(model: nn.Module) -> List[nn.Module]:
    """The attention modules of ``model`` whose maps can be captured, in forward (registration) order.

    A module qualifies when it has timm's ``fused_attn`` switch and an ``attn_drop`` module that
    receives the explicit probabilities; modules nested inside a qualifying one are not listed.
    """
    found: List[nn.Module] = []
    for m in model.modules():
        if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module):
            if not any(m is not f and _is_inside(m, f) for f in found):
                found.append(m)
    return found


def _is_inside(module: nn.Module, parent: nn.Module) -> bool:
    return any(module is sub for sub in parent.modules())


def _is_staged_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ``VisionTransformer``, whose blocks we can run one at a time."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(model, VisionTransformer) and isinstance(getattr(model, "blocks", None), nn.Sequential)


class AttentionMaps:
    """Iterator over the attention maps of one batch, block by block (see :func:`attention_maps`).

    Nothing happens until the first ``next()``. Hooks are installed then and removed, and
    ``fused_attn`` and the training flags restored, when the iteration ends, when the model
    raises, or when :meth:`close` is called (also on leaving a ``with`` block, and when the
    iterator is garbage-collected). Call ``close()`` (or use ``with``) when you stop early and
    keep a reference to the iterator.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, forward_kwargs: dict):
        self._gen = _generate(model, images, forward_kwargs)
        self.streaming = _is_staged_vit(model)
        """True when blocks run one at a time (timm ``VisionTransformer``): one layer's map in memory.
        False for other models: one full forward keeps every layer's map until it is consumed."""

    def __iter__(self) -> "AttentionMaps":
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._gen)

    def close(self) -> None:
        """Stop early: remove the hooks and restore the model now."""
        self._gen.close()

    def __enter__(self) -> "AttentionMaps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def attention_maps(model: nn.Module, images: torch.Tensor, **forward_kwargs) -> AttentionMaps:
    """Post-softmax attention maps of every attention block, as an iterator of ``(B, h, N, N)``.

    These are the ``A_l`` of paper 000 eq. 2 (docs/math.md §2), in block order, under ``torch.no_grad``
    and with the model in eval mode (dropout off), so they are the inference-time maps.

    Args:
        model: a timm ViT, or any model whose attention modules are timm ``Attention``-like (a
            ``fused_attn`` switch and an ``attn_drop`` that receives the probabilities), such as a
            ViT built with :class:`vitpatch.nn.WindowAttention` / ``WinfTAttention``. For
            ``PaCaAttention`` the maps are ``(B, h, N, M + P)`` (queries over cluster tokens).
        images: ``(B, 3, H, W)`` float tensor; moved to the model's device.
        **forward_kwargs: passed to every block (timm ``VisionTransformer``) or to
            ``model(images, ...)`` (other models), e.g. ``attn_mask=WindowMask(...)``.

    For a timm ``VisionTransformer`` the blocks run one at a time (patch embedding, position
    embedding, ``patch_drop``, ``norm_pre``, then block ``l``, exactly as ``forward_features``),
    so only one layer's map exists at a time. Other models run one full forward with the hooks
    and the maps are handed out afterwards (``.streaming`` is False).

    Each attention module's ``fused_attn`` is set to False during the iteration and restored
    afterwards, together with the modules' training flags; the hooks are removed at the end,
    on an exception, on ``close()`` or on leaving a ``with`` block.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor, got dtype {images.dtype}")
    if not attention_modules(model):
        raise ValueError("model has no attention module with a fused_attn switch and an attn_drop module "
                         "(timm Attention or a vitpatch.nn module): its attention maps cannot be captured")
    return AttentionMaps(model, images, forward_kwargs)


def _model_device(model: nn.Module, images: torch.Tensor) -> torch.device:
    for p in model.parameters():
        return p.device
    return images.device


def _generate(model: nn.Module, images: torch.Tensor, forward_kwargs: dict) -> Iterator[torch.Tensor]:
    modules = attention_modules(model)
    captured: List[torch.Tensor] = []

    def hook(_module, args):
        captured.append(args[0].detach())

    saved_fused = [m.fused_attn for m in modules]
    saved_training = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for m in modules:
            m.fused_attn = False
            handles.append(m.attn_drop.register_forward_pre_hook(hook))
        model.eval()
        x = images.to(_model_device(model, images))
        if _is_staged_vit(model):
            with torch.no_grad():
                x = model.patch_embed(x)
                x = model._pos_embed(x)
                x = model.patch_drop(x)
                x = model.norm_pre(x)
            for blk in model.blocks:
                with torch.no_grad():
                    x = blk(x, **forward_kwargs)
                while captured:
                    yield captured.pop(0)
        else:
            with torch.no_grad():
                model(x, **forward_kwargs)
            while captured:
                yield captured.pop(0)
    finally:
        for h in handles:
            h.remove()
        for m, f in zip(modules, saved_fused):
            m.fused_attn = f
        for m, t in saved_training:
            m.training = t
        captured.clear()


def count_layers(model: nn.Module) -> int:
    """Number of attention maps :func:`attention_maps` yields per forward (one per attention module)."""
    return len(attention_modules(model))


def check_prefix(num_prefix_tokens, name: str = "num_prefix_tokens") -> int:
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, numbers.Integral) \
            or num_prefix_tokens < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {num_prefix_tokens!r}")
    return int(num_prefix_tokens)


def model_layout(model: nn.Module, num_prefix_tokens: Optional[int] = None, grid=None):
    """``(num_prefix_tokens, grid)`` of a timm ViT, read from ``model.num_prefix_tokens`` and
    ``model.patch_embed.grid_size`` unless given."""
    from ..masks import check_grid

    if num_prefix_tokens is None:
        num_prefix_tokens = getattr(model, "num_prefix_tokens", None)
    if grid is None:
        pe = getattr(model, "patch_embed", None)
        grid = getattr(pe, "grid_size", None) if pe is not None else None
    if num_prefix_tokens is None or grid is None:
        raise ValueError("cannot read the token layout (num_prefix_tokens, patch_embed.grid_size) from the model: "
                         "pass num_prefix_tokens and grid")
    return check_prefix(num_prefix_tokens), check_grid(tuple(grid))
