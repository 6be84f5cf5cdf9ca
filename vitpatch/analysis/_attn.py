"""Input checks shared by the paper 002 / 003 metrics (docs/math.md §8–9).

Every failure raises ``ValueError`` (or ``TypeError`` for a wrong type) naming the argument,
what was expected and what was given (DESIGN, Conventions).
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

from ..masks import check_grid
from .maps import check_prefix

#: tolerance of the row-sum check of a post-softmax map (covers float16 / bfloat16 softmax)
ROW_SUM_TOL = 2e-2


def check_attention(attn, num_prefix_tokens=0, grid=None, name: str = "attn",
                    check_probs: bool = True) -> Tuple[torch.Tensor, int]:
    """Validate one layer's post-softmax map ``(..., h, N, N)`` (at least 4 dims) and return ``(attn, P)``.

    The map must be square over its last two dims, have ``N > P`` and, when ``grid`` is given,
    ``N - P == gh * gw``. With ``check_probs`` every entry must be in ``[0, 1]`` and every row
    sum to 1 (within :data:`ROW_SUM_TOL`), i.e. it is a probability map over the ``N`` keys.
    """
    if not isinstance(attn, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(attn).__name__}")
    if not attn.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {attn.dtype}")
    if attn.dim() < 4:
        raise ValueError(f"{name} must have shape (B, h, N, N) or (..., B, h, N, N) with at least 4 dims, "
                         f"got {tuple(attn.shape)}")
    if attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"{name} must be square over its last two dims (N queries x N keys), got {tuple(attn.shape)}")
    P = check_prefix(num_prefix_tokens)
    N = attn.shape[-1]
    if N <= P:
        raise ValueError(f"{name} has N = {N} tokens, not more than num_prefix_tokens = {P}")
    if grid is not None:
        gh, gw = check_grid(grid)
        if N - P != gh * gw:
            raise ValueError(f"{name} has N - num_prefix_tokens = {N - P} patch tokens but grid {(gh, gw)} "
                             f"has gh * gw = {gh * gw}")
    if check_probs and attn.numel():
        lo, hi = float(attn.min()), float(attn.max())
        if not (lo >= -1e-6 and hi <= 1 + 1e-6):
            raise ValueError(f"{name} is not a probability map: entries must be in [0, 1], got [{lo:.4g}, {hi:.4g}]")
        err = float((attn.sum(-1, dtype=torch.float64) - 1).abs().max())
        if not err <= ROW_SUM_TOL:
            raise ValueError(f"{name} is not a probability map: every row must sum to 1 over the N keys "
                             f"(post-softmax), worst row is off by {err:.3g}")
    return attn, P


def check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0 \
            or not float(value) < float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_counts(counts, n: int, batch: Optional[int], name: str = "counts") -> torch.Tensor:
    """Keypoint counts ``(B, n)`` of non-negative integers (or integral floats)."""
    if not isinstance(counts, torch.Tensor):
        try:
            counts = torch.as_tensor(counts)
        except Exception as exc:  # noqa: BLE001
            raise TypeError(f"{name} must be a tensor of keypoint counts, got {type(counts).__name__}") from exc
    if counts.dim() != 2:
        raise ValueError(f"{name} must have shape (B, n), got {tuple(counts.shape)}")
    if counts.shape[1] != n:
        raise ValueError(f"{name} has {counts.shape[1]} patches but the attention map has n = {n}")
    if batch is not None and counts.shape[0] != batch:
        raise ValueError(f"{name} has batch {counts.shape[0]} but attn has batch {batch} (its first dim)")
    if counts.dtype == torch.bool:
        counts = counts.long()
    if counts.numel() and bool((counts < 0).any()):
        raise ValueError(f"{name} must be non-negative keypoint counts, got a minimum of {counts.min().item()}")
    return counts
