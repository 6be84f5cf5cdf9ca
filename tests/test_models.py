"""PaCa-ViT in timm (paper 004, Table 1, §3.3; docs/math.md §7): build, train step, architecture against an
independent functional forward, dense features, parameter counts, the authors' weight format, bad input."""
import math
import subprocess
import sys
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention

import vitpatch.models  # noqa: F401  (registers the models)
from vitpatch.models import PaCaViT, checkpoint_filter_fn, load_official_checkpoint
from vitpatch.nn import PaCaAttention

MODELS = ["paca_vit_b0", "paca_vit_b1", "paca_vit_b2", "paca_vit_tiny", "paca_vit_small", "paca_vit_base"]

# Table 1 (B0-B2) and the authors' models/paca_vit.py (tiny/small/base), written out independently of the model code.
ARCH = {
    "paca_vit_b0": dict(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), heads=(1, 2, 5, 8), ratios=(8, 8, 4, 4),
                        clusters=(49, 49, 49, 0), stem="overlap", clustering="paper", scope="block", shortcut=False),
    "paca_vit_tiny": dict(dims=(96, 192, 320, 384), depths=(2, 2, 4, 2), heads=(2, 4, 8, 16), ratios=(4, 4, 4, 4),
                          clusters=(100, 100, 100, 0), stem="conv3x2", clustering="official", scope="stage",
                          shortcut=True),
}


def images(h=64, w=96, b=2, c=3, dtype=torch.float32):
    return torch.randn(b, c, h, w, dtype=dtype)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ registration
def test_import_vitpatch_does_not_import_timm_or_models():
    code = "import sys, vitpatch; assert 'timm' not in sys.modules and 'vitpatch.models' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registered_with_pretrained_cfgs_and_no_url():
    assert set(MODELS) <= set(timm.list_models("paca_vit_*"))
    for name in MODELS:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None and not cfg.url and not cfg.hf_hub_id
        assert cfg.classifier == "head.fc" and cfg.input_size == (3, 224, 224)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_builds_and_runs(name):
    model = timm.create_model(name, num_classes=7).eval()
    assert isinstance(model, PaCaViT) and model.pretrained_cfg["architecture"] == name
    with torch.no_grad():
        out = model(images(32, 32, b=1))  # the smallest legal input
    assert out.shape == (1, 7) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------ architecture
@pytest.mark.parametrize("name", sorted(ARCH))
def test_structure_matches_table1_or_release(name):
    a = ARCH[name]
    model = timm.create_model(name)
    stem = model.patch_embed.proj
    if a["stem"] == "overlap":
        assert (stem.kernel_size, stem.stride, stem.padding) == ((7, 7), (4, 4), (3, 3))
    else:
        assert [(c.kernel_size, c.stride) for c in stem] == [((3, 3), (2, 2))] * 2
    for i, stage in enumerate(model.stages):
        if i:
            conv = stage.downsample.proj
            assert (conv.kernel_size, conv.stride, conv.padding, conv.out_channels) == ((3, 3), (2, 2), (1, 1),
                                                                                         a["dims"][i])
        assert len(stage.blocks) == a["depths"][i]
        for j, blk in enumerate(stage.blocks):
            assert blk.attn.num_heads == a["heads"][i] and blk.attn.qkv.in_features == a["dims"][i]
            assert blk.mlp.fc1.out_features == a["dims"][i] * a["ratios"][i]
            assert blk.mlp.dwconv.groups == blk.mlp.fc1.out_features and blk.mlp.dwconv.kernel_size == (3, 3)
            if a["clusters"][i]:
                assert isinstance(blk.attn, PaCaAttention) and blk.attn.num_clusters == a["clusters"][i]
                owns = j == 0 or a["scope"] == "block"
                assert (blk.attn.clustering is not None) == owns
                if owns:
                    assert blk.attn.clustering.variant == a["clustering"]
            else:  # stage 4: plain MHSA
                assert type(blk.attn) is Attention
    # the C100 setting of Table 1: stage 3 becomes MHSA too
    c100 = timm.create_model(name, num_clusters=(64, 64, 0, 0))
    assert type(c100.stages[2].blocks[0].attn) is Attention and c100.stages[1].blocks[0].attn.num_clusters == 64


def reference_forward(sd, x, a):
    """The architecture written out with functional ops from this model's state dict (float64)."""
    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)

    def ln2d(t, p):
        return ln(t.permute(0, 2, 3, 1), p).permute(0, 3, 1, 2)

    def lin(t, p):
        return F.linear(t, sd[p + ".weight"], sd.get(p + ".bias"))

    def conv(t, p, **kw):
        return F.conv2d(t, sd[p + ".weight"], sd.get(p + ".bias"), **kw)

    def tokens(img):
        return img.flatten(2).transpose(1, 2)

    if a["stem"] == "overlap":
        x = conv(x, "patch_embed.proj", stride=4, padding=3)
    else:
        x = conv(conv(x, "patch_embed.proj.0", stride=2, padding=1), "patch_embed.proj.1", stride=2, padding=1)
    x = ln2d(x, "patch_embed.norm")
    for i, depth in enumerate(a["depths"]):
        if i:
            x = ln2d(conv(x, f"stages.{i}.downsample.proj", stride=2, padding=1), f"stages.{i}.downsample.norm")
        B, C, H, W = x.shape
        h = a["heads"][i]
        d = C // h
        t, assign = tokens(x), None
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}."
            y = ln(t, p + "norm1")
            w, b = sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]
            if a["clusters"][i]:
                if j == 0 or a["scope"] == "block":
                    img = y.transpose(1, 2).reshape(B, C, H, W)
                    if a["clustering"] == "paper":  # eq. 6: Conv3x3 (C -> C/4), GELU, Linear (C/4 -> M)
                        logits = lin(tokens(F.gelu(conv(img, p + "attn.clustering.conv", padding=1))),
                                     p + "attn.clustering.fc")
                    else:  # release: depthwise 7x7, GELU, 1x1, GELU, 1x1 (no bias)
                        u = F.gelu(conv(img, p + "attn.clustering.dwconv", padding=3, groups=C))
                        logits = tokens(conv(F.gelu(conv(u, p + "attn.clustering.pwconv")), p + "attn.clustering.fc"))
                    assign = logits.softmax(dim=1)  # eq. 7: softmax over the N tokens
                kv_in = ln(assign.transpose(1, 2) @ y, p + "attn.cluster_norm")  # eq. 8
            else:
                kv_in = y

            def heads(u):
                return u.reshape(B, -1, h, d).transpose(1, 2)
            q = heads(F.linear(y, w[:C], b[:C]))
            k, v = heads(F.linear(kv_in, w[C:2 * C], b[C:2 * C])), heads(F.linear(kv_in, w[2 * C:], b[2 * C:]))
            o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
            t = t + lin(o.transpose(1, 2).reshape(B, -1, C), p + "attn.proj")
            f = lin(ln(t, p + "norm2"), p + "mlp.fc1")
            hid = f.shape[-1]
            g = tokens(conv(f.transpose(1, 2).reshape(B, hid, H, W), p + "mlp.dwconv", padding=1, groups=hid))
            t = t + lin(F.gelu(g + f if a["shortcut"] else g), p + "mlp.fc2")
        t = ln(t, f"stages.{i}.norm")
        x = t.transpose(1, 2).reshape(B, C, H, W)
    return lin(t.mean(1), "head.fc")


@pytest.mark.parametrize("name", sorted(ARCH))
def test_forward_matches_functional_reference(name):
    model = timm.create_model(name, num_classes=5).double().eval()
    with torch.no_grad():  # random (not zero) biases and norm affines, so every term is exercised
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    x = images(32, 64, dtype=torch.float64)  # non-square grids (8x16 ... 1x2) catch H/W swaps
    with torch.no_grad():
        out = model(x)
        ref = reference_forward(model.state_dict(), x, ARCH[name])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["paca_vit_b0", "paca_vit_tiny"])
def test_forward_backward(name):
    model = timm.create_model(name, num_classes=10, drop_path_rate=0.1).train()
    x, y = images(64, 64), torch.tensor([1, 7])
    logits = model(x)
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, y).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert model.stages[0].blocks[0].attn.clustering.fc.weight.grad.abs().sum() > 0


def test_drop_path_and_grad_checkpointing():
    model = timm.create_model("paca_vit_b0", drop_path_rate=0.2)
    rates = [blk.drop_path1.drop_prob for s in model.stages for blk in s.blocks if hasattr(blk.drop_path1, "drop_prob")]
    assert len(rates) == 7 and rates[-1] == pytest.approx(0.2)  # linear over the 8 blocks, the first is 0
    model = timm.create_model("paca_vit_tiny", num_classes=3).eval()  # stage-wise shared clustering
    x = images(32, 64)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6)


def test_paca_attention_cluster_logits_keyword():
    """The vitpatch.nn addition the stage-wise models use: shared_clustering and forward(cluster_logits=)."""
    own = PaCaAttention(32, num_heads=2, qkv_bias=True, num_clusters=5, clustering="official").eval()
    shared = PaCaAttention(32, num_heads=2, qkv_bias=True, num_clusters=5, shared_clustering=True).eval()
    assert shared.clustering is None and "clustering='shared'" in repr(shared)
    assert not any(k.startswith("clustering.") for k in shared.state_dict())
    shared.load_state_dict({k: v for k, v in own.state_dict().items() if not k.startswith("clustering.")})
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        logits = own.clustering(x, (4, 6))
        torch.testing.assert_close(shared(x, grid=(4, 6), cluster_logits=logits), own(x, grid=(4, 6)), rtol=0, atol=0)
        other = own(x, grid=(4, 6), cluster_logits=torch.randn(2, 24, 5))
        assert not torch.allclose(other, own(x, grid=(4, 6)))
    with pytest.raises(ValueError, match="shared_clustering"):
        shared(x, grid=(4, 6))
    with pytest.raises(ValueError, match="cluster_logits must have shape"):
        shared(x, grid=(4, 6), cluster_logits=torch.randn(2, 24, 4))
    with pytest.raises(TypeError, match="cluster_logits"):
        shared(x, grid=(4, 6), cluster_logits=[[0.0]])


# ------------------------------------------------------------------------------------------ timm API
@pytest.mark.parametrize("name", ["paca_vit_b0", "paca_vit_tiny"])
def test_features_only(name):
    a = ARCH[name]
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.channels() == list(a["dims"]) and model.feature_info.reduction() == [4, 8, 16, 32]
    feats = model(images(64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 96 // s) for c, s in zip(a["dims"], (4, 8, 16, 32))]
    some = timm.create_model(name, features_only=True, out_indices=(1, 3))
    assert some.feature_info.channels() == [a["dims"][1], a["dims"][3]] and len(some(images(64, 64))) == 2


def test_forward_intermediates_and_pruning():
    model = timm.create_model("paca_vit_b0", num_classes=4).eval()
    x = images()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(final), model(x), rtol=0, atol=0)
        assert [tuple(t.shape) for t in inter] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 160, 4, 6), (2, 256, 2, 3)]
        torch.testing.assert_close(inter[-1], final, rtol=0, atol=0)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(last2) == 2 and torch.equal(last2[0], inter[2])
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], inter[1])
        with pytest.raises(ValueError, match="output_fmt"):
            model.forward_intermediates(x, output_fmt="NLC")
        model.prune_intermediate_layers(indices=[0, 1])
        assert len(model.stages) == 2 and torch.equal(model(x), inter[1])  # no head, no pooling


def test_classifier_api():
    model = timm.create_model("paca_vit_b0", num_classes=6, in_chans=1).eval()
    x = images(c=1)
    assert model(x).shape == (2, 6) and model.get_classifier().out_features == 6
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 256)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 256)
    model.reset_classifier(0, global_pool="")
    assert model(x).shape == (2, 256, 2, 3)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="median")


# ------------------------------------------------------------------------------------------ parameter counts
# (reported count, relative tolerance, where): every count uses the model's own constructor, nothing is stored.
REPORTED = [
    ("paca_vit_b0", {}, 3.4e6, 0.02, "Table 2 (IN1K)"),  # ours 3.344M: see the module docstring
    ("paca_vit_b1", {}, 12.7e6, 0.01, "Table 2 (IN1K)"),
    ("paca_vit_b2", {}, 22.7e6, 0.01, "Table 2 (IN1K)"),
    ("paca_vit_tiny", {}, 12.2e6, 0.01, "release README"),
    ("paca_vit_small", {}, 22.0e6, 0.01, "release README"),
    ("paca_vit_base", {}, 46.9e6, 0.01, "release README"),
    ("paca_vit_b0", dict(num_classes=100, num_clusters=(64, 64, 0, 0)), 3.0e6, 0.01, "Table 3 (C100)"),
    ("paca_vit_b1", dict(num_classes=100, num_clusters=(64, 64, 0, 0)), 11.8e6, 0.01, "Table 3 (C100)"),
    ("paca_vit_b2", dict(num_classes=100, num_clusters=(64, 64, 0, 0)), 20.8e6, 0.01, "Table 3 (C100)"),
]


@pytest.mark.parametrize("name,kwargs,reported,tol,where", REPORTED)
def test_parameter_count_near_paper(name, kwargs, reported, tol, where):
    with torch.device("meta"):  # counts only: no memory, no init cost
        model = timm.create_model(name, **kwargs)
    n = n_params(model)
    assert abs(n - reported) <= tol * reported, f"{name} {kwargs}: {n:,} vs {reported:,.0f} ({where})"


def test_stagewise_clustering_has_fewer_parameters():
    with torch.device("meta"):
        block = n_params(timm.create_model("paca_vit_tiny", clustering_scope="block"))
        stage = n_params(timm.create_model("paca_vit_tiny"))
    per_clustering = 96 * 49 + 96 + 96 * 96 + 96 + 96 * 100  # depthwise 7x7, 1x1, 1x1 to 100 clusters (stage 1)
    assert block > stage + per_clustering  # stages 1-3 each add clustering to blocks 1..L-1


# ------------------------------------------------------------------------------------------ the authors' weights
def to_official(model):
    """Our state dict in the authors' layout (github.com/iVMCL/PaCaViT, models/paca_vit.py), walked module by module."""
    sd, out = model.state_dict(), {}

    def put(ours, theirs):
        found = [k for k in sd if k.startswith(ours + ".")]
        assert found, ours
        for k in found:
            out[theirs + k[len(ours):]] = sd[k].clone()

    put("patch_embed", "patch_embed")
    for i, stage in enumerate(model.stages):
        if i:
            put(f"stages.{i}.downsample", f"transition{i}")
        put(f"stages.{i}.norm", f"norm{i + 1}")
        for j, blk in enumerate(stage.blocks):
            ours, theirs = f"stages.{i}.blocks.{j}", f"stage{i + 1}.{j}"
            for a, b in (("norm1", "norm1_before"), ("norm2", "norm2_before"), ("attn.proj", "attn.proj"),
                         ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"), ("mlp.dwconv", "mlp.dwconv.dwconv")):
                put(f"{ours}.{a}", f"{theirs}.{b}")
            for kind in ("weight", "bias"):
                q, k, v = sd[f"{ours}.attn.qkv.{kind}"].chunk(3, dim=0)
                out.update({f"{theirs}.attn.q.{kind}": q.clone(), f"{theirs}.attn.k.{kind}": k.clone(),
                            f"{theirs}.attn.v.{kind}": v.clone()})
            if isinstance(blk.attn, PaCaAttention):
                put(f"{ours}.attn.cluster_norm", f"{theirs}.attn.cluster_norm")
                if blk.attn.clustering is not None:
                    for idx, part in ((0, "dwconv"), (2, "pwconv"), (4, "fc")):
                        put(f"{ours}.attn.clustering.{part}", f"{theirs}.attn.clustering.clustering.{idx}")
    put("head.fc", "head")
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in sd.values())
    return out


def test_official_layout_of_the_synthetic_checkpoint():
    official = to_official(timm.create_model("paca_vit_tiny"))
    # shapes and names as the authors' code builds them
    expect = {"patch_embed.proj.0.weight": (48, 3, 3, 3), "patch_embed.proj.1.weight": (96, 48, 3, 3),
              "stage1.0.attn.clustering.clustering.0.weight": (96, 1, 7, 7),
              "stage1.0.attn.clustering.clustering.2.weight": (96, 96, 1, 1),
              "stage1.0.attn.clustering.clustering.4.weight": (100, 96, 1, 1),
              "stage1.0.attn.q.weight": (96, 96), "stage1.1.attn.v.bias": (96,),
              "stage1.1.attn.cluster_norm.weight": (96,),
              "stage1.0.mlp.dwconv.dwconv.weight": (384, 1, 3, 3), "transition1.proj.weight": (192, 96, 3, 3),
              "stage4.1.attn.k.weight": (384, 384), "norm4.weight": (384,), "head.weight": (1000, 384)}
    assert {k: tuple(official[k].shape) for k in expect} == expect
    for absent in ("stage1.0.attn.clustering.clustering.4.bias", "stage1.1.attn.clustering.clustering.0.weight",
                   "stage4.0.attn.cluster_norm.weight", "stage3.3.attn.clustering.clustering.0.weight"):
        assert absent not in official


# The release's structure (two-conv stem, stage-wise conv clustering, FFN shortcut, MHSA stage 4) at a width that
# keeps the file small; the layout test above pins the full tiny's names and shapes.
NARROW = dict(embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 4, 4), depths=(2, 2, 3, 2))


def test_official_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("paca_vit_tiny", **NARROW).eval()
    x = images(32, 64)
    with torch.no_grad():
        expected = source(x)
    official = to_official(source)
    path = tmp_path / "IMNET_224_pacavit_tiny_p2cconv_100_0.pth"
    torch.save(official, path)

    torch.manual_seed(2)
    fresh = timm.create_model("paca_vit_tiny", **NARROW).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), expected)
        load_official_checkpoint(fresh, path)
        assert torch.equal(fresh(x), expected)

    # timm's own loading path: pretrained_filter_fn with a local file
    loaded = timm.create_model("paca_vit_tiny", **NARROW, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
        # another number of classes: the backbone loads, the head is new
        other = timm.create_model("paca_vit_tiny", **NARROW, pretrained=True, num_classes=5,
                                  pretrained_cfg_overlay=dict(file=str(path))).eval()
        assert torch.equal(other.forward_features(x), source.forward_features(x))
        assert other(x).shape == (2, 5)

    # a wrapped training checkpoint loads as well; a state dict in our layout passes the filter unchanged
    torch.save({"state_dict": official, "epoch": 300}, tmp_path / "wrapped.pth")
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
        load_official_checkpoint(fresh, tmp_path / "wrapped.pth")
        assert torch.equal(fresh(x), expected)
    ours = source.state_dict()
    assert checkpoint_filter_fn(ours, source) is ours


def test_official_checkpoint_errors():
    model = timm.create_model("paca_vit_tiny", **NARROW)
    official = to_official(model)
    broken = {k: v for k, v in official.items() if k != "stage2.1.attn.v.weight"}
    with pytest.raises(ValueError, match="q, k and v"):
        checkpoint_filter_fn(broken, model)
    with pytest.raises(ValueError, match="cluster_pos_enc"):
        checkpoint_filter_fn({**official, "stage1.0.attn.cluster_pos_enc": torch.zeros(1, 100, 32)}, model)
    with torch.device("meta"):  # structure only
        paper_clustering = timm.create_model("paca_vit_tiny", **NARROW, clustering="paper")
        blockwise = timm.create_model("paca_vit_tiny", **NARROW, clustering_scope="block")
    with pytest.raises(ValueError, match="clustering"):  # their conv clustering into a model with the paper's
        checkpoint_filter_fn(official, paper_clustering)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="Missing key"):
        warnings.simplefilter("ignore", UserWarning)  # torch: copying into meta tensors is a no-op
        load_official_checkpoint(blockwise, official)  # block-wise model, stage-wise checkpoint
    with pytest.raises(TypeError, match="model"):
        load_official_checkpoint(torch.nn.Linear(2, 2), official)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_raises():
    model = timm.create_model("paca_vit_b0").eval()
    for bad in (images(60, 64), images(64, 80), images(16, 16)):
        with pytest.raises(ValueError, match="divisible by 32"):
            model(bad)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(images(c=1))
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        model([[0.0]])
    with pytest.raises(ValueError, match="divisible by 32"):
        timm.create_model("paca_vit_b0", features_only=True)(images(60, 64))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_heads=(1, 3, 5, 8)), ValueError, "num_heads"),
    (dict(clustering="kmeans"), ValueError, "clustering"),
    (dict(clustering_scope="layer"), ValueError, "clustering_scope"),
    (dict(num_clusters=(49, 49, 49)), ValueError, "num_clusters"),
    (dict(num_clusters=(49, 49, -1, 0)), ValueError, "num_clusters"),
    (dict(depths=(2, 2, 2.5, 2)), TypeError, "depths"),
    (dict(stem="patchify"), ValueError, "stem"),
    (dict(global_pool="median"), ValueError, "global_pool"),
    (dict(drop_path_rate=1.5), ValueError, "drop_path_rate"),
])
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        timm.create_model("paca_vit_b0", **kwargs)
