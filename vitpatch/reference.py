"""Eager PyTorch oracle of every vitpatch operation, written straight from docs/math.md.

These functions materialise everything (the ``N x N`` mask, the ``(B, h, N, N)`` logits), so
they are exact and easy to read but memory-hungry. Tests run them in float64 as the oracle;
benchmarks time them as the baseline. ``upcast=True`` computes half-precision inputs in
float32 and casts the result back.

The signatures match :mod:`vitpatch.functional`; the ``*_probs`` helpers return the attention
probabilities themselves (for analysis and for the modules' non-fused path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks, _env
from .masks import WindowMask

__all__ = [
    "window_attention", "winft_attention", "cluster_pool", "cluster_attention",
    "window_attention_probs", "winft_gate", "winft_gates", "winft_parts", "winft_attention_probs", "winft_bce", "cluster_attention_probs",
]


def _compute_dtype(t: torch.Tensor, upcast: bool) -> torch.dtype:
    return torch.float32 if upcast and t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _masked_softmax(s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``allowed``; an empty row gives zeros (and zero grad)."""
    s = s.masked_fill(~allowed, float("-inf"))
    empty = ~allowed.any(-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)
    return torch.softmax(s, dim=-1) * allowed


# --------------------------------------------------------------------------------------- §1
def window_attention_probs(q, k, windows, *, grid=None, num_prefix_tokens=0, key_keep=None, scale=None,
                           upcast=False) -> torch.Tensor:
    """Window-masked attention probabilities ``(B, h, N, N)`` (docs/math.md §1, paper 000 §4.1)."""
    B, h, N, d = _checks.check_qkv(q, k, k)
    mask = _checks.as_window_mask(windows, grid, num_prefix_tokens, key_keep, q.device)
    mask.check(B, N)
    scale = _checks.check_scale(scale, d)
    dt = _compute_dtype(q, upcast)
    s = scale * (q.to(dt) @ k.to(dt).transpose(-2, -1))
    return _masked_softmax(s, mask.dense(B)[:, None])


def window_attention(q, k, v, windows, *, grid=None, num_prefix_tokens=0, key_keep=None, scale=None,
                     upcast=False) -> torch.Tensor:
    """``out_i = sum_j softmax_j(scale q_i.k_j over allowed j) v_j`` (docs/math.md §1, paper 000 §4.1 eq. 4).

    ``windows`` is a :class:`WindowMask` or an integer ``(n, 4)`` / ``(B, n, 4)`` tensor with
    ``grid`` given. A query with no allowed key outputs zeros.
    """
    _checks.check_qkv(q, k, v)
    a = window_attention_probs(q, k, windows, grid=grid, num_prefix_tokens=num_prefix_tokens,
                               key_keep=key_keep, scale=scale, upcast=upcast)
    return (a @ v.to(a.dtype)).to(q.dtype)


# --------------------------------------------------------------------------------------- §6
def winft_gate(q, k, upcast=False) -> torch.Tensor:
    """Gate logits ``g_ij = (1/h) sum_heads q_i . k_j`` (paper 000 eq. 8): ``(B, N, N)``, no ``1/sqrt(d)``."""
    h = q.shape[1]
    dt = _compute_dtype(q, upcast)
    return torch.einsum("bhid,bhjd->bij", q.to(dt), k.to(dt)) / h


def winft_parts(q, k, mode="multiply", scale=None, upcast=False):
    """``(probs (B, h, N, N), g (B, N, N), used (B, N, N) bool)`` of docs/math.md §6 (eq. 8–9).

    ``used`` is ``W`` (with the diagonal in mask mode): what ``gate_sum`` counts.
    """
    B, h, N, d = _checks.check_qkv(q, k, k)
    _checks.check_mode(mode)
    scale = _checks.check_scale(scale, d)
    g = winft_gate(q, k, upcast)
    w = torch.sigmoid(g.detach())
    t = w.mean(-1, keepdim=True)  # t_i over all N keys
    W = w > t  # hard threshold: no gradient
    dt = g.dtype
    s = scale * (q.to(dt) @ k.to(dt).transpose(-2, -1))
    if mode == "multiply":
        probs = torch.softmax(s * W[:, None].to(dt), dim=-1)
        used = W
    else:
        used = W | torch.eye(N, dtype=torch.bool, device=q.device)
        probs = _masked_softmax(s, used[:, None])
    return probs, g, used


def winft_gates(q, k, mode="multiply", *, chunk=None, upcast=False) -> torch.Tensor:
    """The WinfT gates ``W`` (docs/math.md §6, paper 000 eq. 8–9): bool ``(B, N, N)``, shared by the heads.

    Exactly ``winft_parts(q, k, mode, upcast=upcast)[2]`` (the same formula, op for op:
    ``g = einsum(q, k) / h``, ``W = sigmoid(g) > mean_j sigmoid(g)``, plus the diagonal in mask
    mode), without the ``(B, h, N, N)`` logits and probabilities: ``chunk`` query rows at a
    time, so the working set beyond the output (and a copy of ``q``, ``k`` in the compute dtype
    with ``upcast``) is a few ``(B, chunk, N)`` buffers. ``chunk=None`` sizes it from
    ``VITPATCH_CHUNK_MB``. No gradient flows (``W`` is a hard decision). Used by
    :class:`vitpatch.nn.WinfTAttention` to record each layer's ``W`` (paper 000 Fig. 13).
    """
    B, h, N, d = _checks.check_qkv(q, k, k)
    _checks.check_mode(mode)
    dt = _compute_dtype(q, upcast)
    if chunk is None:
        row_bytes = 4 * B * N * (torch.finfo(dt).bits // 8)  # g, sigmoid(g), its mean, W (generous)
        chunk = max(1, _env.chunk_budget_bytes() // max(1, row_bytes))
    elif isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer (query rows), got {chunk!r}")
    out = torch.empty(B, N, N, dtype=torch.bool, device=q.device)
    with torch.no_grad():
        qc, kc = q.detach().to(dt), k.detach().to(dt)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            w = torch.sigmoid(torch.einsum("bhid,bhjd->bij", qc[:, :, s:e], kc) / h)
            torch.gt(w, w.mean(-1, keepdim=True), out=out[:, s:e])
            del w
        if mode == "mask":
            out.diagonal(dim1=1, dim2=2).fill_(True)
    return out


def winft_attention_probs(q, k, *, mode="multiply", scale=None, upcast=False) -> torch.Tensor:
    """WinfT attention probabilities ``(B, h, N, N)`` (docs/math.md §6, paper 000 eq. 9)."""
    return winft_parts(q, k, mode, scale, upcast)[0]


def winft_bce(g: torch.Tensor, target: WindowMask) -> torch.Tensor:
    """``mean_{b,i,j} BCE(sigmoid(g_ij), T_ij)`` from the logits (paper 000 eq. 11), log-sigmoid form."""
    T = target.dense(g.shape[0]).to(g.dtype)
    return (F.softplus(g) - T * g).mean()


def winft_attention(q, k, v, *, mode="multiply", scale=None, target=None, return_gate_sum=False, upcast=False):
    """WinfT gated attention (docs/math.md §6, paper 000 eq. 8–11).

    ``w' = sigmoid(g)``, ``W = [w'_ij > mean_j w'_ij]``; ``mode="multiply"``: logits ``scale q.k * W``;
    ``mode="mask"``: keys with ``W = 0`` removed, the diagonal kept. Returns the output, or
    ``(output, bce_loss)`` when ``target`` (a :class:`WindowMask`) is given. With
    ``return_gate_sum=True`` it returns ``(output, bce_loss_or_None, gate_sum)`` where ``gate_sum``
    ``(B,)`` is ``sum_ij W_ij`` per image (the paper's EO of WinfT; the diagonal counted in mask mode).
    """
    B, h, N, d = _checks.check_qkv(q, k, v)
    target = _checks.check_target(target, B, N, q.device)
    probs, g, used = winft_parts(q, k, mode, scale, upcast)
    out = (probs @ v.to(probs.dtype)).to(q.dtype)
    loss = None if target is None else winft_bce(g, target).to(q.dtype)
    if return_gate_sum:
        return out, loss, used.sum((1, 2)).to(torch.float32)
    return out if target is None else (out, loss)


# --------------------------------------------------------------------------------------- §7
def cluster_pool(logits, x, upcast=False) -> torch.Tensor:
    """``z = softmax_over_tokens(logits)^T x`` (paper 004 eq. 7–8 before the LayerNorm).

    ``logits (B, n, M)``, ``x (B, n, C)`` → ``(B, M, C)``: each cluster is a distribution over
    the ``n`` token positions.
    """
    _checks.check_cluster_pool(logits, x)
    dt = _compute_dtype(logits, upcast)
    a = torch.softmax(logits.to(dt), dim=1)
    return (a.transpose(1, 2) @ x.to(dt)).to(x.dtype)


def cluster_attention_probs(q, k, *, scale=None, upcast=False) -> torch.Tensor:
    """Probabilities ``(B, h, N, M)`` of N queries over the M cluster keys (paper 004 eq. 6)."""
    B, h, N, d = _checks.check_qkv(q, k, k, self_attention=False)
    scale = _checks.check_scale(scale, d)
    dt = _compute_dtype(q, upcast)
    return torch.softmax(scale * (q.to(dt) @ k.to(dt).transpose(-2, -1)), dim=-1)


def cluster_attention(q, k, v, *, scale=None, upcast=False) -> torch.Tensor:
    """Attention of ``N`` queries over ``M`` cluster tokens (paper 004 §3.3 eq. 6): ``(B, h, N, d)``."""
    _checks.check_qkv(q, k, v, self_attention=False)
    a = cluster_attention_probs(q, k, scale=scale, upcast=upcast)
    return (a @ v.to(a.dtype)).to(q.dtype)
