"""``vitpatch train`` and ``vitpatch eval``: the papers' experiments on timm's training components.

One loop for every attention (paper 000's AWD-ViT, DIP and WinfT, paper 004's PaCa-ViT, and
the dense ViT they compare with), built from timm's pieces: its transforms (the geometric step
replaced by one that moves the windows with the image, :mod:`vitpatch.train.remap`),
``create_optimizer_v2``, ``create_scheduler_v2``, ``Mixup`` / CutMix, label-smoothing and
soft-target losses, ``ModelEmaV3``, ``CheckpointSaver`` and ``resume_checkpoint``. torch's
``DataLoader`` with a ``DistributedSampler`` replaces timm's ``create_loader`` because that one
re-sets the dataset's transform (windows need theirs) and pads the distributed sampler (which
would make a run on G processes differ from one process with the same global batch).

Determinism: the model is initialised from ``seed``; at the start of every epoch Python's,
NumPy's and torch's generators are re-seeded from ``(seed, epoch, rank)``, the sampler's order
comes from ``(seed, epoch)``, each image's augmentation from ``(seed, epoch, index)`` and
Mixup's draw from ``(seed, epoch, step)``. So a run resumed from the checkpoint of epoch ``e``
continues exactly as the uninterrupted run, and ``torchrun --nproc_per_node G`` with the same
global batch sees the same images, augmented the same way, in every step (the losses agree
up to the order of floating-point sums; dropout and drop-path masks differ between ranks).

Output folder (``--out``): ``train_config.json``, ``metrics.jsonl`` (one JSON object per line:
``{"kind": "step", ...}`` every ``log_interval`` steps and ``{"kind": "epoch", ...}`` with the
validation metrics), ``last.pth.tar`` / ``checkpoint-<epoch>.pth.tar`` / ``model_best.pth.tar``
(timm's ``CheckpointSaver``), ``summary.json`` and the figures (``loss.png``, ``top1.png``,
``accuracy_vs_eo.png``; ``fig13_winft_gates.png`` for WinfT).
"""
from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time
from dataclasses import asdict, replace
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .._dist import world
from ..analysis.pipeline import ImageFiles, num_classes_of, write_json_atomic
from .data import (TrainCollate, TrainImages, WindowStore, derived_seed, seed_all, seeded, split_dir,
                   write_digits_folder)

from .config import CONFIG_FILE, LAST, METRICS_FILE, TrainConfig, load_run_config

__all__ = ["train", "evaluate", "evaluate_checkpoint", "build_model", "create_optimization", "create_criterion",
           "train_step"]


# ------------------------------------------------------------------------------------------ model
def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """A timm model by name with the chosen attention layer; initial weights from ``cfg.checkpoint``.

    ``window`` / ``winft`` / ``paca`` put :class:`~vitpatch.nn.WindowAttention`,
    :class:`~vitpatch.nn.WinfTAttention` (``winft_mode``) or :class:`~vitpatch.nn.PaCaAttention`
    (``num_clusters``, ``clustering``) in every block of a timm ViT (``attn_layer``). With
    ``dip`` in ``tokens``/``both`` the dropped patches' tokens are zeroed before every block
    (:func:`vitpatch.nn.zero_dropped_tokens`, paper 000 §4.2).
    """
    import timm

    importlib.import_module("vitpatch.models")  # registers PaCa-ViT and the digits ViT

    from .. import nn as vnn

    if not timm.is_model(cfg.model):
        raise ValueError(f"--model {cfg.model!r} is not a timm model name (see timm.list_models())")
    kwargs = {"num_classes": num_classes, "drop_path_rate": cfg.drop_path}
    if cfg.img_size is not None and not cfg.model.startswith("paca_vit"):
        kwargs["img_size"] = cfg.img_size
    layer = {"window": vnn.WindowAttention, "winft": vnn.WinfTAttention.with_options(mode=cfg.winft_mode),
             "paca": vnn.PaCaAttention.with_options(num_clusters=cfg.num_clusters, clustering=cfg.clustering)}
    if cfg.attention in layer and not cfg.model.startswith("paca_vit"):
        kwargs["attn_layer"] = layer[cfg.attention]
    try:
        model = timm.create_model(cfg.model, pretrained=False, **kwargs)
    except TypeError as exc:
        raise ValueError(f"--model {cfg.model} cannot be built with {sorted(kwargs)} ({exc}); --attention "
                         f"window/winft/paca needs a timm VisionTransformer") from None
    if cfg.attention in ("winft", "paca") and not cfg.model.startswith("paca_vit"):
        vnn.set_token_layout(model)
    if cfg.dip in ("tokens", "both"):
        vnn.zero_dropped_tokens(model)
    if cfg.checkpoint is not None:
        _load_initial(model, cfg.checkpoint)
    return model


def _load_initial(model: nn.Module, path: str) -> None:
    """Load local weights (timm's ``load_state_dict`` and the model's checkpoint filter); a classifier of
    another shape is left at its initialisation (fine-tuning on other classes), anything else must fit."""
    from timm.models import load_state_dict

    state = load_state_dict(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    head = [k for k, v in state.items() if k in own and own[k].shape != v.shape and k.startswith("head")]
    for k in head:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head]
    if missing or unexpected:
        raise ValueError(f"--checkpoint {path!r} does not fit {type(model).__name__}: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    if head:
        print(f"--checkpoint: classifier {head} re-initialised (other number of classes)", flush=True)


def _layout(model: nn.Module):
    """``(num_prefix_tokens, grid)`` of a timm ViT, ``(0, None)`` for models without a single patch grid."""
    from ..analysis.maps import model_layout

    try:
        return model_layout(model)
    except ValueError:
        return 0, None


def _input_size(model: nn.Module, cfg: TrainConfig) -> Tuple[int, int]:
    if cfg.img_size is not None:
        return cfg.img_size, cfg.img_size
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        return (size, size) if isinstance(size, int) else tuple(size)
    return tuple(model.pretrained_cfg["input_size"][1:])


# ------------------------------------------------------------------------------------------- data
def _split_dataset(cfg: TrainConfig, model: nn.Module, split: str, *, training: bool,
                   images=None) -> TrainImages:
    """One split's dataset with its transform: timm's training transform (``training``) or its eval
    transform; with ``cfg.windows`` the split's windows run, moved with the image
    (:mod:`vitpatch.train.remap`). ``images``: the split's :class:`~vitpatch.analysis.ImageFiles` scan."""
    from timm.data import create_transform, resolve_data_config

    from .remap import AnalysisView, WindowFollowingTransform

    size = _input_size(model, cfg)
    dcfg = resolve_data_config({"input_size": (3, *size)}, model=model)
    mean, std, interp = dcfg["mean"], dcfg["std"], dcfg["interpolation"]
    root = split_dir(cfg.data, split)
    if cfg.windows is None:
        if training:
            tf = create_transform(size, is_training=True, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
                                  color_jitter=cfg.color_jitter, auto_augment=cfg.aa, interpolation=interp,
                                  mean=mean, std=std, re_prob=cfg.reprob)
        else:
            tf = create_transform(**dcfg, is_training=False)
        return TrainImages(root, tf, seed=cfg.seed, images=images)
    _P, grid = _layout(model)
    if grid is None:
        raise ValueError(f"--windows needs a model with one patch grid (a timm ViT); {cfg.model} has none")
    run = os.path.join(cfg.windows, split)
    if not os.path.isdir(run):
        raise ValueError(f"--windows {cfg.windows!r} has no {split!r} run: expected {run} from "
                         f"`vitpatch windows --data {os.path.join(cfg.data, split)} --out {run}`")
    store = WindowStore(run)
    view = AnalysisView.from_meta(store.meta)
    if training:
        tf = WindowFollowingTransform(view, input_size=size, out_grid=grid, scale=cfg.scale, ratio=cfg.ratio,
                                      hflip=cfg.hflip, interpolation=interp, color_jitter=cfg.color_jitter,
                                      auto_augment=cfg.aa, mean=mean, std=std, re_prob=cfg.reprob)
    else:
        tf = WindowFollowingTransform.eval(view, input_size=size, out_grid=grid, crop_pct=dcfg["crop_pct"],
                                           crop_mode=dcfg.get("crop_mode") or "center", interpolation=interp,
                                           mean=mean, std=std)
    return TrainImages(root, tf, store=store, seed=cfg.seed, images=images)


def _collate(cfg: TrainConfig, model: nn.Module) -> TrainCollate:
    """The batches' collate: a :class:`vitpatch.WindowMask` per batch (with the ``--dip`` choice) when windows
    are used."""
    if cfg.windows is None:
        return TrainCollate()
    P, grid = _layout(model)
    return TrainCollate(grid, P, cfg.dip)


class _Shard(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, ...``: every validation image exactly once over the ranks (no padding)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.idx = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


def _loader(ds, batch_size: int, collate, workers: int, sampler, drop_last: bool, device: torch.device):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       collate_fn=collate, drop_last=drop_last,
                                       pin_memory=device.type == "cuda", persistent_workers=False)


# ------------------------------------------------------------------------------------ evaluation
def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def _attention_pairs(model: nn.Module):
    """Forward hooks counting query-key pairs of every attention layer: ``(hooks, records)``.

    Each record is ``(patch_pairs, all_pairs)`` per image of one layer call: ``n^2`` / ``N^2`` for
    dense attention (``P`` prefix tokens), ``n M`` / ``N (M + P)`` for PaCa. Window and WinfT layers
    are counted from their masks and gates instead (:func:`evaluate`).
    """
    from timm.layers import Attention

    from ..nn import PaCaAttention, WindowAttention, WinfTAttention, _infer_layout

    P_model = int(getattr(model, "num_prefix_tokens", 0) or 0)
    records: List[Tuple[float, float]] = []

    def dense(mod, args, out):
        N = args[0].shape[1]
        records.append((float((N - P_model) ** 2), float(N * N)))

    def paca(mod, args, out):
        N = args[0].shape[1]
        P, grid = _infer_layout(N, mod.num_prefix_tokens, mod.grid)
        n = grid[0] * grid[1]
        records.append((float(n * mod.num_clusters), float(N * (mod.num_clusters + P))))

    hooks = []
    for m in model.modules():
        if isinstance(m, PaCaAttention):
            hooks.append(m.register_forward_hook(paca))
        elif isinstance(m, Attention) and not isinstance(m, (WindowAttention, WinfTAttention)):
            hooks.append(m.register_forward_hook(dense))
    return hooks, records


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, attention: str, amp: bool = False,
             progress: bool = True, desc: str = "eval") -> Dict[str, float]:
    """Top-1 / top-5 (%), loss, EO per image over patch pairs (the papers' count) and over all tokens,
    images per second and peak memory, reduced over the torchrun processes.

    EO: window attention counts each image's allowed patch pairs (eq. 5; with DIP the kept
    patches only) and all allowed pairs of its mask; WinfT counts ``sum W`` over patch pairs and
    over all ``N x N`` pairs, averaged over layers (Table 3); dense and PaCa layers count their
    query-key pairs (``n^2``, ``n M``).
    """
    from timm.utils import accuracy
    from tqdm.auto import tqdm

    from .. import nn as vnn
    from ..analysis.windows import effective_operations

    model.eval()
    inner = model.module if hasattr(model, "module") else model
    if attention == "winft":
        vnn.record_winft_gates(inner, True)
    hooks, records = _attention_pairs(inner)
    sums = torch.zeros(8, dtype=torch.float64)  # images, top1, top5, loss, eo_patch, eo_all, eo_images, time
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for images, labels, mask in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            t0 = time.perf_counter()
            with _autocast(device, amp):
                logits = model(images, attn_mask=mask.to(device)) if mask is not None else model(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            sums[7] += time.perf_counter() - t0
            B = images.shape[0]
            top1, top5 = accuracy(logits.float(), labels, topk=(1, min(5, logits.shape[-1])))
            sums[0] += B
            sums[1] += float(top1) * B / 100
            sums[2] += float(top5) * B / 100
            sums[3] += float(nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
            if attention == "window":
                keep = mask.key_keep if mask.key_keep is not None else mask.token_keep
                keep = None if keep is None else keep[:, mask.num_prefix_tokens:]
                sums[4] += effective_operations(mask.windows, mask.grid, keep) * B
                sums[5] += float(mask.allowed_counts(B).sum())
                sums[6] += B
            elif attention == "winft":
                sums[4] += float(vnn.winft_gate_sum(inner, pairs="patch").sum())
                sums[5] += float(vnn.winft_gate_sum(inner).sum())
                sums[6] += B
    finally:
        for h in hooks:
            h.remove()
        if attention == "winft":
            vnn.record_winft_gates(inner, False)
    if records:  # dense / PaCa layers: the same count for every image
        sums[4] += sums[0] * float(np.mean([r[0] for r in records]))
        sums[5] += sums[0] * float(np.mean([r[1] for r in records]))
        sums[6] += sums[0]
    _all_reduce(sums, device)
    n_img = max(float(sums[0]), 1.0)
    out = {"images": int(sums[0]), "top1": 100 * float(sums[1]) / n_img, "top5": 100 * float(sums[2]) / n_img,
           "loss": float(sums[3]) / n_img,
           "eo_patch": float(sums[4] / sums[6]) if sums[6] else None,
           "eo_all": float(sums[5] / sums[6]) if sums[6] else None,
           "images_per_s": float(sums[0] / sums[7]) if sums[7] else None}
    P, grid = _layout(inner)
    if grid is not None:
        n = grid[0] * grid[1]
        out["eo_full_patch"], out["eo_full_all"] = float(n * n), float((n + P) ** 2)
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["peak_memory_kind"] = "torch.cuda.max_memory_allocated"
    else:
        out["peak_memory_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        out["peak_memory_kind"] = "process peak RSS (CPU: includes everything the process held before)"
    return out


def _all_reduce(t: torch.Tensor, device: torch.device) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        buf = t.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(buf)
        t.copy_(buf.cpu())


# -------------------------------------------------------------------------------------- training
def _barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_json(path: str, obj) -> None:
    write_json_atomic(path, obj, default=str)


def _trim_metrics(path: str, start_epoch: int) -> None:
    """Keep only the records of epochs before ``start_epoch`` (a resumed run rewrites the rest)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip() and json.loads(line)["epoch"] < start_epoch]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def _prepare_windows(cfg: TrainConfig, device: str) -> TrainConfig:
    """The digits default with window/WinfT attention and no ``--windows``: train the dense ViT
    (``OUT/dense``) and compute each split's windows with it (``OUT/windows/<split>``), as the
    demo does; both steps resume when rerun."""
    from ..analysis.pipeline import eval_transform, run_windows

    dense_cfg = replace(cfg, attention="dense", windows=None, dip="none", out=os.path.join(cfg.out, "dense"),
                        resume="auto", stop_after=None, _digits=False)
    summary = train(dense_cfg, _nested=True)
    model = build_model(replace(dense_cfg, checkpoint=None), summary["num_classes"])
    state = torch.load(os.path.join(dense_cfg.out, LAST), map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    model.to(device).eval()
    transform, dcfg = eval_transform(model)
    out = os.path.join(cfg.out, "windows")
    for split in (cfg.train_split, cfg.val_split):
        meta = {"model": cfg.model, "weights": f"{dense_cfg.out}/{LAST}", "input_size": list(dcfg["input_size"]),
                "interpolation": dcfg.get("interpolation"), "crop_pct": dcfg.get("crop_pct"),
                "crop_mode": dcfg.get("crop_mode") or "center", "mean": list(dcfg["mean"]), "std": list(dcfg["std"])}
        run_windows(model, ImageFiles(split_dir(cfg.data, split), transform), os.path.join(out, split),
                    alpha=cfg.alpha, beta=cfg.beta, batch_size=128, device=device, progress=cfg.progress, meta=meta)
    return replace(cfg, windows=out)


def train(cfg: TrainConfig, *, _nested: bool = False) -> dict:
    """Train (and validate every epoch) as ``cfg`` says; returns the summary written to ``summary.json``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) it runs DistributedDataParallel (NCCL on CUDA, gloo on
    CPU): ``batch_size`` is the global batch, split evenly; metrics are reduced over the ranks;
    rank 0 writes checkpoints, metrics and figures.
    """
    from .._dist import init_distributed

    cfg = cfg if _nested else cfg.resolved()
    device_name, own_group = init_distributed(cfg.device)
    try:
        return _train(cfg, torch.device(device_name), _nested)
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _resume_path(cfg: TrainConfig) -> Optional[str]:
    if cfg.resume == "auto":
        path = os.path.join(cfg.out, LAST)
        return path if os.path.isfile(path) else None
    return cfg.resume


def create_optimization(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    """``(optimizer, scheduler)``: timm's ``create_optimizer_v2`` (no weight decay on biases and norms)
    and ``create_scheduler_v2`` stepped per update (``scheduler.step_update(step)`` before each step)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    opt = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    sched, _ = create_scheduler_v2(opt, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                   warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
                                   updates_per_epoch=steps_per_epoch)
    return opt, sched


def create_criterion(cfg: TrainConfig, num_classes: int):
    """``(criterion, mixup)``: timm's soft-target loss with Mixup/CutMix (``mixup`` a ``timm.data.Mixup``),
    else its label-smoothing loss, else plain cross-entropy (``mixup`` ``None``)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup > 0 or cfg.cutmix > 0:
        mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                    label_smoothing=cfg.smoothing, num_classes=num_classes)
        return SoftTargetCrossEntropy(), mix
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.smoothing), None
    return nn.CrossEntropyLoss(), None


def train_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, mask, *, cfg: TrainConfig,
               criterion, opt, device: torch.device, inner: Optional[nn.Module] = None):
    """One optimizer step: ``(loss, bce)`` (``bce`` ``None`` unless WinfT).

    The loss is ``criterion(logits, targets)``; for WinfT ``lambda1 * that + lambda2 * L_BCE`` (paper
    000 eq. 12, :func:`vitpatch.nn.winft_loss` of ``inner``, the unwrapped model). bf16 autocast with
    ``cfg.amp``; the gradient norm clipped to ``cfg.clip_grad`` when set.
    """
    from .. import nn as vnn

    with _autocast(device, cfg.amp):
        logits = model(images, attn_mask=mask) if mask is not None else model(images)
        loss = criterion(logits.float(), targets)
        bce = None
        if cfg.attention == "winft":
            bce = vnn.winft_loss(model if inner is None else inner)
            loss = cfg.lambda1 * loss + cfg.lambda2 * bce
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    opt.step()
    return loss.detach(), None if bce is None else bce.detach()


def _train(cfg: TrainConfig, device: torch.device, nested: bool) -> dict:
    from timm.models import resume_checkpoint
    from timm.utils import CheckpointSaver, ModelEmaV3
    from tqdm.auto import tqdm

    rank, world_size = world()
    if cfg.batch_size % world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} (global) must be divisible by the {world_size} processes")
    local_batch = cfg.batch_size // world_size
    if (cfg.mixup > 0 or cfg.cutmix > 0) and local_batch % 2:
        raise ValueError(f"Mixup/CutMix need an even batch per process, got {local_batch}")
    if cfg._digits:
        root = os.path.join(cfg.out, "digits")
        if rank == 0:
            write_digits_folder(root, seed=cfg.seed)
        _barrier()
        cfg = replace(cfg, data=root, _digits=False)
        if cfg.attention in ("window", "winft") and cfg.windows is None:
            cfg = _prepare_windows(cfg, str(device))
    # everything is checked before anything is written to cfg.out
    train_images = ImageFiles(split_dir(cfg.data, cfg.train_split))  # scanned once: classes, then the dataset
    num_classes = len(train_images.classes)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes)
    train_ds = _split_dataset(cfg, model, cfg.train_split, training=True, images=train_images)
    val_ds = _split_dataset(cfg, model, cfg.val_split, training=False)
    collate = _collate(cfg, model)
    if val_ds.classes != train_ds.classes:
        raise ValueError(f"the {cfg.val_split!r} and {cfg.train_split!r} folders have other classes")
    steps = len(train_ds) // cfg.batch_size
    if steps < 1:
        raise ValueError(f"{len(train_ds)} training images do not make one batch of {cfg.batch_size}")
    resume = _resume_path(cfg)
    model.to(device)
    opt, sched = create_optimization(model, cfg, steps)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    start_epoch = 0
    if resume is not None:
        start_epoch = int(resume_checkpoint(model, resume, optimizer=opt, log_info=False) or 0)
        if ema is not None:
            ck = torch.load(resume, map_location="cpu", weights_only=True)
            if "state_dict_ema" not in ck:
                raise ValueError(f"--resume {resume!r} has no EMA weights but --model-ema is on")
            ema.module.load_state_dict(ck["state_dict_ema"])
    os.makedirs(cfg.out, exist_ok=True)
    metrics_path = os.path.join(cfg.out, METRICS_FILE)
    if rank == 0:
        stored = {k: v for k, v in asdict(cfg).items() if not k.startswith("_")}
        _write_json(os.path.join(cfg.out, CONFIG_FILE), {**stored, "num_classes": num_classes,
                                                         "classes": train_ds.classes})
        if start_epoch:
            _trim_metrics(metrics_path, start_epoch)
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)
    saver = CheckpointSaver(model, opt, model_ema=ema, checkpoint_dir=cfg.out, recovery_dir=cfg.out,
                            max_history=cfg.keep_checkpoints) if rank == 0 else None
    if saver is not None and resume is not None and hasattr(saver, "load_state_dict_from_checkpoint"):
        saver.load_state_dict_from_checkpoint(resume)
    inner = model
    if cfg.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion, mix = create_criterion(cfg, num_classes)
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    val_loader = _loader(val_ds, local_batch, collate, cfg.workers, _Shard(len(val_ds), rank, world_size), False,
                         device)
    end_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start_epoch + cfg.stop_after)
    history = []
    for epoch in range(start_epoch, end_epoch):
        seed_all(derived_seed(cfg.seed, epoch, rank, 7))
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        loader = _loader(train_ds, local_batch, collate, cfg.workers, sampler, True, device)
        model.train()
        t0, losses, records = time.perf_counter(), [], []
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                   disable=not cfg.progress or rank != 0)
        for i, (images, labels, mask) in enumerate(loader):
            if i >= steps:
                break
            update = epoch * steps + i
            sched.step_update(update)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            mask = None if mask is None else mask.to(device)
            targets = labels
            if mix is not None:
                with seeded(derived_seed(cfg.seed, epoch, i, 11)):
                    images, targets = mix(images, labels)
            loss, bce = train_step(model, images, targets, mask, cfg=cfg, criterion=criterion, opt=opt,
                                   device=device, inner=inner)
            if ema is not None:
                ema.update(inner, step=update)
            stat = torch.tensor([float(loss.detach()), float(bce.detach()) if bce is not None else 0.0],
                                dtype=torch.float64)
            _all_reduce(stat, device)
            stat /= world_size
            losses.append(float(stat[0]))
            lr = opt.param_groups[0]["lr"]
            if rank == 0 and (i % cfg.log_interval == 0 or i == steps - 1):
                rec = {"kind": "step", "epoch": epoch, "step": update, "loss": float(stat[0]), "lr": lr}
                if bce is not None:
                    rec["bce"] = float(stat[1])
                records.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        train_time = time.perf_counter() - t0
        val = evaluate(model, val_loader, device, attention=cfg.attention, amp=cfg.amp,
                       progress=cfg.progress and rank == 0, desc=f"val {epoch + 1}")
        rec = {"kind": "epoch", "epoch": epoch, "train_loss": float(np.mean(losses)), "train_time_s": train_time,
               "lr": opt.param_groups[0]["lr"], **{f"val_{k}": v for k, v in val.items()}}
        if ema is not None:
            ev = evaluate(ema.module, val_loader, device, attention=cfg.attention, amp=cfg.amp, progress=False)
            rec["val_ema_top1"] = ev["top1"]
        history.append(rec)
        if rank == 0:
            with open(metrics_path, "a", encoding="utf-8") as f:
                for r in records + [rec]:
                    f.write(json.dumps(r) + "\n")
            saver.save_checkpoint(epoch, metric=val["top1"])
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {rec['train_loss']:.4f}, val top-1 "
                  f"{val['top1']:.2f}% top-5 {val['top5']:.2f}%" +
                  _eo_text(val), flush=True)
        _barrier()
    records = _read_metrics(metrics_path) if rank == 0 and os.path.exists(metrics_path) else []
    summary = {"out": cfg.out, "model": cfg.model, "attention": cfg.attention, "num_classes": num_classes,
               "epochs_done": end_epoch, "epochs": cfg.epochs, "complete": end_epoch >= cfg.epochs,
               "world_size": world_size, "device": str(device), "final": records[-1] if records else None}
    if rank == 0 and not nested:
        if cfg.plots and records:
            from .plots import training_figures

            summary["figures"] = training_figures(cfg.out, records, cfg.attention)
            if cfg.attention == "winft":
                summary["figures"].append(_winft_figure(inner, val_loader, device, cfg))
        _write_json(os.path.join(cfg.out, "summary.json"), summary)
    return summary


def _eo_text(val: dict) -> str:
    if val.get("eo_patch") is None:
        return ""
    full = f" of {val['eo_full_patch']:.0f}" if val.get("eo_full_patch") else ""
    return f", EO {val['eo_patch']:.0f}{full} patch pairs per layer"


def _read_metrics(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def _winft_figure(model: nn.Module, loader, device: torch.device, cfg: TrainConfig) -> str:
    """Paper 000 Fig. 13: window ground truth beside the sum of W over layers, for a validation image."""
    from .. import nn as vnn
    from ..analysis.plots import save_figure
    from .plots import plot_winft_gates

    images, _labels, mask = next(iter(loader))
    first = _first(mask)
    vnn.record_winft_gates(model, True)
    try:
        model.eval()
        with _autocast(device, cfg.amp):
            model(images[:1].to(device), attn_mask=first.to(device))
        gates = torch.stack([g[0].float().cpu() for g in vnn.winft_layer_gates(model)])
    finally:
        vnn.record_winft_gates(model, False)
    fig = plot_winft_gates(images[0], first.dense()[0], gates, first.grid, first.num_prefix_tokens)
    return save_figure(fig, os.path.join(cfg.out, "fig13_winft_gates.png"))


def _first(mask):
    """The first image's :class:`WindowMask` of a batch mask."""
    from ..masks import WindowMask

    kk = None if mask.key_keep is None else mask.key_keep[:1]
    tk = None if mask.token_keep is None else mask.token_keep[:1]
    return WindowMask(mask.windows[:1], mask.grid, mask.num_prefix_tokens, key_keep=kk, token_keep=tk)


def evaluate_checkpoint(checkpoint, *, data: Optional[str] = None, windows: Optional[str] = None,
                        split: Optional[str] = None, batch_size: int = 64, device: Optional[str] = None,
                        amp: Optional[bool] = None, ema: bool = False, workers: int = 0, progress: bool = True,
                        out: Optional[str] = None) -> dict:
    """``vitpatch eval``: a trained checkpoint on a validation folder; the metrics of :func:`evaluate`
    plus the run's settings, written as JSON to ``out`` (default: ``eval.json`` beside the checkpoint).

    The model, attention and data come from the ``train_config.json`` beside the checkpoint;
    ``data``, ``windows`` and ``split`` override its folders. ``ema`` evaluates the EMA weights.
    """
    from .._dist import init_distributed

    checkpoint = os.fspath(checkpoint)
    if not os.path.isfile(checkpoint):
        raise ValueError(f"--checkpoint {checkpoint!r} is not a file")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    run_dir = os.path.dirname(os.path.abspath(checkpoint))
    cfg = load_run_config(os.path.join(run_dir, CONFIG_FILE))
    cfg = replace(cfg, data=data or cfg.data, windows=windows or cfg.windows, val_split=split or cfg.val_split,
                  checkpoint=None, resume=None, amp=cfg.amp if amp is None else amp, workers=workers)
    if cfg.data is None or not os.path.isdir(cfg.data):
        raise ValueError(f"--data {cfg.data!r} is not a directory")
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    key = "state_dict_ema" if ema else "state_dict"
    if not isinstance(ck, dict) or key not in ck:
        raise ValueError(f"--checkpoint {checkpoint!r} holds no {key!r} (a `vitpatch train` checkpoint)"
                         + (": the run had no --model-ema" if ema else ""))
    device_name, own_group = init_distributed(device)
    dev = torch.device(device_name)
    try:
        num_classes = num_classes_of(ck[key])
        if num_classes is None:
            num_classes = len(ImageFiles(split_dir(cfg.data, cfg.train_split)).classes)
        model = build_model(cfg, num_classes)
        try:
            model.load_state_dict(ck[key])
        except RuntimeError as exc:
            raise ValueError(f"--checkpoint {checkpoint!r} does not fit {cfg.model} ({cfg.attention}): {exc}") \
                from None
        model.to(dev)
        val_ds = _split_dataset(cfg, model, cfg.val_split, training=False)  # the training split is not read
        collate = _collate(cfg, model)
        if len(val_ds.classes) != num_classes:
            raise ValueError(f"the {cfg.val_split!r} folder has {len(val_ds.classes)} classes, the checkpoint "
                             f"{num_classes}")
        rank, world_size = world()
        loader = _loader(val_ds, batch_size, collate, workers, _Shard(len(val_ds), rank, world_size), False, dev)
        metrics = evaluate(model, loader, dev, attention=cfg.attention, amp=cfg.amp, progress=progress)
        result = {"checkpoint": checkpoint, "epoch": ck.get("epoch"), "weights": key, "model": cfg.model,
                  "attention": cfg.attention, "dip": cfg.dip, "data": os.path.join(cfg.data, cfg.val_split),
                  "windows": cfg.windows, "amp": cfg.amp, "batch_size": batch_size, "world_size": world_size,
                  "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                  "torch": torch.__version__, **metrics}
        if rank == 0:
            _write_json(out or os.path.join(run_dir, "eval.json"), result)
        return result
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
