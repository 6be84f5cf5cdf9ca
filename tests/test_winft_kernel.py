"""Kernel-specific checks of the WinfT Triton kernels (kernels/winft_attention.py, docs/math.md §6).

Under the interpreter (no GPU) every case is float32 with small pinned tiles (16 x 16 attention
tiles, 32 x 32 gate tiles), so the shapes below span several tiles: the two-pass threshold is
really accumulated over key tiles, rows and keys are ragged, and the gate bits cross words.
"""
import pytest
import torch

from vitpatch import WindowMask, functional, reference

from _helpers import (DEVICE, assert_close, check_against_reference, needs_interpreter, qkv, random_windows,
                      require_kernel)

pytestmark = needs_interpreter()

OP = "winft_attention"


@pytest.fixture
def kern(monkeypatch):
    """The kernel module, with ``VITPATCH_BACKEND=triton`` so functional calls run it."""
    require_kernel(OP, "triton")
    monkeypatch.setenv("VITPATCH_BACKEND", "triton")
    from vitpatch.kernels import winft_attention as module
    return module


def _unpack(bits: torch.Tensor, N: int) -> torch.Tensor:
    """``(B, N, ceil(N/32))`` int32 words → bool ``(B, N, N)`` (bit ``j % 32`` of word ``j // 32``)."""
    j = torch.arange(N, device=bits.device)
    words = bits.long()[:, :, j // 32]
    return ((words >> (j % 32)) & 1).bool()


# ragged N over several key tiles; a head width that is not a power of two and one below 16
CASES = [
    # B, h, grid, P, d, windows per image, key_keep
    (1, 2, (3, 23), 1, 16, True, True),    # N = 70: 3 gate tiles, 5 attention tiles, 3 words per row
    (2, 3, (5, 7), 0, 24, False, True),    # N = 35, d = 24 (padded to 32), shared windows with key_keep
    (1, 2, (6, 6), 2, 8, True, False),     # N = 38, d = 8 (padded to 16)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}h{c[1]}g{c[2][0]}x{c[2][1]}P{c[3]}d{c[4]}")
@pytest.mark.parametrize("mode", ["multiply", "mask"])
def test_tiled_shapes_match_reference(kern, case, mode):
    B, h, grid, P, d, per_image, with_keep = case
    N = P + grid[0] * grid[1]
    windows = random_windows(B, *grid) if per_image else random_windows(1, *grid)[0]
    kk = (torch.rand(B, N) > 0.25) if with_keep else None
    target = WindowMask(windows, grid, P, kk).to(DEVICE)
    q, k, v = qkv(B, h, N, d)
    q = q * 1.5  # a wide gate: W is far from all-on
    fn = lambda q, k, v: functional.winft_attention(q, k, v, mode=mode, target=target, return_gate_sum=True)
    ref = lambda q, k, v: reference.winft_attention(q, k, v, mode=mode, target=target, return_gate_sum=True)
    check_against_reference(fn, ref, [q, k, v], noncontig=(B == 2))


@pytest.mark.parametrize("mode", ["multiply", "mask"])
def test_float16(kern, mode):
    """Half-precision operands (float32 accumulation) at the float16 tolerance. The interpreter runs
    float16 dots faithfully; its bfloat16 ``tl.dot`` does not, so bfloat16 is left to GPU runs."""
    B, h, grid, P, d = 2, 2, (4, 5), 1, 16
    target = WindowMask.square(grid, 1, P, key_keep=torch.rand(B, P + 20) > 0.2).to(DEVICE)
    q, k, v = qkv(B, h, P + 20, d, dtype=torch.float16)
    q = q * 0.5  # keep the gate away from its threshold so float16 decides W like float64
    check_against_reference(lambda q, k, v: functional.winft_attention(q, k, v, mode=mode, target=target),
                            lambda q, k, v: reference.winft_attention(q, k, v, mode=mode, target=target),
                            [q, k, v], noncontig=True)


@pytest.mark.parametrize("mode", ["multiply", "mask"])
def test_gate_bits_and_threshold(kern, mode):
    """The packed W (pass 2a, from the pass-1 threshold) is exactly the reference's, bit for bit."""
    B, h, N, d = 2, 2, 45, 16
    q, k, v = qkv(B, h, N, d)
    out, loss, gate_sum, lse, bits, dg = kern.winft_fwd(q, k, v, None, None, d ** -0.5, mode, 0, 1)
    assert dg.numel() == 0  # no target: nothing kept for the loss's gradient
    assert bits.shape == (2, B, N, 2) and bits.dtype == torch.int32
    _, _, used = reference.winft_parts(q.double(), k.double(), mode)
    W = _unpack(bits[0], N)
    assert torch.equal(W, used), f"{int((W != used).sum())} gate bits differ"
    assert torch.equal(_unpack(bits[1], N), used.transpose(1, 2)), "the transposed bits are not W^T"
    assert 0 < int(used.sum()) < B * N * N
    assert torch.equal(gate_sum, used.sum((1, 2)).float())
    assert float(loss) == 0.0  # no target
    # the saved log-sum-exp is that of the gated logits
    probs = reference.winft_attention_probs(q.double(), k.double(), mode=mode)
    s = d ** -0.5 * (q.double() @ k.double().transpose(-2, -1))
    s = s * used[:, None] if mode == "multiply" else s.masked_fill(~used[:, None], float("-inf"))
    assert_close(lse, torch.logsumexp(s, -1), 1e-4, "lse")
    assert_close(out, probs @ v.double(), 1e-4, "out")


@pytest.mark.parametrize("use", ["loss_only", "out_only"])
def test_one_output_used(kern, use):
    """Gradients when only the BCE loss (through g) or only the attention output feeds the objective."""
    B, h, grid, P, d = 1, 2, (4, 5), 1, 16
    N = P + 20
    target = WindowMask(random_windows(B, *grid), grid, P, torch.rand(B, N) > 0.3).to(DEVICE)
    q, k, v = qkv(B, h, N, d)
    pick = (lambda o, l: l * 7.0) if use == "loss_only" else (lambda o, l: o * 2.0)
    check_against_reference(
        lambda q, k, v: pick(*functional.winft_attention(q, k, v, mode="multiply", target=target)),
        lambda q, k, v: pick(*reference.winft_attention(q, k, v, mode="multiply", target=target)),
        [q, k, v])


def test_empty_target_rows_and_dropped_keys(kern):
    """key_keep drops every patch key: T is the prefix column only; the BCE still matches."""
    B, h, grid, P, d = 2, 2, (3, 3), 1, 16
    N = P + 9
    kk = torch.zeros(B, N, dtype=torch.bool)
    kk[:, 0] = True
    kk[1, 5] = True
    target = WindowMask.square(grid, 1, P, kk).to(DEVICE)
    q, k, v = qkv(B, h, N, d)
    check_against_reference(lambda q, k, v: functional.winft_attention(q, k, v, mode="mask", target=target),
                            lambda q, k, v: reference.winft_attention(q, k, v, mode="mask", target=target),
                            [q, k, v])


def test_unsupported_inputs(kern, monkeypatch):
    q, k, v = qkv(1, 2, 5, 8, dtype=torch.float64)
    assert "float64" in kern.winft_attention_unsupported(q, k, v, 0.3, "multiply", None, None, 0, 1)
    q2 = torch.zeros(1, 1, 4, 160)
    assert "head width" in kern.winft_attention_unsupported(q2, q2, q2, 0.1, "mask", None, None, 0, 1)
    assert kern.winft_attention_unsupported(q.float(), k.float(), v.float(), 0.3, "mask", None, None, 0, 1) is None
    with pytest.raises(RuntimeError, match="float64"):
        functional.winft_attention(q, k, v)


def test_custom_op_registration(kern):
    """torch.library.opcheck: schema, fake (meta) implementation and autograd registration of the op."""
    B, h, grid, P, d = 1, 2, (2, 3), 1, 16
    N = P + 6
    target = WindowMask(random_windows(B, *grid), grid, P, torch.rand(B, N) > 0.2).to(DEVICE)
    q, k, v = (x.requires_grad_() for x in qkv(B, h, N, d))
    args = (q, k, v, target.windows, target.key_keep, 0.25, "multiply", P, grid[1], True)
    torch.library.opcheck(kern.winft_fwd, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _compile_case(mode):
    B, h, grid, P, d = 1, 2, (3, 5), 1, 16
    N = P + 15
    target = WindowMask(random_windows(B, *grid), grid, P, torch.rand(B, N) > 0.2).to(DEVICE)
    q, k, v = qkv(B, h, N, d)
    return q, k, v, target


def _grads(fn, q, k, v):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, loss = fn(*leaves)[:2]
    (out.sum() * 0.5 + loss * 3.0).backward()
    return out.detach(), loss.detach(), [x.grad for x in leaves]


def _same_as_eager(compiled, eager, q, k, v):
    o1, l1, g1 = _grads(compiled, q, k, v)
    o2, l2, g2 = _grads(eager, q, k, v)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["multiply", "mask"])
def test_custom_op_under_compile(kern, mode):
    """The kernel entry point traced whole (fullgraph) by torch.compile matches eager, values and grads."""
    torch._dynamo.reset()
    q, k, v, target = _compile_case(mode)
    raw = (target.windows, target.key_keep, target.num_prefix_tokens, target.grid[1])
    fn = lambda q, k, v: kern.winft_attention(q, k, v, 0.3, mode, *raw)
    _same_as_eager(torch.compile(fn, fullgraph=True, backend="aot_eager"), fn, q, k, v)


def test_functional_under_compile(kern):
    """``vitpatch.functional.winft_attention`` under ``torch.compile(fullgraph=True)`` with the Triton
    backend: input checks and the backend choice trace without a graph break."""
    torch._dynamo.reset()
    q, k, v, target = _compile_case("mask")
    fn = lambda q, k, v: functional.winft_attention(q, k, v, mode="mask", target=target)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _same_as_eager(compiled, fn, q, k, v)


@pytest.mark.parametrize("mode", ["multiply", "mask"])
def test_timm_model_triton_matches_torch(kern, monkeypatch, mode):
    """A 2-block timm ViT with WinfTAttention: output, L_BCE, gate sums and parameter gradients agree
    between the Triton kernels and the PyTorch path (N = 17 with a CLS token, 3 heads of width 16)."""
    import timm

    from vitpatch.nn import WinfTAttention, winft_gate_sum, winft_loss

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=2, num_heads=3, num_classes=5,
                              attn_layer=WinfTAttention.with_options(mode=mode)).to(DEVICE).train()
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    target = WindowMask(random_windows(2, 4, 4), (4, 4), 1, torch.rand(2, 17) > 0.2).to(DEVICE)
    calls = []
    real_forward = kern._forward
    monkeypatch.setattr(kern, "_forward", lambda *a: calls.append(1) or real_forward(*a))
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("VITPATCH_BACKEND", backend)
        model.zero_grad()
        out = model(images, attn_mask=target)
        assert len(calls) == 2, f"{backend}: the kernel ran {len(calls)} times for 2 WinfT blocks"
        loss = winft_loss(model)
        (out.square().mean() + loss).backward()
        results[backend] = (out.detach(), loss.detach(), winft_gate_sum(model),
                            [p.grad.clone() for p in model.parameters()])
    (o1, l1, g1, p1), (o2, l2, g2, p2) = results["triton"], results["torch"]
    assert_close(o1, o2, 1e-4, "output")
    assert_close(l1, l2, 1e-5, "L_BCE")
    assert torch.equal(g1, g2)
    for i, (a, b) in enumerate(zip(p1, p2)):
        assert_close(a, b, 1e-4, f"gradient of parameter {i}")



def test_backward_recomputes_what_the_forward_did_not_keep(kern):
    """``sigmoid(g) - T`` kept by the forward (``keep_grad``) or recomputed by the backward's pass 1:
    the same gradients, bit for bit, and the kept tensor is exactly that product of pass 1."""
    B, h, grid, P, d = 2, 2, (4, 5), 1, 16
    N = P + 20
    target = WindowMask(random_windows(B, *grid), grid, P, torch.rand(B, N) > 0.3).to(DEVICE)
    q, k, v = qkv(B, h, N, d)
    grads = []
    for keep_grad in (True, False):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out, loss, _, _, _, dg = kern.winft_fwd(*leaves, target.windows, target.key_keep, 0.3, "multiply", P,
                                                 grid[1], keep_grad)
        assert dg.shape == ((B, N, 32) if keep_grad else (B, N, 0))
        (out.sum() + 5.0 * loss).backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    g = (q.double() @ k.double().transpose(-2, -1)).mean(1)
    T = target.dense(B).double()
    _, _, _, _, _, dg = kern.winft_fwd(q, k, v, target.windows, target.key_keep, 0.3, "multiply", P, grid[1], True)
    assert_close(dg[..., :N], torch.sigmoid(g) - T, 1e-4, "sigmoid(g) - T")


@pytest.mark.parametrize("mode", ["multiply", "mask"])
def test_shipped_tile_widths(kern, mode):
    """The GPU's tile shapes in the interpreter: 64-key attention tiles (a row's two gate words read
    as one 8-byte word, then split), 64-key dk/dv blocks over the transposed words, 64 x 128 and
    128 x 64 gate tiles (the passes split their keys differently); ragged N over two words per
    tile, gradients included."""
    from vitpatch.kernels import _launch
    B, h, grid, P, d = 1, 2, (7, 11), 1, 16
    N = P + grid[0] * grid[1]  # 78: a full 64-key tile and a partial one
    target = WindowMask(random_windows(B, *grid), grid, P, torch.rand(B, N) > 0.25).to(DEVICE)
    q, k, v = qkv(B, h, N, d)
    c = _launch.LaunchConfig
    pins = {"winft_threshold": c((("BLOCK_M", 64), ("BLOCK_N", 128)), 1, 1),
            "winft_gate": c((("BLOCK_M", 128), ("BLOCK_N", 64)), 1, 1),
            "winft_fwd": c((("BLOCK_M", 32), ("BLOCK_N", 64)), 1, 1),
            "winft_dq": c((("BLOCK_M", 32), ("BLOCK_N", 64)), 1, 1),
            "winft_dkdv": c((("BLOCK_M", 32), ("BLOCK_N", 64)), 1, 1)}
    with _launch.forcing(pins):
        check_against_reference(
            lambda q, k, v: functional.winft_attention(q, k, v, mode=mode, target=target, return_gate_sum=True),
            lambda q, k, v: reference.winft_attention(q, k, v, mode=mode, target=target, return_gate_sum=True),
            [q, k, v])
