"""The GPU build budgets, checked without a GPU (bench/compile.py, kernels/_launch.py).

Every shipped configuration of every kernel unit is compiled once for sm_90a with Triton's own
toolchain, at its most demanding case (the widest head width it ships for, half precision where
it ships for it, key_keep / 100 clusters), and must compile with 0 spill bytes, shared memory
within the per-block limit and ``wgmma`` in its dot kernels (half precision). The whole matrix
(every dtype and head width, both targets) is ``python -m bench.compile``; its reports are in
bench/results/. A deliberately bad configuration, kept out of the shipped list, shows that the
budgets do fail.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs in a child process: Triton builds its language for the interpreter when TRITON_INTERPRET
# is set at import (as this suite does), and such a process cannot compile for a GPU target.
REPRESENTATIVE = """
import json, sys
from bench import compile as gate
from vitpatch.kernels import _launch
from vitpatch.kernels._shipped import SHIPPED
VARIANT = {"window": "keep", "winft": "multiply", "paca": "M100"}
jobs = []
for unit, configs in SHIPPED.items():
    index = {c.label: i for i, c in enumerate(_launch.candidates(unit))}
    for label, targets in configs.items():
        cases = targets.get("sm_90a", {})
        if not cases:
            continue
        dtype = next(d for d in ("bfloat16", "float16", "float32", "tf32") if d in cases)
        job = gate.Job(unit, index[label], dtype, max(cases[dtype]), VARIANT[unit.split("_")[0]])
        jobs.append((job, gate._paca_fits(unit, _launch.candidates(unit)[job.index], job.head_dim, job.variant)))
rows = gate.run(["sm_90a"], jobs, jobs_n=2, progress=False)
json.dump({"rows": rows, "violations": gate.violations(rows), "n_jobs": len(jobs)}, sys.stdout)
"""

BAD = """
import json, sys
from bench import compile as gate
from vitpatch.kernels import _launch
# NOT shipped: WinfT dq with 128 x 64 tiles and 2 warps spills at head width 128 (5.8 KB with
# triton 3.6, 38 KB with 3.8); the window forward with 2 warps has no warpgroup, hence no wgmma;
# the window dk/dv with 32-key tiles and 8 warps runs its p^T do and ds^T q products (32 rows) on
# mma.sync inside its main loops
_launch.CANDIDATES["winft_dq"] = [_launch._c(2, 2, _launch.HALF, BLOCK_M=128, BLOCK_N=64)]
_launch.CANDIDATES["window_fwd"] = [_launch._c(2, 2, _launch.HALF, BLOCK_M=64, BLOCK_N=64, ORDER=1, UNIT=64,
                                            QUERY_ORDER="auto")]
_launch.CANDIDATES["window_bwd"] = [_launch._c(8, 3, _launch.HALF, BLOCK_M=64, BLOCK_N=32, ORDER=1, UNIT=64,
                                            QUERY_ORDER="auto")]
rows = gate.run(["sm_90a"], [(gate.Job("winft_dq", 0, "bfloat16", 128, "multiply"), None),
                             (gate.Job("window_fwd", 0, "bfloat16", 64, "plain"), None),
                             (gate.Job("window_bwd", 0, "bfloat16", 64, "plain"), None)], jobs_n=1, progress=False)
json.dump({"rows": rows, "violations": gate.violations(rows)}, sys.stdout)
"""


def _gate(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def cuda_backend():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = subprocess.run([sys.executable, "-c", "from bench import compile as g; g._backend('sm_90a')"],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    if probe.returncode != 0:  # pragma: no cover - a triton without its NVIDIA backend
        pytest.skip(f"Triton's CUDA backend is not available here: {probe.stderr[-500:]}")


def test_every_shipped_configuration_meets_the_budgets(cuda_backend):
    """Each shipped candidate, at its most demanding shipped case on sm_90a, recompiled here."""
    out = _gate(REPRESENTATIVE)
    rows = out["rows"]
    from vitpatch.kernels import _launch
    from vitpatch.kernels._shipped import SHIPPED
    assert out["n_jobs"] == sum(1 for configs in SHIPPED.values() for t in configs.values() if t.get("sm_90a"))
    compiled = [r for r in rows if not r["skipped"]]
    assert {r["unit"] for r in compiled} == set(_launch.CANDIDATES), "a unit ships nothing"
    assert all(r["registers"] for r in compiled), "ptxas reported no register count"
    assert not out["violations"], "\n".join(out["violations"])
    dot_rows = [r for r in compiled if r["tc_expected"] and r["dtype"] in ("float16", "bfloat16")]
    assert dot_rows and all(r["tensor_cores"] and r["hgmma"] > 0 and r["main_loop_hmma"] == 0 for r in dot_rows)
    assert {r["kernel"] for r in dot_rows} >= {"window_attention._fwd_kernel", "window_attention._bwd_dq_kernel",
                                               "window_attention._bwd_dkdv_kernel",
                                               "winft_attention._attn_fwd_kernel",
                                               "winft_attention._attn_dq_kernel",
                                               "winft_attention._attn_dkdv_kernel"}


def test_budgets_fail_on_a_bad_configuration(cuda_backend):
    bad = _gate(BAD)["violations"]
    assert any("_attn_dq_kernel" in b and "spills" in b for b in bad), bad
    assert any("_fwd_kernel" in b and "no wgmma" in b for b in bad), bad
    assert any("_bwd_dkdv_kernel" in b and "HMMA (mma.sync) in its main loops" in b for b in bad), bad


def test_gpu_check_dry_run(tmp_path):
    """``bash bench/gpu_check.sh OUT --dry-run`` imports everything and prints the plan, whose budgets
    sum to at most 7 minutes; it runs the interpreter named by ``PYTHON`` only, even when the
    ``python`` / ``python3`` on PATH cannot import torch (here: they cannot run at all)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("python", "python3"):
        (fake / name).write_text("#!/bin/sh\necho no torch here >&2\nexit 1\n")
        (fake / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable}
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "imports: ok" in done.stdout and "found: python" in done.stdout
    for step in ("tests", "racecheck", "memcheck", "bench-window_attention", "bench-winft_attention", "ncu"):
        assert f"== {step} (at most " in done.stdout, step
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["ok"] and summary["steps"] == []
    assert summary["plan_total_s"] == sum(p["budget_s"] for p in summary["plan"]) <= 420
    assert len(list(out.iterdir())) <= 8 and all(p.is_file() for p in out.iterdir())


def test_gpu_summary_reads_steps_and_pytest_counts(tmp_path):
    """``bench/gpu_summary.py``: a failed step makes ``ok`` false, a skipped one does not; the tests
    step's pytest counts come from its part of the log."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_summary
    finally:
        sys.path.pop(0)
    (tmp_path / "log.txt").write_text("found: python 3.12.1, torch 2.11.0\n== tests (at most 110 s): pytest\n"
                                      "3 failed, 120 passed, 4 skipped in 80.0s\n== tests: exit 1\n"
                                      "== bench (at most 80 s)\n5 passed\n")
    steps = "tests\t110\t80123\t1\nracecheck\t25\t0\tskipped: compute-sanitizer not found\n"
    s = gpu_summary.summary(tmp_path, steps, False, "tests:110 racecheck:25")
    assert s["tests"] == {"failed": 3, "passed": 120, "skipped": 4}
    assert s["steps"][0] == {"step": "tests", "budget_s": 110, "wall_s": 80.1, "exit": 1, "status": "failed"}
    assert s["steps"][1]["status"] == "skipped" and not s["ok"]
    assert s["found"] == "python 3.12.1, torch 2.11.0" and s["plan_total_s"] == 135
    ok = gpu_summary.summary(tmp_path, "tests\t110\t1000\t0\n", False, "tests:110")
    assert ok["ok"] and ok["steps"][0]["status"] == "ok"


def test_shipped_table_is_the_committed_gate_report():
    """kernels/_shipped.py is exactly what the committed compile reports make of themselves, and
    half precision ships at every head width on both targets for every unit, but for the PaCa
    attention backward on sm_80 (all clusters and the dk/dv accumulators in registers: d <= 32)."""
    import torch

    from bench import compile as gate
    from vitpatch.kernels import _launch
    from vitpatch.kernels._shipped import SHIPPED
    rows = []
    for target in _launch.TARGETS:
        with open(ROOT / "bench" / "results" / f"compile-{target}.jsonl") as f:
            rows += [json.loads(line) for line in f]
    assert gate.policy_table([dict(r) for r in rows]) == SHIPPED
    marked = gate.mark_shipped([dict(r) for r in rows])
    assert [r["shipped"] for r in marked] == [r["shipped"] for r in rows]  # the reports' own "shipped" column
    for unit in _launch.CANDIDATES:
        for target in _launch.TARGETS:
            for d in _launch.WIDTH_BUCKETS:
                expected = not (unit == "paca_attn_bwd" and target == "sm_80" and d > 32)
                for dtype in (torch.bfloat16, torch.float16):
                    assert bool(_launch.shipped(unit, dtype, d, target)) == expected, (unit, target, d, dtype)


def test_float32_policy(monkeypatch):
    """float32 follows torch's matmul precision; what ships no spill-free configuration is declined on a GPU."""
    import torch

    from vitpatch.kernels import _launch
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    monkeypatch.setattr(_launch, "current_target", lambda: "sm_90a")
    window = ("window_fwd", "window_bwd")
    winft = ("winft_threshold", "winft_gate", "winft_fwd", "winft_dq", "winft_dkdv")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert _launch.dot_precision(torch.float32) == "tf32x3"
        assert "float32 at head width 64" in _launch.supports(window, torch.float32, 64)  # tf32x3 spills there
        assert _launch.supports(winft, torch.float32, 64) is None  # dk/dv in 16 x 16 tiles of 8 warps
        assert "head width 96" in _launch.supports(winft, torch.float32, 96)  # every float32 dk/dv spills there
        torch.set_float32_matmul_precision("high")
        assert _launch.dot_precision(torch.float32) == "tf32"
        assert _launch.dot_precision(torch.float32, exact=True) == "tf32x3"  # WinfT's gate stays exact
        assert _launch.supports(window, torch.float32, 64) is None
        assert _launch.supports(window, torch.float32, 128) is not None
    finally:
        torch.set_float32_matmul_precision(before)
    for d in (32, 64, 96, 128):  # half precision ships everywhere
        for units in (window, winft, ("paca_attn_fwd", "paca_attn_bwd")):
            assert _launch.supports(units, torch.bfloat16, d) is None
    monkeypatch.setattr(_launch, "interpreting", lambda: True)
    from vitpatch import _compat
    # the interpreter runs every case, where this triton / numpy pair can interpret at all
    assert _launch.supports(window, torch.float32, 128) == _compat.interpreter_problem()


def test_merge_replaces_only_the_run_units_rows(tmp_path):
    """``python -m bench.compile --units ... --out DIR --merge``: the run's (unit, target) rows replace
    those in DIR's reports, in place; other units and targets keep theirs; a new unit goes last."""
    from bench import compile as gate
    old = {"sm_90a": [{"unit": "a", "target": "sm_90a", "v": 0}, {"unit": "b", "target": "sm_90a", "v": 0},
                      {"unit": "b", "target": "sm_90a", "v": 1}, {"unit": "c", "target": "sm_90a", "v": 0}],
           "sm_80": [{"unit": "b", "target": "sm_80", "v": 0}]}
    for target, rows in old.items():
        (tmp_path / f"compile-{target}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    new = [{"unit": "b", "target": "sm_90a", "v": 9}, {"unit": "d", "target": "sm_90a", "v": 9}]
    merged = gate.merged_reports(str(tmp_path), new)
    assert [(r["unit"], r["v"]) for r in merged["sm_90a"]] == [("a", 0), ("b", 9), ("c", 0), ("d", 9)]
    assert merged["sm_80"] == old["sm_80"]


def test_unit_kernel_table_beside_the_candidates():
    """The launch policy names, per unit, the kernels its configuration governs: every unit with
    candidates has an entry, and every name is a kernel of the package."""
    import importlib
    from vitpatch.kernels import _launch
    assert set(_launch.UNIT_KERNELS) == set(_launch.CANDIDATES)
    names = set()
    for mod in ("window_attention", "window.schedule", "winft_attention", "cluster_attention"):
        module = importlib.import_module(f"vitpatch.kernels.{mod}")
        names |= {n for n, v in vars(module).items() if isinstance(v, _launch.Kernel)}
    for unit, kernels in _launch.UNIT_KERNELS.items():
        assert kernels <= names, (unit, kernels - names)
