"""DIP by token zeroing (paper 000 §4.2), WinfT gates per layer (Fig. 13) and their patch-pair EO (Tables 3-4)."""
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from vitpatch import WindowMask, chunked, functional, reference
from vitpatch.nn import (WindowAttention, WinfTAttention, record_winft_gates, set_token_layout, winft_gate_sum,
                         winft_layer_gates, zero_dropped_tokens)

from _helpers import random_windows

GRID = (4, 4)
N = 1 + 16


def tiny_vit(attn_layer=WindowAttention, **kw):
    torch.manual_seed(0)
    kw = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2, "num_classes": 5,
          "class_token": True, "attn_layer": attn_layer, **kw}
    return VisionTransformer(**kw).double()


def random_keep(B, P=1, frac=0.6, seed=1):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, P + 16, generator=g) < frac
    keep[:, :P] = True
    return keep


def hand_forward(model, images, mask, keep):
    """Stock timm forward_features, with the tokens zeroed by hand before every block."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    for blk in model.blocks:
        x = blk(x * keep[..., None].to(x.dtype), attn_mask=mask)
    return model.forward_head(model.norm(x))


def run(fn, model, images):
    """Output and gradients (input and every parameter) of ``fn(images).sum() + (fn ** 2).sum()``."""
    model.zero_grad()
    images = images.clone().requires_grad_(True)
    out = fn(images)
    (out.sum() + (out ** 2).sum()).backward()
    return out.detach(), images.grad, [p.grad.clone() for p in model.parameters()]


def assert_same(a, b, tol=1e-10):
    """Outputs, input gradients and parameter gradients agree within ``tol`` (0: bitwise)."""
    (oa, ga, pa), (ob, gb, pb) = a, b
    assert len(pa) == len(pb)
    for x, y in zip([oa, ga, *pa], [ob, gb, *pb]):
        assert x.shape == y.shape and (x - y).abs().max() <= tol


# ------------------------------------------------------------------------------------ token zeroing
@pytest.mark.parametrize("with_key_keep", [False, True])
def test_zero_dropped_tokens_equals_hand_zeroing(with_key_keep):
    model = tiny_vit().train()  # no dropout configured: train mode is deterministic
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    keep = random_keep(3)
    kk = random_keep(3, seed=2) if with_key_keep else None
    mask = WindowMask(random_windows(3, *GRID), GRID, 1, key_keep=kk, token_keep=keep)
    plain = WindowMask(mask.windows, GRID, 1, key_keep=kk)
    expected = run(lambda im: hand_forward(model, im, plain, keep), model, images)
    stock = run(lambda im: model(im, attn_mask=mask), model, images)
    # without the hooks token_keep changes nothing (the attention ignores it)
    assert_same(stock, run(lambda im: model(im, attn_mask=plain), model, images), tol=0)
    assert (stock[0] - expected[0]).abs().max() > 1e-6  # the zeroing matters

    assert zero_dropped_tokens(model) is model
    zero_dropped_tokens(model)  # idempotent: still one hook per block
    assert all(len(b._forward_pre_hooks) == 1 for b in model.blocks)
    got = run(lambda im: model(im, attn_mask=mask), model, images)
    assert_same(got, expected)
    # an all-True token_keep is no zeroing (bitwise)
    dense = WindowMask(mask.windows, GRID, 1, key_keep=kk, token_keep=torch.ones(3, N, dtype=torch.bool))
    assert_same(run(lambda im: model(im, attn_mask=dense), model, images), stock, tol=0)
    # no WindowMask / no token_keep: the hook is a no-op
    assert_same(run(lambda im: model(im, attn_mask=plain), model, images), stock, tol=0)

    zero_dropped_tokens(model, enabled=False)
    assert all(len(b._forward_pre_hooks) == 0 for b in model.blocks)
    assert_same(run(lambda im: model(im, attn_mask=mask), model, images), stock, tol=0)


def test_zero_dropped_tokens_positional_mask_and_wrappers():
    model = tiny_vit().eval()
    keep = random_keep(2)
    mask = WindowMask(random_windows(2, *GRID), GRID, 1, token_keep=keep)
    x = torch.randn(2, N, 32, dtype=torch.float64)
    blk = model.blocks[0]
    with torch.no_grad():
        ref = blk(x * keep[..., None], attn_mask=mask)
        wrapper = torch.nn.DataParallel(model)  # DDP wraps the same way: the hooks go on .module's blocks
        assert zero_dropped_tokens(wrapper) is wrapper
        assert torch.equal(blk(x, mask), ref)  # positional attn_mask
        assert torch.equal(blk(x, attn_mask=mask), ref)
        assert torch.equal(blk(x=x, attn_mask=mask), ref)
        with pytest.raises(ValueError, match="token_keep"):
            blk(x[:1], attn_mask=mask)
    with pytest.raises(ValueError, match="blocks"):
        zero_dropped_tokens(torch.nn.Linear(2, 2))


def test_zero_dropped_tokens_timm_create_model_float32():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32,
                              depth=2, num_heads=2, num_classes=3, attn_layer=WindowAttention).eval()
    zero_dropped_tokens(model)
    keep = random_keep(2)
    mask = WindowMask(random_windows(2, *GRID), GRID, 1, token_keep=keep)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got = model(images, attn_mask=mask)
        zero_dropped_tokens(model, enabled=False)
        ref = hand_forward(model, images, mask, keep)
    assert (got - ref).abs().max() < 1e-5


# ------------------------------------------------------------------------------------ WindowMask.token_keep
def test_window_mask_token_keep_validation_and_to():
    w = random_windows(2, *GRID)
    keep = random_keep(2)
    m = WindowMask(w, GRID, 1, token_keep=keep)
    assert torch.equal(m.token_keep, keep) and m.key_keep is None and m.batch_size == 2
    assert "token_keep=(2, 17)" in repr(m)
    assert torch.equal(m.dense(), WindowMask(w, GRID, 1).dense())  # the attention mask ignores it
    with pytest.raises(TypeError, match="token_keep"):
        WindowMask(w, GRID, 1, token_keep=keep.int())
    with pytest.raises(ValueError, match="token_keep"):
        WindowMask(w, GRID, 1, token_keep=keep[:, 1:])
    with pytest.raises(ValueError, match="token_keep"):
        WindowMask(w, GRID, 1, token_keep=keep[:1])
    with pytest.raises(ValueError, match="token_keep"):
        WindowMask(w[0], GRID, 1, key_keep=keep, token_keep=keep[:1])  # shared windows: batch from key_keep
    bad = keep.clone()
    bad[0, 0] = False
    with pytest.raises(ValueError, match="prefix"):
        WindowMask(w, GRID, 1, token_keep=bad)
    shared = WindowMask(w[0], GRID, 1, token_keep=keep.numpy())
    assert shared.batch_size == 2 and shared.token_keep.dtype == torch.bool
    assert WindowMask.full(GRID, 1, token_keep=keep).token_keep is not None
    assert WindowMask.square(GRID, 1, 1, token_keep=keep).batch_size == 2

    dev = "meta"
    moved = m.to(dev)
    assert moved.token_keep.device.type == "meta" and moved.token_keep.shape == keep.shape
    assert moved is m.to(dev)  # cached
    assert m.to("cpu") is m


# ------------------------------------------------------------------------------------ winft_gates
@pytest.mark.parametrize("mode", ["multiply", "mask"])
@pytest.mark.parametrize("chunk", [None, 1, 4, 16])
def test_winft_gates_equal_winft_parts(mode, chunk):
    q = torch.randn(2, 3, 16, 7, dtype=torch.float64)
    k = torch.randn(2, 3, 16, 7, dtype=torch.float64)
    W = reference.winft_gates(q, k, mode, chunk=chunk)
    assert W.dtype == torch.bool and W.shape == (2, 16, 16)
    assert torch.equal(W, reference.winft_parts(q, k, mode)[2])
    q32, k32 = q.float(), k.float()
    assert torch.equal(reference.winft_gates(q32, k32, mode, chunk=chunk), reference.winft_parts(q32, k32, mode)[2])
    with pytest.raises(ValueError, match="chunk"):
        reference.winft_gates(q, k, mode, chunk=0)


# ------------------------------------------------------------------------------------ WinfT layers
def winft_vit(mode="multiply"):
    return tiny_vit(WinfTAttention.with_options(mode=mode)).eval()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mode", ["multiply", "mask"])
def test_recorded_gates_and_patch_gate_sum(monkeypatch, mode, fused):
    model = winft_vit(mode)
    layers = [m for m in model.modules() if isinstance(m, WinfTAttention)]
    for m in layers:
        m.fused_attn = fused
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    record_winft_gates(model)
    set_token_layout(model)
    with torch.no_grad():
        model(images)
    gates = winft_layer_gates(model)
    assert len(gates) == 3 and all(g.dtype == torch.bool and g.shape == (2, N, N) for g in gates)
    patch_sums, all_sums = [m.patch_gate_sum for m in layers], [m.gate_sum for m in layers]
    eo_patch, eo_all = winft_gate_sum(model, pairs="patch"), winft_gate_sum(model)

    # the oracle: each layer's q, k (captured on the unfused path) through winft_parts
    captured = []
    real = reference.winft_parts

    def spy(q, k, *a, **kw):
        captured.append((q.detach(), k.detach()))
        return real(q, k, *a, **kw)

    for m in layers:
        m.fused_attn = False
    monkeypatch.setattr(reference, "winft_parts", spy)
    with torch.no_grad():
        model(images)
    assert len(captured) == 3
    used = [real(q, k, mode)[2] for q, k in captured]
    for g, u, ps, gs in zip(gates, used, patch_sums, all_sums):
        assert torch.equal(g, u)
        assert ps.dtype == torch.float32 and torch.equal(ps, u[:, 1:, 1:].sum((1, 2)).float())
        assert torch.equal(gs, u.sum((1, 2)).float())
    assert torch.equal(eo_patch, torch.stack([u[:, 1:, 1:].sum((1, 2)).float() for u in used]).mean(0))
    assert torch.equal(eo_all, torch.stack([u.sum((1, 2)).float() for u in used]).mean(0))
    assert (eo_patch < eo_all).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", ["multiply", "mask"])
def test_recorded_gates_are_the_ops_gates(monkeypatch, mode, dtype):
    """Fused path (PyTorch backend): the recorded W is exactly the W the op thresholded, chunk by chunk."""
    monkeypatch.setenv("VITPATCH_BACKEND", "torch")
    model = tiny_vit(WinfTAttention.with_options(mode=mode)).to(dtype).eval()
    record_winft_gates(model)
    seen = []
    real = chunked._winft_gate

    def spy(g, start, m):
        out = real(g, start, m)
        seen.append(out[0].clone())
        return out

    monkeypatch.setattr(chunked, "_winft_gate", spy)
    images = torch.randn(2, 3, 16, 16, dtype=dtype)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed: the recomputation forces full float32
    try:
        with torch.no_grad():
            model(images)
        assert torch.get_float32_matmul_precision() == "high"  # restored
    finally:
        torch.set_float32_matmul_precision(before)
    gates = winft_layer_gates(model)
    assert len(seen) == len(gates) == 3  # one chunk per layer at this size
    for g, w in zip(gates, seen):
        assert torch.equal(g, w)


@pytest.mark.parametrize("mode", ["multiply", "mask"])
def test_recorded_gates_under_autocast_are_float32_gates(monkeypatch, mode):
    """Under bf16 autocast: W of the bf16 q, k the op received, thresholded at float32 accuracy."""
    model = tiny_vit(WinfTAttention.with_options(mode=mode)).float().eval()
    record_winft_gates(model)
    received = []
    real = functional.winft_attention

    def spy(q, k, v, **kw):
        received.append((q.detach(), k.detach()))
        return real(q, k, v, **kw)

    monkeypatch.setattr(functional, "winft_attention", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 16, 16))
    gates = winft_layer_gates(model)
    assert len(received) == 3 and received[0][0].dtype == torch.bfloat16
    for g, (q, k) in zip(gates, received):
        assert torch.equal(g, reference.winft_parts(q, k, mode, upcast=True)[2])


def test_patch_pair_eo_with_every_gate_on(monkeypatch):
    """W all True: n^2 per image over patch pairs, N^2 over all pairs."""
    model = winft_vit("multiply")
    for m in model.modules():
        if isinstance(m, WinfTAttention):
            m.fused_attn = False
    real = reference.winft_parts

    def all_on(q, k, *a, **kw):
        probs, g, used = real(q, k, *a, **kw)
        return probs, g, torch.ones_like(used)

    monkeypatch.setattr(reference, "winft_parts", all_on)
    record_winft_gates(model)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        model(images)
    with pytest.raises(RuntimeError, match="set_token_layout"):
        winft_gate_sum(model, pairs="patch")  # P unknown
    with torch.no_grad():
        model(images, attn_mask=WindowMask(random_windows(2, *GRID), GRID, 1))  # P from the target
    assert torch.equal(winft_gate_sum(model, pairs="patch"), torch.full((2,), 16.0 ** 2))
    assert torch.equal(winft_gate_sum(model, pairs="all"), torch.full((2,), float(N ** 2)))
    set_token_layout(model)
    assert all(m.num_prefix_tokens == 1 for m in model.modules() if isinstance(m, WinfTAttention))
    with torch.no_grad():
        model(images)
    assert torch.equal(winft_gate_sum(model, pairs="patch"), torch.full((2,), 256.0))
    # mask mode with every gate off: only the diagonal stays, n per image over patch pairs
    model = winft_vit("mask")
    for m in model.modules():
        if isinstance(m, WinfTAttention):
            m.fused_attn = False
    monkeypatch.setattr(reference, "winft_parts", real)
    set_token_layout(model)
    record_winft_gates(model)

    def only_diag(q, k, mode="multiply", *a, **kw):
        probs, g, used = real(q, k, mode, *a, **kw)
        return probs, g, torch.eye(used.shape[-1], dtype=torch.bool).expand_as(used)

    monkeypatch.setattr(reference, "winft_parts", only_diag)
    with torch.no_grad():
        model(images)
    assert torch.equal(winft_gate_sum(model, pairs="patch"), torch.full((2,), 16.0))
    assert torch.equal(winft_gate_sum(model), torch.full((2,), float(N)))


def test_record_off_computes_nothing(monkeypatch):
    model = winft_vit()
    set_token_layout(model)
    calls = []
    monkeypatch.setattr(reference, "winft_gates", lambda *a, **kw: calls.append(1))
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        model(images)
    layers = [m for m in model.modules() if isinstance(m, WinfTAttention)]
    assert not calls and all(m.last_gates is None and m.patch_gate_sum is None for m in layers)
    assert all(m.record_gates is False for m in layers)
    assert winft_gate_sum(model).shape == (2,)  # "all" still works
    with pytest.raises(RuntimeError, match="record_winft_gates"):
        winft_gate_sum(model, pairs="patch")
    with pytest.raises(RuntimeError, match="record_winft_gates"):
        winft_layer_gates(model)
    with pytest.raises(ValueError, match="pairs"):
        winft_gate_sum(model, pairs="cls")
    # switching recording off again drops the recorded gates and stops recording
    monkeypatch.undo()
    record_winft_gates(model)
    with torch.no_grad():
        model(images)
    assert all(m.last_gates is not None for m in layers)
    record_winft_gates(model, False)
    with torch.no_grad():
        model(images)
    assert all(m.last_gates is None and m.patch_gate_sum is None for m in layers)
    with pytest.raises(ValueError, match="WinfTAttention"):
        record_winft_gates(tiny_vit())


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_torch_paths_are_not_recast_by_autocast(monkeypatch, backend):
    """functional's PyTorch paths turn autocast off: bf16 autocast gives the same gates and outputs."""
    from vitpatch import functional

    monkeypatch.setenv("VITPATCH_BACKEND", backend)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 1 + 4 * 5, 8).to(torch.bfloat16) for _ in range(3))
    out0, _, gs0 = functional.winft_attention(q, k, v, return_gate_sum=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out1, _, gs1 = functional.winft_attention(q, k, v, return_gate_sum=True)
    assert torch.equal(gs0, gs1) and torch.equal(out0, out1)
    mask = WindowMask.square((4, 5), 1, 1)
    w0 = functional.window_attention(q, k, v, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w1 = functional.window_attention(q, k, v, mask)
    assert torch.equal(w0, w1)
