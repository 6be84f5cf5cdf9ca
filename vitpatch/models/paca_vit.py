"""PaCa-ViT: the PVTv2-style pyramid of patch-to-cluster attention blocks (paper 004; docs/math.md §7).

Importing :mod:`vitpatch.models` registers nine models with timm::

    import timm, vitpatch.models
    model = timm.create_model("paca_vit_b0", num_classes=100, drop_path_rate=0.1)

Architecture (paper 004, Fig. 3 and Table 1; §3.2 for the PVTv2 pieces, §3.3 for PaCa):

- stem: ``Conv7x7 s4 p3`` + LayerNorm (Table 1, "Stem" ``(k1, s1, p1) = (7, 4, 3)``; ``(3, 1, 1)`` in
  the C100 setting), or, in the authors' released configurations, two ``Conv3x3 s2`` + LayerNorm;
- 4 stages; stages 2–4 start with a transition ``Conv3x3 s2 p1`` + LayerNorm (Table 1; the C100
  setting's stage-4 transition has stride 1);
- blocks: ``x + PaCa(LN(x))`` then ``x + FFN(LN(x))`` (eq. 2–3), where the FFN is the MBlock
  ``fc1 -> depthwise Conv3x3 -> GELU -> fc2`` (§3.2) and the attention of a stage is
  :class:`vitpatch.nn.PaCaAttention` with ``M`` clusters (eq. 6–8), or plain MHSA (timm
  ``Attention``) where the stage has ``M = 0`` (stage 4 in IN1K; stages 3 and 4 in the C100
  setting of Table 1: ``num_clusters=(64, 64, 0, 0)``);
- a LayerNorm after every stage; global average pooling and a linear head.

Feature maps of stages 1–4 have strides 4, 8, 16, 32 (C100 setting: 1, 2, 4, 4): inputs must have a
height and width divisible by 32 (C100: 4); any such size works (there is no position embedding).

Registered models (channels; depths; heads; clusters in stages 1-3; FFN ratios):

- ``paca_vit_b0``: 32/64/160/256; 2/2/2/2; 1/2/5/8; 49; 8/8/4/4 (Table 1)
- ``paca_vit_b1``: 64/128/320/512; 2/2/2/2; 1/2/5/8; 49; 8/8/4/4 (Table 1)
- ``paca_vit_b2``: 64/128/320/512; 3/4/6/3; 1/2/5/8; 49; 8/8/4/4 (Table 1)
- ``paca_vit_tiny``: 96/192/320/384; 2/2/4/2; 2/4/8/16; 100; 4/4/4/4 (the release)
- ``paca_vit_small``: 96/192/320/384; 3/3/10/3; 2/4/8/16; 100; 4/4/4/4 (the release)
- ``paca_vit_base``: 96/192/384/512; 3/3/18/3; 2/4/8/16; 100; 4/4/4/4 (the release)
- ``paca_vit_b0_c100``, ``paca_vit_b1_c100``, ``paca_vit_b2_c100``: B0/B1/B2 in the C100 setting of
  Table 1 (stem Conv3x3 s1 p1, stage-4 transition stride 1, clusters 64/64 in stages 1-2 and MHSA in
  stages 3-4; 100 classes; default input 32x32, final map 8x8)

B0/B1/B2 follow Table 1 ("paper" clustering of eq. 6–7, ``r = 4``, computed in every block,
PVTv2's stem and FFN). tiny/small/base are the authors' released configurations (their
``models/paca_vit.py``, github.com/iVMCL/PaCaViT): the ``"official"`` clustering (depthwise
Conv7x7, GELU, Conv1x1, GELU, Conv1x1 without bias), computed only in the first block of a
stage and shared by the stage's other blocks (``clustering_scope="stage"``), a two-conv stem,
and an FFN whose depthwise conv has a residual connection (``mlp_dw_shortcut=True``).

Parameter counts (computed and checked by ``tests/test_models.py``, the C100 models by
``tests/test_paca_trace.py``) against the papers'
(docs/math.md §7; paper 004 Tables 2 and 3; the release's README):

================ ============ ======== ======
model             ours         reported gap
================ ============ ======== ======
paca_vit_b0       3,344,238    3.4M     -1.6%
paca_vit_b1       12,706,254   12.7M    +0.05%
paca_vit_b2       22,658,565   22.7M    -0.2%
paca_vit_tiny     12,200,680   12.2M    +0.01%
paca_vit_small    22,037,704   22.0M    +0.2%
paca_vit_base     46,911,304   46.9M    +0.02%
paca_vit_b0_c100  2,989,940    3.0M     -0.3%
paca_vit_b1_c100  11,768,196   11.8M    -0.3%
paca_vit_b2_c100  20,781,396   20.8M    -0.1%
================ ============ ======== ======

(1000-class head for the IN1K rows, Table 2; 100-class head for the C100 rows, Table 3. The C100
models differ from ``num_classes=100, num_clusters=(64, 64, 0, 0)`` on the IN1K B models only in
the stem's 3x3 instead of 7x7 kernel: 3,840 (B0) / 7,680 (B1, B2) fewer weights; the stride-1
stage-4 transition has the same weights as a stride-2 one.) Our B models are exactly timm's
PVTv2-B0/B1/B2 (3.67M, 14.01M, 25.36M) minus their spatial-reduction convolutions and norms plus
the eq. 6–7 clustering and ``cluster_norm`` of every PaCa block. B1, B2 and all three C100 counts
land within the rounding of the reported one-decimal numbers; B0 at 3.344M rounds to 3.3M, 5.8k
(0.2%) short of the 3.35M that would round to the reported 3.4M. We found no component of Table 1
or §3 that would account for it (clustering only in the first block of a stage, as the release
does, goes the other way: 3.27M, and would put B1/B2 at 12.42M/21.35M, off their reported
numbers), so we keep the paper's stated design and record the gap. The C100 counts all round to
Table 3's.

timm conventions: every registered model traces with ``torch.fx`` through timm's FX helpers
(``timm.layers.create_feature_extractor``; the PaCa attention and clustering modules are
``register_notrace_module`` leaves and the stem's input check a ``register_notrace_function``) and
scripts with ``torch.jit.script`` (:class:`PaCaViTAttention` has a TorchScript forward in plain
PyTorch ops), both with outputs equal to eager (``tests/test_paca_trace.py``).

Loading the authors' weights: :func:`load_official_checkpoint` (or timm's
``pretrained=True, pretrained_cfg_overlay=dict(file=path)``, which runs
:func:`checkpoint_filter_fn`) converts their state dict: separate ``q``/``k``/``v`` Linear
layers become one ``qkv`` (q rows, then k, then v), ``stage{i}.{j}`` becomes
``stages.{i-1}.blocks.{j}``, and so on (see :func:`checkpoint_filter_fn`). No weights are
downloaded: the pretrained configs have no URL.

Not implemented: the release's MLP clustering (``p2cmlp``), its clustering teacher
(``convmixer``), and its off-by-default layer scale, post-norm, cluster and block position
embeddings (their checkpoints are refused with a ``ValueError``); ``device`` / ``dtype``
construction keywords.
"""

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as TF
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, ClassifierHead, DropPath, LayerNorm, LayerNorm2d, trunc_normal_
from timm.layers import calculate_drop_path_rates, register_notrace_function, register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.pvt_v2 import MlpWithDepthwiseConv

from ..nn import CLUSTERING_VARIANTS, PaCaAttention, PaCaClustering

__all__ = ["PaCaViT", "PaCaBlock", "PaCaStage", "PaCaViTAttention", "PaCaViTClustering", "checkpoint_filter_fn",
           "load_official_checkpoint"]

_NORM_EPS = 1e-6  # every LayerNorm of PVTv2 and of the authors' release


@register_notrace_function
def paca_check_images(x: torch.Tensor, in_chans: int, divisor: int) -> None:
    """The stem's input check: ``x (B, in_chans, H, W)`` with ``H`` and ``W`` divisible by ``divisor``.

    timm's FX tracing keeps it as one leaf call run on the real tensors (``register_notrace_function``;
    FX only wraps functions whose name has no leading underscore); TorchScript compiles it (the
    eager-only ``TypeError`` sits behind ``torch.jit.is_scripting()``).
    """
    if not torch.jit.is_scripting():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of images (B, C, H, W), got {type(x).__name__}")
    shape: List[int] = list(x.shape)
    if len(shape) != 4 or shape[1] != in_chans:
        raise ValueError(f"x must have shape (B, {in_chans}, H, W) (in_chans={in_chans}), got {shape}")
    if shape[2] % divisor != 0 or shape[3] % divisor != 0:
        raise ValueError(f"x: PaCa-ViT needs an image height and width divisible by {divisor} (its total stride), "
                         f"got {shape[2]}x{shape[3]}")


# Stem kinds (Table 1, "Stem"): their stride s_1.
STEM_STRIDES = {"overlap": 4, "conv3x2": 4, "c100": 1}


class PaCaStem(nn.Module):
    """Stem (Table 1, stage 1), then LayerNorm: ``"overlap"`` Conv7x7 s4 p3 (PVTv2, IN1K), ``"c100"`` Conv3x3
    s1 p1 (the C100 setting) or ``"conv3x2"`` two Conv3x3 s2 (the authors' release). Checks the image size:
    height and width divisible by ``size_divisor``."""

    def __init__(self, in_chans: int, dim: int, kind: str = "overlap", size_divisor: int = 32):
        super().__init__()
        self.in_chans, self.size_divisor = in_chans, size_divisor
        if kind == "overlap":
            self.proj = nn.Conv2d(in_chans, dim, 7, stride=4, padding=3)
        elif kind == "c100":
            self.proj = nn.Conv2d(in_chans, dim, 3, stride=1, padding=1)
        elif kind == "conv3x2":
            self.proj = nn.Sequential(nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1),
                                      nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1))
        else:
            raise ValueError(f"stem must be one of {sorted(STEM_STRIDES)}, got {kind!r}")
        self.norm = LayerNorm2d(dim, eps=_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paca_check_images(x, self.in_chans, self.size_divisor)
        return self.norm(self.proj(x))


class Transition(nn.Module):
    """Transition between stages (Table 1): Conv3x3 stride ``stride`` (2; 1 before stage 4 in C100) padding 1,
    then LayerNorm; NCHW in and out."""

    def __init__(self, dim: int, dim_out: int, stride: int = 2):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim_out, 3, stride=stride, padding=1)
        self.norm = LayerNorm2d(dim_out, eps=_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class MBlockMlp(MlpWithDepthwiseConv):
    """The MBlock FFN (paper 004 §3.2): ``fc1 -> depthwise Conv3x3 -> GELU -> fc2`` (timm's PVTv2 layer).

    ``dw_shortcut=True`` adds the depthwise conv's input to its output, as in the authors' release.
    """

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0, dw_shortcut: bool = False):
        super().__init__(in_features, hidden_features, drop=drop)
        self.dw_shortcut = dw_shortcut

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        x = self.fc1(x)
        B, N, C = x.shape
        y = self.dwconv(self.relu(x.transpose(1, 2).reshape(B, C, feat_size[0], feat_size[1])))
        y = y.flatten(2).transpose(1, 2)
        if self.dw_shortcut:
            y = y + x
        return self.drop(self.fc2(self.drop(self.act(y))))


@register_notrace_module
class PaCaViTClustering(PaCaClustering):
    """:class:`vitpatch.nn.PaCaClustering` (eq. 6–7 logits) as PaCa-ViT holds it: the same module and
    parameters; a leaf of timm's FX tracing (its grid check needs real sizes) and, under TorchScript,
    a typed copy of its forward."""

    def forward(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        if not torch.jit.is_scripting():
            return super().forward(x, grid)
        if not hasattr(self, "conv") and not hasattr(self, "dwconv"):  # "linear"
            return self.fc(x)
        B, n, C = x.shape
        if grid is None:
            raise ValueError("the clustering needs the patch grid (gh, gw)")
        gh, gw = grid
        if gh * gw != n:
            raise ValueError(f"the clustering needs the patch grid (gh, gw) with gh * gw = {n}, got {gh}x{gw}")
        img = x.transpose(1, 2).reshape(B, C, gh, gw)
        if hasattr(self, "conv"):  # "paper"
            return self.fc(self.act(self.conv(img)).flatten(2).transpose(1, 2))
        y = self.act2(self.pwconv(self.act1(self.dwconv(img))))  # "official"
        return self.fc(y).flatten(2).transpose(1, 2)


@register_notrace_module
class PaCaViTAttention(PaCaAttention):
    """:class:`vitpatch.nn.PaCaAttention` (eq. 5–8) as PaCa-ViT holds it: an instance of it, with the same
    parameters and, in eager mode, the same forward (``grid``, ``return_assignment`` and ``cluster_logits``
    may also be given by position).

    timm conventions: a leaf of timm's FX tracing (``register_notrace_module``: the layout checks need
    real sizes; the traced graph calls it as one module, gradients flow through it), and a TorchScript
    forward in plain PyTorch ops (the math of :func:`vitpatch.reference.cluster_pool` and
    :func:`vitpatch.reference.cluster_attention`; ``store_assignment`` works, ``return_assignment`` is
    eager-only).
    """

    last_assignment: Optional[torch.Tensor]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.clustering is not None:  # same module and state, with the traceable/scriptable forward
            self.clustering.__class__ = PaCaViTClustering

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                grid: Optional[Tuple[int, int]] = None, return_assignment: bool = False,
                cluster_logits: Optional[torch.Tensor] = None):
        if not torch.jit.is_scripting():
            return super().forward(x, attn_mask, is_causal, grid=grid, return_assignment=return_assignment,
                                   cluster_logits=cluster_logits)
        if attn_mask is not None or is_causal:
            raise ValueError("PaCaAttention takes no attention mask and no is_causal: its keys are cluster tokens")
        if return_assignment:
            raise ValueError("return_assignment is not available under TorchScript: set store_assignment = True")
        if grid is None:
            raise ValueError("PaCa-ViT's attention needs grid= (gh, gw) under TorchScript")
        B, N, C = x.shape
        gh, gw = grid
        P = N - gh * gw
        if P < 0:
            raise ValueError(f"PaCaAttention: {N} tokens do not fit grid {gh}x{gw}")
        patches = x[:, P:]
        if cluster_logits is None:
            if self.clustering is not None:
                cluster_logits = self.clustering(patches, grid)  # eq. 6
            else:
                raise ValueError("this PaCaAttention was built with shared_clustering=True: pass cluster_logits=")
        logits = cluster_logits
        if list(logits.shape) != [B, N - P, self.num_clusters]:
            raise ValueError(f"cluster_logits must have shape (B, n, M) = ({B}, {N - P}, {self.num_clusters}), "
                             f"got {list(logits.shape)}")
        assignment = torch.softmax(logits.float(), dim=1)  # eq. 7: over the tokens
        pooled = torch.softmax(logits.to(patches.dtype), dim=1).transpose(1, 2) @ patches
        z = self.cluster_norm(pooled)  # eq. 8
        kv_in = torch.cat([z, x[:, :P]], 1) if P > 0 else z
        D = self.num_heads * self.head_dim
        w, b = self.qkv.weight, self.qkv.bias
        if b is None:
            q = TF.linear(x, w[:D])
            kv = TF.linear(kv_in, w[D:])
        else:
            q = TF.linear(x, w[:D], b[:D])
            kv = TF.linear(kv_in, w[D:], b[D:])
        q = self.q_norm(q.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2))
        kv = kv.reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = self.k_norm(kv[0]), kv[1]
        attn = self.attn_drop(torch.softmax(self.scale * (q @ k.transpose(-2, -1)), dim=-1))  # eq. 5
        out = self.norm((attn @ v).transpose(1, 2).reshape(B, N, D))
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        if self.store_assignment:
            self.last_assignment = assignment.detach()
        return self.proj_drop(self.proj(out))


class PaCaBlock(nn.Module):
    """Transformer block (eq. 2–3): ``x + attn(LN(x))``, ``x + MBlock(LN(x))``.

    ``num_clusters > 0``: :class:`vitpatch.nn.PaCaAttention` (eq. 6–8; a :class:`PaCaViTAttention`);
    with ``owns_clustering=False`` the block has no clustering module and takes the cluster logits
    of an earlier block (stage-wise clustering). ``num_clusters == 0``: timm's MHSA.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, num_clusters: int = 49,
                 clustering: str = "paper", cluster_reduction: int = 4, owns_clustering: bool = True,
                 mlp_dw_shortcut: bool = False, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=_NORM_EPS)
        self.num_clusters = num_clusters
        if num_clusters > 0:
            self.attn = PaCaViTAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                         proj_drop=proj_drop, num_clusters=num_clusters, clustering=clustering,
                                         cluster_reduction=cluster_reduction, num_prefix_tokens=0,
                                         shared_clustering=not owns_clustering)
            self.attn.cluster_norm.eps = _NORM_EPS
        else:
            self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=_NORM_EPS)
        self.mlp = MBlockMlp(dim, int(dim * mlp_ratio), drop=proj_drop, dw_shortcut=mlp_dw_shortcut)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int],
                cluster_logits: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``x (B, H*W, C)`` → ``(x, cluster_logits)``: the logits this block used (``None`` for MHSA)."""
        y = self.norm1(x)
        if hasattr(self.attn, "cluster_norm"):  # PaCa (num_clusters > 0); a static test for TorchScript
            if cluster_logits is None:
                if self.attn.clustering is not None:
                    cluster_logits = self.attn.clustering(y, feat_size)  # eq. 6
                else:
                    raise ValueError("this block shares its stage's clustering: pass the first block's "
                                     "cluster_logits")
            a = self.attn(y, grid=feat_size, cluster_logits=cluster_logits)
        else:
            a = self.attn(y)
        x = x + self.drop_path1(a)
        x = x + self.drop_path2(self.mlp(self.norm2(x), feat_size))
        return x, cluster_logits


class PaCaStage(nn.Module):
    """One stage: optional transition (stride ``downsample_stride``), ``depth`` blocks, LayerNorm;
    ``(B, C, H, W)`` in and out.

    ``clustering_scope="block"``: every PaCa block clusters its own input; ``"stage"``: the first
    block clusters and the others reuse its logits (the authors' release).
    """

    def __init__(self, dim: int, dim_out: int, depth: int, downsample: bool, num_heads: int, mlp_ratio: float,
                 num_clusters: int, clustering: str, cluster_reduction: int, clustering_scope: str,
                 mlp_dw_shortcut: bool, qkv_bias: bool, proj_drop: float, attn_drop: float,
                 drop_path: Sequence[float], downsample_stride: int = 2):
        super().__init__()
        self.grad_checkpointing = False
        self.share_clustering = clustering_scope == "stage" and num_clusters > 0
        self.downsample = Transition(dim, dim_out, downsample_stride) if downsample else None
        self.blocks = nn.ModuleList([
            PaCaBlock(dim_out, num_heads, mlp_ratio, num_clusters, clustering, cluster_reduction,
                      owns_clustering=not self.share_clustering or j == 0, mlp_dw_shortcut=mlp_dw_shortcut,
                      qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop, drop_path=drop_path[j])
            for j in range(depth)])
        self.norm = LayerNorm(dim_out, eps=_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        B, C, H, W = x.shape
        feat_size = (H, W)
        x = x.flatten(2).transpose(1, 2)
        logits: Optional[torch.Tensor] = None
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, used = checkpoint(blk, x, feat_size, logits)
            else:
                x, used = blk(x, feat_size, logits)
            if self.share_clustering:
                logits = used
        x = self.norm(x)
        return x.transpose(1, 2).reshape(B, C, H, W)


def _per_stage(name: str, value, num_stages: int, kind=int) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * num_stages
    if not isinstance(value, (tuple, list)) or len(value) != num_stages:
        raise ValueError(f"{name} must be a number or a sequence of {num_stages} (one per stage), got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
            raise TypeError(f"{name} must hold {kind.__name__}s, got {value!r}")
    return tuple(kind(v) for v in value)


class PaCaViT(nn.Module):
    """PaCa-ViT (paper 004, Fig. 3, Table 1): a PVTv2-style pyramid of patch-to-cluster attention blocks.

    Args:
        in_chans: image channels.
        num_classes: classes of the linear head (0: no head, ``forward`` returns pooled features).
        global_pool: timm pooling type of the head (``"avg"`` as in the paper, ``""`` for none, ...).
        embed_dims, depths, num_heads, mlp_ratios: per stage (Table 1: ``C_i``, ``L_i``, ``h_i``, ``e_i``).
        num_clusters: ``M_i`` per stage; 0 makes the stage plain MHSA (Table 1: ``(49, 49, 49, 0)``
            in IN1K, ``(64, 64, 0, 0)`` in C100).
        clustering: clustering module of eq. 6 (``"paper"``, ``"official"`` or ``"linear"``).
        cluster_reduction: ``r`` of the paper clustering (Table 1: 4).
        clustering_scope: ``"block"`` (every PaCa block clusters) or ``"stage"`` (the first block of
            a stage clusters, the others reuse its logits; the authors' release).
        stem: ``"overlap"`` (Conv7x7 s4, Table 1 IN1K), ``"c100"`` (Conv3x3 s1, Table 1 C100) or
            ``"conv3x2"`` (two Conv3x3 s2, the authors' release).
        strides: per stage, ``(s_1, ..., s_S)`` of Table 1: ``s_1`` is the stem's (4, or 1 for ``"c100"``),
            the others the transitions' (1 or 2). Default: the stem's stride, then 2 for every transition;
            the C100 setting is ``(1, 2, 2, 1)``.
        mlp_dw_shortcut: residual around the FFN's depthwise conv (the authors' release).
        qkv_bias: biases of the q/k/v projections.
        drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: dropout before the head, after
            the projections, on attention weights, and the stochastic-depth rate (linear over blocks).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg",
                 embed_dims: Sequence[int] = (32, 64, 160, 256), depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (1, 2, 5, 8), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 num_clusters: Sequence[int] = (49, 49, 49, 0), clustering: str = "paper",
                 cluster_reduction: int = 4, clustering_scope: str = "block", stem: str = "overlap",
                 strides: Optional[Sequence[int]] = None,
                 mlp_dw_shortcut: bool = False, qkv_bias: bool = True, drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if not isinstance(depths, (tuple, list)) or not depths:
            raise ValueError(f"depths must be a non-empty sequence (one depth per stage), got {depths!r}")
        S = len(depths)
        depths = _per_stage("depths", depths, S)
        embed_dims = _per_stage("embed_dims", embed_dims, S)
        num_heads = _per_stage("num_heads", num_heads, S)
        mlp_ratios = _per_stage("mlp_ratios", mlp_ratios, S, kind=float)
        num_clusters = _per_stage("num_clusters", num_clusters, S)
        for name, values, low in (("depths", depths, 1), ("embed_dims", embed_dims, 1), ("num_heads", num_heads, 1),
                                  ("num_clusters", num_clusters, 0)):
            if min(values) < low:
                raise ValueError(f"{name} must be >= {low} in every stage, got {values}")
        for i, (d, h) in enumerate(zip(embed_dims, num_heads)):
            if d % h:
                raise ValueError(f"embed_dims[{i}] = {d} is not divisible by num_heads[{i}] = {h}")
        if clustering not in CLUSTERING_VARIANTS:
            raise ValueError(f"clustering must be one of {CLUSTERING_VARIANTS}, got {clustering!r}")
        if stem not in STEM_STRIDES:
            raise ValueError(f"stem must be one of {sorted(STEM_STRIDES)}, got {stem!r}")
        if strides is None:
            strides = (STEM_STRIDES[stem],) + (2,) * (S - 1)
        strides = _per_stage("strides", strides, S)
        if strides[0] != STEM_STRIDES[stem] or any(t not in (1, 2) for t in strides[1:]):
            raise ValueError(f"strides must be ({STEM_STRIDES[stem]}, then 1 or 2 per transition) for stem {stem!r}, "
                             f"got {strides}")
        if clustering_scope not in ("block", "stage"):
            raise ValueError(f"clustering_scope must be 'block' or 'stage', got {clustering_scope!r}")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")

        self.num_classes, self.in_chans, self.global_pool = num_classes, in_chans, global_pool
        self.depths, self.embed_dims, self.num_clusters = depths, embed_dims, num_clusters
        self.strides = strides
        reductions = [math.prod(strides[:i + 1]) for i in range(S)]
        self.size_divisor = reductions[-1]
        self.patch_embed = PaCaStem(in_chans, embed_dims[0], stem, self.size_divisor)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages, self.feature_info = [], []
        for i in range(S):
            stages.append(PaCaStage(
                embed_dims[max(i - 1, 0)], embed_dims[i], depths[i], downsample=i > 0, num_heads=num_heads[i],
                downsample_stride=strides[i],
                mlp_ratio=mlp_ratios[i], num_clusters=num_clusters[i], clustering=clustering,
                cluster_reduction=cluster_reduction, clustering_scope=clustering_scope,
                mlp_dw_shortcut=mlp_dw_shortcut, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[i]))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reductions[i], module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head = self._make_head(num_classes, global_pool, drop_rate)
        self.apply(self._init_weights)

    def _make_head(self, num_classes, global_pool, drop_rate):
        try:
            return ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        except (AssertionError, KeyError, ValueError) as e:
            raise ValueError(f"global_pool {global_pool!r} is not a timm pooling type ({e})") from None

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # PVTv2's scheme: truncated normal (std 0.02) for Linear layers, He normal over fan-out for convolutions.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ timm model API
    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        if coarse:
            return dict(stem=r"^patch_embed", blocks=r"^stages\.(\d+)")
        return dict(stem=r"^patch_embed", blocks=[(r"^stages\.(\d+)\.downsample", (0,)),
                                                  (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                                                  (r"^stages\.(\d+)\.norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        if global_pool is not None:
            self._make_head(0, global_pool, 0.0)  # validates the pooling type
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Stage outputs for dense tasks: ``(B, C_i, H / 2^(i+2), W / 2^(i+2))`` for the stages in ``indices``.

        Every stage output is already layer-normalised (Table 1), so ``norm`` changes nothing.
        Returns the list, or ``(final_features, list)`` unless ``intermediates_only``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        intermediates = []
        x = self.patch_embed(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.head.reset(0, "", in_features=self.num_features)
            self.num_classes, self.global_pool = 0, ""
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.patch_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------ the authors' weights
_OFFICIAL_BLOCK_RENAMES = (("norm1_before.", "norm1."), ("norm2_before.", "norm2."), ("attn.proj.", "attn.proj."),
                           ("attn.cluster_norm.", "attn.cluster_norm."), ("mlp.fc1.", "mlp.fc1."),
                           ("mlp.fc2.", "mlp.fc2."), ("mlp.dwconv.dwconv.", "mlp.dwconv."))
# index inside the authors' nn.Sequential clustering -> our PaCaClustering attribute, per variant
_OFFICIAL_CLUSTERING = {"official": {"0": "dwconv", "2": "pwconv", "4": "fc"}, "linear": {"0": "fc"}}


def _is_official(state_dict: Dict[str, torch.Tensor]) -> bool:
    return any(re.match(r"^(stage\d+\.\d+\.|transition\d+\.|norm\d+\.)", k) for k in state_dict)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: PaCaViT) -> Dict[str, torch.Tensor]:
    """Convert a state dict in the authors' released format (github.com/iVMCL/PaCaViT) to this layout.

    State dicts already in this layout are returned unchanged. The mapping (``i`` 1-based in
    theirs, 0-based in ours):

    - ``stage{i}.{j}.attn.{q,k,v}.{weight,bias}`` → ``stages.{i-1}.blocks.{j}.attn.qkv.*``: the
      three concatenated along the output dimension, q rows first, then k, then v;
    - ``stage{i}.{j}.norm1_before`` / ``norm2_before`` → ``...blocks.{j}.norm1`` / ``norm2``;
      ``attn.proj``, ``attn.cluster_norm``, ``mlp.fc1``, ``mlp.fc2`` keep their names;
      ``mlp.dwconv.dwconv`` → ``mlp.dwconv``;
    - ``stage{i}.{j}.attn.clustering.clustering.{0,2,4}`` (their conv clustering) →
      ``attn.clustering.{dwconv,pwconv,fc}``; index 0 of their linear clustering → ``fc``;
    - ``transition{i}.{proj,norm}`` → ``stages.{i}.downsample.{proj,norm}``;
      ``norm{i}`` → ``stages.{i-1}.norm``; ``patch_embed.*`` is unchanged; ``head`` → ``head.fc``.

    Options of their code that this model does not have (cluster or block position embeddings,
    layer scale, post-norm, the clustering teacher) raise ``ValueError``.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    if not _is_official(state_dict):
        return state_dict
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        m = re.match(r"^stage(\d+)\.(\d+)\.(.+)$", key)
        if m:
            i, j, rest = int(m.group(1)) - 1, int(m.group(2)), m.group(3)
            prefix = f"stages.{i}.blocks.{j}."
            qm = re.match(r"^attn\.([qkv])\.(weight|bias)$", rest)
            cm = re.match(r"^attn\.clustering\.clustering\.(\d+)\.(weight|bias)$", rest)
            if qm:
                qkv.setdefault(f"{prefix}attn.qkv.{qm.group(2)}", {})[qm.group(1)] = value
                continue
            if cm:
                variant = _block_clustering_variant(model, i, j)
                name = _OFFICIAL_CLUSTERING.get(variant, {}).get(cm.group(1))
                if name is None:
                    unknown.append(key)
                    continue
                out[f"{prefix}attn.clustering.{name}.{cm.group(2)}"] = value
                continue
            for old, new in _OFFICIAL_BLOCK_RENAMES:
                if rest.startswith(old):
                    out[prefix + new + rest[len(old):]] = value
                    break
            else:
                unknown.append(key)
            continue
        m = re.match(r"^transition(\d+)\.((?:proj|norm)\..+)$", key)
        if m:
            out[f"stages.{int(m.group(1))}.downsample.{m.group(2)}"] = value
            continue
        m = re.match(r"^norm(\d+)\.(.+)$", key)
        if m:
            out[f"stages.{int(m.group(1)) - 1}.norm.{m.group(2)}"] = value
            continue
        if key.startswith("patch_embed."):
            out[key] = value
        elif key.startswith("head."):
            out["head.fc." + key[len("head."):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"state_dict has {len(unknown)} entries of the authors' format that this model cannot take "
                         f"(an option it does not implement, or a clustering variant other than the model's "
                         f"{sorted(_OFFICIAL_CLUSTERING)}): {unknown[:8]}")
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"state_dict: {key} needs q, k and v entries, found only {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def _block_clustering_variant(model: PaCaViT, stage: int, block: int) -> Optional[str]:
    try:
        clustering = model.stages[stage].blocks[block].attn.clustering
    except (IndexError, AttributeError):
        return None
    return getattr(clustering, "variant", None)


def load_official_checkpoint(model: PaCaViT, checkpoint_path, strict: bool = True):
    """Load the authors' released weights (a local ``.pth`` file or a state dict) into ``model``.

    The file may hold the state dict itself or wrap it (``state_dict``, ``model``, EMA keys), as
    timm's loader accepts. Returns ``model.load_state_dict``'s result (missing and unexpected
    keys; with ``strict=True`` any mismatch raises).
    """
    if not isinstance(model, PaCaViT):
        raise TypeError(f"model must be a PaCaViT, got {type(model).__name__}")
    if isinstance(checkpoint_path, dict):
        state_dict = checkpoint_path
    else:
        from timm.models import load_state_dict
        state_dict = load_state_dict(str(checkpoint_path))
    return model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=strict)


# ------------------------------------------------------------------------ registration
def _cfg(**kwargs):
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head.fc",
            "paper_ids": "arXiv:2203.11987", "paper_name": "PaCa-ViT: Learning Patch-to-Cluster Attention in "
            "Vision Transformers", **kwargs}


_RELEASE_CFG = dict(first_conv="patch_embed.proj.0",
                    notes=("The authors' released ImageNet-1k weights (github.com/iVMCL/PaCaViT) load from a local "
                           "file: pretrained=True, pretrained_cfg_overlay=dict(file=path).",))

# CIFAR-100 (Table 1 C100 column, Table 3): 32x32 inputs, 8x8 final map; the usual CIFAR-100 channel statistics.
_C100_CFG = dict(num_classes=100, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
                 mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))

default_cfgs = generate_default_cfgs({
    "paca_vit_b0": _cfg(),
    "paca_vit_b1": _cfg(),
    "paca_vit_b2": _cfg(),
    "paca_vit_tiny": _cfg(**_RELEASE_CFG),
    "paca_vit_small": _cfg(**_RELEASE_CFG),
    "paca_vit_base": _cfg(**_RELEASE_CFG),
    "paca_vit_b0_c100": _cfg(**_C100_CFG),
    "paca_vit_b1_c100": _cfg(**_C100_CFG),
    "paca_vit_b2_c100": _cfg(**_C100_CFG),
})


def _create_paca_vit(variant: str, pretrained: bool = False, **kwargs) -> PaCaViT:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (0,) * 4)))))
    return build_model_with_cfg(PaCaViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


# Table 1 (IN1K): clusters 49 in stages 1-3, MHSA in stage 4, r = 4, FFN ratios 8/8/4/4, heads 1/2/5/8.
_PAPER = dict(num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), num_clusters=(49, 49, 49, 0), clustering="paper",
              cluster_reduction=4, clustering_scope="block", stem="overlap", mlp_dw_shortcut=False)
# Table 1 (C100): stem Conv3x3 s1 p1, stage-4 transition stride 1, 64 clusters in stages 1-2, MHSA in 3-4.
_PAPER_C100 = dict(_PAPER, num_clusters=(64, 64, 0, 0), stem="c100", strides=(1, 2, 2, 1), num_classes=100)
# The authors' release (models/paca_vit.py, "p2cconv_100_0"): 100 clusters, conv clustering shared per stage.
_RELEASE = dict(num_heads=(2, 4, 8, 16), mlp_ratios=(4, 4, 4, 4), num_clusters=(100, 100, 100, 0),
                clustering="official", clustering_scope="stage", stem="conv3x2", mlp_dw_shortcut=True)


def _build(variant: str, pretrained: bool, base: dict, arch: dict, kwargs: dict) -> PaCaViT:
    return _create_paca_vit(variant, pretrained=pretrained, **{**base, **arch, **kwargs})


@register_model
def paca_vit_b0(pretrained: bool = False, **kwargs) -> PaCaViT:
    """PaCa-ViT-B0 (paper 004, Table 1): channels 32/64/160/256, depths 2/2/2/2."""
    return _build("paca_vit_b0", pretrained, _PAPER, dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)), kwargs)


@register_model
def paca_vit_b1(pretrained: bool = False, **kwargs) -> PaCaViT:
    """PaCa-ViT-B1 (paper 004, Table 1): channels 64/128/320/512, depths 2/2/2/2."""
    return _build("paca_vit_b1", pretrained, _PAPER, dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)), kwargs)


@register_model
def paca_vit_b2(pretrained: bool = False, **kwargs) -> PaCaViT:
    """PaCa-ViT-B2 (paper 004, Table 1): channels 64/128/320/512, depths 3/4/6/3."""
    return _build("paca_vit_b2", pretrained, _PAPER, dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)), kwargs)


@register_model
def paca_vit_tiny(pretrained: bool = False, **kwargs) -> PaCaViT:
    """PaCa-Tiny, the authors' release (channels 96/192/320/384, depths 2/2/4/2, heads 2/4/8/16, 100 clusters)."""
    return _build("paca_vit_tiny", pretrained, _RELEASE,
                  dict(embed_dims=(96, 192, 320, 384), depths=(2, 2, 4, 2)), kwargs)


@register_model
def paca_vit_small(pretrained: bool = False, **kwargs) -> PaCaViT:
    """PaCa-Small, the authors' release (channels 96/192/320/384, depths 3/3/10/3, heads 2/4/8/16, 100 clusters)."""
    return _build("paca_vit_small", pretrained, _RELEASE,
                  dict(embed_dims=(96, 192, 320, 384), depths=(3, 3, 10, 3)), kwargs)


@register_model
def paca_vit_base(pretrained: bool = False, **kwargs) -> PaCaViT:
    """PaCa-Base, the authors' release (channels 96/192/384/512, depths 3/3/18/3, heads 2/4/8/16, 100 clusters)."""
    return _build("paca_vit_base", pretrained, _RELEASE,
                  dict(embed_dims=(96, 192, 384, 512), depths=(3, 3, 18, 3)), kwargs)


@register_model
def paca_vit_b0_c100(pretrained: bool = False, **kwargs) -> PaCaViT:
    """PaCa-ViT-B0, CIFAR-100 setting (paper 004, Table 1 C100 column, Table 3): B0 with the Conv3x3 s1 stem,
    a stride-1 stage-4 transition, 64 clusters in stages 1-2, MHSA in stages 3-4, 100 classes, 32x32 inputs."""
    return _build("paca_vit_b0_c100", pretrained, _PAPER_C100,
                  dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)), kwargs)


@register_model
def paca_vit_b1_c100(pretrained: bool = False, **kwargs) -> PaCaViT:
    """PaCa-ViT-B1, CIFAR-100 setting (paper 004, Table 1 C100 column, Table 3)."""
    return _build("paca_vit_b1_c100", pretrained, _PAPER_C100,
                  dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)), kwargs)


@register_model
def paca_vit_b2_c100(pretrained: bool = False, **kwargs) -> PaCaViT:
    """PaCa-ViT-B2, CIFAR-100 setting (paper 004, Table 1 C100 column, Table 3)."""
    return _build("paca_vit_b2_c100", pretrained, _PAPER_C100,
                  dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)), kwargs)
