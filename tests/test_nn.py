"""The drop-in timm modules: state dicts, stock outputs, masks reaching every block, losses, PaCa."""
import pytest
import timm
import torch

from vitpatch import WindowMask, functional
from vitpatch.nn import (PaCaAttention, PaCaClustering, WindowAttention, WinfTAttention, set_token_layout,
                         winft_gate_sum, winft_loss)

from _helpers import random_windows

KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
GRID = (4, 4)


def vit(attn_layer=None, **kw):
    extra = {} if attn_layer is None else {"attn_layer": attn_layer}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **KW, **extra, **kw).eval()


@pytest.fixture(scope="module")
def stock():
    torch.manual_seed(0)
    return vit()


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32)


def test_window_attention_is_stock_without_mask_and_with_full_windows(stock, images):
    model = vit(WindowAttention)
    model.load_state_dict(stock.state_dict(), strict=True)
    with torch.no_grad():
        ref = stock(images)
        assert torch.equal(model(images), ref)
        assert (model(images, attn_mask=WindowMask.full(GRID, 1)) - ref).abs().max() < 1e-5


def test_window_mask_reaches_every_block(stock, images, monkeypatch):
    model = vit(WindowAttention)
    model.load_state_dict(stock.state_dict())
    mask = WindowMask(random_windows(2, *GRID), GRID, 1)
    seen = []
    real = functional.window_attention

    def spy(q, k, v, windows, **kw):
        seen.append(windows)
        return real(q, k, v, windows, **kw)

    monkeypatch.setattr(functional, "window_attention", spy)
    with torch.no_grad():
        out = model(images, attn_mask=mask)
    assert len(seen) == len(model.blocks) and all(m is mask for m in seen)
    # and it changes the result versus dense attention
    assert (out - stock(images)).abs().max() > 1e-4


def test_window_attention_unfused_path_matches_fused(stock, images):
    model = vit(WindowAttention)
    model.load_state_dict(stock.state_dict())
    mask = WindowMask(random_windows(2, *GRID), GRID, 1, torch.rand(2, 17) > 0.3)
    with torch.no_grad():
        fused = model(images, attn_mask=mask)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        assert (model(images, attn_mask=mask) - fused).abs().max() < 1e-5


def test_window_attention_trains(stock, images):
    model = vit(WindowAttention).train()
    mask = WindowMask(random_windows(2, *GRID), GRID, 1)
    model(images, attn_mask=mask).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_is_causal_with_window_mask_is_rejected(stock):
    attn = WindowAttention(48, num_heads=3)
    with pytest.raises(ValueError, match="is_causal"):
        attn(torch.randn(1, 17, 48), attn_mask=WindowMask.full(GRID, 1), is_causal=True)


@pytest.mark.parametrize("mode", ["multiply", "mask"])
def test_winft_state_dict_loss_and_gate_sum(stock, images, mode):
    model = vit(WinfTAttention.with_options(mode=mode))
    model.load_state_dict(stock.state_dict(), strict=True)
    assert all(b.attn.mode == mode for b in model.blocks)
    target = WindowMask(random_windows(2, *GRID), GRID, 1)
    model.train()
    out = model(images, attn_mask=target)
    loss = winft_loss(model)
    assert loss.dim() == 0 and loss > 0
    (out.sum() + loss).backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    gs = winft_gate_sum(model)
    assert gs.shape == (2,) and (gs > 0).all() and (gs <= 17 * 17).all()
    # the loss of the model is the mean of its layers' losses
    assert torch.allclose(loss, torch.stack([b.attn.bce_loss for b in model.blocks]).mean())
    # unfused (explicit probabilities) gives the same output and loss
    model.eval()
    with torch.no_grad():
        a, la = model(images, attn_mask=target), winft_loss(model)
        for b in model.blocks:
            b.attn.fused_attn = False
        c, lc = model(images, attn_mask=target), winft_loss(model)
    assert (a - c).abs().max() < 1e-5 and (la - lc).abs() < 1e-6


def test_winft_loss_needs_a_target(stock, images):
    model = vit(WinfTAttention)
    model(images)
    with pytest.raises(RuntimeError, match="attn_mask=WindowMask"):
        winft_loss(model)
    with pytest.raises(ValueError, match="no WinfTAttention"):
        winft_loss(stock)
    with pytest.raises(TypeError, match="WindowMask"):
        model.blocks[0].attn(torch.randn(1, 17, 48), attn_mask=torch.ones(17, 17, dtype=torch.bool))


def test_with_options_validates():
    with pytest.raises(ValueError, match="mode"):
        WinfTAttention.with_options(mode="soft")
    with pytest.raises(TypeError, match="unknown options"):
        WinfTAttention.with_options(clusters=3)
    with pytest.raises(ValueError, match="clustering"):
        PaCaAttention.with_options(clustering="kmeans")
    cls = PaCaAttention.with_options(num_clusters=7)
    assert issubclass(cls, PaCaAttention) and cls(48, num_heads=3).num_clusters == 7
    assert PaCaAttention(48, num_heads=3).num_clusters == 49  # the base class is untouched


@pytest.mark.parametrize("variant", ["paper", "official", "linear"])
def test_paca_in_vit(stock, images, variant):
    model = vit(PaCaAttention.with_options(num_clusters=5, clustering=variant))
    missing, unexpected = model.load_state_dict(stock.state_dict(), strict=False)
    assert not unexpected and all(".clustering." in k or ".cluster_norm." in k for k in missing)
    assert model.blocks[0].attn.qkv.weight.shape == stock.blocks[0].attn.qkv.weight.shape
    model.train()
    out = model(images)
    out.sum().backward()
    assert model.blocks[0].attn.clustering.fc.weight.grad is not None


def test_paca_matches_explicit_computation():
    torch.manual_seed(0)
    attn = PaCaAttention(16, num_heads=2, qkv_bias=True, num_clusters=3, clustering="linear").eval()
    x = torch.randn(2, 1 + 9, 16)
    out, A = attn(x, return_assignment=True)
    P, patches = 1, x[:, 1:]
    a = torch.softmax(attn.clustering(patches), dim=1)
    assert torch.allclose(A, a, atol=1e-6) and torch.allclose(A.sum(1), torch.ones(2, 3))
    z = attn.cluster_norm(a.transpose(1, 2) @ patches)
    kv_in = torch.cat([z, x[:, :P]], 1)
    W, b = attn.qkv.weight, attn.qkv.bias
    q = (x @ W[:16].T + b[:16]).reshape(2, 10, 2, 8).transpose(1, 2)
    k = (kv_in @ W[16:32].T + b[16:32]).reshape(2, 4, 2, 8).transpose(1, 2)
    v = (kv_in @ W[32:].T + b[32:]).reshape(2, 4, 2, 8).transpose(1, 2)
    o = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, -1) @ v
    expected = attn.proj(o.transpose(1, 2).reshape(2, 10, 16))
    assert torch.allclose(out, expected, atol=1e-5)


def test_paca_layout_and_assignment(images):
    model = vit(PaCaAttention.with_options(num_clusters=4))
    set_token_layout(model)
    assert model.blocks[0].attn.grid == GRID and model.blocks[0].attn.num_prefix_tokens == 1
    for b in model.blocks:
        b.attn.store_assignment = True
    model(images)
    A = model.blocks[1].attn.last_assignment
    assert A.shape == (2, 16, 4) and torch.allclose(A.sum(1), torch.ones(2, 4))
    attn = PaCaAttention(48, num_heads=3, num_clusters=4)
    with pytest.raises(ValueError, match="cannot infer the patch grid"):
        attn(torch.randn(1, 1 + 98, 48))  # no P <= 16 leaves a square grid
    assert attn(torch.randn(1, 1 + 98, 48), grid=(7, 14)).shape == (1, 99, 48)
    with pytest.raises(ValueError, match="no attention mask"):
        attn(torch.randn(1, 17, 48), attn_mask=WindowMask.full(GRID, 1))


def test_clustering_bad_input():
    with pytest.raises(ValueError, match="clustering"):
        PaCaClustering(16, 4, "kmeans")
    with pytest.raises(ValueError, match="num_clusters"):
        PaCaClustering(16, 0)
    with pytest.raises(ValueError, match="grid"):
        PaCaClustering(16, 4, "paper")(torch.randn(1, 9, 16), (2, 2))


@pytest.mark.parametrize("M,bias", [(49, True), (100, False), (32, True)])
def test_cluster_logits_layout_values_and_gradients(M, bias):
    """cluster_logits is the projection (values and gradients in float64, gradcheck) written as a
    view of rows padded to 16 elements; its fake implementation and autograd pass torch's opcheck."""
    from vitpatch.nn import cluster_logits
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 7, 12, generator=g, dtype=torch.float64).transpose(0, 1).contiguous().transpose(0, 1)
    weight = torch.randn(M, 12, generator=g, dtype=torch.float64)
    b = torch.randn(M, generator=g, dtype=torch.float64) if bias else None
    out = cluster_logits(feats, weight, b)
    width = -(-M // 16) * 16
    assert out.shape == (2, 7, M) and out.stride() == (7 * width, width, 1)
    assert torch.allclose(out, torch.nn.functional.linear(feats, weight, b), atol=1e-12)
    args = [t.requires_grad_() for t in (feats, weight, b) if t is not None]
    fn = (lambda f, w, bb: cluster_logits(f, w, bb)) if bias else (lambda f, w: cluster_logits(f, w))
    assert torch.autograd.gradcheck(fn, args)
    torch.library.opcheck(torch.ops.vitpatch.cluster_logits.default, (feats, weight, b, torch.float32))


def test_cluster_logits_under_autocast():
    """Under autocast the product runs in autocast's dtype (as nn.Linear's would) and is stored in the
    requested dtype; gradients reach the float32 weight."""
    from vitpatch.nn import cluster_logits
    feats, weight = torch.randn(2, 5, 8), torch.randn(49, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.nn.functional.linear(feats, weight)
        out = cluster_logits(feats, weight, dtype=torch.float32)
    assert expected.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert torch.equal(out, expected.float())
    out.sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float32


@pytest.mark.parametrize("variant", ["paper", "official", "linear"])
def test_clustering_writes_padded_logits_where_enabled(monkeypatch, variant):
    """On the devices where PaCaClustering writes its logits through cluster_logits (CUDA; here the CPU
    is switched on for the test), its logits and every gradient equal the plain projection's in float64."""
    import vitpatch.nn as vnn
    torch.manual_seed(0)
    module = PaCaClustering(16, 49, variant).double()
    x = torch.randn(2, 36, 16, dtype=torch.float64, requires_grad=True)

    def run():
        out = module(x, (6, 6))
        grads = torch.autograd.grad((out * torch.arange(49.0, dtype=torch.float64)).sum(), [x, *module.parameters()])
        return out, grads

    plain, plain_grads = run()
    assert plain.is_contiguous() or variant == "official"
    monkeypatch.setattr(vnn, "_PADDED_LOGITS_DEVICES", ("cpu",))
    padded, padded_grads = run()
    assert padded.stride(1) == 64
    assert torch.allclose(padded, plain, atol=1e-12)
    for a, b in zip(padded_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-12)
