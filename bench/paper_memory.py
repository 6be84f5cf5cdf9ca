"""Peak memory of the paper commands against the number of images (issue: streamed statistics).

``python -m bench.paper_memory [--out bench/results] [--counts 64 512]`` writes a folder of
random RGB images in class folders, a ViT-Tiny checkpoint at 64 px with as many classes, and
runs ``vitpatch heads`` and ``vitpatch semantic --mask-prompt`` on the first ``n`` images of it
for each ``n`` in ``--counts``, each command in its own process, reading that process's peak
resident set size from ``os.wait4``. With every per-image statistic streamed, the peak does not
grow with ``n``: the JSON (``paper_memory.json``) records each peak and the ratio of the largest
``n`` to the smallest, which should stay within 1.2x. CPU only; no timings are taken.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

MODEL = "vit_tiny_patch16_224"
CLASSES = 4


def _folder(root: str, n: int, seed: int = 0) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = os.path.join(root, f"c{i % CLASSES}")
        os.makedirs(sub, exist_ok=True)
        Image.fromarray((rng.random((72, 80, 3)) * 255).astype(np.uint8)).save(os.path.join(sub, f"{i:05d}.png"))
    return root


def _checkpoint(path: str) -> str:
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(MODEL, img_size=64, num_classes=CLASSES)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def _peak_rss(argv, env) -> int:
    """Run ``argv``; its peak RSS in bytes (Linux ``ru_maxrss`` is in KiB)."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{err[-3000:]}")
    return int(usage.ru_maxrss) * 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results", help="folder of paper_memory.json")
    p.add_argument("--counts", type=int, nargs="+", default=[64, 512], help="numbers of images")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    if min(args.counts) < 1:
        raise SystemExit("--counts must be positive")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = _folder(os.path.join(tmp, "data"), max(args.counts))
        ck = _checkpoint(os.path.join(tmp, "vit_tiny_64.pth"))
        common = ["--model", MODEL, "--checkpoint", ck, "--img-size", "64", "--batch-size", str(args.batch_size),
                  "--no-progress"]
        commands = {"heads": ["heads", data, "--modes", "1", "4", "--ae-epochs", "2"],
                    "semantic --mask-prompt": ["semantic", data, "--mask-prompt"]}
        for name, cmd in commands.items():
            for n in args.counts:
                out = os.path.join(tmp, f"out_{name.split()[0]}_{n}")
                t0 = time.perf_counter()
                peak = _peak_rss([sys.executable, "-m", "vitpatch.cli", *cmd, *common, "--max-images", str(n),
                                  "--out", out], env)
                rows.append({"command": f"vitpatch {name}", "images": n, "peak_rss_bytes": peak,
                             "wall_s": round(time.perf_counter() - t0, 1)})
                print(f"vitpatch {name}: {n} images, peak RSS {peak / 2**20:.0f} MiB", flush=True)
    summary = {}
    for name in commands:
        mine = sorted((r for r in rows if r["command"] == f"vitpatch {name}"), key=lambda r: r["images"])
        summary[f"vitpatch {name}"] = {"ratio_largest_to_smallest": mine[-1]["peak_rss_bytes"] / mine[0]["peak_rss_bytes"],
                                       "images": [r["images"] for r in mine]}
    result = {"benchmark": "paper_memory", "device": platform.processor() or platform.machine(),
              "cpu": _cpu_name(), "python": platform.python_version(), "model": f"{MODEL} at 64 px",
              "batch_size": args.batch_size, "rows": rows, "summary": summary,
              "measured": time.strftime("%Y-%m-%d")}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "paper_memory.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    for name, s in summary.items():
        print(f"{name}: peak at {s['images'][-1]} images / at {s['images'][0]} = {s['ratio_largest_to_smallest']:.3f}")
    print(f"wrote {path}")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
