"""``python -m bench``: run the benchmarks, append JSON rows, print ratio tables.

    python -m bench --quick --out /tmp/benchout              # small shapes, CPU, a few minutes
    python -m bench --device cuda --out bench/results         # the full GPU run
    python -m bench --device cuda --ops window_attention --time-limit 540 --out bench/results

Rows go to ``DIR/<device-slug>.jsonl`` (appended, one JSON object per line, written as each
case finishes). ``python -m bench.plot DIR`` draws plots from them.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
import time
from typing import List, Optional

from . import harness

MODULES = {
    "window_attention": "bench.window_attention",
    "winft_attention": "bench.winft_attention",
    "cluster_attention": "bench.cluster_attention",
    "models": "bench.models",
    "uncertainty": "bench.uncertainty",
    "heads": "bench.heads",
}
# op names that select part of a module
OP_ALIASES = {"cluster_pool": "cluster_attention", "paca_layer": "cluster_attention",
              "vit_model": "models", "pyramid_model": "models",
              "head_pruning": "heads", "head_metrics": "heads"}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (CPU: a few minutes)")
    p.add_argument("--ops", nargs="+", default=list(MODULES), choices=list(MODULES) + list(OP_ALIASES),
                   metavar="OP", help=f"what to run: {', '.join(list(MODULES) + list(OP_ALIASES))} (default: all)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", nargs="+", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default float32 on CPU, bfloat16 on CUDA, the dtype of the goals (models: AMP in that dtype)")
    p.add_argument("--out", default="bench/out", help="directory of the <device-slug>.jsonl row files")
    p.add_argument("--repeats", type=int, default=None, help="CPU: exactly this many timed calls per case")
    p.add_argument("--warmup", type=int, default=None, help="CPU: warm-up calls per case")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, recorded in every row (default: 1 for --quick on CPU, where a "
                        "shared machine makes multi-threaded timings erratic; torch's own choice otherwise)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--memory-runs", type=int, default=1, help="CPU: peak memory is the median of this many children")
    p.add_argument("--no-check", action="store_true", help="skip the max_abs_err check against the reference")
    p.add_argument("--filter", default=None, metavar="REGEX",
                   help="run only cases whose description matches, e.g. 'N=(197|577) ' or 'impl|vitpatch/'")
    p.add_argument("--limit", type=int, default=None, help="at most this many cases per module (smoke runs)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no new case after this many seconds (rows written so far are kept)")
    p.add_argument("--git-commit", default=None, metavar="SHA",
                   help="commit to record when the tree has no .git (a copy on another machine)")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    return p.parse_args(argv)


def _selection(ops: List[str]):
    """``{module name: set of op names to keep or None for all}``."""
    sel = {}
    for op in ops:
        if op in MODULES:
            sel[op] = None
        else:
            mod = OP_ALIASES[op]
            if sel.get(mod, set()) is not None:
                sel.setdefault(mod, set()).add(op)
    return sel


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    threads = args.threads
    if threads is None and args.quick and args.device == "cpu":
        threads = 1
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    if not args.no_memory and not args.list:
        harness.start_memory_worker()  # its imports overlap with the first cases
    dtypes = args.dtype or (["bfloat16"] if args.device == "cuda" else ["float32"])
    start = time.monotonic()
    deadline = None if args.time_limit is None else start + args.time_limit
    meta = harness.run_metadata(args.quick, args.git_commit)
    print(f"vitpatch bench run {meta['run_id']}: device {harness.device_name(args.device)}, torch {meta['torch']}, "
          f"triton {meta['triton']}, commit {(meta['git_commit'] or '?')[:10]}"
          f"{' (dirty)' if meta['git_dirty'] else ''}, threads {torch.get_num_threads()}, "
          f"{'quick' if args.quick else 'full'}")
    all_rows = []
    skipped = 0
    for j, dtype in enumerate(dtypes):
        cfg = harness.Config(extra_cpu_rows=(j == 0), device=args.device, dtype=dtype, quick=args.quick, repeats=args.repeats,
                             warmup=args.warmup, memory=not args.no_memory, memory_runs=args.memory_runs,
                             check=not args.no_check,
                             limit=args.limit, deadline=deadline, threads=threads)
        for name, keep in _selection(args.ops).items():
            module = importlib.import_module(MODULES[name])
            cases = module.cases(cfg)
            if keep is not None:
                cases = [c for c in cases if c.op in keep]
            if args.filter:
                pattern = re.compile(args.filter)
                cases = [c for c in cases if pattern.search(c.describe())]
            if args.limit is not None:
                cases = cases[:args.limit]
            if args.list:
                for c in cases:
                    print(f"  {c.describe()}")
                continue
            print(f"\n{name} ({dtype}): {len(cases)} cases")
            rows, sk = harness.run_cases(cases, cfg, meta, module, out_dir=args.out)
            all_rows += rows
            skipped += sk
    if args.list:
        return 0
    wall = time.monotonic() - start
    print("\n" + harness.format_tables(all_rows))
    print("\nRows per op and impl (ok = measured):\n" + harness.count_rows(all_rows))
    files = sorted({str(harness.rows_path(args.out, r["device"])) for r in all_rows})
    print(f"\n{len(all_rows)} rows appended to {', '.join(files) or '(none)'}"
          f"{f'; {skipped} cases not run (time limit)' if skipped else ''}; wall time {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
