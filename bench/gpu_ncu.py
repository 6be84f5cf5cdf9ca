"""One Nsight Compute pass over the window and WinfT kernels, for checking the static cost model.

    python bench/gpu_ncu.py --dry-run                      # anywhere: the workload and the ncu command
    python bench/gpu_ncu.py --out OUT/ncu.json [--timeout 40]   # on a CUDA machine with ncu

The workload (``--workload``, what ncu runs) is one forward + backward of
``functional.window_attention`` (AWD windows, density 0.23) and of ``functional.winft_attention``
with its BCE loss, at N = 577 (a 24 x 24 grid and a CLS token), bf16, d = 64, B = 8, h = 12. It runs
once to compile, then once between ``cudaProfilerStart`` / ``Stop``: only that second pass is
profiled, and only Triton kernels (their names start with ``_``). Per kernel the JSON keeps
instructions executed, issue slots busy, achieved and theoretical occupancy, registers, duration,
SM and memory throughput, and, where this ncu knows the metric, tensor-pipe utilisation.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import time
from typing import Dict, List

SHAPE = {"B": 8, "h": 12, "side": 24, "P": 1, "d": 64, "density": 0.23}
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "InstructionStats", "ComputeWorkloadAnalysis")
# tensor-pipe metrics to try, newest first: an ncu that does not know a metric refuses the whole run
TENSOR_METRICS = (
    ("sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
     "sm__inst_executed_pipe_tensor_op_gmma.sum"),
    ("sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",),
    (),
)
KEEP = ("Executed Instructions", "Issue Slots Busy", "Achieved Occupancy", "Theoretical Occupancy",
        "Registers Per Thread", "Duration", "Compute (SM) Throughput", "Memory Throughput",
        "Executed Ipc Active", "Block Limit Registers", "Block Limit Shared Mem", "Grid Size", "Block Size")


def workload() -> None:
    import torch

    from vitpatch import WindowMask, functional
    from vitpatch.masks import synthetic_awd_windows

    s = SHAPE
    grid = (s["side"], s["side"])
    N = s["P"] + s["side"] ** 2
    mask = WindowMask(synthetic_awd_windows(grid, s["B"], s["density"], seed=0), grid, s["P"]).to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(s["B"], s["h"], N, s["d"], device="cuda", dtype=torch.bfloat16, generator=g)
               .requires_grad_() for _ in range(3))

    def once():
        functional.window_attention(q, k, v, mask).float().square().sum().backward()
        out, loss = functional.winft_attention(q, k, v, target=mask)
        (out.float().square().sum() + loss.float()).backward()
        torch.cuda.synchronize()

    once()  # compiles every kernel and builds the schedules
    torch.cuda.profiler.start()
    once()
    torch.cuda.profiler.stop()


def ncu_command(program: List[str], metrics) -> List[str]:
    cmd = ["ncu", "--csv", "--page", "details", "--profile-from-start", "off", "--clock-control", "none",
           "--kernel-name", "regex:^_", "--launch-count", "24"]
    for sec in SECTIONS:
        cmd += ["--section", sec]
    if metrics:
        cmd += ["--metrics", ",".join(metrics)]
    return cmd + program


def parse(text: str) -> List[Dict]:
    """ncu's ``--csv --page details`` output -> one dict per profiled launch."""
    start = text.find('"ID"')
    if start < 0:
        return []
    launches: Dict[str, Dict] = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        launch = launches.setdefault(row["ID"], {"kernel": row.get("Kernel Name"), "metrics": {}})
        name = row.get("Metric Name", "")
        if name in KEEP or name.startswith("sm__"):
            launch["metrics"][name] = {"value": row.get("Metric Value"), "unit": row.get("Metric Unit")}
    return list(launches.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--workload", action="store_true", help="run the profiled workload (what ncu launches)")
    p.add_argument("--out", default="ncu.json")
    p.add_argument("--timeout", type=float, default=40.0, help="seconds for all ncu attempts together")
    args = p.parse_args(argv)
    if args.workload:
        workload()
        return 0
    child = [sys.executable, __file__, "--workload"]
    if args.dry_run:
        import vitpatch.functional  # noqa: F401 - what the workload imports
        import vitpatch.masks  # noqa: F401
        print(f"gpu_ncu workload: window_attention and winft_attention fwd+bwd at {SHAPE}, bf16")
        print("gpu_ncu command: " + " ".join(ncu_command(child, TENSOR_METRICS[0])))
        return 0
    deadline = time.monotonic() + args.timeout
    result = {"shape": SHAPE, "attempts": []}
    for metrics in TENSOR_METRICS:
        left = deadline - time.monotonic()
        if left < 5:
            break
        cmd = ncu_command(child, metrics)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            result["attempts"].append({"metrics": list(metrics), "error": "timeout"})
            break
        launches = parse(done.stdout)
        result["attempts"].append({"metrics": list(metrics), "exit": done.returncode, "launches": len(launches),
                                   "stderr_tail": done.stderr[-800:]})
        if done.returncode == 0 and launches:
            result.update(command=" ".join(cmd), launches=launches)
            break
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["attempts"], indent=1))
    return 0 if result.get("launches") else 1


if __name__ == "__main__":
    sys.exit(main())
