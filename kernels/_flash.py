"""Device helpers shared by the attention kernels of more than one op (FlashAttention's inner step).

Nothing here launches; the window (:mod:`vitpatch.kernels.window_attention`) and WinfT
(:mod:`vitpatch.kernels.winft_attention`) kernels call these from their key-tile loops.
"""
from __future__ import annotations

import triton.language as tl

from ._launch import helper

__all__ = ["online_step"]


@helper
def online_step(acc, m_i, l_i, s, qk_scale, v, PREC: tl.constexpr):
    """One key tile of the online softmax in base 2 (docs/math.md §1: ``softmax_j(scale q_i . k_j)``
    accumulated tile by tile, FlashAttention's rescaling): ``(acc, m, l)`` after the tile.

    ``s`` holds the tile's unscaled scores (``-inf`` or a finite masked score where not allowed);
    ``qk_scale = scale log2(e) > 0`` is applied to the row maximum and to the scores inside the
    ``exp2`` argument (one fused multiply-add per element). ``exp2(m_i - m_new)`` is never NaN
    when ``m_i`` starts at ``-inf`` only where every score is finite (the window kernels: masked
    scores are finite) and starts finite where scores may be ``-inf`` (WinfT's mask mode).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i
