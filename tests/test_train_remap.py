"""Stored windows that follow the image: vitpatch.train.remap (docs/math.md §4, windows under crop/flip)."""
import math
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from vitpatch import WindowMask
from vitpatch.train.remap import (AnalysisView, WindowFollowingEvalTransform, WindowFollowingTransform, eval_crop,
                                  remap_windows)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def random_windows(rng, grid, dtype=np.int16):
    """AWD-like windows: random boxes, each containing its own patch; and a random keep mask."""
    gh, gw = grid
    ys, xs = np.divmod(np.arange(gh * gw), gw)
    w = np.stack([rng.integers(0, xs + 1), rng.integers(0, ys + 1), rng.integers(xs, gw), rng.integers(ys, gh)], 1)
    return w.astype(dtype), rng.random(gh * gw) < 0.7


def reference(windows, keep, image_size, view, crop, flip, out_size, out_grid):
    """Brute force: a(q') of every output patch by plain float arithmetic, then per p' the set
    of q' with a(q') in the stored window of a(p'), checked to be a rectangle."""
    sy, sx, oy, ox = view.frame(image_size)
    (ah, aw), (gh, gw) = view.input_size, view.grid
    (hm, wm), (ogh, ogw) = out_size, out_grid
    top, left, ch, cw = crop
    a = np.zeros((ogh, ogw, 2), dtype=np.int64)
    for i in range(ogh):
        for j in range(ogw):
            y, x = (i + 0.5) * hm / ogh, (j + 0.5) * wm / ogw
            if flip:
                x = wm - x
            ya, xa = (top + y * ch / hm) * sy - oy, (left + x * cw / wm) * sx - ox
            a[i, j] = (min(max(math.floor(ya / (ah / gh) + 1e-9), 0), gh - 1),
                       min(max(math.floor(xa / (aw / gw) + 1e-9), 0), gw - 1))
    out, kout = [], []
    for i in range(ogh):
        for j in range(ogw):
            src = a[i, j, 0] * gw + a[i, j, 1]
            xl, yt, xr, yb = (int(v) for v in windows[src])
            inside = (a[..., 1] >= xl) & (a[..., 1] <= xr) & (a[..., 0] >= yt) & (a[..., 0] <= yb)
            rows, cols = np.nonzero(inside)
            if len(rows) == 0:
                out.append((j, i, j, i))
            else:
                box = (cols.min(), rows.min(), cols.max(), rows.max())
                assert inside.sum() == (box[2] - box[0] + 1) * (box[3] - box[1] + 1), "not a rectangle"
                out.append(box)
            kout.append(bool(keep[src]))
    return np.array(out, dtype=np.int64), np.array(kout)


def random_view(rng):
    gh, gw = int(rng.integers(2, 15)), int(rng.integers(3, 15))
    if rng.random() < 0.5:
        size = (gh * int(rng.integers(2, 9)), gw * int(rng.integers(2, 9)))
    else:
        size = (int(rng.integers(gh, 120)), int(rng.integers(gw, 120)))
    return AnalysisView(size, (gh, gw), float(rng.choice([0.875, 0.9, 1.0])), str(rng.choice(["center", "squash"])))


def test_remap_matches_brute_force():
    rng = np.random.default_rng(0)
    random.seed(0)
    seen_flip = seen_empty_fallback = 0
    for case in range(200):
        view = random_view(rng)
        image_size = (int(rng.integers(20, 400)), int(rng.integers(20, 400)))
        windows, keep = random_windows(rng, view.grid)
        if case % 10 == 9:  # a few windows without their own patch: the empty-set fallback
            windows = np.concatenate([windows[:, 2:], windows[:, 2:]], 1)[rng.permutation(len(windows))]
        h, w = image_size
        if case % 2:
            crop = RandomResizedCropAndInterpolation.get_params(Image.new("RGB", (w, h)), (0.08, 1.0), (3 / 4, 4 / 3))
        else:
            ch, cw = rng.uniform(1, h), rng.uniform(1, w)
            crop = (rng.uniform(0, h - ch), rng.uniform(0, w - cw), ch, cw)
        flip = bool(rng.random() < 0.5)
        seen_flip += flip
        scale = float(rng.choice([0.5, 1.0, 2.0]))  # coarser, equal and finer output grids
        out_grid = (max(1, int(round(view.grid[0] * scale * rng.uniform(0.8, 1.25)))),
                    max(1, int(round(view.grid[1] * scale * rng.uniform(0.8, 1.25)))))
        out_size = (out_grid[0] * int(rng.integers(1, 17)), out_grid[1] * int(rng.integers(1, 17)))
        if case % 3 == 0:
            out_size = (int(rng.integers(out_grid[0], 200)), int(rng.integers(out_grid[1], 200)))
        got_w, got_k = remap_windows(torch.from_numpy(windows) if case % 4 == 0 else windows, keep,
                                     image_size=image_size, view=view, crop=crop, flip=flip, out_size=out_size,
                                     out_grid=out_grid)
        ref_w, ref_k = reference(windows, keep, image_size, view, crop, flip, out_size, out_grid)
        assert got_w.dtype == torch.int64 and got_k.dtype == torch.bool
        np.testing.assert_array_equal(got_w.numpy(), ref_w, err_msg=f"case {case}")
        np.testing.assert_array_equal(got_k.numpy(), ref_k, err_msg=f"case {case}")
        if case % 10 != 9:  # windows holding their own patch stay so
            n = out_grid[0] * out_grid[1]
            ys, xs = np.divmod(np.arange(n), out_grid[1])
            wo = got_w.numpy()
            assert ((wo[:, 0] <= xs) & (xs <= wo[:, 2]) & (wo[:, 1] <= ys) & (ys <= wo[:, 3])).all()
        else:
            seen_empty_fallback += 1
        WindowMask(got_w[None], out_grid, 1)
    assert seen_flip > 50 and seen_empty_fallback > 10


@pytest.mark.parametrize("view", [AnalysisView((3, 224, 224), (14, 14), 0.875, "center"),
                                  AnalysisView((56, 80), (7, 10), 0.9, "center"),
                                  AnalysisView((60, 45), (4, 3), 1.0, "squash"),
                                  AnalysisView((48, 48), (6, 6), 1.15, "center")])
def test_identity_returns_stored(view):
    rng = np.random.default_rng(1)
    for image_size in [(375, 500), (500, 333), (97, 97), (41, 260)]:
        windows, keep = random_windows(rng, view.grid)
        out_w, out_k = remap_windows(windows, keep, image_size=image_size, view=view,
                                     crop=eval_crop(image_size, view), flip=False, out_size=view.input_size,
                                     out_grid=view.grid, allow_padding=view.crop_pct > 1)
        np.testing.assert_array_equal(out_w.numpy(), windows)
        np.testing.assert_array_equal(out_k.numpy(), keep)


def test_frame_matches_timm_eval_transform():
    """frame(): the resized size and centre-crop offset of timm's own eval transform."""
    from timm.data.transforms_factory import transforms_imagenet_eval

    for image_size, size, pct, mode in [((120, 90), (32, 32), 0.875, "center"), ((77, 130), (40, 24), 0.9, "center"),
                                        ((61, 200), (30, 30), 1.0, "squash"), ((99, 50), (28, 36), 0.875, "squash"),
                                        ((50, 70), (48, 48), 1.15, "center"), ((83, 64), (25, 35), 1.15, "center")]:
        view = AnalysisView(size, (2, 3), pct, mode)
        sy, sx, top, left = view.frame(image_size)
        resize, center = transforms_imagenet_eval(size, crop_pct=pct, crop_mode=mode).transforms[:2]
        resized = resize(Image.new("RGB", image_size[::-1]))
        assert (resized.height, resized.width) == (round(sy * image_size[0]), round(sx * image_size[1]))
        # Encode each pixel's own (x, y) and find where the centre crop (or pad) put them.
        yy, xx = np.mgrid[:resized.height, :resized.width]
        code = np.stack([xx, yy, np.full_like(xx, 255)], -1).astype(np.uint8)
        out = np.asarray(center(Image.fromarray(code)))
        r, c = np.argwhere(out[..., 2] == 255)[0]
        assert (int(out[r, c, 1]) - r, int(out[r, c, 0]) - c) == (top, left)
        t, l_, h, w = eval_crop(image_size, (size, pct, mode))
        assert np.allclose((t * sy, l_ * sx, h * sy, w * sx), (top, left, *size))


def test_clamp_hand_computed():
    # Image 80x80; analysis: Resize(80) (scale 1), CenterCrop 40 at offset 20, grid 2x2 of 20 px.
    view = AnalysisView((40, 40), (2, 2), 0.5, "center")
    assert view.frame((80, 80)) == (1.0, 1.0, 20, 20)
    windows = np.array([[0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]], dtype=np.int16)
    keep = np.array([True, False, True, True])
    kw = dict(image_size=(80, 80), view=view, out_size=(80, 80), out_grid=(4, 4))
    # Output centres 10, 30, 50, 70 -> analysis x = -10, 10, 30, 50 -> cells -1, 0, 1, 2 -> clamped 0, 0, 1, 1.
    A, B, C, D = [0, 0, 1, 1], [0, 0, 3, 1], [0, 2, 1, 3], [0, 0, 3, 3]
    out_w, out_k = remap_windows(windows, keep, crop=(0, 0, 80, 80), flip=False, **kw)
    assert out_w.tolist() == [A, A, B, B] * 2 + [C, C, D, D] * 2
    assert out_k.tolist() == [True, True, False, False] * 2 + [True] * 8
    # Flipped: columns map to cells 1, 1, 0, 0; p' (0, 0) -> analysis patch 1, p' (0, 3) -> patch 0.
    out_w, out_k = remap_windows(windows, keep, crop=(0, 0, 80, 80), flip=True, **kw)
    assert out_w[0].tolist() == [0, 0, 3, 1] and not out_k[0]
    assert out_w[3].tolist() == [2, 0, 3, 1] and out_k[3]
    # Left half only: every column lands in cell 0; a stored window (1, 0, 1, 0) without its own
    # patch then holds no output patch, and each such p' falls back to itself.
    bad = windows.copy()
    bad[0] = (1, 0, 1, 0)
    out_w, _ = remap_windows(bad, keep, crop=(0, 0, 80, 40), flip=False, **kw)
    assert out_w[:2].tolist() == [[0, 0, 0, 0], [1, 0, 1, 0]]
    assert out_w[5].tolist() == [1, 1, 1, 1]


def _image(h=90, w=120, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


VIEW = AnalysisView((3, 56, 56), (7, 7), 0.875, "center")


def _seed(s):
    random.seed(s)
    np.random.seed(s)  # timm's RandAugment draws its ops from numpy
    torch.manual_seed(s)


@pytest.mark.parametrize("hflip,interpolation", [(0.5, "bilinear"), (1.0, "random")])
def test_transform_follows_timm_and_remap(hflip, interpolation):
    from timm.data.transforms_factory import transforms_imagenet_train

    img = _image()
    windows, keep = random_windows(np.random.default_rng(2), VIEW.grid)
    kw = dict(scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip=hflip, interpolation=interpolation, color_jitter=0.3,
              mean=MEAN, std=STD)
    t = WindowFollowingTransform(VIEW, input_size=(48, 64), out_grid=(3, 4), **kw)
    timm_t = transforms_imagenet_train((48, 64), **kw)
    flips = set()
    for s in range(6):
        _seed(s)
        x, w_out, k_out = t(img, windows, keep)
        assert x.shape == (3, 48, 64) and w_out.shape == (12, 4) and k_out.shape == (12,)
        WindowMask(w_out[None], (3, 4), 1)
        _seed(s)
        assert torch.equal(x, timm_t(img))  # same draws, same image as timm's own pipeline
        _seed(s)
        crop, _, flip = t.draw(img)
        flips.add(flip)
        ref_w, ref_k = remap_windows(windows, keep, image_size=(90, 120), view=VIEW, crop=crop, flip=flip,
                                     out_size=(48, 64), out_grid=(3, 4))
        assert torch.equal(w_out, ref_w) and torch.equal(k_out, ref_k)
    assert flips == ({True} if hflip == 1 else {True, False})


def test_eval_transform_and_pickle():
    from timm.data.transforms_factory import transforms_imagenet_eval

    img = _image(70, 101)
    windows, keep = random_windows(np.random.default_rng(3), VIEW.grid)
    ev = WindowFollowingTransform.eval(VIEW, input_size=56, out_grid=VIEW.grid, crop_pct=0.875, crop_mode="center",
                                       mean=MEAN, std=STD)
    assert isinstance(ev, WindowFollowingEvalTransform)
    x, w_out, k_out = pickle.loads(pickle.dumps(ev))(img, windows, keep)
    assert torch.equal(x, transforms_imagenet_eval(56, crop_pct=0.875, mean=MEAN, std=STD)(img))
    np.testing.assert_array_equal(w_out.numpy(), windows)  # the analysis view itself: identity
    np.testing.assert_array_equal(k_out.numpy(), keep)
    t = WindowFollowingTransform(VIEW, input_size=32, out_grid=(2, 2), auto_augment="rand-m9-t3a", re_prob=0.5,
                                 mean=MEAN, std=STD)
    t2 = pickle.loads(pickle.dumps(t))
    for s in range(3):
        _seed(s)
        a = t(img, windows, keep)
        _seed(s)
        b = t2(img, windows, keep)
        assert all(torch.equal(u, v) for u, v in zip(a, b))


class _Items(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform
        self.images = [_image(60 + 7 * i, 90 - 5 * i, seed=i) for i in range(4)]
        self.stored = [random_windows(np.random.default_rng(10 + i), VIEW.grid) for i in range(4)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        _seed(1000 + i)
        return self.transform(self.images[i], *self.stored[i])


def test_dataloader_workers_match():
    t = WindowFollowingTransform(VIEW, input_size=32, out_grid=(4, 4), mean=MEAN, std=STD)
    ds = _Items(t)
    runs = [list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=nw)) for nw in (0, 2)]
    for a, b in zip(*runs):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
        WindowMask(a[1], (4, 4), 1)


def test_bad_input():
    windows, keep = random_windows(np.random.default_rng(4), VIEW.grid)
    kw = dict(image_size=(90, 120), view=VIEW, crop=(0, 0, 90, 120), flip=False, out_size=32, out_grid=(2, 2))
    with pytest.raises(ValueError, match="windows"):
        remap_windows(windows[:, :3], keep, **kw)
    with pytest.raises(ValueError, match="grid"):
        remap_windows(windows[:-1], keep[:-1], **kw)
    with pytest.raises(ValueError, match="windows"):
        remap_windows(windows + 7, keep, **kw)
    with pytest.raises(ValueError, match="keep"):
        remap_windows(windows, keep[:-1], **kw)
    for crop in [(0, 0, 91, 120), (-1, 0, 50, 50), (10, 80, 50, 50), (0, 0, 0, 10)]:
        with pytest.raises(ValueError, match="crop"):
            remap_windows(windows, keep, **{**kw, "crop": crop})
    with pytest.raises(ValueError, match="out_grid"):
        remap_windows(windows, keep, **{**kw, "out_grid": (0, 2)})
    with pytest.raises(ValueError, match="out_size"):
        remap_windows(windows, keep, **{**kw, "out_size": (32, -1)})
    for policy in ["rand-m9-mstd0.5", "original", "augmix-m5-w4-d2"]:
        with pytest.raises(ValueError, match="auto_augment"):
            WindowFollowingTransform(VIEW, input_size=32, out_grid=(2, 2), auto_augment=policy, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="crop_mode"):
        AnalysisView((32, 32), (2, 2), 0.9, "border")
    with pytest.raises(ValueError, match="crop_pct"):
        AnalysisView((32, 32), (2, 2), -1.0, "center")
    with pytest.raises(ValueError, match="grid"):
        AnalysisView.from_meta({"input_size": [3, 32, 32], "crop_pct": 0.9})
    view = AnalysisView.from_meta({"input_size": [3, 32, 48], "grid": [2, 3], "crop_pct": None, "crop_mode": None})
    assert view == AnalysisView((32, 48), (2, 3), 0.875, "center")
