"""Paper 003 / 002 analysis cost (docs/math.md §8–9): batched head pruning, streaming per-head metrics.

``head_pruning`` (op), mode ``fwd``: head importance (paper 003 eq. 3–6) of every head of a
timm ViT with random weights, ``L * h * len(modes)`` pruned variants per image.

``batched``  :func:`vitpatch.analysis.head_importance`: block inputs cached from one forward,
             the ``h * modes`` variants of block ``l`` as one batch from block ``l`` on.
``loop``     :func:`vitpatch.analysis.head_importance_loop`: one full forward of the batch per
             pruned head (the plain way). The error column is ``max |I_batched - I_loop|``.

``head_metrics`` (op), mode ``fwd``: KK/KN/NK/NN and AFI (paper 002 eq. 3–5), k-hop strength,
its entropy and the mean attention distance (paper 003) of every layer and head.

``streaming``  each layer's ``(B, h, N, N)`` map from :func:`vitpatch.analysis.attention_maps`
               reduced to per-head numbers before the next exists.
``stacked``    every layer's map stacked to ``(B, L, h, N, N)`` first, then the same functions.

``python -m bench.heads --out bench/results`` runs the quick CPU cases (ViT-Tiny at 224, 8
images) alone and appends rows whose ``extra`` holds ``time_ratio`` and ``mem_ratio``
(subject / anchor, same run: ``batched / loop``, ``streaming / stacked``). ``python -m bench
--ops heads`` runs the same cases through the shared runner (rows without the ratio fields).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional

from .common import torch_dtype
from .harness import Case, Config, Prepared

MODULE = "bench.heads"
OPS = ("head_pruning", "head_metrics")
PAIRS = {"head_pruning": ("batched", "loop"), "head_metrics": ("streaming", "stacked")}


def problem_sizes(cfg: Config) -> Dict[str, List[Dict[str, Any]]]:
    if cfg.quick or cfg.device == "cpu":
        return {"head_pruning": [{"model": "vit_tiny_patch16_224", "img": 224, "B": 8, "modes": [1]}],
                "head_metrics": [{"model": "vit_tiny_patch16_224", "img": 224, "B": 8}]}
    return {"head_pruning": [{"model": "vit_base_patch16_224", "img": 224, "B": 8, "modes": [1]},
                             {"model": "vit_base_patch16_224", "img": 224, "B": 8, "modes": [1, 2, 3, 4, 5]}],
            "head_metrics": [{"model": "vit_base_patch16_224", "img": 224, "B": 8},
                             {"model": "vit_base_patch16_224", "img": 384, "B": 8}]}


def cases(cfg: Config) -> List[Case]:
    out = []
    sizes = problem_sizes(cfg)
    for op in OPS:
        for size in sizes[op]:
            for impl in PAIRS[op]:
                # the plain loop is slow on a CPU: few repeats, one warm-up
                opts = {"repeats": 3, "warmup": 1} if cfg.device == "cpu" and op == "head_pruning" else {}
                out.append(Case(MODULE, op, impl, "fwd", dict(size), cfg.device, cfg.dtype, opts))
    return out


def _model(s, device, dtype):
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model(s["model"], pretrained=False, img_size=s["img"]).to(device=device, dtype=dtype).eval()


def _metrics(maps, counts, grid, patch, P):
    """Every per-head metric of §8–9 from an iterable of maps (each (B, ..., h, N, N))."""
    import torch
    from vitpatch import analysis

    out = []
    for A in maps:
        th = analysis.interrelation(A, counts, P)
        s = analysis.interrelation_summary(th, counts)
        k = analysis.khop_strength(A, grid, P)
        out.append(torch.stack([s.KK, s.NK, analysis.focus_index(A, P), analysis.strength_entropy(k),
                                analysis.mean_attention_distance(A, grid, patch, P)], -1))
    return out


def build(case: Case, check: bool = True) -> Prepared:
    import torch
    from vitpatch import analysis

    s, impl = case.shape, case.impl
    device, dtype = torch.device(case.device), torch_dtype(case.dtype)
    model = _model(s, device, dtype)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(s["B"], 3, s["img"], s["img"], generator=g).to(device=device, dtype=dtype)
    P, grid = analysis.model_layout(model)
    L, h = len(model.blocks), model.blocks[0].attn.num_heads
    info: Dict[str, Any] = {"extra": {"layers": L, "heads": h, "tokens": P + grid[0] * grid[1], "weights": "random"}}
    if case.op == "head_pruning":
        modes = tuple(s["modes"])
        info["extra"]["pruned_variants_per_image"] = L * h * len(modes)
        fns = {"batched": lambda: analysis.head_importance(model, images, modes=modes),
               "loop": lambda: analysis.head_importance_loop(model, images, modes=modes)}
        if impl not in fns:
            raise ValueError(f"unknown impl {impl!r} for head_pruning")
        if check and impl == "batched":
            a, b = fns["batched"](), fns["loop"]()
            info["max_abs_err"] = max(float((getattr(a, k) - getattr(b, k)).abs().max())
                                      for k in ("prob", "jsd", "cls", "patch"))
        return Prepared(step=fns[impl], info=info, items_per_step=s["B"])
    if case.op != "head_metrics":
        raise ValueError(f"unknown op {case.op!r} in {MODULE}")
    counts = torch.randint(0, 3, (s["B"], grid[0] * grid[1]), generator=g)
    patch = s["img"] // grid[1]

    def streaming():
        return torch.stack(_metrics(analysis.attention_maps(model, images), counts, grid, patch, P), 1)

    def stacked():
        A = torch.stack(list(analysis.attention_maps(model, images)), 1)  # (B, L, h, N, N)
        return _metrics([A], counts, grid, patch, P)[0]

    fns = {"streaming": streaming, "stacked": stacked}
    if impl not in fns:
        raise ValueError(f"unknown impl {impl!r} for head_metrics")
    if check and impl == "streaming":
        info["max_abs_err"] = float((streaming() - stacked()).abs().nan_to_num(0).max())

    def step():
        with torch.no_grad():
            return fns[impl]()
    return Prepared(step=step, info=info, items_per_step=s["B"])


def add_ratios(rows: List[Dict[str, Any]]) -> None:
    """Put ``time_ratio`` / ``mem_ratio`` (subject / anchor, same run) into each subject row's ``extra``."""
    from . import harness

    for op, (subject, anchor) in PAIRS.items():
        for r, a, t in harness.ratio_rows(rows, subject, anchor, "median_ms", op=op):
            r["extra"]["time_ratio"] = t
            r["extra"]["mem_ratio"] = harness.ratio(r, a, "peak_mem_mb")
            r["extra"]["ratio_anchor"] = anchor


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.heads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/out", help="directory of the <device-slug>.jsonl row files")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (recorded in every row)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--note", default=None, help="text put in every row's extra.run_note (e.g. 'shared machine')")
    p.add_argument("--git-commit", default=None, metavar="SHA")
    args = p.parse_args(argv)
    import torch

    from . import harness

    torch.set_num_threads(max(1, args.threads))
    if not args.no_memory:
        harness.start_memory_worker()
    cfg = harness.Config(device=args.device, dtype="float32", quick=args.device == "cpu",
                         memory=not args.no_memory, threads=args.threads)
    meta = harness.run_metadata(cfg.quick, args.git_commit)
    module = sys.modules[__name__]
    rows = [harness.run_case(c, cfg, meta, module) for c in cases(cfg)]
    add_ratios(rows)
    for r in rows:
        if args.note:
            r["extra"]["run_note"] = args.note
        harness.append_rows(harness.rows_path(args.out, r["device"]), [r])
    print(harness.format_tables(rows, {op: [pair] for op, pair in PAIRS.items()}))
    for r in rows:
        if "time_ratio" in r["extra"]:
            print(f"{r['op']}: {r['impl']}/{r['extra']['ratio_anchor']} time {r['extra']['time_ratio']:.3f}x, "
                  f"memory {r['extra']['mem_ratio'] if r['extra']['mem_ratio'] is None else round(r['extra']['mem_ratio'], 3)}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
