"""The ``vitpatch`` command line (``vitpatch --help``; ``python -m vitpatch.cli``).

Subcommands:

- ``vitpatch windows``: AWD windows and DIP keep masks for an image folder, written as
  memory-mapped ``.npy`` files; resumable; shards over GPUs under ``torchrun``
  (paper 000 §4.1–4.2, docs/math.md §3–4; :func:`vitpatch.analysis.run_windows`).
- ``vitpatch analyze``: the paper's figures for one image (Fig. 3, 4, 5, 11, 12) as PNGs.
- ``vitpatch semantic``: paper 002 over images or a folder: SIFT keypoint interrelation, focus
  index, optionally mask-as-prompt accuracy (docs/math.md §8), JSON and figures.
- ``vitpatch heads``: paper 003 over images or a folder: head importance by pruning, k-hop
  strength, mean attention distance, attention patterns (docs/math.md §9), JSON and figures.
- ``vitpatch interactions``: paper 000 Fig. 2, attention between inner-object patch pairs and
  inner-outer pairs per layer, streamed over images (docs/math.md §2).
- ``vitpatch clusters``: paper 004 §3.5, PaCa cluster importance by masking the input with
  ``1 - H^m``, the most important clusters drawn over the images (docs/math.md §7).
- ``vitpatch train`` / ``vitpatch eval``: the papers' training experiments on an image folder
  (:mod:`vitpatch.train`); ``python -m vitpatch.train`` for ``torchrun``.

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

from ._dist import default_device  # no torch import at module import: it loads inside the call

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


def _run_windows(args) -> int:
    from .analysis.pipeline import ImageFiles, eval_transform, run_windows
    from .analysis.windows import _check_fraction

    _check_fraction(args.alpha, "alpha", True, False)
    _check_fraction(args.beta, "beta", False, True)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    from ._dist import init_distributed

    device, own_group = init_distributed(args.device)
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
@command("analyze", help="draw the paper's patch-interaction figures (attention rows, U rows, U matrix, windows, "
                         "beta sweep of DIP, responsive field) for one image")
def _analyze_parser(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Writes fig3a_attention_rows.png, fig3_uncertainty_rows.png, fig4_windows.png, "
                "fig5_indiscriminative.png, fig6_beta_sweep.png, fig11_field_tendency.png, fig12_field_size.png "
                "and summary.json to --out. With --windows-run the image's stored windows and keep mask (and the "
                "run's alpha and beta) are drawn; U, the attention rows and the beta sweep are recomputed with "
                "--model/--checkpoint, which must be the run's. Fig. 2 over many images: `vitpatch interactions`.")
    p.add_argument("image", metavar="IMAGE", help="an image file")
    _model_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the PNGs")
    _fraction_args(p)
    p.add_argument("--patches", type=int, nargs="+", default=None, metavar="P",
                   help="patch indices (row-major on the grid) for the attention-row, U-row and window figures "
                        "(default: centre and three off-centre patches)")
    p.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.07, 0.1, 0.15, 0.2, 0.5], metavar="BETA",
                   help="DIP fractions of the beta sweep (Fig. 6), each in [0, 1)")
    p.add_argument("--windows-run", default=None, metavar="DIR",
                   help="a `vitpatch windows` output folder holding IMAGE: draw its stored windows and keep mask "
                        "(--alpha/--beta are then the run's)")
    p.add_argument("--dpi", type=int, default=110, help="PNG resolution")
    p.set_defaults(func=_run_analyze)


def _run_analyze(args) -> int:
    from . import analysis
    from .analysis.paper000_stats import analyze_report, run_entry
    from .analysis.windows import _check_fraction

    _check_fraction(args.alpha, "alpha", True, False)
    _check_fraction(args.beta, "beta", False, True)
    for b in args.betas:
        _check_fraction(b, "--betas", False, True)
    if not os.path.isfile(args.image):
        raise ValueError(f"IMAGE {args.image!r} is not a file")
    stored = None
    if args.windows_run is not None:  # fail before loading the model when IMAGE is not in the run
        index, w_run, k_run, meta = run_entry(args.windows_run, args.image)
        stored = (w_run, k_run)
    device = default_device(args.device)
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
    alpha, beta = args.alpha, args.beta
    if stored is not None:
        theirs = {"model": meta.get("model"), "weights": meta.get("weights"), "input_size": meta.get("input_size"),
                  "grid": meta.get("grid"), "num_prefix_tokens": meta.get("num_prefix_tokens")}
        ours = {"model": args.model, "weights": weights, "input_size": list(cfg["input_size"]), "grid": list(grid),
                "num_prefix_tokens": P}
        diff = [f"{k}: run {theirs[k]!r}, now {ours[k]!r}" for k in ours if theirs[k] != ours[k]]
        if diff:
            raise ValueError(f"--windows-run {args.windows_run!r} was made with another model or input ("
                             f"{'; '.join(diff)}); pass the run's --model, --checkpoint and --img-size")
        alpha, beta = float(meta["alpha"]), float(meta["beta"])
    summary, figs = analyze_report(model, x, alpha=alpha, beta=beta, patches=args.patches, betas=args.betas,
                                   mean=cfg["mean"], std=cfg["std"], stored=stored)
    os.makedirs(args.out, exist_ok=True)
    written = _save_figures(figs, args.out, args.dpi)
    summary = {"image": os.path.abspath(args.image), "model": args.model, "weights": weights, **summary}
    if stored is not None:
        summary["windows_run"].update(dir=os.path.abspath(args.windows_run), index=int(index))
        run = summary["windows_run"]
        if run["windows_differ"] or run["keep_differ"]:
            print(f"warning: recomputed U does not reproduce the stored run for {args.image}: {run['windows_differ']} "
                  f"windows and {run['keep_differ']} keep entries of {n} patches differ (other device or weights); "
                  f"the stored ones are drawn", file=sys.stderr)
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    for path in written:
        print(path)
    print(f"EO {summary['effective_operations']:.0f} of {n * n} ({summary['effective_operations_with_dip']:.0f} "
          f"with DIP); {summary['dropped_patches']} patches dropped")
    return 0


# -------------------------------------------------------------------------------- interactions
@command("interactions", help="paper 000 Fig. 2: attention between inner-object patch pairs and inner-outer pairs, "
                              "layer by layer, over images or image folders (streamed)")
def _interactions_parser(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Writes inner_outer.json (per layer: mean and std over images of each image's mean inner-inner and "
                "inner-outer pair score, the pooled pair mean and std; the example image's patches A, B, C) and "
                "fig2_inner_outer.png to --out. The object is given by --object-masks (segmentation files) or "
                "--object-box (a box of the model input, by default its central half).")
    _images_positional(p)
    _model_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the JSON results and the PNG")
    g = p.add_argument_group("object (the inner patches)")
    g.add_argument("--object-masks", default=None, metavar="DIR",
                   help="segmentation masks: DIR/<path of the image below its IMAGE_OR_DIR folder, or its file "
                        "name>.png (any image extension), the image's size, non-zero = object")
    g.add_argument("--object-box", type=float, nargs=4, default=None, metavar=("X0", "Y0", "X1", "Y1"),
                   help="the object as a box of the model input, fractions of width and height; a patch is inner "
                        "when its centre is inside (default without --object-masks: 0.25 0.25 0.75 0.75)")
    g.add_argument("--mask-threshold", type=float, default=0.5,
                   help="with --object-masks: a patch is inner when at least this fraction of its pixels is object")
    g = _run_group(p)
    g.add_argument("--seed", type=int, default=0, help="seed of the example's random patches A, B, C")
    p.set_defaults(func=_run_interactions)


def _run_interactions(args) -> int:
    from . import analysis
    from .analysis.paper000_stats import ObjectMasks, box_objects, inner_outer_report

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be a positive integer, got {args.max_images}")
    if args.object_masks is not None and args.object_box is not None:
        raise ValueError("give --object-masks or --object-box, not both")
    if not 0 < args.mask_threshold <= 1:
        raise ValueError(f"--mask-threshold must be in (0, 1], got {args.mask_threshold}")
    files = _collect_images(args.images)[:args.max_images]
    device = default_device(args.device)
    model, weights = _load(args, device)
    transform, cfg = analysis.eval_transform(model)
    P, grid = analysis.model_layout(model)
    if args.object_masks is not None:
        objects = ObjectMasks(args.object_masks, transform, grid, threshold=args.mask_threshold,
                              roots=[d for d in args.images if os.path.isdir(d)])
        for f in files:  # every mask must exist: fail before the first forward
            objects.path(f)
        source = {"masks": os.path.abspath(args.object_masks), "threshold": args.mask_threshold}
    else:
        box = args.object_box if args.object_box is not None else [0.25, 0.25, 0.75, 0.75]
        try:
            inner = box_objects(grid, box)
        except ValueError as exc:
            raise ValueError(f"--object-box: {exc}") from None
        objects = lambda names, x: inner.expand(len(names), -1)  # noqa: E731
        source = {"box": list(box), "inner_patches": int(inner.sum())}

    def batches():
        import torch
        from PIL import Image
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc="interactions", unit="img", disable=args.no_progress)
        for i in range(0, len(files), args.batch_size):
            chunk = files[i:i + args.batch_size]
            xs = []
            for f in chunk:
                with Image.open(f) as im:
                    xs.append(transform(im.convert("RGB")))
            yield chunk, torch.stack(xs)
            bar.update(len(chunk))
        bar.close()

    summary, figs = inner_outer_report(model, batches(), objects=objects, mean=cfg["mean"], std=cfg["std"],
                                       seed=args.seed)
    summary = {"model": args.model, "weights": weights, "object": source, **summary}
    _write_report(args, "inner_outer.json", summary, figs)
    last = summary["num_layers"] - 1
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    print(f"{summary['num_images']} images; last layer: inner pairs {fmt(summary['inner']['mean'][last])}, "
          f"inner-outer pairs {fmt(summary['outer']['mean'][last])}; results in "
          f"{os.path.join(args.out, 'inner_outer.json')}")
    return 0


# ------------------------------------------------------------------------- semantic and heads
def _images_positional(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files and/or image folders (searched recursively)")


_LABELS_HELP = ("labels where an equation needs one: 'true' = the class folder of each image (one ImageFolder-style "
                "IMAGE_OR_DIR, DIR/<class>/<image>, classes sorted as the model's), 'pred' = the model's prediction "
                "on the unaltered image")


def _run_group(p: argparse.ArgumentParser, *, batch_size: int = 8, batch_help: str = "images per forward",
               labels_help: Optional[str] = None):
    """The ``run`` options of the commands over images (:func:`_image_batches` reads them); ``--labels``
    when ``labels_help`` is given. Returns the group, for a command's own run options."""
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    g.add_argument("--max-images", type=int, default=None, help="use only the first this many images")
    g.add_argument("--dpi", type=int, default=110, help="PNG resolution")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    if labels_help is not None:
        g.add_argument("--labels", choices=["true", "pred"], default="true", help=labels_help)
    return g


def _images_arg(p: argparse.ArgumentParser) -> None:
    """Images, model, ``--out`` and the run options of ``vitpatch semantic`` and ``heads``."""
    _images_positional(p)
    _model_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the JSON results and PNGs")
    _run_group(p, labels_help=_LABELS_HELP)


def _folder_labels(args, files: List[str], num_classes: Optional[int]):
    """``(labels, classes)``: the class index of each file and the sorted class folder names for
    ``--labels true`` (``(None, None)`` for ``--labels pred``).

    Needs one ImageFolder-style directory (every image in a class subfolder); its sorted class
    names are the label mapping, so their count must equal the model's number of classes.
    """
    if args.labels == "pred":
        return None, None
    if len(args.images) != 1 or not os.path.isdir(args.images[0]):
        raise ValueError("--labels true needs one image folder DIR/<class>/<image> (its class index is the label); "
                         "pass --labels pred to score against the model's own predictions")
    root = os.path.abspath(args.images[0])
    rel = [os.path.relpath(os.path.abspath(f), root).replace(os.sep, "/") for f in files]
    if not all("/" in r for r in rel):
        raise ValueError(f"--labels true: {args.images[0]!r} has images outside class subfolders; use "
                         f"DIR/<class>/<image> or --labels pred")
    classes = sorted({r.split("/", 1)[0] for r in rel})
    if num_classes is not None and len(classes) != num_classes:
        raise ValueError(f"--labels true: {args.images[0]!r} has {len(classes)} class folders but the model has "
                         f"{num_classes} classes; the sorted folder names must be the model's classes "
                         f"(or pass --labels pred)")
    index = {c: i for i, c in enumerate(classes)}
    return [index[r.split("/", 1)[0]] for r in rel], classes


def _collect_images(paths: List[str]) -> List[str]:
    from .analysis.pipeline import IMAGE_EXTENSIONS

    files: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            for dirpath, dirnames, names in os.walk(path):
                dirnames.sort()
                files += [os.path.join(dirpath, f) for f in sorted(names) if f.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"IMAGE_OR_DIR {path!r} is neither a file nor a folder")
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {paths}")
    return files


def _image_batches(args, transform, *, labelled: bool = False, num_classes: Optional[int] = None):
    """``(files, iterator of (names, batch), classes)`` over the images of ``args.images`` with a tqdm
    bar over images. With ``labelled`` the items are ``(names, batch, labels)``: ``labels`` a
    LongTensor of the class folders (``--labels true``, checked against ``num_classes`` by
    :func:`_folder_labels`, whose sorted names are ``classes``) or ``None`` (``--labels pred``;
    ``classes`` is ``None`` then and without ``labelled``). Nothing is kept after a batch is yielded."""
    from PIL import Image

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    files = _collect_images(args.images)
    labels, classes = _folder_labels(args, files, num_classes) if labelled else (None, None)  # the whole folder
    if args.max_images is not None:
        if args.max_images < 1:
            raise ValueError(f"--max-images must be a positive integer, got {args.max_images}")
        files = files[:args.max_images]
        labels = None if labels is None else labels[:args.max_images]

    def gen():
        import torch
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc=args.command, unit="img", disable=args.no_progress)
        for i in range(0, len(files), args.batch_size):
            chunk = files[i:i + args.batch_size]
            xs = []
            for f in chunk:
                with Image.open(f) as im:
                    xs.append(transform(im.convert("RGB")))
            if not labelled:
                yield chunk, torch.stack(xs)
            else:
                y = None if labels is None else torch.tensor(labels[i:i + args.batch_size], dtype=torch.long)
                yield chunk, torch.stack(xs), y
            bar.update(len(chunk))
        bar.close()
    return files, gen(), classes


def _save_figures(figs: Dict[str, object], out: str, dpi: int) -> List[str]:
    """Write each figure of ``figs`` (file name -> matplotlib figure) into ``out``; the paths written."""
    from .analysis import plots

    return [plots.save_figure(fig, os.path.join(out, name), dpi=dpi) for name, fig in figs.items()]


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def _write_report(args, json_name: str, summary: dict, figs: Dict[str, object]) -> str:
    """A report command's outputs in ``args.out``: ``json_name`` and the figures (each path printed);
    returns the JSON's path."""
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, json_name)
    _write_json(path, summary)
    for fig_path in _save_figures(figs, args.out, args.dpi):
        print(fig_path)
    return path


def _nan_list(t):
    """Nested lists with NaN as null (JSON has no NaN)."""
    import math

    def conv(v):
        if isinstance(v, list):
            return [conv(x) for x in v]
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return conv(t.tolist())


@command("semantic", help="paper 002: SIFT keypoint interrelation (KK/KN/NK/NN), attention focus index and "
                          "optionally mask-as-prompt accuracy, over images or an image folder")
def _semantic_parser(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Writes to --out: semantic.json (KK/KN/NK/NN and AFI per layer and head, mean and std over images; "
                "mask-as-prompt accuracies), semantic_images.jsonl (one line per image, written as it is done: "
                "keypoint counts, KK/KN/NK/NN and AFI per layer and head), fig3_keypoints.png, "
                "fig4_attended_row.png, fig5_interrelation.png, fig6_focus_index.png, fig7a_stages.png, "
                "fig7b_stage_heatmaps.png and, with --mask-prompt, fig8_mask_prompt.png and fig8_masked_images.png. "
                "Memory does not grow with the number of images. "
                'Needs OpenCV: pip install -e ".[semantic]".')
    _images_arg(p)
    g = p.add_argument_group("paper 002")
    g.add_argument("--gamma", type=float, default=1.0, help="attended-set threshold factor of eq. 2 (> 0)")
    g.add_argument("--unweighted", action="store_true", help="unweighted theta (|S_i ∩ S_key| / |S_i|) instead of eq. 3")
    g.add_argument("--variant", choices=["renorm", "literal"], default="renorm", help="focus index variant (eq. 5)")
    g.add_argument("--stages", type=int, nargs="*", default=None, metavar="LAYER",
                   help="first layer of each new stage (fig7a shading, fig7b panels); default: three equal stages "
                        "(L // 3, 2L // 3), the paper gives none; --stages alone: one stage")
    g.add_argument("--score-layers", type=int, nargs="+", default=None, metavar="LAYER",
                   help="layers whose theta (mean over heads) makes the patch score of mask as prompt (§5.1); "
                        "negative counts from the last layer (default: all layers)")
    g.add_argument("--mask-prompt", action="store_true",
                   help="also Top/Bottom mask-as-prompt accuracy (§5.1, Fig. 8), streamed; the label follows "
                        "--labels (true: the image folder's class, pred: the unmasked prediction)")
    g.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.4], metavar="R",
                   help="masking ratios of mask as prompt, in [0, 1]")
    g.add_argument("--mask-modes", nargs="+", choices=["pixel", "drop_tokens"], default=["pixel", "drop_tokens"],
                   help="mask as prompt: zero the patch pixels (normalised) and/or drop its token")
    p.set_defaults(func=_run_semantic)


def _run_semantic(args) -> int:
    from . import analysis
    from .analysis import semantic

    semantic.require_opencv()  # fail early with the install command
    if not args.gamma > 0:
        raise ValueError(f"--gamma must be > 0, got {args.gamma}")
    device = default_device(args.device)
    model, weights = _load(args, device)
    transform, cfg = analysis.eval_transform(model)
    _, batches, _ = _image_batches(args, transform, labelled=args.mask_prompt,
                                num_classes=getattr(model, "num_classes", None))
    batches = ([[os.path.abspath(f) for f in b[0]], *b[1:]] for b in batches)
    summary, figs = semantic.semantic_report(
        model, batches, gamma=args.gamma, weighted=not args.unweighted, variant=args.variant,
        score_layers=args.score_layers, stages=args.stages, mask_prompt=args.mask_prompt, ratios=args.ratios,
        modes=args.mask_modes, mean=cfg["mean"], std=cfg["std"], out=args.out)
    summary = {"model": args.model, "weights": weights,
               "labels": args.labels if args.mask_prompt else None, **summary}
    _write_report(args, "semantic.json", summary, figs)
    mean = {k: [v for v in summary["per_layer"][k] if v is not None] for k in ("KK", "NK", "AFI")}
    kk, nk, afi = (sum(v) / len(v) if v else float("nan") for v in mean.values())
    print(f"{summary['images']} images: KK {kk:.3f}, NK {nk:.3f}, AFI {afi:.3f} (mean over layers and heads); "
          f"results in {os.path.join(args.out, 'semantic.json')}, per image in "
          f"{os.path.join(args.out, semantic.PER_IMAGE_FILE)}")
    return 0


@command("heads", help="paper 003: head importance by pruning, k-hop attention strength, mean attention distance "
                       "and attention patterns, over images or an image folder")
def _heads_parser(p: argparse.ArgumentParser) -> None:
    p.epilog = ("One streaming pass (memory independent of the number of images; vitpatch.analysis.heads_report). "
                "Writes to --out: heads.json (mean and std over images of I_prob, P_ij[y], I_JSD, I_cls, I_patch "
                "per layer, head and mode; of the k-hop strength, its entropy and MAD; entropy histograms; the "
                "selected image and head with its top-5 predictions under pruning), per_image/*.npy (every "
                "image's values, memory-mapped), patch_patterns.npy (binarised patch patterns, bit-packed), "
                "images.txt, and the figures of paper 003: head_importance.png (Fig. 7 / B1, every mode), "
                "b2_head_modes.png, b3_top5.png, mode_bars.png (two or more modes), top5_heads.png, "
                "khop_strength.png (C2), entropy_layers.png (C1), c3_entropy_distribution.png, tsne_images.png "
                "(Fig. 1A), tsne_cls_patterns.png, d1_density_cls_patterns.png, tsne_patch_patterns.png, "
                "d1_density_patch_patterns.png, context_masks.png (D2), attention_heatmap.png (D4), "
                "d3_two_axes.png, d5_threshold_histogram.png. The selected head (--layer/--head) is by default "
                "the one of largest mean I_prob.")
    _images_arg(p)
    g = p.add_argument_group("paper 003")
    g.add_argument("--modes", type=int, nargs="+", default=[1], metavar="M",
                   help="pruning modes: 0 none, 1 all, 2 CLS->CLS, 3 CLS<->patches, 4 patches->patches, 5 = 2 + 3")
    g.add_argument("--layer", type=int, default=None,
                   help="layer of the selected head (B2, B3, C2, C3, D1-D5; default: that of the most important "
                        "head, or the middle layer when only --head is given)")
    g.add_argument("--head", type=int, default=None,
                   help="head of the selected head (default: the one of largest mean I_prob, within --layer if given)")
    g.add_argument("--image", type=int, default=0, help="index of the selected image (B1 line, B3, C3, D1-D5; default: 0, the first)")
    g.add_argument("--top", type=float, default=0.01,
                   help="share of a map's entries kept by the pattern binarisation and the D3/D5 threshold, in (0, 1]")
    g.add_argument("--tsne-max", type=int, default=2000,
                   help="most heads (and images) laid out by each t-SNE: a seeded uniform sample, plus the "
                        "selected image's heads")
    g.add_argument("--ae-epochs", type=int, default=30,
                   help="training epochs of the patch-pattern autoencoder (0: no patch-pattern figures)")
    p.set_defaults(func=_run_heads)


def _run_heads(args) -> int:
    from .analysis.heads import check_modes, heads_report
    from .analysis.pipeline import eval_transform

    modes = check_modes(args.modes)
    if args.image < 0:
        raise ValueError(f"--image must be a non-negative image index, got {args.image}")
    device = default_device(args.device)
    model, weights = _load(args, device)
    transform, cfg = eval_transform(model)
    files, batches, class_names = _image_batches(args, transform, labelled=True,
                                                 num_classes=getattr(model, "num_classes", None))
    if args.image >= len(files):
        raise ValueError(f"--image must be in [0, {len(files)}) (the images used), got {args.image}")
    summary, figs = heads_report(model, batches, out=args.out, modes=modes, layer=args.layer, head=args.head,
                                 image=args.image, ae_epochs=args.ae_epochs, top=args.top, tsne_max=args.tsne_max,
                                 class_names=class_names, mean=cfg["mean"], std=cfg["std"],
                                 progress=not args.no_progress)
    summary = {"model": args.model, "weights": weights, "labels": args.labels, "class_names": class_names, **summary}
    _write_report(args, "heads.json", summary, figs)
    sel = summary["selected"]
    print(f"{summary['images']} images ({args.labels} labels): selected head L{sel['layer']}H{sel['head']} "
          f"({sel['chosen_by']}); results in {os.path.join(args.out, 'heads.json')}")
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
                     device=default_device(args.device))
    run_demo(cfg)
    return 0


# ------------------------------------------------------------------------------------ clusters
@command("clusters", help="paper 004 §3.5: rank a trained PaCa model's clusters by the accuracy drop when each is "
                          "masked out of the images, and draw the most important ones as heatmaps (Figs. 4-6)")
def _clusters_parser(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Writes clusters.json (per PaCa layer and cluster: accuracy drop, mean and std of p_y(x) - p_y(x~), "
                "entropy; the ranking; the images used) and, per layer k, clusters_importance_layer{k}.png, "
                "clusters_top_layer{k}.png and clusters_per_image_layer{k}.png to --out. Without --model the model "
                "is rebuilt from the train_config.json that `vitpatch train` writes beside its checkpoints.")
    _images_positional(p)
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="trained weights: a `vitpatch train` checkpoint, or a file for --model")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="a registered PaCa model (paca_vit_*); default: the run's model from the train_config.json "
                        "beside --checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for clusters.json and the PNGs")
    g = p.add_argument_group("paper 004 §3.5")
    g.add_argument("--layer", nargs="+", default=None, metavar="L",
                   help="PaCa layer(s): indices among the model's PaCa attention layers (negative from the last), "
                        "or 'all' (default: the last)")
    g.add_argument("--top", type=int, default=6, help="clusters drawn per image and listed in the JSON (Fig. 6: 6)")
    g.add_argument("--show-images", type=int, default=4, metavar="N", help="images drawn in the figures")
    g.add_argument("--upsample", choices=["bilinear", "nearest"], default="bilinear",
                   help="how the patch-grid heatmap is brought to the image size")
    g.add_argument("--all-images", action="store_true",
                   help="count every image, not only those the model classifies correctly (the paper's choice)")
    g = _run_group(p, batch_size=32, batch_help="images per forward (masked images included)",
                   labels_help="'true' = the class folder of each image (one ImageFolder-style IMAGE_OR_DIR, classes "
                               "sorted as the model's), 'pred' = the model's prediction on the unmasked image")
    g.add_argument("--img-size", type=int, default=None, metavar="PIXELS", help="input size (default: the run's)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_run_clusters)


def _run_clusters(args) -> int:
    from .analysis import clusters

    layer = args.layer
    if layer is not None:
        if layer == ["all"]:
            layer = "all"
        else:
            try:
                layer = [int(v) for v in layer]
            except ValueError:
                raise ValueError(f"--layer must be integers or 'all', got {' '.join(args.layer)}") from None
    for name in ("top", "show_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    model, weights, transform, dcfg = clusters.load_paca_model(args.checkpoint, args.model, img_size=args.img_size,
                                                               device=default_device(args.device))
    files, batches, _ = _image_batches(args, transform, labelled=True,
                                       num_classes=getattr(model, "num_classes", None))
    batches = (([os.path.abspath(f) for f in names], x, y) for names, x, y in batches)
    summary, figs = clusters.clusters_report(
        model, batches, layer=layer, top=args.top, keep=args.show_images, batch_size=args.batch_size,
        mean=dcfg["mean"], std=dcfg["std"], upsample=args.upsample, correct_only=not args.all_images)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    summary = {"model": args.model or arch, "checkpoint": os.path.abspath(args.checkpoint), "weights": weights,
               "labels": args.labels, **summary}
    _write_report(args, "clusters.json", summary, figs)
    for lay in summary["layers"]:
        tops = ", ".join(f"c{t['cluster']} ({t['acc_drop'] if t['acc_drop'] is None else round(t['acc_drop'], 3)})"
                         for t in lay["top"])
        print(f"PaCa layer {lay['index']} ({lay['layer']}): most important clusters (accuracy drop over "
              f"{lay['counted']} of {lay['images']} images): {tops}")
    print(f"results in {os.path.join(args.out, 'clusters.json')}")
    return 0


# ---------------------------------------------------------------------------------- train, eval
@command("train", help="train a ViT with dense, window (AWD), WinfT or PaCa attention on an image folder "
                       "(or the bundled digits), on timm's training components; torchrun for several GPUs")
def _train_parser(p: argparse.ArgumentParser) -> None:
    from .train.config import add_train_arguments

    p.epilog = ("Without --data the bundled digits are written as an ImageFolder under OUT/digits and, for "
                "--attention window|winft without --windows, a dense ViT is trained first (OUT/dense) and its "
                "windows computed (OUT/windows), as the demo does. Several GPUs or machines: "
                "`torchrun --nproc_per_node G [--nnodes K --rdzv-backend c10d --rdzv-endpoint HOST:PORT] "
                "-m vitpatch.train ...`. Writes checkpoints (timm's CheckpointSaver), metrics.jsonl, "
                "summary.json and figures to --out.")
    add_train_arguments(p)
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .train.config import config_from_args
    from .train.engine import train

    summary = train(config_from_args(args))
    final = summary.get("final") or {}
    if final:
        print(f"done: {summary['epochs_done']}/{summary['epochs']} epochs, val top-1 {final.get('val_top1', 0):.2f}%; "
              f"files in {summary['out']}")
    return 0


@command("eval", help="evaluate a `vitpatch train` checkpoint: top-1/top-5, EO, images per second, peak memory "
                      "(JSON)")
def _eval_parser(p: argparse.ArgumentParser) -> None:
    p.epilog = ("The model, attention and folders come from the train_config.json beside the checkpoint; "
                "--data/--windows/--split override them. Writes eval.json beside the checkpoint unless --out.")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="a checkpoint written by vitpatch train")
    p.add_argument("--data", default=None, metavar="DIR", help="data folder (default: the training run's)")
    p.add_argument("--windows", default=None, metavar="DIR", help="windows folder (default: the training run's)")
    p.add_argument("--split", default=None, help="subfolder to evaluate (default: the run's validation split)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch and process")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--amp", default=None, action=argparse.BooleanOptionalAction,
                   help="bf16 autocast (default: as the run trained)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--out", default=None, metavar="FILE", help="JSON output (default: eval.json beside the checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from .train.engine import evaluate_checkpoint

    res = evaluate_checkpoint(args.checkpoint, data=args.data, windows=args.windows, split=args.split,
                              batch_size=args.batch_size, device=args.device, amp=args.amp, ema=args.ema,
                              workers=args.workers, progress=not args.no_progress, out=args.out)
    eo = f", EO {res['eo_patch']:.0f} patch pairs" if res.get("eo_patch") is not None else ""
    print(f"{res['images']} images: top-1 {res['top1']:.2f}%, top-5 {res['top5']:.2f}%{eo}, "
          f"{res['images_per_s']:.1f} images/s")
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
