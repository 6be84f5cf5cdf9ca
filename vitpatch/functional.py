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


def backend_for(op: str, *args, **kwargs) -> str:
    """Which backend (``"triton"``, ``"torch"``, ``"reference"``) ``op`` would use for this call.

    ``args`` and ``kwargs`` are the op's own arguments, validated as the op validates them, e.g.
    ``backend_for("window_attention", q, k, v, mask)`` or
    ``backend_for("cluster_attention", q, k, v, scale=0.25)``; nothing is computed.
    """
    prepare = _CALLS.get(op)
    if prepare is None:
        raise ValueError(f"op must be one of {sorted(_CALLS)}, got {op!r}")
    tensors, raw, _ = prepare(*args, **kwargs)
    return _backend.choose(op, *tensors, args=raw)[0]


def _exact(t: torch.Tensor):
    """Autocast off around the PyTorch paths: they choose their own precision (float32 statistics and
    gates, docs/math.md §1 and §6), which autocast would otherwise re-cast to bf16/fp16 matmuls (changing
    WinfT's thresholded gates). The Triton kernels are unaffected by autocast either way."""
    return torch.autocast(t.device.type, enabled=False)


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
    tensors, raw, (mask, scale) = _window_call(q, k, v, windows, grid=grid, num_prefix_tokens=num_prefix_tokens,
                                               key_keep=key_keep, scale=scale)
    backend, fn = _backend.choose("window_attention", *tensors, args=raw)
    if fn is not None:
        return fn(*raw)
    with _exact(q):
        if backend == "reference":
            return reference.window_attention(q, k, v, mask, scale=scale)
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
    tensors, raw, (scale, target) = _winft_call(q, k, v, mode=mode, scale=scale, target=target,
                                                return_gate_sum=return_gate_sum)
    backend, fn = _backend.choose("winft_attention", *tensors, args=raw)
    if backend == "reference":
        with _exact(q):
            return reference.winft_attention(q, k, v, mode=mode, scale=scale, target=target,
                                             return_gate_sum=return_gate_sum)
    if fn is not None:
        out, loss, gate_sum = fn(*raw)
    else:
        with _exact(q):
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
    tensors, raw, _ = _pool_call(logits, x)
    backend, fn = _backend.choose("cluster_pool", *tensors, args=raw)
    if fn is not None:
        return fn(logits, x)
    with _exact(x):
        if backend == "reference":
            return reference.cluster_pool(logits, x)
        return chunked.cluster_pool(logits, x)


def cluster_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      scale: Optional[float] = None) -> torch.Tensor:
    """Attention of ``N`` queries over a short key set (the ``M`` cluster tokens; paper 004 §3.3).

    ``q (B, h, N, d)``, ``k, v (B, h, M, d)`` → ``(B, h, N, d)``; cost ``O(N M d)``. The Triton
    kernel holds all keys in one tile (``M <= 256``); longer key sets use the PyTorch path.
    """
    tensors, raw, scale = _cluster_call(q, k, v, scale=scale)
    backend, fn = _backend.choose("cluster_attention", *tensors, args=raw)
    if fn is not None:
        return fn(q, k, v, scale)
    with _exact(q):
        if backend == "reference":
            return reference.cluster_attention(q, k, v, scale=scale)
        return chunked.cluster_attention(q, k, v, scale)


# ---------------------------------------------------------------------------- argument handling
# Each op's arguments, validated and brought into what the backend choice and the kernel take:
# ``(tensors, raw kernel arguments, what the op itself needs besides)``; ``backend_for`` runs the
# same function, so it answers for exactly the call it is given.
def _window_call(q, k, v, windows, *, grid=None, num_prefix_tokens: int = 0, key_keep=None, scale=None):
    B, h, N, d = _checks.check_qkv(q, k, v)
    mask = _checks.as_window_mask(windows, grid, num_prefix_tokens, key_keep, q.device)
    mask.check(B, N)
    scale = _checks.check_scale(scale, d)
    raw = (q, k, v, mask.windows, mask.key_keep, mask.grid, mask.num_prefix_tokens, scale)
    return (q, k, v), raw, (mask, scale)


def _winft_call(q, k, v, *, mode: str = "multiply", scale=None, target=None, return_gate_sum: bool = False):
    B, h, N, d = _checks.check_qkv(q, k, v)
    _checks.check_mode(mode)
    scale = _checks.check_scale(scale, d)
    target = _checks.check_target(target, B, N, q.device)
    return (q, k, v), (q, k, v, scale, mode, *_target_args(target)), (scale, target)


def _pool_call(logits, x):
    _checks.check_cluster_pool(logits, x)
    return (logits, x), (logits, x), None


def _cluster_call(q, k, v, *, scale=None):
    B, h, N, d = _checks.check_qkv(q, k, v, self_attention=False)
    scale = _checks.check_scale(scale, d)
    return (q, k, v), (q, k, v, scale), scale


_CALLS = {"window_attention": _window_call, "winft_attention": _winft_call, "cluster_pool": _pool_call,
          "cluster_attention": _cluster_call}
