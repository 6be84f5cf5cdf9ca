"""The public operations: input checks, backend choice, autograd.

Each function validates its inputs (``TypeError``/``ValueError`` naming the argument), picks a
backend in :mod:`vitpatch._backend` (Triton kernel on CUDA, the chunked PyTorch path
otherwise, ``VITPATCH_BACKEND`` to force one) and runs it. All are differentiable with respect
to their float inputs and work in float32, float16 and bfloat16 on CPU and CUDA.

The PyTorch path (:mod:`vitpatch.chunked`) takes the validated inputs with a
:class:`~vitpatch.WindowMask`: ``window_attention(q, k, v, mask, scale)``,
``winft_attention(q, k, v, scale, mode, target) -> (out, loss, gate_sum)``,
``cluster_pool(logits, x)``, ``cluster_attention(q, k, v, scale)``. The Triton kernels are
the bottom layer and take raw tensors and sizes instead of a mask
(``q, k, v, windows, key_keep, grid, num_prefix_tokens, scale`` for window attention;
:func:`_target_args` unpacks a WinfT target).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _backend, _checks, chunked, reference
from .masks import WindowMask

__all__ = ["window_attention", "winft_attention", "cluster_pool", "cluster_attention", "backend_for"]


def backend_for(op: str, *tensors: torch.Tensor, args: tuple = ()) -> str:
    """Which backend (``"triton"``, ``"torch"``, ``"reference"``) ``op`` would use for ``tensors`` now."""
    if op not in _backend.KERNEL_MODULES:
        raise ValueError(f"op must be one of {sorted(_backend.KERNEL_MODULES)}, got {op!r}")
    return _backend.choose(op, *tensors, args=args)[0]


def _target_args(target: Optional[WindowMask]) -> tuple:
    """What the WinfT kernel takes in place of a target: ``(windows, key_keep, num_prefix_tokens, grid_w)``."""
    if target is None:
        return None, None, 0, 1
    return target.windows, target.key_keep, target.num_prefix_tokens, target.grid[1]


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows, *, grid=None,
                     num_prefix_tokens: int = 0, key_keep: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Window-masked attention (AWD-ViT, paper 000 §4.1 eq. 4; docs/math.md §1).

    Query ``i`` attends to key ``j`` iff ``key_keep[b, j]`` and (``i`` or ``j`` is a prefix
    token, or patch ``j`` lies inside the window of patch ``i``):
    ``out_i = sum_j softmax_j(scale * q_i . k_j over allowed j) v_j``. A query with no allowed
    key outputs zeros, with zero gradient.

    Args:
        q, k, v: ``(B, h, N, d)`` with ``N = num_prefix_tokens + gh * gw``.
        windows: a :class:`vitpatch.WindowMask`, or integer windows ``(n, 4)`` / ``(B, n, 4)``
            as ``(x_left, y_top, x_right, y_bottom)`` (inclusive), with ``grid`` given.
        grid: the patch grid ``(gh, gw)`` (only with tensor windows).
        num_prefix_tokens: prefix tokens before the patches (global; only with tensor windows).
        key_keep: optional bool ``(B, N)``; ``False`` drops that key (only with tensor windows).
        scale: softmax scale, ``d ** -0.5`` by default.

    Returns:
        ``(B, h, N, d)`` in the dtype of ``q``.
    """
    B, h, N, d = _checks.check_qkv(q, k, v)
    mask = _checks.as_window_mask(windows, grid, num_prefix_tokens, key_keep, q.device)
    mask.check(B, N)
    scale = _checks.check_scale(scale, d)
    raw = (q, k, v, mask.windows, mask.key_keep, mask.grid, mask.num_prefix_tokens, scale)  # what the kernel takes
    backend, fn = _backend.choose("window_attention", q, k, v, args=raw)
    if backend == "reference":
        return reference.window_attention(q, k, v, mask, scale=scale)
    if fn is not None:
        return fn(*raw)
    return chunked.window_attention(q, k, v, mask, scale)


def winft_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mode: str = "multiply",
                    scale: Optional[float] = None, target: Optional[WindowMask] = None,
                    return_gate_sum: bool = False):
    """WinfT gated attention (paper 000 §5 eq. 8–11; docs/math.md §6).

    Gate logits ``g_ij = (1/h) sum_heads q_i . k_j`` (eq. 8, no ``1/sqrt(d)``),
    ``W_ij = [sigmoid(g_ij) > mean_j sigmoid(g_ij)]`` held constant (no gradient).
    ``mode="multiply"`` (eq. 9, default): logits ``scale * q_i . k_j * W_ij``;
    ``mode="mask"``: keys with ``W_ij = 0`` are removed, the diagonal is always kept.

    With ``target`` (a :class:`vitpatch.WindowMask`, the window ground truth of eq. 10) it also
    returns ``L_BCE = mean_{b,i,j} BCE(sigmoid(g_ij), T_ij)`` (eq. 11), whose gradient flows
    into ``q`` and ``k`` through ``g``. The target is derived from the ``O(n)`` windows, never
    stored as ``N x N``.

    Returns:
        ``out``; ``(out, loss)`` when ``target`` is given; ``(out, loss_or_None, gate_sum)``
        when ``return_gate_sum`` (``gate_sum (B,)`` float32 = ``sum_ij W_ij`` per image, the
        paper's EO of WinfT, Table 3).
    """
    B, h, N, d = _checks.check_qkv(q, k, v)
    _checks.check_mode(mode)
    scale = _checks.check_scale(scale, d)
    target = _checks.check_target(target, B, N, q.device)
    raw = (q, k, v, scale, mode, *_target_args(target))
    backend, fn = _backend.choose("winft_attention", q, k, v, args=raw)
    if backend == "reference":
        return reference.winft_attention(q, k, v, mode=mode, scale=scale, target=target,
                                         return_gate_sum=return_gate_sum)
    if fn is not None:
        out, loss, gate_sum = fn(*raw)
    else:
        out, loss, gate_sum = chunked.winft_attention(q, k, v, scale, mode, target)
    if target is None:
        loss = None
    if return_gate_sum:
        return out, loss, gate_sum
    return out if target is None else (out, loss)


def cluster_pool(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Cluster pooling ``z = softmax_over_tokens(logits)^T x`` (paper 004 eq. 7–8, before the LayerNorm).

    Args:
        logits: ``(B, n, M)`` clustering logits; the softmax runs over the ``n`` tokens, so each
            of the ``M`` clusters is a distribution over positions.
        x: ``(B, n, C)`` tokens.

    Returns:
        ``(B, M, C)`` cluster tokens in the dtype of ``x``.
    """
    _checks.check_cluster_pool(logits, x)
    backend, fn = _backend.choose("cluster_pool", logits, x, args=(logits, x))
    if backend == "reference":
        return reference.cluster_pool(logits, x)
    return (fn or chunked.cluster_pool)(logits, x)


def cluster_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      scale: Optional[float] = None) -> torch.Tensor:
    """Attention of ``N`` queries over a short key set (the ``M`` cluster tokens; paper 004 §3.3).

    ``q (B, h, N, d)``, ``k, v (B, h, M, d)`` → ``(B, h, N, d)``; cost ``O(N M d)``. The Triton
    kernel holds all keys in one tile (``M <= 256``); longer key sets use the PyTorch path.
    """
    B, h, N, d = _checks.check_qkv(q, k, v, self_attention=False)
    scale = _checks.check_scale(scale, d)
    backend, fn = _backend.choose("cluster_attention", q, k, v, args=(q, k, v, scale))
    if backend == "reference":
        return reference.cluster_attention(q, k, v, scale=scale)
    return (fn or chunked.cluster_attention)(q, k, v, scale)
