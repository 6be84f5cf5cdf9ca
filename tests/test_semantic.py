"""Paper 002 (docs/math.md §8): SIFT counts, attended sets, theta, KK/NK, focus index, mask as prompt, guided MAE masks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitpatch import analysis

cv2 = pytest.importorskip("cv2", reason='SIFT needs the "semantic" extra (in the "test" extra too)')


def _softmax_map(B, h, N, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    return (sharp * torch.randn(B, h, N, N, generator=g, dtype=torch.float64)).softmax(-1)


# --------------------------------------------------------------------------------------- SIFT
def _blobs(size, centres, radius=4):
    img = np.full((size, size, 3), 128, np.uint8)
    for x, y in centres:
        cv2.circle(img, (x, y), radius, (255, 255, 255), -1)
    return img


def test_sift_counts_land_in_the_blob_patches():
    # three bright discs on a flat background: SIFT fires only at their centres (any orientations)
    centres = [(24, 24), (72, 40), (40, 72)]
    img = _blobs(96, centres)[None]
    counts = analysis.keypoint_counts(img, 16)
    assert counts.shape == (1, 36) and counts.dtype == torch.int64
    expected = {(y // 16) * 6 + x // 16 for x, y in centres}
    assert set(torch.nonzero(counts[0]).flatten().tolist()) == expected
    pts = analysis.sift_keypoints(img)[0]
    assert int(counts.sum()) == len(pts) > 0
    # channels-first input gives the same counts; a flat image none
    assert torch.equal(analysis.keypoint_counts(np.transpose(img, (0, 3, 1, 2)), 16), counts)
    assert int(analysis.keypoint_counts(np.full((1, 64, 64, 3), 128, np.uint8), 16).sum()) == 0


def test_sift_counts_clip_to_the_grid():
    # a 72 px image with 16 px patches has a 4 x 4 grid; a disc at x = 68 lies past it and is clipped to column 3
    img = _blobs(72, [(66, 20)], radius=3)[None]
    counts = analysis.keypoint_counts(img, 16).reshape(4, 4)
    assert counts.sum() > 0 and counts[1, 3] == counts.sum()


def test_sift_bad_input():
    with pytest.raises(TypeError, match="images must be uint8"):
        analysis.keypoint_counts(np.zeros((1, 32, 32, 3), np.float32), 16)
    with pytest.raises(ValueError, match="images must have shape"):
        analysis.keypoint_counts(np.zeros((32, 32, 3), np.uint8), 16)
    with pytest.raises(ValueError, match="patch_size"):
        analysis.keypoint_counts(np.zeros((1, 32, 32, 3), np.uint8), 0)


def test_missing_opencv_names_the_extra(monkeypatch):
    import builtins

    from vitpatch.analysis import semantic

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "cv2":
            raise ImportError("no cv2")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[semantic\]"'):
        semantic.keypoint_counts(np.zeros((1, 32, 32, 3), np.uint8), 16)


# ------------------------------------------------------------------------------ attended sets, theta
def _brute_theta(A, t, P, gamma, weighted):
    Ap = A[..., P:, P:]
    n = Ap.shape[-1]
    out = torch.full(Ap.shape[:-1], float("nan"), dtype=torch.float64)
    for idx in np.ndindex(*Ap.shape[:-1]):
        row = Ap[idx]
        S = [j for j in range(n) if row[j] >= gamma * row.sum() / n]
        tt = t[idx[0]]
        if not S:
            continue
        key = [j for j in S if tt[j] > 0]
        non = [j for j in S if tt[j] == 0]
        if weighted:
            K = sum(float(tt[j]) for j in key)
            out[idx] = K / (len(non) + K)
        else:
            out[idx] = len(key) / len(S)
    return out


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("gamma", [1.0, 0.5, 2.5, 13.0])
def test_interrelation_matches_definition(weighted, gamma):
    P, gh, gw = 1, 3, 4
    A = _softmax_map(2, 3, P + gh * gw, seed=3)
    t = torch.tensor([[0, 2, 0, 1, 0, 0, 3, 0, 0, 1, 0, 0], [1] * 6 + [0] * 6])
    theta = analysis.interrelation(A, t, P, gamma=gamma, weighted=weighted)
    assert theta.shape == (2, 3, 12)
    ref = _brute_theta(A, t, P, gamma, weighted)
    torch.testing.assert_close(theta, ref, equal_nan=True, rtol=0, atol=1e-12)
    if gamma > 12:
        assert torch.isnan(theta).all()  # gamma > n: no entry reaches gamma * mean, every S_i is empty


def test_attended_set_uniform_and_self_exclusion():
    A = torch.full((1, 1, 10, 10), 0.1, dtype=torch.float64)
    assert bool(analysis.attended_sets(A).all())
    S = analysis.attended_sets(A, include_self=False)
    assert int(S.sum()) == 90 and not bool(S[0, 0].diagonal().any())


def test_interrelation_summary_and_leading_dims():
    P, n = 1, 6
    A = _softmax_map(2, 2, P + n, seed=5).unsqueeze(1).expand(2, 3, 2, P + n, P + n)  # (B, L, h, N, N)
    t = torch.tensor([[1, 0, 2, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    theta = analysis.interrelation(A, t, P)
    assert theta.shape == (2, 3, 2, n)
    s = analysis.interrelation_summary(theta, t)
    key = t[0] > 0
    kk = theta[0][..., key].nanmean(-1)
    nk = theta[0][..., ~key].nanmean(-1)
    torch.testing.assert_close(s.KK[0], kk)
    torch.testing.assert_close(s.NK[0], nk)
    torch.testing.assert_close(s.KN, 1 - s.KK, equal_nan=True)
    torch.testing.assert_close(s.NN, 1 - s.NK, equal_nan=True)
    assert torch.isnan(s.KK[1]).all()  # no keypoint patch in image 1
    # an image without keypoints has theta 0 everywhere (nothing key in any S_i)
    assert float(theta[1].abs().max()) == 0


# -------------------------------------------------------------------------------------- focus index
def test_focus_index_vectors():
    n = 196
    I = torch.eye(n)[None, None]
    assert float(analysis.focus_index(I).abs().max()) == 0  # one-hot rows: AFI 0
    U = torch.full((1, 2, n, n), 1.0 / n)
    torch.testing.assert_close(analysis.focus_index(U), torch.full((1, 2), math.log(n), dtype=torch.float64))
    torch.testing.assert_close(analysis.focus_index(U, variant="literal"),
                               torch.full((1, 2), math.log(n), dtype=torch.float64))
    # broader rows score higher
    sharp, flat = _softmax_map(1, 1, 50, sharp=6.0), _softmax_map(1, 1, 50, sharp=0.5)
    assert float(analysis.focus_index(flat)) > float(analysis.focus_index(sharp))


def test_focus_index_matches_definition_with_prefix():
    P = 1
    A = _softmax_map(1, 2, 1 + 9, seed=7)
    Ap = A[..., P:, P:]
    m = (Ap - Ap.amin(-1, keepdim=True)) / (Ap.amax(-1, keepdim=True) - Ap.amin(-1, keepdim=True))
    p = m / m.sum(-1, keepdim=True)
    ref = -(torch.special.xlogy(p, p)).sum(-1).mean(-1)
    torch.testing.assert_close(analysis.focus_index(A, P), ref)
    lit = -(torch.special.xlogy(m, m)).sum(-1).mean(-1)
    torch.testing.assert_close(analysis.focus_index(A, P, variant="literal"), lit)


# -------------------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    A = _softmax_map(1, 2, 5)
    t = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="gamma"):
        analysis.interrelation(A, t, 1, gamma=0.0)
    with pytest.raises(ValueError, match="gamma"):
        analysis.interrelation(A, t, 1, gamma=-1.0)
    with pytest.raises(ValueError, match="attn is not a probability map"):
        analysis.interrelation(torch.randn(1, 2, 5, 5), t, 1)
    with pytest.raises(ValueError, match="attn is not a probability map"):
        analysis.focus_index(A * 2)
    with pytest.raises(ValueError, match="attn must have shape"):
        analysis.focus_index(A[0])
    with pytest.raises(ValueError, match="attn must be square"):
        analysis.focus_index(A[..., :4])
    with pytest.raises(ValueError, match="counts has 3 patches"):
        analysis.interrelation(A, t[:, :3], 1)
    with pytest.raises(ValueError, match="counts has batch"):
        analysis.interrelation(A, t.repeat(2, 1), 1)
    with pytest.raises(ValueError, match="variant"):
        analysis.focus_index(A, variant="entropy")
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        analysis.focus_index(A, num_prefix_tokens=-1)


# ------------------------------------------------------------------------------------ guided MAE mask
def test_guided_mask_counts_and_mae_layout():
    g = torch.Generator().manual_seed(0)
    B, n = 4, 196
    counts = torch.zeros(B, n, dtype=torch.long)
    counts[0, :60] = 1          # plenty of both
    counts[1, :5] = 3           # few keypoint patches: n_key capped at 5
    counts[2, :] = 1            # no non-keypoint patch: all masked ones are keypoint patches
    counts[3, :150] = 2         # only 46 non-keypoint patches for 98 - round(98 * 0.3) = 69: take more keys
    mask, ids_shuffle, ids_restore = analysis.guided_mae_mask(counts, ratio=0.5, beta=0.3, generator=g)
    key = counts > 0
    assert mask.dtype == torch.bool and mask.shape == (B, n)
    assert mask.sum(1).tolist() == [98] * B
    assert (mask & key).sum(1).tolist() == [29, 5, 98, 98 - 46]
    # MAE convention: kept patches first, ids_restore undoes the shuffle, mask = gather of [0.., 1..]
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(n).expand(B, n))
    assert not bool(torch.gather(mask, 1, ids_shuffle[:, :n - 98]).any())
    assert bool(torch.gather(mask, 1, ids_shuffle[:, n - 98:]).all())
    mae = torch.ones(B, n)
    mae[:, :n - 98] = 0
    assert torch.equal(torch.gather(mae, 1, ids_restore).bool(), mask)


def test_guided_mask_is_random_within_sets_and_seeded():
    counts = torch.zeros(1, 100, dtype=torch.long)
    counts[0, :50] = 1
    a = analysis.guided_mae_mask(counts, 0.5, 0.2, torch.Generator().manual_seed(1))[0]
    b = analysis.guided_mae_mask(counts, 0.5, 0.2, torch.Generator().manual_seed(1))[0]
    c = analysis.guided_mae_mask(counts, 0.5, 0.2, torch.Generator().manual_seed(2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    hits = torch.zeros(100)
    for s in range(200):
        hits += analysis.guided_mae_mask(counts, 0.5, 0.2, torch.Generator().manual_seed(s))[0][0]
    # each keypoint patch is masked with prob 10/50, each other with 40/50
    assert abs(float(hits[:50].mean()) / 200 - 0.2) < 0.03 and abs(float(hits[50:].mean()) / 200 - 0.8) < 0.03


def test_curriculum():
    assert [analysis.curriculum_beta(e) for e in (0, 9, 10, 19, 20, 35, 40, 49, 50, 400)] == \
        pytest.approx([0.1, 0.1, 0.2, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5])
    counts = torch.zeros(1, 100, dtype=torch.long)
    counts[0, :40] = 1
    keys = [int((analysis.guided_mae_mask(counts, 0.5, analysis.curriculum_beta(e))[0] & (counts > 0)).sum())
            for e in (0, 10, 20, 30, 40)]
    assert keys == [5, 10, 15, 20, 25]
    with pytest.raises(ValueError, match="epoch"):
        analysis.curriculum_beta(-1)
    with pytest.raises(ValueError, match="ratio"):
        analysis.guided_mae_mask(counts, ratio=1.5)
    with pytest.raises(ValueError, match="beta"):
        analysis.guided_mae_mask(counts, beta=-0.1)
    with pytest.raises(ValueError, match="counts must have shape"):
        analysis.guided_mae_mask(counts[0])


# ----------------------------------------------------------------------- streamed layers, mask as prompt
@pytest.fixture(scope="module")
def tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3, num_classes=4).eval()


def test_layer_semantics_streams_and_matches_per_layer(tiny_vit):
    x = torch.randn(2, 3, 64, 64)
    counts = torch.randint(0, 3, (2, 16))
    res = analysis.layer_semantics(analysis.attention_maps(tiny_vit, x), counts, 1)
    maps = list(analysis.attention_maps(tiny_vit, x))
    assert res.KK.shape == res.AFI.shape == (2, 3, 3)
    for l, A in enumerate(maps):
        s = analysis.interrelation_summary(analysis.interrelation(A, counts, 1), counts)
        torch.testing.assert_close(res.NK[:, l], s.NK)
        torch.testing.assert_close(res.AFI[:, l], analysis.focus_index(A, 1))
    theta = torch.stack([analysis.interrelation(A, counts, 1) for A in maps], 1)
    torch.testing.assert_close(res.theta_mean, theta.mean((1, 2)))


def test_mask_patches_and_prompt_accuracy(tiny_vit):
    score = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0]])
    assert analysis.mask_patches(score, 0.5, "top").tolist() == [[False, True, True, False], [True, True, False, False]]
    assert analysis.mask_patches(score, 0.5, "bottom").tolist() == [[True, False, False, True], [False, False, True, True]]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 64, 64, generator=g)
    y = torch.tensor([0, 1, 2, 3])
    counts = torch.randint(0, 2, (4, 16), generator=g)
    out = analysis.mask_prompt_accuracy(tiny_vit, [(x[:2], y[:2], counts[:2]), (x[2:], y[2:], counts[2:])],
                                        ratios=(0.0, 0.25), modes=("pixel", "drop_tokens"))
    pred = tiny_vit(x).argmax(-1)
    plain = float((pred == y).double().mean())
    for m in ("pixel", "drop_tokens"):
        assert out[m]["images"] == 4 and out[m]["unmasked"] == pytest.approx(plain)
        # ratio 0 masks nothing: the unmasked accuracy
        assert out[m]["top"][0] == pytest.approx(plain) and out[m]["bottom"][0] == pytest.approx(plain)
    # drop_tokens with a mask equals a forward over the kept tokens (the same model on fewer tokens)
    from vitpatch.analysis.semantic import _masked_logits

    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, 3] = True
    full = tiny_vit.patch_embed(x)
    full = tiny_vit._pos_embed(full)
    keep = torch.cat([full[:, :4], full[:, 5:]], 1)
    ref = tiny_vit.forward_head(tiny_vit.norm(tiny_vit.blocks(keep)))
    torch.testing.assert_close(_masked_logits(tiny_vit, x, mask, "drop_tokens"), ref)
    px = _masked_logits(tiny_vit, x, mask, "pixel")
    xm = x.clone()
    xm[:, :, 0:16, 48:64] = 0
    torch.testing.assert_close(px, tiny_vit(xm))
    with pytest.raises(ValueError, match="modes"):
        analysis.mask_prompt_accuracy(tiny_vit, [(x, y, counts)], modes=("blur",))
