"""The PyTorch path of the attention ops: restricted key sets, fused SDPA, bounded memory.

This is what ``vitpatch.functional`` runs off-GPU (``VITPATCH_BACKEND=torch``). It is not the
eager oracle: it never allocates the ``(B, h, N, N)`` logits.

- Window attention (docs/math.md §1; paper 000 §4.1, eq. 4): patch queries are grouped by
  alike windows (a k-d split of their four coordinates), each group runs PyTorch's fused SDPA
  over the keys the union of its windows reaches (plus prefix keys, minus dropped keys), with
  the group's additive mask only when some row needs it; groups are packed into a few fused
  calls. A cost estimate from the ``O(n)`` windows picks that or one dense SDPA call (with the
  mask only if needed). The plan is memoised on the mask, so every block of a ViT shares it.
  Backward keeps each pack's log-sum-exp and reruns the fused kernel's backward per pack.
- WinfT: query chunks (``VITPATCH_CHUNK_MB``) hold full rows (the threshold needs all ``N``
  keys), their gate logits and one probability buffer. A chunk's gate logits are kept for
  backward while they fit the budget; the other chunks are recomputed.

Peak memory is ``O(B h N d)`` plus about one budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _env
from .masks import WindowMask

__all__ = ["window_attention", "winft_attention", "cluster_pool", "cluster_attention"]

def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


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


# --------------------------------------------------------------------------- window attention
# Cost model of the CPU plan (nanoseconds, one thread), fitted to PyTorch's fused CPU attention:
# a query-key pair of head width d costs about 0.045 (d + 24) ns; short query groups, short key
# sets and an additive mask cost a little more per pair; every pack (one fused call and its
# gathers) has a fixed cost. Only ratios between candidate plans matter.
_NS_PER_PAIR_D, _PAIR_D0 = 0.045, 24.0
_MASK_FACTOR = 1.08
_CALL_NS = 40_000.0
_GATHER_NS = 0.25         # per gathered or scattered element
_GROUP_SIZES = (16, 32, 64, 128)
_PAD_SLACK = 1.10         # a pack's padded keys may exceed its groups' own keys by 10%
_GROUPED_MARGIN = 0.85    # grouped must beat dense by 15%: dense is never slower than SDPA with a bool mask
_PACK_BYTES = 1 << 20     # a pack's working set: in cache between gather and SDPA; small next to the inputs
_FORCE_PLAN = None        # tests: None, "dense" or ("grouped", G) overrides the cost estimate


def _pair_ns(pairs: float, G: int, K: int, d: int, masked: bool) -> float:
    """Estimated time of ``pairs`` query-key pairs in groups of ``G`` queries over ``K`` keys.

    The fused CPU kernel's cost per pair grows as the query groups shrink (measured, one
    thread, d = 64: 1.3x the dense rate at G = 64, 1.7x at G = 32, 2x at G = 16)."""
    small = (1.0 + 20.0 / max(G, 1)) * (1.0 + 16.0 / max(K, 1))
    return pairs * _NS_PER_PAIR_D * (d + _PAIR_D0) * small * (_MASK_FACTOR if masked else 1.0)


@dataclass
class _Pack:
    """``Bt`` query groups of ``G`` rows, each over its own ``K`` keys, run as one fused SDPA call.

    ``qidx`` / ``kidx`` are ``b h N + token`` per group row (``token`` alone for shared windows,
    whose heads span the batch); :func:`_flat_index` adds the heads. ``kidx is None`` means the
    keys of group ``i`` are all ``N`` tokens of image ``img0 + i`` (no gather). ``bias`` is the
    additive ``0 / -inf`` mask ``(Bt, 1, G, K)``, ``None`` when every row allows every key.
    ``valid`` / ``dmask``: the real rows (a padded duplicate or an empty query is not one).
    """

    Bt: int
    G: int
    K: int
    qidx: torch.Tensor
    kidx: Optional[torch.Tensor]
    img0: int = 0
    bias: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None     # (Bt, 1, G) bool: the real rows; None when all are
    dmask: Optional[torch.Tensor] = None
    qflat: Optional[torch.Tensor] = None     # rows of (B h N, d) of the queries, heads included
    kflat: Optional[torch.Tensor] = None
    out_pos: Optional[torch.Tensor] = None   # positions in qflat of the real rows (None: all)


@dataclass
class _Plan:
    """How one call runs: ``dense`` (one SDPA call, with ``bias`` only when needed) or ``grouped`` packs."""

    kind: str
    per_image: bool
    group_size: int = 0
    packs: List[_Pack] = field(default_factory=list)
    bias: Optional[torch.Tensor] = None   # dense: (Bm, 1, N, N) additive
    ok: Optional[torch.Tensor] = None     # dense: (B, 1, N, 1), 0 on empty rows
    zero_rows: bool = False               # grouped: some queries are in no pack (no allowed key)
    estimates: Dict[str, float] = field(default_factory=dict)   # estimated ns per candidate plan
    footprint: Dict[str, float] = field(default_factory=dict)   # estimated bytes it holds / works in


def _rows(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``(B, h, N, d)`` as ``(B h N, d)`` rows in ``acc`` (a view when already contiguous)."""
    return t.to(acc).contiguous().view(-1, t.shape[-1])


def _flat_index(base: torch.Tensor, Bt: int, H: int, L: int, N: int) -> torch.Tensor:
    """Rows of ``(B h N, d)`` for ``Bt`` groups of ``L`` tokens (``base``: ``b h N + token``) over ``H`` heads."""
    heads = torch.arange(H, device=base.device) * N
    return (base.view(Bt, 1, L) + heads.view(1, H, 1)).view(-1)


def _gather(f: torch.Tensor, idx: torch.Tensor, Bt: int, H: int, L: int,
            buf: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows ``idx`` (from :func:`_flat_index`) of a ``(B h N, d)`` tensor as contiguous ``(Bt, H, L, d)``.

    ``buf``: a workspace the copy goes to. Reusing one buffer for every pack matters on CPU:
    a fresh multi-megabyte tensor per pack costs more in page faults than the copy itself.
    """
    d = f.shape[1]
    if buf is None:
        g = f.index_select(0, idx)
    else:
        g = torch.index_select(f, 0, idx, out=buf[:idx.numel() * d].view(-1, d))
    return g.view(Bt, H, L, d)


def _pack_keys(f: torch.Tensor, p: "_Pack", H: int, N: int, kflat, buf: Optional[torch.Tensor] = None):
    if p.kidx is None:  # all N tokens of images img0 .. img0 + Bt: a view
        return f.view(-1, H, N, f.shape[1])[p.img0:p.img0 + p.Bt]
    return _gather(f, kflat, p.Bt, H, p.K, buf)


def _workspace(plan: "_Plan", f: torch.Tensor, H: int, n_q: int, n_k: int) -> List[torch.Tensor]:
    """``n_q`` query-sized and ``n_k`` key-sized flat buffers, large enough for every pack."""
    row = H * f.shape[1]
    mq = max((p.Bt * p.G for p in plan.packs), default=0) * row
    mk = max((p.Bt * p.K for p in plan.packs if p.kidx is not None), default=0) * row
    return [torch.empty(m, dtype=f.dtype, device=f.device) for m in [mq] * n_q + [mk] * n_k]


def _flash_ops():
    """PyTorch's fused CPU attention ``(forward, backward)`` (forward returns the log-sum-exp)."""
    ops = torch.ops.aten
    return (ops._scaled_dot_product_flash_attention_for_cpu.default,
            ops._scaled_dot_product_flash_attention_for_cpu_backward.default)


def _kd_order(w: torch.Tensor, G: int) -> torch.Tensor:
    """Patches ordered so that each run of ``G`` has alike windows: ``(Bw, n)`` int64.

    A k-d split on the four window coordinates ``(x_left, y_top, x_right, y_bottom)``: a set of
    more than ``G`` windows is cut at a multiple of ``G`` along the coordinate that gives the
    two halves the smallest summed ``size * area of the bounding box of their windows`` (a proxy
    of the keys the groups will gather), recursively, for all images at once.
    """
    Bw, n, _ = w.shape
    perm = torch.arange(n).expand(Bw, n).contiguous()
    segs = [(0, n)]
    M = n + int(w.max()) + 2 if n else 1
    pos = torch.arange(n)
    while True:
        split = [(s, e) for s, e in segs if e - s > G]
        if not split:
            return perm
        seg_start = torch.zeros(n, dtype=torch.long)
        splitting = torch.zeros(n, dtype=torch.bool)
        half = torch.full((n,), 2 * len(split), dtype=torch.long)
        seg_of = torch.zeros(n, dtype=torch.long)
        counts = []
        new_segs = []
        j = 0
        for s, e in segs:
            seg_start[s:e] = s
            if e - s > G:
                mid = s + (((e - s + G - 1) // G) // 2) * G
                splitting[s:e] = True
                half[s:mid], half[mid:e] = 2 * j, 2 * j + 1
                seg_of[s:e] = j
                counts += [mid - s, e - mid]
                new_segs += [(s, mid), (mid, e)]
                j += 1
            else:
                new_segs.append((s, e))
        cnt = torch.tensor(counts, dtype=torch.long)
        ws = w.gather(1, perm[..., None].expand(Bw, n, 4))
        local = pos - seg_start
        cands, costs = [], []
        hid = half.expand(Bw, n)
        nh = 2 * len(split) + 1
        for dim in range(4):
            key = seg_start * M + torch.where(splitting, ws[..., dim], local)
            o = torch.sort(key, dim=1, stable=True).indices
            wd = ws.gather(1, o[..., None].expand(Bw, n, 4))
            lo = torch.full((Bw, nh, 2), M, dtype=torch.long).scatter_reduce(
                1, hid[..., None].expand(Bw, n, 2), wd[..., :2], "amin")
            hi = torch.full((Bw, nh, 2), -1, dtype=torch.long).scatter_reduce(
                1, hid[..., None].expand(Bw, n, 2), wd[..., 2:], "amax")
            area = ((hi - lo + 1).prod(-1))[:, :-1] * cnt
            costs.append(area.view(Bw, -1, 2).sum(-1))
            cands.append(perm.gather(1, o))
        best = torch.stack(costs, -1).argmin(-1)                      # (Bw, segments split)
        choice = best.gather(1, seg_of.expand(Bw, n)) * splitting     # non-split positions: any (all equal)
        perm = torch.stack(cands, -1).gather(2, choice[..., None]).squeeze(2)
        segs = new_segs


def _coverage(w: torch.Tensor, qloc: torch.Tensor, valid: torch.Tensor, grid) -> torch.Tensor:
    """Union of the windows of each query group, bool ``(Bw, ng, n)``, by 2-D difference arrays.

    ``qloc``: ``(Bw, ng, G)`` patch indices; ``valid``: which of them count. ``O(ng (n + G))``
    per image: the windows are painted, never an ``N x N`` mask.
    """
    gh, gw = grid
    Bw, ng, G = qloc.shape
    ws = w.gather(1, qloc.reshape(Bw, ng * G, 1).expand(-1, -1, 4)).view(Bw * ng, G, 4)
    x0, y0, x1, y1 = ws.unbind(-1)
    val = valid.reshape(Bw * ng, G).to(torch.int32)
    stride = gw + 1
    diff = torch.zeros(Bw * ng, (gh + 1) * stride, dtype=torch.int32)
    for yy, xx, s in ((y0, x0, 1), (y0, x1 + 1, -1), (y1 + 1, x0, -1), (y1 + 1, x1 + 1, 1)):
        diff.scatter_add_(1, yy * stride + xx, val * s)
    cov = diff.view(-1, gh + 1, stride).cumsum(1).cumsum(2)[:, :gh, :gw] > 0
    return cov.reshape(Bw, ng, gh * gw)


def _window_plan(mask: WindowMask, B: int, h: int, d: int, acc: torch.dtype) -> _Plan:
    """The plan of ``mask`` for ``B`` images, ``h`` heads of width ``d``, memoised on the mask.

    Every block of a ViT gets the same mask, so the grouping, the gather indices and the
    groups' additive masks are computed once and reused (:meth:`WindowMask.memo`).
    """
    key = ("chunked.window.plan", B, h, d, acc, _env.chunk_budget_bytes(), _FORCE_PLAN)
    return mask.memo(key, _build_plan, mask, B, h, d, acc)


def _build_plan(mask: WindowMask, B: int, h: int, d: int, acc: torch.dtype) -> _Plan:
    """Choose between one dense SDPA call and grouped packs from the ``O(n)`` windows.

    Costs (see :func:`_pair_ns`): dense is ``B h N^2`` pairs (masked unless every query allows
    every key, read off :meth:`WindowMask.allowed_counts`); grouped, for each group size ``G``,
    is the sum over groups of ``G x |union of the group's windows ∪ prefix keys|`` pairs plus
    gathers and one call per pack. Grouped wins when it is estimated at least 15% cheaper
    (``_GROUPED_MARGIN``): the dense call is the user's SDPA-with-a-mask one-liner minus the
    per-call bool-to-float conversion, so it is never slower than it. Dense with a mask is only
    allowed while its ``N x N`` additive mask fits half the chunk budget (the memory bound).

    Memory: while the dense call is allowed, a grouped candidate must fit what it holds and
    works in (``footprint``: the groups' masks and gather indices plus twice one pack) into half
    the dense call's additive mask; its packs are made small enough for that (more calls, in
    the cost), and a candidate whose single group does not fit is dropped. Measured (N = 577,
    B = 2, h = 6), a grouped step's peak RSS exceeds this estimate by up to 2x (the fused
    backward's own buffers), hence the half: choosing groups does not cost memory against the
    dense call or the one-liner.
    """
    budget = _env.chunk_budget_bytes()
    P, grid, N, n = mask.num_prefix_tokens, mask.grid, mask.seq_len, mask.num_patches
    dev = mask.device
    per_image = mask.per_image or mask.key_keep is not None
    Bw, H = (B, h) if per_image else (1, B * h)
    counts = mask.allowed_counts(B).cpu()
    needs_mask = bool((counts < N).any())
    empty = counts == 0                                       # (B, N): no allowed key -> zeros
    esize = torch.finfo(acc).bits // 8
    estimates = {"dense": _pair_ns(B * h * N * N, N, N, d, needs_mask) + _CALL_NS}
    # what the dense plan holds: its (Bm, 1, N, N) additive mask (the one-liner holds a bool
    # mask and converts it to that at every call). A grouped plan may not hold more.
    mask_bytes = (B if per_image else 1) * N * N * esize if needs_mask else 0
    dense_ok = mask_bytes <= budget // 2
    base_limit = max(min(budget // 4, _PACK_BYTES), 1)
    capped = needs_mask and dense_ok and not isinstance(_FORCE_PLAN, tuple)  # the memory rule applies
    footprint = {"dense": float(mask_bytes)}

    def group_bytes(g: float, k: float) -> float:
        """Bytes of one group of ``g`` queries over ``k`` keys in a pack: q/k/v/out and grads, its mask."""
        return esize * (H * d * 4 * (g + k) + g * k)

    keep = None if mask.key_keep is None else mask.key_keep.cpu()
    best = None
    if n > _GROUP_SIZES[0] or isinstance(_FORCE_PLAN, tuple):
        w = mask.batch_windows(Bw).cpu().long()
        q_empty = empty[:Bw, P:]
        prefix_cost = 0.0
        if P:
            prefix_cost = _pair_ns(B * h * P * N, P, N, d, keep is not None) + _CALL_NS
        sizes = _GROUP_SIZES
        if isinstance(_FORCE_PLAN, tuple):
            sizes = (min(_FORCE_PLAN[1], n),)
        for G in sizes:
            if G >= n and not isinstance(_FORCE_PLAN, tuple):
                break
            order = _kd_order(w, G)
            ng = (n + G - 1) // G
            pad = ng * G - n
            qloc = torch.cat([order, order[:, -1:].expand(Bw, pad)], 1) if pad else order
            valid = torch.ones(Bw, ng * G, dtype=torch.bool)
            if pad:
                valid[:, n:] = False
            valid &= ~q_empty.gather(1, qloc)
            qloc, valid = qloc.view(Bw, ng, G), valid.view(Bw, ng, G)
            cov = _coverage(w, qloc, valid, grid)
            if keep is not None:
                cov &= keep[:, None, P:]
            kprefix = torch.full((Bw,), P) if keep is None else keep[:, :P].sum(1)
            K = cov.sum(-1) + kprefix[:, None]                    # (Bw, ng) keys per group
            active = valid.any(-1)
            Ka = K[active].double()
            pairs = float(Ka.sum()) * G * H * _PAD_SLACK
            kmean = float(Ka.mean()) if Ka.numel() else 1.0
            gbytes = group_bytes(G, kmean)
            # held by the plan: the groups' additive masks and gather indices (int64, with heads)
            held = float(Ka.sum()) * (G * esize + 8 * H) + 8 * H * G * float(active.sum())
            limit = base_limit
            if capped:
                # held + twice a pack (its tensors, and as much inside the fused backward: measured,
                # a grouped step's peak RSS exceeds this estimate by up to 2x) <= half the dense mask
                limit = min(limit, int((mask_bytes / 2 - held) / 2))
                if limit < gbytes:
                    footprint[f"grouped{G}"] = held + 2 * gbytes
                    continue  # even one group per pack may take more memory than the dense call
            per_pack = max(1, int(limit // gbytes))                       # groups per pack (at least one)
            packs = -(-int(active.sum()) // per_pack) + 2
            cost = (_pair_ns(pairs, G, int(kmean), d, True) + packs * _CALL_NS
                    + _GATHER_NS * H * d * float((2 * G + 2 * Ka).sum()) + prefix_cost)
            estimates[f"grouped{G}"] = cost
            footprint[f"grouped{G}"] = held + 2 * min(float(limit), per_pack * gbytes)
            if best is None or cost < best[0]:
                best = (cost, G, qloc, valid, cov, K, active, limit)

    use_dense = best is None or (dense_ok and estimates["dense"] * _GROUPED_MARGIN <= best[0])
    if _FORCE_PLAN is not None:
        use_dense = _FORCE_PLAN == "dense" or best is None
    if use_dense:
        plan = _Plan("dense", per_image, estimates=estimates, footprint=footprint)
        if needs_mask:  # (Bm, 1, N, N) additive, within half the budget; built a few rows at a time
            Bm = B if per_image else 1
            plan.bias = torch.zeros(Bm, 1, N, N, dtype=acc, device=dev)
            step = max(1, (budget // 16) // max(Bm * N, 1))
            for s in range(0, N, step):
                allowed = mask.rows(s, min(N, s + step), Bm) | empty[:Bm, s:s + step, None].to(dev)
                plan.bias[:, 0, s:s + step].masked_fill_(~allowed, float("-inf"))  # empty rows stay finite
            if bool(empty.any()):
                plan.ok = (~empty).to(acc).to(dev)[:, None, :, None]
        return plan

    _, G, qloc, valid, cov, K, active, limit = best
    plan = _Plan("grouped", per_image, G, estimates=estimates, footprint=footprint, zero_rows=bool(empty.any()))
    w = mask.batch_windows(Bw).cpu().long()

    if P:
        plan.packs += _prefix_packs(mask, B, Bw, N, P, keep, empty, acc, limit, group_bytes, h * N)
    # patch groups, sorted by key count and packed while padding stays small and bytes fit
    bs, gs = active.nonzero(as_tuple=True)
    ks = K[bs, gs]
    order = torch.argsort(ks, stable=True)
    bs, gs, ks = bs[order].tolist(), gs[order].tolist(), ks[order].tolist()
    i = 0
    while i < len(ks):
        j, total = i + 1, ks[i]
        while j < len(ks) and ks[j] * (j + 1 - i) <= _PAD_SLACK * (total + ks[j]) \
                and group_bytes(G, ks[j]) * (j + 1 - i) <= limit:
            total += ks[j]
            j += 1
        plan.packs.append(_patch_pack(mask, w, qloc, valid, cov, keep, bs[i:j], gs[i:j], ks[j - 1],
                                      N, P, h * N if per_image else 0, acc, dev))
        i = j
    H = h if per_image else B * h
    for p in plan.packs:  # row indices with the heads, once per plan
        p.qflat = _flat_index(p.qidx, p.Bt, H, p.G, N)
        p.kflat = None if p.kidx is None else _flat_index(p.kidx, p.Bt, H, p.K, N)
        if p.valid is not None:
            p.out_pos = p.valid.expand(p.Bt, H, p.G).reshape(-1).nonzero().squeeze(1)
    return plan


def _prefix_packs(mask, B, Bw, N, P, keep, empty, acc, limit, group_bytes, stride) -> List[_Pack]:
    """Prefix queries attend every kept key: per image, all ``N`` tokens (no mask) or its kept keys."""
    dev = mask.device
    per = max(1, limit // max(group_bytes(P, N), 1))
    packs = []
    for b0 in range(0, Bw, per):
        b1 = min(Bw, b0 + per)
        imgs = torch.arange(b0, b1)
        qidx = (imgs[:, None] * stride + torch.arange(P)[None]).reshape(-1)
        if keep is None:
            packs.append(_Pack(b1 - b0, P, N, qidx.to(dev), None, img0=b0))
            continue
        kk = keep[b0:b1]
        K = max(1, int(kk.sum(1).max()))
        korder = torch.sort((~kk).to(torch.int8), dim=1, stable=True).indices[:, :K]
        kvalid = kk.gather(1, korder)
        rows_ok = ~empty[b0:b1, :P]                                   # (Bt, P)
        allowed = kvalid[:, None, :] | ~rows_ok[..., None]
        p = _Pack(b1 - b0, P, K, qidx.to(dev), (imgs[:, None] * stride + korder).reshape(-1).to(dev))
        if not bool(allowed.all()):
            p.bias = torch.zeros(allowed.shape, dtype=acc).masked_fill_(~allowed, float("-inf"))[:, None].to(dev)
        _set_rows(p, rows_ok, acc, dev)
        packs.append(p)
    return packs


def _set_rows(p: _Pack, rows_ok: torch.Tensor, acc, dev) -> None:
    if not bool(rows_ok.all()):
        p.valid = rows_ok[:, None, :].to(dev)
        p.dmask = rows_ok.to(acc)[:, None, :, None].to(dev)


def _patch_pack(mask, w, qloc, valid, cov, keep, bs, gs, K, N, P, stride, acc, dev) -> _Pack:
    """One pack of patch-query groups ``(bs[i], gs[i])`` over their own keys, padded to ``K``."""
    b = torch.tensor(bs, dtype=torch.long)
    g = torch.tensor(gs, dtype=torch.long)
    Bt, G = len(bs), qloc.shape[-1]
    gw = mask.grid[1]
    ql = qloc[b, g]                                                   # (Bt, G) patch indices
    rows_ok = valid[b, g]
    kprefix = torch.ones(Bt, P, dtype=torch.bool) if keep is None else keep[b, :P]
    universe = torch.cat([kprefix, cov[b, g]], 1)                     # (Bt, N): the group's keys
    korder = torch.sort((~universe).to(torch.int8), dim=1, stable=True).indices[:, :K]
    kvalid = universe.gather(1, korder)
    wq = w[b[:, None], ql]                                            # (Bt, G, 4)
    kp = (korder - P).clamp(min=0)
    kx, ky = (kp % gw)[:, None, :], (kp // gw)[:, None, :]
    inside = ((kx >= wq[..., 0:1]) & (kx <= wq[..., 2:3]) & (ky >= wq[..., 1:2]) & (ky <= wq[..., 3:4]))
    allowed = (inside | (korder < P)[:, None, :]) & kvalid[:, None, :]
    allowed |= ~rows_ok[..., None]                                    # not-real rows: finite, ignored
    base = (b * stride)[:, None]
    p = _Pack(Bt, G, K, (base + P + ql).reshape(-1).to(dev), (base + korder).reshape(-1).to(dev))
    if not bool(allowed.all()):
        p.bias = torch.zeros(allowed.shape, dtype=acc).masked_fill_(~allowed, float("-inf"))[:, None].to(dev)
    _set_rows(p, rows_ok, acc, dev)
    return p


def _window_chunk_graph(qf, kf, vf, p: _Pack, H: int, N: int, scale: float, ws=(None, None, None)):
    """One pack of window attention: gather its queries and keys (into ``ws``), run fused SDPA.

    Returns ``(inputs, (out, lse, qflat))`` with ``inputs = [q, k, v]`` of the pack,
    ``(Bt, H, G|K, d)``; ``lse`` is the log-sum-exp that PyTorch's fused CPU kernel returns
    (``None`` off CPU, where backward recomputes the pack under autograd); ``qflat`` the rows of
    the pack's queries.
    """
    qflat, kflat = p.qflat, p.kflat
    qg = _gather(qf, qflat, p.Bt, H, p.G, ws[0])
    kg, vg = _pack_keys(kf, p, H, N, kflat, ws[1]), _pack_keys(vf, p, H, N, kflat, ws[2])
    if qf.device.type == "cpu":
        out, lse = _flash_ops()[0](qg, kg, vg, attn_mask=p.bias, scale=scale)
    else:
        out, lse = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=p.bias, scale=scale), None
    return [qg, kg, vg], (out, lse, qflat)


def _token_major(idx: torch.Tensor, g: torch.Tensor) -> Optional[torch.Tensor]:
    """``idx`` (rows of ``g (Bt, H, L, d)`` in head-major order) in ``g``'s memory order when ``g``
    is stored token-major (``(Bt, L, H, d)``, as the fused CPU backward returns its gradients), else ``None``."""
    if not g.transpose(1, 2).is_contiguous() or g.is_contiguous():
        return None
    Bt, H, L, _ = g.shape
    return idx.view(Bt, H, L).transpose(1, 2).reshape(-1)


def _scatter_add(dst: torch.Tensor, idx: torch.Tensor, g: torch.Tensor, idx_t: Optional[torch.Tensor] = None) -> None:
    """``dst[idx] += g`` for ``g (Bt, H, L, d)`` without copying a token-major ``g`` (the index is
    permuted instead: a pack's gradients are far larger than its indices)."""
    if idx_t is None:
        idx_t = _token_major(idx, g)
    if idx_t is None:
        dst.index_add_(0, idx, g.reshape(-1, g.shape[-1]))
    else:
        dst.index_add_(0, idx_t, g.transpose(1, 2).reshape(-1, g.shape[-1]))


def _heads(plan: _Plan, B: int, h: int) -> int:
    return h if plan.per_image else B * h


class _WindowAttention(torch.autograd.Function):
    """Grouped packs of window attention; backward keeps only each pack's log-sum-exp.

    Packs gather their rows straight from the ``(B, h, N, d)`` inputs into reused workspaces
    and write their outputs straight into ``(B, h, N, d)``. Backward regathers a pack's q, k, v,
    output and output gradient and calls the fused kernel's backward, then scatter-adds the
    pack's gradients: memory ``O(B h N d)`` plus one pack (a quarter of the chunk budget, at
    most ``_PACK_BYTES``), and no forward is recomputed on CPU.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, scale: float):
        B, h, N, d = q.shape
        acc = _acc_dtype(q)
        H = _heads(plan, B, h)
        qf, kf, vf = _rows(q, acc), _rows(k, acc), _rows(v, acc)
        dv_ = v.shape[-1]
        out = (torch.zeros if plan.zero_rows else torch.empty)(B, h, N, dv_, dtype=acc, device=q.device)
        of = out.view(-1, dv_)
        lses = []
        ws = _workspace(plan, qf, H, 1, 2)
        for p in plan.packs:
            _, (oc, lse, qflat) = _window_chunk_graph(qf, kf, vf, p, H, N, scale, ws)
            oc = oc.reshape(-1, dv_)
            if p.out_pos is None:
                of.index_copy_(0, qflat, oc)
            else:
                of.index_copy_(0, qflat.index_select(0, p.out_pos), oc.index_select(0, p.out_pos))
            lses.append(lse)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out)
        ctx.plan, ctx.scale, ctx.lses = plan, scale, lses
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        B, h, N, d = q.shape
        acc = _acc_dtype(q)
        H = _heads(plan, B, h)
        qf, kf, vf, of, df = (_rows(t, acc) for t in (q, k, v, out, dout))
        dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=q.device) for t in (q, k, v))
        dqf, dkf, dvf = dq.view(-1, d), dk.view(-1, d), dv.view(-1, v.shape[-1])
        wq, wo, wd, wk, wv = _workspace(plan, qf, H, 3, 2)
        for p, lse in zip(plan.packs, ctx.lses):
            qflat, kflat = p.qflat, p.kflat
            qg = _gather(qf, qflat, p.Bt, H, p.G, wq)
            kg, vg = _pack_keys(kf, p, H, N, kflat, wk), _pack_keys(vf, p, H, N, kflat, wv)
            og, dg = _gather(of, qflat, p.Bt, H, p.G, wo), _gather(df, qflat, p.Bt, H, p.G, wd)
            if p.dmask is not None:
                dg = dg * p.dmask
            if lse is not None:
                gq, gk, gv = _flash_ops()[1](dg, qg, kg, vg, og, lse, 0.0, False, attn_mask=p.bias, scale=scale)
            else:
                with torch.enable_grad():
                    leaves = [t.detach().requires_grad_() for t in (qg, kg, vg)]
                    o = F.scaled_dot_product_attention(*leaves, attn_mask=p.bias, scale=scale)
                    gq, gk, gv = torch.autograd.grad(o, leaves, dg)
            _scatter_add(dqf, qflat, gq)
            if p.kidx is None:
                dk.view(-1, H, N, d)[p.img0:p.img0 + p.Bt] += gk
                dv.view(-1, H, N, dv.shape[-1])[p.img0:p.img0 + p.Bt] += gv
            else:
                kflat_t = _token_major(kflat, gk)
                _scatter_add(dkf, kflat, gk, kflat_t)
                _scatter_add(dvf, kflat, gv, kflat_t)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def window_plan(mask: WindowMask, q: torch.Tensor) -> _Plan:
    """The plan :func:`window_attention` uses for ``q``'s shape (for benchmarks and tests)."""
    B, h, N, d = q.shape
    mask.check(B, N, "windows")
    return _window_plan(mask, B, h, d, _acc_dtype(q))


def window_attention(q, k, v, mask: WindowMask, scale: float) -> torch.Tensor:
    """Window-masked attention (docs/math.md §1; paper 000 §4.1, eq. 4) on validated inputs.

    ``out_i = sum_j softmax_j(scale q_i . k_j over allowed j) v_j``; a query with no allowed
    key gives zeros and zero gradient. The plan (:func:`_build_plan`) is either one dense SDPA
    call, with the additive mask only when some pair is not allowed, or groups of queries with
    alike windows, each over the keys its windows reach, packed into a few fused SDPA calls.
    Memory ``O(B h N d)`` plus one pack (or the dense call's mask, at most half the budget).
    """
    B, h, _, d = q.shape  # inputs checked by the caller
    dtype, acc = q.dtype, _acc_dtype(q)
    plan = _window_plan(mask, B, h, d, acc)
    if plan.kind == "dense":
        if dtype != acc:
            q, k, v = q.to(acc), k.to(acc), v.to(acc)
        if q.is_cpu and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1:
            # what SDPA picks here, called directly (differentiable the same way): skipping SDPA's
            # backend selection saved 10-15 us per call in a tight loop at N = 65 (B = 2, h = 4, d = 32)
            out = _flash_ops()[0](q, k, v, attn_mask=plan.bias, scale=scale)[0]
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.bias, scale=scale)
        if plan.ok is not None:
            out = out * plan.ok
        return out if dtype == acc else out.to(dtype)
    return _WindowAttention.apply(q, k, v, plan, scale)


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
