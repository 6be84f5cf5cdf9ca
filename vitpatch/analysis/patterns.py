"""Attention patterns of heads (paper 003 §5.4, Fig. 6, 12, 13; docs/math.md §9) and their bit-packed store.

CLS patterns ``concat(A[0, :], A[P:, 0])`` are laid out by t-SNE; patch patterns ``A[P:, P:]`` are
binarised (the top 1% of entries set to 1), an autoencoder is trained on them and its latents are
laid out by t-SNE. Binary patterns are stored 8 to a byte (``np.packbits``) in an ``.npy`` file
appended batch by batch, so the paper's ``m x l x n`` patterns (144k for 1000 images of ViT-B/16:
3.5 MB per 1000 patterns of ``196 x 196`` bits, instead of 150 MB as float32) never sit in memory::

    store = NpyAppender("patterns.npy", np.uint8, (packed_size(n),))
    for x in batches:
        for A in analysis.attention_maps(model, x):
            store.append(pack_patterns(binarize_patterns(A, P)).reshape(-1, packed_size(n)))
    store.close()
    data = PackedPatterns("patterns.npy", n)                 # a Dataset: rows unpacked on the fly
    ae, losses = train_pattern_autoencoder(data, epochs=30)
    z = encode_patterns(ae, data, indices)                   # latents of the rows to lay out
"""
from __future__ import annotations

import math
import numbers
import os
import struct
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ._attn import check_attention

__all__ = ["cls_patterns", "binarize_patterns", "PatternAutoencoder", "pattern_latents", "train_pattern_autoencoder",
           "encode_patterns", "context_masks", "tsne", "NpyAppender", "packed_size", "pack_patterns",
           "unpack_patterns", "PackedPatterns"]


def cls_patterns(attn, num_prefix_tokens: int = 1) -> torch.Tensor:
    """CLS pattern of every head (paper 003 §5.4, Fig. 6B): ``concat(A[0, :], A[P:, 0])``, ``(..., h, N + n)``."""
    attn, P = check_attention(attn, num_prefix_tokens)
    if P < 1:
        raise ValueError("num_prefix_tokens must be >= 1 for CLS patterns (token 0 is the CLS token)")
    return torch.cat([attn[..., 0, :], attn[..., P:, 0]], -1)


def binarize_patterns(attn, num_prefix_tokens: int = 0, top: float = 0.01) -> torch.Tensor:
    """Patch pattern of every head (paper 003 §5.4, Fig. 6C): the top ``top`` share of ``Ap``'s entries
    set to 1, the rest 0, ``(..., h, n, n)`` float (at least one entry per head)."""
    if isinstance(top, bool) or not isinstance(top, numbers.Real) or not 0 < float(top) <= 1:
        raise ValueError(f"top must be a fraction in (0, 1], got {top!r}")
    attn, P = check_attention(attn, num_prefix_tokens)
    Ap = attn[..., P:, P:]
    n = Ap.shape[-1]
    flat = Ap.reshape(*Ap.shape[:-2], n * n)
    k = max(1, int(math.ceil(float(top) * n * n)))
    idx = flat.topk(k, -1).indices
    out = torch.zeros_like(flat, dtype=torch.float32).scatter_(-1, idx, 1.0)
    return out.reshape(Ap.shape)


class PatternAutoencoder(nn.Module):
    """Small conv autoencoder of binarised ``n x n`` patch patterns (paper 003 §5.4; SPEC §9 decision).

    Encoder: conv 1->8 (3x3, stride 2) + ReLU, conv 8->16 (3x3, stride 2) + ReLU, linear to a
    ``latent``-d code (64). Decoder mirrored: linear, two transposed convs (4x4, stride 2), cropped
    to ``n x n``; trained with BCE on logits.
    """

    def __init__(self, n: int, latent: int = 64):
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n must be a positive integer (patches), got {n!r}")
        self.n = int(n)
        s = (self.n + 1) // 2
        self.s = (s + 1) // 2
        self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(16 * self.s * self.s, latent))
        self.dec_fc = nn.Linear(latent, 16 * self.s * self.s)
        self.dec = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(8, 1, 4, 2, 1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x.reshape(-1, 1, self.n, self.n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encode(x)
        y = self.dec(self.dec_fc(z).reshape(-1, 16, self.s, self.s))
        return y[..., :self.n, :self.n]


# ------------------------------------------------------------------------------ bit-packed store
class NpyAppender:
    """An ``.npy`` file of shape ``(rows, *row_shape)`` that grows by :meth:`append` (rows are written, not kept).

    The header has a fixed size (128 bytes) and is rewritten after every append, so the file is a
    valid ``.npy`` at any time and ``np.load(path, mmap_mode="r")`` maps it. Use as a context
    manager or call :meth:`close`.
    """

    HEADER = 128

    def __init__(self, path, dtype, row_shape: Sequence[int] = ()):
        self.path = os.fspath(path)
        self.dtype = np.dtype(dtype)
        if self.dtype.hasobject:
            raise ValueError(f"dtype must be a plain numeric dtype, got {self.dtype}")
        try:
            self.row_shape = tuple(int(s) for s in row_shape)
        except TypeError:
            raise ValueError(f"row_shape must be a sequence of non-negative ints, got {row_shape!r}") from None
        if any(s < 0 for s in self.row_shape):
            raise ValueError(f"row_shape must be a sequence of non-negative ints, got {row_shape!r}")
        self.count = 0
        self._header(2 ** 62)  # the largest header fits
        self._f = open(self.path, "wb")
        self._f.write(self._header(0))
        self._f.flush()

    def _header(self, count: int) -> bytes:
        d = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
             "shape": (int(count), *self.row_shape)}
        text = repr(d).encode("latin1")
        room = self.HEADER - 10  # magic (6) + version (2) + length (2)
        if len(text) + 1 > room:
            raise ValueError(f"row_shape {self.row_shape} has too many dims for the fixed .npy header")
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", room) + text + b" " * (room - len(text) - 1) + b"\n"

    def append(self, rows) -> int:
        """Write ``rows`` ``(k, *row_shape)`` at the end; returns the number of rows now in the file."""
        if self._f is None:
            raise ValueError(f"{self.path!r} is closed")
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        a = np.ascontiguousarray(rows, dtype=self.dtype)
        if a.shape[1:] != self.row_shape:
            raise ValueError(f"rows must have shape (k, *{self.row_shape}), got {a.shape}")
        self._f.write(a.tobytes())
        self.count += a.shape[0]
        self._f.seek(0)
        self._f.write(self._header(self.count))
        self._f.seek(0, os.SEEK_END)
        self._f.flush()
        return self.count

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "NpyAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def packed_size(n: int) -> int:
    """Bytes per packed ``n x n`` binary pattern: ``ceil(n^2 / 8)``."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive integer (patches), got {n!r}")
    return (int(n) * int(n) + 7) // 8


def pack_patterns(patterns) -> np.ndarray:
    """Binary ``(..., n, n)`` patterns (nonzero = 1) packed 8 to a byte: ``(..., ceil(n^2 / 8))`` uint8 (``np.packbits``, big-endian bit order)."""
    p = patterns.detach().cpu().numpy() if isinstance(patterns, torch.Tensor) else np.asarray(patterns)
    if p.ndim < 2 or p.shape[-1] != p.shape[-2]:
        raise ValueError(f"patterns must have shape (..., n, n), got {p.shape}")
    n = p.shape[-1]
    return np.packbits(p.reshape(*p.shape[:-2], n * n) != 0, axis=-1)


def unpack_patterns(packed, n: int) -> np.ndarray:
    """Inverse of :func:`pack_patterns`: ``(..., ceil(n^2 / 8))`` uint8 to ``(..., n, n)`` uint8 in {0, 1}."""
    nb = packed_size(n)
    a = np.asarray(packed)
    if a.dtype != np.uint8 or a.ndim < 1 or a.shape[-1] != nb:
        raise ValueError(f"packed must be uint8 of shape (..., {nb}) for n = {n}, got {a.dtype} {a.shape}")
    return np.unpackbits(a, axis=-1, count=n * n).reshape(*a.shape[:-1], n, n)


class PackedPatterns(torch.utils.data.Dataset):
    """The bit-packed patterns of an ``.npy`` file ``(M, ceil(n^2 / 8))`` uint8 as a Dataset.

    ``ds[i]`` is the float32 ``(n, n)`` pattern of row ``i``, unpacked on access; :meth:`rows` reads
    and unpacks many rows at once (a training batch; runs of consecutive rows in one read). Rows are
    read from the file, not memory-mapped, so the process holds only the rows asked for, however
    large the file (mapped pages would count in its resident memory).
    """

    def __init__(self, path, n: int):
        self._file = None
        self.n = int(n)
        self.row_bytes = packed_size(n)
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ValueError(f"path {self.path!r} is not a file")
        with open(self.path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in read:
                    raise ValueError(f"unsupported .npy version {version}")
                shape, fortran, dtype = read[version](f)
            except ValueError as exc:
                raise ValueError(f"path {self.path!r} is not a .npy file: {exc}") from None
            self.offset = f.tell()
        if dtype != np.uint8 or len(shape) != 2 or shape[1] != self.row_bytes or fortran:
            raise ValueError(f"{self.path!r} must hold uint8 rows of {self.row_bytes} bytes (n = {n}), got "
                             f"{dtype} {shape}")
        self.count = int(shape[0])

    def __len__(self) -> int:
        return self.count

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_file"] = None  # reopened where unpickled (DataLoader workers)
        return d

    def _read(self, idx: np.ndarray) -> np.ndarray:
        if self._file is None:
            self._file = open(self.path, "rb")
        out = np.empty((len(idx), self.row_bytes), np.uint8)
        if not len(idx):
            return out
        order = np.argsort(idx, kind="stable")
        s = idx[order]
        breaks = np.nonzero(np.diff(s) != 1)[0] + 1
        for run_idx in np.split(np.arange(len(s)), breaks):
            first, k = int(s[run_idx[0]]), len(run_idx)
            self._file.seek(self.offset + first * self.row_bytes)
            buf = self._file.read(k * self.row_bytes)
            if len(buf) != k * self.row_bytes:
                raise ValueError(f"{self.path!r} is shorter than its header says ({self.count} rows)")
            out[order[run_idx]] = np.frombuffer(buf, np.uint8).reshape(k, self.row_bytes)
        return out

    def rows(self, indices) -> torch.Tensor:
        """The patterns of ``indices`` (any order, repeats allowed) as float32 ``(k, n, n)``."""
        idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"indices must be in [0, {len(self)}), got [{idx.min()}, {idx.max()}]")
        return torch.from_numpy(unpack_patterns(self._read(idx), self.n).astype(np.float32))

    def packed(self, indices) -> np.ndarray:
        """The packed rows of ``indices``: ``(k, ceil(n^2 / 8))`` uint8."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"indices must be in [0, {len(self)}), got [{idx.min()}, {idx.max()}]")
        return self._read(idx)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getitem__(self, i) -> torch.Tensor:
        return self.rows([int(i)])[0]

    def __del__(self):
        self.close()


Patterns = Union[torch.Tensor, PackedPatterns]


def _check_pattern_data(patterns) -> Tuple[int, int]:
    if isinstance(patterns, PackedPatterns):
        return len(patterns), patterns.n
    if not isinstance(patterns, torch.Tensor) or patterns.dim() != 3 or patterns.shape[1] != patterns.shape[2]:
        raise ValueError(f"patterns must be a PackedPatterns or a tensor (M, n, n), got "
                         f"{getattr(patterns, 'shape', type(patterns).__name__)}")
    return patterns.shape[0], patterns.shape[-1]


def _rows(patterns: Patterns, idx: torch.Tensor) -> torch.Tensor:
    if isinstance(patterns, PackedPatterns):
        return patterns.rows(idx)
    return patterns[idx].detach().float().cpu()


def train_pattern_autoencoder(patterns: Patterns, epochs: int = 30, latent: int = 64, lr: float = 3e-3,
                              batch_size: int = 32, seed: int = 0, progress: bool = False
                              ) -> Tuple[PatternAutoencoder, List[float]]:
    """Train :class:`PatternAutoencoder` (paper 003 §5.4) on binary patterns: ``(model, mean BCE per epoch)``.

    ``patterns``: a :class:`PackedPatterns` file (rows unpacked batch by batch: memory does not grow
    with the number of patterns) or a tensor ``(M, n, n)``. Adam, shuffled batches of ``batch_size``;
    the same ``seed`` gives the same model from either form of the same patterns.
    """
    M, n = _check_pattern_data(patterns)
    if M < 1:
        raise ValueError("patterns must hold at least one pattern")
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PatternAutoencoder(n, latent)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    epochs_it = range(int(epochs))
    if progress:
        from tqdm.auto import tqdm

        epochs_it = tqdm(epochs_it, desc="pattern autoencoder", unit="epoch", leave=False)
    with torch.enable_grad():
        for _ in epochs_it:
            tot = 0.0
            for idx in torch.randperm(M, generator=g).split(int(batch_size)):
                xb = _rows(patterns, idx)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb)[:, 0], xb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(idx)
            losses.append(tot / M)
    return model.eval(), losses


@torch.no_grad()
def encode_patterns(model: PatternAutoencoder, patterns: Patterns, indices=None, batch_size: int = 128
                    ) -> torch.Tensor:
    """Latents ``(k, latent)`` of the patterns at ``indices`` (all when None), encoded ``batch_size`` at a time."""
    M, _ = _check_pattern_data(patterns)
    idx = torch.arange(M) if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1)
    parts = [model.encode(_rows(patterns, chunk)) for chunk in idx.split(max(1, int(batch_size)))]
    return torch.cat(parts) if parts else torch.empty(0, model.enc[-1].out_features)


def pattern_latents(patterns: Patterns, epochs: int = 30, latent: int = 64, lr: float = 3e-3,
                    batch_size: int = 32, seed: int = 0) -> Tuple[torch.Tensor, List[float]]:
    """Train :class:`PatternAutoencoder` on ``patterns`` (a tensor ``(M, n, n)`` of 0/1 or a
    :class:`PackedPatterns`) and return ``(latents (M, latent), losses)``."""
    model, losses = train_pattern_autoencoder(patterns, epochs, latent, lr, batch_size, seed)
    return encode_patterns(model, patterns), losses


def context_masks(attn, grid, num_prefix_tokens: int = 1, patch: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Image-context masks (paper 003 Fig. 6D/E) of every head, each ``(..., h, gh, gw)``.

    ``cls_to_patches`` ``A[0, P:]`` and ``patches_to_cls`` ``A[P:, 0]`` (with a CLS token), and for
    ``patch`` ``p``: ``patch_row`` ``A[P + p, P:]`` (what ``p`` attends to) and ``patch_col``
    ``A[P:, P + p]`` (who attends to ``p``).
    """
    from ..masks import check_grid

    gh, gw = check_grid(grid)
    attn, P = check_attention(attn, num_prefix_tokens, grid)
    shape = (*attn.shape[:-2], gh, gw)
    out = {}
    if P >= 1:
        out["cls_to_patches"] = attn[..., 0, P:].reshape(shape)
        out["patches_to_cls"] = attn[..., P:, 0].reshape(shape)
    if patch is not None:
        if isinstance(patch, bool) or not isinstance(patch, numbers.Integral) or not 0 <= patch < gh * gw:
            raise ValueError(f"patch must be a patch index in [0, {gh * gw}), got {patch!r}")
        out["patch_row"] = attn[..., P + patch, P:].reshape(shape)
        out["patch_col"] = attn[..., P:, P + patch].reshape(shape)
    return out


# ------------------------------------------------------------------------------------- t-SNE
def tsne(features, perplexity: Optional[float] = None, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (scikit-learn) of ``features (M, D)``; perplexity ``min(30, (M - 1) / 3)`` unless given."""
    from sklearn.manifold import TSNE

    f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, float)
    if f.ndim != 2 or len(f) < 3:
        raise ValueError(f"features must have shape (M, D) with M >= 3 points, got {f.shape}")
    f = np.nan_to_num(f)
    perp = min(30.0, max(1.0, (len(f) - 1) / 3.0)) if perplexity is None else float(perplexity)
    if not 0 < perp < len(f):
        raise ValueError(f"perplexity must be in (0, {len(f)}), got {perp}")
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(f)
