"""The shared benchmark harness: cases, timers, peak memory, JSON-lines rows, ratio tables.

An op module (``bench/<op>.py``) offers ``cases(cfg) -> [Case]`` and ``build(case, check) ->
Prepared``. The harness times each prepared case, measures its peak memory, and turns the
result into one row (:func:`make_row`) appended to ``DIR/<device-slug>.jsonl``.

Timing (DESIGN, Benchmarks):
  * CUDA: ``triton.testing.do_bench`` (median, 20% and 80% quantiles). Backward-only cases
    need a fresh forward before each backward, so they use the same CUDA-event loop as
    ``do_bench`` with the forward run untimed before each timed backward.
  * CPU: wall-clock ``time.perf_counter`` per call after warm-up; median and quantiles.
Peak memory:
  * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
    allocated before the case built its inputs (so inputs, parameters, outputs and
    intermediates count; other cases' leftovers do not).
  * CPU: one child process per measurement, forked from a small server process that has only
    imported torch and vitpatch (:class:`MemoryWorker`). The child builds and runs the case
    once as a warm-up (imports, compilation and thread pools then count as baseline), frees
    it, returns freed heap to the OS (``malloc_trim``) and records ``VmRSS``; it then builds
    the inputs again, runs the untimed set-up (the forward of a backward-only case), resets
    the kernel's high-water mark (``/proc/self/clear_refs``), runs the step once and reports
    ``VmHWM`` minus that ``VmRSS``. Where the reset is unavailable, the row's ``mem_method``
    says what was measured instead. Children forked from the same server measure the same
    bytes; ``Config.memory_runs`` (``--memory-runs``, default 1) takes the median of several
    (``extra.peak_mem_runs_mb`` lists them).
  * CPU timing runs up to 200 timed calls within about a second (quick runs): a
    sub-millisecond call's median over 5 calls is mostly noise.

Every ratio is taken between rows of the same run (same ``run_id``), never across runs.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

SCHEMA_VERSION = 1
MODES = ("fwd", "bwd", "fwd+bwd")
STATUSES = ("ok", "unsupported", "error", "oom")

# Keys every row carries, with the types their values may take (None = JSON null).
REQUIRED_KEYS: Dict[str, tuple] = {
    "schema": (int,),
    "run_id": (str,),
    "date": (str,),
    "op": (str,),
    "impl": (str,),
    "mode": (str,),
    "device": (str,),
    "device_type": (str,),
    "dtype": (str,),
    "shape": (dict,),
    "density": (float, type(None)),
    "visited_tile_fraction": (float, type(None)),
    "median_ms": (float, type(None)),
    "p20_ms": (float, type(None)),
    "p80_ms": (float, type(None)),
    "n_repeats": (int,),
    "timer": (str, type(None)),
    "peak_mem_mb": (float, type(None)),
    "mem_method": (str, type(None)),
    "backend": (str, type(None)),
    "max_abs_err": (float, type(None)),
    "status": (str,),
    "note": (str, type(None)),
    "extra": (dict,),
    "threads": (int,),
    "quick": (bool,),
    "torch": (str,),
    "triton": (str, type(None)),
    "timm": (str, type(None)),
    "git_commit": (str, type(None)),
    "git_dirty": (bool, type(None)),
}

# Which ratios the table prints, per op: (subject impl, anchor impl), time and memory.
RATIO_PAIRS: Dict[str, List[Tuple[str, str]]] = {
    "window_attention": [("vitpatch", "sdpa_dense"), ("vitpatch", "sdpa_flash"), ("vitpatch", "sdpa_cudnn"),
                         ("vitpatch", "sdpa_mask"), ("vitpatch", "reference"), ("vitpatch", "flex"),
                         ("vitpatch", "flex+build")],
    "winft_attention": [("vitpatch", "sdpa_dense"), ("vitpatch", "sdpa_qk"), ("vitpatch", "reference")],
    "cluster_pool": [("vitpatch", "reference"), ("vitpatch", "pvt_sra")],
    "cluster_attention": [("vitpatch", "reference"), ("vitpatch", "sdpa")],
    "paca_layer": [("vitpatch", "reference"), ("vitpatch", "pvt_sra")],
    "vit_model": [("awd_vit", "vit"), ("winft_vit", "vit")],
    "pyramid_model": [("paca_vit", "pvt_v2")],
    "uncertainty": [("streaming", "stacked")],
}


# ============================================================================ configuration
@dataclass
class Config:
    """What one ``python -m bench`` invocation measures and how hard it tries."""

    device: str = "cpu"                 # "cpu" or "cuda"
    dtype: str = "float32"
    quick: bool = False
    repeats: Optional[int] = None       # fixed number of timed calls (CPU) instead of the budget
    warmup: Optional[int] = None        # warm-up calls (CPU)
    memory: bool = True                 # measure peak memory
    memory_runs: int = 1                # CPU: median of this many child measurements
    check: bool = True                  # compare outputs with the reference (max_abs_err)
    limit: Optional[int] = None         # at most this many cases per module (smoke runs)
    deadline: Optional[float] = None    # time.monotonic() after which no new case starts
    child_timeout_s: float = 300.0
    threads: Optional[int] = None       # torch CPU threads (None: torch's default)
    extra_cpu_rows: bool = True         # modules may add CPU-only rows (WinfT memory at N = 2048) once per run

    def cpu_timing(self) -> Tuple[int, int, int, float]:
        """``(warmup, min_reps, max_reps, budget_s)`` of the CPU wall-clock timer."""
        # quick: a sub-millisecond call gets up to 200 timed calls (its median is otherwise
        # noise), a slow one at least 3; both within about a second
        warmup, lo, hi, budget = (2, 3, 200, 1.0) if self.quick else (2, 5, 200, 8.0)
        if self.repeats is not None:
            lo = hi = max(1, self.repeats)
        if self.warmup is not None:
            warmup = max(0, self.warmup)
        return warmup, lo, hi, budget

    def cuda_timing(self, op: str) -> Tuple[int, int]:
        """``(warmup_ms, rep_ms)`` handed to ``triton.testing.do_bench``."""
        if op.endswith("_model"):
            return (100, 500) if not self.quick else (25, 100)
        return (25, 100) if not self.quick else (10, 40)


@dataclass
class Case:
    """One measurement: an op, an implementation, a mode, a shape, a device and a dtype.

    ``module`` names the bench module whose ``build(case, check)`` prepares it; the CPU memory
    child rebuilds the case from this description, so everything here is JSON-able.
    ``shape`` holds what identifies the problem (``B, h, N, d, M, window``...); an anchor whose
    shape is a subset of a subject's shape is its anchor (``sdpa_dense`` has no window).
    ``options`` are builder settings that are not part of the problem's identity.
    """

    module: str
    op: str
    impl: str
    mode: str
    shape: Dict[str, Any]
    device: str = "cpu"
    dtype: str = "float32"
    options: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.op}/{self.impl}/{self.mode} {shape_label(self.shape)} [{self.device}, {self.dtype}]"


@dataclass
class Prepared:
    """A built case: ``step()`` is measured; ``setup()`` (if any) runs untimed before each step.

    ``grads``: tensors whose ``.grad`` is reset to ``None`` before every step. ``info``: row
    fields known at build time (``backend``, ``density``, ``visited_tile_fraction``,
    ``max_abs_err``, ``extra``). ``items_per_step``: images per step (model rows report img/s).
    ``context``: an optional callable returning a context manager entered around set-up and
    step (e.g. forcing ``VITPATCH_BACKEND``).
    """

    step: Callable[[], Any]
    setup: Optional[Callable[[], Any]] = None
    grads: Sequence[Any] = ()
    info: Dict[str, Any] = field(default_factory=dict)
    items_per_step: Optional[int] = None
    context: Optional[Callable[[], Any]] = None

    def _ctx(self):
        import contextlib
        return self.context() if self.context is not None else contextlib.nullcontext()

    def clear_grads(self) -> None:
        for t in self.grads:
            t.grad = None

    def run_setup(self) -> None:
        if self.setup is not None:
            with self._ctx():
                self.setup()

    def run_step(self) -> None:
        with self._ctx():
            self.step()


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n_repeats: int
    timer: str


class Unsupported(Exception):
    """Raised by a builder when an implementation cannot run a case (the row says why)."""


# ============================================================================ environment
def _torch():
    import torch
    return torch


def cpu_model_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else ``platform``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    if name:
                        return name
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_name(device_type: str) -> str:
    """The device's own name: ``torch.cuda.get_device_name`` or the CPU model."""
    if device_type == "cuda":
        return _torch().cuda.get_device_name()
    return cpu_model_name()


def device_slug(name: str) -> str:
    """A file-name-safe form of a device name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    slug = re.sub(r"\((r|tm)\)", "", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")
    return slug or "unknown-device"


def _git(*args: str) -> Optional[str]:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_metadata(quick: bool, git_commit: Optional[str] = None) -> Dict[str, Any]:
    """Fields shared by every row of one run: run id, date, versions, git commit.

    ``git_commit`` is for copies of the tree without ``.git`` (e.g. a GPU machine's copy):
    it is recorded as given, with ``git_dirty`` unknown.
    """
    torch = _torch()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import timm
        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    if git_commit:
        commit, status = git_commit, (status if commit == git_commit else None)
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "schema": SCHEMA_VERSION,
        "run_id": f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}",
        "date": now.isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "timm": timm_version,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "quick": bool(quick),
    }


# ============================================================================ rows
def make_row(meta: Dict[str, Any], case: Case, *, timing: Optional[Timing] = None,
             peak_mem_mb: Optional[float] = None, mem_method: Optional[str] = None,
             info: Optional[Dict[str, Any]] = None, status: str = "ok", note: Optional[str] = None,
             device: Optional[str] = None, items_per_step: Optional[int] = None) -> Dict[str, Any]:
    """One JSON row: the run's metadata, the case, its timing and memory, and what ran."""
    info = dict(info or {})

    non_finite = {}

    def num(x, key=None):
        if x is None:
            return None
        x = float(x)
        if not math.isfinite(x):  # JSON has no NaN: keep the fact, not the value
            non_finite[key or "value"] = str(x)
            return None
        return x

    row = dict(meta)
    row.update({
        "op": case.op, "impl": case.impl, "mode": case.mode,
        "device": device if device is not None else device_name(case.device),
        "device_type": case.device, "dtype": case.dtype,
        "shape": dict(case.shape),
        "density": num(info.pop("density", None), "density"),
        "visited_tile_fraction": num(info.pop("visited_tile_fraction", None), "visited_tile_fraction"),
        "median_ms": num(timing.median_ms, "median_ms") if timing else None,
        "p20_ms": num(timing.p20_ms, "p20_ms") if timing else None,
        "p80_ms": num(timing.p80_ms, "p80_ms") if timing else None,
        "n_repeats": int(timing.n_repeats) if timing else 0,
        "timer": timing.timer if timing else None,
        "peak_mem_mb": num(peak_mem_mb, "peak_mem_mb"),
        "mem_method": mem_method,
        "backend": info.pop("backend", None),
        "max_abs_err": num(info.pop("max_abs_err", None), "max_abs_err"),
        "status": status, "note": note,
        "extra": dict(info.pop("extra", {}) or {}),
        "threads": int(_torch().get_num_threads()),
    })
    row["extra"].update(info)  # anything else a builder reported
    if non_finite:
        row["extra"]["non_finite"] = non_finite
    if items_per_step and timing and timing.median_ms > 0:
        row["img_per_s"] = items_per_step / (timing.median_ms / 1000.0)
    # attention rows: matmul FLOP of the dense problem and of the pairs this impl actually
    # visits (tiles, blocks), as TFLOP/s at the median time
    for key in ("flop_dense", "flop_visited"):
        flop = row["extra"].pop(key, None)
        if flop is not None and timing and timing.median_ms and timing.median_ms > 0:
            row["tflops_" + key[len("flop_"):]] = flop / (timing.median_ms * 1e-3) / 1e12
    return row


def validate_row(row: Dict[str, Any]) -> List[str]:
    """Problems with a row's schema (missing keys, wrong types, unknown mode or status); empty if fine."""
    problems = []
    for key, types in REQUIRED_KEYS.items():
        if key not in row:
            problems.append(f"missing {key}")
        elif isinstance(row[key], bool) and bool not in types:
            problems.append(f"{key} is a bool, expected {[t.__name__ for t in types]}")
        elif not isinstance(row[key], types):
            problems.append(f"{key}={row[key]!r} is {type(row[key]).__name__}, expected {[t.__name__ for t in types]}")
    if row.get("mode") not in MODES:
        problems.append(f"mode {row.get('mode')!r} not in {MODES}")
    if row.get("status") not in STATUSES:
        problems.append(f"status {row.get('status')!r} not in {STATUSES}")
    if row.get("status") == "ok" and row.get("median_ms") is None:
        problems.append("status ok without median_ms")
    return problems


def rows_path(out_dir, device: str) -> Path:
    """``DIR/<device-slug>.jsonl``: the file a device's rows go to."""
    return Path(out_dir) / f"{device_slug(device)}.jsonl"


def append_rows(path, rows: Iterable[Dict[str, Any]]) -> int:
    """Append rows to a JSON-lines file (one compact object per line); returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, allow_nan=False) + "\n")
            n += 1
        f.flush()
    return n


def read_rows(path) -> List[Dict[str, Any]]:
    """Rows from a ``.jsonl`` file, or from every ``.jsonl`` file in a directory (blank lines skipped)."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    rows = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file}:{i}: not a JSON row: {e}") from None
    return rows


def latest_run(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The rows of the most recent run (by date, then run id) among ``rows``."""
    if not rows:
        return []
    last = max((r.get("date", ""), r.get("run_id", "")) for r in rows)
    return [r for r in rows if (r.get("date", ""), r.get("run_id", "")) == last]


# ============================================================================ timing
def quantiles_ms(times_ms: Sequence[float]) -> Tuple[float, float, float]:
    """``(median, p20, p80)`` with linear interpolation (as ``torch.quantile``)."""
    xs = sorted(float(t) for t in times_ms)
    if not xs:
        raise ValueError("no timings")

    def q(p):
        pos = p * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return q(0.5), q(0.2), q(0.8)


def time_cpu(prep: Prepared, warmup: int, min_reps: int, max_reps: int, budget_s: float) -> Timing:
    """Wall-clock median of ``step`` on CPU: ``warmup`` untimed calls, then at least ``min_reps``
    and at most ``max_reps`` timed calls, stopping once ``budget_s`` of timed calls is spent."""
    return time_cpu_interleaved([prep], warmup, min_reps, max_reps, budget_s)[0]


def time_cpu_interleaved(preps: Sequence[Prepared], warmup: int, min_reps: int, max_reps: int,
                         budget_s: float) -> List[Timing]:
    """:func:`time_cpu` for several prepared cases at once, in rounds: each round times one call
    of every case in turn (starting one case later each round), so a slow phase of the machine
    (frequency, other tenants) falls on all of them alike and their ratios keep only the cases'
    own difference. At least ``min_reps`` and at most ``max_reps`` rounds, stopping once
    ``budget_s`` per case is spent."""
    for prep in preps:
        for _ in range(warmup):
            prep.run_setup()
            prep.clear_grads()
            prep.run_step()
    times: List[List[float]] = [[] for _ in preps]
    spent = 0.0
    budget = budget_s * len(preps)
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or spent < budget):
        first = rounds % len(preps)  # each round starts one case later: no case always follows the same one
        for i in list(range(first, len(preps))) + list(range(first)):
            prep, ts = preps[i], times[i]
            prep.run_setup()
            prep.clear_grads()
            with prep._ctx():
                t0 = time.perf_counter()
                prep.step()
                dt = time.perf_counter() - t0
            ts.append(dt * 1e3)
            spent += dt
        rounds += 1
    how = "cpu wall-clock perf_counter, {w} warm-up, median of {n}" + (
        f", interleaved round-robin with {len(preps) - 1} other case(s) of the same shape and mode"
        if len(preps) > 1 else "")
    out = []
    for ts in times:
        med, p20, p80 = quantiles_ms(ts)
        out.append(Timing(med, p20, p80, len(ts), how.format(w=warmup, n=len(ts))))
    return out


def time_cuda(prep: Prepared, warmup_ms: int, rep_ms: int) -> Timing:
    """CUDA timing: ``triton.testing.do_bench``, or a do_bench-like event loop when ``setup`` must
    run untimed before each call (backward-only)."""
    torch = _torch()
    if prep.setup is None:
        from triton.testing import do_bench

        def fn():
            prep.run_step()

        args = dict(warmup=warmup_ms, rep=rep_ms, grad_to_none=list(prep.grads) or None)
        try:
            times = do_bench(fn, return_mode="all", **args)
        except (AssertionError, TypeError, ValueError):  # an older triton without return_mode="all"
            med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], **args)
            return Timing(med, p20, p80, 0, f"triton.testing.do_bench(warmup={warmup_ms}, rep={rep_ms}) "
                                            "quantiles 0.5/0.2/0.8, L2 flushed per call")
        med, p20, p80 = quantiles_ms(times)
        return Timing(med, p20, p80, len(times), f"triton.testing.do_bench(warmup={warmup_ms}, rep={rep_ms}, "
                                                 "return_mode='all'), L2 flushed per call; median, 20/80% quantiles")
    from triton import runtime
    driver = runtime.driver.active
    cache = driver.get_empty_cache_for_benchmark()

    def one(record):
        prep.run_setup()
        prep.clear_grads()
        driver.clear_cache(cache)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        prep.run_step()
        end.record()
        if record is not None:
            record.append((start, end))

    one(None)  # first call: compilation and the kernels' candidate timing stay out of the estimate
    torch.cuda.synchronize()
    probe: list = []
    for _ in range(3):
        one(probe)
    torch.cuda.synchronize()
    est = max(sum(s.elapsed_time(e) for s, e in probe) / len(probe), 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        one(None)
    events: list = []
    for _ in range(max(5, min(1000, int(rep_ms / est)))):
        one(events)
    torch.cuda.synchronize()
    med, p20, p80 = quantiles_ms([s.elapsed_time(e) for s, e in events])
    return Timing(med, p20, p80, len(events), f"cuda events around each step, set-up (forward) untimed before "
                                              f"each, L2 flushed (do_bench-style loop, rep={rep_ms} ms)")


# ============================================================================ memory
CUDA_MEM_METHOD = ("torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated "
                   "before the case built its inputs; one step after the untimed set-up")


def peak_memory_cuda(prep: Prepared, base_bytes: int) -> float:
    """Peak CUDA memory of one step (MiB), counted from ``base_bytes`` allocated before the build."""
    torch = _torch()
    prep.run_setup()
    prep.clear_grads()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    prep.run_step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base_bytes) / 2**20


def _proc_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> bool:
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure_in_child(req: Dict[str, Any]) -> Dict[str, Any]:
    """In a freshly forked child: warm up the case once, then measure one step's peak RSS."""
    import importlib
    import resource

    import torch
    if req.get("threads"):
        torch.set_num_threads(int(req["threads"]))
    case = Case(**req["case"])
    module = importlib.import_module(case.module)
    # one throwaway build + step first: lazy imports, compilation, thread pools and library
    # caches then belong to the baseline instead of the measurement
    warm = case.options.get("mem_warmup", True)
    if warm:
        torch.manual_seed(0)
        prep = module.build(case, check=False)
        prep.run_setup()
        prep.clear_grads()
        prep.run_step()
        prep = None
    gc.collect()
    trimmed = _malloc_trim()
    base_kb = _proc_status_kb("VmRSS")
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    prep = module.build(case, check=False)
    prep.run_setup()
    prep.clear_grads()
    gc.collect()
    _malloc_trim()
    reset = _reset_hwm()
    prep.run_step()
    peak_kb = _proc_status_kb("VmHWM") if reset else None
    if peak_kb is not None and base_kb is not None:
        method = ("cpu child process forked from a torch-preloaded server: "
                  + ("one warm-up build+step first, then " if warm else "no warm-up pass, then ") +
                  "VmHWM after a /proc/self/clear_refs reset (after the untimed set-up) during one step, minus "
                  "VmRSS before building the inputs" + ("; glibc malloc_trim before both readings" if trimmed else "")
                  + (f"; MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
                     if os.environ.get("MALLOC_MMAP_THRESHOLD_") else ""))
        mb = (peak_kb - base_kb) / 1024
    else:
        method = ("cpu child process forked from a torch-preloaded server: getrusage ru_maxrss minus its value "
                  "before building the inputs (no high-water reset: set-up and warm-up may dominate)")
        mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_maxrss) / 1024
    return {"status": "ok", "mb": mb, "method": method}


def memory_worker_main() -> None:
    """The memory fork server: imports torch and vitpatch once, then for each request line on
    stdin (a JSON case) forks a child that measures it and answers one JSON line on stdout."""
    import sys

    import importlib

    import torch  # noqa: F401 - preloaded for every child
    for name in ("vitpatch.functional", "vitpatch.reference", "vitpatch.nn", "bench.common"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    gc.collect()
    gc.freeze()  # the children's collections then skip (and do not copy-on-write) the server's objects
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, write one JSON object, leave without cleanup
            os.close(r)
            try:
                result = _measure_in_child(req)
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                result = {"status": "error", "mb": None, "method": None, "error": _short(e)}
            os.write(w, json.dumps(result).encode())
            os._exit(0)
        os.close(w)
        chunks = []
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        data = b"".join(chunks).decode()
        if not data:
            code = os.waitstatus_to_exitcode(status)
            data = json.dumps({"status": "error", "mb": None, "method": None,
                               "error": f"memory child ended without an answer (exit {code}; killed for memory?)"})
        out.write(data.replace("\n", " ") + "\n")
        out.flush()
    out.flush()
    os._exit(0)  # skip interpreter teardown of the frozen, preloaded objects


MMAP_THRESHOLD = 128 * 1024  # bytes: the memory server's glibc M_MMAP_THRESHOLD (MALLOC_MMAP_THRESHOLD_)


class MemoryWorker:
    """Handle on the memory fork server (:func:`memory_worker_main`), started on first use."""

    def __init__(self):
        self.proc = None

    def _start(self):
        import subprocess
        import sys
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # a fixed mmap threshold: glibc otherwise raises it after freeing a large block, later
        # blocks of that size then stay resident after free and the same step measures 3 MiB
        # more or less from one run to the next; with it, RSS follows the live tensors
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
        self.proc = subprocess.Popen([sys.executable, "-c", "from bench.harness import memory_worker_main as m; m()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     start_new_session=True, text=True, bufsize=1)

    def measure(self, case: Case, timeout_s: float, threads: Optional[int] = None) -> Dict[str, Any]:
        import select
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps({"case": dataclasses.asdict(case), "threads": threads}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            self.close(kill=True)
            return {"status": "error", "mb": None, "method": None,
                    "error": f"memory measurement timed out after {timeout_s:.0f} s"}
        line = self.proc.stdout.readline()
        if not line:
            self.close(kill=True)
            return {"status": "error", "mb": None, "method": None, "error": "memory server ended unexpectedly"}
        return json.loads(line)

    def close(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        import signal
        proc, self.proc = self.proc, None
        if kill:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the server and its measuring child, by group id
            except OSError:
                pass
        else:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            proc.wait(30)
        except Exception:  # noqa: BLE001
            proc.kill()


_WORKER: Optional[MemoryWorker] = None


def start_memory_worker() -> MemoryWorker:
    """Start (once) the CPU memory server; measurements then reuse it."""
    global _WORKER
    if _WORKER is None:
        import atexit
        _WORKER = MemoryWorker()
        atexit.register(_WORKER.close)
    if _WORKER.proc is None or _WORKER.proc.poll() is not None:
        _WORKER._start()
    return _WORKER


def peak_memory_child(case: Case, timeout_s: float = 300.0,
                      threads: Optional[int] = None) -> Tuple[Optional[float], Optional[str], Optional[str]]:
    """Peak CPU memory of one step of ``case`` in a fresh forked child: ``(MiB, method, error)``."""
    res = start_memory_worker().measure(case, timeout_s, threads)
    if res.get("status") != "ok":
        return None, None, "memory: " + str(res.get("error"))
    return float(res["mb"]), res["method"], None


# ============================================================================ running cases
def _is_oom(e: BaseException) -> bool:
    torch = _torch()
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(e, MemoryError))


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return re.sub(r"\s+", " ", text)[:400]


def _cpu_timing_args(case: Case, cfg: Config) -> Tuple[int, int, int, float]:
    warmup, lo, hi, budget = cfg.cpu_timing()
    if cfg.repeats is None and "repeats" in case.options:
        lo = hi = int(case.options["repeats"])
    if cfg.warmup is None and "warmup" in case.options:
        warmup = int(case.options["warmup"])
    return warmup, lo, hi, budget


def _build(case: Case, cfg: Config, meta: Dict[str, Any], module):
    """``(prep, info, base_bytes, None)`` or ``(None, info, 0, failure row)``."""
    torch = _torch()
    on_cuda = case.device == "cuda"
    info: Dict[str, Any] = {}
    base = 0
    try:
        if on_cuda:
            gc.collect()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
        torch.manual_seed(0)
        prep = module.build(case, check=cfg.check)
        return prep, dict(prep.info), base, None
    except Exception as e:  # noqa: BLE001 - one failing case must not end the run
        return None, info, 0, _failure_row(case, meta, info, e)


def _failure_row(case: Case, meta: Dict[str, Any], info: Dict[str, Any], e: BaseException) -> Dict[str, Any]:
    if isinstance(e, Unsupported):
        return make_row(meta, case, info=info, status="unsupported", note=str(e))
    if isinstance(e, NotImplementedError):
        return make_row(meta, case, info=info, status="unsupported", note=_short(e))
    if case.device == "cuda":
        _torch().cuda.empty_cache()
    return make_row(meta, case, info=info, status="oom" if _is_oom(e) else "error", note=_short(e))


def _finish(case: Case, cfg: Config, meta: Dict[str, Any], prep: Prepared, info: Dict[str, Any], base: int,
            timing: Timing) -> Dict[str, Any]:
    """Peak memory of a timed case and its row; drops ``prep`` before the CPU memory children run."""
    items = prep.items_per_step
    mem, method, note = None, None, None
    if cfg.memory:
        try:
            if case.device == "cuda":
                mem, method = peak_memory_cuda(prep, base), CUDA_MEM_METHOD
            else:
                prep = None
                gc.collect()
                runs = []
                for _ in range(max(1, cfg.memory_runs)):
                    mb, how, note = peak_memory_child(case, cfg.child_timeout_s, cfg.threads)
                    if mb is None:
                        break  # the note says why; the runs so far still count
                    runs.append(mb)
                    method = how
                if runs:
                    mem = sorted(runs)[len(runs) // 2]
                    if len(runs) > 1:
                        method = f"median of {len(runs)} children, each: {method}"
                    info.setdefault("extra", {})["peak_mem_runs_mb"] = [round(r, 3) for r in runs]
        except Exception as e:  # noqa: BLE001
            note = "memory: " + _short(e)
    prep = None
    return make_row(meta, case, timing=timing, peak_mem_mb=mem, mem_method=method, info=info, note=note,
                    items_per_step=items)


def run_case(case: Case, cfg: Config, meta: Dict[str, Any], module) -> Dict[str, Any]:
    """Build, time and measure one case; always returns a row (status says whether it ran)."""
    return run_group([case], cfg, meta, module)[0]


def run_group(cases: Sequence[Case], cfg: Config, meta: Dict[str, Any], module) -> List[Dict[str, Any]]:
    """Build, time and measure cases that are compared with each other; one row per case, in order.

    On CPU the cases that build are timed together (:func:`time_cpu_interleaved`, with the first
    case's timer settings); on CUDA, or for a single case, each is timed alone. Memory is measured
    per case after all the timing.
    """
    if len(cases) > 1 and cases[0].device == "cpu":
        built = [_build(c, cfg, meta, module) for c in cases]
        live = [i for i, b in enumerate(built) if b[0] is not None]
        rows: List[Optional[Dict[str, Any]]] = [b[3] for b in built]
        if live:
            try:
                timings = time_cpu_interleaved([built[i][0] for i in live], *_cpu_timing_args(cases[live[0]], cfg))
            except Exception:  # noqa: BLE001 - find the failing case: time each alone
                timings = None
            for j, i in enumerate(live):
                prep, info, base, _ = built[i]
                built[i] = (None, info, base, None)
                if timings is None:
                    rows[i] = _time_and_finish(cases[i], cfg, meta, prep, info, base)
                else:
                    rows[i] = _finish(cases[i], cfg, meta, prep, info, base, timings[j])
                prep = None
        return rows  # type: ignore[return-value]
    out = []
    for case in cases:
        prep, info, base, failed = _build(case, cfg, meta, module)
        out.append(failed if prep is None else _time_and_finish(case, cfg, meta, prep, info, base))
    return out


def _time_and_finish(case: Case, cfg: Config, meta: Dict[str, Any], prep: Prepared, info: Dict[str, Any],
                     base: int) -> Dict[str, Any]:
    try:
        if case.device == "cuda":
            timing = time_cuda(prep, *cfg.cuda_timing(case.op))
        else:
            timing = time_cpu(prep, *_cpu_timing_args(case, cfg))
    except Exception as e:  # noqa: BLE001
        return _failure_row(case, meta, info, e)
    return _finish(case, cfg, meta, prep, info, base, timing)


def timing_groups(cases: Sequence[Case], module) -> List[List[Case]]:
    """``cases`` in groups timed together: ``module.timing_group(case)`` (a hashable, or ``None`` for
    a case timed alone) collects cases compared with each other; a group sits where its first case
    was. A module without ``timing_group`` times every case alone."""
    key_of = getattr(module, "timing_group", None)
    groups: List[List[Case]] = []
    index: Dict[Any, int] = {}
    for case in cases:
        key = key_of(case) if key_of is not None else None
        if key is None:
            groups.append([case])
        elif key in index:
            groups[index[key]].append(case)
        else:
            index[key] = len(groups)
            groups.append([case])
    return groups


def run_cases(cases: Sequence[Case], cfg: Config, meta: Dict[str, Any], module, out_dir=None,
              log: Callable[[str], None] = print) -> Tuple[List[Dict[str, Any]], int]:
    """Run ``cases`` of one module (:func:`timing_groups`, :func:`run_group`); append each row to
    ``out_dir`` as soon as its group has run.

    Returns ``(rows, skipped)``: cases not started because the deadline passed write no row.
    """
    rows: List[Dict[str, Any]] = []
    skipped = 0
    done = 0
    names: Dict[str, str] = {}
    groups = timing_groups(cases, module) if cfg.device == "cpu" else [[c] for c in cases]
    for group in groups:
        if cfg.deadline is not None and time.monotonic() > cfg.deadline:
            skipped = len(cases) - done
            log(f"  time limit reached: {skipped} case(s) of {module.__name__} not run (no rows written for them)")
            break
        for case in group:
            if case.device not in names:
                names[case.device] = device_name(case.device)
        t0 = time.perf_counter()
        group_rows = run_group(group, cfg, meta, module)
        dt = time.perf_counter() - t0
        for case, row in zip(group, group_rows):
            done += 1
            rows.append(row)
            if out_dir is not None:
                append_rows(rows_path(out_dir, row["device"]), [row])
            what = (f"{row['median_ms']:.3f} ms" if row["median_ms"] is not None else row["status"])
            mem = f", {row['peak_mem_mb']:.1f} MiB" if row["peak_mem_mb"] is not None else ""
            log(f"  [{done}/{len(cases)}] {case.describe()}: {what}{mem} ({dt:.1f} s"
                + (f" for {len(group)} interleaved" if len(group) > 1 else "") + ")"
                + (f" - {row['note']}" if row["status"] != "ok" and row["note"] else ""))
    return rows, skipped


# ============================================================================ ratios and tables
def shape_label(shape: Dict[str, Any]) -> str:
    """Compact, stable label of a shape dict: ``B=2 h=4 N=65 d=32 window=r2``."""
    def fmt(v):
        if isinstance(v, (list, tuple)):
            return "x".join(str(x) for x in v)
        if isinstance(v, float):
            return f"{v:g}"
        return str(v)
    return " ".join(f"{k}={fmt(v)}" for k, v in shape.items())


def _freeze(v):
    return tuple(v) if isinstance(v, list) else v


def _shape_items(shape: Dict[str, Any]) -> frozenset:
    return frozenset((k, _freeze(v)) for k, v in shape.items())


def _group_key(row: Dict[str, Any]) -> tuple:
    return (row.get("run_id"), row.get("device"), row.get("op"), row.get("mode"), row.get("dtype"))


def find_anchor(row: Dict[str, Any], rows: Sequence[Dict[str, Any]], anchor: str) -> Optional[Dict[str, Any]]:
    """The ``anchor`` impl's row for ``row``'s problem in the same run: same op, mode, dtype and
    device, shape a subset of ``row``'s (the most specific such shape wins)."""
    key, items = _group_key(row), _shape_items(row.get("shape", {}))
    best, best_size = None, -1
    for r in rows:
        if r.get("impl") != anchor or _group_key(r) != key:
            continue
        s = _shape_items(r.get("shape", {}))
        if s <= items and len(s) > best_size:
            best, best_size = r, len(s)
    return best


def ratio(subject: Optional[Dict[str, Any]], anchor: Optional[Dict[str, Any]], metric: str = "median_ms") -> Optional[float]:
    """``subject[metric] / anchor[metric]`` when both ran and the anchor's value is positive."""
    if subject is None or anchor is None:
        return None
    a, b = subject.get(metric), anchor.get(metric)
    if a is None or b is None or b <= 0 or subject.get("status") != "ok" or anchor.get("status") != "ok":
        return None
    return float(a) / float(b)


def ratio_rows(rows: Sequence[Dict[str, Any]], subject: str, anchor: str, metric: str = "median_ms",
               op: Optional[str] = None) -> List[Tuple[Dict[str, Any], Dict[str, Any], Optional[float]]]:
    """For each ``subject`` row (of ``op``, if given), its anchor row in the same run and the ratio of ``metric``."""
    out = []
    for r in rows:
        if r.get("impl") != subject or (op is not None and r.get("op") != op):
            continue
        a = find_anchor(r, rows, anchor)
        if a is not None:
            out.append((r, a, ratio(r, a, metric)))
    return out


def _fmt_ms(x):
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def _table(header: List[str], lines: List[List[str]]) -> str:
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for l in lines:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(l, widths))))
    return "\n".join(out)


def format_tables(rows: Sequence[Dict[str, Any]], pairs: Optional[Dict[str, List[Tuple[str, str]]]] = None) -> str:
    """Readable tables of a run's rows: for each (device, op, mode, dtype) a time table and a
    peak-memory table.

    Each line is a problem shape (shape entries common to the whole table are printed once,
    above it); columns are the impls' median times (ms) or peak memory (MiB), then the ratios
    ``subject / anchor`` of :data:`RATIO_PAIRS`, taken in the same run. Cases that did not run
    print their status (``unsupported``, ``error``, ``oom``).
    """
    pairs = RATIO_PAIRS if pairs is None else pairs
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    blocks = []
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        grp = groups[key]
        _, device, op, mode, dtype = key
        impls = list(dict.fromkeys(r["impl"] for r in grp))
        shapes = []
        for r in grp:
            s = _shape_items(r["shape"])
            if not any(s < _shape_items(o["shape"]) for o in grp) and r["shape"] not in shapes:
                shapes.append(r["shape"])
        common = dict(set.intersection(*(set(_shape_items(sh)) for sh in shapes))) if len(shapes) > 1 else {}
        common = {k: v for k, v in shapes[0].items() if k in common} if common else {}
        op_pairs = [(s, a) for s, a in pairs.get(op, []) if s in impls and a in impls]
        found_by_shape = []
        for shape in shapes:
            probe = {"run_id": key[0], "device": device, "op": op, "mode": mode, "dtype": dtype, "shape": shape}
            found_by_shape.append({i: find_anchor(probe, grp, i) for i in impls})
        tables = []
        for metric, unit in (("median_ms", "ms"), ("peak_mem_mb", "MiB")):
            header = ["shape", "density"] + [f"{i} {unit}" for i in impls] + [f"{s}/{a}" for s, a in op_pairs]
            lines = []
            for shape, found in zip(shapes, found_by_shape):
                dens = next((r.get("density") for r in found.values() if r and r.get("density") is not None), None)
                label = shape_label({k: v for k, v in shape.items() if k not in common}) or "-"
                cells = [label, "-" if dens is None else f"{dens:.3f}"]
                for i in impls:
                    r = found[i]
                    if r is None:
                        cells.append("")
                    elif r["status"] != "ok":
                        cells.append(r["status"])
                    else:
                        cells.append(_fmt_ms(r.get(metric)))
                cells += [_fmt_ratio(ratio(found[s], found[a], metric)) for s, a in op_pairs]
                lines.append(cells)
            what = "median time, ms" if metric == "median_ms" else "peak memory, MiB"
            tables.append(f"-- {what}\n" + _table(header, lines))
        title = (f"== {op} | {mode} | {dtype} | {device}"
                 + (f" | {shape_label(common)}" if common else "")
                 + "   (ratio = subject / anchor, same run)")
        blocks.append(title + "\n" + "\n".join(tables))
    return "\n\n".join(blocks)


def count_rows(rows: Sequence[Dict[str, Any]]) -> str:
    """Rows per (op, impl) and how many ran (``ok``), as a small table."""
    counts: Dict[Tuple[str, str], List[int]] = {}
    for r in rows:
        c = counts.setdefault((r["op"], r["impl"]), [0, 0])
        c[0] += 1
        c[1] += r["status"] == "ok"
    lines = [[op, impl, str(n), str(ok)] for (op, impl), (n, ok) in sorted(counts.items())]
    return _table(["op", "impl", "rows", "ok"], lines)
