"""Paper 003 streaming pieces (docs/math.md §9): running statistics, the appendable .npy, the bit-packed
pattern store and the autoencoder trained from it, and the new figures against hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vitpatch.analysis import heads, patterns
from vitpatch.analysis.plots import paper003 as plots


# ------------------------------------------------------------------------------- running statistics
def test_running_stats_two_images_by_hand():
    # per-head values (L=2, h=2) of two images; one head is NaN (no CLS token) in the first image
    a = np.array([[1.0, 2.0], [3.0, np.nan]])
    b = np.array([[3.0, 2.0], [6.0, 7.0]])
    rs = heads.RunningStats().update(a[None]).update(b[None])
    np.testing.assert_array_equal(rs.count, [[2, 2], [2, 1]])
    np.testing.assert_allclose(rs.mean, [[2.0, 2.0], [4.5, 7.0]])
    np.testing.assert_allclose(rs.std(), [[1.0, 0.0], [1.5, 0.0]])  # population std: |a - b| / 2
    np.testing.assert_allclose(rs.std(ddof=1)[0], [np.sqrt(2.0), 0.0])
    assert np.isnan(rs.std(ddof=1)[1, 1])  # one value: no sample std
    one = heads.RunningStats().update(np.stack([a, b]))
    np.testing.assert_allclose(one.mean, rs.mean)
    np.testing.assert_allclose(one.std(), rs.std())


def test_running_stats_equal_batch_statistics_on_uneven_batches():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (23, 3, 4, 2)) * 1e3 + 1e6  # a large offset: the naive sum-of-squares would lose digits
    x[rng.random(x.shape) < 0.1] = np.nan
    rs = heads.RunningStats()
    for lo, hi in ((0, 1), (1, 8), (8, 9), (9, 23)):
        rs.update(torch.from_numpy(x[lo:hi]))
    np.testing.assert_allclose(rs.mean, np.nanmean(x, 0), rtol=1e-12)
    np.testing.assert_allclose(rs.std(), np.nanstd(x, 0), rtol=1e-9)
    with pytest.raises(ValueError, match="values must have shape"):
        rs.update(x[:2, :2])
    with pytest.raises(ValueError, match="no values"):
        heads.RunningStats().mean


def test_reservoir_keeps_a_uniform_sample():
    r = heads._Reservoir(4, seed=1)
    r.add(np.arange(3)[:, None] * 10, np.arange(3))
    rows, ids = r.sample()
    assert ids.tolist() == [0, 1, 2] and rows[:, 0].tolist() == [0, 10, 20]  # fewer than k: all of them
    hits = np.zeros(20)
    for seed in range(400):
        r = heads._Reservoir(5, seed=seed)
        for lo in range(0, 20, 3):
            ids = np.arange(lo, min(lo + 3, 20))
            r.add(ids[:, None].astype(float), ids)
        rows, ids = r.sample()
        assert len(set(ids.tolist())) == 5 and np.array_equal(rows[:, 0], ids) and np.all(np.diff(ids) > 0)
        hits[ids] += 1
    assert hits.min() > 0.15 * 400 and hits.max() < 0.35 * 400  # each row kept with probability 5/20


# ---------------------------------------------------------------------------------- .npy appender
def test_npy_appender_is_a_valid_growing_npy(tmp_path):
    path = tmp_path / "a.npy"
    rng = np.random.default_rng(0)
    parts = [rng.random((k, 3, 2)).astype(np.float32) for k in (2, 1, 4)]
    with patterns.NpyAppender(path, np.float32, (3, 2)) as w:
        assert np.load(path).shape == (0, 3, 2)
        for i, p in enumerate(parts):
            w.append(p)
            np.testing.assert_array_equal(np.load(path, mmap_mode="r"), np.concatenate(parts[:i + 1]))
        with pytest.raises(ValueError, match="rows must have shape"):
            w.append(np.zeros((1, 2, 3)))
    assert w.count == 7
    with pytest.raises(ValueError, match="closed"):
        w.append(parts[0])
    with patterns.NpyAppender(tmp_path / "s.npy", np.int64) as w:  # scalar rows
        w.append(torch.tensor([3, 1]))
    assert np.load(tmp_path / "s.npy").tolist() == [3, 1]


# ----------------------------------------------------------------------------- bit-packed patterns
def test_pack_patterns_by_hand_and_round_trip():
    eye = np.eye(3)
    # row-major bits 100 010 001 -> bytes 10001000 10000000
    assert patterns.pack_patterns(eye).tolist() == [136, 128]
    assert patterns.packed_size(3) == 2 and patterns.packed_size(14) == 25
    rng = np.random.default_rng(0)
    for n in (1, 3, 8, 14):
        b = rng.random((2, 3, n, n)) < 0.3
        p = patterns.pack_patterns(torch.from_numpy(b))
        assert p.shape == (2, 3, patterns.packed_size(n)) and p.dtype == np.uint8
        np.testing.assert_array_equal(patterns.unpack_patterns(p, n), b.astype(np.uint8))
    with pytest.raises(ValueError, match="packed"):
        patterns.unpack_patterns(np.zeros((2, 3), np.uint8), 14)
    with pytest.raises(ValueError, match="patterns"):
        patterns.pack_patterns(np.zeros((3, 4)))


def test_patterns_round_trip_through_the_packed_store(tmp_path):
    A = torch.rand(5, 2, 1 + 16, 1 + 16).softmax(-1)  # 5 images, 2 heads, CLS + 4 x 4 patches
    bits = patterns.binarize_patterns(A, 1, top=0.05)  # (5, 2, 16, 16) of 0/1
    path = tmp_path / "p.npy"
    with patterns.NpyAppender(path, np.uint8, (patterns.packed_size(16),)) as w:
        for lo, hi in ((0, 2), (2, 5)):  # appended batch by batch
            w.append(patterns.pack_patterns(bits[lo:hi]).reshape(-1, 32))
    assert path.stat().st_size == 128 + 10 * 32  # 10 patterns of 256 bits: 32 bytes each, after the header
    ds = patterns.PackedPatterns(path, 16)
    assert len(ds) == 10
    flat = bits.reshape(10, 16, 16)
    torch.testing.assert_close(ds.rows(torch.arange(10)), flat)
    torch.testing.assert_close(ds.rows([7, 2, 7]), flat[[7, 2, 7]])
    torch.testing.assert_close(ds[3], flat[3])
    with pytest.raises(ValueError, match="indices"):
        ds.rows([10])
    with pytest.raises(ValueError, match="bytes"):
        patterns.PackedPatterns(path, 15)


def test_autoencoder_from_the_packed_file_equals_the_dense_one(tmp_path):
    g = torch.Generator().manual_seed(0)
    dense = (torch.rand(40, 9, 9, generator=g) < 0.2).float()
    path = tmp_path / "p.npy"
    with patterns.NpyAppender(path, np.uint8, (patterns.packed_size(9),)) as w:
        w.append(patterns.pack_patterns(dense))
    ds = patterns.PackedPatterns(path, 9)
    za, la = patterns.pattern_latents(dense, epochs=3, batch_size=16, seed=2)
    zb, lb = patterns.pattern_latents(ds, epochs=3, batch_size=16, seed=2)
    assert la == lb and len(la) == 3
    torch.testing.assert_close(za, zb, rtol=0, atol=0)
    ae, _ = patterns.train_pattern_autoencoder(ds, epochs=3, batch_size=16, seed=2)
    torch.testing.assert_close(patterns.encode_patterns(ae, ds, [5, 1], batch_size=1), za[[5, 1]])
    with pytest.raises(ValueError, match="epochs"):
        patterns.train_pattern_autoencoder(ds, epochs=0)


# ---------------------------------------------------------------------------------------- figures
def _band(ax):
    """(x, lo, hi) of the fill_between band on ``ax``."""
    from matplotlib.collections import PolyCollection

    (poly,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    v = poly.get_paths()[0].vertices
    xs = np.unique(v[:, 0])
    return xs, np.array([v[v[:, 0] == x, 1].min() for x in xs]), np.array([v[v[:, 0] == x, 1].max() for x in xs])


def test_head_importance_band_is_the_std_over_images_per_head():
    # two images, L = 2 layers of h = 3 heads: mean ± population std of two values spans exactly [min, max]
    img1 = np.array([[0.1, 0.5, 0.2], [0.0, 0.3, 0.9]])
    img2 = np.array([[0.3, 0.5, 0.0], [0.4, 0.1, 0.9]])
    rs = heads.RunningStats().update(np.stack([img1, img2]))
    fig = plots.plot_head_importance(rs.mean, "I_prob", rs.std(), current=img1, selected=(1, 2))
    xs, lo, hi = _band(fig.axes[0])
    np.testing.assert_array_equal(xs, np.arange(6))
    np.testing.assert_allclose(lo, np.minimum(img1, img2).reshape(-1), atol=1e-12)
    np.testing.assert_allclose(hi, np.maximum(img1, img2).reshape(-1), atol=1e-12)
    # the old call (values only) still works and draws no band
    from matplotlib.collections import PolyCollection

    old = plots.plot_head_importance(rs.mean, "I_prob")
    assert not [c for c in old.axes[0].collections if isinstance(c, PolyCollection)]
    with pytest.raises(ValueError, match="std"):
        plots.plot_head_importance(rs.mean, "I_prob", rs.std()[:1])
    with pytest.raises(ValueError, match="selected"):
        plots.plot_head_importance(rs.mean, "I_prob", selected=(2, 0))


def test_importance_metrics_and_head_modes_figures():
    rng = np.random.default_rng(0)
    L, h, M = 2, 3, 2
    mean = {k: rng.random((L, h, M)) for k in ("p_pruned", "jsd", "cls", "patch")}
    std = {k: v / 10 for k, v in mean.items()}
    mean["cls"][:] = np.nan  # no CLS token: that column is switched off, not drawn
    fig = plots.plot_importance_metrics(mean, std, (1, 4), selected=(0, 1), unpruned=0.7)
    assert len(fig.axes) == M * 4
    xs, lo, hi = _band(fig.axes[4 + 3])  # mode 4, I_patch
    np.testing.assert_allclose(lo, (mean["patch"][..., 1] - std["patch"][..., 1]).reshape(-1))
    assert not fig.axes[2].axison
    b2 = plots.plot_head_modes({k: v[0, 1] for k, v in mean.items()}, {k: v[0, 1] for k, v in std.items()}, (1, 4))
    bars = [p.get_height() for p in b2.axes[3].patches]
    np.testing.assert_allclose(bars, mean["patch"][0, 1])
    with pytest.raises(ValueError, match="len\\(modes\\)"):
        plots.plot_importance_metrics(mean, std, (1, 2, 4))


def test_pruned_top5_bolds_the_true_class():
    top_p = np.array([[0.5, 0.3, 0.1], [0.6, 0.2, 0.1]])
    top_c = np.array([[2, 0, 1], [0, 2, 1]])
    fig = plots.plot_pruned_top5(top_p, top_c, (1, 4), label=0, class_names=["cat", "dog", "fox"],
                                 unpruned=(np.array([0.7, 0.2, 0.1]), np.array([1, 0, 2])))
    assert len(fig.axes) == 3
    for ax, want in zip(fig.axes, (["dog", "cat", "fox"], ["fox", "cat", "dog"], ["cat", "fox", "dog"])):
        ticks = ax.get_yticklabels()  # top to bottom: most probable first
        assert [t.get_text() for t in ticks] == want
        assert [p.get_width() for p in ax.patches] == sorted((p.get_width() for p in ax.patches), reverse=True)
        assert [t.get_fontweight() for t in ticks if t.get_text() == "cat"] == ["bold"]
        assert all(t.get_fontweight() == "normal" for t in ticks if t.get_text() != "cat")
    with pytest.raises(ValueError, match="top_prob"):
        plots.plot_pruned_top5(top_p, top_c, (1,))


def test_entropy_distribution_is_a_density_with_the_image_marked():
    counts = np.array([0, 2, 6, 2])
    fig = plots.plot_entropy_distribution(counts, current=0.3)
    ax = fig.axes[0]
    y = ax.lines[0].get_ydata()
    np.testing.assert_allclose(y[1:-1], counts / 10 / 0.25)  # density: integrates to 1 over [0, 1]
    assert ax.lines[1].get_xdata()[0] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="counts"):
        plots.plot_entropy_distribution([1, -1])
    with pytest.raises(ValueError, match="edges"):
        plots.plot_entropy_distribution([1, 2], edges=[0, 1])


def test_threshold_two_axes_and_histogram_by_hand():
    v = np.arange(100.0)
    assert plots.attention_threshold(v, 0.01) == 99 and plots.attention_threshold(v, 0.05) == 95
    assert plots.attention_threshold(v, 0.001) == 99  # at least one entry
    # a 4-token map (CLS + 3 patches): the top 3 of 16 entries are CLS->CLS, patch 2->patch 1, patch 1->CLS
    A = np.full((4, 4), 0.01)
    A[0, 0], A[2, 1], A[1, 0] = 0.9, 0.8, 0.7
    fig = plots.plot_two_axes(A, 1, top=3 / 16)
    from matplotlib.collections import LineCollection

    segs = {lc.get_label(): sorted((int(s[0, 0]), int(s[1, 0])) for s in lc.get_segments())
            for lc in fig.axes[0].collections if isinstance(lc, LineCollection)}
    assert segs == {"A_cls": [(0, 0), (1, 0)], "A_patch": [(2, 1)]}
    hist = plots.plot_threshold_histogram(A, top=3 / 16)
    assert hist.axes[0].lines[0].get_xdata()[0] == pytest.approx(0.7)
    assert sum(p.get_height() for p in hist.axes[0].patches) == 16


def test_pattern_density_marks_the_selected_head():
    rng = np.random.default_rng(0)
    emb = np.concatenate([rng.normal(0, 0.3, (50, 2)), rng.normal(5, 0.3, (50, 2))])
    fig = plots.plot_pattern_density(emb, emb[:4], np.array([0, 0, 1, 1]), highlight=2)
    ax = fig.axes[0]
    ring = [c for c in ax.collections if c.get_label() == "selected head"]
    np.testing.assert_allclose(ring[0].get_offsets()[0], emb[2])
    with pytest.raises(ValueError, match="highlight"):
        plots.plot_pattern_density(emb, emb[:4], np.arange(4), highlight=4)
