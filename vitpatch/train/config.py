"""The settings of ``vitpatch train`` / ``vitpatch eval`` in one place (no torch import: ``--help`` stays fast).

:class:`TrainConfig` holds every setting; :func:`add_train_arguments` turns its fields into
command-line flags (``lambda2`` is ``--lambda2``, ``model_ema`` is ``--model-ema``) with the
help texts of :data:`HELP`; ``None`` defaults are filled by :meth:`TrainConfig.resolved` from
:data:`DIGITS_DEFAULTS` (no ``--data``: the bundled digits, a CPU-sized run) or
:data:`FOLDER_DEFAULTS` (an ImageNet-style folder: the DeiT / timm recipe).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field, fields, replace
from typing import Optional, Tuple

__all__ = ["ATTENTIONS", "DIP_CHOICES", "TrainConfig", "DIGITS_DEFAULTS", "FOLDER_DEFAULTS", "HELP",
           "add_train_arguments", "config_from_args", "load_run_config"]

ATTENTIONS = ("dense", "window", "winft", "paca")
DIP_CHOICES = ("none", "keys", "tokens", "both")
DIGITS_MODEL = "vit_digits_patch4_32"
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
LAST = "last.pth.tar"

DIGITS_DEFAULTS = dict(epochs=30, batch_size=64, lr=2e-3, warmup_epochs=1, scale=(0.5, 1.0), hflip=0.0,
                       color_jitter=0.0, img_size=32)
FOLDER_DEFAULTS = dict(epochs=300, batch_size=256, lr=5e-4, warmup_epochs=5, scale=(0.08, 1.0), hflip=0.5,
                       color_jitter=0.0, img_size=None)


@dataclass
class TrainConfig:
    """Settings of ``vitpatch train``; see :data:`HELP` for each field."""

    out: str = "vitpatch_train"
    data: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    model: Optional[str] = None
    attention: Optional[str] = None
    winft_mode: str = "multiply"
    num_clusters: int = 49
    clustering: str = "paper"
    windows: Optional[str] = None
    dip: str = "none"
    alpha: float = 0.1
    beta: float = 0.2
    lambda1: float = 1.0
    lambda2: float = 1.0
    checkpoint: Optional[str] = None
    img_size: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    opt: str = "adamw"
    lr: Optional[float] = None
    weight_decay: float = 0.05
    momentum: float = 0.9
    sched: str = "cosine"
    warmup_epochs: Optional[float] = None
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    clip_grad: Optional[float] = None
    drop_path: float = 0.0
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    scale: Optional[Tuple[float, float]] = None
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: Optional[float] = None
    color_jitter: Optional[float] = None
    aa: Optional[str] = None
    reprob: float = 0.0
    amp: bool = False
    compile: bool = False
    workers: int = 0
    seed: int = 0
    device: Optional[str] = None
    resume: Optional[str] = None
    stop_after: Optional[int] = None
    log_interval: int = 50
    keep_checkpoints: int = 2
    progress: bool = True
    plots: bool = True
    _digits: bool = field(default=False, repr=False)

    def resolved(self) -> "TrainConfig":
        """A copy with the data-dependent defaults filled in and every field checked (``ValueError`` naming its flag)."""
        digits = self.data is None
        base = DIGITS_DEFAULTS if digits else FOLDER_DEFAULTS
        cfg = replace(self, _digits=digits, **{k: (getattr(self, k) if getattr(self, k) is not None else v)
                                               for k, v in base.items()})
        if cfg.model is None:
            if not digits:
                raise ValueError("--model is required with --data (a timm model name, e.g. vit_base_patch16_224)")
            cfg.model = DIGITS_MODEL
        paca_model = cfg.model.startswith("paca_vit")
        if cfg.attention is None:
            cfg.attention = "paca" if paca_model else "dense"
        if cfg.attention not in ATTENTIONS:
            raise ValueError(f"--attention must be one of {ATTENTIONS}, got {cfg.attention!r}")
        if paca_model and cfg.attention != "paca":
            raise ValueError(f"--attention {cfg.attention}: {cfg.model} is a PaCa-ViT (its attention is paca)")
        if cfg.dip not in DIP_CHOICES:
            raise ValueError(f"--dip must be one of {DIP_CHOICES}, got {cfg.dip!r}")
        if cfg.dip != "none" and cfg.attention not in ("window", "winft"):
            raise ValueError(f"--dip {cfg.dip} needs windows: use it with --attention window or winft")
        if cfg.windows is not None and cfg.attention not in ("window", "winft"):
            raise ValueError(f"--windows is used by --attention window and winft, not {cfg.attention}")
        if cfg.attention in ("window", "winft") and cfg.windows is None and not digits:
            raise ValueError(f"--attention {cfg.attention} needs --windows DIR (DIR/{cfg.train_split} and "
                             f"DIR/{cfg.val_split} from `vitpatch windows`); only the digits default computes them")
        if cfg.windows is not None and not os.path.isdir(cfg.windows):
            raise ValueError(f"--windows {cfg.windows!r} is not a directory")
        if cfg.data is not None and not os.path.isdir(cfg.data):
            raise ValueError(f"--data {cfg.data!r} is not a directory")
        for name in ("epochs", "batch_size", "log_interval", "keep_checkpoints", "num_clusters"):
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if cfg.img_size is not None and cfg.img_size < 1:
            raise ValueError(f"--img-size must be a positive integer, got {cfg.img_size}")
        if cfg.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {cfg.workers}")
        if cfg.warmup_epochs < 0:
            raise ValueError(f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}")
        if cfg.stop_after is not None and cfg.stop_after < 1:
            raise ValueError(f"--stop-after must be >= 1, got {cfg.stop_after}")
        for name in ("lr", "weight_decay", "min_lr", "warmup_lr", "smoothing", "mixup", "cutmix", "reprob",
                     "drop_path", "lambda1", "lambda2", "color_jitter"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
        for name in ("hflip", "mixup_prob", "reprob", "drop_path", "smoothing"):
            if not 0 <= getattr(cfg, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(cfg, name)}")
        if len(cfg.scale) != 2 or not 0 < cfg.scale[0] <= cfg.scale[1] <= 1:
            raise ValueError(f"--scale must be two numbers 0 < lo <= hi <= 1, got {cfg.scale}")
        if cfg.clip_grad is not None and cfg.clip_grad <= 0:
            raise ValueError(f"--clip-grad must be > 0, got {cfg.clip_grad}")
        if cfg.checkpoint is not None and not os.path.isfile(cfg.checkpoint):
            raise ValueError(f"--checkpoint {cfg.checkpoint!r} is not a file")
        if cfg.resume not in (None, "auto") and not os.path.isfile(cfg.resume):
            raise ValueError(f"--resume {cfg.resume!r} is not a file (give a checkpoint, or 'auto')")
        return cfg


HELP = {
    "out": "output folder: checkpoints, metrics.jsonl, summary.json, figures",
    "data": "DIR with DIR/train and DIR/val ImageFolders (DIR/<split>/<class>/<image>); without it the bundled "
            "digits are written as one under OUT/digits",
    "train_split": "training subfolder of --data", "val_split": "validation subfolder of --data",
    "model": "timm model name (any ViT, or paca_vit_b0/b1/b2/tiny/small/base); default vit_digits_patch4_32 on "
             "the digits",
    "attention": "dense | window (AWD, paper 000 §4.1) | winft (paper 000 §5) | paca (paper 004) in every block; "
                 "default dense (paca for paca_vit_* models)",
    "winft_mode": "WinfT gating: multiply (eq. 9) or mask", "num_clusters": "PaCa clusters M per layer",
    "clustering": "PaCa clustering: paper | official | linear",
    "windows": "DIR with one `vitpatch windows` run per split (DIR/train, DIR/val), matched to the images by path; "
               "on the digits default without it a dense ViT is trained first and its windows computed",
    "dip": "indiscriminative patches (paper 000 §4.2): none | keys (removed as keys) | tokens (tokens x 0 before "
           "every block, the paper's way) | both",
    "alpha": "window fraction alpha (eq. 4) when the digits default computes windows",
    "beta": "DIP fraction beta when the digits default computes windows",
    "lambda1": "WinfT loss: lambda1 * cross-entropy + lambda2 * BCE (eq. 12)", "lambda2": "see --lambda1",
    "checkpoint": "initial weights, a local file (a classifier of another size is re-initialised)",
    "img_size": "input size (square); digits: 32", "epochs": "epochs (digits: 30; folders: 300)",
    "batch_size": "global batch, split over the torchrun processes (digits: 64; folders: 256)",
    "opt": "timm optimizer name (create_optimizer_v2)", "lr": "peak learning rate (digits: 2e-3; folders: 5e-4)",
    "weight_decay": "weight decay", "momentum": "momentum (SGD-type optimizers)",
    "sched": "timm scheduler name (create_scheduler_v2), stepped per update",
    "warmup_epochs": "warm-up epochs, fractions allowed (digits: 1; folders: 5)", "warmup_lr": "learning rate at the start of warm-up",
    "min_lr": "final learning rate", "smoothing": "label smoothing", "mixup": "Mixup alpha (0: off)",
    "cutmix": "CutMix alpha (0: off)", "mixup_prob": "probability of Mixup/CutMix per batch",
    "clip_grad": "clip the gradient norm to this (off by default)", "drop_path": "stochastic depth rate",
    "model_ema": "keep an EMA of the weights (timm ModelEmaV3), validated and saved too",
    "model_ema_decay": "EMA decay", "scale": "RandomResizedCrop area range (digits: 0.5 1; folders: 0.08 1)",
    "ratio": "RandomResizedCrop aspect range", "hflip": "horizontal flip probability (digits: 0; folders: 0.5)",
    "color_jitter": "color jitter strength (0: off)",
    "aa": "timm auto-augment policy (without windows only: its rotations and shears would misalign them)",
    "reprob": "random erasing probability", "amp": "bf16 autocast (CUDA and CPU)",
    "compile": "torch.compile the model", "workers": "DataLoader worker processes per rank",
    "seed": "seed of initialisation, order, augmentation and Mixup", "device": "cpu or cuda (default: cuda when "
    "available; cuda:LOCAL_RANK under torchrun)",
    "resume": "checkpoint to resume from, or 'auto' (OUT/last.pth.tar when present)",
    "stop_after": "stop after this many epochs in this call (resume later with --resume auto)",
    "log_interval": "steps between loss records in metrics.jsonl", "keep_checkpoints": "epoch checkpoints kept",
    "progress": "progress bars", "plots": "figures at the end",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field (defaults from the dataclass; ``None``: data-dependent)."""
    types = {"img_size": int, "epochs": int, "batch_size": int, "warmup_epochs": float, "workers": int, "seed": int,
             "stop_after": int, "log_interval": int, "keep_checkpoints": int, "num_clusters": int}
    choices = {"attention": ATTENTIONS, "dip": DIP_CHOICES, "winft_mode": ("multiply", "mask"),
               "clustering": ("paper", "official", "linear")}
    for f in fields(TrainConfig):
        if f.name.startswith("_"):
            continue
        help_text = HELP[f.name]
        if f.name in ("progress", "plots"):
            p.add_argument("--no-" + f.name, dest=f.name, action="store_false", help="no " + help_text)
        elif f.type in ("bool",):
            p.add_argument(_flag(f.name), action="store_true", help=help_text)
        elif f.name in ("scale", "ratio"):
            p.add_argument(_flag(f.name), type=float, nargs=2, default=f.default, metavar=("LO", "HI"),
                           help=help_text)
        elif f.name in types:
            p.add_argument(_flag(f.name), type=types[f.name], default=f.default, help=help_text)
        elif f.type in ("float", "Optional[float]"):
            p.add_argument(_flag(f.name), type=float, default=f.default, help=help_text)
        else:
            p.add_argument(_flag(f.name), default=f.default, choices=choices.get(f.name), help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``vitpatch train`` arguments."""
    kw = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if not f.name.startswith("_")}
    for name in ("scale", "ratio"):
        if kw[name] is not None:
            kw[name] = tuple(kw[name])
    return TrainConfig(**kw)


def load_run_config(path) -> TrainConfig:
    """The :class:`TrainConfig` a training run stored (its ``train_config.json``), as it ran (resolved)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} not found: `vitpatch eval` reads the {CONFIG_FILE} that `vitpatch train` writes "
                         f"beside its checkpoints (or pass --model and --attention)")
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    names = {f.name for f in fields(TrainConfig) if not f.name.startswith("_")}
    return TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in stored.items() if k in names})
