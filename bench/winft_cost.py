"""The WinfT op in the static cost model (``python -m bench.cost``; docs/cost_model.md, "WinfT").

One training step of a WinfT layer with the window target (``mode="multiply"``, one prefix token,
AWD-style windows on a square grid, ``key_keep`` given) is recorded on ``meta`` tensors through
the real launchers (nothing runs): the forward (threshold pass, gate-bits pass, attention) and
the backward with both gradients (the ``sigmoid(g) - T`` pass, delta, dq and dk/dv with that
tile folded in). Each Triton launch is costed from the loop rows :mod:`bench.cost` read off its
compiled SASS:

* an attention kernel: programs x key (or query) tiles x its ``main`` loop's cycles per tile
  (:func:`bench.cost.tile_cycles`);
* a gate pass: row blocks x images x key tiles x (``H`` x its head loop's cycles + its tile's
  own work outside that loop, the larger of its issue and MUFU cycles), the head loop being the
  GEMM of width ``C = H d`` that forms ``g``;
* the delta kernel is left out, as in the window and dense totals.

Every launch, Triton's or PyTorch's, adds one launch gap. The total over the dense reference's
(:func:`bench.cost.dense_cycles`, forward or forward + dq + dk/dv) is the prediction.

The byte traffic per call is counted from the launches' tensor arguments: every tensor a kernel
takes is read or written once in full (``compulsory``: what must cross DRAM when nothing stays in
L2 between kernels, true at these batch sizes); the dense attention's own share (q, k, v, out,
lse in the forward; q, k, v, out, dout, lse, delta, dq, dk, dv in the backward) is reported beside
it, and the rest is what the gate and the loss add. Static figures: no GPU has confirmed them.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

from . import cost

SHAPES = (197, 577, 1025)   # N = 1 + 14^2, 1 + 24^2, 1 + 32^2
UNITS = ("winft_threshold", "winft_gate", "winft_fwd", "winft_dq", "winft_dkdv")
GATE_KERNELS = ("_threshold_kernel", "_gate_bits_kernel")


def pins_shipped(dtype: str, head_dim: int, target: str) -> Dict[str, object]:
    """The configuration each WinfT unit runs for this case (the first the gate shipped)."""
    import torch

    from vitpatch.kernels import _launch
    out = {}
    for unit in UNITS:
        ships = _launch.shipped(unit, getattr(torch, dtype), head_dim, target)
        if not ships:
            raise RuntimeError(f"{unit} ships nothing for {dtype}, d = {head_dim} on {target}")
        out[unit] = ships[0]
    return out


def step_launches(N: int, batch: int, heads: int, head_dim: int, dtype: str, target: str, pins: dict) -> dict:
    """The launches of one WinfT forward and backward with the loss (recorded on ``meta``):
    ``{"fwd": [...], "bwd": [...], "torch_fwd": n, "torch_bwd": n}`` (PyTorch ops that launch a
    kernel, counted by a dispatch mode)."""
    import torch

    from vitpatch.kernels import _launch, winft_attention as wt

    dt = getattr(torch, dtype)
    P = 1
    side = math.isqrt(N - P)
    q, k, v = (torch.empty(batch, heads, N, head_dim, dtype=dt, device="meta") for _ in range(3))
    windows = torch.empty(batch, N - P, 4, dtype=torch.int32, device="meta")
    keep = torch.empty(batch, N, dtype=torch.bool, device="meta")
    out: dict = {}
    with _launch.forcing(pins), _launch.recording(target) as launches:
        with cost.torch_launches() as c:
            o, _loss, _gs, lse, bits, dg = wt._forward(q, k, v, windows, keep, 0.125, "multiply", P, side, True)
        out["torch_fwd"], mark = c.n, len(launches)
        with cost.torch_launches() as c:
            wt._backward(torch.empty_like(o), torch.empty((), dtype=dt, device="meta"), q, k, v, o, lse, bits, dg,
                         windows, keep, 0.125, "multiply", P, side)
        out["torch_bwd"] = c.n
    out["fwd"], out["bwd"] = launches[:mark], launches[mark:]
    return out


def _loop(rows_by: Dict[tuple, Dict[str, dict]], name: str, label: str, loop: str) -> Optional[dict]:
    return rows_by.get((name, label), {}).get(loop)


def _index(rows: Sequence[dict]) -> Dict[tuple, Dict[str, dict]]:
    """``(kernel name, config) -> {loop: row}``; of two SASS loops of one kind, the longer (a
    pipelined loop's prologue copy is the shorter)."""
    out: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        if r.get("loop") is None or r.get("op") != "winft_attention":
            continue
        slot = out.setdefault((r["kernel"].rsplit(".", 1)[-1], r["config"]), {})
        if r["loop"] not in slot or r["instructions"] > slot[r["loop"]]["instructions"]:
            slot[r["loop"]] = r
    return out


def _iterations(launch) -> Tuple[str, int, int]:
    """``(name, loop iterations summed over the launch's programs, heads)`` of one WinfT launch: a
    gate pass runs one iteration per (row block, image, key tile), an attention kernel one per
    program and key tile (query tile for dk/dv)."""
    name = launch.kernel.__name__
    args = kw = launch.named
    grid = tuple(int(g) for g in launch.grid)
    N = int(args["N"])
    if name in GATE_KERNELS:
        return name, grid[0] * grid[1] * -(-N // int(kw["BLOCK_N"])), int(args["H"])
    step = kw["BLOCK_M"] if name == "_attn_dkdv_kernel" else kw.get("BLOCK_N", N)
    return name, math.prod(grid) * -(-N // int(step)), int(args["H"])


def launch_cycles(launch, label: str, rows_by: Dict[tuple, Dict[str, dict]], head_dim: int,
                  machine: dict = cost.MACHINE) -> Optional[float]:
    """Cycles per SM of one recorded WinfT launch (``label``: its unit's configuration), ``0.0``
    for the delta kernel (left out), ``None`` when its loop rows are missing."""
    name, iterations, H = _iterations(launch)
    if name == "_delta_kernel":
        return 0.0
    if name in GATE_KERNELS:
        outer_kind = {"_threshold_kernel": "gate_threshold", "_gate_bits_kernel": "gate_bits"}[name]
        outer, heads = _loop(rows_by, name, label, outer_kind), _loop(rows_by, name, label, "gate_heads")
        if outer is None or heads is None:
            return None
        warps = outer["num_warps"]
        own_issue = outer["outside_nested"] * warps / machine["issue_per_cycle"]
        own_mufu = (outer["by_class"]["mufu"] - heads["by_class"]["mufu"]) * warps * 32 / machine["mufu_per_cycle"]
        return iterations * (H * cost.tile_cycles(heads, head_dim)["total"] + max(own_issue, own_mufu)) / machine["sms"]
    main = _loop(rows_by, name, label, "main")
    if main is None:
        return None
    return iterations * cost.tile_cycles(main, head_dim)["total"] / machine["sms"]


def compulsory_bytes(launch) -> int:
    """Bytes of every distinct tensor argument of one launch (each read or written once in full)."""
    seen, total = set(), 0
    for a in launch.named.values():
        if hasattr(a, "element_size") and id(a) not in seen:
            seen.add(id(a))
            total += a.numel() * a.element_size()
    return total


def dense_bytes(N: int, batch: int, heads: int, head_dim: int, elem: int) -> Dict[str, int]:
    """The dense reference's compulsory traffic, counted per kernel as for WinfT: the forward reads
    q, k, v and writes out and the float32 log-sum-exp; the backward's delta kernel reads out and
    dout, its dq kernel q, k, v, dout, lse, delta and writes dq, its dk/dv kernel the same and
    writes dk and dv."""
    t, row = batch * heads * N * head_dim * elem, batch * heads * N * 4
    return {"fwd": 4 * t + row, "bwd": (2 * t + row) + (5 * t + 2 * row) + (6 * t + 2 * row)}


def l2_bytes(launch, label: str, rows_by: Dict[tuple, Dict[str, dict]]) -> Optional[int]:
    """Bytes of the vector tile loads one launch issues to L2 (the SASS's ``LDG`` / ``LDGSTS`` of 8
    or 16 bytes per thread, per loop iteration, times the iterations), ``None`` without rows."""
    name, iterations, H = _iterations(launch)
    if name == "_delta_kernel":
        return 0
    if name in GATE_KERNELS:
        heads = _loop(rows_by, name, label, "gate_heads")
        return None if heads is None else iterations * H * int(heads["global_load_bytes"])
    main = _loop(rows_by, name, label, "main")
    return None if main is None else iterations * int(main["global_load_bytes"])


def unit_of(kernel_name: str) -> str:
    from vitpatch.kernels import _launch
    return next(u for u in UNITS if kernel_name in _launch.UNIT_KERNELS[u])


def predict(rows: Sequence[dict], batch: int = 64, heads: int = 12, head_dim: int = 64, dtype: str = "bfloat16",
            target: str = "sm_90a", pins: Optional[dict] = None, shapes: Sequence[int] = SHAPES) -> List[dict]:
    """Prediction rows (``op: winft_attention``, modes ``fwd`` and ``fwd+bwd`` with the loss) at each
    ``N`` of ``shapes``, with the per-kernel terms and the byte-traffic estimate."""
    pins = pins or pins_shipped(dtype, head_dim, target)
    rows_by = _index(rows)
    gap = cost.MACHINE["launch_gap_cycles"]
    elem = 4 if dtype == "float32" else 2
    out = []
    for N in shapes:
        dense = cost.dense_cycles(rows, N, batch, heads, head_dim)
        if not all(r in dense for r in ("fwd", "dq", "dkdv")):
            continue
        calls = step_launches(N, batch, heads, head_dim, dtype, target, pins)
        terms: Dict[str, Dict[str, float]] = {"fwd": {}, "bwd": {}}
        nbytes = {"fwd": 0, "bwd": 0}
        issued = {"fwd": 0, "bwd": 0}
        missing = []
        for phase in ("fwd", "bwd"):
            for x in calls[phase]:
                name = x.kernel.__name__
                c = launch_cycles(x, pins[unit_of(name)].label, rows_by, head_dim)
                if c is None:
                    missing.append(name)
                    continue
                terms[phase][name] = terms[phase].get(name, 0.0) + c
                nbytes[phase] += compulsory_bytes(x)
                issued[phase] += l2_bytes(x, pins[unit_of(name)].label, rows_by)
            terms[phase]["launch_gaps"] = gap * (len(calls[phase]) + calls[f"torch_{phase}"])
        if missing:
            raise RuntimeError(f"no loop rows for {sorted(set(missing))} (run bench.cost with --ops winft)")
        fwd, bwd = sum(terms["fwd"].values()), sum(terms["bwd"].values())
        dense_fwd = dense["fwd"][0] + gap
        dense_all = dense_fwd + dense["dq"][0] + dense["dkdv"][0] + 3 * gap
        att = dense_bytes(N, batch, heads, head_dim, elem)
        base = {"row": "prediction", "op": "winft_attention", "n": N, "batch": batch, "heads": heads,
                "head_dim": head_dim, "dtype": dtype, "target": target, "static": True, "shipped": True,
                "query_order": None, "density": None, "winft_mode": "multiply", "with_loss": True,
                "config": " + ".join(f"{u}:{pins[u].label}" for u in UNITS), "launch_gap_cycles": gap,
                "excluded": "epilogues, the delta kernels' work, wave quantisation"}
        out.append({**base, "mode": "fwd", "predicted_ratio_vs_dense": fwd / dense_fwd, "winft_cycles_per_sm": fwd,
                    "terms": terms["fwd"], "dense_cycles_per_sm": dense_fwd, "dense_config": dense["fwd"][1],
                    "bytes": {"compulsory": nbytes["fwd"], "dense_attention": att["fwd"],
                              "gate_and_loss": nbytes["fwd"] - att["fwd"], "l2_tile_loads": issued["fwd"]}})
        total = nbytes["fwd"] + nbytes["bwd"]
        out.append({**base, "mode": "fwd+bwd", "predicted_ratio_vs_dense": (fwd + bwd) / dense_all,
                    "winft_cycles_per_sm": fwd + bwd, "terms": {"forward": fwd, **terms["bwd"]},
                    "dense_cycles_per_sm": dense_all,
                    "dense_config": " + ".join(dense[r][1] for r in ("fwd", "dq", "dkdv")),
                    "bytes": {"compulsory": total, "dense_attention": att["fwd"] + att["bwd"],
                              "gate_and_loss": total - att["fwd"] - att["bwd"],
                              "l2_tile_loads": issued["fwd"] + issued["bwd"]}})
    return out


def unit_choices(rows: Sequence[dict], N: int = 577, batch: int = 64, heads: int = 12, head_dim: int = 64,
                 dtype: str = "bfloat16", target: str = "sm_90a") -> List[dict]:
    """Per unit and candidate configuration (that compiled), the unit's kernel cycles per SM in one
    step at ``N`` (every other unit at its first candidate): the model's view of which tile shape
    to ship first. One row per unit."""
    from vitpatch.kernels import _launch
    rows_by = _index(rows)
    base_pins = {u: _launch.candidates(u)[0] for u in UNITS}
    out = []
    for unit in UNITS:
        by_label = {}
        for cfg in _launch.candidates(unit):
            if not cfg.ships(dtype, head_dim):
                continue
            pins = {**base_pins, unit: cfg}
            calls = step_launches(N, batch, heads, head_dim, dtype, target, pins)
            cycles = [launch_cycles(x, cfg.label, rows_by, head_dim) for x in calls["fwd"] + calls["bwd"]
                      if unit_of(x.kernel.__name__) == unit]
            if cycles and None not in cycles:
                by_label[cfg.label] = sum(cycles)
        out.append({"row": "unit_choice", "op": "winft_attention", "unit": unit, "n": N, "batch": batch,
                    "heads": heads, "head_dim": head_dim, "dtype": dtype, "target": target, "static": True,
                    "cycles_per_sm": by_label, "best": min(by_label, key=by_label.get) if by_label else None})
    return out
