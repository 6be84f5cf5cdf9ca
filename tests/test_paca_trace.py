"""PaCa-ViT under timm's model conventions: torch.fx tracing (timm's FX feature extraction) and TorchScript, every
registered model; the CIFAR-100 variants of paper 004 (Table 1 C100 column, Table 3)."""
import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

from timm.models import create_feature_extractor, get_graph_node_names  # noqa: E402
from vitpatch.models.paca_vit import PaCaViTAttention, Transition  # noqa: E402  (registers the models)
from vitpatch.nn import PaCaAttention  # noqa: E402

ALL = ["paca_vit_b0", "paca_vit_b1", "paca_vit_b2", "paca_vit_tiny", "paca_vit_small", "paca_vit_base",
       "paca_vit_b0_c100", "paca_vit_b1_c100", "paca_vit_b2_c100"]


def _size(name):
    return 32 if name.endswith("_c100") else 64  # the smallest inputs with more than one token in stage 4


def _model(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **kw)


def _images(name, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, _size(name), _size(name), generator=g)


def _fx(model):
    """timm's FX feature extraction of the whole model (its last node): a torch.fx GraphModule."""
    _train_nodes, eval_nodes = get_graph_node_names(model)
    return create_feature_extractor(model, {eval_nodes[-1]: "out"})


def test_every_registered_model_is_covered():
    assert sorted(timm.list_models("paca_vit_*")) == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
def test_fx_trace_forward_equals_eager(name):
    model = _model(name).eval()
    x = _images(name)
    gm = _fx(model)
    assert isinstance(gm, torch.fx.GraphModule)
    # the PaCa layers are leaves of the graph (register_notrace_module), called as modules
    leaves = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert any(t.endswith(".attn") for t in leaves)
    with torch.no_grad():
        torch.testing.assert_close(gm(x)["out"], model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_fx_trace_backward_equals_eager(name):
    """Gradients through the traced graph: input and every parameter, as eager, for every registered model
    (the stage-wise shared clustering of the release models and the MHSA stages of C100 included)."""
    model = _model(name).train()
    x = _images(name).requires_grad_(True)
    w = torch.randn(2, 5, generator=torch.Generator().manual_seed(3))
    (model(x) * w).sum().backward()
    eager = {k: p.grad.clone() for k, p in model.named_parameters()}
    gx = x.grad.clone()
    model.zero_grad()
    x.grad = None
    gm = _fx(model)
    (gm(x)["out"] * w).sum().backward()
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-6)
    traced = dict(gm.named_parameters())
    assert set(traced) == set(eager)
    for k, g in eager.items():
        torch.testing.assert_close(traced[k].grad, g, rtol=1e-4, atol=1e-6, msg=k)
    assert eager["stages.0.blocks.0.attn.clustering.fc.weight"].abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_torchscript_equals_eager(name):
    model = _model(name).eval()
    x = _images(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in recent torch
        scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)


def test_torchscript_backward_and_stored_assignment():
    model = _model("paca_vit_b0").train()
    x = _images("paca_vit_b0").requires_grad_(True)
    model(x).sum().backward()
    g = x.grad.clone()
    x.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    scripted(x).sum().backward()
    torch.testing.assert_close(x.grad, g, rtol=1e-4, atol=1e-6)
    # store_assignment under TorchScript keeps eq. 7's assignment as in eager
    model.eval()
    scripted.eval()
    attn = model.stages[0].blocks[1].attn
    attn.store_assignment = True
    with torch.no_grad():
        model(x)
    scripted.stages[0].blocks[1].attn.store_assignment = True
    with torch.no_grad():
        scripted(x)
    torch.testing.assert_close(scripted.stages[0].blocks[1].attn.last_assignment, attn.last_assignment)
    assert attn.last_assignment.shape == (2, 16 * 16, 49)


def test_eager_input_errors_are_kept():
    model = _model("paca_vit_b0").eval()
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[0.0]])
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.zeros(1, 3, 48, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(1, 1, 64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    with pytest.raises(Exception, match="divisible by 32"):
        scripted(torch.zeros(1, 3, 48, 64))
    c100 = _model("paca_vit_b0_c100").eval()
    with pytest.raises(ValueError, match="divisible by 4"):
        c100(torch.zeros(1, 3, 30, 32))


def test_paca_layers_are_paca_attention():
    """PaCa-ViT's attention is a vitpatch.nn.PaCaAttention (same parameters, same eager forward)."""
    model = _model("paca_vit_tiny").eval()
    attn = model.stages[1].blocks[0].attn
    assert isinstance(attn, PaCaViTAttention) and isinstance(attn, PaCaAttention)
    y = torch.randn(2, 8 * 8, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = PaCaAttention.forward(attn, y, grid=(8, 8))
        torch.testing.assert_close(attn(y, grid=(8, 8)), ref)
        out, A = attn(y, grid=(8, 8), return_assignment=True)
    assert A.shape == (2, 64, 100)
    torch.testing.assert_close(A.sum(1), torch.ones(2, 100))


# ------------------------------------------------------------------------------ CIFAR-100 (Table 1, Table 3)
# Table 3 (C100): PaCa-ViT-B0 3.0M, B1 11.8M, B2 20.8M parameters (one decimal).
C100_PARAMS = {"paca_vit_b0_c100": (3.0, 2_989_940), "paca_vit_b1_c100": (11.8, 11_768_196),
               "paca_vit_b2_c100": (20.8, 20_781_396)}


@pytest.mark.parametrize("name", sorted(C100_PARAMS))
def test_c100_parameter_counts_match_table3(name):
    reported, ours = C100_PARAMS[name]
    model = timm.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == ours
    assert round(n / 1e6, 1) == reported  # rounds to Table 3's number


def test_c100_architecture_follows_table1():
    model = timm.create_model("paca_vit_b0_c100")
    assert model.num_classes == 100 and model.pretrained_cfg["input_size"] == (3, 32, 32)
    stem = model.patch_embed.proj
    assert (stem.kernel_size, stem.stride, stem.padding) == ((3, 3), (1, 1), (1, 1))  # (k1, s1, p1) = (3, 1, 1)
    strides = [s.downsample.proj.stride if isinstance(s.downsample, Transition) else None for s in model.stages]
    assert strides == [None, (2, 2), (2, 2), (1, 1)]  # s4 = 1 in C100
    kinds = [[type(b.attn) for b in s.blocks] for s in model.stages]
    assert all(k == PaCaViTAttention for k in kinds[0] + kinds[1])
    assert all(k is timm.layers.Attention for k in kinds[2] + kinds[3])  # MHSA in stages 3 and 4
    assert [b.attn.num_clusters for s in model.stages[:2] for b in s.blocks] == [64] * 4
    assert [f["reduction"] for f in model.feature_info] == [1, 2, 4, 4]
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
        out = model(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(32, 32), (16, 16), (8, 8), (8, 8)]  # Table 1 output sizes
    assert out.shape == (2, 100)
    assert timm.create_model("paca_vit_b2_c100").depths == (3, 4, 6, 3)
    # default strides follow the stem: (1, 2, 2, 2) for stem="c100" alone
    assert [f["reduction"] for f in timm.create_model("paca_vit_b0", stem="c100").feature_info] == [1, 2, 4, 8]


def test_strides_are_checked():
    with pytest.raises(ValueError, match="strides"):
        timm.create_model("paca_vit_b0", stem="c100", strides=(4, 2, 2, 2))  # the c100 stem has stride 1
    with pytest.raises(ValueError, match="strides"):
        timm.create_model("paca_vit_b0", strides=(4, 2, 3, 2))
    with pytest.raises(ValueError, match="stem"):
        timm.create_model("paca_vit_b0_c100", stem="patchify")
