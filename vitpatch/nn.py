"""Drop-in attention modules for timm Vision Transformers.

``WindowAttention`` and ``WinfTAttention`` subclass :class:`timm.layers.Attention`: same
constructor keywords, same state-dict keys (``qkv``, ``proj``, ``q_norm``, ``k_norm``, ...), same
``forward(x, attn_mask=None, is_causal=False)``. timm hands ``attn_mask`` unchanged to every
block, so a :class:`vitpatch.WindowMask` passed to the model reaches every layer::

    model = timm.create_model("vit_base_patch16_224", attn_layer=WindowAttention)
    model.load_state_dict(stock_vit.state_dict())
    logits = model(images, attn_mask=WindowMask(windows, grid=(14, 14), num_prefix_tokens=1))

timm passes ``attn_layer`` as a class (it calls ``issubclass`` on it), so per-model options
are chosen with ``with_options``, which returns a configured subclass::

    timm.create_model(name, attn_layer=WinfTAttention.with_options(mode="mask"))
    timm.create_model(name, attn_layer=PaCaAttention.with_options(num_clusters=49, clustering="official"))

With ``fused_attn = False`` (timm's switch, which :mod:`vitpatch.analysis` uses) the modules
compute the explicit probabilities and pass them through ``attn_drop`` as timm does, so
attention maps can be captured; with attention dropout active in training they take that
path too (the kernels do not fuse dropout).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as TF
from timm.layers import Attention

from . import _checks, functional, reference
from .masks import WindowMask, check_grid

__all__ = ["WindowAttention", "WinfTAttention", "PaCaAttention", "PaCaClustering", "CLUSTERING_VARIANTS",
           "winft_loss", "winft_gate_sum", "set_token_layout"]

CLUSTERING_VARIANTS = ("paper", "official", "linear")


class _Configurable:
    """``with_options(**kw)`` returns a subclass whose constructor defaults are ``kw``."""

    _defaults: dict = {}

    @classmethod
    def with_options(cls, **options):
        unknown = sorted(set(options) - set(cls._defaults))
        if unknown:
            raise TypeError(f"{cls.__name__}.with_options got unknown options {unknown}; "
                            f"it takes {sorted(cls._defaults)}")
        defaults = {**cls._defaults, **options}
        cls._validate_options(defaults)
        sub = type(cls.__name__, (cls,), {"_defaults": defaults, "__module__": cls.__module__,
                                          "__doc__": cls.__doc__, "__qualname__": cls.__qualname__})
        return sub

    @classmethod
    def _validate_options(cls, options: dict) -> None:
        pass

    def _option(self, name, value):
        return self._defaults[name] if value is None else value


class _TimmAttention(Attention):
    """Shared pieces of timm's ``Attention.forward``: projections in, output projection out."""

    def _project(self, x: torch.Tensor):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _finish(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        gate_layer = getattr(self, "gate", None)
        out = o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        out = self.norm(out)
        if gate_layer is not None:
            out = out * gate_layer(x).sigmoid()
        return self.proj_drop(self.proj(out))

    def _fused(self) -> bool:
        """Whether to run the vitpatch op (vs. explicit probabilities through ``attn_drop``)."""
        return bool(self.fused_attn) and not (self.training and self.attn_drop.p > 0)


class WindowAttention(_TimmAttention):
    """timm ``Attention`` with AWD window masking (paper 000 §4.1; docs/math.md §1).

    ``forward(x, attn_mask)``: with a :class:`vitpatch.WindowMask`, each patch attends only
    inside its window (plus prefix tokens, minus dropped keys) through
    :func:`vitpatch.functional.window_attention`; with ``None`` or a tensor mask it is exactly
    timm's attention.
    """

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if not isinstance(attn_mask, WindowMask):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if is_causal:
            raise ValueError("is_causal=True cannot be combined with a WindowMask attn_mask")
        q, k, v = self._project(x)
        if self._fused():
            o = functional.window_attention(q, k, v, attn_mask, scale=self.scale)
        else:
            a = reference.window_attention_probs(q, k, attn_mask, scale=self.scale)
            o = self.attn_drop(a) @ v
        return self._finish(o, x)


class WinfTAttention(_Configurable, _TimmAttention):
    """timm ``Attention`` with WinfT gating (paper 000 §5 eq. 8–11; docs/math.md §6).

    Args (besides timm's): ``mode`` ``"multiply"`` (default, the paper's eq. 9) or ``"mask"``;
    choose it per model with ``WinfTAttention.with_options(mode="mask")``.

    ``forward(x, attn_mask)``: ``attn_mask`` is ``None`` or a :class:`vitpatch.WindowMask`, the
    window ground truth; with one, the layer's BCE loss (eq. 11) is kept in ``self.bce_loss``
    and :func:`winft_loss` averages it over the model's WinfT layers. ``self.gate_sum`` holds
    ``sum_ij W_ij`` per image (the paper's EO, Table 3) from the last forward.
    """

    _defaults = {"mode": "multiply"}

    def __init__(self, dim: int, num_heads: int = 8, *args, mode: Optional[str] = None, **kwargs):
        super().__init__(dim, num_heads, *args, **kwargs)
        self.mode = _checks.check_mode(self._option("mode", mode))
        self.bce_loss: Optional[torch.Tensor] = None
        self.gate_sum: Optional[torch.Tensor] = None

    @classmethod
    def _validate_options(cls, options):
        _checks.check_mode(options["mode"])

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None and not isinstance(attn_mask, WindowMask):
            raise TypeError(f"WinfTAttention takes attn_mask=None or a vitpatch.WindowMask (the BCE target), "
                            f"got {type(attn_mask).__name__}")
        if is_causal:
            raise ValueError("WinfTAttention does not support is_causal=True")
        q, k, v = self._project(x)
        if self._fused():
            o, loss, gate_sum = functional.winft_attention(q, k, v, mode=self.mode, scale=self.scale,
                                                           target=attn_mask, return_gate_sum=True)
        else:
            probs, g, used = reference.winft_parts(q, k, self.mode, self.scale)
            o = (self.attn_drop(probs) @ v.to(probs.dtype)).to(q.dtype)
            loss = None if attn_mask is None else reference.winft_bce(g, attn_mask.to(x.device))
            gate_sum = used.sum((1, 2)).float()
        self.bce_loss = loss
        self.gate_sum = gate_sum.detach()
        return self._finish(o, x)


def _winft_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, WinfTAttention)]


def winft_loss(model: nn.Module) -> torch.Tensor:
    """The model's ``L_BCE``: the mean of its WinfT layers' BCE losses from the last forward (eq. 12).

    Call it after ``model(images, attn_mask=target)``; the total loss of the paper is
    ``lambda1 * cross_entropy + lambda2 * winft_loss(model)`` (both 1 in the paper).
    """
    layers = _winft_layers(model)
    if not layers:
        raise ValueError("model has no WinfTAttention layer")
    losses = [m.bce_loss for m in layers if m.bce_loss is not None]
    if len(losses) != len(layers):
        raise RuntimeError("not every WinfTAttention layer computed a BCE loss in the last forward: "
                           "call the model with attn_mask=WindowMask(...) (the window ground truth)")
    return torch.stack([l.float() for l in losses]).mean()


def winft_gate_sum(model: nn.Module) -> torch.Tensor:
    """``sum_ij W_ij`` per image (``(B,)``) averaged over the WinfT layers of the last forward (Table 3's EO)."""
    layers = _winft_layers(model)
    if not layers or any(m.gate_sum is None for m in layers):
        raise RuntimeError("run a forward pass through a model with WinfTAttention layers first")
    return torch.stack([m.gate_sum for m in layers]).mean(0)


# ------------------------------------------------------------------------------------------ PaCa
class PaCaClustering(nn.Module):
    """Clustering logits ``f(x)`` of paper 004 eq. 6–7 (docs/math.md §7): ``(B, n, C)`` → ``(B, n, M)``.

    Variants: ``"paper"`` Conv3x3(C→C/r) · GELU · Linear(C/r→M); ``"official"`` (the authors'
    code) depthwise Conv7x7(C) · GELU · Conv1x1(C→C) · GELU · Conv1x1(C→M, no bias);
    ``"linear"`` Linear(C→M, no bias), which needs no grid.
    """

    def __init__(self, dim: int, num_clusters: int, variant: str = "paper", reduction: int = 4):
        super().__init__()
        if variant not in CLUSTERING_VARIANTS:
            raise ValueError(f"clustering must be one of {CLUSTERING_VARIANTS}, got {variant!r}")
        if not isinstance(num_clusters, int) or num_clusters < 1:
            raise ValueError(f"num_clusters must be a positive integer, got {num_clusters!r}")
        if not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"cluster_reduction must be a positive integer, got {reduction!r}")
        self.variant, self.num_clusters = variant, num_clusters
        if variant == "paper":
            hidden = max(1, dim // reduction)
            self.conv = nn.Conv2d(dim, hidden, 3, padding=1)
            self.act = nn.GELU()
            self.fc = nn.Linear(hidden, num_clusters)
        elif variant == "official":
            self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
            self.act1 = nn.GELU()
            self.pwconv = nn.Conv2d(dim, dim, 1)
            self.act2 = nn.GELU()
            self.fc = nn.Conv2d(dim, num_clusters, 1, bias=False)
        else:
            self.fc = nn.Linear(dim, num_clusters, bias=False)

    def forward(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        if self.variant == "linear":
            return self.fc(x)
        B, n, C = x.shape
        if grid is None or grid[0] * grid[1] != n:
            raise ValueError(f"the {self.variant!r} clustering needs the patch grid (gh, gw) with gh * gw = {n}, "
                             f"got {grid!r}")
        img = x.transpose(1, 2).reshape(B, C, grid[0], grid[1])
        if self.variant == "paper":
            return self.fc(self.act(self.conv(img)).flatten(2).transpose(1, 2))
        y = self.act2(self.pwconv(self.act1(self.dwconv(img))))
        return self.fc(y).flatten(2).transpose(1, 2)


def _infer_layout(N: int, num_prefix_tokens: Optional[int], grid) -> Tuple[int, Tuple[int, int]]:
    if grid is not None:
        gh, gw = check_grid(grid)
        P = N - gh * gw if num_prefix_tokens is None else num_prefix_tokens
        if P < 0 or P + gh * gw != N:
            raise ValueError(f"PaCaAttention: {N} tokens do not fit grid {(gh, gw)} with {P} prefix tokens")
        return P, (gh, gw)
    candidates = [num_prefix_tokens] if num_prefix_tokens is not None else range(0, min(N, 17))
    for P in candidates:
        s = math.isqrt(N - P) if N - P > 0 else 0
        if s and s * s == N - P:
            return P, (s, s)
    raise ValueError(f"PaCaAttention cannot infer the patch grid of {N} tokens: pass grid= to forward, use "
                     f"PaCaAttention.with_options(grid=..., num_prefix_tokens=...), or call "
                     f"vitpatch.nn.set_token_layout(model)")


class PaCaAttention(_Configurable, _TimmAttention):
    """Patch-to-cluster attention (paper 004 §3.3 eq. 6–8; docs/math.md §7) as a timm attention layer.

    Queries come from all ``N`` tokens; keys and values from ``M`` cluster tokens
    ``z = LayerNorm(softmax_over_tokens(f(x))^T x)`` (``cluster_norm``), plus the ``P`` prefix
    tokens appended as keys. Cost ``O(N M C)``. Keeps timm's ``qkv`` (its q rows project ``x``,
    its k and v rows project ``z``) and ``proj``; adds ``clustering`` and ``cluster_norm``.

    Options (constructor keywords, or per model via ``PaCaAttention.with_options(...)``):
        num_clusters: ``M`` (default 49, the paper's ImageNet setting).
        clustering: ``"paper"`` (default), ``"official"`` or ``"linear"`` (:class:`PaCaClustering`).
        cluster_reduction: ``r`` of the paper variant (default 4).
        num_prefix_tokens, grid: the token layout; inferred when not given (the smallest
            ``P <= 16`` that leaves a square grid), or set from a timm model by :func:`set_token_layout`.
        shared_clustering: ``True`` builds no ``clustering`` module: the layer reuses logits
            computed elsewhere, passed as ``forward(..., cluster_logits=...)`` (the authors'
            stage-wise setting, where the first block of a stage clusters for the whole stage).

    ``forward(x, attn_mask=None, is_causal=False, *, grid=None, return_assignment=False,
    cluster_logits=None)``; with ``return_assignment`` it returns ``(out, A)``, ``A (B, n, M)``
    the softmax over tokens (each column a heatmap over the grid). ``store_assignment = True``
    keeps it in ``last_assignment`` instead, for models built by timm. ``cluster_logits``
    ``(B, n, M)`` replaces ``clustering(x)`` (eq. 6) when given.
    """

    _defaults = {"num_clusters": 49, "clustering": "paper", "cluster_reduction": 4,
                 "num_prefix_tokens": None, "grid": None, "shared_clustering": False}

    def __init__(self, dim: int, num_heads: int = 8, *args, num_clusters: Optional[int] = None,
                 clustering: Optional[str] = None, cluster_reduction: Optional[int] = None,
                 num_prefix_tokens: Optional[int] = None, grid=None, shared_clustering: Optional[bool] = None,
                 **kwargs):
        super().__init__(dim, num_heads, *args, **kwargs)
        self.num_clusters = self._option("num_clusters", num_clusters)
        variant = self._option("clustering", clustering)
        if variant not in CLUSTERING_VARIANTS:
            raise ValueError(f"clustering must be one of {CLUSTERING_VARIANTS}, got {variant!r}")
        self.shared_clustering = bool(self._option("shared_clustering", shared_clustering))
        self.clustering = None if self.shared_clustering else PaCaClustering(
            dim, self.num_clusters, variant, self._option("cluster_reduction", cluster_reduction))
        self.cluster_norm = nn.LayerNorm(dim)
        self.num_prefix_tokens = self._option("num_prefix_tokens", num_prefix_tokens)
        grid = self._option("grid", grid)
        self.grid = None if grid is None else check_grid(grid)
        self.store_assignment = False
        self.last_assignment: Optional[torch.Tensor] = None

    @classmethod
    def _validate_options(cls, options):
        if options["clustering"] not in CLUSTERING_VARIANTS:
            raise ValueError(f"clustering must be one of {CLUSTERING_VARIANTS}, got {options['clustering']!r}")
        if not isinstance(options["num_clusters"], int) or options["num_clusters"] < 1:
            raise ValueError(f"num_clusters must be a positive integer, got {options['num_clusters']!r}")
        if options["grid"] is not None:
            check_grid(options["grid"])

    def extra_repr(self) -> str:
        variant = "shared" if self.clustering is None else self.clustering.variant
        return f"num_clusters={self.num_clusters}, clustering={variant!r}"

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False, *, grid=None,
                return_assignment: bool = False, cluster_logits: Optional[torch.Tensor] = None):
        if attn_mask is not None or is_causal:
            raise ValueError("PaCaAttention takes no attention mask and no is_causal: its keys are cluster tokens")
        B, N, C = x.shape
        P, grid = _infer_layout(N, self.num_prefix_tokens, grid if grid is not None else self.grid)
        patches = x[:, P:]
        if cluster_logits is not None:
            if not isinstance(cluster_logits, torch.Tensor):
                raise TypeError(f"cluster_logits must be a tensor, got {type(cluster_logits).__name__}")
            if tuple(cluster_logits.shape) != (B, N - P, self.num_clusters):
                raise ValueError(f"cluster_logits must have shape {(B, N - P, self.num_clusters)} (B, n, M), "
                                 f"got {tuple(cluster_logits.shape)}")
            logits = cluster_logits
        elif self.clustering is None:
            raise ValueError("this PaCaAttention was built with shared_clustering=True: pass cluster_logits=")
        else:
            logits = self.clustering(patches, grid)  # (B, n, M), eq. 6
        z = self.cluster_norm(functional.cluster_pool(logits.to(patches.dtype), patches))  # eq. 7-8
        kv_in = torch.cat([z, x[:, :P]], 1) if P else z
        D = self.num_heads * self.head_dim
        w, b = self.qkv.weight, self.qkv.bias
        q = TF.linear(x, w[:D], None if b is None else b[:D])
        kv = TF.linear(kv_in, w[D:], None if b is None else b[D:])
        q = self.q_norm(q.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2))
        k, v = kv.reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        k = self.k_norm(k)
        if self._fused():
            o = functional.cluster_attention(q, k, v, scale=self.scale)
        else:
            o = self.attn_drop(reference.cluster_attention_probs(q, k, scale=self.scale)) @ v
        out = self._finish(o, x)
        if return_assignment or self.store_assignment:
            assignment = torch.softmax(logits.float(), dim=1)
            if self.store_assignment:
                self.last_assignment = assignment.detach()
            if return_assignment:
                return out, assignment
        return out


def set_token_layout(model: nn.Module, num_prefix_tokens: Optional[int] = None, grid=None) -> nn.Module:
    """Tell every :class:`PaCaAttention` in a timm ViT its token layout (prefix count, patch grid).

    Reads ``model.num_prefix_tokens`` and ``model.patch_embed.grid_size`` unless given.
    """
    if num_prefix_tokens is None:
        num_prefix_tokens = getattr(model, "num_prefix_tokens", None)
    if grid is None and getattr(model, "patch_embed", None) is not None:
        grid = getattr(model.patch_embed, "grid_size", None)
    if num_prefix_tokens is None or grid is None:
        raise ValueError("set_token_layout needs num_prefix_tokens and grid (not found on the model)")
    grid = check_grid(tuple(grid))
    for m in model.modules():
        if isinstance(m, PaCaAttention):
            m.num_prefix_tokens, m.grid = int(num_prefix_tokens), grid
    return model
