"""The papers' training experiments on a user's own data: ``vitpatch train`` and ``vitpatch eval``.

- :mod:`.config`: :class:`TrainConfig`, every setting and its flag, the data-dependent defaults;
- :mod:`.remap`: windows and keep masks moved with the image under crop, resize and flip
  (docs/math.md §4), and the timm-based transforms that draw those parameters once;
- :mod:`.data`: image folders with their stored windows (matched by path), the digits default,
  the per-item seeded augmentation and the batch's :class:`vitpatch.WindowMask`;
- :mod:`.engine`: the training and evaluation loops (timm's optimizer, scheduler, Mixup,
  losses, EMA, checkpoints; DDP under ``torchrun``);
- :mod:`.plots`: loss, accuracy, accuracy vs EO, and paper 000 Fig. 13 for WinfT.

``python -m vitpatch.train ...`` is ``vitpatch train ...`` (the form ``torchrun`` takes)::

    torchrun --nproc_per_node 8 -m vitpatch.train --data /data/imagenet --model vit_base_patch16_224 ...

Importing this package loads nothing heavy; submodules load on first use.
"""
from __future__ import annotations

import importlib

__all__ = ["TrainConfig", "train", "evaluate", "evaluate_checkpoint", "build_model"]

_LAZY = {"TrainConfig": "config", "train": "engine", "evaluate": "engine", "evaluate_checkpoint": "engine",
         "build_model": "engine"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'vitpatch.train' has no attribute {name!r}")
