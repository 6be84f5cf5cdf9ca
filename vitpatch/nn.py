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

DIP by token zeroing (paper 000 §4.2): :func:`zero_dropped_tokens` makes every block multiply
its input tokens by the ``token_keep`` of the ``WindowMask`` it is given.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as TF
from timm.layers import Attention

from . import _checks, functional, reference
from .masks import WindowMask, check_grid

__all__ = ["WindowAttention", "WinfTAttention", "PaCaAttention", "PaCaClustering", "CLUSTERING_VARIANTS",
           "cluster_logits", "winft_loss", "winft_gate_sum", "record_winft_gates", "winft_layer_gates",
           "set_token_layout", "zero_dropped_tokens"]

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
    ``sum_ij W_ij`` per image over all ``N x N`` pairs, prefix rows and columns included, from
    the last forward.

    Recording the gates (paper 000 Fig. 13 and Tables 3–4, whose EO counts patch pairs only):
    with ``record_gates = True`` (a plain attribute, per layer; :func:`record_winft_gates` sets
    it on a whole model) each forward also keeps ``self.last_gates``, ``W`` as bool
    ``(B, N, N)`` (detached; the diagonal included in mask mode), and ``self.patch_gate_sum``,
    float32 ``(B,)`` = ``sum of W_ij over i, j >= P`` (``n^2`` when every gate is on). ``P`` is
    the target ``WindowMask``'s ``num_prefix_tokens`` when one is passed, else the attribute
    ``num_prefix_tokens`` (default ``None``, set by :func:`set_token_layout`); when neither is
    known ``patch_gate_sum`` stays ``None`` and :func:`winft_gate_sum` with ``pairs="patch"``
    raises. Recording costs one ``(B, N, N)`` bool per layer (``B N^2`` bytes) and, on the
    fused path, a recomputation of the gate logits in query chunks. With
    ``record_gates = False`` (default) nothing extra is computed and both are reset to ``None``
    on each forward.

    How the recorded ``W`` relates to the one the op used: on the non-fused path it *is* that
    ``W``. On the fused path it is recomputed by :func:`vitpatch.reference.winft_gates` from
    the same ``q, k`` tensors (under bf16 autocast: the same bf16 values the op received),
    upcast to float32 (float64 stays float64), with autocast off and float32 matmuls at full
    precision (no TF32): the op's formula at the float32 accuracy docs/math.md §6 asks for.
    The PyTorch path of the op gives the same ``W`` bit for bit on float32, float64 and
    bf16/fp16 tensors (tested; :mod:`vitpatch.functional` turns autocast off around its
    PyTorch paths, so bf16 autocast does not re-cast their float32 gate matmul). The Triton kernel
    accumulates ``g`` in another order (three-pass TF32 tiles), so a pair whose
    ``sigmoid(g_ij)`` is within rounding of its row mean ``t_i`` can come out the other way:
    near-exact ties can flip, in either direction (expected rare; not yet measured on a GPU).
    """

    _defaults = {"mode": "multiply"}

    def __init__(self, dim: int, num_heads: int = 8, *args, mode: Optional[str] = None, **kwargs):
        super().__init__(dim, num_heads, *args, **kwargs)
        self.mode = _checks.check_mode(self._option("mode", mode))
        self.bce_loss: Optional[torch.Tensor] = None
        self.gate_sum: Optional[torch.Tensor] = None
        self.record_gates: bool = False
        self.num_prefix_tokens: Optional[int] = None
        self.last_gates: Optional[torch.Tensor] = None
        self.patch_gate_sum: Optional[torch.Tensor] = None

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
        gates = None
        if self._fused():
            o, loss, gate_sum = functional.winft_attention(q, k, v, mode=self.mode, scale=self.scale,
                                                           target=attn_mask, return_gate_sum=True)
            if self.record_gates:
                with torch.autocast(q.device.type, enabled=False), _full_precision_fp32_matmul():
                    gates = reference.winft_gates(q.detach(), k.detach(), self.mode, upcast=True)
        else:
            probs, g, used = reference.winft_parts(q, k, self.mode, self.scale)
            o = (self.attn_drop(probs) @ v.to(probs.dtype)).to(q.dtype)
            loss = None if attn_mask is None else reference.winft_bce(g, attn_mask.to(x.device))
            gate_sum = used.sum((1, 2)).float()
            if self.record_gates:
                gates = used.detach()
        self.bce_loss = loss
        self.gate_sum = gate_sum.detach()
        self.last_gates = gates
        self.patch_gate_sum = None
        if gates is not None:
            P = attn_mask.num_prefix_tokens if attn_mask is not None else self.num_prefix_tokens
            if P is not None:
                self.patch_gate_sum = gates[:, P:, P:].sum((1, 2), dtype=torch.float32)
        return self._finish(o, x)


@contextlib.contextmanager
def _full_precision_fp32_matmul():
    """float32 matmuls at full precision (no TF32) inside: ``W`` is a hard threshold (docs/math.md §6)."""
    before = torch.get_float32_matmul_precision()
    if before == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


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


def winft_gate_sum(model: nn.Module, pairs: str = "all") -> torch.Tensor:
    """``sum W_ij`` per image (``(B,)``, float32) averaged over the WinfT layers of the last forward.

    ``pairs="all"`` counts all ``N x N`` pairs, prefix rows and columns included (always
    available). ``pairs="patch"`` counts patch pairs only (``i, j >= P``), the EO of paper 000
    Tables 3–4 (``n^2`` = 2,401 for ViT-B/32 at 224 with every gate on); it needs the layers'
    ``patch_gate_sum``, i.e. ``record_gates`` on (:func:`record_winft_gates`) and a known
    prefix count (a ``WindowMask`` target, or :func:`set_token_layout`).
    """
    if pairs not in ("all", "patch"):
        raise ValueError(f"pairs must be 'all' or 'patch', got {pairs!r}")
    layers = _winft_layers(model)
    if not layers or any(m.gate_sum is None for m in layers):
        raise RuntimeError("run a forward pass through a model with WinfTAttention layers first")
    if pairs == "all":
        return torch.stack([m.gate_sum for m in layers]).mean(0)
    if any(m.last_gates is None for m in layers):
        raise RuntimeError("winft_gate_sum(pairs='patch') needs the gates of the last forward: set record_gates = True "
                           "on the WinfT layers (vitpatch.nn.record_winft_gates(model, True)) and run the model again")
    if any(m.patch_gate_sum is None for m in layers):
        raise RuntimeError("winft_gate_sum(pairs='patch') needs the number of prefix tokens: call "
                           "vitpatch.nn.set_token_layout(model) (or pass a WindowMask target as attn_mask) and "
                           "run the model again")
    return torch.stack([m.patch_gate_sum for m in layers]).mean(0)


def record_winft_gates(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Set ``record_gates`` on every :class:`WinfTAttention` of ``model`` (the gates ``W`` of each forward
    are then kept per layer: :func:`winft_layer_gates`, ``winft_gate_sum(model, pairs="patch")``)."""
    layers = _winft_layers(model)
    if not layers:
        raise ValueError("model has no WinfTAttention layer")
    for m in layers:
        m.record_gates = bool(enabled)
        if not enabled:
            m.last_gates = m.patch_gate_sum = None
    return model


def winft_layer_gates(model: nn.Module) -> list:
    """Each WinfT layer's ``W`` from the last forward, in module order: a list of bool ``(B, N, N)``.

    Needs ``record_gates`` (:func:`record_winft_gates`). Summed over the list it is paper 000
    Fig. 13's ``sum_l W_l`` (``torch.stack(gates).sum(0)``).
    """
    layers = _winft_layers(model)
    if not layers:
        raise ValueError("model has no WinfTAttention layer")
    if any(m.last_gates is None for m in layers):
        raise RuntimeError("no recorded gates: call vitpatch.nn.record_winft_gates(model, True) and run the model")
    return [m.last_gates for m in layers]


# ------------------------------------------------------------------------------------------ PaCa
# Devices where PaCaClustering writes its logits through cluster_logits (the pooling kernels' layout).
# On CPU the plain projection is kept, so CPU values do not change with the layout.
_PADDED_LOGITS_DEVICES = ("cuda",)


def _logits_width(num_clusters: int) -> int:
    return -(-num_clusters // 16) * 16


@torch.library.custom_op("vitpatch::cluster_logits", mutates_args=())
def _cluster_logits_op(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       dtype: torch.dtype) -> torch.Tensor:
    M = weight.shape[0]
    pad = _logits_width(M) - M
    device = features.device.type
    # the caller applied autocast's casts; a device without autocast (meta) has none to turn off
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else contextlib.nullcontext():
        out = TF.linear(features, TF.pad(weight, (0, 0, 0, pad)), None if bias is None else TF.pad(bias, (0, pad)))
    return out.to(dtype)[..., :M]


@_cluster_logits_op.register_fake
def _(features, weight, bias, dtype):
    M = weight.shape[0]
    return features.new_empty((*features.shape[:-1], _logits_width(M)), dtype=dtype)[..., :M]


def _cluster_logits_setup(ctx, inputs, output):
    features, weight, bias, _dtype = inputs
    ctx.save_for_backward(features, weight)
    ctx.has_bias = bias is not None


def _cluster_logits_grad(ctx, grad):
    features, weight = ctx.saved_tensors
    rows = grad.to(weight.dtype).reshape(-1, weight.shape[0])
    d_features = (rows @ weight).view(features.shape)
    d_weight = rows.t() @ features.reshape(-1, features.shape[-1])
    return d_features, d_weight, rows.sum(0) if ctx.has_bias else None, None


_cluster_logits_op.register_autograd(_cluster_logits_grad, setup_context=_cluster_logits_setup)


def cluster_logits(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``features @ weight^T + bias`` (the last projection of the clustering ``f``, paper 004 eq. 6)
    written in the layout the pooling kernels read fastest: a ``(..., M)`` view of rows padded to a
    multiple of 16 elements (``stride(-2) = ceil(M / 16) * 16``), so the kernels load each row as
    16-byte vectors (:func:`vitpatch.kernels.cluster_attention.logits_width`). The padding belongs to
    the layout only: the weight stays ``(M, K)`` and the padding columns are never read as logits.

    Under autocast the product runs in autocast's dtype, as ``nn.Linear`` would; the result is
    stored in ``dtype`` (default: the dtype of ``features``). Differentiable in all three tensors.
    """
    dtype = features.dtype if dtype is None else dtype
    device = features.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        cast = torch.get_autocast_dtype(device)
        features, weight = features.to(cast), weight.to(cast)
        bias = None if bias is None else bias.to(cast)
    return torch.ops.vitpatch.cluster_logits(features, weight, bias, dtype)


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
        padded = x.device.type in _PADDED_LOGITS_DEVICES
        if self.variant == "linear":
            return cluster_logits(x, self.fc.weight) if padded else self.fc(x)
        B, n, C = x.shape
        if grid is None or grid[0] * grid[1] != n:
            raise ValueError(f"the {self.variant!r} clustering needs the patch grid (gh, gw) with gh * gw = {n}, "
                             f"got {grid!r}")
        img = x.transpose(1, 2).reshape(B, C, grid[0], grid[1])
        if self.variant == "paper":
            y = self.act(self.conv(img))
        else:
            y = self.act2(self.pwconv(self.act1(self.dwconv(img))))
        if padded:  # the same projection (a 1x1 convolution is one), in the pooling kernels' layout
            return cluster_logits(y.flatten(2).transpose(1, 2), self.fc.weight.flatten(1), self.fc.bias, x.dtype)
        if self.variant == "paper":
            return self.fc(y.flatten(2).transpose(1, 2))
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
    """Tell every :class:`PaCaAttention` (prefix count, patch grid) and every :class:`WinfTAttention`
    (prefix count, for patch-pair gate counts) in a timm ViT its token layout.

    Reads ``model.num_prefix_tokens`` and ``model.patch_embed.grid_size`` unless given; the grid
    is required only when the model has PaCa layers.
    """
    if num_prefix_tokens is None:
        num_prefix_tokens = getattr(model, "num_prefix_tokens", None)
    if grid is None and getattr(model, "patch_embed", None) is not None:
        grid = getattr(model.patch_embed, "grid_size", None)
    paca = [m for m in model.modules() if isinstance(m, PaCaAttention)]
    if num_prefix_tokens is None or (grid is None and paca):
        raise ValueError("set_token_layout needs num_prefix_tokens and grid (not found on the model)")
    if isinstance(num_prefix_tokens, bool) or int(num_prefix_tokens) != num_prefix_tokens or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be a non-negative integer, got {num_prefix_tokens!r}")
    grid = None if grid is None else check_grid(tuple(grid))
    for m in paca:
        m.num_prefix_tokens, m.grid = int(num_prefix_tokens), grid
    for m in _winft_layers(model):
        m.num_prefix_tokens = int(num_prefix_tokens)
    return model


# ------------------------------------------------------------------------------------------ DIP
def _transformer_blocks(model: nn.Module) -> list:
    """``model.blocks``' children, looking through DDP / DataParallel (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers."""
    inner = model
    while getattr(inner, "blocks", None) is None:
        nxt = getattr(inner, "module", None)
        if not isinstance(nxt, nn.Module):
            nxt = getattr(inner, "_orig_mod", None)
        if not isinstance(nxt, nn.Module):
            raise ValueError(f"zero_dropped_tokens needs a timm model with transformer blocks in `.blocks`; "
                             f"{type(model).__name__} has none")
        inner = nxt
    blocks = inner.blocks
    return list(blocks.children()) if isinstance(blocks, nn.Module) else list(blocks)


_ATTN_MASK_POSITION: dict = {}


def _attn_mask_position(block: nn.Module) -> Optional[int]:
    """Index of ``attn_mask`` among the positional arguments of ``block.forward`` (after ``self``), or None."""
    cls = type(block)
    if cls not in _ATTN_MASK_POSITION:
        pos = None
        try:
            params = list(inspect.signature(cls.forward).parameters.values())[1:]
        except (TypeError, ValueError):
            params = []
        for i, p in enumerate(params):
            if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                break
            if p.name == "attn_mask":
                pos = i
                break
        _ATTN_MASK_POSITION[cls] = pos
    return _ATTN_MASK_POSITION[cls]


def _zero_tokens_hook(block: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of :func:`zero_dropped_tokens`: ``x * token_keep[..., None]`` when the block's
    ``attn_mask`` (keyword, or positional as in the block's signature) is a WindowMask with ``token_keep``."""
    mask = kwargs.get("attn_mask")
    if mask is None:
        pos = _attn_mask_position(block)
        if pos is not None and len(args) > pos:
            mask = args[pos]
    if not isinstance(mask, WindowMask) or mask.token_keep is None:
        return None
    in_args = len(args) > 0
    x = args[0] if in_args else kwargs.get("x")
    if not isinstance(x, torch.Tensor):
        return None
    keep = mask.to(x.device).token_keep
    if x.dim() != 3 or tuple(x.shape[:2]) != tuple(keep.shape):
        raise ValueError(f"zero_dropped_tokens: token_keep has shape {tuple(keep.shape)} but the block input has "
                         f"shape {tuple(x.shape)} (expected (B, N, C) with (B, N) = token_keep's shape)")
    x = x * keep[..., None].to(x.dtype)
    if in_args:
        return (x,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "x": x}


def _has_zero_hook(block: nn.Module) -> list:
    return [i for i, h in block._forward_pre_hooks.items() if h is _zero_tokens_hook]


def zero_dropped_tokens(model: nn.Module, enabled: bool = True) -> nn.Module:
    """DIP by token zeroing (paper 000 §4.2; docs/math.md §1): before every transformer block, multiply
    the tokens by the ``token_keep`` of the block's ``attn_mask`` :class:`vitpatch.WindowMask`.

    Registers a forward pre-hook (``with_kwargs=True``) on each child of ``model.blocks`` (through
    DDP / DataParallel ``.module`` and ``torch.compile`` ``._orig_mod`` wrappers; ``ValueError``
    for a model without ``.blocks``). The hook finds ``attn_mask`` as a keyword (timm 1.0's
    ``VisionTransformer.forward_features`` calls ``blk(x, attn_mask=..., is_causal=...)``) or at
    its position in the block's ``forward`` signature, and returns ``x * token_keep[..., None]``
    (cast to ``x.dtype``, on ``x.device`` through the mask's device cache). It acts in training
    and evaluation alike; without a ``WindowMask`` or without ``token_keep`` it does nothing.

    So a dropped token's residual stream is 0 at every block input (its own block output is
    not: attention and MLP of ``LayerNorm(0)`` add to it, and it is zeroed again at the next
    block; the last block's output is not zeroed, which matters only for average pooling).
    Zeroing does not remove the token as a key: ``LayerNorm(0)`` is the LN bias, so it still
    offers a constant key and value; ``key_keep`` removes it, independently (set either or both).

    Idempotent: calling it again does not add a second hook; ``enabled=False`` removes the hooks.
    Returns ``model``.
    """
    for block in _transformer_blocks(model):
        ids = _has_zero_hook(block)
        if enabled and not ids:
            block.register_forward_pre_hook(_zero_tokens_hook, with_kwargs=True)
        elif not enabled:
            for i in ids:
                del block._forward_pre_hooks[i]
                block._forward_pre_hooks_with_kwargs.pop(i, None)
    return model
