"""winft_attention (docs/math.md §6): reference against loops; every backend against the float64 reference."""
import pytest
import torch

from vitpatch import WindowMask, functional, reference

from _helpers import DEVICE, check_against_reference, dtypes_for, qkv, random_windows, require_kernel

OP = "winft_attention"


def loop_winft(q, k, v, mode, scale, target):
    """docs/math.md §6 as loops: gate, threshold, gated softmax, BCE."""
    B, h, N, d = q.shape
    out = torch.zeros_like(q)
    T = None if target is None else target.dense(B)
    bce, gate_sum = 0.0, torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        for i in range(N):
            g = torch.stack([sum(q[b, hh, i] @ k[b, hh, j] for hh in range(h)) / h for j in range(N)])
            w = torch.sigmoid(g)
            W = w > w.mean()
            if mode == "mask":
                W[i] = True
            gate_sum[b] += W.sum()
            if T is not None:
                t = T[b, i].double()
                bce += -(t * torch.log(w) + (1 - t) * torch.log(1 - w)).sum()
            for hh in range(h):
                s = torch.stack([scale * (q[b, hh, i] @ k[b, hh, j]) for j in range(N)])
                if mode == "multiply":
                    p = torch.softmax(s * W, 0)
                else:
                    p = torch.softmax(s.masked_fill(~W, float("-inf")), 0)
                out[b, hh, i] = p @ v[b, hh]
    return out, (None if T is None else bce / (B * N * N)), gate_sum


@pytest.mark.parametrize("mode", ["multiply", "mask"])
def test_reference_matches_loops(mode):
    B, h, N, d, P, grid = 2, 3, 7, 4, 1, (2, 3)
    q, k, v = qkv(B, h, N, d, dtype=torch.float64, device="cpu")
    q = q * 2  # spread the gate so W is not trivially all-on
    target = WindowMask(random_windows(B, *grid), grid, P)
    out, loss, gs = reference.winft_attention(q, k, v, mode=mode, scale=0.4, target=target, return_gate_sum=True)
    eout, eloss, egs = loop_winft(q, k, v, mode, 0.4, target)
    assert torch.allclose(out, eout, atol=1e-12)
    assert torch.allclose(loss, torch.as_tensor(eloss, dtype=loss.dtype), atol=1e-12)
    assert torch.equal(gs.double(), egs)
    # a gated-off pair keeps logit 0 in multiply mode: its weight is > 0
    if mode == "multiply":
        probs = reference.winft_attention_probs(q, k, mode=mode, scale=0.4)
        assert (probs > 0).all()


SHAPES = [(2, 2, (3, 4), 1, 16), (1, 3, (5, 5), 0, 16), (2, 2, (1, 1), 2, 16), (1, 4, (7, 5), 2, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}h{s[1]}g{s[2][0]}x{s[2][1]}P{s[3]}")
@pytest.mark.parametrize("mode", ["multiply", "mask"])
@pytest.mark.parametrize("with_target", [False, True])
def test_matches_reference(backend, shape, mode, with_target):
    require_kernel(OP, backend)
    B, h, grid, P, d = shape
    N = P + grid[0] * grid[1]
    target = None
    if with_target:
        kk = torch.rand(B, N) > 0.2
        target = WindowMask(random_windows(B, *grid), grid, P, kk).to(DEVICE)
    q, k, v = qkv(B, h, N, d)
    fn = lambda q, k, v: functional.winft_attention(q, k, v, mode=mode, target=target, return_gate_sum=True)
    ref = lambda q, k, v: reference.winft_attention(q, k, v, mode=mode, target=target, return_gate_sum=True)
    check_against_reference(fn, ref, [q, k, v])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dtypes_and_noncontiguous(backend, dtype):
    require_kernel(OP, backend)
    if dtype not in dtypes_for(backend):
        pytest.skip(f"{dtype} is not run for {backend} on {DEVICE.type} (interpreter: float32 only)")
    B, h, grid, P, d = 2, 2, (4, 5), 1, 16
    target = WindowMask.square(grid, 1, P, device=DEVICE)
    q, k, v = qkv(B, h, P + 20, d, dtype=dtype)
    q = q * 0.5  # keep the gate away from its threshold so half precision decides W like float64
    for mode in ("multiply", "mask"):
        check_against_reference(lambda q, k, v: functional.winft_attention(q, k, v, mode=mode, target=target),
                                lambda q, k, v: reference.winft_attention(q, k, v, mode=mode, target=target),
                                [q, k, v], noncontig=True)


def test_loss_is_stable_for_large_logits(backend):
    require_kernel(OP, backend)
    grid = (2, 2)
    target = WindowMask.square(grid, 0, device=DEVICE)
    q, k, v = qkv(1, 2, 4, 16)
    q = q * 300  # |g| in the thousands: a naive log(sigmoid) would give inf
    out, loss = functional.winft_attention(q.requires_grad_(), k, v, target=target)
    assert torch.isfinite(loss) and torch.isfinite(out).all()
    loss.backward()
    assert torch.isfinite(q.grad).all()


def test_chunked_path_with_many_chunks(monkeypatch):
    monkeypatch.setenv("VITPATCH_BACKEND", "torch")
    monkeypatch.setenv("VITPATCH_CHUNK_MB", "0.001")
    B, h, grid, P = 2, 2, (5, 6), 1
    target = WindowMask(random_windows(B, *grid), grid, P)
    q, k, v = qkv(B, h, P + 30, 8)
    for mode in ("multiply", "mask"):
        check_against_reference(lambda q, k, v: functional.winft_attention(q, k, v, mode=mode, target=target),
                                lambda q, k, v: reference.winft_attention(q, k, v, mode=mode, target=target),
                                [q, k, v])


def test_return_conventions():
    q, k, v = qkv(1, 2, 5, 8, device="cpu")
    t = WindowMask.full((2, 2), 1)
    assert isinstance(functional.winft_attention(q, k, v), torch.Tensor)
    out, loss = functional.winft_attention(q, k, v, target=t)
    assert loss.dim() == 0
    out, loss, gs = functional.winft_attention(q, k, v, return_gate_sum=True)
    assert loss is None and gs.shape == (1,)


def test_bad_input():
    q, k, v = qkv(1, 2, 5, 8, device="cpu")
    f = functional.winft_attention
    with pytest.raises(ValueError, match="mode"):
        f(q, k, v, mode="soft")
    with pytest.raises(TypeError, match="target"):
        f(q, k, v, target=torch.ones(1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_prefix_tokens \\+ gh \\* gw"):
        f(q, k, v, target=WindowMask.full((2, 2), 0))
    with pytest.raises(ValueError, match="v has batch"):
        f(q, k, v.expand(2, -1, -1, -1))
