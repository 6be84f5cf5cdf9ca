"""Input validation shared by ``vitpatch.functional`` and ``vitpatch.reference``.

Every failure raises ``TypeError`` or ``ValueError`` naming the argument, what was expected
and what was given (DESIGN, Conventions); nothing here runs on the GPU or synchronises.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

from ._cache import TensorCache
from .masks import WindowMask

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
WINFT_MODES = ("multiply", "mask")


def check_tensor(t, name: str, dims: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def check_same(tensors, names) -> None:
    first, fname = tensors[0], names[0]
    for t, n in zip(tensors[1:], names[1:]):
        if t.dtype != first.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {fname} has dtype {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {fname} is on {first.device}")


def check_qkv(q, k, v, *, self_attention: bool = True) -> Tuple[int, int, int, int]:
    """Check ``q (B, h, N, d)``, ``k, v (B, h, Nk, d)``; ``Nk == N`` when ``self_attention``."""
    if type(q) is type(k) is type(v) is torch.Tensor and q.dtype is k.dtype is v.dtype \
            and q.dtype in FLOAT_DTYPES and q.device == k.device == v.device:
        shape = q.shape
        if len(shape) == 4 and k.shape == shape and v.shape == shape:  # the common self-attention call
            if shape[2] == 0:
                raise ValueError("k and v must have at least one key")
            return shape
    for t, n in ((q, "q"), (k, "k"), (v, "v")):  # the slow path says what is wrong
        check_tensor(t, n, 4)
    check_same((q, k, v), ("q", "k", "v"))
    B, h, N, d = q.shape
    for t, n in ((k, "k"), (v, "v")):
        if t.shape[0] != B:
            raise ValueError(f"{n} has batch {t.shape[0]} but q has batch {B} (q {tuple(q.shape)}, {n} {tuple(t.shape)})")
        if t.shape[1] != h:
            raise ValueError(f"{n} has {t.shape[1]} heads but q has {h} (q {tuple(q.shape)}, {n} {tuple(t.shape)})")
        if t.shape[3] != d:
            raise ValueError(f"{n} has head width {t.shape[3]} but q has {d} (q {tuple(q.shape)}, {n} {tuple(t.shape)})")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if self_attention and k.shape[2] != N:
        raise ValueError(f"k has length {k.shape[2]} but q has length {N} (self-attention needs equal lengths)")
    if k.shape[2] == 0:
        raise ValueError("k and v must have at least one key")
    return B, h, N, d


def check_scale(scale, d: int) -> float:
    """The softmax scale: ``d ** -0.5`` by default, else a positive finite number."""
    if scale is None:
        return d ** -0.5
    if type(scale) is float and 0.0 < scale < float("inf"):  # the common call, without the ABC check
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (0 < float(scale) < float("inf")):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return float(scale)


def as_window_mask(windows, grid, num_prefix_tokens: int, key_keep, device: torch.device) -> WindowMask:
    """A :class:`WindowMask` on ``device`` from either a mask or raw windows and their layout."""
    if isinstance(windows, WindowMask):
        if grid is not None and tuple(grid) != windows.grid:
            raise ValueError(f"grid {tuple(grid)} disagrees with the WindowMask's grid {windows.grid}")
        if num_prefix_tokens not in (0, windows.num_prefix_tokens):
            raise ValueError(f"num_prefix_tokens {num_prefix_tokens} disagrees with the WindowMask's "
                             f"{windows.num_prefix_tokens}")
        if key_keep is not None:
            raise ValueError("key_keep must be given inside the WindowMask, not beside it")
        mask = windows
    else:
        if grid is None:
            raise ValueError("grid is required when windows is a tensor (or pass a WindowMask)")
        mask = _raw_mask(windows, grid, num_prefix_tokens, key_keep)
    return mask.to(device)


_RAW_MASKS = TensorCache(8)


def _raw_mask(windows, grid, num_prefix_tokens, key_keep) -> WindowMask:
    """The :class:`WindowMask` of raw window tensors, built (and validated: host syncs) once while the
    same tensors are unchanged: every layer of a model that passes tensors reuses it, and so does
    the kernels' schedule cache, which is keyed on the mask's tensors. Anything but tensors is
    never cached."""
    def build():
        return WindowMask(windows, grid, num_prefix_tokens, key_keep)
    if not isinstance(windows, torch.Tensor) or not (key_keep is None or isinstance(key_keep, torch.Tensor)):
        return build()
    try:
        extra = (tuple(grid), num_prefix_tokens)
        hash(extra)
    except TypeError:  # an unhashable grid or prefix count: WindowMask says what is wrong with it
        return build()
    return _RAW_MASKS.get_or_build((windows, key_keep), extra, build)


def check_mode(mode: str) -> str:
    if mode not in WINFT_MODES:
        raise ValueError(f"mode must be one of {WINFT_MODES}, got {mode!r}")
    return mode


def check_target(target: Optional[WindowMask], B: int, N: int, device) -> Optional[WindowMask]:
    if target is None:
        return None
    if not isinstance(target, WindowMask):
        raise TypeError(f"target must be a vitpatch.WindowMask or None, got {type(target).__name__}")
    target.check(B, N, name="target")
    return target.to(device)


def check_cluster_pool(logits, x) -> Tuple[int, int, int, int]:
    """``logits (B, n, M)`` and ``x (B, n, C)``; returns ``(B, n, M, C)``."""
    check_tensor(logits, "logits", 3)
    check_tensor(x, "x", 3)
    check_same((logits, x), ("logits", "x"))
    B, n, M = logits.shape
    if x.shape[0] != B:
        raise ValueError(f"x has batch {x.shape[0]} but logits has batch {B} "
                         f"(logits {tuple(logits.shape)}, x {tuple(x.shape)})")
    if x.shape[1] != n:
        raise ValueError(f"x has {x.shape[1]} tokens but logits has {n} "
                         f"(logits {tuple(logits.shape)}, x {tuple(x.shape)})")
    if n == 0:
        raise ValueError("logits and x must have at least one token")
    if M == 0:
        raise ValueError("logits must have at least one cluster")
    return B, n, M, x.shape[2]
