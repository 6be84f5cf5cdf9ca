"""AWD windows and DIP keep masks for a whole image dataset (paper 000 §4.1–4.2; docs/math.md §3–4).

:func:`run_windows` (the ``vitpatch windows`` command) runs a ViT over an image folder and
writes, in ``out_dir``:

=================  ==========================================================================
``windows.npy``    int16 ``(num_images, n, 4)``: ``(x_left, y_top, x_right, y_bottom)`` per patch
``keep.npy``       bool ``(num_images, n)``: ``False`` = indiscriminative patch (dropped)
``files.npy``      unicode ``(num_images,)``: the image paths, relative to the data folder
``done.npy``       uint8 ``(num_batches,)``: 1 once a batch's rows are written and flushed
``meta.json``      model, weights source, alpha, beta, grid, prefix count, batch size, ...
=================  ==========================================================================

All ``.npy`` files are plain NumPy format, memory-mappable (``np.load(..., mmap_mode="r")``).
Batches are fixed by ``batch_size``; a rerun with the same settings skips the batches marked
in ``done.npy``, so an interrupted run resumes where it stopped. Under ``torchrun`` each rank
takes a contiguous range of batches and writes its own rows of the same files; on one
process (``world_size = 1``) it simply does them all. :class:`WindowDataset` hands the stored
windows to a training loop, and :class:`WindowCollate` turns a batch of them into a
:class:`vitpatch.WindowMask`.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..masks import WindowMask, check_grid
from .maps import attention_maps, model_layout
from .interactions import uncertainty
from .windows import _check_fraction, adaptive_windows, indiscriminative_patches, num_dropped, num_selected

__all__ = ["IMAGE_EXTENSIONS", "ImageFiles", "load_model", "eval_transform", "compute_windows", "run_windows",
           "read_windows", "WindowDataset", "WindowCollate", "FORMAT"]

FORMAT = "vitpatch-windows/1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_FILES = ("windows.npy", "keep.npy", "files.npy", "done.npy", "meta.json")


# ------------------------------------------------------------------------------------------ data
class ImageFiles(torch.utils.data.Dataset):
    """The images under ``root``: ImageFolder-style (``root/<class>/<image>``) or a flat folder.

    Files are found recursively, filtered by extension (:data:`IMAGE_EXTENSIONS`) and sorted by
    their relative POSIX path, which is :attr:`files` (the file index the pipeline stores). When
    every image sits in a subfolder, :attr:`classes` are the sorted first-level folder names and
    the label is the class index; in a flat folder (or a mixed one) every label is ``-1``.
    ``dataset[i]`` is ``(transform(PIL RGB image), label)``.
    """

    def __init__(self, root, transform: Optional[Callable] = None):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise ValueError(f"data folder {root!r} does not exist or is not a directory")
        files: List[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for f in filenames:
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
        files.sort()
        if not files:
            raise ValueError(f"data folder {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.root, self.files, self.transform = root, files, transform
        if all("/" in f for f in files):
            self.classes = sorted({f.split("/", 1)[0] for f in files})
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[f.split("/", 1)[0]] for f in files]
        else:
            self.classes = []
            self.labels = [-1] * len(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(os.path.join(self.root, self.files[i])) as im:
            img = im.convert("RGB")
        return (self.transform(img) if self.transform is not None else img), self.labels[i]


def _file_index(dataset) -> Optional[List[str]]:
    """Relative paths of a dataset's images, when it exposes them (ours, or torchvision ImageFolder)."""
    files = getattr(dataset, "files", None)
    if files is not None:
        return [str(f) for f in files]
    samples, root = getattr(dataset, "samples", None), getattr(dataset, "root", None)
    if samples is not None and root is not None:
        return [os.path.relpath(s[0], root).replace(os.sep, "/") for s in samples]
    return None


# ----------------------------------------------------------------------------------------- model
def load_model(name: str, checkpoint=None, img_size: Optional[int] = None, device="cpu"):
    """A timm model by ``name`` in eval mode, with weights from a local ``checkpoint`` or random.

    Never downloads. ``checkpoint``: a ``.pth``/``.pt``/``.bin`` (``torch.load``, weights only)
    or ``.safetensors`` file, read with timm's ``load_state_dict`` (which unwraps ``state_dict``
    / ``model`` / EMA entries and a ``module.`` prefix); the model's timm checkpoint filter then
    adapts it (e.g. resamples the position embedding for another ``img_size``); the number of
    classes is taken from the checkpoint's ``head.weight``. Loading is strict. Without a
    checkpoint a ``UserWarning`` says the weights are random.

    Returns ``(model, weights)``, ``weights`` a short description of where the weights came from
    (the checkpoint's file name and the start of its SHA-256, so a resumed run cannot silently mix
    two checkpoints of the same name).
    """
    import importlib

    import timm

    importlib.import_module("vitpatch.models")  # registers vitpatch's own models (PaCa-ViT) with timm
    if not isinstance(name, str) or not timm.is_model(name):
        raise ValueError(f"model {name!r} is not a timm model name (see timm.list_models())")
    kwargs = {}
    if img_size is not None:
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
            raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
        kwargs["img_size"] = img_size
    state = None
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        if not os.path.isfile(checkpoint):
            raise ValueError(f"checkpoint {checkpoint!r} is not a file")
        from timm.models import load_state_dict

        state = load_state_dict(checkpoint)
        classes = num_classes_of(state)
        if classes is not None:
            kwargs["num_classes"] = classes
    model = timm.create_model(name, pretrained=False, **kwargs)
    if state is not None:
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, model)
        missing, unexpected = _key_mismatch(model, state)
        if missing or unexpected:
            raise ValueError(f"checkpoint {checkpoint!r} does not fit model {name!r}: "
                             f"{len(missing)} missing keys {missing[:4]}, {len(unexpected)} unexpected keys "
                             f"{unexpected[:4]}")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # shape mismatches
            raise ValueError(f"checkpoint {checkpoint!r} does not fit model {name!r}: {exc}") from None
        weights = f"checkpoint {os.path.basename(checkpoint)} (sha256 {sha256_file(checkpoint)[:16]})"
    else:
        warnings.warn(f"no checkpoint given: {name} has random weights; its windows are meaningless "
                      f"(pass a local checkpoint, e.g. --checkpoint FILE)", UserWarning, stacklevel=2)
        weights = "random (no checkpoint)"
    return model.eval().to(device), weights


def sha256_file(path: str) -> str:
    """The SHA-256 hex digest of a file, read in 4 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def num_classes_of(state: dict) -> Optional[int]:
    """The classifier's output count in a timm state dict (``head.weight`` of a ViT, ``head.fc.weight`` of a
    PaCa-ViT), or ``None`` when it has neither."""
    head = state.get("head.weight", state.get("head.fc.weight"))
    return int(head.shape[0]) if isinstance(head, torch.Tensor) and head.dim() == 2 else None


def _key_mismatch(model: nn.Module, state: dict):
    own = set(model.state_dict())
    return sorted(own - set(state)), sorted(set(state) - own)


def eval_transform(model: nn.Module):
    """timm's evaluation transform for ``model`` (resize, centre crop, normalise) and its data config.

    The input size follows the model's ``patch_embed.img_size`` (so an ``img_size`` override is
    honoured), the rest comes from the model's pretrained config.
    """
    from timm.data import create_transform, resolve_data_config

    args = {}
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        args["input_size"] = (3, int(h), int(w))
    cfg = resolve_data_config(args, model=model)
    return create_transform(**cfg, is_training=False), cfg


def compute_windows(model: nn.Module, images: torch.Tensor, alpha: float, beta: float, *,
                    num_prefix_tokens: Optional[int] = None, grid=None, return_u: bool = False,
                    **forward_kwargs):
    """AWD windows (eq. 4) and DIP keep masks (§4.2) of one batch: ``(windows (B, n, 4), keep (B, n))``.

    Streams the model's attention maps into ``U`` (eq. 2–3) without keeping the layers. The
    layout is read from a timm ViT unless given; with ``return_u`` the ``U`` (float64
    ``(B, n, n)``) is returned third.
    """
    _check_fraction(alpha, "alpha", True, False)
    _check_fraction(beta, "beta", False, True)
    P, grid = model_layout(model, num_prefix_tokens, grid)
    U = uncertainty(attention_maps(model, images, **forward_kwargs), P)
    if U.shape[-1] != grid[0] * grid[1]:
        raise ValueError(f"grid {grid} has {grid[0] * grid[1]} patches but the model's maps have "
                         f"n = {U.shape[-1]} patch tokens after {P} prefix tokens")
    windows = adaptive_windows(U, alpha, grid)
    keep = indiscriminative_patches(U, beta)
    return (windows, keep, U) if return_u else (windows, keep)


# -------------------------------------------------------------------------------------- pipeline
def write_json_atomic(path: str, obj, **json_kwargs) -> None:
    """Write ``obj`` as indented JSON to ``path`` through a temporary file and ``os.replace``, so a reader never
    sees half a file; ``json_kwargs`` go to ``json.dump`` (e.g. ``sort_keys=True``, ``default=str``)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, **json_kwargs)
        f.write("\n")
    os.replace(tmp, path)


def _read_meta(out_dir: str) -> Optional[dict]:
    path = os.path.join(out_dir, "meta.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _create(out_dir: str, meta: dict, files: Sequence[str]) -> None:
    """Create the (zero-filled) output files, ``meta.json`` last: its presence marks a usable run."""
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    N, n = meta["num_images"], meta["num_patches"]
    for fname, dtype, shape in (("windows.npy", np.int16, (N, n, 4)), ("keep.npy", np.bool_, (N, n)),
                                ("done.npy", np.uint8, (meta["num_batches"],))):
        arr = np.lib.format.open_memmap(os.path.join(out_dir, fname), mode="w+", dtype=dtype, shape=shape)
        arr.flush()
        del arr
    width = max(1, max(len(f) for f in files))
    idx = np.lib.format.open_memmap(os.path.join(out_dir, "files.npy"), mode="w+", dtype=f"<U{width}",
                                    shape=(len(files),))
    idx[:] = np.asarray(files, dtype=f"<U{width}")
    idx.flush()
    del idx
    write_json_atomic(meta_path, meta, sort_keys=True)


def _diff(old: dict, new: dict) -> List[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: stored {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _prepare(out_dir: str, meta: dict, files: Sequence[str], *, create: bool, overwrite: bool) -> None:
    """Resume a run with the same settings and images; else create one (only with ``overwrite``
    when ``out_dir`` already holds a different run)."""
    old = _read_meta(out_dir)
    if old is not None:
        diffs = _diff(old, meta)
        if not diffs:
            stored = np.load(os.path.join(out_dir, "files.npy"), mmap_mode="r")
            if list(stored) == list(files):
                return
            diffs = ["the list of images differs"]
        if not overwrite:
            raise ValueError(f"out_dir {out_dir!r} holds a windows run with other settings ({'; '.join(diffs)}); "
                             f"use another output folder or overwrite=True (--overwrite)")
    if not create:
        raise RuntimeError(f"out_dir {out_dir!r}: rank 0 did not create the output files")
    _create(out_dir, meta, files)


def _dist_info(rank: Optional[int], world_size: Optional[int]):
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, world_size = {world_size}), got {rank!r}")
    return rank, world_size, initialized


def shard_batches(num_batches: int, rank: int, world_size: int) -> range:
    """The contiguous range of batch indices rank ``rank`` of ``world_size`` processes."""
    return range(num_batches * rank // world_size, num_batches * (rank + 1) // world_size)


def run_windows(model: nn.Module, dataset, out_dir, *, alpha: float = 0.1, beta: float = 0.2,
                batch_size: int = 32, device=None, num_workers: int = 0, rank: Optional[int] = None,
                world_size: Optional[int] = None, max_batches: Optional[int] = None, overwrite: bool = False,
                progress: bool = True, meta: Optional[dict] = None, num_prefix_tokens: Optional[int] = None,
                grid=None) -> dict:
    """Compute and store AWD windows and DIP keep masks for every image of ``dataset`` (docs/math.md §3–4).

    Args:
        model: a timm ViT (eval mode is set while capturing maps).
        dataset: items ``image`` or ``(image, label, ...)`` with ``image`` a ``(3, H, W)`` tensor
            already transformed for the model (:class:`ImageFiles` with :func:`eval_transform`).
            Its file index (``dataset.files``, or a torchvision ImageFolder's samples) is stored;
            otherwise the item indices are.
        out_dir: output folder (see the module docstring for its files).
        alpha, beta: eq. 4's ``T = round(alpha n^2)`` and DIP's ``round(beta n)`` (docs/math.md §3–4).
        batch_size: images per batch; batches are the unit of progress and of resuming.
        device: where the model runs (default: the model's device).
        rank, world_size: this process's share of the batches (default: from
            ``torch.distributed`` when initialised, else 0 and 1). Rank ``r`` does the contiguous
            batch range :func:`shard_batches`; calling rank 0 then rank 1 of ``world_size = 2``
            in one process writes exactly what one ``world_size = 1`` run writes.
        max_batches: stop after this many batches in this call (the run stays resumable).
        overwrite: discard an existing run in ``out_dir`` with other settings.
        meta: extra JSON-able metadata to store (e.g. ``{"model": name, "weights": ...}``).

    Returns a summary dict: ``batches_done`` (in this call), ``batches_skipped`` (already done),
    ``complete`` (every batch of every rank is done), and ``out_dir``.
    """
    a = _check_fraction(alpha, "alpha", True, False)
    b = _check_fraction(beta, "beta", False, True)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 0):
        raise ValueError(f"max_batches must be a non-negative integer or None, got {max_batches!r}")
    rank, world_size, distributed = _dist_info(rank, world_size)
    P, grid = model_layout(model, num_prefix_tokens, grid)
    if max(grid) > np.iinfo(np.int16).max:
        raise ValueError(f"grid {grid} is too large for int16 windows")
    n = grid[0] * grid[1]
    num_images = len(dataset)
    if num_images == 0:
        raise ValueError("dataset is empty")
    files = _file_index(dataset) or [str(i) for i in range(num_images)]
    if len(files) != num_images:
        raise ValueError(f"dataset has {num_images} items but a file index of {len(files)}")
    num_batches = -(-num_images // batch_size)
    out_dir = os.fspath(out_dir)
    record = {
        "format": FORMAT, "alpha": a, "beta": b, "grid": list(grid), "num_prefix_tokens": P,
        "num_patches": n, "num_images": num_images, "batch_size": batch_size, "num_batches": num_batches,
        "T": num_selected(a, n), "num_dropped": num_dropped(b, n),
        "windows": "int16 (num_images, n, 4): x_left, y_top, x_right, y_bottom (inclusive)",
        "keep": "bool (num_images, n): False = indiscriminative patch",
    }
    record.update(meta or {})
    if rank == 0 or not distributed:
        _prepare(out_dir, record, files, create=True, overwrite=overwrite and rank == 0)
    if distributed:
        torch.distributed.barrier()
        if rank != 0:
            _prepare(out_dir, record, files, create=False, overwrite=False)

    windows_mm = np.load(os.path.join(out_dir, "windows.npy"), mmap_mode="r+")
    keep_mm = np.load(os.path.join(out_dir, "keep.npy"), mmap_mode="r+")
    done_mm = np.load(os.path.join(out_dir, "done.npy"), mmap_mode="r+")
    mine = shard_batches(num_batches, rank, world_size)
    pending = [i for i in mine if not done_mm[i]]
    skipped = len(mine) - len(pending)
    if max_batches is not None:
        pending = pending[:max_batches]
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model = model.to(device)

    from tqdm.auto import tqdm

    batches = [list(range(i * batch_size, min((i + 1) * batch_size, num_images))) for i in pending]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                         pin_memory=torch.device(device).type == "cuda")
    done_now = 0
    bar = tqdm(total=len(pending), desc=f"windows (rank {rank}/{world_size})" if world_size > 1 else "windows",
               unit="batch", disable=not progress, position=rank if world_size > 1 else None)
    try:
        for bidx, item in zip(pending, loader):
            images = item[0] if isinstance(item, (list, tuple)) else item
            windows, keep = compute_windows(model, images.to(device, non_blocking=True), a, b,
                                            num_prefix_tokens=P, grid=grid)
            start, stop = bidx * batch_size, min((bidx + 1) * batch_size, num_images)
            if windows.shape[0] != stop - start:
                raise RuntimeError(f"batch {bidx} has {windows.shape[0]} images, expected {stop - start}")
            windows_mm[start:stop] = windows.to("cpu", torch.int16).numpy()
            keep_mm[start:stop] = keep.cpu().numpy()
            windows_mm.flush()
            keep_mm.flush()
            done_mm[bidx] = 1  # progress mark only after the batch's rows are on disk
            done_mm.flush()
            done_now += 1
            bar.update(1)
    finally:
        bar.close()
    if distributed:
        torch.distributed.barrier()
    complete = bool(np.all(np.load(os.path.join(out_dir, "done.npy"), mmap_mode="r")))
    return {"out_dir": out_dir, "rank": rank, "world_size": world_size, "batches_done": done_now,
            "batches_skipped": skipped, "batches_total": num_batches, "complete": complete}


def read_windows(out_dir, *, require_complete: bool = True):
    """``(windows, keep, files, meta)`` of a run, the arrays memory-mapped read-only."""
    out_dir = os.fspath(out_dir)
    meta = _read_meta(out_dir)
    if meta is None or meta.get("format") != FORMAT:
        raise ValueError(f"out_dir {out_dir!r} holds no vitpatch windows run (no valid meta.json)")
    done = np.load(os.path.join(out_dir, "done.npy"), mmap_mode="r")
    if require_complete and not np.all(done):
        raise ValueError(f"out_dir {out_dir!r}: the windows run is incomplete ({int(done.sum())} of {done.size} "
                         f"batches done); rerun `vitpatch windows` with the same arguments to resume it")
    windows = np.load(os.path.join(out_dir, "windows.npy"), mmap_mode="r")
    keep = np.load(os.path.join(out_dir, "keep.npy"), mmap_mode="r")
    files = np.load(os.path.join(out_dir, "files.npy"), mmap_mode="r")
    return windows, keep, files, meta


# ------------------------------------------------------------------------------------- training
class WindowDataset(torch.utils.data.Dataset):
    """An image dataset with its stored AWD windows and DIP keep masks (docs/math.md §3–4).

    ``WindowDataset(image_dataset, out_dir)[i]``: when the base item is a tuple or list (e.g.
    ``(image, label)``) the windows and keep mask are appended, giving
    ``(image, label, windows, keep)``; otherwise it is ``(image, windows, keep)``. ``windows``
    is int64 ``(n, 4)``, ``keep`` bool ``(n,)``. With ``check_files`` the base dataset's file
    index (when it has one) must equal the stored one, so rows cannot be misaligned.

    Use ``DataLoader(ds, batch_size=..., collate_fn=ds.collate())`` to get batches
    ``(images, labels, mask, keep)`` with ``mask`` a :class:`vitpatch.WindowMask` (see
    :class:`WindowCollate`). The base dataset may use training augmentation only if it keeps
    the patch grid aligned (no crops or flips), since windows are in grid coordinates; for
    RandomResizedCrop and flips use :class:`vitpatch.train.data.TrainImages` with a
    :class:`vitpatch.train.remap.WindowFollowingTransform`, which move the windows with the image.
    """

    def __init__(self, image_dataset, out_dir, *, check_files: bool = True):
        self.windows, self.keep, files, self.meta = read_windows(out_dir)
        if len(image_dataset) != len(self.windows):
            raise ValueError(f"image_dataset has {len(image_dataset)} items but out_dir {os.fspath(out_dir)!r} "
                             f"holds windows for {len(self.windows)} images")
        if check_files:
            index = _file_index(image_dataset)
            if index is not None and index != [str(f) for f in files]:
                raise ValueError("image_dataset lists other files (or another order) than the stored windows run")
        self.dataset = image_dataset
        self.grid = tuple(self.meta["grid"])
        self.num_prefix_tokens = int(self.meta["num_prefix_tokens"])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        w = torch.from_numpy(np.asarray(self.windows[i], dtype=np.int64))
        k = torch.from_numpy(np.array(self.keep[i], dtype=np.bool_))
        if isinstance(item, (tuple, list)):
            return (*item, w, k)
        return item, w, k

    def collate(self, drop_keys: bool = True) -> "WindowCollate":
        """A :class:`WindowCollate` for this run's grid and prefix count."""
        return WindowCollate(self.grid, self.num_prefix_tokens, drop_keys=drop_keys)


class WindowCollate:
    """Collate items ``(..., windows, keep)`` into ``(*default_collate(...), mask, keep)``.

    ``mask`` is a :class:`vitpatch.WindowMask` of the batch's windows (``(B, n, 4)``) on
    ``grid`` with ``num_prefix_tokens`` prefix tokens; with ``drop_keys`` its ``key_keep``
    removes the dropped patches as keys (prefix tokens always kept). ``keep`` (bool ``(B, n)``)
    is returned too, for the paper's token masking (multiply dropped tokens by 0, §4.2).
    Picklable, so it works with ``DataLoader(num_workers > 0)``.
    """

    def __init__(self, grid, num_prefix_tokens: int = 0, drop_keys: bool = True):
        self.grid = check_grid(grid)
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be a non-negative integer, got {num_prefix_tokens!r}")
        self.num_prefix_tokens = num_prefix_tokens
        self.drop_keys = bool(drop_keys)

    def __call__(self, batch):
        from torch.utils.data import default_collate

        if not batch:
            raise ValueError("batch is empty")
        fields = list(zip(*batch))
        if len(fields) < 3:
            raise ValueError("batch items must be (image, ..., windows, keep)")
        windows = torch.stack([torch.as_tensor(w) for w in fields[-2]])
        keep = torch.stack([torch.as_tensor(k) for k in fields[-1]])
        if keep.dtype != torch.bool:
            raise TypeError(f"keep must be bool, got dtype {keep.dtype}")
        rest = [default_collate(list(f)) for f in fields[:-2]]
        key_keep = None
        if self.drop_keys:
            P = self.num_prefix_tokens
            key_keep = torch.cat([torch.ones(keep.shape[0], P, dtype=torch.bool), keep], 1)
        mask = WindowMask(windows, self.grid, self.num_prefix_tokens, key_keep=key_keep)
        return (*rest, mask, keep)
