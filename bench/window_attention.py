"""Window-masked attention (AWD-ViT, docs/math.md §1) against its anchors.

Impls (row ``impl``):
  ``vitpatch``    :func:`vitpatch.functional.window_attention` (the row's ``backend`` says which ran)
  ``reference``   :func:`vitpatch.reference.window_attention` (dense mask, ``(B, h, N, N)`` logits)
  ``sdpa_dense``  ``F.scaled_dot_product_attention`` with no mask: full attention, the speed to beat
  ``sdpa_flash``  the same with the flash backend forced (CUDA only)
  ``sdpa_cudnn``  the same with cuDNN's attention forced (CUDA only)
  ``sdpa_mask``   SDPA with the boolean mask from :meth:`WindowMask.dense` (built outside the timing)
  ``flex``        ``torch.compile``-d FlexAttention with a block mask from the windows (built outside)
  ``flex_build``  building that block mask alone (``create_block_mask``)
  ``flex+build``  building the block mask and running FlexAttention: AWD windows change every
                  batch, so this is what a model pays per batch

Windows: square radii from self-only (``r0``) to ``full``, and AWD-like windows
(:func:`vitpatch.masks.synthetic_awd_windows` at density 0.23; quick runs add N = 577 and
N = 4097 at densities 0.05 and 0.23). Shared (square) windows use a batch-1 mask (SDPA and Flex
broadcast it); AWD windows are per image. One prefix token (CLS). ``vitpatch`` rows carry the
kernel schedule's visited-tile fraction (``visited_tile_fraction``, from :mod:`vitpatch.tiles`,
under Triton's interpreter on CPU) and, on the PyTorch path, the CPU plan (``extra.cpu_plan``,
``cpu_pair_fraction``: the share of the ``B h N^2`` pairs the plan computes); on CUDA also the
schedule's build time alone (``extra.schedule_build_ms``, not part of ``median_ms`` once cached).
Every timed row carries ``tflops_dense`` (the dense problem's matmul FLOP over the time) and
``tflops_visited`` (the FLOP of the pairs the impl computes: the visited tiles for ``vitpatch``,
the non-empty blocks for Flex, everything for SDPA and the reference).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Dict, List, Optional, Tuple

from .common import SDPA_BACKENDS, attention_flop, attention_inputs, autograd_case, max_abs_err, sdpa_dense_case
from .harness import Case, Config, Prepared, Unsupported

OP = "window_attention"
MODULE = "bench.window_attention"
AWD_DENSITY = 0.23
LOW_DENSITIES = (0.05,)
PREFIX = 1
WINDOWED_IMPLS = ("vitpatch", "reference", "sdpa_mask", "flex")


def problem_sizes(cfg: Config) -> List[Tuple[int, int, int, int]]:
    """``(B, h, grid side, d)`` per sequence length ``N = 1 + side^2``."""
    if cfg.quick:  # N = 65, 197; then the issue-13 sizes N = 577 (ViT-B/16 at 384) and N = 4097
        return [(2, 4, 8, 32), (2, 4, 14, 32), (2, 6, 24, 64), (1, 4, 64, 32)]
    return [(64, 12, 14, 64), (16, 12, 24, 64), (8, 12, 32, 64), (2, 12, 64, 64)]  # N = 197, 577, 1025, 4097


def window_kinds(side: int, quick: bool) -> List[str]:
    """Square radii from self-only to full, then AWD-like windows.

    Quick runs at ``side >= 24`` use AWD-like windows only, at densities 0.05 and 0.23
    (:func:`vitpatch.masks.synthetic_awd_windows` bisects its partner scale to the density, so
    no special window sizes are needed: at 64 x 64, density 0.05 is a mean window of ~205 patches).
    """
    if quick and side >= 24:
        return [f"awd{x:g}" for x in LOW_DENSITIES] + [f"awd{AWD_DENSITY:g}"]
    radii = [0, 2] if quick else [r for r in (0, 1, 2, 4, 8, 16, 32) if r < side - 1]
    return [f"r{r}" for r in radii] + ["full", f"awd{AWD_DENSITY:g}"]


def cases(cfg: Config) -> List[Case]:
    out = []

    def add(impl, mode, shape):
        out.append(Case(MODULE, OP, impl, mode, shape, cfg.device, cfg.dtype))

    for B, h, side, d in problem_sizes(cfg):
        base = {"B": B, "h": h, "N": PREFIX + side * side, "d": d}
        for mode in ("fwd", "bwd", "fwd+bwd"):
            add("sdpa_dense", mode, dict(base))
            if cfg.device == "cuda":
                for anchor in SDPA_BACKENDS:
                    add(anchor, mode, dict(base))
        for kind in window_kinds(side, cfg.quick):
            shape = {**base, "grid": [side, side], "P": PREFIX, "window": kind}
            big = cfg.quick and side >= 24
            # quick: Flex on the small AWD windows only; no eager reference at N = 4097 ((B, h, N, N) logits)
            with_flex = not cfg.quick or (kind.startswith("awd") and not big)
            for impl in WINDOWED_IMPLS:
                if impl == "flex" and not with_flex:
                    continue
                if impl == "reference" and cfg.quick and side > 32:
                    continue
                for mode in ("fwd", "bwd", "fwd+bwd"):
                    add(impl, mode, shape)
            if with_flex:
                add("flex_build", "fwd", shape)
                add("flex+build", "fwd", shape)
                add("flex+build", "fwd+bwd", shape)
    return out


def timing_group(case: Case):
    """Cases timed together on CPU (:func:`bench.harness.time_cpu_interleaved`): every impl and
    window of one problem size and mode, so the ratios to ``sdpa_mask`` and ``sdpa_dense`` come
    from calls made in the same rounds."""
    s = case.shape
    return (case.op, case.mode, case.dtype, s["B"], s["h"], s["N"], s["d"])


# ------------------------------------------------------------------------------------ masks
@functools.lru_cache(maxsize=8)
def _awd_windows(side: int, batch: int, density: float):
    from vitpatch.masks import synthetic_awd_windows
    return synthetic_awd_windows((side, side), batch, density, seed=0)


def make_mask(shape: Dict[str, Any], device):
    """The :class:`vitpatch.WindowMask` of a case: shared square windows or per-image AWD windows."""
    from vitpatch import WindowMask
    side, kind, P = shape["grid"][0], shape["window"], shape["P"]
    if kind == "full":
        mask = WindowMask.full((side, side), P)
    elif kind.startswith("r"):
        mask = WindowMask.square((side, side), int(kind[1:]), P)
    elif kind.startswith("awd"):
        mask = WindowMask(_awd_windows(side, shape["B"], float(kind[3:])), (side, side), P)
    else:
        raise ValueError(f"unknown window kind {kind!r}")
    return mask.to(device)


_VISITED: Dict[tuple, Tuple[Optional[float], Optional[str]]] = {}


def visited_tile_fraction(mask, batch: int, key: Optional[tuple] = None) -> Tuple[Optional[float], Optional[str]]:
    """Fraction of (query tile, key tile) pairs the Triton kernel visits for ``mask``, or ``None``.

    :func:`vitpatch.tiles.visited_fraction` with the shipped tile shape: on CUDA masks from the
    schedule launch on the GPU, on CPU masks in Triton's interpreter (so CPU rows carry it too).
    With ``key`` (what identifies the windows, e.g. the case's shape) the result is cached within
    the process: the interpreter is slow at ``n = 4096`` and three modes share one mask.
    Returns ``(fraction, note)``; the note says why the fraction is missing.
    """
    try:
        from vitpatch import tiles
    except ImportError as e:
        return None, f"vitpatch.tiles is not importable: {e}"[:200]
    if key is None or key not in _VISITED:
        try:
            result = float(tiles.visited_fraction(mask, batch)), None
        except Exception as e:  # noqa: BLE001 - a failing helper must not lose the timing row
            result = None, f"visited_fraction failed: {type(e).__name__}: {e}"[:200]
        if key is None:
            return result
        _VISITED[key] = result
    return _VISITED[key]


def cpu_plan_info(mask, q) -> Dict[str, Any]:
    """What the PyTorch path's plan (vitpatch.chunked) does for this case: kind, group size,
    packs, the fraction of the ``B h N^2`` pairs it computes, and its cost estimates (ms)."""
    from vitpatch import chunked
    plan = chunked.window_plan(mask, q)
    B, h, N, _ = q.shape
    heads = h if plan.per_image else B * h
    pairs = B * h * N * N if plan.kind == "dense" else sum(p.Bt * p.G * p.K for p in plan.packs) * heads
    return {"cpu_plan": plan.kind + (str(plan.group_size) if plan.group_size else ""),
            "cpu_packs": len(plan.packs), "cpu_pair_fraction": pairs / (B * h * N * N),
            "cpu_estimates_ms": {k: round(v / 1e6, 4) for k, v in plan.estimates.items()},
            "cpu_footprint_kb": {k: round(v / 1024, 1) for k, v in plan.footprint.items()}}


def schedule_build_ms(mask, q, repeats: int = 5) -> float:
    """Median CUDA time of building the window kernels' tile schedule for ``mask`` once, with the
    forward's first shipped configuration (what a model pays when its windows change)."""
    import torch
    from vitpatch.kernels import _launch
    from vitpatch.kernels import window as ws
    cfg = ws.Config.of(_launch.configs("window_fwd", q.dtype, q.shape[-1])[0])
    windows = mask.windows.to(q.device)
    keep = None if mask.key_keep is None else mask.key_keep.to(q.device)
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        ws.build_schedule(windows, keep, tuple(mask.grid), mask.num_prefix_tokens, q.shape[0], cfg)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(sorted(times[1:])[repeats // 2])  # the first call compiles


# ------------------------------------------------------------------------------------ flex
_FLEX: Dict[str, Any] = {}


def _flex_attention():
    """``(compiled flex_attention, how it runs)``, compiled once per process."""
    if "fn" not in _FLEX:
        import torch
        import torch._dynamo.config as dcfg
        from torch.nn.attention.flex_attention import flex_attention
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), 256))
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False, fullgraph=True)
        _FLEX["how"] = "torch.compile(flex_attention, dynamic=False, fullgraph=True)"
    return _FLEX["fn"], _FLEX["how"]


def _flex_eager():
    import warnings
    from torch.nn.attention.flex_attention import flex_attention

    def eager(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile": we know
            return flex_attention(*args, **kwargs)
    return eager


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def _flex_unsupported_reason(e: BaseException) -> str:
    import re
    m = re.search(r"NotImplementedError\('([^']*)'", str(e))
    return f"NotImplementedError: {m.group(1)}" if m else _first_line(e)


def _mask_mod(windows, P: int, gw: int):
    """FlexAttention ``mask_mod`` of docs/math.md §1 from per-batch windows ``(Bm, n, 4)`` (int64).

    Each coordinate is indexed as ``windows[b, q, c]``: with torch 2.15's CPU inductor, taking
    ``windows[b, q]`` first and then its columns compiled to wrong results; the error check
    (``max_abs_err`` against the reference) would show such a miscompile.
    """
    def mask_mod(b, h, q_idx, kv_idx):
        qp = (q_idx - P).clamp(min=0)
        kp = (kv_idx - P).clamp(min=0)
        kx, ky = kp % gw, kp // gw
        inside = ((kx >= windows[b, qp, 0]) & (kx <= windows[b, qp, 2])
                  & (ky >= windows[b, qp, 1]) & (ky <= windows[b, qp, 3]))
        return inside | (q_idx < P) | (kv_idx < P)
    return mask_mod


def _block_mask_builder(mask, batch: int, N: int, device):
    """``(build() -> BlockMask, description)`` for the mask's windows."""
    from torch.nn.attention.flex_attention import create_block_mask
    windows = mask.windows.long()
    if windows.dim() == 2:
        windows = windows.unsqueeze(0)
    Bm = windows.shape[0]
    mod = _mask_mod(windows, mask.num_prefix_tokens, mask.grid[1])
    compile_build = device.type == "cuda"

    def build():
        return create_block_mask(mod, Bm, None, N, N, device=device, _compile=compile_build)

    return build, f"create_block_mask(B={Bm}, H=None, _compile={compile_build})"


# ------------------------------------------------------------------------------------ build
def build(case: Case, check: bool = True) -> Prepared:
    import torch
    import torch.nn.functional as F
    from vitpatch import functional, reference

    s, impl = case.shape, case.impl
    device = torch.device(case.device)
    B, N = s["B"], s["N"]
    q, k, v, scale, info = attention_inputs(case)
    if impl == "sdpa_dense" or impl in SDPA_BACKENDS:
        return sdpa_dense_case(q, k, v, scale, case.mode, info, backend=impl if impl in SDPA_BACKENDS else None)

    mask = make_mask(s, device)
    info["density"] = mask.density(B)
    info["flop_dense"] = info["flop_visited"] = attention_flop(B, s["h"], N, s["d"], case.mode)
    info["extra"]["windows"] = "per-image" if mask.per_image else "shared"
    Bm = B if mask.per_image else 1
    ref_out = None

    def reference_out():
        with torch.no_grad():
            return reference.window_attention(q, k, v, mask, scale=scale, upcast=True)

    if impl == "vitpatch":
        info["backend"] = functional.backend_for(OP, q, k, v, mask, scale=scale)
        frac, note = visited_tile_fraction(mask, B, key=(str(device), tuple(sorted((k, str(v)) for k, v in s.items()))))
        info["visited_tile_fraction"] = frac
        if note:
            info["extra"]["visited_tile_note"] = note
        if frac is not None:
            info["flop_visited"] = info["flop_dense"] * frac
        if info["backend"] == "triton" and device.type == "cuda":
            info["extra"]["schedule_build_ms"] = schedule_build_ms(mask, q)
        if info["backend"] == "torch":
            info["extra"].update(cpu_plan_info(mask, q))

        def fwd():
            return functional.window_attention(q, k, v, mask, scale=scale)
    elif impl == "reference":
        def fwd():
            return reference.window_attention(q, k, v, mask, scale=scale)
    elif impl == "sdpa_mask":
        dense = mask.dense(Bm)[:, None]  # (Bm, 1, N, N) bool; built once, outside the timing
        info["extra"]["mask_build"] = "WindowMask.dense outside the timed call"

        def fwd():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)
    elif impl in ("flex", "flex_build", "flex+build"):
        try:
            make_block_mask, how_build = _block_mask_builder(mask, B, N, device)
        except ImportError as e:
            raise Unsupported(f"torch.nn.attention.flex_attention is not importable: {e}") from None
        info["extra"]["flex_build"] = how_build
        block_mask = make_block_mask()
        sparsity = float(block_mask.sparsity())
        info["extra"]["flex_block_sparsity_pct"] = sparsity
        if impl == "flex_build":  # building the mask alone: no attention FLOP
            del info["flop_dense"], info["flop_visited"]
            return Prepared(step=make_block_mask, info=info)
        info["flop_visited"] = info["flop_dense"] * (1.0 - sparsity / 100.0)
        flex, how = _flex_attention()
        # the first call compiles (untimed), under the grad mode the steps use; on CPU, flex
        # refuses inputs that need a backward: an "unsupported" row, whether or not compiled
        grad_mode = torch.no_grad() if case.mode == "fwd" else contextlib.nullcontext()
        try:
            with grad_mode:
                trial = flex(q, k, v, block_mask=block_mask, scale=scale)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, NotImplementedError) or "NotImplementedError" in str(e):
                raise Unsupported(_flex_unsupported_reason(e)) from None
            # compilation failed for this case: run eager Flex and say so in the row
            flex = _flex_eager()
            how = f"eager flex_attention (unfused: materialises the scores); torch.compile failed: {_first_line(e)}"
            with grad_mode:
                trial = flex(q, k, v, block_mask=block_mask, scale=scale)
        info["extra"]["flex"] = how
        if check:
            ref_out = reference_out()
            info["max_abs_err"] = max_abs_err(trial, ref_out)
        del trial
        if impl == "flex":
            def fwd():
                return flex(q, k, v, block_mask=block_mask, scale=scale)
        else:
            def fwd():
                return flex(q, k, v, block_mask=make_block_mask(), scale=scale)
    else:
        raise ValueError(f"unknown impl {impl!r} for {OP}")

    if check and case.mode == "fwd" and impl in ("vitpatch", "sdpa_mask"):
        with torch.no_grad():
            info["max_abs_err"] = max_abs_err(fwd(), reference_out())
    return autograd_case(fwd, (q, k, v), case.mode, info=info)
