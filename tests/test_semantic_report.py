"""Paper 002 at dataset scale (docs/math.md §8): streamed mask as prompt, true labels, the report of
``vitpatch semantic`` and its new figures (Fig. 7b, Fig. 8's masked images), ``--score-layers``."""
from __future__ import annotations

import gc
import json
import math
import weakref

import numpy as np
import pytest
import torch

from vitpatch import analysis, cli
from vitpatch.analysis import semantic
from vitpatch.analysis.plots import paper002

from _helpers import write_square_images

cv2 = pytest.importorskip("cv2", reason='SIFT needs the "semantic" extra (in the "test" extra too)')

MODEL = "test_vit"  # timm's small CI ViT (embed 64, depth 6, 2 heads)


@pytest.fixture(scope="module")
def tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3, num_classes=4).eval()


def _constant(model, cls: int = 0):
    """The same model whose head always predicts ``cls``: zero weights, a one-hot bias."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.zero_()
        m.head.bias[cls] = 1.0
    return m


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 64, generator=g)


# ------------------------------------------------------------------------------ layers and stages
def test_check_layers_and_stages():
    assert semantic.check_layers(None, 6) is None
    assert semantic.check_layers([5, -1, 0, -6], 6) == [0, 5]
    assert semantic.check_layers([3, 1, 3]) == [1, 3]
    for bad in ([6], [-7]):
        with pytest.raises(ValueError, match=r"score_layers must be layer indices in \[-6, 6\)"):
            semantic.check_layers(bad, 6, "score_layers")
    with pytest.raises(ValueError, match="at least one layer"):
        semantic.check_layers([], 6)
    with pytest.raises(ValueError, match="integer"):
        semantic.check_layers([1.5], 6)
    with pytest.raises(ValueError, match="sequence"):
        semantic.check_layers(3, 6)
    # three equal stages: ViT-L/16's 24 layers -> [8, 16]; 6 -> [2, 4]; 2 layers -> two stages; 1 -> one
    assert semantic.default_stages(24) == [8, 16]
    assert semantic.default_stages(12) == [4, 8]
    assert semantic.default_stages(6) == [2, 4]
    assert semantic.default_stages(2) == [1] and semantic.default_stages(1) == []
    assert semantic.stage_layers([8, 16], 24) == [3, 11, 19]
    assert semantic.stage_layers([2, 4], 6) == [0, 2, 4]
    assert semantic.stage_layers([], 5) == [2]
    assert semantic.check_stages([4, 2], 6) == [2, 4]
    with pytest.raises(ValueError, match=r"stages must be layer indices in \(0, 6\)"):
        semantic.check_stages([0, 3], 6)
    with pytest.raises(ValueError, match="num_layers"):
        semantic.default_stages(0)


def test_score_layers_choose_the_patch_score(tiny_vit):
    x = _images(2)
    counts = torch.randint(0, 3, (2, 16), generator=torch.Generator().manual_seed(1))
    maps = list(analysis.attention_maps(tiny_vit, x))
    theta = [analysis.interrelation(A, counts, 1).mean(-2) for A in maps]  # (B, n) per layer, no NaN at gamma 1
    last = analysis.layer_semantics(iter(maps), counts, 1, score_layers=[-1]).theta_mean
    torch.testing.assert_close(last, theta[2])
    torch.testing.assert_close(analysis.layer_semantics(iter(maps), counts, 1, score_layers=[2]).theta_mean, last)
    both = analysis.patch_scores(tiny_vit, x, counts, layers=[0, -1])
    torch.testing.assert_close(both, (theta[0] + theta[2]) / 2)
    with pytest.raises(ValueError, match="score_layers must be layer indices"):
        analysis.layer_semantics(iter(maps), counts, 1, score_layers=[3])


# ------------------------------------------------------------------------------ streamed mask as prompt
def _all_in_memory(model, x, y, counts, ratios, modes):
    """The former computation: every batch concatenated, scored in one go."""
    score = analysis.patch_scores(model, x, counts)
    labels = model(x).argmax(-1) if y is None else y
    out = {}
    for m in modes:
        r = {"top": [], "bottom": []}
        for ratio in ratios:
            for which in ("top", "bottom"):
                pred = semantic._masked_logits(model, x, analysis.mask_patches(score, ratio, which), m).argmax(-1)
                r[which].append(float((pred == labels).double().mean()))
        out[m] = {**r, "unmasked": float((model(x).argmax(-1) == labels).double().mean())}
    return out


def test_streamed_mask_prompt_equals_all_in_memory(tiny_vit):
    x = _images(5, seed=2)
    y = torch.tensor([0, 1, 2, 3, 1])
    counts = torch.randint(0, 3, (5, 16), generator=torch.Generator().manual_seed(3))
    ratios, modes = (0.1, 0.25, 0.5), ("pixel", "drop_tokens")
    for labels in (y, None):
        ref = _all_in_memory(tiny_vit, x, labels, counts, ratios, modes)
        stream = ((x[i:i + 2], None if labels is None else labels[i:i + 2], counts[i:i + 2]) for i in range(0, 5, 2))
        got = analysis.mask_prompt_accuracy(tiny_vit, stream, ratios=ratios, modes=modes)
        for m in modes:
            assert got[m]["images"] == 5 and got[m]["ratios"] == list(ratios)
            assert got[m]["labels"] == ("true" if labels is not None else "unmasked prediction")
            for k in ("top", "bottom"):
                assert got[m][k] == pytest.approx(ref[m][k], abs=1e-12)
            assert got[m]["unmasked"] == pytest.approx(ref[m]["unmasked"], abs=1e-12)
    assert got["pixel"]["unmasked"] == 1.0  # the last run scored against the unmasked prediction


def test_mask_prompt_counters_with_a_constant_model(tiny_vit):
    # a model that always says class 0: every accuracy, masked or not, is the share of label 0
    const = _constant(tiny_vit, 0)
    acc = semantic.MaskPromptAccuracy(ratios=(0.0, 0.25, 0.5), modes=("pixel", "drop_tokens"))
    x = _images(5, seed=4)
    score = torch.rand(5, 16, generator=torch.Generator().manual_seed(5))
    acc.update(const, x[:3], score[:3], torch.tensor([0, 0, 1]))
    acc.update(const, x[3:], score[3:], torch.tensor([2, 0]))
    assert acc.total == 5 and acc.unmasked == 3
    assert acc.correct["pixel"]["top"] == [3, 3, 3] and acc.correct["drop_tokens"]["bottom"] == [3, 3, 3]
    res = acc.result()
    assert res["pixel"]["top"] == [0.6] * 3 and res["drop_tokens"]["unmasked"] == 0.6
    assert res["pixel"]["labels"] == "true"
    acc.update(const, x[:1], score[:1], None)  # one batch against the prediction: label sources mix
    assert acc.result()["pixel"]["labels"] == "mixed" and acc.unmasked == 4
    with pytest.raises(ValueError, match="labels must be"):
        acc.update(const, x[:2], score[:2], torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="scores must have shape"):
        acc.update(const, x[:2], score[:3])
    with pytest.raises(ValueError, match="ratios"):
        semantic.MaskPromptAccuracy(ratios=(0.1, 1.5))
    with pytest.raises(ValueError, match="modes"):
        semantic.MaskPromptAccuracy(modes="pixel")
    with pytest.raises(ValueError, match="no images"):
        semantic.MaskPromptAccuracy().result()


def test_batches_are_not_kept(tiny_vit):
    """Peak memory independent of the number of images: a batch is dropped once the next one is read."""
    refs = []

    def gen(with_names):
        for i in range(4):
            if i >= 2:
                gc.collect()
                assert refs[i - 2]() is None, f"batch {i - 2} is still held while batch {i} is read"
            x = _images(2, seed=10 + i)
            refs.append(weakref.ref(x))
            yield ([f"im{i}a", f"im{i}b"], x, None) if with_names else (x, None)

    analysis.mask_prompt_accuracy(tiny_vit, gen(False), ratios=(0.25,), modes=("pixel",))
    refs.clear()
    summary, figs = semantic.semantic_report(tiny_vit, gen(True), mask_prompt=True, ratios=(0.25,),
                                             modes=("pixel",), figures=False)
    assert summary["images"] == 8 and figs == {}


# --------------------------------------------------------------------------------------- the report
def test_report_streams_the_same_numbers(tiny_vit, tmp_path):
    x = _images(5, seed=6)
    names = [f"img{i}" for i in range(5)]
    batches = [(names[:2], x[:2]), (names[2:], x[2:])]
    summary, figs = semantic.semantic_report(tiny_vit, iter(batches), out=tmp_path, figures=False)
    # the former all-in-memory computation: layer_semantics of every image, nanmean over images
    cfg = tiny_vit.pretrained_cfg
    counts = analysis.keypoint_counts(analysis.to_uint8(x, cfg["mean"], cfg["std"]), 16)
    res = analysis.layer_semantics(analysis.attention_maps(tiny_vit, x), counts, 1)
    for k in ("KK", "NK", "AFI"):
        v = getattr(res, k).numpy()  # (5, L, h)
        got = np.array(summary["per_layer_head"][k], dtype=np.float64)
        np.testing.assert_allclose(got, np.nanmean(v, 0), rtol=1e-5)
        np.testing.assert_allclose(np.array(summary["per_layer_head_std"][k], dtype=np.float64), np.nanstd(v, 0),
                                   rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(summary["per_layer"][k], np.nanmean(np.nanmean(v, 0), 1), rtol=1e-5)
    assert summary["images"] == 5 and summary["layers"] == 3 and summary["heads"] == 3
    assert summary["stages"] == [1, 2] and summary["stage_layers"] == [0, 1, 2]
    assert summary["keypoints_per_image"] == pytest.approx(float(counts.sum()) / 5)
    assert summary["afi_direction"].startswith("higher = broader") and "mask_prompt" not in summary
    json.dumps(summary, allow_nan=False)  # JSON-ready: NaN written as null
    rows = [json.loads(line) for line in (tmp_path / semantic.PER_IMAGE_FILE).read_text().splitlines()]
    assert [r["image"] for r in rows] == names and all(r["label"] is None for r in rows)
    assert [r["keypoints"] for r in rows] == counts.sum(1).tolist()
    assert rows[3]["counts"] == counts[3].tolist()
    np.testing.assert_allclose(np.array(rows[4]["AFI"]), res.AFI[4].numpy(), rtol=1e-5)


def test_report_true_labels_change_the_accuracy(tiny_vit):
    const = _constant(tiny_vit, 2)
    x = _images(4, seed=7)
    y = torch.tensor([2, 0, 2, 2])  # three of four are the constant prediction
    kw = dict(mask_prompt=True, ratios=(0.05, 0.5), modes=("pixel", "drop_tokens"), figures=False)
    true, _ = semantic.semantic_report(const, [(None, x[:3], y[:3]), (None, x[3:], y[3:])], **kw)
    pred, _ = semantic.semantic_report(const, [(None, x[:3], None), (None, x[3:], None)], **kw)
    for m in ("pixel", "drop_tokens"):
        assert true["mask_prompt"][m]["unmasked"] == 0.75 and true["mask_prompt"][m]["top"] == [0.75, 0.75]
        assert pred["mask_prompt"][m]["unmasked"] == 1.0 and pred["mask_prompt"][m]["bottom"] == [1.0, 1.0]
    assert true["mask_prompt_labels"] == "true" and pred["mask_prompt_labels"] == "unmasked prediction"


def test_report_bad_input(tiny_vit):
    x = _images(2)
    with pytest.raises(ValueError, match="score_layers"):
        semantic.semantic_report(tiny_vit, [(None, x)], score_layers=[3], figures=False)
    with pytest.raises(ValueError, match="stages"):
        semantic.semantic_report(tiny_vit, [(None, x)], stages=[3], figures=False)
    with pytest.raises(ValueError, match="gamma"):
        semantic.semantic_report(tiny_vit, [(None, x)], gamma=0, figures=False)
    with pytest.raises(ValueError, match="no images"):
        semantic.semantic_report(tiny_vit, iter([]), figures=False)
    with pytest.raises(ValueError, match="names"):
        semantic.semantic_report(tiny_vit, [(["a"], x)], figures=False)
    with pytest.raises(ValueError, match="labels"):
        semantic.semantic_report(tiny_vit, [(None, x, torch.zeros(3, dtype=torch.long))], figures=False)
    with pytest.raises(ValueError, match="batches must yield"):
        semantic.semantic_report(tiny_vit, [x], figures=False)


# ------------------------------------------------------------------------------------- new figures
def test_masked_images_paint_the_masked_patches():
    img = np.ones((64, 64, 3))
    scores = torch.arange(16.0)  # patch p has score p: Top masks the last ones, Bottom the first
    res = {"ratios": [0.25], "top": [0.5], "bottom": [0.75], "unmasked": 0.7}
    fig = paper002.plot_masked_images(img, scores, (4, 4), result=res, fill=(0.0, 0.5, 1.0))
    axes = np.array(fig.axes).reshape(2, 2)
    for row, patches in ((0, range(12, 16)), (1, range(0, 4))):
        data = np.asarray(axes[row, 1].images[0].get_array())
        painted = {y // 16 * 4 + x // 16 for y in range(64) for x in range(64)
                   if np.allclose(data[y, x], (0.0, 0.5, 1.0))}
        assert painted == set(patches)
        assert np.allclose(np.asarray(axes[row, 0].images[0].get_array()), 1.0)  # the original, unmasked
    assert "acc 50.0%" in axes[0, 1].get_title() and "acc 75.0%" in axes[1, 1].get_title()
    assert "acc 70.0%" in axes[0, 0].get_title()
    with pytest.raises(ValueError, match="grid"):
        paper002.plot_masked_images(img, scores[:15], (4, 4))
    with pytest.raises(ValueError, match="fill"):
        paper002.plot_masked_images(img, scores, (4, 4), fill=(2, 0, 0))
    with pytest.raises(ValueError, match="result"):
        paper002.plot_masked_images(img, scores, (4, 4), result={"top": [1]})


def test_stage_heatmaps_draw_one_row_per_stage():
    rng = np.random.default_rng(0)
    rows = rng.random((3, 16))
    fig = paper002.plot_stage_heatmaps(rng.random((64, 64, 3)), rows, (4, 4), [1, 5, 9], query=5,
                                       names=semantic.STAGE_NAMES, afi=[2.5, 1.0, 1.5])
    panels = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert len(panels) == 3
    for ax, row, name, layer in zip(panels, rows, semantic.STAGE_NAMES, [1, 5, 9]):
        assert ax.get_title().startswith(f"{name}: layer {layer}")
        np.testing.assert_allclose(np.asarray(ax.images[1].get_array()), row.reshape(4, 4))
    assert "2.5" in panels[0].get_title()
    with pytest.raises(ValueError, match="layers"):
        paper002.plot_stage_heatmaps(np.zeros((64, 64, 3)), rows, (4, 4), [1, 5])
    with pytest.raises(ValueError, match="query"):
        paper002.plot_stage_heatmaps(np.zeros((64, 64, 3)), rows, (4, 4), [1, 5, 9], query=16)
    with pytest.raises(ValueError, match="rows"):
        paper002.plot_stage_heatmaps(np.zeros((64, 64, 3)), rows[0], (4, 4), [1])


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Five 64 px images in two class folders (a: 3, b: 2) and a test_vit checkpoint that always says 'a'."""
    import timm

    base = tmp_path_factory.mktemp("sem002")
    write_square_images(base / "data")
    torch.manual_seed(0)
    model = _constant(timm.create_model(MODEL, pretrained=False, img_size=64, num_classes=2), 0)
    torch.save(model.state_dict(), base / "const.pth")
    return base / "data", base / "const.pth"


def _pngs_ok(out, names):
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name


def test_semantic_command_true_labels_and_figures(folder, tmp_path, capsys):
    data, ckpt = folder
    base = ["semantic", str(data), "--model", MODEL, "--img-size", "64", "--checkpoint", str(ckpt),
            "--batch-size", "2", "--mask-prompt", "--ratios", "0.1", "0.25", "--mask-modes", "pixel",
            "--no-progress"]
    out = tmp_path / "true"
    rc = cli.main(base + ["--out", str(out), "--score-layers", "-1"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "semantic.json").read_text())
    assert res["labels"] == "true" and res["mask_prompt_labels"] == "true"
    mp = res["mask_prompt"]["pixel"]
    assert mp["unmasked"] == 0.6 and mp["top"] == [0.6, 0.6] and mp["bottom"] == [0.6, 0.6]  # 3 of 5 are 'a'
    assert res["score_layers"] == [5] and res["stages"] == [2, 4] and res["stage_layers"] == [0, 2, 4]
    rows = [json.loads(line) for line in (out / "semantic_images.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [0, 0, 0, 1, 1] and all(r["image"].endswith(".png") for r in rows)
    assert all(r["keypoints"] > 0 for r in rows) and len(rows[0]["KK"]) == 6
    _pngs_ok(out, ["fig3_keypoints.png", "fig4_attended_row.png", "fig5_interrelation.png", "fig6_focus_index.png",
                   "fig7a_stages.png", "fig7b_stage_heatmaps.png", "fig8_mask_prompt.png",
                   "fig8_masked_images.png"])
    out = tmp_path / "pred"
    assert cli.main(base + ["--out", str(out), "--labels", "pred", "--stages", "3"]) == 0
    res = json.loads((out / "semantic.json").read_text())
    assert res["mask_prompt"]["pixel"]["unmasked"] == 1.0 and res["mask_prompt_labels"] == "unmasked prediction"
    assert res["stages"] == [3] and res["score_layers"] == "all"
    assert math.isclose(res["mask_prompt"]["pixel"]["top"][0], 1.0)


def test_semantic_command_bad_input(folder, tmp_path, capsys):
    data, ckpt = folder
    base = ["semantic", str(data), "--model", MODEL, "--img-size", "64", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(base + ["--checkpoint", str(ckpt), "--score-layers", "6"]) == 2
    assert "score_layers" in capsys.readouterr().err
    assert cli.main(base + ["--checkpoint", str(ckpt), "--stages", "0"]) == 2
    assert "stages" in capsys.readouterr().err
    # --labels true: 2 class folders against test_vit's 1000 classes (no checkpoint) is refused
    assert cli.main(base + ["--mask-prompt"]) == 2
    assert "class folders" in capsys.readouterr().err
