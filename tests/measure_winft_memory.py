"""Peak CPU memory of WinfT forward + backward: the chunked PyTorch path against the eager reference.

Not a test (pytest does not collect it): a measurement for reports. Each measurement runs in a
fresh child process, which resets its peak resident set size (``/proc/self/clear_refs``), reads
``VmRSS`` just before one forward + backward (inputs, imports and the target already in
memory) and ``VmHWM`` (peak RSS) after it; the difference is the memory that run needed.

    python tests/measure_winft_memory.py                 # B=1, h=8, N=2048, d=64, float32, 3 repeats
    python tests/measure_winft_memory.py --N 1024 --repeats 1

Prints one JSON line per measurement and a summary of ``chunked / reference`` per setting
(median over repeats). The goal for the chunked path is at most 1/3.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    from vitpatch import WindowMask, chunked, reference
    from vitpatch.masks import synthetic_awd_windows

    B, h, N, d = args.B, args.h, args.N, args.d
    gw = 64 if N % 64 == 0 else N
    grid = (N // gw, gw)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, N, d, generator=gen).requires_grad_() for _ in range(3))
    dout = torch.randn(B, h, N, d, generator=gen)
    target = WindowMask(synthetic_awd_windows(grid, B, 0.23, seed=0), grid) if args.target else None

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS:")
    if args.impl == "reference":
        out, loss, _ = reference.winft_attention(q, k, v, mode=args.mode, target=target, return_gate_sum=True)
    else:
        out, loss, _ = chunked.winft_attention(q, k, v, d ** -0.5, args.mode, target)
    obj = (out * dout).sum()
    if target is not None:
        obj = obj + loss
    obj.backward()
    peak = _status("VmHWM:")
    print(json.dumps({"impl": args.impl, "mode": args.mode, "target": bool(args.target), "B": B, "h": h,
                      "N": N, "d": d, "chunk_mb": os.environ.get("VITPATCH_CHUNK_MB", "64"),
                      "peak_extra_MB": round((peak - base) / 2**20, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--h", type=int, default=8)
    p.add_argument("--N", type=int, default=2048)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="chunked", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="multiply", help=argparse.SUPPRESS)
    p.add_argument("--target", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    for mode in ("multiply", "mask"):
        for target in (1, 0):
            for impl in ("reference", "chunked"):
                for _ in range(args.repeats):
                    cmd = [sys.executable, __file__, "--child", f"--impl={impl}", f"--mode={mode}",
                           f"--target={target}", f"--B={args.B}", f"--h={args.h}", f"--N={args.N}", f"--d={args.d}"]
                    line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                    print(line, flush=True)
                    rows.append(json.loads(line))
    print("summary (median peak extra MB over repeats):")
    for mode in ("multiply", "mask"):
        for target in (True, False):
            med = {impl: statistics.median(r["peak_extra_MB"] for r in rows
                                           if r["impl"] == impl and r["mode"] == mode and r["target"] == target)
                   for impl in ("reference", "chunked")}
            print(f"  mode={mode:8s} target={str(target):5s} reference {med['reference']:7.1f}  "
                  f"chunked {med['chunked']:7.1f}  ratio {med['chunked'] / med['reference']:.3f}")


if __name__ == "__main__":
    main()
