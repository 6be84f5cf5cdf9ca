"""vitpatch.analysis core: attention maps, U (docs/math.md §2), windows (§3), DIP (§4), responsive field (§5), EO."""
from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn

from vitpatch import WindowMask, analysis, masks, reference
from vitpatch.analysis.windows import round_half_up

from _helpers import random_windows


# ------------------------------------------------------------------------------------------ helpers
def random_maps(L, B, h, N, generator=None):
    """L layers of row-stochastic (B, h, N, N) maps, float64."""
    return [torch.softmax(torch.randn(B, h, N, N, generator=generator, dtype=torch.float64) * 3, -1)
            for _ in range(L)]


def direct_uncertainty(maps, P):
    """eq. 2-3 straight from the definitions on the stacked (L, B, h, n, n) maps (numpy)."""
    A = np.stack([m.numpy() for m in maps])[:, :, :, P:, P:]
    U1 = ((A - A.mean(0, keepdims=True)) ** 2).mean(0)          # eq. 2: variance over layers
    return ((U1 - U1.mean(1, keepdims=True)) ** 2).mean(1)       # eq. 3: variance over heads


def loop_windows(U, alpha, grid):
    """eq. 4 with an explicit top-T selection: sort (value desc, flat index asc), loop over patches."""
    gh, gw = grid
    out = []
    for u in U:
        n = u.shape[0]
        T = round_half_up(alpha * n * n)
        entries = sorted(((-float(u[p, i]), p * n + i) for p in range(n) for i in range(n)))
        chosen = {flat for _, flat in entries[:T]}
        rows = []
        for p in range(n):
            members = [p] + [i for i in range(n) if p * n + i in chosen]
            xs = [m % gw for m in members]
            ys = [m // gw for m in members]
            rows.append([min(xs), min(ys), max(xs), max(ys)])
        out.append(rows)
    return torch.tensor(out)


def loop_keep(U, beta):
    out = []
    for u in U.numpy():
        n = u.shape[0]
        v = [float(np.mean((u[:, p] - u[:, p].mean()) ** 2)) for p in range(n)]
        drop = sorted(range(n), key=lambda p: (v[p], p))[:round_half_up(beta * n)]
        out.append([p not in drop for p in range(n)])
    return torch.tensor(out)


def loop_field(windows, keep, grid):
    gh, gw = grid
    sizes, tends, raws = [], [], []
    for w_img, k_img in zip(windows.tolist(), keep.tolist()):
        s_row, t_row, r_row = [], [], []
        for p, (xl, yt, xr, yb) in enumerate(w_img):
            S = {p} | {i for i in range(gh * gw) if xl <= i % gw <= xr and yt <= i // gw <= yb and k_img[i]}
            xs, ys = [i % gw for i in S], [i // gw for i in S]
            xp, yp = p % gw, p // gw
            R = ((max(xs) - xp) - (xp - min(xs)), (max(ys) - yp) - (yp - min(ys)))
            norm = math.hypot(*R)
            s_row.append(len(S))
            r_row.append(R)
            t_row.append((R[0] / norm, R[1] / norm) if norm else (0.0, 0.0))
        sizes.append(s_row)
        tends.append(t_row)
        raws.append(r_row)
    return torch.tensor(sizes), torch.tensor(tends), torch.tensor(raws)


def tiny_vit(**kw):
    import timm

    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


# --------------------------------------------------------------------------------------- §2: U
def test_uncertainty_hand_checked():
    # one image, two heads, two patches, two layers, no prefix
    eye, swap = torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    layer1 = torch.stack([eye, eye])[None]   # head 0: identity, head 1: identity
    layer2 = torch.stack([swap, eye])[None]  # head 0 changes, head 1 does not
    # eq. 2: head 0 variance 0.25 everywhere, head 1 zero; eq. 3: variance over heads = 0.125^2
    U = analysis.uncertainty([layer1, layer2], 0)
    assert U.shape == (1, 2, 2)
    torch.testing.assert_close(U, torch.full((1, 2, 2), 0.015625, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("P", [0, 1, 3])
def test_uncertainty_matches_stacked_computation(P):
    g = torch.Generator().manual_seed(1)
    maps = random_maps(5, 2, 3, P + 12, g)
    expected = direct_uncertainty(maps, P)
    from_list = analysis.uncertainty(maps, P)
    from_tensor = analysis.uncertainty(torch.stack(maps), P)
    from_gen = analysis.uncertainty((m for m in maps), P)
    assert from_list.shape == (2, 12, 12)
    for U in (from_list, from_tensor, from_gen):
        np.testing.assert_allclose(U.numpy(), expected, rtol=1e-10, atol=1e-18)
    # float32 maps, float32 accumulation: same U to float32 precision
    U32 = analysis.uncertainty([m.float() for m in maps], P, dtype=torch.float32)
    np.testing.assert_allclose(U32.double().numpy(), expected, rtol=2e-3, atol=1e-9)


def test_uncertainty_single_layer_is_zero():
    U = analysis.uncertainty(random_maps(1, 1, 2, 5), 1)
    assert torch.equal(U, torch.zeros(1, 4, 4, dtype=torch.float64))


def test_uncertainty_streams_without_keeping_layers():
    """Each layer can be freed once the next one is requested: U never stacks the L layers."""
    alive = []

    def layers():
        g = torch.Generator().manual_seed(2)
        for k in range(6):
            # every layer but the previous one (still bound to the caller's loop variable) must be gone;
            # CPython frees a tensor as soon as its last reference goes, so no gc pass is needed
            assert sum(r() is not None for r in alive) <= 1, f"layer {k}: earlier layers are still referenced"
            m = random_maps(1, 1, 2, 7, g)[0]
            alive.append(weakref.ref(m))
            yield m

    analysis.uncertainty(layers(), 1)


@pytest.mark.parametrize("bad, match", [
    (lambda: [torch.rand(2, 3, 5)], "maps"),                     # a layer of wrong rank
    (lambda: torch.rand(2, 3, 5, 5), "maps"),                    # one tensor that is not (L, B, h, N, N)
    (lambda: [torch.rand(1, 2, 5, 4)], "maps"),                  # not square
    (lambda: [torch.rand(1, 2, 5, 5), torch.rand(1, 2, 6, 6)], "maps"),  # inconsistent layers
    (lambda: [], "maps"),                                        # no layer
    (lambda: [torch.rand(1, 2, 1, 1)], "num_prefix_tokens"),     # no patch left
])
def test_uncertainty_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        analysis.uncertainty(bad(), 1)


def test_uncertainty_bad_prefix_and_type():
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        analysis.uncertainty([torch.rand(1, 1, 3, 3)], -1)
    with pytest.raises(TypeError, match="maps"):
        analysis.uncertainty(3, 0)
    with pytest.raises(TypeError, match="maps"):
        analysis.uncertainty([torch.ones(1, 1, 3, 3, dtype=torch.long)], 0)


# ----------------------------------------------------------------------------------- §3: windows
def test_windows_hand_checked():
    grid = (2, 2)  # patches 0 (0,0), 1 (1,0), 2 (0,1), 3 (1,1)
    U = torch.zeros(4, 4, dtype=torch.float64)
    U[0, 3], U[2, 1], U[1, 1] = 5.0, 4.0, 3.0
    w = analysis.adaptive_windows(U, 2 / 16, grid)  # T = 2: (0, 3) and (2, 1)
    assert w.tolist() == [[0, 0, 1, 1], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]]
    # all ties: the two lowest flat indices, (0, 0) and (0, 1), are chosen
    w = analysis.adaptive_windows(torch.zeros(4, 4), 2 / 16, grid)
    assert w.tolist() == [[0, 0, 1, 0], [1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 1]]


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("grid", [(3, 5), (4, 4), (1, 6)])
def test_windows_match_loop_with_ties(alpha, grid):
    g = torch.Generator().manual_seed(3)
    n = grid[0] * grid[1]
    U = torch.randint(0, 4, (2, n, n), generator=g).double()  # many equal values: tie-breaking matters
    w = analysis.adaptive_windows(U, alpha, grid)
    assert w.shape == (2, n, 4)
    assert torch.equal(w, loop_windows(U, alpha, grid))
    # continuous values too
    U = torch.rand(2, n, n, generator=g, dtype=torch.float64)
    assert torch.equal(analysis.adaptive_windows(U, alpha, grid), loop_windows(U, alpha, grid))


def test_windows_unbatched_and_alpha_one_is_full():
    U = torch.rand(12, 12)
    w = analysis.adaptive_windows(U, 1.0, (3, 4))
    assert w.shape == (12, 4)
    assert w.tolist() == [[0, 0, 3, 2]] * 12
    assert analysis.effective_operations(w, (3, 4)) == 144.0


@pytest.mark.parametrize("alpha", [0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_windows_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        analysis.adaptive_windows(torch.rand(1, 4, 4), alpha, (2, 2))


def test_windows_bad_u_and_grid():
    with pytest.raises(ValueError, match="grid"):
        analysis.adaptive_windows(torch.rand(1, 6, 6), 0.1, (2, 2))
    with pytest.raises(ValueError, match="U"):
        analysis.adaptive_windows(torch.rand(1, 1, 4, 4), 0.1, (2, 2))
    with pytest.raises(ValueError, match="U"):
        analysis.adaptive_windows(torch.rand(1, 4, 5), 0.1, (2, 2))
    with pytest.raises(ValueError, match="NaN"):
        analysis.adaptive_windows(torch.full((4, 4), float("nan")), 0.1, (2, 2))
    with pytest.raises(TypeError, match="U"):
        analysis.adaptive_windows(np.zeros((4, 4)), 0.1, (2, 2))


def test_rounding_is_half_up():
    assert round_half_up(2.5) == 3 and round_half_up(3841.6) == 3842 and round_half_up(0.1 * 30) == 3
    # n = 10, beta = 0.25: 2.5 patches -> 3 dropped
    keep = analysis.indiscriminative_patches(torch.rand(10, 10), 0.25)
    assert int((~keep).sum()) == 3
    # paper's setting: ViT-B/16 at 224, alpha = 0.1 -> T = 3842 entries of U'
    assert analysis.windows.num_selected(0.1, 196) == 3842


# --------------------------------------------------------------------------------------- §4: DIP
def test_dip_hand_checked():
    U = torch.tensor([[0.0, 1.0, 2.0, 5.0],
                      [0.0, 3.0, 2.0, 6.0],
                      [0.0, 5.0, 2.0, 5.0],
                      [0.0, 7.0, 2.0, 6.0]])
    # column variances: 0, 5, 0, 0.25 -> beta = 0.5 drops columns 0 and 2; beta = 0.75 also 3
    assert analysis.indiscriminative_patches(U, 0.5).tolist() == [False, True, False, True]
    assert analysis.indiscriminative_patches(U, 0.75).tolist() == [False, True, False, False]
    assert analysis.indiscriminative_patches(U, 0.0).tolist() == [True] * 4
    # equal variances: the lower indices go first
    assert analysis.indiscriminative_patches(torch.ones(4, 4), 0.5).tolist() == [False, False, True, True]


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.5, 0.9])
def test_dip_matches_loop(beta):
    g = torch.Generator().manual_seed(4)
    # small integers over n = 16 rows: every variance is exact, so equal variances are bit-equal ties
    U = torch.randint(0, 3, (3, 16, 16), generator=g).double()
    U[:, :, 4] = U[:, :, 7]  # duplicate columns: equal variances
    keep = analysis.indiscriminative_patches(U, beta)
    assert keep.dtype == torch.bool and keep.shape == (3, 16)
    assert torch.equal(keep, loop_keep(U, beta))
    U = torch.rand(3, 15, 15, generator=g, dtype=torch.float64)
    assert torch.equal(analysis.indiscriminative_patches(U, beta), loop_keep(U, beta))


@pytest.mark.parametrize("beta", [1.0, -0.01, 2, float("inf")])
def test_dip_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        analysis.indiscriminative_patches(torch.rand(4, 4), beta)


# ------------------------------------------------------------------------------ §5: responsive field
def test_responsive_field_hand_checked_3x3():
    # 0 1 2 / 3 4 5 / 6 7 8; patches 2, 4, 8 dropped
    keep = torch.tensor([True, True, False, True, False, True, True, True, False])
    windows = torch.tensor([[0, 0, 1, 0] for _ in range(9)])
    windows[:] = torch.tensor([[p % 3, p // 3, p % 3, p // 3] for p in range(9)])  # self windows
    windows[4] = torch.tensor([1, 0, 2, 2])  # S_4 = {4, 1, 5, 7}
    windows[0] = torch.tensor([0, 0, 2, 0])  # S_0 = {0, 1}
    windows[8] = torch.tensor([0, 0, 2, 2])  # S_8 = {8, 0, 1, 3, 5, 6, 7}
    windows[6] = torch.tensor([1, 0, 2, 0])  # window without its patch: S_6 = {6, 1}
    size, tend, R = analysis.responsive_field(windows, keep, (3, 3), return_raw=True)
    assert size.tolist() == [2, 1, 1, 1, 4, 1, 2, 1, 7]
    assert R[4].tolist() == [1, 0] and R[0].tolist() == [1, 0] and R[8].tolist() == [-2, -2]
    assert R[6].tolist() == [1, -2] and R[2].tolist() == [0, 0]
    r2 = 1 / math.sqrt(2)
    torch.testing.assert_close(tend[8], torch.tensor([-r2, -r2]))
    torch.testing.assert_close(tend[6], torch.tensor([1, -2]) / math.sqrt(5))
    assert tend[2].tolist() == [0.0, 0.0] and tend[4].tolist() == [1.0, 0.0]
    size2, tend2 = analysis.responsive_field(windows, keep, (3, 3))  # default: (size, tendency)
    assert torch.equal(size2, size) and torch.equal(tend2, tend)


@pytest.mark.parametrize("grid", [(3, 4), (5, 5), (1, 7)])
def test_responsive_field_matches_loop(grid):
    g = torch.Generator().manual_seed(5)
    gh, gw = grid
    n = gh * gw
    own = random_windows(3, gh, gw, generator=g)  # windows holding their patch (as AWD's do)
    a = torch.stack([torch.randint(0, gw, (3, n), generator=g), torch.randint(0, gh, (3, n), generator=g)], -1)
    b = torch.stack([torch.randint(0, gw, (3, n), generator=g), torch.randint(0, gh, (3, n), generator=g)], -1)
    anywhere = torch.cat([torch.minimum(a, b), torch.maximum(a, b)], -1)  # arbitrary rectangles
    for windows in (own, anywhere):
        keep = torch.rand(3, n, generator=g) > 0.35
        size, tend, R = analysis.responsive_field(windows, keep, grid, return_raw=True)
        size_l, tend_l, R_l = loop_field(windows, keep, grid)
        assert torch.equal(size, size_l)
        assert torch.equal(R, R_l)
        torch.testing.assert_close(tend, tend_l.float())
        norms = tend.norm(dim=-1)
        assert torch.all(((norms - 1).abs() < 1e-6) | ((R.abs().sum(-1) == 0) & (norms == 0)))


def test_responsive_field_keep_none_and_broadcast():
    g = torch.Generator().manual_seed(6)
    w = random_windows(1, 4, 4, generator=g)[0]  # shared (n, 4)
    size, tend = analysis.responsive_field(w, None, (4, 4))
    area = (w[:, 2] - w[:, 0] + 1) * (w[:, 3] - w[:, 1] + 1)
    assert size.shape == (16,) and torch.equal(size, area)
    keep = torch.rand(2, 16, generator=g) > 0.5
    size_b, _ = analysis.responsive_field(w, keep, (4, 4))
    assert size_b.shape == (2, 16)
    assert torch.equal(size_b, loop_field(w.expand(2, -1, -1), keep, (4, 4))[0])


def test_responsive_field_bad_input():
    w = random_windows(1, 3, 3)
    with pytest.raises(ValueError, match="grid"):
        analysis.responsive_field(w, None, (2, 2))
    with pytest.raises(ValueError, match="keep"):
        analysis.responsive_field(w, torch.ones(1, 8, dtype=torch.bool), (3, 3))
    with pytest.raises(TypeError, match="keep"):
        analysis.responsive_field(w, torch.ones(1, 9), (3, 3))


# -------------------------------------------------------------------------------------- eq. 5: EO
def test_effective_operations_reexport_and_full_windows():
    assert analysis.effective_operations is masks.effective_operations
    for grid in [(14, 14), (24, 24), (3, 5)]:
        n = grid[0] * grid[1]
        full = WindowMask.full(grid).windows
        assert analysis.effective_operations(full, grid) == n * n
    assert analysis.effective_operations(WindowMask.full((14, 14)).windows, (14, 14)) == 38416


def test_effective_operations_of_awd_windows_matches_dense_count():
    g = torch.Generator().manual_seed(7)
    U = torch.rand(2, 20, 20, generator=g)
    w = analysis.adaptive_windows(U, 0.1, (4, 5))
    keep = analysis.indiscriminative_patches(U, 0.2)
    dense = WindowMask(w, (4, 5), key_keep=keep).dense()  # (B, n, n) allowed pairs
    assert analysis.effective_operations(w, (4, 5), keep) == float(dense.sum((1, 2)).double().mean())


# ---------------------------------------------------------------------------------- attention maps
def _recompute_from_inputs(model, images, **fwd):
    """Maps recomputed from q and k of each block: capture each attention module's input x with
    our own hooks during a plain forward, then softmax(scale q k^T) (plus the window mask)."""
    inputs = []
    handles = [blk.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
               for blk in model.blocks]
    try:
        with torch.no_grad():
            model(images, **fwd)
    finally:
        for h in handles:
            h.remove()
    out = []
    for blk, x in zip(model.blocks, inputs):
        attn = blk.attn
        B, N, C = x.shape
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        mask = fwd.get("attn_mask")
        if mask is None:
            out.append(torch.softmax(attn.scale * q @ k.transpose(-2, -1), -1))
        else:
            out.append(reference.window_attention_probs(q, k, mask, scale=attn.scale))
    return out


def _all_pre_hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("kw", [dict(), dict(qk_norm=True, reg_tokens=2)])
def test_attention_maps_match_recomputed(kw):
    model = tiny_vit(**kw)
    images = torch.randn(2, 3, 32, 32)
    assert all(blk.attn.fused_attn for blk in model.blocks)
    maps_iter = analysis.attention_maps(model, images)
    assert maps_iter.streaming
    maps = list(maps_iter)
    P = model.num_prefix_tokens
    assert len(maps) == 3 and maps[0].shape == (2, 3, P + 16, P + 16)
    assert not any(m.requires_grad for m in maps)
    for got, want in zip(maps, _recompute_from_inputs(model, images)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), rtol=0, atol=1e-5)
    assert all(blk.attn.fused_attn for blk in model.blocks), "fused attention not restored"
    assert _all_pre_hooks(model) == 0, "hooks left behind"


def test_attention_maps_hook_fallback_equals_streaming():
    model = tiny_vit()

    class Wrapped(nn.Module):  # not a timm VisionTransformer: captured by hooks during one forward
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    images = torch.randn(2, 3, 32, 32)
    wrapped = Wrapped(model)
    it = analysis.attention_maps(wrapped, images)
    assert not it.streaming
    fallback = list(it)
    streamed = list(analysis.attention_maps(model, images))
    assert len(fallback) == len(streamed) == 3
    for a, b in zip(fallback, streamed):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert _all_pre_hooks(wrapped) == 0 and all(blk.attn.fused_attn for blk in model.blocks)


def test_attention_maps_window_attention_model_with_mask():
    from vitpatch.nn import WindowAttention

    model = tiny_vit(attn_layer=WindowAttention)
    g = torch.Generator().manual_seed(8)
    windows = random_windows(2, 4, 4, generator=g)
    keep = torch.ones(2, 17, dtype=torch.bool)
    keep[:, 5] = False
    mask = WindowMask(windows, (4, 4), num_prefix_tokens=1, key_keep=keep)
    images = torch.randn(2, 3, 32, 32)
    maps = list(analysis.attention_maps(model, images, attn_mask=mask))
    allowed = mask.dense()[:, None]
    for got, want in zip(maps, _recompute_from_inputs(model, images, attn_mask=mask)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert torch.all(got[~allowed.expand_as(got)] == 0), "probability outside the window"
    assert all(blk.attn.fused_attn for blk in model.blocks) and _all_pre_hooks(model) == 0


def test_attention_maps_restores_on_early_stop_and_errors():
    model = tiny_vit()
    model.train()
    images = torch.randn(1, 3, 32, 32)
    it = analysis.attention_maps(model, images)
    assert all(blk.attn.fused_attn for blk in model.blocks), "nothing may change before iterating"
    next(it)
    assert not any(blk.attn.fused_attn for blk in model.blocks) and not model.training
    it.close()
    assert all(blk.attn.fused_attn for blk in model.blocks) and _all_pre_hooks(model) == 0 and model.training

    with analysis.attention_maps(model, images) as maps:
        for _ in maps:
            break
    assert all(blk.attn.fused_attn for blk in model.blocks) and _all_pre_hooks(model) == 0

    for _ in analysis.attention_maps(model, images):  # an unreferenced iterator left by break
        break
    gc.collect()
    assert all(blk.attn.fused_attn for blk in model.blocks) and _all_pre_hooks(model) == 0

    def boom(*a, **k):
        raise RuntimeError("injected")

    model.blocks[1].mlp.forward = boom
    with pytest.raises(RuntimeError, match="injected"):
        list(analysis.attention_maps(model, images))
    assert all(blk.attn.fused_attn for blk in model.blocks) and _all_pre_hooks(model) == 0 and model.training


def test_attention_maps_feed_uncertainty_and_bad_input():
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    U = analysis.uncertainty(analysis.attention_maps(model, images), model.num_prefix_tokens)
    expected = direct_uncertainty([m.double() for m in analysis.attention_maps(model, images)], 1)
    np.testing.assert_allclose(U.numpy(), expected, rtol=1e-6, atol=1e-20)
    with pytest.raises(ValueError, match="images"):
        analysis.attention_maps(model, torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="images"):
        analysis.attention_maps(model, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="attention"):
        analysis.attention_maps(nn.Linear(3, 3), images)
    with pytest.raises(TypeError, match="model"):
        analysis.attention_maps("vit", images)
    # U from a model's maps with a wrong prefix count: left with no patches
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        analysis.uncertainty(analysis.attention_maps(model, images), 17)
    assert all(blk.attn.fused_attn for blk in model.blocks) and _all_pre_hooks(model) == 0
