"""vitpatch.analysis.plots: the paper's figures from in-memory data are written as valid PNGs."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from vitpatch import analysis
from vitpatch.analysis import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path, min_side=60):
    from PIL import Image

    assert os.path.getsize(path) > 1000, f"{path} is (nearly) empty"
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side
        # not a blank canvas: several distinct colours
        pixels = np.asarray(im.convert("RGB").resize((64, 64))).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 10


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    grid = (5, 6)
    n = 30
    U = torch.rand(n, n, generator=g, dtype=torch.float64) ** 4
    windows = analysis.adaptive_windows(U, 0.1, grid)
    keep = analysis.indiscriminative_patches(U, 0.2)
    size, tendency = analysis.responsive_field(windows, keep, grid)
    image = torch.rand(3, 80, 96, generator=g)  # (3, H, W), normalised like a model input
    img = plots.display_image(image, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return dict(grid=grid, U=U, windows=windows, keep=keep, size=size, tendency=tendency, img=img)


def test_display_image():
    x = torch.zeros(3, 4, 5)
    img = plots.display_image(x, mean=(0.5, 0.2, 0.1), std=(1, 1, 1))
    assert img.shape == (4, 5, 3) and np.allclose(img[0, 0], [0.5, 0.2, 0.1])
    u8 = plots.display_image(np.full((4, 5, 3), 255, dtype=np.uint8))
    assert np.allclose(u8, 1.0)
    with pytest.raises(ValueError, match="image"):
        plots.display_image(np.zeros((4, 5)))


def test_default_patches():
    assert plots.default_patches((14, 14)) == [7 * 14 + 7, 3 * 14 + 3, 3 * 14 + 10, 10 * 14 + 5]
    assert all(0 <= p < 6 for p in plots.default_patches((2, 3)))


def test_every_figure_is_a_valid_png(data, tmp_path):
    grid, img = data["grid"], data["img"]
    figs = {
        "rows.png": plots.plot_uncertainty_rows(img, data["U"], grid, patches=[0, 14, 29]),
        "matrix.png": plots.plot_uncertainty_matrix(data["U"], data["keep"], img, grid),
        "windows.png": plots.plot_windows(img, data["windows"], grid, keep=data["keep"]),
        "size.png": plots.plot_field_size(img, data["size"], grid),
        "tendency.png": plots.plot_field_tendency(img, data["tendency"], grid, keep=data["keep"]),
    }
    for name, fig in figs.items():
        path = plots.save_figure(fig, tmp_path / "sub" / name, dpi=40)
        check_png(path)


def test_plot_bad_input(data):
    grid, img = data["grid"], data["img"]
    with pytest.raises(ValueError, match="grid"):
        plots.plot_uncertainty_rows(img, data["U"], (4, 4))
    with pytest.raises(ValueError, match="U"):
        plots.plot_uncertainty_rows(img, data["U"][None], grid)
    with pytest.raises(ValueError, match="patches"):
        plots.plot_uncertainty_rows(img, data["U"], grid, patches=[30])
    with pytest.raises(ValueError, match="keep"):
        plots.plot_uncertainty_matrix(data["U"], data["keep"][:5])
    with pytest.raises(ValueError, match="windows"):
        plots.plot_windows(img, data["windows"][None], grid)
    with pytest.raises(ValueError, match="tendency"):
        plots.plot_field_tendency(img, data["tendency"][:, :1], grid)
    with pytest.raises(ValueError, match="size"):
        plots.plot_field_size(img, data["size"][None], grid)
    with pytest.raises(ValueError, match="image"):
        plots.plot_field_size(np.zeros((8, 8)), data["size"], grid)
