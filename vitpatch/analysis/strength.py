"""k-hop attention strength, its entropy and the mean attention distance (paper 003 §5.3, eq. 7–8; docs/math.md §9).

Metrics of one layer's map (streamed from :func:`vitpatch.analysis.attention_maps`)::

    from vitpatch import analysis
    for A in analysis.attention_maps(model, x):                                        # (B, h, N, N)
        mad = analysis.mean_attention_distance(A, (14, 14), 16, num_prefix_tokens=1)   # (B, h) pixels
        s = analysis.khop_strength(A, (14, 14), num_prefix_tokens=1)                   # eq. 7-8, (B, h, K)
        H = analysis.strength_entropy(s)                                               # (B, h) in [0, 1]
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, NamedTuple

import torch

from ._attn import check_attention

__all__ = ["mean_attention_distance", "ring_sizes", "khop_strength", "strength_entropy", "layer_strengths",
           "LayerStrengths"]


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
