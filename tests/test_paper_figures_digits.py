"""Every new figure of `vitpatch heads` and `vitpatch semantic --mask-prompt` from the CLI on the demo's
ViT (the digits ViT, `vit_digits_patch4_32`, trained one epoch by `vitpatch train`), with true labels
from the digits' class folders. Paper 000's and 004's figures on digits models: test_paper000_figures.py
and test_clusters.py."""
import json

import numpy as np
import pytest

from vitpatch import cli

MODEL = "vit_digits_patch4_32"


def _pngs_ok(out, names):
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("digits_vit")
    assert cli.main(["train", "--epochs", "1", "--out", str(base), "--no-progress", "--no-plots"]) == 0
    return base


def test_heads_figures_on_the_digits_vit(run, tmp_path):
    out = tmp_path / "heads"
    assert cli.main(["heads", str(run / "digits" / "val"), "--model", MODEL, "--checkpoint", str(run / "last.pth.tar"),
                     "--out", str(out), "--modes", "1", "4", "--max-images", "16", "--ae-epochs", "2",
                     "--no-progress"]) == 0
    res = json.loads((out / "heads.json").read_text())
    assert res["images"] == 16 and res["labels"] == "true" and res["class_names"] == [str(c) for c in range(10)]
    assert np.load(out / "per_image" / "prob.npy").shape == (16, 4, 4, 2)
    _pngs_ok(out, ["head_importance.png", "b2_head_modes.png", "b3_top5.png", "c3_entropy_distribution.png",
                   "d1_density_patch_patterns.png", "d1_density_cls_patterns.png", "d3_two_axes.png",
                   "d5_threshold_histogram.png", "mode_bars.png", "top5_heads.png", "khop_strength.png",
                   "entropy_layers.png", "tsne_images.png", "context_masks.png", "attention_heatmap.png"])


def test_semantic_figures_on_the_digits_vit(run, tmp_path):
    pytest.importorskip("cv2")
    out = tmp_path / "sem"
    assert cli.main(["semantic", str(run / "digits" / "val"), "--model", MODEL, "--checkpoint",
                     str(run / "last.pth.tar"), "--out", str(out), "--max-images", "16", "--mask-prompt",
                     "--no-progress"]) == 0
    res = json.loads((out / "semantic.json").read_text())
    assert res["images"] == 16 and set(res["mask_prompt"]) == {"pixel", "drop_tokens"}
    _pngs_ok(out, ["fig3_keypoints.png", "fig4_attended_row.png", "fig5_interrelation.png", "fig6_focus_index.png",
                   "fig7a_stages.png", "fig7b_stage_heatmaps.png", "fig8_mask_prompt.png", "fig8_masked_images.png"])
