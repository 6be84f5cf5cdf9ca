"""The PaCa Triton kernels (kernels/cluster_attention.py; docs/math.md §7, paper 004 eq. 7–8) beyond the
backend-parametrized tests: every split size of the split-K pooling and of the attention
backward, edge values, head widths, declines, the torch.library registration, torch.compile, and
PaCaAttention end to end. On CPU these run in Triton's interpreter (float32, pinned config).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from vitpatch import functional, reference

from _helpers import DEVICE, TOL, assert_close, check_against_reference, needs_interpreter, qkv, rand, require_kernel
from test_cluster_attention import check_padded_pool

pytestmark = needs_interpreter()

F32 = TOL[torch.float32]


@pytest.fixture
def K(monkeypatch):
    """The kernel module, with every functional op forced onto it."""
    require_kernel("cluster_pool", "triton")
    require_kernel("cluster_attention", "triton")
    monkeypatch.setenv("VITPATCH_BACKEND", "triton")
    import vitpatch.kernels.cluster_attention as module
    return module


def _interpreted(K):
    from vitpatch import _env

    return _env.triton_interpret()


# ------------------------------------------------------------------------------------ pooling

@pytest.mark.parametrize("tokens_per_split", [1, 7, 16, 36, 37])
def test_pool_forward_every_split_size(K, tokens_per_split):
    """The combine step merges any number of token ranges, aligned to the token block or not."""
    B, n, M, C = 1, 37, 49, 24
    logits = rand(B, M, n).transpose(1, 2)  # non-contiguous, as handed over by a transposed view
    x = rand(B, n, C)
    z, stats = K._pool_forward(logits, x, tokens_per_split=tokens_per_split)
    assert_close(z, reference.cluster_pool(logits.double(), x.double()), F32, "z")
    assert_close(stats[0], logits.double().amax(dim=1), 0.0, "largest logit per cluster")
    assert_close(stats.sum(0), torch.logsumexp(logits.double(), dim=1), F32, "log-sum-exp per cluster")


def test_pool_op_runs_the_combine_step(K, monkeypatch):
    """The public op (default split policy) really splits the tokens across programs and combines them."""
    launched = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launched.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(K, "_pool_combine_kernel", Spy(K._pool_combine_kernel))
    n = 50 if _interpreted(K) else 600  # the GPU policy splits only when there are >= 512 tokens
    check_against_reference(functional.cluster_pool, reference.cluster_pool, [rand(2, n, 64), rand(2, n, 32)])
    assert launched, "the pooling forward never ran its combine kernel"
    if _interpreted(K):  # pinned: 24 tokens per split, so every test with n > 24 combines
        assert K._split_size(50, 8, torch.empty(0), True, "pool_split", None) == (24, 3)


def test_pool_minus_inf_logits(K):
    """Logits of -inf (a token excluded from a cluster), also over a whole token range of a cluster."""
    logits, x = rand(2, 50, 5), rand(2, 50, 16)
    logits[:, :24, 0] = float("-inf")  # the first split holds nothing for cluster 0
    logits[:, 30:, 1] = float("-inf")
    logits[0, 3::4, 2] = float("-inf")
    check_against_reference(functional.cluster_pool, reference.cluster_pool, [logits, x])


def test_pool_large_logits_across_splits(K):
    """Very different maxima per token range: the combine rescaling must not overflow or underflow."""
    logits = rand(1, 60, 3) * 30.0
    logits[:, 40:, :] += 500.0  # the last range dominates
    check_against_reference(functional.cluster_pool, reference.cluster_pool, [logits, rand(1, 60, 16)], tol=2e-4)


def test_pool_logits_far_from_zero(K):
    """Logits near 1e4 that are not one-hot: the backward's probabilities come from
    ``(logits - max) - log sum`` (exact near the max), not from a float32 log-sum-exp whose
    rounding (ulp(1e4) ~ 1e-3) would scale every probability by up to 5e-4."""
    logits = 1e4 + rand(2, 50, 5)
    check_against_reference(functional.cluster_pool, reference.cluster_pool, [logits, rand(2, 50, 16)])


def test_logits_width(K):
    """The pooling kernels read a logits row's padding only when the rows are padded to 16 elements,
    cluster-contiguous, and the storage holds the last row's padding."""
    assert K.logits_width(torch.empty(2, 9, 49)) == 49  # contiguous: no padding to read
    assert K.logits_width(torch.empty(2, 9, 64)[..., :49]) == 64
    assert K.logits_width(torch.empty(2, 9, 112)[..., :100]) == 112
    assert K.logits_width(torch.empty(2, 9, 56)[..., :49]) == 49  # 56 elements: not a 16-element row
    assert K.logits_width(torch.empty(2, 64, 9).transpose(1, 2)[..., :49]) == 49  # token-contiguous
    short = torch.empty(2 * 9 * 64 - 15).as_strided((2, 9, 49), (9 * 64, 64, 1))  # the last row ends the storage
    assert K.logits_width(short) == 49
    assert K.logits_width(torch.empty(2 * 9 * 64).as_strided((2, 9, 49), (9 * 64, 64, 1))) == 64


def test_pool_wide_channels_and_many_clusters(K):
    """Several cluster tiles and channel tiles (tiled C), n smaller than one token block."""
    check_against_reference(functional.cluster_pool, reference.cluster_pool, [rand(1, 9, 70), rand(1, 9, 40)])


# ---------------------------------------------------------------------------------- attention

def _attn_grads64(q, k, v, scale, cot):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = reference.cluster_attention(*leaves, scale=scale)
    return out, torch.autograd.grad((out * cot).sum(), leaves)


@pytest.mark.parametrize("rows_per_split", [1, 5, 16, 24, 65])
def test_attention_backward_every_query_range(K, rows_per_split):
    """dk and dv summed over any number of query ranges; dq written once per query."""
    B, h, N, d, M, scale = 1, 2, 65, 32, 49, 32 ** -0.5
    q, k, v = qkv(B, h, N, d, Nk=M)
    out = K._attn_forward(q, k, v, scale)
    cot = torch.randn(B, h, N, d, dtype=torch.float64, device=DEVICE)
    out64, grads64 = _attn_grads64(q, k, v, scale, cot)
    assert_close(out, out64, F32, "out")
    grads = K._attn_backward(cot.float(), q, k, v, scale, rows_per_split=rows_per_split)
    for name, g, g64 in zip("qkv", grads, grads64):
        assert_close(g, g64, F32, f"d{name}")


@pytest.mark.parametrize("d", [8, 24, 128])
def test_attention_head_widths(K, d):
    """Head widths below 16 and not powers of two are padded inside the tile; 128 is the widest."""
    check_against_reference(lambda q, k, v: functional.cluster_attention(q, k, v),
                            lambda q, k, v: reference.cluster_attention(q, k, v), list(qkv(1, 2, 20, d, Nk=17)))


def _torch_fp32_error(fn, inputs, seed=1):
    """Largest error of ``fn`` run by PyTorch in float32 against float64 (outputs and gradients)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    out, out64 = fn(*leaves), fn(*leaves64)
    cot = torch.randn(out64.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad((out.double() * cot).sum(), leaves)
    grads64 = torch.autograd.grad((out64 * cot).sum(), leaves64)
    return max((a.double() - b).abs().max().item() for a, b in zip([out, *grads], [out64, *grads64]))


def test_attention_large_scores(K):
    """Nearly one-hot rows (scores in the hundreds): the max shift keeps exp finite. Tolerance:
    twice PyTorch's own float32 error (DESIGN, Conventions), since float32 scores of this size carry
    absolute rounding errors near 1e-5 that the softmax turns into relative errors of the outputs."""
    q, k, v = qkv(1, 2, 33, 16, Nk=49)
    inputs = [q * 6.0, k * 6.0, v]
    ref = lambda q, k, v: reference.cluster_attention(q, k, v, scale=1.0)  # noqa: E731
    tol = max(F32, 2 * _torch_fp32_error(ref, inputs))
    check_against_reference(lambda q, k, v: functional.cluster_attention(q, k, v, scale=1.0), ref, inputs, tol=tol)


def test_attention_m256_transposed_views(K):
    """The largest key set in one tile, with q, k, v as transposed views of (B, N, h, d) buffers."""
    q = rand(1, 20, 2, 16).transpose(1, 2)
    k, v = rand(1, 256, 2, 16).transpose(1, 2), rand(1, 256, 2, 16).transpose(1, 2)
    check_against_reference(lambda q, k, v: functional.cluster_attention(q, k, v),
                            lambda q, k, v: reference.cluster_attention(q, k, v), [q, k, v])


def test_declines(K):
    q, k, v = qkv(1, 1, 4, 16, Nk=256)
    assert K.cluster_attention_unsupported(q, k, v, 0.25) is None
    q2, k2, v2 = qkv(1, 1, 4, 16, Nk=257)
    assert "257 keys" in K.cluster_attention_unsupported(q2, k2, v2, 0.25)
    q3, k3, v3 = qkv(1, 1, 4, 129, Nk=3)
    assert "head width 129" in K.cluster_attention_unsupported(q3, k3, v3, 0.25)
    assert "float64" in K.cluster_attention_unsupported(q.double(), k.double(), v.double(), 0.25)
    assert K.cluster_pool_unsupported(rand(1, 4, 3), rand(1, 4, 8)) is None
    assert "float64" in K.cluster_pool_unsupported(rand(1, 4, 3).double(), rand(1, 4, 8).double())
    # forced onto the kernel, a declined input is an error naming the reason (vitpatch._backend)
    with pytest.raises(RuntimeError, match="257 keys"):
        functional.cluster_attention(q2, k2, v2)


def test_declined_inputs_use_the_torch_path_by_default(K, monkeypatch):
    if DEVICE.type != "cuda":
        pytest.skip("on CPU the default backend is the PyTorch path for every input")
    monkeypatch.delenv("VITPATCH_BACKEND")
    q, k, v = qkv(1, 1, 4, 16, Nk=257)
    assert functional.backend_for("cluster_attention", q, k, v, scale=0.25) == "torch"
    q, k, v = qkv(1, 1, 4, 16, Nk=49)
    assert functional.backend_for("cluster_attention", q, k, v, scale=0.25) == "triton"


# ------------------------------------------------------------- torch.library, torch.compile, module

def test_opcheck(K):
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of the custom ops."""
    logits = rand(2, 30, 5).requires_grad_()
    x = rand(2, 30, 16).requires_grad_()
    torch.library.opcheck(torch.ops.vitpatch.cluster_pool_fwd.default, (logits, x))
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 20, 16, Nk=7))
    torch.library.opcheck(torch.ops.vitpatch.cluster_attention_fwd.default, (q, k, v, 0.25))


def test_expanded_output_gradients(K):
    """``out.sum().backward()`` hands the kernels a stride-0 (expanded) output gradient."""
    for fn, ref, inputs in ((functional.cluster_pool, reference.cluster_pool, [rand(2, 30, 5), rand(2, 30, 16)]),
                            (functional.cluster_attention, reference.cluster_attention, list(qkv(1, 2, 20, 16, Nk=7)))):
        leaves = [t.clone().requires_grad_() for t in inputs]
        leaves64 = [t.double().requires_grad_() for t in inputs]
        fn(*leaves).sum().backward()
        ref(*leaves64).sum().backward()
        for i, (a, b) in enumerate(zip(leaves, leaves64)):
            assert_close(a.grad, b.grad, F32, f"{fn.__name__}: gradient of input {i}")


def _paca_core(K, h):
    """Pooling, LayerNorm, k/v projection and attention: the PaCa layer without its clustering net."""
    def fn(logits, x, w_q, w_kv):
        B, n, C = x.shape
        d = C // h
        z = K.cluster_pool(logits, x)
        z = F.layer_norm(z, (C,))
        q = (x @ w_q).view(B, n, h, d).transpose(1, 2)
        k, v = (z @ w_kv).view(B, -1, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        return K.cluster_attention(q, k, v, d ** -0.5)
    return fn


def test_compile_fullgraph_matches_eager(K):
    """``torch.compile(fullgraph=True)`` (aot_eager on CPU) traces the custom ops without a graph
    break and runs the same kernels: values and gradients match eager and the float64 reference."""
    torch._dynamo.reset()
    B, n, M, C, h = 2, 37, 9, 32, 2
    inputs = [rand(B, n, M), rand(B, n, C), rand(C, C) * C ** -0.5, rand(C, 2 * C) * C ** -0.5]
    fn = _paca_core(K, h)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")

    def run(f):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = f(*leaves)
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
        return [out.detach()] + list(torch.autograd.grad((out * cot).sum(), leaves))

    eager, comp = run(fn), run(compiled)
    for i, (a, b) in enumerate(zip(comp, eager)):
        assert_close(a, b, 1e-5, f"compiled vs eager, tensor {i}")

    def ref(logits, x, w_q, w_kv):
        d = C // h
        z = F.layer_norm(reference.cluster_pool(logits, x), (C,))
        q = (x @ w_q).view(B, n, h, d).transpose(1, 2)
        k, v = (z @ w_kv).view(B, -1, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        return reference.cluster_attention(q, k, v, scale=d ** -0.5)

    expected = run(lambda *t: ref(*(u.double() for u in t)))
    for i, (a, b) in enumerate(zip(comp, expected)):
        assert_close(a, b, F32, f"compiled vs float64 reference, tensor {i}")


@pytest.mark.parametrize("padded", [False, True], ids=["plain-logits", "padded-logits"])
def test_paca_attention_module_end_to_end(K, monkeypatch, padded):
    """PaCaAttention (prefix token, non-contiguous q/k/v from its projections) on the kernels,
    against the same module in float64 on the reference backend: output and every gradient; also
    with the clustering's logits in padded rows (what it writes on a GPU), read by the kernels so."""
    import vitpatch.nn as vnn
    from vitpatch.nn import PaCaAttention

    if padded:
        monkeypatch.setattr(vnn, "_PADDED_LOGITS_DEVICES", (DEVICE.type,))
        read = []
        monkeypatch.setattr(K, "logits_width", lambda t, f=K.logits_width: read.append(f(t)) or read[-1])

    attn = PaCaAttention(32, num_heads=2, qkv_bias=True, num_clusters=5, clustering="linear").eval().to(DEVICE)
    assert attn._fused(), "the module must call functional.cluster_attention"
    attn64 = copy.deepcopy(attn).double()
    x = rand(2, 1 + 36, 32)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    cot = torch.randn(2, 37, 32, dtype=torch.float64, device=DEVICE)
    out = attn(x32)
    (out.double() * cot).sum().backward()
    monkeypatch.setenv("VITPATCH_BACKEND", "reference")
    out64 = attn64(x64)
    (out64 * cot).sum().backward()
    assert_close(out, out64, F32, "output")
    assert_close(x32.grad, x64.grad, F32, "grad x")
    for (name, p), p64 in zip(attn.named_parameters(), attn64.parameters()):
        assert_close(p.grad, p64.grad, F32, f"grad {name}")
    if padded:  # the forward and the backward (dlogits and dx) read 16-wide rows of the 5 clusters
        assert read == [16, 16]


# ------------------------------------------------- the GPU configurations, run by the interpreter

def _check_pool_and_attention():
    check_against_reference(functional.cluster_pool, reference.cluster_pool,
                            [rand(2, 49, 300).transpose(1, 2), rand(2, 300, 160)])
    check_against_reference(lambda q, k, v: functional.cluster_attention(q, k, v),
                            lambda q, k, v: reference.cluster_attention(q, k, v), list(qkv(1, 2, 300, 64, Nk=101)))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over the padding
@pytest.mark.parametrize("block", [16, 128])
def test_gpu_tile_sizes(K, monkeypatch, block):
    """The tiles the GPU chooses from (token/query blocks 16..128, 64 clusters and 128 channels per
    tile, 256-row splits) give the same results, checked in the interpreter."""
    if not _interpreted(K):
        pytest.skip("on a GPU the chosen configurations run in every other test")
    from vitpatch.kernels import _launch
    for key, value in {"pool_block_m": 64, "pool_block_c": 128, "pool_split": 256, "attn_split": 256}.items():
        monkeypatch.setitem(K._INTERP, key, value)
    pool = _launch.LaunchConfig((("BLOCK_N", block),))  # the pooling's token tile
    attn = _launch.LaunchConfig((("BLOCK_M", block),))  # the attention's query tile
    pins = {"paca_pool_fwd": pool, "paca_pool_dlogits": pool, "paca_pool_dx": pool, "paca_attn_fwd": attn,
            "paca_attn_bwd": attn}
    with _launch.forcing(pins):
        _check_pool_and_attention()
        check_padded_pool(2, 300, 49, 160)  # one 64-cluster tile of a 64-wide row
        check_padded_pool(1, 300, 100, 64)  # two tiles of a 112-wide row


def test_selection_wiring(K, monkeypatch):
    """The GPU launch path (every unit's candidates timed through ``_launch.select`` with the
    launcher's own run, the attention's register-tile filter, grids from the chosen block, split
    policy from the SM count) runs end to end in the interpreter with a stand-in timer."""
    if not _interpreted(K):
        pytest.skip("on a GPU the selection runs in every other test")
    from vitpatch.kernels import _launch
    timed = []

    def bench(fn):
        fn()
        timed.append(1)
        return float(len(timed) % 5 + 1)

    monkeypatch.setattr(K, "interpreting", lambda: False)  # take the GPU branch ...
    monkeypatch.setattr(K, "_require_cuda", lambda t: None)  # ... with CPU tensors (the SM count is then 132),
    monkeypatch.setattr(_launch, "_bench", bench)  # ... still interpreted, timed by the stand-in
    # the GPU's candidate lists (the half-precision ones, the longest), not the interpreter's pinned tile
    monkeypatch.setattr(_launch, "configs", lambda unit, dtype, d: [
        c for c in _launch.candidates(unit) if c.ships("float16", d)])
    monkeypatch.setattr(_launch, "_SELECTED", {})
    check_against_reference(functional.cluster_pool, reference.cluster_pool, [rand(1, 40, 5), rand(1, 40, 16)])
    check_against_reference(lambda q, k, v: functional.cluster_attention(q, k, v),
                            lambda q, k, v: reference.cluster_attention(q, k, v), list(qkv(1, 1, 40, 16, Nk=7)))
    units = {key[0] for key in _launch._SELECTED}
    assert units == {"paca_pool_fwd", "paca_pool_dlogits", "paca_pool_dx", "paca_attn_fwd", "paca_attn_bwd"}
    # every candidate of every unit timed (the attention's all fit 16 keys of width 16), once per case
    for unit, dtype, width, *_, cands in _launch._SELECTED:
        assert cands == tuple(_launch.configs(unit, dtype, width)), unit
    assert len(timed) == sum(len(key[-1]) for key in _launch._SELECTED)


def test_paca_layer_through_functional_compiles_fullgraph(K):
    """``PaCaAttention`` (clustering, vitpatch.functional's checks and backend choice, both kernels)
    under ``torch.compile(fullgraph=True)``: no graph break, same output and gradients as eager."""
    from vitpatch.nn import PaCaAttention

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = PaCaAttention(32, num_heads=2, qkv_bias=True, num_clusters=5, clustering="paper").to(DEVICE)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    x = rand(2, 1 + 16, 32)

    def run(f):
        xx = x.detach().clone().requires_grad_()
        out = f(xx)
        return [out.detach()] + list(torch.autograd.grad(out.square().sum(), [xx] + list(layer.parameters())))

    for i, (a, b) in enumerate(zip(run(compiled), run(layer))):
        assert_close(a, b, 1e-5, f"compiled vs eager, tensor {i}")
