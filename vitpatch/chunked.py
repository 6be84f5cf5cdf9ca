"""The PyTorch path of the attention ops: query chunks, restricted key sets, bounded memory.

This is what ``vitpatch.functional`` runs off-GPU (``VITPATCH_BACKEND=torch``). It is not the
eager oracle: it never allocates the ``(B, h, N, N)`` logits. Queries are processed in chunks
whose logits fit a fixed budget (``VITPATCH_CHUNK_MB``).

- Window attention: a chunk only looks at the keys inside the bounding box of its windows
  (the CPU analogue of the kernel's tile skipping) and runs PyTorch's fused SDPA with the
  chunk's boolean rows; the chunk plan is memoised on the mask, so every block of a ViT shares it.
- WinfT: a chunk holds full rows (the threshold needs all ``N`` keys), its gate logits and one
  probability buffer.

For backward, a chunk's graph or probabilities are kept while they fit the budget; the other
chunks are recomputed, so peak memory is ``O(B h N d)`` plus about one budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _env
from .masks import WindowMask

__all__ = ["window_attention", "winft_attention", "cluster_pool", "cluster_attention"]

Keys = Union[None, slice, torch.Tensor]


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk_rows(B: int, h: int, K: int, n_rows: int) -> int:
    """Query rows per chunk so that three ``(B, h, rows, K)`` float32 buffers fit the budget."""
    per_row = max(1, B * h * K * 4 * 3)
    return max(1, min(n_rows, _env.chunk_budget_bytes() // per_row))


def _take(t: torch.Tensor, keys: Keys) -> torch.Tensor:
    if keys is None:
        return t
    if isinstance(keys, slice):
        return t[:, :, keys]
    return t.index_select(2, keys)


def _put(acc: torch.Tensor, keys: Keys, value: torch.Tensor) -> None:
    if keys is None:
        acc += value
    elif isinstance(keys, slice):
        acc[:, :, keys] += value
    else:
        acc.index_add_(2, keys, value)


# --------------------------------------------------------------------------- what backward keeps
class _Saver:
    """Keeps per-chunk tensors for backward while they fit the chunk budget; later ones are recomputed."""

    def __init__(self):
        self.budget, self.items = _env.chunk_budget_bytes(), {}

    def offer(self, key, *tensors):
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size <= self.budget:
            self.budget -= size
            self.items[key] = tensors

    def get(self, key):
        return self.items.get(key)


@dataclass
class _Chunk:
    start: int
    end: int
    keys: Keys
    allowed: Optional[torch.Tensor] = None  # the chunk's rows of the mask, when cached with the plan


# --------------------------------------------------------------------------- window attention
def _window_chunks(mask: WindowMask, B: int, h: int) -> List[_Chunk]:
    """The chunk plan of ``mask`` for ``B`` images and ``h`` heads, built once per mask.

    Every block of a ViT gets the same mask, so the plan (and, while they fit a quarter of the
    chunk budget, the chunks' boolean mask rows) is computed once and reused.
    """
    def build():
        chunks = _plan_window_chunks(mask, B, h)
        room = _env.chunk_budget_bytes() // 4
        for c in chunks:
            keys = _key_index(c.keys, mask.seq_len, mask.device)
            size = B * (c.end - c.start) * (mask.seq_len if keys is None else len(keys))
            if size > room:
                break
            room -= size
            c.allowed = mask.rows(c.start, c.end, B, keys)
        return chunks

    return mask.memo(("chunked.window", B, h, _env.chunk_budget_bytes()), build)


def _plan_window_chunks(mask: WindowMask, B: int, h: int) -> List[_Chunk]:
    """Query chunks of window attention with the keys each may reach.

    Prefix queries see every key; a chunk of patch queries sees the prefix keys and the patches
    inside the bounding box of the chunk's windows over the batch (one host copy of the windows).
    """
    P, (gh, gw), N = mask.num_prefix_tokens, mask.grid, mask.seq_len
    chunks: List[_Chunk] = []
    if P:
        rows = _chunk_rows(B, h, N, P)
        chunks += [_Chunk(s, min(s + rows, P), None) for s in range(0, P, rows)]
    w = mask.windows.cpu().long()
    if w.dim() == 2:
        w = w.unsqueeze(0)
    n = gh * gw
    # chunk size from a typical window's reach; whole grid rows when a chunk spans several
    reach = int(((w[..., 3] - w[..., 1] + 1).float().mean() + 1) * gw) + P
    rows = _chunk_rows(B, h, min(N, reach), n)
    if rows >= gw:
        rows -= rows % gw
    dev = mask.device
    prefix = torch.arange(P, device=dev)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        part = w[:, s:e]
        x0, y0 = int(part[..., 0].min()), int(part[..., 1].min())
        x1, y1 = int(part[..., 2].max()), int(part[..., 3].max())
        if x0 == 0 and y0 == 0 and x1 == gw - 1 and y1 == gh - 1:
            keys: Keys = None
        elif x0 == 0 and x1 == gw - 1 and P == 0:
            keys = slice(y0 * gw, (y1 + 1) * gw)
        else:
            ys = torch.arange(y0, y1 + 1, device=dev)
            xs = torch.arange(x0, x1 + 1, device=dev)
            keys = torch.cat([prefix, P + (ys[:, None] * gw + xs[None, :]).reshape(-1)])
        chunks.append(_Chunk(P + s, P + e, keys))
    return chunks


def _key_index(keys: Keys, N: int, device) -> Optional[torch.Tensor]:
    if keys is None:
        return None
    if isinstance(keys, slice):
        return torch.arange(N, device=device)[keys]
    return keys


def _window_chunk_graph(q, k, v, mask: WindowMask, c: _Chunk, scale: float, acc):
    """One chunk of window attention as a small autograd graph over detached chunk inputs.

    PyTorch's fused SDPA with the chunk's boolean mask does the work (its CPU kernel is
    blockwise: it saves the log-sum-exp, not the probabilities). A query with no allowed key
    attends to its whole key set and is then multiplied by 0, so it outputs 0 with 0 gradient
    whatever SDPA does with an empty row. Returns ``(inputs, out)``.
    """
    B, N = q.shape[0], q.shape[2]
    allowed = c.allowed if c.allowed is not None else mask.rows(c.start, c.end, B, _key_index(c.keys, N, q.device))
    ok = allowed.any(-1)
    with torch.enable_grad():
        inputs = [q[:, :, c.start:c.end].detach().to(acc).requires_grad_(),
                  _take(k.detach(), c.keys).to(acc).requires_grad_(),
                  _take(v.detach(), c.keys).to(acc).requires_grad_()]
        if bool(ok.all()):
            out = F.scaled_dot_product_attention(*inputs, attn_mask=allowed[:, None], scale=scale)
        else:
            allowed = allowed | ~ok[..., None]
            out = F.scaled_dot_product_attention(*inputs, attn_mask=allowed[:, None], scale=scale)
            out = out * ok[:, None, :, None].to(acc)
    return inputs, out


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask: WindowMask, scale: float):
        B, h, N, d = q.shape
        acc = _acc_dtype(q)
        chunks = _window_chunks(mask, B, h)
        out = torch.empty(B, h, N, v.shape[-1], dtype=q.dtype, device=q.device)
        saver = _Saver()
        # (forward runs with grad disabled; under no_grad the context, and the saver with it, is dropped at once)
        keep_graphs = any(t.requires_grad for t in (q, k, v))
        for c in chunks:
            inputs, oc = _window_chunk_graph(q, k, v, mask, c, scale, acc)
            out[:, :, c.start:c.end] = oc.detach().to(q.dtype)
            if keep_graphs:  # the chunk graph holds O(B h (Q + K) d) tensors and the chunk's bool mask
                saver.offer(c.start, *inputs, oc)
        ctx.save_for_backward(q, k, v)
        ctx.mask, ctx.scale, ctx.chunks, ctx.saver = mask, scale, chunks, saver
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        acc = _acc_dtype(q)
        dq = torch.empty(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        for c in ctx.chunks:
            saved = ctx.saver.get(c.start)
            if saved is None:
                inputs, oc = _window_chunk_graph(q, k, v, ctx.mask, c, ctx.scale, acc)
            else:
                inputs, oc = list(saved[:3]), saved[3]
            gq, gk, gv = torch.autograd.grad(oc, inputs, dout[:, :, c.start:c.end].to(acc), retain_graph=True)
            dq[:, :, c.start:c.end] = gq
            _put(dk, c.keys, gk)
            _put(dv, c.keys, gv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def window_attention(q, k, v, mask: WindowMask, scale: float) -> torch.Tensor:
    """Window-masked attention (docs/math.md §1) on validated inputs, memory ``O(B h N d)`` + one chunk."""
    return _WindowAttention.apply(q, k, v, mask, scale)


# --------------------------------------------------------------------------- WinfT
def _heads_merged(t: torch.Tensor, acc) -> torch.Tensor:
    B, h, N, d = t.shape
    return t.to(acc).transpose(1, 2).reshape(B, N, h * d)


def _winft_gate(g, start, mode):
    """``W = [sigmoid(g) > mean_j sigmoid(g)]`` of one chunk and what attention needs: ``(W, allowed, gate)``."""
    w = torch.sigmoid(g)
    W = w > w.mean(-1, keepdim=True)
    del w
    if mode == "multiply":
        return W, None, W.to(g.dtype)
    idx = torch.arange(g.shape[1], device=g.device)
    W[:, idx, idx + start] = True  # the diagonal is kept in mask mode
    return W, W, None


def _winft_rows(B: int, h: int, N: int) -> int:
    """Query rows per WinfT chunk: one ``(B, h, rows, N)`` float32 buffer is at most 1/8 of the budget.

    The backward's working set is two such buffers (probabilities and their gradient) plus a few
    ``(B, rows, N)`` gate buffers; small buffers also keep the allocator's slack small, which is
    what bounds the peak resident memory on CPU (the CPU memory rows of bench/winft_attention.py).
    """
    return max(1, min(N, _env.chunk_budget_bytes() // (8 * 4 * B * h * N)))


_EXP_FLOOR = -80.0  # exp(-80) = 1.8e-35: far below float32 resolution of a softmax row sum (>= 1)


def _winft_probs(qs, kf, allowed, gate):
    """Gated softmax probabilities ``(B, h, Q, N)`` of one chunk, in one buffer (in-place softmax).

    ``gate`` multiplies the logits (multiply mode, eq. 9: a gated-off pair keeps logit 0);
    ``allowed`` removes keys (mask mode; never an empty row since the diagonal is kept): their
    logits get ``-inf`` for the row maximum and their probabilities are then set to exactly 0.
    ``s - max`` is floored at ``-80`` before ``exp``, which changes a probability by at most
    ``1.8e-35`` and keeps CPU ``exp`` off its slow underflow / ``-inf`` path.
    """
    p = qs @ kf.transpose(-2, -1)
    if gate is not None:
        p.mul_(gate[:, None])
    else:
        bias = torch.zeros(allowed.shape, dtype=p.dtype, device=p.device).masked_fill_(~allowed, float("-inf"))
        p.add_(bias[:, None])
        del bias
    p.sub_(p.amax(-1, keepdim=True)).clamp_(min=_EXP_FLOOR).exp_()
    if gate is None:
        p.mul_(allowed[:, None].to(p.dtype))
    return p.div_(p.sum(-1, keepdim=True))


class _WinfTAttention(torch.autograd.Function):
    """Query chunks of ``rows`` queries; per chunk one ``(B, h, rows, N)`` buffer in forward, two in backward.

    Only the gate logits ``g`` of a chunk are kept for backward (while they fit the chunk budget):
    they cost as much to recompute as all heads' logits at ``1/h`` of their size; the
    probabilities are recomputed.

    The gradient of the attention part is that of ``softmax(s)`` with ``W`` held constant:
    ``ds = p * (dp - rowsum(p * dp))`` with ``rowsum(p * dp) = dO . O`` (times ``W`` in multiply
    mode). The BCE gradient is ``dg = (sigmoid(g) - T) dL / (B N^2)``, ``dq = dg K_m / h`` and
    ``dk = dg^T Q_m / h`` on the head-merged ``(B, N, h d)`` views.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float, mode: str, target: Optional[WindowMask]):
        B, h, N, d = q.shape
        acc = _acc_dtype(q)
        qm, km = _heads_merged(q, acc), _heads_merged(k, acc)
        kf, vf = k.to(acc), v.to(acc)
        rows = _winft_rows(B, h, N)
        out = torch.empty(B, h, N, v.shape[-1], dtype=q.dtype, device=q.device)
        gate_sum = torch.zeros(B, dtype=acc, device=q.device)
        bce = torch.zeros((), dtype=acc, device=q.device)
        saver = _Saver()
        for s in range(0, N, rows):
            e = min(s + rows, N)
            g = (qm[:, s:e] @ km.transpose(-2, -1)).div_(h)  # gate logits, paper 000 eq. 8
            W, allowed, gate = _winft_gate(g, s, mode)
            p = _winft_probs(q[:, :, s:e].to(acc) * scale, kf, allowed, gate)
            out[:, :, s:e] = (p @ vf).to(q.dtype)
            gate_sum += W.sum((1, 2))
            del W, allowed, gate
            if target is not None:  # eq. 11 in log-sigmoid form: softplus(g) - T g
                bce += F.softplus(g).sum() - g[target.rows(s, e, B)].sum()
            saver.offer(s, g)  # g costs as much to recompute as all heads' logits, at 1/h of their size
            del p, g
        ctx.save_for_backward(q, k, v, out)
        ctx.scale, ctx.mode, ctx.target, ctx.rows, ctx.saver = scale, mode, target, rows, saver
        loss = (bce / (B * N * N)).to(q.dtype)
        gate_sum = gate_sum.float()
        ctx.mark_non_differentiable(gate_sum)
        return out, loss, gate_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dloss, _dgate_sum):
        q, k, v, out = ctx.saved_tensors
        B, h, N, d = q.shape
        acc = _acc_dtype(q)
        qm, km = _heads_merged(q, acc), _heads_merged(k, acc)
        qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        dq_m = dq.transpose(1, 2)  # (B, N, h, d) views of the accumulators, for the head-merged BCE terms
        dk_m = dk.transpose(1, 2)
        with_loss = ctx.target is not None and dloss is not None
        exact_out = out.dtype == acc
        for s in range(0, N, ctx.rows):
            e = min(s + ctx.rows, N)
            qs = qf[:, :, s:e] * ctx.scale
            saved = ctx.saver.get(s)
            g = (qm[:, s:e] @ km.transpose(-2, -1)).div_(h) if saved is None else saved[0]
            if dout is not None:
                _, allowed, gate = _winft_gate(g, s, ctx.mode)
                p = _winft_probs(qs, kf, allowed, gate)
                doc = dout[:, :, s:e].to(acc)
                dv += p.transpose(-2, -1) @ doc
                o = out[:, :, s:e] if exact_out else p @ vf
                delta = (doc * o).sum(-1, keepdim=True)  # = rowsum(p * dp)
                ds = doc @ vf.transpose(-2, -1)
                ds.sub_(delta).mul_(p)
                del p, o
                if gate is not None:
                    ds.mul_(gate[:, None])  # W is held constant (docs/math.md §6)
                dq[:, :, s:e] += (ds @ kf) * ctx.scale
                dk += ds.transpose(-2, -1) @ qs
                del ds, allowed, gate
            if with_loss:
                # d/dg of mean BCE = (sigmoid(g) - T) / (B N N); g = sum_h q_h . k_h / h
                dg = torch.sigmoid(g)
                dg.sub_(ctx.target.rows(s, e, B).to(acc)).mul_(dloss.to(acc) / (B * N * N * h))
                dq_m[:, s:e] += (dg @ km).view(B, e - s, h, d)
                dk_m += (dg.transpose(-2, -1) @ qm[:, s:e]).view(B, N, h, d)
                del dg
            del g
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def winft_attention(q, k, v, scale: float, mode: str, target: Optional[WindowMask]):
    """WinfT gated attention (docs/math.md §6) on validated inputs: ``(out, loss, gate_sum)``.

    One pass over query chunks computes, per chunk, the gate logits ``g`` over all ``N`` keys
    (so the row threshold is exact), ``W``, the attention with ``W`` held constant, the BCE sum
    against the target's rows and ``sum W``; backward recomputes the same chunk quantities.
    """
    return _WinfTAttention.apply(q, k, v, scale, mode, target)


# --------------------------------------------------------------------------- PaCa
def cluster_pool(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``softmax_over_tokens(logits)^T x`` (paper 004 eq. 7–8): ``(B, M, C)``, computed in float32."""
    acc = _acc_dtype(logits)
    a = torch.softmax(logits.to(acc), dim=1)
    return torch.bmm(a.transpose(1, 2), x.to(acc)).to(x.dtype)


def cluster_attention(q, k, v, scale: float) -> torch.Tensor:
    """Attention of N queries over the M cluster keys: PyTorch's fused SDPA (``N x M`` is small)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
