"""Cluster importance by masking (paper 004 §3.5; docs/math.md §7) and the ``vitpatch clusters`` command."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn

from vitpatch.analysis.clusters import (ClusterImportanceAccumulator, cluster_heatmaps, cluster_importance,
                                        cluster_masks, clusters_report, load_paca_model, mask_images, paca_layers,
                                        rank_clusters)
from vitpatch.nn import PaCaAttention


# ------------------------------------------------------------------------------------ pieces
def test_heatmap_is_min_max_normalised_per_image_and_cluster():
    A = torch.tensor([[[0.1, 0.25], [0.2, 0.25], [0.3, 0.25], [0.4, 0.25]],
                      [[0.4, 0.7], [0.3, 0.1], [0.2, 0.1], [0.1, 0.1]]])  # (B=2, n=4, M=2)
    H = cluster_heatmaps(A, (2, 2))
    assert H.shape == (2, 2, 2, 2)
    # (C - min) / (max - min) over the 4 positions, on the 2x2 grid in row-major order
    torch.testing.assert_close(H[0, 0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    torch.testing.assert_close(H[0, 1], torch.zeros(2, 2))  # a constant column masks nothing
    torch.testing.assert_close(H[1, 0], torch.tensor([[1.0, 2 / 3], [1 / 3, 0.0]]))
    torch.testing.assert_close(H[1, 1], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_masks_upsample_the_heatmap():
    H = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    # bilinear, align_corners=False: source coordinates (i + 0.5) / 2 - 0.5 clamp to 0, .25, .75, 1
    w = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = 1 - (1 - w)[:, None] * w[None, :]
    torch.testing.assert_close(cluster_masks(H, (4, 4))[0, 0], expected)
    near = cluster_masks(H, (4, 4), "nearest")[0, 0]
    torch.testing.assert_close(near, torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="upsample"):
        cluster_masks(H, (4, 4), "bicubic")


def test_mask_multiplies_the_image_pixels():
    img = torch.full((1, 3, 2, 2), 0.6)
    x = (img - 0.5) / 0.5  # normalised input
    m = torch.tensor([[[0.0, 1.0], [0.5, 1.0]]])
    out = mask_images(x, m, mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.testing.assert_close(out * 0.5 + 0.5, img * m[:, None])  # masked pixels black, others unchanged
    torch.testing.assert_close(mask_images(x, m), x * m[:, None])  # without mean/std: the input as given
    with pytest.raises(ValueError, match="masks"):
        mask_images(x, torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match="together"):
        mask_images(x, m, mean=(0.5,) * 3)


def test_ranking_ties_go_to_the_lower_entropy():
    assert rank_clusters([0.5, 0.5, 0.1], [0.2, 0.2, 0.3], [2.0, 1.0, 0.5]) == [1, 0, 2]
    assert rank_clusters([0.5, 0.5, 0.6], [0.1, 0.3, 0.0]) == [2, 1, 0]  # accuracy drop first, then p_y drop
    assert rank_clusters(prob_drop=[0.1, float("nan"), 0.4], entropy=[1, 1, 1]) == [2, 0, 1]  # NaN last
    with pytest.raises(ValueError, match="one value per cluster"):
        rank_clusters([0.1, 0.2], [0.1])


# ------------------------------------------------------------------------------------ a hand-built PaCa model
class EvidenceModel(nn.Module):
    """8x8 images as a 4x4 grid of 2x2 patches; a PaCa layer whose cluster q sits on quadrant q of the grid
    (fixed cluster logits: +6 on its 2x2 patches, 0 elsewhere); a classifier that reads only quadrant
    ``evidence``: logit_1 = 10 * mean(pixels of that quadrant) - 5, logit_0 = 0."""

    def __init__(self, evidence: int):
        super().__init__()
        self.evidence = evidence
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.attn = PaCaAttention(8, num_heads=2, num_clusters=4, clustering="linear", num_prefix_tokens=0)
        logits = torch.zeros(16, 4)
        for q in range(4):
            r0, c0 = 2 * (q // 2), 2 * (q % 2)
            for r in range(r0, r0 + 2):
                for c in range(c0, c0 + 2):
                    logits[r * 4 + c, q] = 6.0
        self.register_buffer("cluster_logits", logits)

    def quadrant(self, x):
        q = self.evidence
        r0, c0 = 4 * (q // 2), 4 * (q % 2)
        return x[:, :, r0:r0 + 4, c0:c0 + 4]

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        a = self.attn(tokens, grid=(4, 4), cluster_logits=self.cluster_logits.expand(x.shape[0], 16, 4))
        s = 10 * self.quadrant(x).mean((1, 2, 3)) - 5
        return torch.stack([torch.zeros_like(s), s], 1) + 0 * a.mean()


def _evidence_images(evidence: int, n: int, dark: int = 0):
    """``n`` images bright (1) on the evidence quadrant (class 1), the last ``dark`` of them dark there."""
    x = torch.zeros(n, 3, 8, 8)
    r0, c0 = 4 * (evidence // 2), 4 * (evidence % 2)
    x[: n - dark, :, r0:r0 + 4, c0:c0 + 4] = 1.0
    return x


@pytest.mark.parametrize("evidence", [2, 1])
def test_the_cluster_on_the_class_evidence_ranks_first(evidence):
    model = EvidenceModel(evidence)
    x = _evidence_images(evidence, 5, dark=1)  # 4 correct, 1 wrong (dark evidence, label 1)
    y = torch.ones(5, dtype=torch.long)
    (res,) = cluster_importance(model, x, y, batch_size=3, progress=False, upsample="nearest")
    assert res.layer == "attn" and res.grid == (4, 4) and res.num_clusters == 4
    assert res.images == 5 and res.counted == 4  # only the correctly classified images count
    assert res.ranking[0] == evidence
    # nearest upsampling: masking the evidence quadrant zeroes it (p_1 = sigmoid(-5)); the others leave it whole
    five = torch.tensor(5.0, dtype=torch.float64)
    drop = torch.sigmoid(five) - torch.sigmoid(-five)
    expected_acc = torch.zeros(4, dtype=torch.float64)
    expected_acc[evidence] = 1.0
    torch.testing.assert_close(res.acc_drop, expected_acc)
    expected_dp = torch.zeros(4, dtype=torch.float64)
    expected_dp[evidence] = drop
    torch.testing.assert_close(res.prob_drop, expected_dp, rtol=0, atol=1e-6)
    torch.testing.assert_close(res.prob_drop_std, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-6)
    # the heatmap of cluster q is its quadrant (min-max: 1 there, 0 elsewhere)
    H = res.examples[0].heatmaps
    assert H.shape == (4, 4, 4) and H[evidence].sum() == 4 and H[evidence].max() == 1
    assert res.examples[0].ranking[0] == evidence and all(e.counted for e in res.examples[:4])


def test_all_images_and_predicted_labels():
    model = EvidenceModel(3)
    x = _evidence_images(3, 4, dark=1)
    y = torch.ones(4, dtype=torch.long)
    (res,) = cluster_importance(model, x, y, progress=False, upsample="nearest", correct_only=False)
    assert res.counted == 4
    # accuracy 3/4 before, 0/4 after masking cluster 3; the dark image's p_1 does not move
    assert res.acc_drop[3].item() == pytest.approx(0.75)
    assert res.prob_drop[3].item() == pytest.approx(0.75 * (torch.sigmoid(torch.tensor(5.0)) -
                                                            torch.sigmoid(torch.tensor(-5.0))).item(), abs=1e-6)
    # labels=None: the unmasked prediction is the label, every image counts
    (pred,) = cluster_importance(model, x, None, progress=False, upsample="nearest")
    assert pred.counted == 4 and pred.ranking[0] == 3 and pred.acc_drop[3].item() == pytest.approx(0.75)


def test_streaming_keeps_no_images_beyond_the_examples():
    model = EvidenceModel(0)
    acc = ClusterImportanceAccumulator(model, keep=2, upsample="nearest")
    for _ in range(5):
        acc.update(_evidence_images(0, 3), torch.ones(3, dtype=torch.long))
    (res,) = acc.result()
    assert res.images == 15 and res.counted == 15 and len(res.examples) == 2
    assert res.ranking[0] == 0
    # an iterable of (x, y) batches gives the same as the stacked tensor
    batches = [(_evidence_images(0, 3), torch.ones(3, dtype=torch.long)) for _ in range(2)]
    (it,) = cluster_importance(model, iter(batches), progress=False, upsample="nearest")
    (st,) = cluster_importance(model, torch.cat([b[0] for b in batches]), torch.ones(6, dtype=torch.long),
                               progress=False, upsample="nearest")
    torch.testing.assert_close(it.prob_drop, st.prob_drop)


def test_bad_input_errors():
    model = EvidenceModel(0)
    x = _evidence_images(0, 2)
    with pytest.raises(ValueError, match="no PaCaAttention"):
        cluster_importance(nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match="layer"):
        cluster_importance(model, x, layer=1, progress=False)
    with pytest.raises(ValueError, match="layer"):
        cluster_importance(model, x, layer="first", progress=False)
    with pytest.raises(ValueError, match="labels"):
        cluster_importance(model, x, torch.tensor([1, 2]), progress=False)  # class 2 of a 2-class model
    with pytest.raises(ValueError, match="labels"):
        cluster_importance(model, x, torch.ones(3, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        cluster_importance(model, x, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="top"):
        clusters_report(model, [(None, x, None)], top=0)
    with pytest.raises(ValueError, match="no images"):
        ClusterImportanceAccumulator(model).result()
    with pytest.raises(ValueError, match="grid"):
        cluster_heatmaps(torch.rand(1, 6, 2), (2, 2))


def test_report_summary_and_figures():
    from matplotlib.figure import Figure

    model = EvidenceModel(1)
    x = _evidence_images(1, 3)
    summary, figs = clusters_report(model, [(["a.png", "b.png", "c.png"], x, torch.ones(3, dtype=torch.long))],
                                    top=2, keep=2, upsample="nearest")
    assert set(figs) == {"clusters_importance_layer0.png", "clusters_top_layer0.png",
                         "clusters_per_image_layer0.png"}
    assert all(isinstance(f, Figure) for f in figs.values())
    (lay,) = summary["layers"]
    assert lay["ranking"][0] == 1 and [t["cluster"] for t in lay["top"]][0] == 1 and len(lay["top"]) == 2
    assert summary["images"] == ["a.png", "b.png", "c.png"] and summary["correct"] == 3
    assert lay["examples"][0]["top"][0]["cluster"] == 1 and lay["examples"][0]["top"][0]["wrong_after"]
    json.dumps(summary)  # JSON-ready


# ------------------------------------------------------------------------------------ the command on the demo's model
@pytest.fixture(scope="module")
def paca_run(tmp_path_factory):
    from vitpatch.cli import main

    out = tmp_path_factory.mktemp("paca_run")
    assert main(["train", "--attention", "paca", "--num-clusters", "16", "--epochs", "1", "--out", str(out),
                 "--no-progress", "--no-plots", "--batch-size", "64"]) == 0
    return out


def test_clusters_command_on_the_demo_paca_model(paca_run, tmp_path, capsys):
    from vitpatch.cli import main

    ck = os.path.join(paca_run, "last.pth.tar")
    model, _w, _tf, cfg = load_paca_model(ck)
    assert len(paca_layers(model)) == 4 and cfg["input_size"] == (3, 32, 32)
    out = tmp_path / "clusters"
    val = os.path.join(paca_run, "digits", "val")
    assert main(["clusters", val, "--checkpoint", ck, "--out", str(out), "--max-images", "16", "--no-progress",
                 "--labels", "pred", "--top", "3", "--show-images", "2", "--layer", "0", "-1"]) == 0
    files = sorted(os.listdir(out))
    for k in (0, 3):
        for stem in ("clusters_importance", "clusters_top", "clusters_per_image"):
            assert f"{stem}_layer{k}.png" in files
    summary = json.loads((out / "clusters.json").read_text())
    assert summary["model"] == "vit_digits_patch4_32" and summary["labels"] == "pred"
    assert len(summary["images"]) == 16 and summary["num_images"] == 16
    assert [lay["layer"] for lay in summary["layers"]] == ["blocks.0.attn", "blocks.3.attn"]
    for lay in summary["layers"]:
        assert lay["num_clusters"] == 16 and lay["grid"] == [8, 8] and lay["counted"] == 16
        assert sorted(lay["ranking"]) == list(range(16)) and len(lay["top"]) == 3
        assert all(0.0 <= v <= 1.0 for v in lay["acc_drop"]) and all(math.isfinite(v) for v in lay["prob_drop"])
        # the ranking is the ranking of the stored importances
        assert lay["ranking"] == rank_clusters(lay["acc_drop"], lay["prob_drop"], lay["entropy"])
    assert "most important clusters" in capsys.readouterr().out
    # true labels from the class folders (the default), and bad input
    assert main(["clusters", val, "--checkpoint", ck, "--out", str(out / "true"), "--max-images", "4",
                 "--no-progress"]) == 0
    assert json.loads((out / "true" / "clusters.json").read_text())["labels"] == "true"
    for bad, msg in ((["--layer", "x"], "--layer"), (["--layer", "7"], "layer"), (["--top", "0"], "--top"),
                     (["--model", "resnet18"], "does not fit")):
        assert main(["clusters", val, "--checkpoint", ck, "--out", str(out / "bad"), "--max-images", "2",
                     "--no-progress", *bad]) == 2
        assert msg in capsys.readouterr().err
    other = tmp_path / "lone.pth"
    torch.save({"state_dict": {}}, other)
    assert main(["clusters", val, "--checkpoint", str(other), "--out", str(out / "bad")]) == 2
    assert "train_config.json" in capsys.readouterr().err


def test_cluster_heatmap_figure_picks_clusters_by_importance():
    from vitpatch.analysis.plots.paper004 import plot_cluster_heatmaps, plot_cluster_importance

    A = torch.softmax(torch.randn(16, 10, generator=torch.Generator().manual_seed(0)), 0)
    imp = torch.zeros(10)
    imp[[7, 2, 9]] = torch.tensor([0.9, 0.5, 0.7])
    fig = plot_cluster_heatmaps(torch.rand(3, 8, 8), A, (4, 4), importance=imp)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[:3] == ["cluster 7 (importance 0.900)", "cluster 9 (importance 0.700)",
                          "cluster 2 (importance 0.500)"]
    with pytest.raises(ValueError, match="importance"):
        plot_cluster_heatmaps(torch.rand(3, 8, 8), A, (4, 4), importance=torch.zeros(3))
    fig = plot_cluster_importance(imp, imp / 2, ranking=[7, 9, 2, 0], top=3)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["c7", "c9", "c2"]
    with pytest.raises(ValueError, match="prob_drop"):
        plot_cluster_importance(imp, imp[:3])
