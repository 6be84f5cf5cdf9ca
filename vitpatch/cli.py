"""The ``vitpatch`` command line (``vitpatch --help``; ``python -m vitpatch.cli``).

Subcommands:

- ``vitpatch windows``: AWD windows and DIP keep masks for an image folder, written as
  memory-mapped ``.npy`` files; resumable; shards over GPUs under ``torchrun``
  (paper 000 §4.1–4.2, docs/math.md §3–4; :func:`vitpatch.analysis.run_windows`).
- ``vitpatch analyze``: the paper's figures for one image (Fig. 3, 4, 5, 11, 12) as PNGs.

Adding a subcommand: decorate a function that configures its ``argparse`` parser with
:func:`command`; the function must set ``parser.set_defaults(func=run)`` where
``run(args) -> int`` does the work. Commands appear in ``--help`` in registration order::

    @command("demo", help="...")
    def _demo(parser):
        parser.add_argument(...)
        parser.set_defaults(func=_run_demo)

Nothing heavy is imported at module import: ``--help`` is fast, and torch/timm/matplotlib
load only when a command runs. Pretrained weights are never downloaded: pass a local
``--checkpoint``; without one the model has random weights and a warning says so.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Callable, Dict, List, Optional, Tuple

__all__ = ["main", "build_parser", "command", "COMMANDS"]

#: name -> (one-line help, function configuring the subparser)
COMMANDS: Dict[str, Tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, help: str):
    """Register a subcommand: ``configure(parser)`` adds its arguments and ``set_defaults(func=...)``."""
    def deco(configure):
        if name in COMMANDS:
            raise ValueError(f"vitpatch subcommand {name!r} is already registered")
        COMMANDS[name] = (help, configure)
        return configure
    return deco


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; appends a default only where there is a meaningful one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitpatch",
        description="Patch-interaction analysis and efficient attention for Vision Transformers.",
        formatter_class=_Formatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vitpatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, configure) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)
        configure(p)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, metavar="NAME", help="timm model name, e.g. vit_base_patch16_224")
    g.add_argument("--checkpoint", metavar="FILE", default=None,
                   help="local weights (.pth/.pt/.bin or .safetensors); never downloaded. Without it the model "
                        "has random weights and its windows are meaningless")
    g.add_argument("--img-size", type=int, default=None, metavar="PIXELS",
                   help="input size (square); the checkpoint's position embedding is resampled to it")
    g.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu; cuda:LOCAL_RANK under torchrun)")


def _fraction_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("windows (paper 000 eq. 4, §4.2)")
    g.add_argument("--alpha", type=float, default=0.1,
                   help="fraction of U's n^2 entries kept (T = round(alpha n^2)), in (0, 1]")
    g.add_argument("--beta", type=float, default=0.2,
                   help="fraction of patches dropped as indiscriminative (round(beta n)), in [0, 1)")


def _load(args, device: str):
    """Load the model, turning the random-weights warning into a clear line on stderr."""
    from .analysis.pipeline import load_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, weights = load_model(args.model, args.checkpoint, args.img_size, device)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return model, weights


def _default_device(requested: Optional[str]) -> str:
    import torch

    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------- windows
@command("windows", help="compute AWD windows and DIP keep masks for an image folder (resumable, torchrun-shardable)")
def _windows_parser(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Writes windows.npy (int16, (num_images, n, 4)), keep.npy (bool, (num_images, n)), files.npy "
                "(the image index), done.npy (finished batches) and meta.json to --out. Rerunning the same "
                "command resumes an interrupted run. Under `torchrun --nproc_per_node G -m vitpatch.cli windows "
                "...` each rank computes a contiguous share of the batches into the same files.")
    _model_args(p)
    p.add_argument("--data", required=True, metavar="DIR",
                   help="image folder: DIR/<class>/<image> (ImageFolder style) or a flat DIR/<image>")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _fraction_args(p)
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=32, help="images per batch (the unit of resuming)")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--max-batches", type=int, default=None,
                   help="stop after this many batches (per process); rerun to continue")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a run with different settings found in --out (a matching run is resumed)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_windows)


def _init_distributed(device: Optional[str]):
    """``(device, initialised_here)``: join the torchrun process group when ``WORLD_SIZE > 1``."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _default_device(device), False
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = device or "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        return device, True
    return device, False


def _run_windows(args) -> int:
    from .analysis.pipeline import ImageFiles, eval_transform, run_windows
    from .analysis.windows import _check_fraction

    _check_fraction(args.alpha, "alpha", True, False)
    _check_fraction(args.beta, "beta", False, True)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    device, own_group = _init_distributed(args.device)
    try:
        model, weights = _load(args, device)
        transform, cfg = eval_transform(model)
        dataset = ImageFiles(args.data, transform)
        meta = {"model": args.model, "weights": weights, "input_size": list(cfg["input_size"]),
                "interpolation": cfg.get("interpolation"), "crop_pct": cfg.get("crop_pct"),
                "crop_mode": cfg.get("crop_mode"), "mean": list(cfg["mean"]), "std": list(cfg["std"])}
        summary = run_windows(model, dataset, args.out, alpha=args.alpha, beta=args.beta,
                              batch_size=args.batch_size, device=device, num_workers=args.num_workers,
                              max_batches=args.max_batches, overwrite=args.overwrite,
                              progress=not args.no_progress, meta=meta)
        if summary["rank"] == 0:
            state = "complete" if summary["complete"] else "incomplete (rerun the same command to resume)"
            who = f" by rank 0 of {summary['world_size']}" if summary["world_size"] > 1 else ""
            print(f"{len(dataset)} images in {summary['batches_total']} batches: {summary['batches_done']} computed"
                  f"{who}, {summary['batches_skipped']} already done: {state}; files in {args.out}")
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------- analyze
@command("analyze", help="draw the paper's patch-interaction figures (U rows, U matrix, windows, responsive field) "
                         "for one image")
def _analyze_parser(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Writes fig3_uncertainty_rows.png, fig4_windows.png, fig5_indiscriminative.png, "
                "fig11_field_tendency.png, fig12_field_size.png and summary.json to --out.")
    p.add_argument("image", metavar="IMAGE", help="an image file")
    _model_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the PNGs")
    _fraction_args(p)
    p.add_argument("--patches", type=int, nargs="+", default=None, metavar="P",
                   help="patch indices (row-major on the grid) for the U-row and window figures "
                        "(default: centre and three off-centre patches)")
    p.add_argument("--dpi", type=int, default=110, help="PNG resolution")
    p.set_defaults(func=_run_analyze)


def _run_analyze(args) -> int:
    from . import analysis
    from .analysis import plots
    from .analysis.windows import _check_fraction

    _check_fraction(args.alpha, "alpha", True, False)
    _check_fraction(args.beta, "beta", False, True)
    if not os.path.isfile(args.image):
        raise ValueError(f"IMAGE {args.image!r} is not a file")
    device = _default_device(args.device)
    model, weights = _load(args, device)
    transform, cfg = analysis.eval_transform(model)
    from PIL import Image

    with Image.open(args.image) as im:
        x = transform(im.convert("RGB")).unsqueeze(0)
    P, grid = analysis.model_layout(model)
    n = grid[0] * grid[1]
    if args.patches is not None:
        bad = [q for q in args.patches if not 0 <= q < n]
        if bad:
            raise ValueError(f"--patches must be in [0, {n}) for the grid {grid}, got {bad}")
    windows, keep, U = analysis.compute_windows(model, x, args.alpha, args.beta, return_u=True)
    size, tendency, R = analysis.responsive_field(windows, keep, grid, return_raw=True)
    img = plots.display_image(x[0], cfg["mean"], cfg["std"])
    U0, w0, k0 = U[0].cpu(), windows[0].cpu(), keep[0].cpu()
    figs = {
        "fig3_uncertainty_rows.png": plots.plot_uncertainty_rows(img, U0, grid, args.patches),
        "fig4_windows.png": plots.plot_windows(img, w0, grid, args.patches, keep=k0),
        "fig5_indiscriminative.png": plots.plot_uncertainty_matrix(U0, k0, img, grid),
        "fig11_field_tendency.png": plots.plot_field_tendency(img, tendency[0].cpu(), grid, keep=k0),
        "fig12_field_size.png": plots.plot_field_size(img, size[0].cpu(), grid),
    }
    os.makedirs(args.out, exist_ok=True)
    written = [plots.save_figure(fig, os.path.join(args.out, name), dpi=args.dpi) for name, fig in figs.items()]
    summary = {
        "image": os.path.abspath(args.image), "model": args.model, "weights": weights, "grid": list(grid),
        "num_prefix_tokens": P, "alpha": args.alpha, "beta": args.beta,
        "effective_operations": analysis.effective_operations(windows, grid),
        "effective_operations_with_dip": analysis.effective_operations(windows, grid, keep),
        "full_attention_operations": n * n, "dropped_patches": int((~keep).sum()),
        "mean_field_size": float(size.double().mean()),
    }
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    for path in written:
        print(path)
    print(f"EO {summary['effective_operations']:.0f} of {n * n} ({summary['effective_operations_with_dip']:.0f} "
          f"with DIP); {summary['dropped_patches']} patches dropped")
    return 0


# ---------------------------------------------------------------------------------------- demo
@command("demo", help="the whole pipeline end to end on scikit-learn's digits: ViT, analysis, AWD-ViT, "
                      "WinfT, PaCa (minutes on a CPU)")
def _demo_parser(p: argparse.ArgumentParser) -> None:
    from .demo import DemoConfig

    d = DemoConfig()
    p.epilog = ("Writes summary.json (accuracy, EO, train time and attention backend per model) and figures "
                "(U matrix, windows, responsive field, cluster heatmaps, accuracy vs EO) to --out.")
    p.add_argument("--out", default=d.out, metavar="DIR", help="output folder")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs per model")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of data split, initialisation and batches")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    p.add_argument("--alpha", type=float, default=d.alpha, help="AWD window fraction alpha (eq. 4)")
    p.add_argument("--beta", type=float, default=d.beta, help="DIP fraction beta of dropped patches")
    p.add_argument("--clusters", type=int, default=d.num_clusters, help="PaCa clusters M")
    p.add_argument("--max-steps", type=int, default=None, help="cap optimizer steps per model (quick checks)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .analysis.windows import _check_fraction
    from .demo import DemoConfig, run_demo

    _check_fraction(args.alpha, "alpha", True, False)
    _check_fraction(args.beta, "beta", False, True)
    if args.clusters < 1:
        raise ValueError(f"--clusters must be >= 1, got {args.clusters}")
    cfg = DemoConfig(out=args.out, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size,
                     alpha=args.alpha, beta=args.beta, num_clusters=args.clusters, max_steps=args.max_steps,
                     device=_default_device(args.device))
    run_demo(cfg)
    return 0


# ---------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``vitpatch`` command; returns the exit status (2 for bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"vitpatch {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
