"""``vitpatch heads`` / :func:`vitpatch.analysis.heads.heads_report` (paper 003, docs/math.md §9): one
streaming pass equals the batch computation, true labels from the class folders, top-5 under pruning
kept, patterns of every image in the bit-packed store, and every figure written by the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitpatch import analysis, cli
from vitpatch.analysis import heads, patterns

MODEL = "test_vit"  # timm's small CI ViT: embed 64, depth 6, 2 heads; 64 px -> 4 x 4 patches of 16 px
FIGURES = ("head_importance.png", "b2_head_modes.png", "b3_top5.png", "mode_bars.png", "top5_heads.png",
           "khop_strength.png", "entropy_layers.png", "c3_entropy_distribution.png", "tsne_images.png",
           "tsne_cls_patterns.png", "d1_density_cls_patterns.png", "tsne_patch_patterns.png",
           "d1_density_patch_patterns.png", "context_masks.png", "attention_heatmap.png", "d3_two_axes.png",
           "d5_threshold_histogram.png")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Seven images in class folders a (4) and b (3), and a 2-class checkpoint of the model at 64 px."""
    import timm
    from PIL import Image

    base = tmp_path_factory.mktemp("heads")
    rng = np.random.default_rng(5)
    for i in range(7):
        sub = base / "data" / ("a" if i < 4 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(sub / f"{i}.png")
    torch.manual_seed(0)
    model = timm.create_model(MODEL, img_size=64, num_classes=2).eval()
    torch.save({"state_dict": model.state_dict()}, base / "ckpt.pth")
    return base, model


@pytest.fixture(scope="module")
def streamed(setup, tmp_path_factory):
    """The report over 6 random images in uneven batches (4 + 2) with given labels, and the batch reference."""
    _, model = setup
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    names = [f"img{i}" for i in range(6)]
    batches = [(names[:4], x[:4], y[:4]), (names[4:], x[4:], y[4:])]
    out = tmp_path_factory.mktemp("report")
    summary, figs = heads.heads_report(model, iter(batches), out=out, modes=(1, 4), image=4, ae_epochs=2,
                                       tsne_max=30, top=0.05)
    # the old CLI's way: every batch's result held, concatenated, then reduced
    parts = [analysis.head_importance(model, xb, yb, modes=(1, 4)) for _, xb, yb in batches]
    ref = analysis.HeadImportance(*(torch.cat([getattr(r, k) for r in parts]) for k in (
        "prob", "jsd", "cls", "patch", "p_pruned", "p", "labels")), (1, 4), *(torch.cat([getattr(r, k) for r in parts])
                                                                              for k in ("top5_prob", "top5_class",
                                                                                        "top5_prob0", "top5_class0",
                                                                                        "pred")))
    sts = [analysis.layer_strengths(analysis.attention_maps(model, xb), (4, 4), 16, 1) for _, xb, _ in batches]
    st = analysis.LayerStrengths(*(torch.cat([getattr(s, k) for s in sts]) for k in ("strength", "entropy", "mad")))
    return model, x, y, out, summary, figs, ref, st


def _per_image(out, name):
    return np.load(out / "per_image" / f"{name}.npy", mmap_mode="r")


def test_streaming_statistics_equal_the_batch_statistics(streamed):
    _, _, _, out, summary, _, ref, st = streamed
    assert summary["images"] == 6 and summary["label_source"] == "true"
    for k in ("prob", "p_pruned", "jsd", "cls", "patch"):
        v = getattr(ref, k)
        mean = np.array(summary["mean_over_images"][k], dtype=float)
        std = np.array(summary["std_over_images"][k], dtype=float)
        np.testing.assert_allclose(mean, torch.nanmean(v, 0).numpy(), rtol=1e-9, atol=1e-15)  # the old CLI's mean
        np.testing.assert_allclose(std, np.nanstd(v.numpy(), 0), rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(_per_image(out, k), v.numpy(), rtol=1e-6, atol=1e-7)  # float32 on disk
    for key, v in (("khop_strength", st.strength), ("strength_entropy", st.entropy), ("mad_px", st.mad)):
        np.testing.assert_allclose(np.array(summary[f"{key}_mean"]), v.mean(0).numpy(), rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(np.array(summary[f"{key}_std"]), v.std(0, unbiased=False).numpy(), rtol=1e-9,
                                   atol=1e-15)
    hist = np.array(summary["strength_entropy_histogram"]["counts"])
    assert hist.shape == (6, 2, 50) and (hist.sum(-1) == 6).all()
    assert summary["p_unpruned_mean"] == pytest.approx(float(ref.p.mean()), rel=1e-12)
    assert summary["unpruned_accuracy"] == pytest.approx(float((ref.pred == ref.labels).double().mean()))
    assert _per_image(out, "label").tolist() == [0, 1, 1, 0, 1, 0]
    assert (out / "images.txt").read_text().split() == [f"img{i}" for i in range(6)]


def test_top5_under_pruning_is_kept(streamed):
    _, _, _, out, summary, _, ref, _ = streamed
    np.testing.assert_allclose(_per_image(out, "top5_prob"), ref.top5_prob.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(_per_image(out, "top5_class"), ref.top5_class.numpy())
    assert _per_image(out, "top5_class").shape == (6, 6, 2, 2, 2)  # 2 classes: the top 2
    sel = summary["selected"]
    assert sel["image"] == 4 and sel["name"] == "img4"
    l, j = sel["layer"], sel["head"]
    for i, m in enumerate((1, 4)):
        got = sel["top5_pruned"][str(m)]
        assert got["class"] == ref.top5_class[4, l, j, i].tolist()
        np.testing.assert_allclose(got["prob"], ref.top5_prob[4, l, j, i].numpy())
    assert sel["top5_unpruned"]["class"] == ref.top5_class0[4].tolist()
    # the default head is the one of largest mean I_prob in full pruning (mode 1)
    assert (l, j) == np.unravel_index(int(torch.argmax(ref.prob[..., 0].mean(0))), (6, 2))
    assert sel["chosen_by"].startswith("largest mean I_prob")


def test_patterns_of_every_image_in_the_packed_store(streamed):
    model, x, _, out, summary, _, _, _ = streamed
    pp = summary["patch_patterns"]
    assert pp["rows"] == 6 * 6 * 2 and pp["n"] == 16 and pp["bytes_per_row"] == 32
    ds = patterns.PackedPatterns(out / "patch_patterns.npy", 16)
    want = torch.stack([patterns.binarize_patterns(A, 1, top=0.05) for A in analysis.attention_maps(model, x)], 1)
    torch.testing.assert_close(ds.rows(np.arange(len(ds))), want.reshape(72, 16, 16))  # (image, layer, head) order
    assert summary["autoencoder"]["epochs"] == 2 and len(summary["autoencoder"]["losses"]) == 2
    assert summary["tsne_points"] == {"images": 6, "cls_patterns": 30 + 12, "patch_patterns": 30 + 12}


def test_report_figures_and_predicted_labels(streamed, tmp_path):
    model, x, _, _, _, figs, _, _ = streamed
    assert set(figs) == set(FIGURES)
    # no labels: I_prob against the unpruned prediction; the given head is kept
    summary, figs = heads.heads_report(model, [x[:3]], out=tmp_path, modes=(4,), layer=2, head=1, ae_epochs=0,
                                       tsne_max=0)
    ref = analysis.head_importance(model, x[:3], modes=(4,))
    assert summary["label_source"] == "pred" and summary["unpruned_accuracy"] is None
    assert _per_image(tmp_path, "label").tolist() == _per_image(tmp_path, "pred").tolist() == ref.pred.tolist()
    np.testing.assert_allclose(np.array(summary["mean_over_images"]["prob"]), ref.prob.mean(0).numpy(), atol=1e-9)
    assert (summary["selected"]["layer"], summary["selected"]["head"], summary["selected"]["chosen_by"]) == (2, 1, "given")
    assert "mode_bars.png" not in figs and "tsne_patch_patterns.png" not in figs and "tsne_images.png" not in figs


def test_report_bad_input(setup, tmp_path):
    _, model = setup
    x = torch.randn(2, 3, 64, 64)
    for kw, match in ((dict(modes=(7,)), "modes"), (dict(layer=6), "layer"), (dict(head=2), "head"),
                      (dict(top=0.0), "top"), (dict(ae_epochs=-1), "ae_epochs")):
        with pytest.raises(ValueError, match=match):
            heads.heads_report(model, [x], out=tmp_path, **kw)
    with pytest.raises(ValueError, match="image must be the index"):
        heads.heads_report(model, [x], out=tmp_path, image=2, ae_epochs=0, tsne_max=0)
    with pytest.raises(ValueError, match="no images"):
        heads.heads_report(model, [], out=tmp_path)
    with pytest.raises(ValueError, match="labels for every batch"):
        heads.heads_report(model, [("ab", x, torch.tensor([0, 1])), ("cd", x, None)], out=tmp_path, ae_epochs=0)
    with pytest.raises(ValueError, match="labels must be class indices"):
        heads.heads_report(model, [("ab", x, torch.tensor([0, 2]))], out=tmp_path, ae_epochs=0)


# ------------------------------------------------------------------------------------------- CLI
def test_heads_command_true_labels_and_every_figure(setup, tmp_path, capsys):
    base, model = setup
    out = tmp_path / "out"
    rc = cli.main(["heads", str(base / "data"), "--model", MODEL, "--checkpoint", str(base / "ckpt.pth"),
                   "--img-size", "64", "--out", str(out), "--modes", "1", "4", "--ae-epochs", "2", "--batch-size", "4",
                   "--max-images", "6", "--image", "5", "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    res = json.loads((out / "heads.json").read_text())
    assert res["images"] == 6 and res["labels"] == "true" and res["class_names"] == ["a", "b"]
    # the class folders are the labels (a = 0, b = 1); 6 of the 7 images (--max-images)
    assert _per_image(out, "label").tolist() == [0, 0, 0, 0, 1, 1]
    assert res["selected"]["image"] == 5 and res["selected"]["name"].endswith("5.png")
    assert res["selected"]["label"] == 1 and res["selected"]["top5_unpruned"]["name"][0] in ("a", "b")
    assert np.array(res["mean_over_images"]["prob"]).shape == (6, 2, 2)
    # I_prob against the true class: equal to head_importance with the folder labels
    from PIL import Image

    from vitpatch.analysis.pipeline import eval_transform

    transform, _ = eval_transform(model)

    files = sorted((base / "data").rglob("*.png"))[:6]
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    ref = analysis.head_importance(model, x, torch.tensor([0, 0, 0, 0, 1, 1]), modes=(1, 4))
    np.testing.assert_allclose(_per_image(out, "prob"), ref.prob.numpy(), atol=1e-6)
    pred = analysis.head_importance(model, x, modes=(1, 4))
    assert not np.allclose(ref.prob.numpy(), pred.prob.numpy())  # the labels matter: some image is mispredicted

    # --labels pred scores against the unpruned prediction
    out2 = tmp_path / "pred"
    assert cli.main(["heads", str(base / "data"), "--model", MODEL, "--checkpoint", str(base / "ckpt.pth"),
                     "--img-size", "64", "--out", str(out2), "--labels", "pred", "--ae-epochs", "0", "--max-images",
                     "6", "--layer", "1", "--head", "0", "--no-progress"]) == 0
    res2 = json.loads((out2 / "heads.json").read_text())
    assert res2["label_source"] == "pred" and res2["class_names"] is None
    np.testing.assert_allclose(_per_image(out2, "prob")[..., 0], pred.prob[..., 0].numpy(), atol=1e-6)
    assert (res2["selected"]["layer"], res2["selected"]["head"]) == (1, 0)


def test_heads_command_bad_input(setup, tmp_path, capsys):
    base, _ = setup
    common = ["--model", MODEL, "--img-size", "64", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(["heads", str(base / "data"), *common, "--checkpoint", str(base / "ckpt.pth"),
                     "--image", "7"]) == 2
    assert "--image must be in [0, 7)" in capsys.readouterr().err
    assert cli.main(["heads", str(base / "data"), *common, "--modes", "9"]) == 2
    assert "modes" in capsys.readouterr().err
    # random weights: 1000 classes, the folder has 2
    assert cli.main(["heads", str(base / "data"), *common]) == 2
    assert "class folders" in capsys.readouterr().err
    assert cli.main(["heads", str(base / "data"), *common, "--checkpoint", str(base / "ckpt.pth"),
                     "--top", "2"]) == 2
    assert "top" in capsys.readouterr().err
