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
    from ._dist import default_device

    return default_device(requested)


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
    written = _save_figures(figs, args.out, args.dpi)
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


# ------------------------------------------------------------------------- semantic and heads
def _images_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files and/or image folders (searched recursively)")
    _model_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the JSON results and PNGs")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=8, help="images per forward")
    g.add_argument("--max-images", type=int, default=None, help="use only the first this many images")
    g.add_argument("--dpi", type=int, default=110, help="PNG resolution")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--labels", choices=["true", "pred"], default="true",
                   help="labels where an equation needs one: 'true' = the class folder of each image (one "
                        "ImageFolder-style IMAGE_OR_DIR, DIR/<class>/<image>, classes sorted as the model's), "
                        "'pred' = the model's prediction on the unaltered image")


def _folder_labels(args, files: List[str], num_classes: Optional[int]):
    """The class index of each file for ``--labels true`` (``None`` for ``--labels pred``).

    Needs one ImageFolder-style directory (every image in a class subfolder); its sorted class
    names are the label mapping, so their count must equal the model's number of classes.
    """
    if args.labels == "pred":
        return None
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
    return [index[r.split("/", 1)[0]] for r in rel]


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
    """``(files, iterator of (names, batch))`` over the images of ``args.images`` with a tqdm bar over
    images. With ``labelled`` the items are ``(names, batch, labels)``: ``labels`` a LongTensor of the
    class folders (``--labels true``, checked against ``num_classes`` by :func:`_folder_labels`) or
    ``None`` (``--labels pred``). Nothing is kept after a batch is yielded."""
    from PIL import Image

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    files = _collect_images(args.images)
    labels = _folder_labels(args, files, num_classes) if labelled else None  # classes from the whole folder
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
    return files, gen()


def _save_figures(figs: Dict[str, object], out: str, dpi: int) -> List[str]:
    """Write each figure of ``figs`` (file name -> matplotlib figure) into ``out``; the paths written."""
    from .analysis import plots

    return [plots.save_figure(fig, os.path.join(out, name), dpi=dpi) for name, fig in figs.items()]


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


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
    p.epilog = ("Writes semantic.json (per image: keypoint counts, KK/KN/NK/NN and AFI per layer and head; their "
                "means over images) and fig3_keypoints.png, fig4_attended_row.png, fig5_interrelation.png, "
                "fig6_focus_index.png, fig7a_stages.png (and fig8_mask_prompt.png with --mask-prompt) to --out. "
                'Needs OpenCV: pip install -e ".[semantic]".')
    _images_arg(p)
    g = p.add_argument_group("paper 002")
    g.add_argument("--gamma", type=float, default=1.0, help="attended-set threshold factor of eq. 2 (> 0)")
    g.add_argument("--unweighted", action="store_true", help="unweighted theta (|S_i ∩ S_key| / |S_i|) instead of eq. 3")
    g.add_argument("--variant", choices=["renorm", "literal"], default="renorm", help="focus index variant (eq. 5)")
    g.add_argument("--stages", type=int, nargs="*", default=[], metavar="LAYER",
                   help="first layer of each new stage, shaded in fig7a (the paper gives none)")
    g.add_argument("--mask-prompt", action="store_true",
                   help="also Top/Bottom mask-as-prompt accuracy (§5.1) in both masking modes; the label is the "
                        "unmasked prediction (agreement), as an image folder's classes need not match the model's")
    p.set_defaults(func=_run_semantic)


def _run_semantic(args) -> int:
    import numpy as np
    import torch

    from . import analysis
    from .analysis import plots

    analysis.semantic._cv2()  # fail early with the install command
    if not args.gamma > 0:
        raise ValueError(f"--gamma must be > 0, got {args.gamma}")
    device = _default_device(args.device)
    model, weights = _load(args, device)
    transform, cfg = analysis.eval_transform(model)
    P, grid = analysis.model_layout(model)
    files, batches = _image_batches(args, transform)
    per_image, fields = [], ("KK", "KN", "NK", "NN", "AFI")
    stats = {k: [] for k in fields}
    first = None
    prompt_batches = []
    for names, x in batches:
        raw = analysis.to_uint8(x, cfg["mean"], cfg["std"])
        patch = x.shape[-1] // grid[1]
        counts = analysis.keypoint_counts(raw, patch)
        res = analysis.layer_semantics(analysis.attention_maps(model, x), counts, P, args.gamma,
                                       not args.unweighted, args.variant)
        for k in fields:
            stats[k].append(getattr(res, k))
        for b, name in enumerate(names):
            per_image.append({"image": os.path.abspath(name), "keypoints": int(counts[b].sum()),
                              "keypoint_patches": int((counts[b] > 0).sum()), "counts": counts[b].tolist(),
                              **{k: _nan_list(getattr(res, k)[b]) for k in fields}})
        if first is None:
            first = (x[:1], raw[:1], counts[:1], patch)
        if args.mask_prompt:
            with torch.no_grad():
                pred = model(x.to(device)).argmax(-1).cpu()
            prompt_batches.append((x, pred, counts))
    st = {k: torch.cat(v) for k, v in stats.items()}  # (num_images, L, h)
    mean_lh = {k: torch.nanmean(v, 0) for k, v in st.items()}
    L = st["AFI"].shape[1]
    summary = {"model": args.model, "weights": weights, "grid": list(grid), "num_prefix_tokens": P,
               "gamma": args.gamma, "weighted": not args.unweighted, "afi_variant": args.variant,
               "images": len(files), "per_layer": {k: _nan_list(torch.nanmean(v, 1)) for k, v in mean_lh.items()},
               "per_layer_head": {k: _nan_list(v) for k, v in mean_lh.items()}, "per_image": per_image}
    os.makedirs(args.out, exist_ok=True)
    x0, raw0, c0, patch = first
    img = plots.display_image(raw0[0])
    maps = list(analysis.attention_maps(model, x0))
    A = maps[L // 2][0].mean(0, keepdim=True)[None]  # head-mean of the middle layer: (1, 1, N, N)
    q = int(torch.argmax(c0[0])) if int(c0.sum()) else 0
    figs = {
        "fig3_keypoints.png": plots.plot_keypoints(img, analysis.sift_keypoints(raw0)[0], grid, c0[0]),
        "fig4_attended_row.png": plots.plot_attended_row(img, A[0, 0, P + q, P:], grid, args.gamma, q),
        "fig5_interrelation.png": plots.plot_layer_points({"KK": mean_lh["KK"], "NK": mean_lh["NK"]},
                                                          "interrelation", "KK and NK per head (paper 002 Fig. 5)"),
        "fig6_focus_index.png": plots.plot_layer_points({"AFI": mean_lh["AFI"]}, "attention focus index",
                                                        "AFI per head (paper 002 Fig. 6)"),
        "fig7a_stages.png": plots.plot_stage_summary(*(torch.nanmean(mean_lh[k], 1) for k in fields),
                                                     stages=args.stages),
    }
    if args.mask_prompt:
        acc = analysis.mask_prompt_accuracy(model, prompt_batches, gamma=args.gamma, weighted=not args.unweighted,
                                            mean=cfg["mean"], std=cfg["std"])
        summary["mask_prompt"] = acc
        summary["mask_prompt_labels"] = "unmasked prediction"
        figs["fig8_mask_prompt.png"] = plots.plot_mask_prompt(acc)
    _write_json(os.path.join(args.out, "semantic.json"), summary)
    for path in _save_figures(figs, args.out, args.dpi):
        print(path)
    kk, nk = (float(np.nanmean(mean_lh[k].numpy())) for k in ("KK", "NK"))
    print(f"{len(files)} images: KK {kk:.3f}, NK {nk:.3f}, AFI {float(mean_lh['AFI'].mean()):.3f} "
          f"(mean over layers and heads); results in {os.path.join(args.out, 'semantic.json')}")
    return 0


@command("heads", help="paper 003: head importance by pruning, k-hop attention strength, mean attention distance "
                       "and attention patterns, over images or an image folder")
def _heads_parser(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Writes heads.json (per image: I_prob, I_JSD, I_cls, I_patch per layer, head and mode; k-hop "
                "strength, its entropy and MAD per layer and head) and head_importance.png, mode_bars.png, "
                "top5_heads.png, khop_strength.png, entropy_layers.png, tsne_images.png, tsne_cls_patterns.png, "
                "tsne_patch_patterns.png, context_masks.png, attention_heatmap.png to --out. Labels are the "
                "unpruned predictions.")
    _images_arg(p)
    g = p.add_argument_group("paper 003")
    g.add_argument("--modes", type=int, nargs="+", default=[1], metavar="M",
                   help="pruning modes: 0 none, 1 all, 2 CLS->CLS, 3 CLS<->patches, 4 patches->patches, 5 = 2 + 3")
    g.add_argument("--layer", type=int, default=None, help="layer of the k-hop, context and heatmap figures "
                                                            "(default: the middle one)")
    g.add_argument("--head", type=int, default=0, help="head of the context-mask and heatmap figures")
    g.add_argument("--ae-epochs", type=int, default=30, help="training epochs of the patch-pattern autoencoder")
    p.set_defaults(func=_run_heads)


def _run_heads(args) -> int:
    import numpy as np
    import torch

    from . import analysis
    from .analysis import plots

    modes = analysis.heads._check_modes(args.modes)
    device = _default_device(args.device)
    model, weights = _load(args, device)
    analysis.heads._staged(model)
    transform, cfg = analysis.eval_transform(model)
    P, grid = analysis.model_layout(model)
    L, h = len(model.blocks), model.blocks[0].attn.num_heads
    layer = L // 2 if args.layer is None else args.layer
    if not 0 <= layer < L:
        raise ValueError(f"--layer must be in [0, {L}), got {args.layer}")
    if not 0 <= args.head < h:
        raise ValueError(f"--head must be in [0, {h}), got {args.head}")
    files, batches = _image_batches(args, transform)
    imp, strengths, first = [], [], None
    for names, x in batches:
        imp.append(analysis.head_importance(model, x, modes=modes))
        patch = x.shape[-1] // grid[1]
        strengths.append(analysis.layer_strengths(analysis.attention_maps(model, x), grid, patch, P))
        if first is None:
            first = x[:1]
    cat = {k: torch.cat([getattr(r, k) for r in imp]) for k in ("prob", "jsd", "cls", "patch", "p_pruned")}
    labels = torch.cat([r.labels for r in imp])
    S = {k: torch.cat([getattr(s, k) for s in strengths]) for k in ("strength", "entropy", "mad")}
    mean = {k: torch.nanmean(v, 0) for k, v in cat.items()}  # (L, h, M)
    summary = {"model": args.model, "weights": weights, "grid": list(grid), "num_prefix_tokens": P,
               "images": [os.path.abspath(f) for f in files], "modes": list(modes),
               "mode_names": [analysis.PRUNE_MODES[m] for m in modes], "labels": labels.tolist(),
               "mean_over_images": {k: _nan_list(v) for k, v in mean.items()},
               "khop_strength_mean": _nan_list(S["strength"].mean(0)), "strength_entropy_mean": _nan_list(
                   S["entropy"].mean(0)), "mad_px_mean": _nan_list(S["mad"].mean(0)),
               "per_image": {**{k: _nan_list(v) for k, v in cat.items()},
                             **{k: _nan_list(v) for k, v in S.items()}}}
    os.makedirs(args.out, exist_ok=True)
    _write_json(os.path.join(args.out, "heads.json"), summary)
    m0 = 0
    figs = {
        "head_importance.png": plots.plot_head_importance(mean["prob"][..., m0], f"I_prob (mode {modes[m0]})"),
        "top5_heads.png": plots.plot_top_heads(mean["prob"][..., m0], 5, f"I_prob (mode {modes[m0]})"),
        "khop_strength.png": plots.plot_khop_strength(S["strength"].mean(0)[layer], layer),
        "entropy_layers.png": plots.plot_entropy_layers(S["entropy"].mean(0)),
    }
    if len(modes) > 1:
        figs["mode_bars.png"] = plots.plot_mode_bars(mean["prob"], modes)
    if len(files) >= 4:
        emb = analysis.image_overview(analysis.HeadImportance(cat["prob"], cat["jsd"], cat["cls"], cat["patch"],
                                                              cat["p_pruned"], torch.zeros(len(labels)), labels, modes),
                                      mode=modes[m0])
        figs["tsne_images.png"] = plots.plot_tsne(emb, labels, "images by p_pruned[y] over all heads (Fig. 1A)",
                                                  "predicted class")
    maps = list(analysis.attention_maps(model, first))
    if L * h >= 4:
        layer_of = np.repeat(np.arange(L), h)
        if P >= 1:
            cls = torch.cat([analysis.cls_patterns(A, P)[0] for A in maps])  # (L*h, N + n)
            figs["tsne_cls_patterns.png"] = plots.plot_tsne(analysis.tsne(cls), layer_of,
                                                            "CLS patterns of all heads (Fig. 6B)", "layer")
        pats = torch.cat([analysis.binarize_patterns(A, P)[0] for A in maps])  # (L*h, n, n)
        lat, _ = analysis.pattern_latents(pats, epochs=args.ae_epochs)
        figs["tsne_patch_patterns.png"] = plots.plot_tsne(analysis.tsne(lat), layer_of,
                                                          "patch patterns of all heads, AE latents (Fig. 6C)", "layer")
    A = maps[layer]
    img = plots.display_image(first[0], cfg["mean"], cfg["std"])
    n = grid[0] * grid[1]
    cm = analysis.context_masks(A, grid, P, patch=n // 2 + grid[1] // 2)
    figs["context_masks.png"] = plots.plot_context_masks(img, {k: v[0, args.head] for k, v in cm.items()},
                                                         f"layer {layer}, head {args.head} (Fig. 6D/E)")
    if P >= 1:
        figs["attention_heatmap.png"] = plots.plot_attention_heatmap(A[0, args.head], P,
                                                                     f"layer {layer}, head {args.head}")
    for path in _save_figures(figs, args.out, args.dpi):
        print(path)
    top = torch.argmax(torch.nan_to_num(mean["prob"][..., m0], nan=-1e9)).item()
    print(f"{len(files)} images: most important head L{top // h}H{top % h} (I_prob {float(mean['prob'][..., m0].reshape(-1)[top]):.4f}, "
          f"mode {modes[m0]}); results in {os.path.join(args.out, 'heads.json')}")
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
