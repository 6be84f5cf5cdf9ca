"""Patch-interaction uncertainty ``U`` (paper 000 §3.2, eq. 2–3; docs/math.md §2), streamed over layers."""
from __future__ import annotations

from typing import Iterable, Union

import torch

from .maps import check_prefix

__all__ = ["uncertainty", "LayerVariance"]


class LayerVariance:
    """Running population variance over layers (Welford), per head and patch pair (eq. 2).

    ``update(A)`` takes one layer's maps ``(B, h, N, N)``; :attr:`variance` is
    ``mean_l (A_l - mean_l A_l)^2`` over the prefix-free ``(B, h, n, n)`` block. Memory is two
    ``(B, h, n, n)`` accumulators whatever the number of layers.
    """

    def __init__(self, num_prefix_tokens: int = 0, dtype: torch.dtype = torch.float64):
        self.num_prefix_tokens = check_prefix(num_prefix_tokens)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype = dtype
        self.count = 0
        self._mean = None
        self._m2 = None
        self._shape = None

    def update(self, maps: torch.Tensor, name: str = "maps") -> None:
        if not isinstance(maps, torch.Tensor):
            raise TypeError(f"{name} must hold torch.Tensor layers, got {type(maps).__name__}")
        if maps.dim() != 4:
            raise ValueError(f"{name}: each layer must have shape (B, h, N, N), got {tuple(maps.shape)} "
                             f"(layer {self.count})")
        if not maps.is_floating_point():
            raise TypeError(f"{name}: attention maps must be floating point, got dtype {maps.dtype}")
        B, h, N, Nk = maps.shape
        if N != Nk:
            raise ValueError(f"{name}: each layer must be square (B, h, N, N), got {tuple(maps.shape)} "
                             f"(layer {self.count}); PaCa maps over cluster tokens have no patch-to-patch U")
        P = self.num_prefix_tokens
        if N <= P:
            raise ValueError(f"num_prefix_tokens = {P} leaves no patch tokens in maps of N = {N} tokens")
        if self._shape is None:
            self._shape = tuple(maps.shape)
        elif tuple(maps.shape) != self._shape:
            raise ValueError(f"{name}: layer {self.count} has shape {tuple(maps.shape)} but layer 0 has {self._shape}")
        a = maps[:, :, P:, P:].to(self.dtype)
        self.count += 1
        if self._mean is None:
            self._mean = a.clone()
            self._m2 = torch.zeros_like(a)
            return
        delta = a - self._mean
        self._mean.add_(delta / self.count)
        self._m2.add_(delta * (a - self._mean))

    @property
    def variance(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("maps must contain at least one layer")
        return self._m2 / self.count


def uncertainty(maps: Union[torch.Tensor, Iterable[torch.Tensor]], num_prefix_tokens: int = 0,
                *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Patch-interaction uncertainty ``U`` of paper 000 eq. 2–3 (docs/math.md §2): ``(B, n, n)``.

    ``maps``: the post-softmax attention maps of the ``L`` layers, each ``(B, h, N, N)``, as an
    iterable (e.g. :func:`vitpatch.analysis.attention_maps`, consumed once, never stacked) or a
    tensor ``(L, B, h, N, N)``. The first ``num_prefix_tokens`` rows and columns are dropped
    without renormalisation, leaving ``n = N - P`` patches.

    - eq. 2: ``U1 = mean_l (A_l - mean_l A_l)^2``, the population variance over layers per head,
      accumulated with Welford's update in ``dtype`` (memory ``O(B h n^2)``).
    - eq. 3: ``U = mean_h (U1_h - mean_h U1_h)^2``, the population variance over heads.

    Row ``p`` of ``U`` says which patches matter to patch ``p``; column ``p`` how informative
    patch ``p`` is to all others (paper §4.2).
    """
    acc = LayerVariance(num_prefix_tokens, dtype)
    if isinstance(maps, torch.Tensor):
        if maps.dim() != 5:
            raise ValueError(f"maps as one tensor must have shape (L, B, h, N, N), got {tuple(maps.shape)}")
        layers = maps.unbind(0)
    else:
        try:
            layers = iter(maps)
        except TypeError:
            raise TypeError(f"maps must be a tensor (L, B, h, N, N) or an iterable of (B, h, N, N) tensors, "
                            f"got {type(maps).__name__}") from None
    try:
        for layer in layers:
            acc.update(layer)
    finally:
        close = getattr(layers, "close", None)  # an AttentionMaps iterator left early: restore the model
        if callable(close):
            close()
    u1 = acc.variance  # (B, h, n, n), eq. 2
    return (u1 - u1.mean(1, keepdim=True)).square().mean(1)  # eq. 3
