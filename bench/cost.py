"""``python -m bench.cost``: a static cost model of the window and WinfT kernels, from their compiled code.

    python -m bench.cost                                  # sm_90a, bf16, d = 64: rows and a table
    python -m bench.cost --out bench/results --sass /tmp/sass   # also writes each kernel's SASS

No GPU is needed. The window launchers run on ``meta`` tensors under the compile gate's recording
(:mod:`bench.compile`, the same launches a GPU run makes); every window candidate configuration
(rows say whether it ships) is compiled for the target, and so is the dense reference
(:mod:`bench.dense_attention`: forward, dq and dk/dv kernels) at the tile shapes a dense kernel
would use. For each compiled kernel this reads

* the SASS (``nvdisasm`` from the triton wheel, with line information): every loop (a backward
  branch) is matched to the source loop its instructions come from, by the ``# cost: <kind>``
  tag on that ``for`` line (``masked``, ``full``, ``prefix``, ``prefix_query``, ``dense``); per
  loop, the instructions of one iteration per thread, by class (``hgmma``, ``hmma``, ``mufu``,
  ``integer``, ``float``, ``uniform``, ``load``, ``store``, ``barrier``, ``shuffle``,
  ``control``, ``other``);
* the TTGIR: the ``async_wait`` depth at the head of each loop (0: the iteration waits for every
  copy in flight, including the one for the next tile);
* ptxas: registers, and the compiled shared memory; with the warps per block they give the
  resident blocks per SM.

The WinfT and PaCa kernels (``--ops``) get the same loop rows; the WinfT op is predicted too
(:mod:`bench.winft_cost`: one training step with the loss at N = 197, 577 and 1025, and a
byte-traffic estimate per call), PaCa has loop rows only.

Rows (``OUT/cost-<target>.jsonl``): one per (kernel, config, dtype, head_dim, loop) with
``instructions``, ``by_class``, ``async_wait``, ``registers``, ``shared_bytes``,
``blocks_per_sm``, ``shipped`` ...; then one per prediction (``row: "prediction"``) of the
forward and of the forward + backward at the issue's shapes, from the model in
``docs/cost_model.md``: tile pairs visited (counted on CPU from the real schedule, split into
masked and full), cycles per pair from the loops' counts, against the dense reference's best
tile shapes. Predictions are static: no GPU has confirmed them.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import compile as gate

# ================================================================================ SASS
CLASSES = ("hgmma", "hmma", "mufu", "integer", "float", "uniform", "load", "store", "barrier", "shuffle",
           "control", "other")
_FLOAT = {"FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FRND", "F2F", "F2FP", "F2I", "I2F",
          "HADD2", "HMUL2", "HFMA2", "HMNMX2", "HSETP2", "DADD", "DMUL", "DFMA", "FSWZADD"}
_INT = {"IMAD", "IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "LEA", "IMNMX", "VIMNMX", "SEL",
        "PRMT", "IABS", "MOV", "POPC", "FLO", "BMSK", "SGXT", "IDP", "VIADD", "IMUL", "S2R", "CS2R", "P2R",
        "R2P", "PLOP3", "BREV", "I2IP", "IMNMX", "ISCADD", "LOP32I", "IADD32I", "IMUL32I", "S2UR", "R2UR",
        "VOTE", "MATCH", "BFE", "BFI"}
_LOAD = {"LDG", "LDS", "LDSM", "LDGSTS", "LD", "LDC", "LDL", "UTMALDG", "UBLKCP", "LDGDEPBAR", "UTMAPF"}
_STORE = {"STG", "STS", "ST", "STL", "STSM", "RED", "ATOM", "ATOMS", "ATOMG", "REDG", "UTMASTG"}
_BARRIER = {"BAR", "WARPSYNC", "DEPBAR", "SYNCS", "MEMBAR", "WARPGROUP", "ARRIVES", "BSSY", "BSYNC", "ERRBAR",
            "CCTL", "FENCE"}
_CONTROL = {"BRA", "EXIT", "CALL", "RET", "JMP", "BRX", "NOP", "YIELD", "BPT", "KILL"}

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Za-z0-9_.]+)?")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\s+`?\(?(\.L_x_\d+)")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')


def opcode_class(op: str) -> str:
    """The class of a SASS opcode (without its modifiers)."""
    if op == "HGMMA":
        return "hgmma"
    if op == "HMMA":
        return "hmma"
    if op == "MUFU":
        return "mufu"
    if op == "SHFL":
        return "shuffle"
    for names, cls in ((_LOAD, "load"), (_STORE, "store"), (_BARRIER, "barrier"), (_CONTROL, "control"),
                       (_FLOAT, "float"), (_INT, "integer")):
        if op in names:
            return cls
    if op.startswith("U"):
        return "uniform"
    return "other"


@dataclass
class Loop:
    """A SASS loop: the instructions from its head label to its backward branch (one iteration)."""

    start: int          # index of the first instruction
    end: int            # index of the backward branch
    by_class: Dict[str, int]
    lines: Dict[Tuple[str, int], int]   # (file, line) -> instructions attributed to it
    nested: int          # inner loops inside this range
    tensor_flop: float = 0.0   # per warp and iteration: HGMMA m x n x k x 2 / 4 (a warpgroup's), HMMA m x n x k x 2
    global_bytes: int = 0      # per thread and iteration: widths of the vector global loads (LDG, LDGSTS)
    outside_nested: int = 0    # instructions of one iteration outside its nested loops (static counts)

    @property
    def instructions(self) -> int:
        return self.end - self.start + 1


def sass_loops(sass: str) -> List[Loop]:
    """Every loop of one kernel's SASS (``nvdisasm --print-line-info`` text)."""
    instrs: List[Tuple[str, Tuple[str, int], str]] = []   # (opcode, current source line, modifiers)
    labels: Dict[str, int] = {}
    branches: List[Tuple[int, str]] = []
    where = ("", 0)
    for line in sass.splitlines():
        m = _LINE.search(line)
        if m:
            where = (m.group(1), int(m.group(2)))
            continue
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.search(line)
        if m:
            b = _BRANCH.search(line)
            if b:
                branches.append((len(instrs), b.group(1)))
            instrs.append((m.group(2), where, m.group(3) or ""))
    spans = [(labels[target], at) for at, target in branches if target in labels and labels[target] <= at]
    loops = []
    for start, end in spans:
        by_class = dict.fromkeys(CLASSES, 0)
        lines: Dict[Tuple[str, int], int] = {}
        flop, nbytes = 0.0, 0
        inner = [(s, e) for s, e in spans if (s, e) != (start, end) and start <= s and e <= end]
        for at, (op, src, mods) in enumerate(instrs[start:end + 1], start):
            by_class[opcode_class(op)] += 1
            if not any(s <= at <= e for s, e in inner):  # a nested loop's lines vote for the nested loop
                lines[src] = lines.get(src, 0) + 1
            flop += tensor_flop(op, mods)
            nbytes += global_load_bytes(op, mods)
        outside = (end - start + 1) - len({at for s, e in inner for at in range(s, e + 1)})
        loops.append(Loop(start, end, by_class, lines, len(inner), flop, nbytes, outside))
    return loops


_HGMMA = re.compile(r"^\.(\d+)x(\d+)x(\d+)")
_HMMA = re.compile(r"^\.(\d\d)(\d)(\d+)")


def tensor_flop(op: str, mods: str) -> float:
    """Matmul FLOP one warp's instance of a tensor-core instruction stands for: ``HGMMA.MxNxK`` is a
    warpgroup's ``2 M N K`` (a quarter per warp), ``HMMA.16816`` a warp's ``2 x 16 x 8 x 16``."""
    if op == "HGMMA":
        m = _HGMMA.match(mods)
        return 2.0 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) / 4 if m else 0.0
    if op == "HMMA":
        m = _HMMA.match(mods)
        return 2.0 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) if m else 0.0
    return 0.0


def global_load_bytes(op: str, mods: str) -> int:
    """Bytes one thread's vector global load (``LDG``, ``LDGSTS`` of 8 or 16 bytes: the tiles) moves.
    Narrower loads (list entries, row statistics, table indices) are left out: a warp's threads
    mostly read the same few words, which a per-thread count would multiply by 32."""
    if op not in ("LDG", "LDGSTS"):
        return 0
    return 16 if ".128" in mods else 8 if ".64" in mods else 0


def tagged_loops(fn, _seen=None) -> Dict[str, Tuple[str, int, int]]:
    """``kind -> (file, first line, last line)`` of the ``for`` loops of a kernel's Python function
    whose ``for`` line carries ``# cost: <kind>``, and of the device helpers it calls (a head loop
    inside the WinfT gate's ``_gate_tile``: the kernel's own tags win a name clash)."""
    _seen = set() if _seen is None else _seen
    _seen.add(fn)
    path = os.path.realpath(inspect.getsourcefile(fn))
    lines, first = inspect.getsourcelines(fn)
    out: Dict[str, Tuple[str, int, int]] = {}
    called: Dict[str, Tuple[str, int, int]] = {}
    for node in ast.walk(ast.parse(textwrap.dedent("".join(lines)))):
        if isinstance(node, ast.For):
            m = re.search(r"#\s*cost:\s*(\w+)", lines[node.lineno - 1])
            if m:
                out[m.group(1)] = (path, first + node.lineno - 1, first + node.end_lineno - 1)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            callee = getattr(fn, "__globals__", {}).get(node.func.id)
            inner = getattr(callee, "fn", None)   # a JITFunction helper
            if inner is not None and inner not in _seen:
                called.update(tagged_loops(inner, _seen))
    return {**called, **out}


def classify(loop: Loop, tags: Dict[str, Tuple[str, int, int]]) -> Optional[str]:
    """The tagged source loop most of this SASS loop's kernel-file instructions come from (innermost
    tag wins: a line inside two tagged ranges counts for the shorter one)."""
    votes: Dict[str, int] = {}
    for (path, line), count in loop.lines.items():
        inside = [(hi - lo, kind) for kind, (p, lo, hi) in tags.items() if os.path.realpath(path) == p
                  and lo <= line <= hi]
        if inside:
            kind = min(inside)[1]
            votes[kind] = votes.get(kind, 0) + count
    return max(votes, key=votes.get) if votes else None


# ================================================================================ TTGIR
_LOCDEF = re.compile(r'^(#loc\d*)\s*=\s*loc\((.*)\)\s*$')
_FILELINE = re.compile(r'"([^"]+)":(\d+):\d+')


def ttgir_async_waits(ttgir: str) -> List[Tuple[Optional[Tuple[str, int]], Optional[int]]]:
    """Per ``scf.for`` of the TTGIR: ``(source (file, line) of the loop, num of its first async_wait)``
    (``None`` when the loop has no async_wait)."""
    locs: Dict[str, str] = {}
    for line in ttgir.splitlines():
        m = _LOCDEF.match(line.strip())
        if m:
            locs[m.group(1)] = m.group(2)

    def resolve(ref: str, depth: int = 0):
        text = locs.get(ref, "")
        m = _FILELINE.search(text)
        if m:
            return os.path.realpath(m.group(1)), int(m.group(2))
        inner = re.search(r"(#loc\d+)", text)
        return resolve(inner.group(1), depth + 1) if inner and depth < 8 else None

    lines = ttgir.splitlines()
    out = []
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        depth, wait, j = 0, None, i
        for j in range(i, len(lines)):
            if wait is None and depth == 1 and "ttg.async_wait" in lines[j]:  # in this loop's own body
                m = re.search(r"num = (\d+)", lines[j])
                wait = int(m.group(1)) if m else None
            depth += lines[j].count("{") - lines[j].count("}")
            if j > i and depth <= 0:
                break
        m = re.search(r"loc\((#loc\d+)\)\s*$", lines[j].strip())
        out.append((resolve(m.group(1)) if m else None, wait))
    return out


# ================================================================================ occupancy
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = {"sm_90a": 228 * 1024, "sm_80": 164 * 1024}


def blocks_per_sm(registers: int, num_warps: int, shared_bytes: int, target: str = "sm_90a") -> int:
    """Resident blocks per SM: registers (allocated per warp in units of 256), warps, shared memory
    (1 KB reserved per block)."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * num_warps)
    by_warps = MAX_WARPS_PER_SM // num_warps
    by_smem = SMEM_PER_SM[target] // (shared_bytes + 1024) if shared_bytes else MAX_BLOCKS_PER_SM
    return max(0, min(by_regs, by_warps, by_smem, MAX_BLOCKS_PER_SM))


# ================================================================================ compiling
def nvdisasm() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(path):
        raise FileNotFoundError(f"nvdisasm is not in the triton wheel ({path})")
    return path


def disassemble(cubin: bytes) -> str:
    """SASS with line information of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([nvdisasm(), "--print-line-info", "-c", f.name], capture_output=True, text=True,
                              timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {done.stderr[-500:]}")
    return done.stdout


@dataclass(frozen=True)
class Spec:
    """One kernel launch to cost: which op and configuration it belongs to."""

    op: str             # window_attention | dense
    unit: str           # launch-policy unit, or "dense"
    config: str         # the configuration's label
    launch: object      # the recorded launch
    block_m: int
    block_n: int


OP_OF_FAMILY = {"window": "window_attention", "winft": "winft_attention", "paca": "cluster_attention"}
WINDOW_KERNELS = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")


def unit_specs(family: str, dtype: str, head_dim: int, target: str) -> List[Spec]:
    """Every candidate configuration's kernel launches of one op family (``window``, ``winft``,
    ``paca``; recorded by the compile gate's drivers, not run, in the family's first variant);
    :func:`shipped_labels` says which of them ship. For the window family only its three attention
    kernels (the schedule kernels are costed by :func:`launch_cycles`)."""
    from vitpatch.kernels import _launch
    out = []
    variant = gate.DRIVERS[family][1][0]
    for unit in _launch.CANDIDATES:
        if not unit.startswith(family + "_"):
            continue
        for index, cfg in enumerate(_launch.candidates(unit)):
            if not cfg.ships(dtype, head_dim):
                continue
            params = dict(cfg.params)
            for launch in gate.record(gate.Job(unit, index, dtype, head_dim, variant), target):
                if family == "window" and launch.kernel.__name__ not in WINDOW_KERNELS:
                    continue
                out.append(Spec(OP_OF_FAMILY[family], unit, cfg.label, launch, params.get("BLOCK_M", 0),
                                params.get("BLOCK_N", 0)))
    return out


def window_specs(dtype: str, head_dim: int, target: str) -> List[Spec]:
    """Every window candidate configuration's forward and backward kernel launches (recorded, not
    run); :func:`shipped_labels` says which of them ship."""
    return unit_specs("window", dtype, head_dim, target)


def shipped_labels(dtype: str, head_dim: int, target: str) -> set:
    """``(unit, configuration label)`` of what ``kernels/_shipped.py`` ships for this case."""
    import torch

    from vitpatch.kernels import _launch
    return {(unit, cfg.label) for unit in _launch.CANDIDATES
            for cfg in _launch.shipped(unit, getattr(torch, dtype), head_dim, target)}


DENSE_CONFIGS = ((64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2))  # BM, BN, warps, stages
DENSE_BWD_CONFIGS = ((64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (128, 128, 8, 2))


def dense_specs(dtype: str, head_dim: int, target: str) -> List[Spec]:
    """The dense reference (:mod:`bench.dense_attention`) at the tile shapes a dense kernel uses:
    the forward, and the backward's dq and dk/dv kernels."""
    import torch

    from vitpatch.kernels import _launch

    from . import dense_attention
    out = []
    q = torch.empty(2, 3, 1024, head_dim, dtype=getattr(torch, dtype), device="meta")
    for bm, bn, warps, stages in DENSE_CONFIGS:
        with _launch.recording(target) as launches:
            dense_attention.attention(q, q, q, 0.125, bm, bn, warps, stages)
        out.append(Spec("dense", "dense", f"BM={bm},BN={bn},w{warps},s{stages}", launches[0], bm, bn))
    for bm, bn, warps, stages in DENSE_BWD_CONFIGS:
        with _launch.recording(target) as launches:
            dense_attention.attention_backward(q, q, q, q, 0.125, bm, bn, warps, stages)
        for launch in launches:
            out.append(Spec("dense", "dense", f"BM={bm},BN={bn},w{warps},s{stages}", launch, bm, bn))
    return out


def cost_rows(spec: Spec, dtype: str, head_dim: int, target: str, sass_dir: Optional[str] = None) -> List[dict]:
    """One row per tagged loop of the compiled kernel of ``spec``."""
    import triton
    from triton import knobs
    knobs.compilation.always_compile = True  # a cached kernel reports no ptxas figures
    compiled, log, seconds, error = gate.compile_binary(spec.launch, target)
    kernel = spec.launch.kernel
    name = f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{kernel.__name__}"
    consts = gate._constexpr_values(kernel.jit, gate._bind(spec.launch, gate._backend(target))[2])
    variant = {k: consts[k] for k in ("PREFIX_Q", "PREFIX_K", "HAS_KEEP") if k in consts}
    base = {"row": "loop", "kernel": name, "op": spec.op, "unit": spec.unit, "config": spec.config, "dtype": dtype,
            "head_dim": head_dim, "target": target, "launch_variant": variant, "block_m": spec.block_m,
            "block_n": spec.block_n, "triton": triton.__version__}
    if compiled is None:
        return [{**base, "loop": None, "error": error}]
    warps = int(compiled.metadata.num_warps)
    regs = gate.ptxas_registers(log)
    shared = int(compiled.metadata.shared)
    sass = disassemble(compiled.asm["cubin"])
    if sass_dir:
        os.makedirs(sass_dir, exist_ok=True)
        tag = "_".join(f"{k}{int(v)}" for k, v in variant.items())
        fname = f"{name}__{spec.config}__{dtype}_d{head_dim}{'__' + tag if tag else ''}.sass"
        with open(os.path.join(sass_dir, re.sub(r"[^A-Za-z0-9_.,=-]", "_", fname)), "w") as f:
            f.write(sass)
    tags = tagged_loops(kernel.fn)
    waits = {}
    for where, num in ttgir_async_waits(compiled.asm["ttgir"]):
        for kind, (path, lo, _) in tags.items():
            if where is not None and where == (path, lo):
                waits[kind] = num
    rows = []
    for loop in sass_loops(sass):
        kind = classify(loop, tags)
        if kind is None:
            continue
        rows.append({**base, "loop": kind, "instructions": loop.instructions, "by_class": loop.by_class,
                     "tensor_flop": loop.tensor_flop * warps, "global_load_bytes": loop.global_bytes * warps * 32,
                     "nested_loops": loop.nested, "outside_nested": loop.outside_nested, "num_warps": warps, "async_wait": waits.get(kind),
                     "registers": regs, "shared_bytes": shared,
                     "blocks_per_sm": blocks_per_sm(regs or 255, warps, shared, target),
                     "compile_s": round(seconds, 1)})
    return rows


# ================================================================================ the model
# H100 / H200 SXM (docs/cost_model.md): per SM and cycle
MACHINE = {
    "sms": 132,
    "issue_per_cycle": 4,          # warp-instructions: four schedulers, one each
    "mufu_per_cycle": 16,          # exp2 results (four SFU quadrants of 4 lanes)
    "tensor_flop_per_cycle": 4096,  # dense bf16 / fp16 (989 TFLOP/s at 1.83 GHz over 132 SMs)
    "l2_bytes_per_cycle": 32,      # tiles come from L2 (about 7.7 TB/s at 1.83 GHz)
    "launch_gap_cycles": 2745,     # 1.5 us between back-to-back kernels (an assumption, not measured)
    "layers": 12,                  # a ViT's blocks share one tile schedule per step
    "dependent_issue_cycles": 4,   # a lone program's loop: one instruction per warp every 4 cycles (ALU latency)
    "l2_latency_cycles": 300,      # a load that waits on the previous step's stores (an assumption)
    "clock_hz": 1.83e9,            # H100 SXM boost clock: host time in cycles
}
# per kernel role: matmul FLOP per tile pair in units of BM x BN x d, and what one iteration loads
ROLE_FLOP = {"fwd": 4, "dq": 6, "dkdv": 8}


def role(kernel: str) -> str:
    """``fwd``, ``dq`` or ``dkdv`` from a kernel's name."""
    return "dkdv" if "dkdv" in kernel else "dq" if "_dq_" in kernel else "fwd"


def tile_cycles(loop: dict, head_dim: int, elem_bytes: int = 2, machine: dict = MACHINE) -> Dict[str, float]:
    """Cycles of one iteration of ``loop`` (a cost row) on one SM, by resource, and the total:
    the largest term when the loop's loads overlap its compute (``async_wait >= 1`` or at least
    two resident blocks), else the compute terms' largest plus the load term. Tensor FLOP and
    loaded bytes are read from the SASS (``tensor_flop``: HGMMA / HMMA shapes; ``global_load_bytes``:
    the vector loads of the tiles) where the row has them, else from the tile shape (an iteration
    of a forward or dq loop loads a key tile, K and V; of a dk/dv loop a query tile, q and dout)."""
    warps = loop["num_warps"]
    bm, bn = loop["block_m"], loop["block_n"]
    r = role(loop["kernel"])
    flop = loop.get("tensor_flop") or ROLE_FLOP[r] * bm * bn * head_dim
    loaded = loop.get("global_load_bytes") or 2.0 * (bm if r == "dkdv" else bn) * head_dim * elem_bytes
    terms = {
        "issue": loop["instructions"] * warps / machine["issue_per_cycle"],
        "mufu": loop["by_class"]["mufu"] * warps * 32 / machine["mufu_per_cycle"],
        "tensor": flop / machine["tensor_flop_per_cycle"],
        "memory": loaded / machine["l2_bytes_per_cycle"],
    }
    overlap = (loop.get("async_wait") or 0) >= 1 or loop.get("blocks_per_sm", 1) >= 2
    compute = max(terms["issue"], terms["mufu"], terms["tensor"])
    terms["total"] = max(compute, terms["memory"]) if overlap else compute + terms["memory"]
    terms["overlap"] = overlap
    return terms


def host_grouping_seconds(n_side: int, density: float, block_m: int, block_n: int, images: int = 4) -> float:
    """Seconds per image of the ``grouped`` query order's host search (``window.grouped_perm``
    on CPU windows, one CPU thread of this machine) on the AWD windows :func:`visited_tiles` counts,
    the mean over ``images``."""
    import time

    from vitpatch.kernels import window as ws
    from vitpatch.masks import synthetic_awd_windows
    grid = (n_side, n_side)
    win = synthetic_awd_windows(grid, images, density, seed=0)
    start = time.perf_counter()
    ws.grouped_perm(win, grid, ws.Config(block_m, block_n, ws.TILED, 64, "grouped"))
    return (time.perf_counter() - start) / images


def visited_tiles(n_side: int, density: float, block_m: int, block_n: int, images: int = 4,
                  query_order: str = "auto") -> Dict[str, float]:
    """Per image: masked and full (query tile, key tile) pairs the window schedule visits, the
    query tiles that hold a query (``query_tiles``; the schedule has room for more, ``TQ``, where
    the query order fills tiles partly) and the key tiles, for AWD windows
    (``synthetic_awd_windows``) on an ``n_side`` square grid; the mean over ``images`` images,
    counted on CPU from the real schedule (Triton's interpreter). ``dense_query_tiles`` is
    ``cdiv(n, block_m)``, the denominator of the visited fraction."""
    from vitpatch import WindowMask, tiles
    from vitpatch.masks import synthetic_awd_windows
    grid = (n_side, n_side)
    mask = WindowMask(synthetic_awd_windows(grid, images, density, seed=0), grid, 1)
    codes = tiles.tile_codes(mask, images, block_m, block_n, query_order=query_order)
    slots = tiles.query_tokens(mask, images, block_m, block_n, query_order=query_order)
    used = (slots.view(images, -1, block_m) >= 0).any(2).sum(1).double().mean().item()
    return {"masked": float((codes == 1).sum()) / images, "full": float((codes == 2).sum()) / images,
            "query_tiles": used, "schedule_query_tiles": codes.shape[1],
            "dense_query_tiles": -(-n_side * n_side // block_m), "key_tiles": codes.shape[2],
            "density": mask.density(images)}


def _loops(rows: Sequence[dict]) -> Dict[Tuple[str, str], Dict[str, dict]]:
    """``(op, config) -> {"<role>:<variant>:<loop>": row}``."""
    out: Dict[Tuple[str, str], Dict[str, dict]] = {}
    for r in rows:
        if r.get("loop") is None:
            continue
        variant = "pre" if (r["launch_variant"].get("PREFIX_Q") or r["launch_variant"].get("PREFIX_K")) else "main"
        out.setdefault((r["op"], r["config"]), {})[f"{role(r['kernel'])}:{variant}:{r['loop']}"] = r
    return out


def _tile_fields(t: dict) -> dict:
    """A prediction row's visited fraction (over the dense query tiles) and tiles per image."""
    return {"visited_fraction": (t["masked"] + t["full"]) / (t["dense_query_tiles"] * t["key_tiles"]),
            "tiles_per_image": {"masked": t["masked"], "full": t["full"], "query_tiles": t["query_tiles"]}}


def _window_role_cycles(loops: Dict[str, dict], r: str, tiles_: dict, head_dim: int) -> Optional[float]:
    """Cycles per image and head of one window kernel role from its loops and the visited tiles."""
    def cyc(key):
        return tile_cycles(loops[key], head_dim)["total"] if key in loops else 0.0
    if f"{r}:main:masked" not in loops:
        return None
    main = (tiles_["masked"] * cyc(f"{r}:main:masked") + tiles_["full"] * cyc(f"{r}:main:full")
            + (tiles_["query_tiles"] if r != "dkdv" else tiles_["key_tiles"]) * cyc(f"{r}:main:prefix"))
    # the prefix programs: prefix queries over every key tile (fwd, dq), prefix keys over every query
    # tile that holds a query (dk/dv: the others cost a query-table read, not counted)
    prefix = (tiles_["query_tiles"] if r == "dkdv" else tiles_["key_tiles"]) * (
        cyc(f"{r}:pre:prefix_query") or cyc(f"{r}:main:prefix_query"))
    return main + prefix


def dense_cycles(rows: Sequence[dict], N: int, batch: int, heads: int, head_dim: int) -> Dict[str, Tuple[float, str]]:
    """Cycles per SM of each dense reference kernel (``fwd``, ``dq``, ``dkdv``) over ``batch x heads``
    at sequence length ``N``, each at its best compiled tile shape: ``{role: (cycles, config)}``."""
    scale = batch * heads / MACHINE["sms"]
    dense: Dict[str, Tuple[float, str]] = {}
    for (op, config), loops in _loops(rows).items():
        if op != "dense":
            continue
        for key, r in loops.items():
            rr = key.split(":", 1)[0]
            cycles = scale * -(-N // r["block_m"]) * -(-N // r["block_n"]) * tile_cycles(r, head_dim)["total"]
            if rr not in dense or cycles < dense[rr][0]:
                dense[rr] = (cycles, config)
    return dense


def predict(rows: Sequence[dict], n_side: int, density: float, batch: int, heads: int, head_dim: int,
            tiles_cache: Optional[dict] = None, dtype: str = "bfloat16", target: str = "sm_90a") -> List[dict]:
    """Predicted forward and forward + backward time of each window configuration relative to the
    dense reference's best configuration per kernel, at ``N = 1 + n_side^2`` (one prefix token):
    kernel cycles, one launch gap per launch, and the schedule build amortised over the layers
    that share it (docs/cost_model.md)."""
    tiles_cache = {} if tiles_cache is None else tiles_cache
    N = 1 + n_side * n_side
    scale = batch * heads / MACHINE["sms"]
    gap = MACHINE["launch_gap_cycles"]
    layers = MACHINE["layers"]
    by_config = _loops(rows)
    dense = dense_cycles(rows, N, batch, heads, head_dim)
    if "fwd" not in dense:
        return []
    dense_fwd = dense["fwd"][0] + gap  # one launch
    window: Dict[str, List[tuple]] = {"fwd": [], "bwd": [], "grouped": []}
    for (op, config), loops in by_config.items():
        if op != "window_attention":
            continue
        any_row = next(iter(loops.values()))
        key = (n_side, density, any_row["block_m"], any_row["block_n"])
        if key not in tiles_cache:
            tiles_cache[key] = visited_tiles(n_side, density, any_row["block_m"], any_row["block_n"])
        t = tiles_cache[key]
        fwd = _window_role_cycles(loops, "fwd", t, head_dim)
        ships = {r: all(row.get("shipped") for k, row in loops.items() if k.startswith(r + ":"))
                 for r in ("fwd", "dq", "dkdv")}  # the forward's and the backward's units ship apart
        if fwd is not None:
            window["fwd"].append((scale * fwd, config, ships["fwd"], t))
            if ships["fwd"] and any_row["block_n"] <= 64:  # the host order, as a bound
                gkey = key + ("grouped",)
                if gkey not in tiles_cache:
                    tiles_cache[gkey] = {**visited_tiles(n_side, density, any_row["block_m"], any_row["block_n"],
                                                         query_order="grouped"),
                                         "host_s": host_grouping_seconds(n_side, density, any_row["block_m"],
                                                                         any_row["block_n"])}
                tg = tiles_cache[gkey]
                window["grouped"].append((scale * _window_role_cycles(loops, "fwd", tg, head_dim), config, tg))
        dq, dkdv = (_window_role_cycles(loops, r, t, head_dim) for r in ("dq", "dkdv"))
        if dq is not None and dkdv is not None:
            window["bwd"].append((scale * (dq + dkdv), config, ships["dq"] and ships["dkdv"], t))
    out = []
    base = {"row": "prediction", "op": "window_attention", "n": N, "batch": batch, "heads": heads,
            "head_dim": head_dim, "static": True, "layers_sharing_schedule": layers,
            "launch_gap_cycles": gap, "excluded": "epilogues, the delta kernels' work, wave quantisation"}
    fwd_total = []
    for cycles, config, shipped, t in window["fwd"]:
        calls = call_launches(n_side, batch, heads, dtype, head_dim, target, config, None)
        build = build_cycles(calls["fwd_build"], calls["torch_fwd_build"], target) / layers
        total = cycles + gap * len(calls["fwd"]) + build
        fwd_total.append((total, config, shipped))
        out.append({**base, "mode": "fwd", "config": config, "query_order": "auto", "shipped": shipped,
                    "density": round(t["density"], 4),
                    "predicted_ratio_vs_dense": total / dense_fwd, "window_cycles_per_sm": total,
                    "terms": {"kernels": cycles, "launch_gaps": gap * len(calls["fwd"]), "schedule_build": build},
                    "dense_cycles_per_sm": dense_fwd, "dense_config": dense["fwd"][1],
                    **_tile_fields(t)})
    for cycles, config, t in window["grouped"]:
        # the grouped order's kernels with the auto order's device build (an underestimate: grouped
        # builds no sorted order but gathers a perm) and its host search, one per image and step
        calls = call_launches(n_side, batch, heads, dtype, head_dim, target, config, None)
        build = build_cycles(calls["fwd_build"], calls["torch_fwd_build"], target) / layers
        host = t["host_s"] * batch * MACHINE["clock_hz"] / layers
        kernels_only = cycles + gap * len(calls["fwd"]) + build
        out.append({**base, "mode": "fwd", "config": config.replace("QUERY_ORDER=auto", "QUERY_ORDER=grouped"),
                    "query_order": "grouped", "shipped": False, "bound": True, "density": round(t["density"], 4),
                    "predicted_ratio_vs_dense": (kernels_only + host) / dense_fwd,
                    "kernels_only_ratio_vs_dense": kernels_only / dense_fwd,
                    "window_cycles_per_sm": kernels_only + host,
                    "terms": {"kernels": cycles, "launch_gaps": gap * len(calls["fwd"]), "schedule_build": build,
                              "host_grouping": host},
                    "host_grouping_ms_per_image": 1e3 * t["host_s"], "host": platform.processor() or platform.machine(),
                    "dense_cycles_per_sm": dense_fwd, "dense_config": dense["fwd"][1],
                    **_tile_fields(t)})
    best_fwd = min((w for w in fwd_total if w[2]), default=None, key=lambda w: w[0])
    if best_fwd is not None and "dq" in dense and "dkdv" in dense:
        dense_all = dense_fwd + dense["dq"][0] + dense["dkdv"][0] + 3 * gap  # delta, dq, dk/dv launches
        for cycles, config, shipped, t in window["bwd"]:
            calls = call_launches(n_side, batch, heads, dtype, head_dim, target, best_fwd[1], config)
            build = build_cycles(calls["bwd_build"], calls["torch_bwd_build"], target) / layers
            bwd = cycles + gap * len(calls["bwd"]) + build
            total = best_fwd[0] + bwd
            out.append({**base, "mode": "fwd+bwd", "config": f"{best_fwd[1]} + {config}", "query_order": "auto",
                        "shipped": shipped,
                        "density": round(t["density"], 4), "predicted_ratio_vs_dense": total / dense_all,
                        "window_cycles_per_sm": total,
                        "terms": {"forward": best_fwd[0], "kernels": cycles, "launch_gaps": gap * len(calls["bwd"]),
                                  "schedule_build": build},
                        "dense_cycles_per_sm": dense_all,
                        "dense_config": " + ".join(dense[r][1] for r in ("fwd", "dq", "dkdv")),
                        **_tile_fields(t)})
    return out


# ================================================================================ schedule build
# aten ops that launch no kernel (allocation, views, metadata)
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "view", "_unsafe_view", "expand", "as_strided",
              "detach", "alias", "t", "transpose", "select", "slice", "unsqueeze", "squeeze", "permute", "reshape",
              "lift_fresh", "_to_copy_meta", "unbind", "split", "contiguous", "sym_size", "sym_stride", "size", "stride",
              "is_same_size", "_reshape_alias", "clone_meta"}


def torch_launches():
    """A dispatch mode that counts the PyTorch ops run inside it that launch a kernel (``.n``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] not in _NO_LAUNCH:
                self.n += 1
            return func(*args, **(kwargs or {}))

    return Count()


def call_launches(n_side: int, batch: int, heads: int, dtype: str, head_dim: int, target: str,
                  fwd_label: Optional[str] = None, bwd_label: Optional[str] = None) -> dict:
    """The launches of one window attention step at ``N = 1 + n_side^2`` with ``batch x heads``
    (recorded on ``meta`` tensors, nothing runs): Triton kernels through the launchers, PyTorch
    ops counted through a dispatch mode (those that launch a kernel). ``{"fwd_build", "fwd",
    "bwd_build", "bwd"}``: launch lists, and ``"torch_fwd_build"`` / ``"torch_bwd_build"`` counts.
    The forward configuration is ``fwd_label`` (default: the first shipped), the backward's
    ``bwd_label``; the backward builds its own schedule when its block sizes differ."""
    import torch
    from vitpatch.kernels import _launch
    from vitpatch.kernels import window_attention as wa
    from vitpatch.kernels.window import Config

    dt = getattr(torch, dtype)

    def pick(unit, label):
        cands = _launch.candidates(unit) if label else _launch.shipped(unit, dt, head_dim, target)
        return next(c for c in cands if label is None or c.label == label)

    fwd, bwd = pick("window_fwd", fwd_label), pick("window_bwd", bwd_label)
    grid, P = (n_side, n_side), 1
    N = P + n_side * n_side
    q, k, v = (torch.empty(batch, heads, N, head_dim, dtype=dt, device="meta") for _ in range(3))
    windows = torch.empty(batch, n_side * n_side, 4, dtype=torch.int32, device="meta")
    lse = torch.empty(batch, heads, N, device="meta")
    out: dict = {}
    marks = []
    with _launch.forcing({"window_fwd": fwd, "window_bwd": bwd}), _launch.recording(target) as launches:
        cfg_f, cfg_b = Config.of(fwd), Config.of(bwd)
        with torch_launches() as c:
            wa.cached_schedule(windows, None, grid, P, batch, cfg_f)
        out["torch_fwd_build"] = c.n
        marks.append(len(launches))
        # the forward and backward themselves look the schedules up: a cache miss would show as
        # build launches among theirs
        wa._forward(q, k, v, windows, None, grid, P, 0.125, cfg_f)
        marks.append(len(launches))
        with torch_launches() as c:
            wa.cached_schedule(windows, None, grid, P, batch, cfg_b).transposed()
        out["torch_bwd_build"] = c.n
        marks.append(len(launches))
        wa._backward(torch.empty_like(q), q, k, v, q, lse, windows, None, grid, P, 0.125, cfg_b)
    out["fwd_build"], out["fwd"] = launches[:marks[0]], launches[marks[0]:marks[1]]
    out["bwd_build"], out["bwd"] = launches[marks[1]:marks[2]], launches[marks[2]:]
    out["configs"] = (fwd.label, bwd.label)
    return out


_KERNEL_CYCLES: Dict[str, Tuple[int, int, int]] = {}


def _steps(launch) -> int:
    """Trip count of a build kernel's sequential ``# cost: steps`` loop (0 without one), from the
    loop's own ``range(start, stop, step)`` with the launch's arguments put in (``_cut_kernel``
    walks an image's ``n`` sorted positions in blocks of ``LMIN``)."""
    fn = launch.kernel.fn
    lines, _ = inspect.getsourcelines(fn)
    for node in ast.walk(ast.parse(textwrap.dedent("".join(lines)))):
        if (isinstance(node, ast.For) and re.search(r"#\s*cost:\s*steps\b", lines[node.lineno - 1])
                and isinstance(node.iter, ast.Call) and getattr(node.iter.func, "id", None) == "range"):
            names = {**getattr(fn, "__globals__", {}), **launch.named}
            bounds = [int(eval(compile(ast.Expression(a), "<steps>", "eval"), {"__builtins__": {}}, names))
                      for a in node.iter.args]
            start, stop, step = ([0] + bounds + [1])[-3:] if len(bounds) == 1 else (bounds + [1])[:3]
            return max(0, -(-(stop - start) // step))
    return 0


def launch_cycles(launch, target: str, machine: dict = MACHINE) -> float:
    """Cycles per SM of one build launch: programs x the kernel's SASS instructions (every
    loop counted once: at the shapes modelled each build loop runs once, ``tk <= 64``,
    ``tq <= 128``) x warps / 4, over the SMs. A kernel with a sequential ``# cost: steps`` loop
    (``_cut_kernel``: one program per image, each alone on its SM) is latency-bound instead: its
    programs run side by side, each taking trips x (the loop's instructions x the larger of
    ``dependent_issue_cycles`` (one dependent instruction per warp every 4 cycles) and warps / 4
    (the schedulers' issue), plus one ``l2_latency_cycles`` for the load that waits on the
    previous step's stores), in waves of one program per SM."""
    key = gate.launch_key(launch, target)
    if key not in _KERNEL_CYCLES:
        compiled, _, _, error = gate.compile_binary(launch, target)
        if compiled is None:
            raise RuntimeError(f"{launch.kernel.__name__} does not compile: {error}")
        sass = disassemble(compiled.asm["cubin"])
        instrs = sum(1 for line in sass.splitlines() if _INSTR.search(line))
        tags = tagged_loops(launch.kernel.fn)
        step = max((lp.instructions for lp in sass_loops(sass) if "steps" in tags and classify(lp, tags) == "steps"),
                   default=0)
        _KERNEL_CYCLES[key] = (instrs, int(compiled.metadata.num_warps), step)
    instrs, warps, step = _KERNEL_CYCLES[key]
    grid = launch.grid if isinstance(launch.grid, tuple) else tuple(launch.grid)
    programs = 1
    for g in grid:
        programs *= int(g)
    trips = _steps(launch)
    if step and trips:
        waves = -(-programs // machine["sms"])
        per_instr = max(machine["dependent_issue_cycles"], warps / machine["issue_per_cycle"])
        return waves * ((instrs + (trips - 1) * step) * per_instr + trips * machine["l2_latency_cycles"])
    return programs * instrs * warps / machine["issue_per_cycle"] / machine["sms"]


def build_cycles(launches: Sequence, torch_ops: int, target: str, machine: dict = MACHINE) -> float:
    """Cycles of one schedule build: its Triton launches' issue cycles and one launch gap per
    launch, Triton or PyTorch (on a device every one of them is a kernel)."""
    return (sum(launch_cycles(x, target, machine) for x in launches)
            + (len(launches) + torch_ops) * machine["launch_gap_cycles"])


# ================================================================================ launches
def launch_counts(dtype: str = "bfloat16", head_dim: int = 64, target: str = "sm_90a", n_side: int = 24) -> dict:
    """Kernel launches of one window attention call through the launchers (recorded, not run), with
    the first shipped forward and backward configurations, at ``N = 1 + n_side^2``: the first
    forward (it builds the tile schedule), a forward with the schedule cached (every later layer
    of a ViT that shares the windows), and the backward (:func:`call_launches`, B = 2, h = 3)."""
    calls = call_launches(n_side, 2, 3, dtype, head_dim, target)
    names = {k: [x.kernel.__name__ for x in calls[k]] for k in ("fwd_build", "fwd", "bwd_build", "bwd")}
    return {"row": "launches", "op": "window_attention", "n": 1 + n_side * n_side, "dtype": dtype,
            "head_dim": head_dim, "target": target, "forward_config": calls["configs"][0],
            "backward_config": calls["configs"][1], "forward_first": names["fwd_build"] + names["fwd"],
            "forward_cached": names["fwd"], "backward": names["bwd_build"] + names["bwd"]}


# ================================================================================ CLI
SHAPES = ((24, 0.23), (64, 0.23), (64, 0.05))  # (grid side, density): N = 577 and 4097


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="sm_90a", choices=["sm_90a"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--out", default=None, help="directory of cost-<target>.jsonl")
    p.add_argument("--sass", default=None, help="also write each compiled kernel's SASS here")
    p.add_argument("--no-predict", action="store_true", help="loop rows only (no tile counting)")
    p.add_argument("--ops", default="window,winft,paca",
                   help="op families whose kernels are costed (comma-separated; predictions: window, winft)")
    p.add_argument("--kernels", default=None, metavar="REGEX",
                   help="cost only kernels whose name matches (e.g. '_fwd_kernel'; the dense reference always)")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    families = [f.strip() for f in args.ops.split(",") if f.strip()]
    unknown = sorted(set(families) - set(OP_OF_FAMILY))
    if unknown:
        p.error(f"--ops: unknown families {unknown} (choose from {sorted(OP_OF_FAMILY)})")
    specs = [sp for f in families for sp in unit_specs(f, args.dtype, args.head_dim, args.target)]
    specs += dense_specs(args.dtype, args.head_dim, args.target)
    rows: List[dict] = []
    seen = set()
    ships = shipped_labels(args.dtype, args.head_dim, args.target)
    for spec in specs:
        if args.kernels and spec.op != "dense" and not re.search(args.kernels, spec.launch.kernel.__name__):
            continue
        key = gate.launch_key(spec.launch, args.target)
        if key in seen:
            continue
        seen.add(key)
        rows += [{**r, "shipped": spec.op == "dense" or (spec.unit, spec.config) in ships}
                 for r in cost_rows(spec, args.dtype, args.head_dim, args.target, args.sass)]
    preds: List[dict] = []
    if not args.no_predict:
        cache: dict = {}
        for side, density in SHAPES:
            preds += predict(rows, side, density, args.batch, args.heads, args.head_dim, cache, args.dtype,
                             args.target)
    if not args.no_predict and "winft" in families:
        from . import winft_cost
        preds += winft_cost.predict(rows, args.batch, args.heads, args.head_dim, args.dtype, args.target)
        preds += winft_cost.unit_choices(rows, 577, args.batch, args.heads, args.head_dim, args.dtype, args.target)
    launches = launch_counts(args.dtype, args.head_dim, args.target)
    print(format_table(rows, preds))
    print(f"\nlaunches per window attention call at N = {launches['n']}: first forward "
          f"{len(launches['forward_first'])} ({', '.join(launches['forward_first'])}); forward with the schedule "
          f"cached {len(launches['forward_cached'])}; backward {len(launches['backward'])} "
          f"({', '.join(launches['backward'])})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"cost-{args.target}.jsonl")
        with open(path, "w") as f:
            for r in rows + preds + [launches]:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        print(f"\n{len(rows)} loop rows and {len(preds)} predictions written to {path}")
    return 0


def _short(config: str) -> str:
    return (config.replace(",ORDER=1,UNIT=64,QUERY_ORDER=auto", "").replace(",ORDER=1,UNIT=64,QUERY_ORDER=grouped", "")
            .replace("BLOCK_M=", "BM=").replace("BLOCK_N=", "BN="))


def format_table(rows: Sequence[dict], preds: Sequence[dict]) -> str:
    lines = ["kernel                            config               variant            loop          "
             "instr   int  float  mufu  gmma  wait  regs  blk/SM"]
    for r in rows:
        if r.get("loop") is None:
            lines.append(f"{r['kernel']:<33} {_short(r['config']):<20} ERROR {r.get('error')}")
            continue
        var = ",".join(f"{k}={int(v)}" for k, v in r["launch_variant"].items() if k == "PREFIX_Q") or "-"
        var += "" if r.get("shipped", True) else " (cand.)"
        c = r["by_class"]
        lines.append(f"{r['kernel']:<33} {_short(r['config']):<20} {var:<18} {r['loop']:<12} {r['instructions']:>6} "
                     f"{c['integer']:>5} {c['float']:>6} {c['mufu']:>5} {c['hgmma'] + c['hmma']:>5} "
                     f"{str(r['async_wait']):>5} {str(r['registers']):>5} {r['blocks_per_sm']:>7}")
    winft = [p for p in preds if p.get("op") == "winft_attention"]
    preds = [p for p in preds if p.get("op") != "winft_attention"]
    if preds:
        lines += ["", "predicted time / dense reference (static; sm_90a model, docs/cost_model.md)",
                  "mode     N      density  order    config               visited  ratio  (dense config)"]
        for p in preds:
            note = "" if p["shipped"] else "  not shipped"
            if p.get("bound"):
                note = (f"  host search {p['host_grouping_ms_per_image']:.1f} ms/image included; kernels and "
                        f"device build only: {p['kernels_only_ratio_vs_dense']:.2f}")
            lines.append(f"{p['mode']:<8} {p['n']:<6} {p['density']:<8} {p.get('query_order', 'auto'):<8} "
                         f"{_short(p['config'])[:40]:<20} {p['visited_fraction']:.3f}    "
                         f"{p['predicted_ratio_vs_dense']:.2f}   ({p['dense_config']}){note}")
    if winft:
        lines += ["", "WinfT (multiply mode, window target, the BCE loss), predicted time / dense reference (static)",
                  "mode     N      ratio   compulsory GB  (dense attention's, gate and loss)   largest terms"]
        for p in (p for p in winft if p["row"] == "prediction"):
            b = p["bytes"]
            top = sorted(((v, k) for k, v in p["terms"].items()), reverse=True)[:3]
            lines.append(f"{p['mode']:<8} {p['n']:<6} {p['predicted_ratio_vs_dense']:.2f}    {b['compulsory'] / 1e9:.3f}"
                         f"          ({b['dense_attention'] / 1e9:.3f}, {b['gate_and_loss'] / 1e9:.3f})"
                         f"                   " + ", ".join(f"{k} {v / p['dense_cycles_per_sm']:.2f}" for v, k in top))
        for p in (p for p in winft if p["row"] == "unit_choice"):
            cyc = ", ".join(f"{_short(k)} {v / 1e3:.0f}k" for k, v in sorted(p["cycles_per_sm"].items(), key=lambda kv: kv[1]))
            lines.append(f"unit {p['unit']:<11} N = {p['n']}: cycles per SM by candidate: {cyc}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
