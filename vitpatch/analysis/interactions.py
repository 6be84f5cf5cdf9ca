"""Patch-interaction uncertainty ``U`` (paper 000 §3.2, eq. 2–3; docs/math.md §2), streamed over layers."""
from __future__ import annotations

import numbers
from typing import Iterable, Sequence, Union

import torch

from .maps import check_prefix

__all__ = ["uncertainty", "LayerVariance", "attention_rows"]


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


def attention_rows(maps: Union[torch.Tensor, Iterable[torch.Tensor]], patches: Sequence[int],
                   num_prefix_tokens: int = 0, *, uncertainty: bool = False, dtype: torch.dtype = torch.float64):
    """Per-layer attention rows of a few patches, paper 000 Fig. 3 (a) (docs/math.md §2).

    ``maps`` as in :func:`uncertainty` (an iterable of ``(B, h, N, N)`` layers, consumed once,
    or a tensor ``(L, B, h, N, N)``); ``patches``: patch indices ``p`` in ``[0, n)``, counted
    among patches (prefix tokens excluded). Returns float32 ``(L, B, h, k, n)``: entry
    ``[l, b, j, :, i]`` is ``A_l[b, :, P + p_j, P + i]``, the attention that patch ``p_j`` pays
    to patch ``i`` in layer ``l`` per head, prefix columns dropped and rows not renormalised
    (the same block as eq. 2). Only these rows are kept, never a whole layer's map.

    With ``uncertainty=True`` the same single pass also accumulates ``U`` (eq. 2–3, exactly
    :func:`uncertainty` with ``dtype``) and ``(rows, U)`` is returned, ``U`` ``(B, n, n)``.
    """
    P = check_prefix(num_prefix_tokens)
    if isinstance(patches, (str, bytes)) or not hasattr(patches, "__iter__"):
        raise ValueError(f"patches must be a sequence of patch indices, got {patches!r}")
    idx = []
    for p in patches:
        if isinstance(p, bool) or not isinstance(p, numbers.Integral):
            raise ValueError(f"patches must hold integer patch indices, got {p!r}")
        idx.append(int(p))
    if not idx:
        raise ValueError("patches must name at least one patch")
    acc = LayerVariance(P, dtype)
    layers = _layers(maps)
    rows, shape0 = [], None
    try:
        for layer in layers:
            if uncertainty:
                acc.update(layer)  # validates the layer (shape, dtype, square, prefix) and accumulates eq. 2
            else:
                _check_layer(layer, P, shape0, len(rows))
            shape0 = tuple(layer.shape)
            n = layer.shape[-1] - P
            bad = [p for p in idx if not 0 <= p < n]
            if bad:
                raise ValueError(f"patches must be in [0, {n}) for maps of n = {n} patch tokens, got {bad}")
            sel = torch.tensor(idx, device=layer.device) + P
            rows.append(layer.index_select(2, sel)[..., P:].float().cpu())  # (B, h, k, n)
    finally:
        close = getattr(layers, "close", None)
        if callable(close):
            close()
    if not rows:
        raise ValueError("maps must contain at least one layer")
    out = torch.stack(rows)
    if not uncertainty:
        return out
    u1 = acc.variance
    return out, (u1 - u1.mean(1, keepdim=True)).square().mean(1)


def _layers(maps):
    """The layers of ``maps``: a tensor ``(L, B, h, N, N)`` unbound, or an iterator over an iterable."""
    if isinstance(maps, torch.Tensor):
        if maps.dim() != 5:
            raise ValueError(f"maps as one tensor must have shape (L, B, h, N, N), got {tuple(maps.shape)}")
        return maps.unbind(0)
    try:
        return iter(maps)
    except TypeError:
        raise TypeError(f"maps must be a tensor (L, B, h, N, N) or an iterable of (B, h, N, N) tensors, "
                        f"got {type(maps).__name__}") from None


def _check_layer(maps, P: int, shape0, index: int, name: str = "maps") -> None:
    """The checks of :meth:`LayerVariance.update` without accumulating: one post-softmax layer ``(B, h, N, N)``."""
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"{name} must hold torch.Tensor layers, got {type(maps).__name__}")
    if maps.dim() != 4:
        raise ValueError(f"{name}: each layer must have shape (B, h, N, N), got {tuple(maps.shape)} (layer {index})")
    if not maps.is_floating_point():
        raise TypeError(f"{name}: attention maps must be floating point, got dtype {maps.dtype}")
    if maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"{name}: each layer must be square (B, h, N, N), got {tuple(maps.shape)} (layer {index})")
    if maps.shape[-1] <= P:
        raise ValueError(f"num_prefix_tokens = {P} leaves no patch tokens in maps of N = {maps.shape[-1]} tokens")
    if shape0 is not None and tuple(maps.shape) != shape0:
        raise ValueError(f"{name}: layer {index} has shape {tuple(maps.shape)} but layer 0 has {shape0}")
