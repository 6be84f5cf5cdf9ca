"""``vitpatch semantic`` / ``vitpatch heads`` end to end, and the paper 002 / 003 figures."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitpatch import analysis, cli
from vitpatch.analysis import plots

from _helpers import write_square_images

MODEL = "test_vit"  # timm's small CI ViT (embed 64, depth 6, 2 heads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_square_images(tmp_path_factory.mktemp("papers") / "data")


def _pngs_ok(out, names):
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name


def test_semantic_command(folder, tmp_path, capsys):
    pytest.importorskip("cv2")
    out = tmp_path / "sem"
    rc = cli.main(["semantic", str(folder), "--model", MODEL, "--img-size", "64", "--out", str(out),
                   "--batch-size", "2", "--stages", "2", "4", "--mask-prompt", "--labels", "pred",
                   "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "random weights" in cap.err
    res = json.loads((out / "semantic.json").read_text())
    rows = [json.loads(line) for line in (out / "semantic_images.jsonl").read_text().splitlines()]
    assert res["images"] == 5 and len(rows) == 5
    assert len(res["per_layer"]["KK"]) == 6 and len(res["per_layer_head"]["AFI"][0]) == 2
    assert all(r["keypoints"] > 0 for r in rows)
    assert set(res["mask_prompt"]) == {"pixel", "drop_tokens"}
    assert res["mask_prompt"]["pixel"]["unmasked"] == 1.0  # labels are the unmasked predictions
    _pngs_ok(out, ["fig3_keypoints.png", "fig4_attended_row.png", "fig5_interrelation.png",
                   "fig6_focus_index.png", "fig7a_stages.png", "fig7b_stage_heatmaps.png", "fig8_mask_prompt.png",
                   "fig8_masked_images.png"])


def test_heads_command(folder, tmp_path, capsys):
    out = tmp_path / "heads"
    rc = cli.main(["heads", str(folder), "--model", MODEL, "--img-size", "64", "--out", str(out),
                   "--modes", "1", "4", "--ae-epochs", "2", "--labels", "pred", "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads((out / "heads.json").read_text())
    assert res["modes"] == [1, 4] and res["images"] == 5
    assert np.load(out / "per_image" / "prob.npy").shape == (5, 6, 2, 2)
    assert np.load(out / "per_image" / "strength.npy").shape == (5, 6, 2, 4)
    _pngs_ok(out, ["head_importance.png", "mode_bars.png", "top5_heads.png", "khop_strength.png",
                   "entropy_layers.png", "tsne_images.png", "tsne_cls_patterns.png", "tsne_patch_patterns.png",
                   "context_masks.png", "attention_heatmap.png", "b2_head_modes.png", "b3_top5.png",
                   "c3_entropy_distribution.png", "d3_two_axes.png", "d5_threshold_histogram.png"])


def test_commands_bad_input(folder, tmp_path, capsys):
    assert cli.main(["heads", str(folder), "--model", MODEL, "--img-size", "64", "--out", str(tmp_path),
                     "--modes", "9"]) == 2
    assert "modes" in capsys.readouterr().err
    assert cli.main(["heads", str(tmp_path / "missing"), "--model", MODEL, "--out", str(tmp_path)]) == 2
    assert "IMAGE_OR_DIR" in capsys.readouterr().err
    assert cli.main(["semantic", str(folder), "--model", MODEL, "--out", str(tmp_path), "--gamma", "0"]) == 2
    assert "gamma" in capsys.readouterr().err
    for name in ("semantic", "heads"):
        assert name in cli.COMMANDS


def test_paper_figures_and_bad_input():
    rng = np.random.default_rng(0)
    img = rng.random((64, 64, 3))
    L, h, K = 4, 3, 4
    v = rng.random((L, h))
    figs = [
        plots.plot_keypoints(img, rng.random((10, 2)) * 64, (4, 4), rng.integers(0, 3, 16)),
        plots.plot_attended_row(img, rng.random(16), (4, 4), 1.0, 5),
        plots.plot_layer_points({"KK": v, "NK": v / 2}),
        plots.plot_stage_summary(v.mean(1), 1 - v.mean(1), v.mean(1) / 2, 1 - v.mean(1) / 2, v.mean(1), [2]),
        plots.plot_mask_prompt({"pixel": {"ratios": [0.1, 0.2], "top": [0.5, 0.4], "bottom": [0.6, 0.6],
                                          "unmasked": 0.7}}),
        plots.plot_head_importance(v), plots.plot_mode_bars(rng.random((L, h, 2)), (1, 4)),
        plots.plot_top_heads(v), plots.plot_khop_strength(rng.random((h, K)), 1), plots.plot_entropy_layers(v),
        plots.plot_tsne(rng.random((8, 2)), np.arange(8) % 3),
        plots.plot_context_masks(img, {"cls_to_patches": rng.random((4, 4))}),
        plots.plot_attention_heatmap(torch.rand(17, 17).softmax(-1), 1),
    ]
    assert all(len(f.axes) >= 1 for f in figs)
    with pytest.raises(ValueError, match="stages"):
        plots.plot_stage_summary(v[:, 0], v[:, 0], v[:, 0], v[:, 0], v[:, 0], [9])
    with pytest.raises(ValueError, match="values"):
        plots.plot_head_importance(v[0])
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        plots.plot_attention_heatmap(np.eye(5) , 0)
    with pytest.raises(ValueError, match="grid"):
        plots.plot_attended_row(img, rng.random(15), (4, 4))


def test_demo_stage_papers_002_003(tmp_path):
    from vitpatch.demo import DemoConfig, _semantic_heads_figures, load_digits_split, make_vit, semantic_heads_stage

    cfg = DemoConfig(out=str(tmp_path), subset=64, device="cpu", depth=2)
    data = load_digits_split(cfg)
    torch.manual_seed(0)
    res = semantic_heads_stage(make_vit(cfg), data[2][:8], cfg)
    L, h, K = 2, cfg.num_heads, cfg.grid[0]
    if "semantic_skipped" not in res:
        assert len(res["KK"]) == len(res["AFI"]) == L and res["keypoints_per_image"] > 0
    assert np.array(res["I_prob"]).shape == (L, h, 2)
    assert np.array(res["khop_strength"]).shape == (L, h, K)
    files = _semantic_heads_figures(res, cfg)
    assert {p.split("/")[-1] for p in files} >= {"head_importance.png", "khop_strength.png", "mode_bars.png"}
