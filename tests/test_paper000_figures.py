"""Paper 000's Fig. 2 (inner / outer patch pairs), Fig. 3 (a) (attention rows beside U) and Fig. 6
(the beta sweep of DIP): the functions against hand-computed cases, and every figure from the CLI
(``vitpatch analyze``, ``vitpatch interactions``, ``vitpatch analyze --windows-run``) on the digits ViT.
"""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from vitpatch import analysis, cli
from vitpatch.analysis import paper000_stats as ps
from vitpatch.analysis.interactions import attention_rows
from vitpatch.analysis.plots import paper000 as p000
from vitpatch.analysis.windows import dip_sweep, indiscriminative_patches, num_dropped

MODEL = "vit_digits_patch4_32"  # 8x8 grid of 4x4 patches, CLS token, 4 layers, 4 heads
PNG = b"\x89PNG\r\n\x1a\n"


def _png(path):
    from PIL import Image

    assert os.path.getsize(path) > 1000 and open(path, "rb").read(8) == PNG, path
    with Image.open(path) as im:
        im.verify()


# ----------------------------------------------------------------------------------- Fig. 3 (a)
def test_attention_rows_pick_the_rows_and_match_uncertainty():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 2, 2, 5, 5, generator=g)  # L=3, B=2, h=2, N = 1 + 4
    rows = attention_rows(iter(list(maps)), [2, 0], num_prefix_tokens=1)
    assert rows.shape == (3, 2, 2, 2, 4) and rows.dtype == torch.float32
    # entry [l, b, h, j, i] is A_l[b, h, 1 + p_j, 1 + i]
    assert rows[1, 0, 1, 0, 3] == maps[1, 0, 1, 3, 4].float()
    assert rows[2, 1, 0, 1, 0] == maps[2, 1, 0, 1, 1].float()
    assert torch.equal(rows[:, :, :, 0], maps[:, :, :, 3, 1:].float())
    rows2, U = attention_rows(maps, [2, 0], 1, uncertainty=True)
    assert torch.equal(rows2, rows) and torch.equal(U, analysis.uncertainty(maps, 1))
    with pytest.raises(ValueError, match="patches"):
        attention_rows(maps, [4], 1)
    with pytest.raises(ValueError, match="patches"):
        attention_rows(maps, [], 1)


# ------------------------------------------------------------------------------------- Fig. 6
def _u_with_column_variances():
    """U (5 x 5) whose column p is (0, .., 0, s_p) so that v_p = s_p^2 * 4 / 25: order 3, 1, 4, 0, 2."""
    s = torch.tensor([4.0, 2.0, 5.0, 1.0, 3.0], dtype=torch.float64)
    U = torch.zeros(5, 5, dtype=torch.float64)
    U[4] = s
    return U


def test_dip_sweep_by_hand():
    U = _u_with_column_variances()
    betas = [0.1, 0.2, 0.5, 0.9, 0.0]
    keep = dip_sweep(U, betas)
    assert keep.shape == (5, 5) and keep.dtype == torch.bool
    # round(beta n) with n = 5: 0.5 -> 1 (half up), 1 -> 1, 2.5 -> 3, 4.5 -> 5, 0 -> 0; drop in the order 3, 1, 4, 0, 2
    expected = [{3}, {3}, {3, 1, 4}, {3, 1, 4, 0, 2}, set()]
    for k, want in zip(keep, expected):
        assert set(torch.nonzero(~k).flatten().tolist()) == want
    for k, b in zip(keep, betas):
        assert torch.equal(k, indiscriminative_patches(U, b))


def test_dip_sweep_is_nested_with_round_beta_n_drops():
    g = torch.Generator().manual_seed(3)
    U = torch.rand(3, 49, 49, generator=g, dtype=torch.float64) ** 3
    U[1, :, 5] = U[1, :, 9]  # a tie: the lower index goes first
    betas = [0.05, 0.07, 0.1, 0.15, 0.2, 0.5]
    keep = dip_sweep(U, betas)
    assert keep.shape == (6, 3, 49)
    for k, b in zip(keep, betas):
        assert ((~k).sum(1) == num_dropped(b, 49)).all()
        assert torch.equal(k, indiscriminative_patches(U, b))
    for small, big in zip(keep[:-1], keep[1:]):  # betas ascend: each dropped set contains the previous one
        assert not ((~small) & big).any()
    with pytest.raises(ValueError, match="betas"):
        dip_sweep(U, [0.2, 1.0])
    with pytest.raises(ValueError, match="betas"):
        dip_sweep(U, 0.2)


# ------------------------------------------------------------------------------------- Fig. 2
def _crafted_maps():
    """Two images, two layers, two heads, P = 1, n = 4 patches, with known head-mean scores M.

    Image 0 (inner 0, 1): layer 0 inner pairs 0->1 .4, 1->0 .2 (mean .3), outer 0->2 .1, 0->3 .1,
    1->2 0, 1->3 .2 (mean .1); layer 1 inner .6, .6 (.6), outer all .05 (.05).
    Image 1 (inner 1, 2): layer 0 inner 1->2 .1, 2->1 .3 (.2), outer 1->0 .1, 1->3 .1, 2->0 .3,
    2->3 .3 (.2); layer 1 inner .2, .2 (.2), outer 1->0 0, 1->3 0, 2->0 0, 2->3 .4 (.1).
    Every other entry (diagonal, outer rows, the CLS row and column) is noise that must not count.
    """
    g = torch.Generator().manual_seed(1)
    M = torch.rand(2, 2, 4, 4, generator=g, dtype=torch.float64)  # (L, B, n, n): noise first
    vals = {  # (layer, image): {(query, key): score}
        (0, 0): {(0, 1): .4, (1, 0): .2, (0, 2): .1, (0, 3): .1, (1, 2): .0, (1, 3): .2},
        (1, 0): {(0, 1): .6, (1, 0): .6, (0, 2): .05, (0, 3): .05, (1, 2): .05, (1, 3): .05},
        (0, 1): {(1, 2): .1, (2, 1): .3, (1, 0): .1, (1, 3): .1, (2, 0): .3, (2, 3): .3},
        (1, 1): {(1, 2): .2, (2, 1): .2, (1, 0): .0, (1, 3): .0, (2, 0): .0, (2, 3): .4},
    }
    for (l, b), d in vals.items():
        for (q, k), v in d.items():
            M[l, b, q, k] = v
    E = torch.rand(2, 2, 4, 4, generator=g, dtype=torch.float64) * 0.05
    heads = torch.stack([M + E, M - E], 2)  # (L, B, h, n, n): the mean over heads is M
    maps = torch.rand(2, 2, 2, 5, 5, generator=g, dtype=torch.float64)  # CLS row and column: noise
    maps[..., 1:, 1:] = heads
    inner = torch.tensor([[True, True, False, False], [False, True, True, False]])
    return maps, inner


def test_inner_outer_statistics_by_hand():
    maps, inner = _crafted_maps()
    st = ps.inner_outer_statistics(iter(list(maps)), inner, num_prefix_tokens=1)
    assert st.num_images == 2 and st.num_layers == 2
    assert st.images("inner") == 2 and st.images("outer") == 2
    np.testing.assert_allclose(st.mean("inner"), [0.25, 0.4], atol=1e-12)
    np.testing.assert_allclose(st.std("inner"), [0.05, 0.2], atol=1e-12)
    np.testing.assert_allclose(st.mean("outer"), [0.15, 0.075], atol=1e-12)
    np.testing.assert_allclose(st.std("outer"), [0.05, 0.025], atol=1e-12)
    # pooled over pairs: layer 0 inner {.4, .2, .1, .3}, outer {.1, .1, 0, .2, .1, .1, .3, .3}
    np.testing.assert_allclose(st.pair_mean("inner")[0], 0.25, atol=1e-12)
    np.testing.assert_allclose(st.pair_std("inner")[0], math.sqrt(0.0125), atol=1e-12)
    np.testing.assert_allclose(st.pair_mean("outer")[0], 0.15, atol=1e-12)
    np.testing.assert_allclose(st.pair_std("outer")[0], np.std([.1, .1, 0, .2, .1, .1, .3, .3]), atol=1e-12)
    # std across layers per image: inner (.3, .6) -> .15 and (.2, .2) -> 0; outer (.1, .05) -> .025, (.2, .1) -> .05
    assert st.layer_std("inner") == pytest.approx(0.075, abs=1e-12)
    assert st.layer_std("outer") == pytest.approx(0.0375, abs=1e-12)
    # streamed one image at a time gives the same
    st2 = ps.InnerOuterStats(1)
    for b in range(2):
        st2.update(maps[:, b:b + 1], inner[b:b + 1])
    for kind in ps.KINDS:
        np.testing.assert_allclose(st2.mean(kind), st.mean(kind), atol=1e-15)
        np.testing.assert_allclose(st2.std(kind), st.std(kind), atol=1e-12)
        np.testing.assert_allclose(st2.pair_std(kind), st.pair_std(kind), atol=1e-12)
    summary = st.summary()
    assert summary["inner"]["mean"] == pytest.approx([0.25, 0.4]) and summary["num_layers"] == 2


def test_inner_outer_statistics_against_brute_force_and_missing_kinds():
    g = torch.Generator().manual_seed(2)
    L, B, h, n = 3, 3, 2, 9
    maps = torch.softmax(torch.randn(L, B, h, n + 1, n + 1, generator=g), -1)
    inner = torch.zeros(B, n, dtype=torch.bool)
    inner[0, [0, 4, 5]] = True
    inner[1, 4] = True  # one inner patch: no inner pair
    inner[2] = True  # no outer patch: no outer pair
    st = ps.inner_outer_statistics(maps, inner, 1)
    assert st.images("inner") == 2 and st.images("outer") == 2
    M = maps[..., 1:, 1:].double().mean(2)  # (L, B, n, n)
    per = {"inner": [], "outer": []}
    for b, want_in, want_out in ((0, True, True), (1, False, True), (2, True, False)):
        ins = torch.nonzero(inner[b]).flatten().tolist()
        outs = torch.nonzero(~inner[b]).flatten().tolist()
        if want_in:
            per["inner"].append([np.mean([M[l, b, a, c].item() for a in ins for c in ins if a != c]) for l in range(L)])
        if want_out:
            per["outer"].append([np.mean([M[l, b, a, c].item() for a in ins for c in outs]) for l in range(L)])
    for kind in ps.KINDS:
        v = np.array(per[kind])
        np.testing.assert_allclose(st.mean(kind), v.mean(0), atol=1e-12)
        np.testing.assert_allclose(st.std(kind), v.std(0), atol=1e-10)
        assert st.layer_std(kind) == pytest.approx(v.std(1).mean(), abs=1e-12)
    with pytest.raises(ValueError, match="inner"):
        ps.inner_outer_statistics(maps, inner[:, :5], 1)
    with pytest.raises(ValueError, match="layers"):
        st.update(maps[:2], inner)


def test_objects_and_pair_sampling_by_hand():
    assert torch.nonzero(ps.box_objects((4, 4))).flatten().tolist() == [5, 6, 9, 10]
    assert torch.nonzero(ps.box_objects((2, 4), (0.0, 0.0, 0.5, 1.0))).flatten().tolist() == [0, 1, 4, 5]
    with pytest.raises(ValueError, match="box"):
        ps.box_objects((4, 4), (0.5, 0.2, 0.4, 0.9))
    mask = torch.zeros(4, 4)
    mask[0, :2] = 1  # patch 0 of the 2 x 2 grid: half object
    mask[2:, 2:] = 1  # patch 3: all object
    assert ps.mask_objects(mask, (2, 2)).tolist() == [True, False, False, True]
    assert ps.mask_objects(mask, (2, 2), threshold=0.75).tolist() == [False, False, False, True]
    gen = torch.Generator().manual_seed(0)
    inner = torch.tensor([False, True, True, False, True])
    for _ in range(20):
        a, b, c = ps.sample_pair(inner, gen)
        assert inner[a] and inner[b] and a != b and not inner[c]
    assert ps.sample_pair(torch.tensor([True, False, False]), gen) is None
    assert ps.sample_pair(torch.tensor([True, True]), gen) is None


def test_new_plots_check_their_input(tmp_path):
    img = np.random.default_rng(0).random((32, 32, 3))
    fig = p000.plot_inner_outer([0.1, 0.2], [0.05, 0.04], [0.01, 0.02], [0.01, 0.01], num_images=(3, 4))
    analysis.plots.save_figure(fig, tmp_path / "a.png")
    _png(tmp_path / "a.png")
    with pytest.raises(ValueError, match="outer_mean"):
        p000.plot_inner_outer([0.1, 0.2], [0.05])
    with pytest.raises(ValueError, match="triple"):
        p000.plot_inner_outer([0.1, 0.2], [0.05, 0.1], image=img, grid=(2, 2))
    with pytest.raises(ValueError, match="rows"):
        p000.plot_attention_rows(img, np.zeros((2, 4)), (2, 2), [0])
    with pytest.raises(ValueError, match="patches"):
        p000.plot_attention_rows(img, np.zeros((2, 1, 4)), (2, 2), [0, 1])
    with pytest.raises(ValueError, match="keeps"):
        p000.plot_beta_sweep(img, np.ones((2, 4), bool), [0.1], (2, 2))


# ------------------------------------------------------------------------------ CLI, digits ViT
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits ViT after one epoch of `vitpatch train`, a 12-image ImageFolder of its digits and masks."""
    from PIL import Image

    base = tmp_path_factory.mktemp("p000")
    assert cli.main(["train", "--epochs", "1", "--out", str(base / "run"), "--no-progress", "--no-plots"]) == 0
    src = base / "run" / "digits" / "val"
    data, masks = base / "data", base / "masks"
    for c in ("0", "1", "2"):
        for f in sorted(os.listdir(src / c))[:4]:
            (data / c).mkdir(parents=True, exist_ok=True)
            shutil.copy(src / c / f, data / c / f)
            m = np.zeros((32, 32), np.uint8)
            m[:, :16] = 255  # the left half is "the object": patch columns 0-3 of the 8 x 8 grid
            (masks / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(masks / c / (os.path.splitext(f)[0] + ".png"))
    return {"base": base, "ckpt": str(base / "run" / "last.pth.tar"), "data": data, "masks": masks}


def _model(digits):
    return ["--model", MODEL, "--checkpoint", digits["ckpt"]]


def test_cli_analyze_draws_fig3a_and_fig6(digits, tmp_path, capsys):
    image = str(sorted((digits["data"] / "1").iterdir())[0])
    out = tmp_path / "an"
    assert cli.main(["analyze", image, *_model(digits), "--out", str(out), "--patches", "0", "27", "--dpi", "50"]) == 0
    for name in ("fig3a_attention_rows.png", "fig3_uncertainty_rows.png", "fig4_windows.png",
                 "fig5_indiscriminative.png", "fig6_beta_sweep.png", "fig11_field_tendency.png",
                 "fig12_field_size.png"):
        _png(out / name)
    s = json.loads((out / "summary.json").read_text())
    sweep = s["beta_sweep"]
    # round(beta * 64): 3.2 -> 3, 4.48 -> 4, 6.4 -> 6, 9.6 -> 10, 12.8 -> 13, 32
    assert [e["beta"] for e in sweep] == [0.05, 0.07, 0.1, 0.15, 0.2, 0.5]
    assert [len(e["dropped_patches"]) for e in sweep] == [3, 4, 6, 10, 13, 32]
    for small, big in zip(sweep[:-1], sweep[1:]):
        assert set(small["dropped_patches"]) <= set(big["dropped_patches"])
    assert s["dropped_patches"] == 13 and s["patches"] == [0, 27] and s["grid"] == [8, 8]
    assert "windows_run" not in s
    assert cli.main(["analyze", image, *_model(digits), "--out", str(out), "--betas", "0.1", "1.0"]) == 2
    assert "betas" in capsys.readouterr().err


def test_cli_analyze_from_a_stored_windows_run(digits, tmp_path, capsys):
    run = tmp_path / "win"
    assert cli.main(["windows", *_model(digits), "--data", str(digits["data"]), "--out", str(run), "--beta", "0.3",
                     "--alpha", "0.2", "--no-progress"]) == 0
    windows, keep, files, meta = analysis.read_windows(run)
    i = 5
    image = str(digits["data"] / str(files[i]))
    out = tmp_path / "an"
    assert cli.main(["analyze", image, *_model(digits), "--out", str(out), "--windows-run", str(run),
                     "--betas", "0.1", "0.5", "--dpi", "50"]) == 0
    assert "does not reproduce" not in capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["alpha"] == 0.2 and s["beta"] == 0.3  # the run's, not the defaults
    assert s["windows_run"]["index"] == i and s["windows_run"]["keep_differ"] == 0
    assert s["windows_run"]["windows_differ"] == 0
    assert [e["beta"] for e in s["beta_sweep"]] == [0.1, 0.3, 0.5]  # the run's beta joins the sweep
    stored_drop = set(np.flatnonzero(~np.asarray(keep[i])).tolist())
    assert set(s["beta_sweep"][1]["dropped_patches"]) == stored_drop and len(stored_drop) == round(0.3 * 64)
    assert s["dropped_patches"] == len(stored_drop)
    _png(out / "fig6_beta_sweep.png")
    # another model's weights, or an image the run does not hold: clear errors
    other = tmp_path / "other.pth"
    state = torch.load(digits["ckpt"], map_location="cpu", weights_only=False)
    torch.save(state, other)
    with open(other, "ab") as f:
        f.write(b"0")  # same weights, another file: its sha256 differs from the run's
    assert cli.main(["analyze", image, "--model", MODEL, "--checkpoint", str(other), "--out", str(out),
                     "--windows-run", str(run)]) == 2
    assert "--windows-run" in capsys.readouterr().err
    stray = tmp_path / "stray.png"
    shutil.copy(image, stray)
    assert cli.main(["analyze", str(stray), *_model(digits), "--out", str(out), "--windows-run", str(run)]) == 2
    assert "is not among" in capsys.readouterr().err


def test_cli_interactions_fig2_with_masks_and_box(digits, tmp_path, capsys):
    out = tmp_path / "io"
    assert cli.main(["interactions", str(digits["data"]), *_model(digits), "--out", str(out), "--object-masks",
                     str(digits["masks"]), "--batch-size", "5", "--no-progress", "--dpi", "50"]) == 0
    _png(out / "fig2_inner_outer.png")
    s = json.loads((out / "inner_outer.json").read_text())
    assert s["num_images"] == 12 and s["num_layers"] == 4 and s["grid"] == [8, 8]
    assert s["inner"]["images"] == 12 and s["outer"]["images"] == 12
    assert s["example"]["inner_patches"] == 32  # the left half of the 8 x 8 grid
    ex = s["example"]
    assert ex["A"] % 8 < 4 and ex["B"] % 8 < 4 and ex["C"] % 8 >= 4 and ex["A"] != ex["B"]
    # the same numbers from the library with the left-half mask, image by image
    model, _ = analysis.load_model(MODEL, digits["ckpt"])
    transform, _ = analysis.eval_transform(model)
    from PIL import Image

    files = sorted(str(p) for p in digits["data"].rglob("*.png"))
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    inner = (torch.arange(64) % 8 < 4)
    st = ps.inner_outer_statistics(analysis.attention_maps(model, x), inner, 1)
    np.testing.assert_allclose(s["inner"]["mean"], st.mean("inner"), rtol=1e-6)
    np.testing.assert_allclose(s["outer"]["std"], st.std("outer"), rtol=1e-5, atol=1e-12)
    rows = attention_rows(analysis.attention_maps(model, x[files.index(ex["image"])][None]), [ex["A"]], 1)
    np.testing.assert_allclose(ex["score_A_B"], rows[:, 0, :, 0, ex["B"]].double().mean(1), rtol=1e-6)
    # the default box: the central 4 x 4 patches
    out2 = tmp_path / "box"
    assert cli.main(["interactions", str(digits["data"] / "0"), *_model(digits), "--out", str(out2),
                     "--no-progress", "--max-images", "2", "--dpi", "50"]) == 0
    s2 = json.loads((out2 / "inner_outer.json").read_text())
    assert s2["num_images"] == 2 and s2["object"]["inner_patches"] == 16 and s2["example"]["inner_patches"] == 16
    _png(out2 / "fig2_inner_outer.png")
    # a missing mask fails before any forward
    os.remove(next((digits["masks"] / "2").iterdir()))
    assert cli.main(["interactions", str(digits["data"]), *_model(digits), "--out", str(out), "--object-masks",
                     str(digits["masks"]), "--no-progress"]) == 2
    assert "object mask" in capsys.readouterr().err
