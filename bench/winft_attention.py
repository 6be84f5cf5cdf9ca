"""WinfT gated attention (paper 000 §5, docs/math.md §6) against its anchors.

Impls: ``vitpatch`` (:func:`vitpatch.functional.winft_attention`), ``reference``
(:func:`vitpatch.reference.winft_attention`, which materialises ``(B, h, N, N)``),
``sdpa_dense`` (plain attention without the gate: the cost floor of a dense layer) and
``sdpa_qk`` (dense SDPA plus one batched ``Q K^T`` over the full width ``h d``, the product the
head-mean gate needs: the cost floor of any gated layer). Rows carry ``tflops_dense``: the dense
attention's matmul FLOP (plus the ``Q K^T`` for ``sdpa_qk``) over the time.

Modes: ``fwd`` is inference (no target, no loss); ``fwd+bwd`` is a training step of the
layer: the gated attention plus the BCE loss against AWD-like window targets (eq. 11), then
the backward of both (``sdpa_dense`` has no loss: its backward is the attention's alone).

Besides the device's own shapes, every run also measures CPU rows at ``N = 2048, h = 8``
(``B = 1, d = 64``): the PyTorch path against the reference, for peak memory above all.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List

from .common import attention_flop, attention_inputs, autograd_case, max_abs_err, sdpa_dense_case
from .harness import Case, Config, Prepared

OP = "winft_attention"
MODULE = "bench.winft_attention"
GATE = "multiply"
TARGET_DENSITY = 0.23


def problem_sizes(cfg: Config) -> List[Dict[str, Any]]:
    """Shapes measured on the run's device: ``B, h, grid, P, d``."""
    if cfg.quick:
        sizes = [(2, 4, (8, 8), 32), (2, 4, (14, 14), 32)]                           # N = 65, 197
    else:
        sizes = [(64, 12, (14, 14), 64), (64, 12, (24, 24), 64), (16, 12, (32, 32), 64)]  # N = 197, 577, 1025
    return [{"B": B, "h": h, "grid": list(g), "P": 1, "d": d} for B, h, g, d in sizes]


CPU_MEMORY_SIZE = {"B": 1, "h": 8, "grid": [32, 64], "P": 0, "d": 64}  # N = 2048


def _shape(size: Dict[str, Any], with_loss: bool) -> Dict[str, Any]:
    gh, gw = size["grid"]
    return {"B": size["B"], "h": size["h"], "N": size["P"] + gh * gw, "d": size["d"], "grid": list(size["grid"]),
            "P": size["P"], "gate": GATE, "loss": with_loss}


def cases(cfg: Config) -> List[Case]:
    out = []
    for size in problem_sizes(cfg):
        for mode in ("fwd", "fwd+bwd"):
            shape = _shape(size, mode != "fwd")
            dense = {k: shape[k] for k in ("B", "h", "N", "d")}
            out.append(Case(MODULE, OP, "sdpa_dense", mode, dense, cfg.device, cfg.dtype))
            out.append(Case(MODULE, OP, "sdpa_qk", mode, dense, cfg.device, cfg.dtype))
            for impl in ("vitpatch", "reference"):
                out.append(Case(MODULE, OP, impl, mode, shape, cfg.device, cfg.dtype))
    # CPU memory rows at N = 2048: few repeats, they are about memory (float32, whatever the run's dtype)
    if cfg.extra_cpu_rows and (cfg.dtype == "float32" or cfg.device != "cpu"):
        opts = {"repeats": 1, "warmup": 0} if cfg.quick else {}
        for mode in ("fwd", "fwd+bwd"):
            shape = _shape(CPU_MEMORY_SIZE, mode != "fwd")
            for impl in ("vitpatch", "reference"):
                out.append(Case(MODULE, OP, impl, mode, shape, "cpu", "float32", dict(opts)))
    return out


@functools.lru_cache(maxsize=8)
def _windows(grid: tuple, batch: int):
    from vitpatch.masks import synthetic_awd_windows
    return synthetic_awd_windows(grid, batch, TARGET_DENSITY, seed=0)


def build(case: Case, check: bool = True) -> Prepared:
    import torch
    from vitpatch import WindowMask, functional, reference

    s, impl = case.shape, case.impl
    device = torch.device(case.device)
    B = s["B"]
    q, k, v, scale, info = attention_inputs(case)
    if impl == "sdpa_dense":
        return sdpa_dense_case(q, k, v, scale, case.mode, info)
    if impl == "sdpa_qk":  # the cost floor of a head-mean gate: dense attention and one batched Q K^T
        # Q K^T over the full width is half an attention forward, its backward twice that
        info["flop_dense"] = info["flop_visited"] = (attention_flop(B, s["h"], s["N"], s["d"], case.mode)
                                                     * {"fwd": 1.5, "bwd": 1.4, "fwd+bwd": 10 / 7}[case.mode])

        def fwd():
            N, hd = s["N"], s["h"] * s["d"]
            logits = q.transpose(1, 2).reshape(B, N, hd) @ k.transpose(1, 2).reshape(B, N, hd).transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale), logits
        return autograd_case(fwd, (q, k, v), case.mode, info=info)
    info["flop_dense"] = info["flop_visited"] = attention_flop(B, s["h"], s["N"], s["d"], case.mode)
    target = None
    if s["loss"]:
        grid = tuple(s["grid"])
        target = WindowMask(_windows(grid, B), grid, s["P"]).to(device)
        info["density"] = target.density(B)  # of the window target
        info["extra"]["target"] = f"synthetic AWD windows, density {TARGET_DENSITY}"
    mode = s["gate"]
    if case.impl == "vitpatch":
        info["backend"] = functional.backend_for(OP, q, k, v, scale=scale, mode=mode, target=target)

        def fwd():
            return functional.winft_attention(q, k, v, mode=mode, scale=scale, target=target)
    elif case.impl == "reference":
        def fwd():
            return reference.winft_attention(q, k, v, mode=mode, scale=scale, target=target)
    else:
        raise ValueError(f"unknown impl {case.impl!r} for {OP}")
    if check and case.impl == "vitpatch" and case.mode == "fwd":
        with torch.no_grad():
            ref = reference.winft_attention(q, k, v, mode=mode, scale=scale, upcast=True)
            info["max_abs_err"] = max_abs_err(fwd(), ref)
    return autograd_case(fwd, (q, k, v), case.mode, info=info)
