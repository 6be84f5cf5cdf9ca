"""Training data of ``vitpatch train``: image folders, stored windows matched by file path, the digits default.

- :func:`write_digits_folder`: scikit-learn's bundled digits written once as an ImageFolder of
  32x32 PNGs (``train/`` and ``val/``), the default data when no ``--data`` is given.
- :class:`WindowStore`: a ``vitpatch windows`` run (paper 000 §4.1–4.2), its rows looked up by
  the image's path relative to the data folder, so the dataset and the run need not list the
  same files in the same order; a file the run lacks is a clear error naming it.
- :class:`TrainImages`: an image folder, optionally with each image's windows and keep mask,
  through a transform that moves the windows with the image (:mod:`vitpatch.train.remap`).
  Every item's random augmentation is seeded from ``(seed, epoch, index)``, so an image gets
  the same crop on any rank, in any worker and after a resume.
- :class:`TrainCollate`: stacks a batch and builds its :class:`vitpatch.WindowMask` with the
  DIP choice (``--dip``: dropped patches removed as keys, zeroed as tokens, both or neither).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from typing import Optional, Sequence

import numpy as np
import torch

from ..analysis.pipeline import ImageFiles, read_windows
from ..masks import WindowMask, check_grid
from .config import DIP_CHOICES

__all__ = ["DIP_CHOICES", "write_digits_folder", "split_dir", "WindowStore", "TrainImages", "TrainCollate",
           "seeded", "seed_all", "item_seed", "derived_seed"]

_DIGITS_MARK = "vitpatch-digits.json"


def write_digits_folder(root, *, seed: int = 0, val_fraction: float = 0.2, img_size: int = 32) -> str:
    """Write scikit-learn's 1,797 digits as ``root/{train,val}/<digit>/<index>.png`` (RGB, ``img_size`` px).

    The split is the demo's (:func:`vitpatch.demo.load_digits_split`: a permutation seeded with
    ``seed``, ``val_fraction`` held out). Written once: a marker file with the settings is
    written last, so a folder with the marker is complete and is reused; other settings in an
    existing folder are an error (nothing is overwritten).
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = os.fspath(root)
    settings = {"seed": seed, "val_fraction": val_fraction, "img_size": img_size, "format": 1}
    mark = os.path.join(root, _DIGITS_MARK)
    if os.path.exists(mark):
        with open(mark, encoding="utf-8") as f:
            stored = json.load(f)
        if stored != settings:
            raise ValueError(f"data folder {root!r} holds digits written with {stored}, not {settings}; "
                             f"use another folder")
        return root
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()
    perm = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(val_fraction * len(perm)))
    for split, idx in (("val", perm[:n_val]), ("train", perm[n_val:])):
        for i in idx:
            folder = os.path.join(root, split, str(int(digits.target[i])))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(pixels[i]).convert("RGB").save(os.path.join(folder, f"{i:04d}.png"))
    with open(mark, "w", encoding="utf-8") as f:
        json.dump(settings, f)
    return root


def split_dir(data, split: str) -> str:
    """``data/split``, checked to exist (an ImageFolder: ``data/split/<class>/<image>``)."""
    path = os.path.join(os.fspath(data), split)
    if not os.path.isdir(path):
        raise ValueError(f"--data {os.fspath(data)!r} has no {split!r} folder: expected {path}/<class>/<image> "
                         f"(ImageNet layout: DATA/train and DATA/val)")
    return path


class WindowStore:
    """One ``vitpatch windows`` run: windows and keep masks, found by image path.

    ``rows(files)`` maps the dataset's relative paths to the run's rows and raises a
    ``ValueError`` naming the first file the run lacks (windows of another dataset). The run
    must be complete and self-consistent (its ``grid`` must match ``windows.npy``; its
    ``input_size`` must be a whole number of patches of that grid).
    """

    def __init__(self, out_dir):
        self.path = os.fspath(out_dir)
        self.windows, self.keep, files, self.meta = read_windows(self.path)
        self.grid = check_grid(tuple(self.meta["grid"]))
        n = self.grid[0] * self.grid[1]
        if self.windows.ndim != 3 or self.windows.shape[1:] != (n, 4) or self.keep.shape != self.windows.shape[:2]:
            raise ValueError(f"windows run {self.path!r}: windows.npy {tuple(self.windows.shape)} and keep.npy "
                             f"{tuple(self.keep.shape)} do not fit its grid {self.grid} ({n} patches)")
        size = self.meta.get("input_size")
        if not size or len(size) != 3 or size[1] % self.grid[0] or size[2] % self.grid[1]:
            raise ValueError(f"windows run {self.path!r}: input_size {size} is not a whole number of patches of "
                             f"its grid {self.grid}")
        self._index = {str(f): i for i, f in enumerate(files)}

    def rows(self, files: Sequence[str]) -> np.ndarray:
        out = np.empty(len(files), dtype=np.int64)
        for i, f in enumerate(files):
            row = self._index.get(f)
            if row is None:
                raise ValueError(f"windows run {self.path!r} has no windows for image {f!r} (and perhaps others): "
                                 f"compute them with `vitpatch windows --data <that folder> --out {self.path}`")
            out[i] = row
        return out


def derived_seed(*keys: int) -> int:
    """A 32-bit seed that is a function of the integers ``keys`` only (NumPy's ``SeedSequence``)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one item's augmentation: a function of ``(seed, epoch, index)`` only."""
    return derived_seed(seed, epoch, index)


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's CPU generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int):
    """Seed Python's, NumPy's and torch's CPU generators inside the block, restoring them after."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_all(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class TrainImages(torch.utils.data.Dataset):
    """An image folder with optional windows: items ``(image, label)`` or ``(image, label, windows, keep)``.

    ``transform(img)`` (no windows) or ``transform(img, windows, keep) -> (image, windows, keep)``
    (with a :class:`WindowStore`); the windows come out on the model's grid. ``set_epoch``
    changes the augmentation seed of every item (:func:`item_seed`). ``images`` reuses an
    :class:`~vitpatch.analysis.ImageFiles` scan of ``root`` already made.
    """

    def __init__(self, root, transform, *, store: Optional[WindowStore] = None, seed: int = 0,
                 images: Optional[ImageFiles] = None):
        self.images = ImageFiles(root) if images is None else images
        self.files, self.labels, self.classes = self.images.files, self.images.labels, self.images.classes
        if not self.classes:
            raise ValueError(f"data folder {os.fspath(root)!r} is not an ImageFolder (root/<class>/<image>): "
                             f"training needs class folders")
        self.transform, self.store, self.seed, self.epoch = transform, store, int(seed), 0
        self.rows = None if store is None else store.rows(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        img, label = self.images[i]
        with seeded(item_seed(self.seed, self.epoch, i)):
            if self.store is None:
                return self.transform(img), label
            r = self.rows[i]
            x, w, k = self.transform(img, np.asarray(self.store.windows[r]), np.asarray(self.store.keep[r]))
        return x, label, w, k


class TrainCollate:
    """Batches ``(images, labels, mask)``: ``mask`` a :class:`vitpatch.WindowMask` or ``None``.

    ``dip`` (:data:`DIP_CHOICES`): ``"keys"`` removes the dropped patches as keys
    (``key_keep``), ``"tokens"`` multiplies their tokens by 0 before every block
    (``token_keep``, applied by :func:`vitpatch.nn.zero_dropped_tokens`), ``"both"`` does both,
    ``"none"`` keeps every patch. Prefix tokens are always kept. Picklable for DataLoader workers.
    """

    def __init__(self, grid=None, num_prefix_tokens: int = 0, dip: str = "none"):
        if dip not in DIP_CHOICES:
            raise ValueError(f"dip must be one of {DIP_CHOICES}, got {dip!r}")
        self.grid = None if grid is None else check_grid(grid)
        self.num_prefix_tokens, self.dip = int(num_prefix_tokens), dip

    def __call__(self, batch):
        images = torch.stack([b[0] for b in batch])
        labels = torch.as_tensor([int(b[1]) for b in batch], dtype=torch.long)
        if len(batch[0]) == 2:
            return images, labels, None
        if self.grid is None:
            raise ValueError("TrainCollate got windows but no grid")
        windows = torch.stack([torch.as_tensor(b[2]) for b in batch])
        keep = torch.stack([torch.as_tensor(b[3]) for b in batch])
        full = torch.cat([torch.ones(len(batch), self.num_prefix_tokens, dtype=torch.bool), keep], 1)
        mask = WindowMask(windows, self.grid, self.num_prefix_tokens,
                          key_keep=full if self.dip in ("keys", "both") else None,
                          token_keep=full if self.dip in ("tokens", "both") else None)
        return images, labels, mask
