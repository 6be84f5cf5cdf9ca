"""``WindowMask``: per-image rectangular attention windows on a patch grid (docs/math.md §1).

A window is four inclusive grid coordinates ``(x_left, y_top, x_right, y_bottom)``; patch ``p``
(0-based among the patch tokens, row-major) sits at column ``p % gw`` and row ``p // gw``.
Query ``i`` may attend to key ``j`` iff ``key_keep[b, j]`` and one of: ``i`` is a prefix token,
``j`` is a prefix token, or patch ``j - P`` lies inside the window of patch ``i - P``
(AWD-ViT, paper 000 §4.1, eq. 4). The mask is stored as ``O(n)`` windows per image; the dense
``N x N`` form exists only on request (:meth:`WindowMask.dense`, for references and plots).
An optional ``token_keep`` rides along for DIP by token zeroing (paper 000 §4.2); the attention
ops ignore it, :func:`vitpatch.nn.zero_dropped_tokens` applies it.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["WindowMask", "effective_operations", "check_grid", "synthetic_awd_windows"]

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_grid(grid, name: str = "grid") -> Tuple[int, int]:
    """Validate a patch grid ``(gh, gw)`` of two positive integers and return it as a tuple."""
    if isinstance(grid, torch.Tensor):
        grid = grid.tolist()
    if not isinstance(grid, (tuple, list, torch.Size)) or len(grid) != 2:
        raise ValueError(f"{name} must be a pair (gh, gw) of positive integers, got {grid!r}")
    out = []
    for g in grid:
        if isinstance(g, bool) or not isinstance(g, numbers.Integral) or int(g) <= 0:
            raise ValueError(f"{name} must be a pair (gh, gw) of positive integers, got {tuple(grid)!r}")
        out.append(int(g))
    return out[0], out[1]


def _as_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, list, tuple)):
        return torch.as_tensor(np.asarray(value))
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")


def _window_counts(windows: torch.Tensor, grid: Tuple[int, int], keep: Optional[torch.Tensor]) -> torch.Tensor:
    """Number of (kept) patches inside each window: ``(B, n)`` int64, ``O(n)`` per image.

    ``windows``: ``(B, n, 4)``; ``keep``: ``None`` or bool ``(B, n)``. With ``keep`` the count is read
    off a summed-area table of the keep grid, so it costs four lookups per window.
    """
    gh, gw = grid
    w = windows.long()
    xl, yt, xr, yb = w.unbind(-1)
    if keep is None:
        return (xr - xl + 1) * (yb - yt + 1)
    B = keep.shape[0]
    sat = torch.zeros(B, gh + 1, gw + 1, dtype=torch.long, device=keep.device)
    sat[:, 1:, 1:] = keep.reshape(B, gh, gw).long().cumsum(1).cumsum(2)
    flat = sat.reshape(B, -1)
    stride = gw + 1

    def at(y, x):
        return flat.gather(1, (y * stride + x).expand(B, -1))

    return at(yb + 1, xr + 1) - at(yt, xr + 1) - at(yb + 1, xl) + at(yt, xl)


def effective_operations(windows, grid, keep=None) -> float:
    """Effective operations of window attention (paper 000 eq. 5, docs/math.md §1), averaged over images.

    ``EO = sum_p |{patch keys j inside window_p with keep[j]}|`` over the patch queries ``p``.
    Full windows give ``n ** 2`` (38,416 for ViT-B/16 at 224). ``windows``: ``(n, 4)`` or
    ``(B, n, 4)``; ``keep``: optional bool ``(n,)`` or ``(B, n)`` over the patches (False = dropped).
    """
    mask = WindowMask(windows, grid)
    w = mask.windows if mask.windows.dim() == 3 else mask.windows.unsqueeze(0)
    if keep is not None:
        keep = _as_tensor(keep, "keep")
        if keep.dtype != torch.bool:
            raise TypeError(f"keep must be a bool tensor, got dtype {keep.dtype}")
        if keep.dim() == 1:
            keep = keep.unsqueeze(0)
        if keep.dim() != 2 or keep.shape[1] != mask.num_patches:
            raise ValueError(f"keep must have shape (B, {mask.num_patches}) or ({mask.num_patches},), "
                             f"got {tuple(keep.shape)}")
        keep = keep.to(w.device)
        if w.shape[0] == 1:
            w = w.expand(keep.shape[0], -1, -1)
        elif keep.shape[0] == 1:
            keep = keep.expand(w.shape[0], -1)
        elif keep.shape[0] != w.shape[0]:
            raise ValueError(f"keep has batch {keep.shape[0]} but windows have batch {w.shape[0]}")
    return float(_window_counts(w, mask.grid, keep).sum(1).double().mean())


class WindowMask:
    """Rectangular attention windows per image, plus prefix tokens and dropped keys (docs/math.md §1).

    Args:
        windows: integer tensor (or array) ``(n, 4)`` shared by the batch, or ``(B, n, 4)`` per
            image, rows ``(x_left, y_top, x_right, y_bottom)``, inclusive, inside the grid.
        grid: the patch grid ``(gh, gw)``; ``n`` must equal ``gh * gw``.
        num_prefix_tokens: number of prefix tokens ``P`` (CLS, registers) before the patches;
            they attend to and are attended by every token.
        key_keep: optional bool ``(B, N)`` with ``N = P + n``; ``False`` removes that key from
            every query's attention (dropped indiscriminative patches, paper 000 §4.2).
        token_keep: optional bool ``(B, N)``; ``False`` marks a token that
            :func:`vitpatch.nn.zero_dropped_tokens` multiplies by 0 before every block (DIP by
            token zeroing, paper 000 §4.2). The prefix tokens must be ``True`` (``ValueError``
            otherwise: DIP drops patches only). It never changes what the attention ops compute
            (they ignore it) and is independent of ``key_keep``: set either or both.

    Validation happens once, here. Pass the mask as ``attn_mask`` to a model built with
    :class:`vitpatch.nn.WindowAttention` and every block applies it; the copy moved to the
    model's device is cached, so twelve blocks cost one transfer.
    """

    def __init__(self, windows, grid, num_prefix_tokens: int = 0, key_keep=None, token_keep=None):
        self.grid = check_grid(grid)
        gh, gw = self.grid
        windows = _as_tensor(windows, "windows")
        if windows.dtype not in _INT_DTYPES:
            raise TypeError(f"windows must be an integer tensor (x_left, y_top, x_right, y_bottom), "
                            f"got dtype {windows.dtype}")
        if windows.dim() not in (2, 3) or windows.shape[-1] != 4:
            raise ValueError(f"windows must have shape (n, 4) or (B, n, 4), got {tuple(windows.shape)}")
        n = windows.shape[-2]
        if n != gh * gw:
            raise ValueError(f"windows has {n} windows but grid {self.grid} has gh * gw = {gh * gw} patches")
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, numbers.Integral) \
                or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be a non-negative integer, got {num_prefix_tokens!r}")
        w = windows.to(torch.int64)
        xl, yt, xr, yb = w.unbind(-1)
        if n:
            if bool((xl < 0).any()) or bool((xr >= gw).any()) or bool((yt < 0).any()) or bool((yb >= gh).any()):
                raise ValueError(f"windows must lie inside the grid {self.grid}: 0 <= x < {gw}, 0 <= y < {gh}; "
                                 f"got x in [{int(xl.min())}, {int(xr.max())}], y in [{int(yt.min())}, {int(yb.max())}]")
            if bool((xl > xr).any()):
                raise ValueError("windows must have x_left <= x_right for every window")
            if bool((yt > yb).any()):
                raise ValueError("windows must have y_top <= y_bottom for every window")
        self.windows = windows.to(torch.int32).contiguous()
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.num_patches = n
        self.seq_len = self.num_prefix_tokens + n
        wb = self.windows.shape[0] if self.windows.dim() == 3 else None
        key_keep = self._check_keep(key_keep, "key_keep", wb)
        if key_keep is not None and wb is None:
            wb = key_keep.shape[0]
        token_keep = self._check_keep(token_keep, "token_keep", wb)
        if token_keep is not None:
            P = self.num_prefix_tokens
            if P and not bool(token_keep[:, :P].all()):
                raise ValueError(f"token_keep must be True for the {P} prefix token(s): DIP zeroes patches only")
            if wb is None:
                wb = token_keep.shape[0]
        self.key_keep = key_keep
        self.token_keep = token_keep
        self.batch_size: Optional[int] = wb
        self._device_cache = {}
        self._memo = {}

    def _check_keep(self, keep, name: str, batch: Optional[int]) -> Optional[torch.Tensor]:
        """Validate a ``(B, N)`` bool keep vector (``key_keep`` or ``token_keep``) against the layout."""
        if keep is None:
            return None
        keep = _as_tensor(keep, name)
        if keep.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got dtype {keep.dtype}")
        if keep.dim() != 2 or keep.shape[1] != self.seq_len:
            raise ValueError(f"{name} must have shape (B, N) with N = num_prefix_tokens + gh * gw "
                             f"= {self.seq_len}, got {tuple(keep.shape)}")
        if batch is not None and keep.shape[0] != batch:
            what = "windows have" if self.windows.dim() == 3 else "key_keep has"
            raise ValueError(f"{name} has batch {keep.shape[0]} but {what} batch {batch}")
        return keep.to(self.windows.device).contiguous()

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def _trusted(cls, windows, grid, num_prefix_tokens, key_keep, batch_size, token_keep=None) -> "WindowMask":
        self = cls.__new__(cls)
        self.windows, self.grid, self.num_prefix_tokens, self.key_keep = windows, grid, num_prefix_tokens, key_keep
        self.token_keep = token_keep
        self.num_patches = grid[0] * grid[1]
        self.seq_len = num_prefix_tokens + self.num_patches
        self.batch_size = batch_size
        self._device_cache = {}
        self._memo = {}
        return self

    @classmethod
    def full(cls, grid, num_prefix_tokens: int = 0, key_keep=None, device=None, token_keep=None) -> "WindowMask":
        """Every window is the whole grid: without ``key_keep`` this is plain dense attention."""
        return cls.square(grid, max(check_grid(grid)), num_prefix_tokens, key_keep, device, token_keep)

    @classmethod
    def square(cls, grid, radius: int, num_prefix_tokens: int = 0, key_keep=None, device=None,
               token_keep=None) -> "WindowMask":
        """Shared windows ``[x - radius, x + radius] x [y - radius, y + radius]`` clipped to the grid."""
        gh, gw = check_grid(grid)
        if isinstance(radius, bool) or not isinstance(radius, numbers.Integral) or radius < 0:
            raise ValueError(f"radius must be a non-negative integer, got {radius!r}")
        p = torch.arange(gh * gw, device=device)
        x, y = p % gw, p // gw
        w = torch.stack([(x - radius).clamp(min=0), (y - radius).clamp(min=0),
                         (x + radius).clamp(max=gw - 1), (y + radius).clamp(max=gh - 1)], -1)
        return cls(w, (gh, gw), num_prefix_tokens, key_keep, token_keep)

    # ----------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.windows.device

    @property
    def per_image(self) -> bool:
        """Whether the windows differ per image (``(B, n, 4)``) rather than being shared."""
        return self.windows.dim() == 3

    def __repr__(self) -> str:
        kind = f"per-image x{self.windows.shape[0]}" if self.per_image else "shared"
        keep = "" if self.key_keep is None else f", key_keep={tuple(self.key_keep.shape)}"
        if self.token_keep is not None:
            keep += f", token_keep={tuple(self.token_keep.shape)}"
        return (f"WindowMask(grid={self.grid}, num_prefix_tokens={self.num_prefix_tokens}, "
                f"windows={kind}{keep}, device={self.device})")

    def to(self, device) -> "WindowMask":
        """This mask on ``device`` (cached: moving it again costs nothing)."""
        if device == self.windows.device:  # the common call: already there
            return self
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.device == device:
            return self
        key = str(device)
        if key not in self._device_cache:
            kk = None if self.key_keep is None else self.key_keep.to(device, non_blocking=True)
            tk = None if self.token_keep is None else self.token_keep.to(device, non_blocking=True)
            self._device_cache[key] = WindowMask._trusted(
                self.windows.to(device, non_blocking=True), self.grid, self.num_prefix_tokens, kk, self.batch_size,
                tk)
        return self._device_cache[key]

    def memo(self, key, build, *args):
        """``build(*args)``, computed once per ``key`` for this mask (e.g. a chunk plan shared by every
        block of a ViT); recomputed if the windows or ``key_keep`` tensors were modified in place."""
        version = (self.windows._version, None if self.key_keep is None else self.key_keep._version)
        hit = self._memo.get(key)
        if hit is None or hit[0] != version:
            hit = self._memo[key] = (version, build(*args))
        return hit[1]

    def check(self, batch_size: int, seq_len: int, name: str = "windows") -> None:
        """Raise ``ValueError`` unless this mask fits inputs of ``batch_size`` images of ``seq_len`` tokens."""
        if seq_len != self.seq_len:
            raise ValueError(f"{name}: sequence length N = {seq_len} but num_prefix_tokens + gh * gw = "
                             f"{self.num_prefix_tokens} + {self.grid[0]} * {self.grid[1]} = {self.seq_len}")
        if self.batch_size is not None and self.batch_size != batch_size:
            raise ValueError(f"{name}: the mask is for a batch of {self.batch_size} images but the input has "
                             f"batch {batch_size}")

    def batch_windows(self, batch_size: Optional[int] = None) -> torch.Tensor:
        """Windows as ``(B, n, 4)`` int32 (a stride-0 view when shared)."""
        B = self._batch(batch_size)
        return self.windows.expand(B, -1, -1) if not self.per_image else self.windows

    def _batch(self, batch_size: Optional[int]) -> int:
        if batch_size is None:
            return self.batch_size or 1
        if self.batch_size is not None and batch_size != self.batch_size:
            raise ValueError(f"batch_size {batch_size} does not match the mask's batch {self.batch_size}")
        return batch_size

    # ----------------------------------------------------------------------------- dense views
    def rows(self, start: int, end: int, batch_size: Optional[int] = None,
             keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows ``start:end`` of the allowed mask: bool ``(B, end - start, K)``.

        ``keys``: optional int64 key indices (``K`` of them); all ``N`` keys by default. Costs
        ``O(B (end - start) K)``: the chunked PyTorch path builds one chunk's rows at a time.
        """
        B = self._batch(batch_size)
        P, gw = self.num_prefix_tokens, self.grid[1]
        dev = self.device
        qi = torch.arange(start, end, device=dev)
        kj = torch.arange(self.seq_len, device=dev) if keys is None else keys.to(dev)
        w = self.batch_windows(B)[:, (qi - P).clamp(min=0)].long()  # (B, Q, 4)
        kp = (kj - P).clamp(min=0)
        kx, ky = kp % gw, kp // gw
        inside = ((kx >= w[..., 0:1]) & (kx <= w[..., 2:3]) & (ky >= w[..., 1:2]) & (ky <= w[..., 3:4]))
        inside = inside | (qi < P)[None, :, None] | (kj < P)[None, None, :]
        if self.key_keep is not None:
            inside = inside & self.key_keep[:, kj][:, None, :]
        return inside

    def dense(self, batch_size: Optional[int] = None) -> torch.Tensor:
        """The full allowed mask, bool ``(B, N, N)`` (``True`` = may attend). For references and plots."""
        return self.rows(0, self.seq_len, batch_size)

    # ----------------------------------------------------------------------------- statistics
    def allowed_counts(self, batch_size: Optional[int] = None) -> torch.Tensor:
        """Allowed keys per query, int64 ``(B, N)``, in ``O(N)`` per image (no dense mask)."""
        B = self._batch(batch_size)
        P = self.num_prefix_tokens
        keep = self.key_keep
        patch_keep = None if keep is None else keep[:, P:]
        counts = _window_counts(self.batch_windows(B), self.grid, patch_keep)  # (B, n)
        if counts.shape[0] != B:
            counts = counts.expand(B, -1)
        kept_all = torch.full((B,), self.seq_len, device=self.device) if keep is None else keep.sum(1)
        kept_prefix = torch.full((B,), P, device=self.device) if keep is None else keep[:, :P].sum(1)
        return torch.cat([kept_all[:, None].expand(B, P), counts + kept_prefix[:, None]], 1)

    def density(self, batch_size: Optional[int] = None) -> float:
        """Fraction of the ``N x N`` query-key pairs that are allowed, averaged over images."""
        return float(self.allowed_counts(batch_size).sum(1).double().mean()) / self.seq_len ** 2

    def effective_operations(self) -> float:
        """Effective operations (paper 000 eq. 5, docs/math.md §1): patch-to-patch pairs, averaged over images."""
        keep = None if self.key_keep is None else self.key_keep[:, self.num_prefix_tokens:]
        return effective_operations(self.windows, self.grid, keep)


def synthetic_awd_windows(grid, batch_size: int = 1, density: float = 0.23, seed: int = 0) -> torch.Tensor:
    """Random windows shaped like AWD's, for benchmarks and tests: ``(B, n, 4)`` int64.

    AWD windows (paper 000 eq. 4) are bounding boxes of each patch and its high-``U`` partners:
    many patches keep small windows near themselves, some reach far (towards a few "hot",
    informative patches of the image). This draws, per patch, a geometric number of partners,
    each either near the patch (Gaussian offset) or one of the image's hot patches, and takes
    the bounding box; a scale on the partner count and spread is bisected so that the mean
    patch-to-patch density ``EO / n^2`` is ``density`` (the paper's best, alpha = 0.1, is about
    0.23). Not a substitute for windows from :mod:`vitpatch.analysis` on a trained model.
    """
    gh, gw = check_grid(grid)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    n = gh * gw
    rng = np.random.default_rng(seed)
    px, py = np.arange(n) % gw, np.arange(n) // gw
    hot = rng.integers(0, n, size=(batch_size, max(1, n // 40)))
    base_count = rng.geometric(0.5, size=(batch_size, n, 1))
    u = rng.random((batch_size, n, 64))
    pick = rng.integers(0, hot.shape[1], size=(batch_size, n, 64))
    gauss = rng.standard_normal((batch_size, n, 64, 2))

    def draw(scale: float) -> np.ndarray:
        count = np.minimum(np.ceil(base_count * scale), 64)
        use = np.arange(64)[None, None, :] < count
        far = u < 0.25
        hp = np.take_along_axis(hot[:, None, :].repeat(n, 1), pick, 2)
        sigma = max(gh, gw) * 0.08 * (1 + scale)
        qx = np.where(far, hp % gw, np.clip(np.rint(px[None, :, None] + gauss[..., 0] * sigma), 0, gw - 1))
        qy = np.where(far, hp // gw, np.clip(np.rint(py[None, :, None] + gauss[..., 1] * sigma), 0, gh - 1))
        qx = np.where(use, qx, px[None, :, None])
        qy = np.where(use, qy, py[None, :, None])
        return np.stack([np.minimum(qx.min(2), px), np.minimum(qy.min(2), py),
                         np.maximum(qx.max(2), px), np.maximum(qy.max(2), py)], -1).astype(np.int64)

    def dens(w: np.ndarray) -> float:
        return float(((w[..., 2] - w[..., 0] + 1) * (w[..., 3] - w[..., 1] + 1)).sum(1).mean()) / n ** 2

    lo, hi = 0.0, 64.0
    if dens(draw(hi)) < density:
        return torch.from_numpy(draw(hi))
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if dens(draw(mid)) < density else (lo, mid)
    return torch.from_numpy(draw(hi))
