"""``python -m bench.compile``: compile every shipped kernel configuration for a GPU, without one.

    python -m bench.compile                                   # sm_90a and sm_80, the whole matrix
    python -m bench.compile --target sm_90a --dtype bfloat16 --head-dim 64 --units winft_fwd
    python -m bench.compile --out bench/results               # writes compile-<target>.jsonl there

For each target, unit of the launch policy (``kernels/_launch.py``), shipped configuration,
dtype (float16, bfloat16, float32 at PyTorch's default matmul precision, i.e. three-pass TF32)
and head width (32, 64, 96, 128; the channel count for the PaCa pooling kernels), the real
launchers run on ``meta`` tensors while :func:`vitpatch.kernels._launch.recording` collects the
launches they would make, exactly as they would make them (arguments, constexprs, warps,
stages). Each distinct launch is then compiled with Triton's own toolchain for an explicit
``GPUTarget`` (no GPU and no driver needed), and one JSON row per (configuration, launch)
records the kernel, registers, spill bytes (ptxas), shared memory, whether the tensor-core
instruction is in the PTX (``wgmma`` on sm_90a, ``mma.sync`` on sm_80), the tensor-core
instructions in the SASS (``hgmma``, ``hmma``, and ``main_loop_hmma``: the ``mma.sync`` in the
kernel's main loops), compile seconds and the triton version. A table is printed (``tc``:
HGMMA / HMMA); :func:`violations` states the budgets that ``tests/test_compile_gate.py`` enforces:

* every launch compiles;
* shared memory within the target's per-block limit (227 KB sm_90a, 163 KB sm_80);
* 0 spill bytes, every dtype;
* ``wgmma`` on sm_90a in the dot kernels whose row tile is at least 64 (what one warpgroup
  instruction needs), for float16 and bfloat16, and no ``mma.sync`` (HMMA) in their main loops:
  every product of the loop on the warpgroup path.

Compiles run in ``--jobs`` worker processes (default: every core), with Triton's cache off so
that every compile reports its own ptxas figures.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import functools
import io
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

TARGETS = {"sm_90a": ("cuda", 90, 32), "sm_80": ("cuda", 80, 32)}
SMEM_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}
TC_INSTRUCTION = {"sm_90a": "wgmma", "sm_80": "mma.sync"}
DTYPES = ("float16", "bfloat16", "float32", "tf32")  # float32: three-pass TF32; tf32: one-pass
HEAD_DIMS = (32, 64, 96, 128)
HALF = ("float16", "bfloat16")

# Dot kernels and the constexpr that is their first GEMM's row count: with at least 64 rows a
# warpgroup MMA (wgmma) is possible on sm_90a, and the gate expects it for half precision.
DOT_ROWS = {
    "window_attention._fwd_kernel": "BLOCK_M",
    "window_attention._bwd_dq_kernel": "BLOCK_M",
    "window_attention._bwd_dkdv_kernel": "BLOCK_M",
    "winft_attention._threshold_kernel": "BLOCK_M",
    "winft_attention._gate_bits_kernel": "BLOCK_M",
    "winft_attention._attn_fwd_kernel": "BLOCK_M",
    "winft_attention._attn_dq_kernel": "BLOCK_M",
    "winft_attention._attn_dkdv_kernel": "BLOCK_N",
    "cluster_attention._pool_fwd_kernel": "BLOCK_M",
    "cluster_attention._pool_bwd_dlogits_kernel": "BLOCK_N",
    "cluster_attention._pool_bwd_dx_kernel": "BLOCK_N",
    "cluster_attention._attn_fwd_kernel": "BLOCK_M",
    "cluster_attention._attn_bwd_kernel": "BLOCK_M",
}


# ================================================================================ the launchers' calls
def _meta(*shape, dtype="float32"):
    import torch
    return torch.empty(shape, dtype=getattr(torch, "float32" if dtype == "tf32" else dtype), device="meta")


def _window(unit: str, dtype: str, d: int, variant: str) -> None:
    """The window launchers at N = 577 (24 x 24 + 1), per-image windows, with or without key_keep."""
    import torch

    from vitpatch.kernels import _launch, window_attention as wa
    from vitpatch.kernels.window import Config
    B, H, grid, P = 2, 3, (24, 24), 1
    N = P + grid[0] * grid[1]
    q, k, v = (_meta(B, H, N, d, dtype=dtype) for _ in range(3))
    windows = _meta(B, grid[0] * grid[1], 4, dtype="int32")
    keep = _meta(B, N, dtype="bool") if variant == "keep" else None
    cfg = Config.of(_launch.forced(unit))
    if unit == "window_fwd":
        wa._forward(q, k, v, windows, keep, grid, P, 0.125, cfg)
    else:
        out, lse = torch.empty_like(q), _meta(B, H, N)
        wa._backward(torch.empty_like(q), q, k, v, out, lse, windows, keep, grid, P, 0.125, cfg)


def _winft(unit: str, dtype: str, d: int, variant: str) -> None:
    """The WinfT launchers at N = 197 with a window target (keep mask) in the given mode."""
    from vitpatch.kernels import winft_attention as wt
    B, H, N, P, gw = 2, 3, 197, 1, 14
    q, k, v = (_meta(B, H, N, d, dtype=dtype) for _ in range(3))
    windows, keep = _meta(B, N - P, 4, dtype="int32"), _meta(B, N, dtype="bool")
    out, _loss, _gs, lse, bits, dg = wt._forward(q, k, v, windows, keep, 0.125, variant, P, gw, True)
    # and the backward: delta (fwd's rows), dq, dkdv with the forward's sigmoid(g) - T folded in
    wt._backward(_meta(B, H, N, d, dtype=dtype), _meta(), q, k, v, out, lse, bits, dg, windows, keep, 0.125,
                 variant, P, gw)


def _paca(unit: str, dtype: str, d: int, variant: str) -> None:
    """The PaCa launchers: ``d`` is the channel count of the pooling and the head width of the attention;
    the variant is the number of clusters M (49: the paper's ImageNet models, 100: the released ones).
    The pooling reads logits rows padded to 16 elements, as :func:`vitpatch.nn.cluster_logits` writes
    them on a GPU, or, in the ``-unpadded`` variant, a contiguous ``(B, n, M)`` tensor from elsewhere."""
    from vitpatch.kernels import cluster_attention as ca
    from vitpatch.nn import cluster_logits
    M = int(variant[1:].split("-")[0])
    B, n, H, N = 2, 3136, 2, 3137
    if unit.startswith("paca_pool"):
        if variant.endswith("-unpadded"):
            logits = _meta(B, n, M, dtype=dtype)
        else:  # the layout itself, from the op that writes it (its meta kernels run nothing)
            logits = cluster_logits(_meta(B, n, 16, dtype=dtype), _meta(M, 16, dtype=dtype))
        x = _meta(B, n, d, dtype=dtype)
        if unit == "paca_pool_fwd":
            ca._pool_forward(logits, x)
        else:
            ca._pool_backward(_meta(B, M, d, dtype=dtype), logits, x, _meta(B, M, d, dtype=dtype), _meta(2, B, M))
    else:
        q, k, v = _meta(B, H, N, d, dtype=dtype), _meta(B, H, M, d, dtype=dtype), _meta(B, H, M, d, dtype=dtype)
        if unit == "paca_attn_fwd":
            ca._attn_forward(q, k, v, 0.125)
        else:
            ca._attn_backward(_meta(B, H, N, d, dtype=dtype), q, k, v, 0.125)


def _paca_fits(unit: str, cfg, d: int, variant: str) -> Optional[str]:
    """Why the PaCa attention's run-time pruning never launches ``cfg`` for this shape, or None."""
    if not unit.startswith("paca_attn"):
        return None
    from vitpatch.kernels import cluster_attention as ca
    bn, bd, fits = ca._attn_tiles(int(variant[1:]), d)  # the launcher's own filter
    if fits(cfg):
        return None
    return f"pruned at run time: BLOCK_M {cfg['BLOCK_M']} x {max(bn, bd)} exceeds the register tile bound"


DRIVERS = {"window": (_window, ("plain", "keep")), "winft": (_winft, ("multiply", "mask")),
           "paca": (_paca, ("M49", "M100"))}
# units that compile more layouts than their family's variants
UNIT_VARIANTS = {unit: ("M49", "M100", "M49-unpadded")
                 for unit in ("paca_pool_fwd", "paca_pool_dlogits", "paca_pool_dx")}


def _driver(unit: str):
    fn, variants = DRIVERS[unit.split("_")[0]]
    return fn, UNIT_VARIANTS.get(unit, variants)


def _belongs(launch, unit: str) -> bool:
    from vitpatch.kernels import _launch
    return launch.kernel.__name__ in _launch.UNIT_KERNELS[unit]


# ================================================================================ jobs
@dataclass(frozen=True)
class Job:
    """One configuration of one unit at one dtype, head width and variant: the launches it makes."""

    unit: str
    index: int  # into _launch.candidates(unit)
    dtype: str
    head_dim: int
    variant: str


def record(job: Job, target: str = "sm_90a"):
    """The launches the launchers make for ``job`` on ``target`` (nothing runs)."""
    from vitpatch.kernels import _launch
    import torch
    cfg = _launch.candidates(job.unit)[job.index]
    fn, _ = _driver(job.unit)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if job.dtype == "tf32" else "highest")
    try:
        with _launch.forcing({job.unit: cfg}), _launch.recording(target) as launches:
            fn(job.unit, job.dtype, job.head_dim, job.variant)
    finally:
        torch.set_float32_matmul_precision(before)
    return [launch for launch in launches if _belongs(launch, job.unit)]


def jobs(units: Optional[Sequence[str]] = None, dtypes: Sequence[str] = DTYPES,
         head_dims: Sequence[int] = HEAD_DIMS, variants: Optional[Sequence[str]] = None,
         first_only: bool = False) -> List[Tuple[Job, Optional[str]]]:
    """Every (job, skip reason) of the matrix: each candidate at each dtype and width it is meant for."""
    from vitpatch.kernels import _launch
    out = []
    for unit in units or list(_launch.CANDIDATES):
        _, unit_variants = _driver(unit)
        for dtype in dtypes:
            for d in head_dims:
                for variant in (variants or unit_variants):
                    if variant not in unit_variants:
                        continue
                    tried = [(i, c) for i, c in enumerate(_launch.candidates(unit)) if c.ships(dtype, d)]
                    for i, c in tried[:1] if first_only else tried:
                        out.append((Job(unit, i, dtype, d, variant), _paca_fits(unit, c, d, variant)))
    return out


# ================================================================================ compiling
@functools.lru_cache(maxsize=None)
def _backend(target: str):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    return make_backend(GPUTarget(*TARGETS[target]))


def _bind(launch, backend):
    """Triton's own specialisation of the recorded arguments: ``(fn, signature, constexprs, attrs, options)``."""
    from triton.runtime.jit import create_function_from_signature
    fn = launch.kernel.jit
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return fn, signature, constexprs, attrs, options


def launch_key(launch, target: str) -> str:
    """What makes two launches compile to the same binary."""
    fn, signature, constexprs, attrs, options = _bind(launch, _backend(target))
    return repr((fn.fn.__module__, fn.__name__, sorted(signature.items()), sorted(constexprs.items()),
                 sorted(attrs.items()), options.num_warps, options.num_stages))


def _constexpr_values(fn, constexprs) -> Dict[str, object]:
    return {fn.arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}


def compile_binary(launch, target: str):
    """Compile one recorded launch for ``target``: ``(compiled or None, ptxas log, seconds, error or None)``."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource
    backend = _backend(target)
    fn, signature, constexprs, attrs, options = _bind(launch, backend)
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0 = time.perf_counter()
    error = None
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=backend.target,
                                      options=options.__dict__)
    except Exception as exc:  # a configuration that does not compile is a row, not a crash
        compiled, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return compiled, log.getvalue(), time.perf_counter() - t0, error


def ptxas_registers(log: str) -> Optional[int]:
    """Registers per thread from ptxas' verbose log, or ``None`` (no log: e.g. a cached kernel)."""
    regs = re.search(r"Used (\d+) registers", log)
    return int(regs.group(1)) if regs else None


def tensor_core_counts(compiled, launch) -> Dict[str, int]:
    """Tensor-core instructions in the kernel's SASS: ``hgmma`` (warpgroup MMA, sm_90a), ``hmma``
    (``mma.sync``), and ``main_loop_hmma``, the ``hmma`` inside its main loops (the loops tagged
    ``# cost: <kind>`` other than the ``prefix`` ones, whose narrow prefix blocks cannot use a
    warpgroup MMA; ``bench.cost`` reads the same tags)."""
    from . import cost  # cost imports this module: import it when used
    sass = cost.disassemble(compiled.asm["cubin"])
    ops = [m.group(2) for m in map(cost._INSTR.search, sass.splitlines()) if m]
    tags = cost.tagged_loops(launch.kernel.fn)
    main = set()
    for loop in cost.sass_loops(sass):
        kind = cost.classify(loop, tags)
        if kind is not None and not kind.startswith("prefix"):
            main.update(range(loop.start, loop.end + 1))
    return {"hgmma": ops.count("HGMMA"), "hmma": ops.count("HMMA"),
            "main_loop_hmma": sum(1 for i in main if ops[i] == "HMMA")}


def compile_launch(launch, target: str) -> dict:
    """Compile one recorded launch for ``target``; registers, spills, shared memory, tensor cores
    (whether the target's instruction is in the PTX, and the SASS counts of :func:`tensor_core_counts`)."""
    compiled, text, seconds, error = compile_binary(launch, target)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    ptx = compiled.asm["ptx"] if compiled is not None else ""
    counts = tensor_core_counts(compiled, launch) if compiled is not None else \
        dict.fromkeys(("hgmma", "hmma", "main_loop_hmma"))
    return {
        "registers": ptxas_registers(text),
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
        "shared_bytes": int(compiled.metadata.shared) if compiled is not None else None,
        "tensor_cores": (TC_INSTRUCTION[target] in ptx) if compiled is not None else None,
        **counts,
        "compile_s": round(seconds, 2),
        "error": error,
    }


def _work(args) -> Tuple[str, dict]:
    from triton import knobs
    knobs.compilation.always_compile = True
    job, i, target, key = args
    return key, compile_launch(record(job, target)[i], target)


def _row(job: Job, launch, target: str, result: dict, skipped: Optional[str]) -> dict:
    import triton

    from vitpatch.kernels import _launch
    cfg = _launch.candidates(job.unit)[job.index]
    name = f"{launch.kernel.fn.__module__.rsplit('.', 1)[-1]}.{launch.kernel.__name__}" if launch else None
    consts = _constexpr_values(launch.kernel.jit, _bind(launch, _backend(target))[2]) if launch else {}
    rows_name = DOT_ROWS.get(name)
    tc_expected = bool(rows_name) and int(consts.get(rows_name, 0)) >= 64
    variant = {k: consts[k] for k in ("PREFIX_Q", "PREFIX_K", "A_IS_QUERY", "HAS_TARGET", "SINGLE") if k in consts}
    return {"kernel": name, "unit": job.unit, "configuration": cfg.label, "dtype": job.dtype,
            "head_dim": job.head_dim, "variant": job.variant, "launch_variant": variant, "target": target,
            **result, "tc_expected": tc_expected, "shared_limit": SMEM_LIMIT[target], "skipped": skipped,
            "triton": triton.__version__}


def run(targets: Sequence[str], matrix: List[Tuple[Job, Optional[str]]], jobs_n: int = 0,
        progress: bool = True) -> List[dict]:
    """Compile the matrix for every target: one row per (job, launch) (compiles shared by equal launches)."""
    from triton import knobs
    knobs.compilation.always_compile = True  # every compile reports its own ptxas figures
    rows: List[dict] = []
    for target in targets:
        plan, work = [], {}
        for job, skipped in matrix:
            if skipped:
                plan.append((job, None, None, skipped))
                continue
            for i, launch in enumerate(record(job, target)):
                key = launch_key(launch, target)
                plan.append((job, launch, key, None))
                work.setdefault(key, (job, i, target, key))
        results: Dict[str, dict] = {}
        n = jobs_n or os.cpu_count() or 1
        done = 0
        t0 = time.perf_counter()
        if n == 1:
            iterator = (_work(w) for w in work.values())
        else:
            pool = cf.ProcessPoolExecutor(n)
            iterator = (f.result() for f in cf.as_completed([pool.submit(_work, w) for w in work.values()]))
        for key, result in iterator:
            results[key] = result
            done += 1
            if progress and (done % 10 == 0 or done == len(work)):
                print(f"\r{target}: {done}/{len(work)} compiles, {time.perf_counter() - t0:.0f} s", end="",
                      file=sys.stderr, flush=True)
        if n != 1:
            pool.shutdown()
        if progress:
            print(file=sys.stderr)
        for job, launch, key, skipped in plan:
            rows.append(_row(job, launch, target, results.get(key, {}), skipped))
    return rows


# ================================================================================ budgets and report
def _case(r: dict) -> tuple:
    """What one entry of the shipped table covers: candidate, target, precision label, width bucket."""
    from vitpatch.kernels import _launch
    return r["unit"], r["configuration"], r["target"], r["dtype"], _launch.width_bucket(r["head_dim"])


def mark_shipped(rows: List[dict]) -> List[dict]:
    """Set each row's ``shipped``: its case compiled within every budget in every row (variants, kernels)
    and its configuration is still a candidate of the unit. On sm_90a in half precision a clean
    candidate whose dot kernels run ``mma.sync`` (HMMA) in a main loop ships only where no clean
    candidate of the same unit, precision and width bucket keeps every main loop on ``wgmma``."""
    from vitpatch.kernels import _launch
    labels = {u: {c.label for c in cs} for u, cs in _launch.CANDIDATES.items()}
    clean: Dict[tuple, bool] = {}
    mma_sync: Dict[tuple, bool] = {}
    for r in rows:
        if not r["skipped"]:
            current = r["configuration"] in labels.get(r["unit"], ())
            clean[_case(r)] = clean.get(_case(r), current) and not _row_violations(r)
            mma_sync[_case(r)] = mma_sync.get(_case(r), False) or (r["kernel"] in DOT_ROWS
                                                                    and bool(r.get("main_loop_hmma")))
    def group(case: tuple) -> tuple:  # the case without its configuration: unit, target, label, bucket
        return case[:1] + case[2:]

    on_wgmma = {group(case) for case, ok in clean.items() if ok and not mma_sync[case]}
    for case, ok in clean.items():
        if ok and mma_sync[case] and case[2] == "sm_90a" and case[3] in HALF and group(case) in on_wgmma:
            clean[case] = False
    for r in rows:
        r["shipped"] = bool(not r["skipped"] and clean.get(_case(r)))
    return rows


def policy_table(rows: List[dict]) -> Dict[str, dict]:
    """``{unit: {configuration: {target: {label: (width buckets...)}}}}`` of the shipped cases."""
    table: Dict[str, dict] = {}
    for r in mark_shipped(rows):
        if r["shipped"]:
            unit, cfg, target, label, bucket = _case(r)
            entry = table.setdefault(unit, {}).setdefault(cfg, {}).setdefault(target, {}).setdefault(label, set())
            entry.add(bucket)
    return {u: {c: {t: {lab: tuple(sorted(b)) for lab, b in sorted(ls.items())} for t, ls in sorted(ts.items())}
                for c, ts in cs.items()} for u, cs in table.items()}


def write_policy(rows: List[dict], path: str) -> None:
    """Write ``kernels/_shipped.py``: the table :func:`vitpatch.kernels._launch.shipped` reads."""
    import pprint

    import triton
    text = ('"""What ships: the compile gate\'s clean cases per unit, candidate, target, precision label and\n'
            'head-width bucket. Written by ``python -m bench.compile --write-policy`` (triton '
            f'{triton.__version__}, {time.strftime("%Y-%m-%d")}); do not edit by hand."""\n\n'
            f"SHIPPED = {pprint.pformat(policy_table(rows), width=110, sort_dicts=True)}\n")
    with open(path, "w") as f:
        f.write(text)


def _row_violations(r: dict) -> List[str]:
    where = (f"{r['kernel']} [{r['configuration']}] {r['dtype']} d={r['head_dim']} {r['variant']} "
             f"{r['launch_variant'] or ''} on {r['target']}")
    if r["error"]:
        return [f"{where}: does not compile ({r['error']})"]
    bad = []
    if r["spill_stores"] or r["spill_loads"]:
        bad.append(f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads")
    if r["shared_bytes"] is not None and r["shared_bytes"] > r["shared_limit"]:
        bad.append(f"{where}: {r['shared_bytes']} B shared memory > {r['shared_limit']}")
    if r["target"] == "sm_90a" and r["dtype"] in HALF and r["tc_expected"]:
        if not r["tensor_cores"]:
            bad.append(f"{where}: no wgmma")
        elif r.get("main_loop_hmma"):  # reports from before the counts have no such key
            bad.append(f"{where}: {r['main_loop_hmma']} HMMA (mma.sync) in its main loops: a product off wgmma")
    return bad


def violations(rows: Iterable[dict], shipped_only: bool = False) -> List[str]:
    """The budget each row breaks, as sentences (empty: every budget holds); with ``shipped_only``,
    only rows of cases that kernels/_shipped.py ships."""
    from vitpatch.kernels._shipped import SHIPPED
    bad = []
    for r in rows:
        if r["skipped"]:
            continue
        if shipped_only:
            unit, cfg, target, label, bucket = _case(r)
            if bucket not in SHIPPED.get(unit, {}).get(cfg, {}).get(target, {}).get(label, ()):
                continue
        bad.extend(_row_violations(r))
    return bad


def table(rows: List[dict]) -> str:
    """One line per compiled kernel, grouped by target and unit."""
    head = f"{'target':7} {'kernel':44} {'configuration':58} {'dtype':8} {'d':>3} {'var':8} {'regs':>4} " \
           f"{'spill':>5} {'smem':>7} {'tc':>5} {'s':>5} ship"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["skipped"]:
            lines.append(f"{r['target']:7} {r['unit']:44} {r['configuration']:58} {r['dtype']:8} {r['head_dim']:>3} "
                         f"{r['variant']:8} skipped: {r['skipped']}")
            continue
        kern = r["kernel"] + "".join(f" {k}={int(v)}" for k, v in r["launch_variant"].items())
        tc = "-" if r["tensor_cores"] is None else ("yes" if r["tensor_cores"] else "no")
        if r.get("hgmma") is not None:  # SASS counts: HGMMA / HMMA (mma.sync)
            tc = f"{r['hgmma']}/{r['hmma']}"
        lines.append(f"{r['target']:7} {kern[:44]:44} {r['configuration'][:58]:58} {r['dtype']:8} {r['head_dim']:>3} "
                     f"{r['variant']:8} {str(r['registers']):>4} {str(r['spill_stores']):>5} "
                     f"{str(r['shared_bytes']):>7} {tc:>5} {r['compile_s']:>5} "
                     f"{'yes' if r.get('shipped') else 'no':>4}" + (f"  ERROR {r['error']}"
                                                                                     if r["error"] else ""))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--units", nargs="+", default=None, help="policy units (default: all of kernels/_launch.CANDIDATES)")
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--head-dim", nargs="+", type=int, default=list(HEAD_DIMS))
    p.add_argument("--variants", nargs="+", default=None, help="e.g. keep, mask, M100 (default: all of each unit)")
    p.add_argument("--first-only", action="store_true", help="only the first shipped configuration per case")
    p.add_argument("--jobs", type=int, default=0, help="worker processes (default: every core)")
    p.add_argument("--out", default=None, help="directory for compile-<target>.jsonl (rewritten) and the table")
    p.add_argument("--quiet", action="store_true", help="no table, no progress")
    p.add_argument("--write-policy", default=None, metavar="PATH",
                   help="write the shipped table (kernels/_shipped.py) from this run's clean cases")
    p.add_argument("--shipped-only", action="store_true",
                   help="budget violations of the cases kernels/_shipped.py ships only (exit status)")
    p.add_argument("--merge", action="store_true",
                   help="with --out: this run's rows replace only the rows of the same units and targets in the "
                        "reports already there (every other row stays); --write-policy then reads the merged "
                        "reports of every target")
    args = p.parse_args(argv)
    if args.merge and not args.out:
        p.error("--merge needs --out")
    matrix = jobs(args.units, args.dtype, args.head_dim, args.variants, args.first_only)
    stamp = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpu_only": True}
    rows = mark_shipped([{**r, **stamp} for r in run(args.target, matrix, args.jobs, progress=not args.quiet)])
    reports = {t: [r for r in rows if r["target"] == t] for t in args.target}
    if args.merge:
        reports = merged_reports(args.out, rows)
        mark_shipped([r for t in reports.values() for r in t])
    if args.write_policy:
        write_policy([r for t in reports.values() for r in t], args.write_policy)
    text = table(rows)
    bad = violations(rows, shipped_only=args.shipped_only)
    if not args.quiet:
        print(text)
        print(f"\n{len(rows)} rows, {sum(r['shipped'] for r in rows)} of shipped cases, {len(bad)} budget violations"
              + (" in shipped cases" if args.shipped_only else ""))
        for b in bad:
            print("  " + b)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for target, target_rows in reports.items():
            with open(os.path.join(args.out, f"compile-{target}.jsonl"), "w") as f:
                for r in target_rows:
                    f.write(json.dumps(r, separators=(",", ":")) + "\n")
    return 1 if bad else 0


def merged_reports(out_dir: str, rows: List[dict]) -> Dict[str, List[dict]]:
    """Every target's report in ``out_dir`` with the rows of ``rows``' (unit, target) pairs replaced
    by ``rows`` (a unit's rows stay in the report's order of units; a new unit goes last)."""
    out = {}
    for target in TARGETS:
        path = os.path.join(out_dir, f"compile-{target}.jsonl")
        old = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
        new = [r for r in rows if r["target"] == target]
        units = {r["unit"] for r in new}
        merged, placed = [], set()
        for r in old:
            if r["unit"] not in units:
                merged.append(r)
            elif r["unit"] not in placed:
                placed.add(r["unit"])
                merged.extend(n for n in new if n["unit"] == r["unit"])
        merged.extend(n for n in new if n["unit"] not in placed)
        out[target] = merged
    return out


if __name__ == "__main__":
    sys.exit(main())
