"""Paper 003 (docs/math.md §9): MAD, k-hop strength and entropy, pruning and head importance, patterns."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitpatch import analysis

GRID = (14, 14)


def _uniform(n=196, P=0):
    return torch.full((1, 2, P + n, P + n), 1.0 / (P + n), dtype=torch.float64)


# ------------------------------------------------------------------------------- SPEC test vectors
def test_spec_vectors_uniform_and_identity():
    U = _uniform()
    I = torch.eye(196, dtype=torch.float64)[None, None].expand(1, 2, 196, 196)
    mad = analysis.mean_attention_distance(U, GRID, 16)
    assert mad.shape == (1, 2)
    assert float(mad[0, 0]) == pytest.approx(116.49, abs=0.005)
    assert float(analysis.mean_attention_distance(I, GRID, 16).abs().max()) == 0
    s = analysis.khop_strength(U, GRID)
    assert s.shape == (1, 2, 14)
    torch.testing.assert_close(s, torch.full_like(s, 1 / 196))
    torch.testing.assert_close(analysis.strength_entropy(s), torch.ones(1, 2, dtype=torch.float64))
    sI = analysis.khop_strength(I, GRID)
    assert float(sI[..., 0].min()) == 1 and float(sI[..., 1:].abs().max()) == 0
    assert float(analysis.strength_entropy(sI).abs().max()) == 0
    assert float(analysis.focus_index(I).abs().max()) == 0


def test_ring_counts():
    have = (analysis.ring_sizes(GRID) > 0).sum(0).tolist()
    assert have == [196] * 8 + [192, 180, 160, 132, 96, 52]
    # ring sizes of the centre-ish patch (7, 7): 1, 8, 16, ... until the border cuts them
    assert analysis.ring_sizes(GRID)[7 * 14 + 7, :4].tolist() == [1, 8, 16, 24]


def test_khop_and_mad_match_definition_on_random_maps():
    P, grid = 1, (3, 5)
    n = 15
    A = (2 * torch.randn(2, 3, P + n, P + n, dtype=torch.float64)).softmax(-1)
    Ap = A[..., P:, P:]
    pos = [(p // 5, p % 5) for p in range(n)]
    K = 5
    ref = torch.zeros(2, 3, K, dtype=torch.float64)
    for k in range(K):
        vals = []
        for u in range(n):
            ring = [v for v in range(n) if max(abs(pos[u][0] - pos[v][0]), abs(pos[u][1] - pos[v][1])) == k]
            if ring:
                vals.append(Ap[..., u, ring].mean(-1))
        ref[..., k] = torch.stack(vals, -1).mean(-1)
    torch.testing.assert_close(analysis.khop_strength(A, grid, P), ref)
    dist = torch.tensor([[math.dist(a, b) for b in pos] for a in pos], dtype=torch.float64)
    torch.testing.assert_close(analysis.mean_attention_distance(A, grid, 8, P), (Ap * dist * 8).sum(-1).mean(-1))
    # more leading dims
    A5 = A[:, None].expand(2, 4, 3, P + n, P + n)
    assert analysis.khop_strength(A5, grid, P).shape == (2, 4, 3, K)
    assert analysis.mean_attention_distance(A5, grid, 8, P).shape == (2, 4, 3)


def test_metric_bad_input():
    U = _uniform()
    with pytest.raises(ValueError, match="grid"):
        analysis.khop_strength(U, (10, 10))
    with pytest.raises(ValueError, match="attn is not a probability map"):
        analysis.khop_strength(U * 3, GRID)
    with pytest.raises(ValueError, match="attn must have shape"):
        analysis.mean_attention_distance(U[0], GRID, 16)
    with pytest.raises(ValueError, match="patch_size"):
        analysis.mean_attention_distance(U, GRID, 0)
    with pytest.raises(ValueError, match="strength"):
        analysis.strength_entropy(torch.ones(3, 1))
    with pytest.raises(ValueError, match="strength"):
        analysis.strength_entropy(-torch.ones(3, 4))


# ----------------------------------------------------------------------------------- pruning
@pytest.fixture(scope="module")
def vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, num_classes=6).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_region_masks():
    N, P = 5, 1
    r = {m: analysis.region_mask(m, N, P) for m in range(6)}
    assert not r[0].any() and r[1].all()
    assert r[2].sum() == 1 and r[2][0, 0]
    assert r[3].sum() == 2 * (N - 1) and r[3][0, 1:].all() and r[3][1:, 0].all() and not r[3][0, 0]
    assert r[4].sum() == (N - 1) ** 2 and r[4][1:, 1:].all()
    assert torch.equal(r[5], r[2] | r[3])
    assert torch.equal(r[2] | r[3] | r[4], r[1])
    with pytest.raises(ValueError, match="modes"):
        analysis.region_mask(6, N, P)


def test_batched_pruning_equals_plain_loop(vit, images):
    modes = (0, 1, 2, 3, 4, 5)
    labels = torch.tensor([0, 3, 5])
    fast = analysis.head_importance(vit, images, labels, modes=modes, max_batch=7)  # several chunks per block
    slow = analysis.head_importance_loop(vit, images, labels, modes=modes)
    for k in ("prob", "jsd", "cls", "patch", "p_pruned"):
        a, b = getattr(fast, k), getattr(slow, k)
        assert a.shape == (3, 3, 3, 6)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert fast.modes == modes and fast.labels.tolist() == [0, 3, 5]
    # the top-5 predictions under pruning (Fig. 1 B3) are kept, most probable first, equal in both versions
    assert fast.top5_prob.shape == (3, 3, 3, 6, 5) and torch.equal(fast.top5_class, slow.top5_class)
    torch.testing.assert_close(fast.top5_prob, slow.top5_prob, rtol=0, atol=1e-6)
    assert bool((fast.top5_prob[..., :-1] >= fast.top5_prob[..., 1:]).all())
    p0 = vit(images).double().softmax(-1)
    assert torch.equal(fast.top5_class0, p0.topk(5, -1).indices) and torch.equal(fast.pred, p0.argmax(-1))
    # mode 0 prunes nothing: its top-5 is the unpruned one
    assert torch.equal(fast.top5_class[..., 0, :], fast.top5_class0[:, None, None].expand(3, 3, 3, 5))
    # mode 0 prunes nothing
    assert float(fast.prob[..., 0].abs().max()) < 1e-6 and float(fast.patch[..., 0].abs().max()) < 1e-6
    # JSD within [0, ln 2]; something actually changes in mode 1
    assert float(fast.jsd.min()) >= 0 and float(fast.jsd.max()) <= math.log(2)
    assert float(fast.jsd[..., 1].max()) > 1e-6 and float(fast.patch[..., 1].min()) > 0
    # I_prob definition with the unpruned argmax as y
    nolab = analysis.head_importance(vit, images, modes=(1,))
    assert torch.equal(nolab.labels, vit(images).argmax(-1))


def _reference_logits(vit, images, block, zero_fn):
    """Logits with a forward hook on block ``block``'s attention module replacing its output."""
    attn = vit.blocks[block].attn
    h = attn.register_forward_hook(lambda m, a, out: zero_fn(m, a, out))
    try:
        with torch.no_grad():
            return vit(images)
    finally:
        h.remove()


def test_mode1_is_zeroing_the_heads_branch(vit, images):
    res = analysis.head_importance(vit, images, modes=(1,))
    p0 = vit(images).double().softmax(-1)
    y = res.labels
    h, d = 3, vit.blocks[0].attn.head_dim
    for l in range(3):
        for j in range(h):
            # zero head j's slice of the projection input: its output is 0 everywhere
            proj = vit.blocks[l].attn.proj

            def pre(_m, args, j=j):
                x = args[0].clone()
                x[..., j * d:(j + 1) * d] = 0
                return (x,)
            hk = proj.register_forward_pre_hook(pre)
            try:
                with torch.no_grad():
                    q = vit(images).double().softmax(-1)
            finally:
                hk.remove()
            ref = p0.gather(1, y[:, None])[:, 0] - q.gather(1, y[:, None])[:, 0]
            torch.testing.assert_close(res.prob[:, l, j, 0], ref, rtol=0, atol=1e-5)
            torch.testing.assert_close(res.jsd[:, l, j, 0], analysis.js_divergence(p0, q), rtol=0, atol=1e-6)


def test_mode1_of_every_head_zeroes_the_attention_branch(vit, images):
    import copy

    from vitpatch.analysis.pruning import _pruning_hook, _unfused

    m = copy.deepcopy(vit)
    l = 1
    torch.nn.init.zeros_(m.blocks[l].attn.proj.bias)  # branch output = proj(0) = bias
    hooks = [_pruning_hook(m.blocks[l].attn, [j], [1], m.num_prefix_tokens) for j in range(3)]
    try:
        with _unfused(m), torch.no_grad():
            pruned = m(images)
    finally:
        for hk in hooks:
            hk.remove()
    zero = _reference_logits(m, images, l, lambda mod, a, out: torch.zeros_like(out))
    torch.testing.assert_close(pruned, zero, rtol=0, atol=1e-5)


def test_pruning_on_window_attention_model(images):
    import timm

    from vitpatch import WindowMask
    from vitpatch.nn import WindowAttention

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=4,
                          attn_layer=WindowAttention).eval()
    wins = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]]).expand(3, 4, 4)
    mask = WindowMask(wins, (2, 2), 1)
    fast = analysis.head_importance(m, images, modes=(1, 4), attn_mask=mask)
    slow = analysis.head_importance_loop(m, images, modes=(1, 4), attn_mask=mask)
    for k in ("prob", "jsd", "cls", "patch"):
        torch.testing.assert_close(getattr(fast, k), getattr(slow, k), rtol=0, atol=1e-6)
    assert float(fast.patch.max()) > 0


def test_head_importance_bad_input(vit, images):
    with pytest.raises(ValueError, match="modes"):
        analysis.head_importance(vit, images, modes=(7,))
    with pytest.raises(ValueError, match="modes"):
        analysis.head_importance(vit, images, modes=())
    with pytest.raises(ValueError, match="labels"):
        analysis.head_importance(vit, images, labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="labels must be class indices"):
        analysis.head_importance(vit, images, labels=torch.tensor([1, 2, 6]))  # 6 classes: 0..5
    with pytest.raises(ValueError, match="images"):
        analysis.head_importance(vit, images[0])
    with pytest.raises(ValueError, match="VisionTransformer"):
        analysis.head_importance(torch.nn.Sequential(torch.nn.Linear(2, 2)), images)


def test_js_divergence_bounds():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.7, 0.3]])
    j = analysis.js_divergence(p, q)
    assert float(j[0]) == pytest.approx(math.log(2)) and float(j[1]) == 0
    assert 0 < float(j[2]) < math.log(2)


# ----------------------------------------------------------------------------------- patterns
def test_patterns_and_context_masks(vit, images):
    A = next(iter(analysis.attention_maps(vit, images)))  # (3, 3, 5, 5) with CLS
    c = analysis.cls_patterns(A, 1)
    assert c.shape == (3, 3, 5 + 4)
    torch.testing.assert_close(c[..., :5], A[..., 0, :])
    torch.testing.assert_close(c[..., 5:], A[..., 1:, 0])
    b = analysis.binarize_patterns(A, 1, top=0.25)
    assert b.shape == (3, 3, 4, 4) and b.sum((-1, -2)).unique().tolist() == [4.0]
    Ap = A[..., 1:, 1:].reshape(3, 3, 16)
    kth = Ap.topk(4, -1).values[..., -1:]
    assert bool(((Ap >= kth).float() == b.reshape(3, 3, 16)).all())
    cm = analysis.context_masks(A, (2, 2), 1, patch=2)
    assert set(cm) == {"cls_to_patches", "patches_to_cls", "patch_row", "patch_col"}
    torch.testing.assert_close(cm["patch_row"].reshape(3, 3, 4), A[..., 3, 1:])
    torch.testing.assert_close(cm["patch_col"].reshape(3, 3, 4), A[..., 1:, 3])
    with pytest.raises(ValueError, match="patch"):
        analysis.context_masks(A, (2, 2), 1, patch=4)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        analysis.cls_patterns(A, 0)


def test_autoencoder_learns_and_tsne_shapes():
    g = torch.Generator().manual_seed(0)
    # two kinds of 14 x 14 patterns: diagonal bands and one hot column
    diag = torch.eye(14).expand(12, 14, 14).clone()
    col = torch.zeros(12, 14, 14)
    col[..., 3] = 1
    pats = torch.cat([diag, col]) * (torch.rand(24, 14, 14, generator=g) > 0.1)
    ae = analysis.PatternAutoencoder(14)
    assert ae(pats[:2]).shape == (2, 1, 14, 14) and ae.encode(pats[:2]).shape == (2, 64)
    assert analysis.PatternAutoencoder(13)(torch.zeros(1, 13, 13)).shape == (1, 1, 13, 13)
    lat, losses = analysis.pattern_latents(pats, epochs=30, batch_size=8)
    assert lat.shape == (24, 64) and losses[-1] < 0.5 * losses[0]
    emb = analysis.tsne(lat, seed=0)
    assert emb.shape == (24, 2) and np.isfinite(emb).all()
    # the two kinds separate in the 2-D embedding
    a, b = emb[:12].mean(0), emb[12:].mean(0)
    spread = max(emb[:12].std(0).max(), emb[12:].std(0).max())
    assert np.linalg.norm(a - b) > spread


def test_layer_strengths_streams(vit, images):
    res = analysis.layer_strengths(analysis.attention_maps(vit, images), (2, 2), 16, 1)
    assert res.strength.shape == (3, 3, 3, 2) and res.entropy.shape == res.mad.shape == (3, 3, 3)
    maps = list(analysis.attention_maps(vit, images))
    torch.testing.assert_close(res.strength[:, 2], analysis.khop_strength(maps[2], (2, 2), 1))
