"""cluster_pool and cluster_attention (docs/math.md §7): references against loops; backends against float64."""
import pytest
import torch

from vitpatch import functional, reference

from _helpers import DEVICE, TOL, assert_close, check_against_reference, dtypes_for, qkv, rand, require_kernel


def test_pool_reference_matches_loops():
    B, n, M, C = 2, 5, 3, 4
    logits, x = rand(B, n, M, dtype=torch.float64, device="cpu"), rand(B, n, C, dtype=torch.float64, device="cpu")
    z = reference.cluster_pool(logits, x)
    for b in range(B):
        for m in range(M):
            e = torch.exp(logits[b, :, m] - logits[b, :, m].max())
            a = e / e.sum()
            assert torch.allclose(z[b, m], sum(a[i] * x[b, i] for i in range(n)), atol=1e-12)


def test_attention_reference_matches_sdpa():
    q, k, v = qkv(2, 3, 7, 8, Nk=4, dtype=torch.float64, device="cpu")
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert torch.allclose(reference.cluster_attention(q, k, v, scale=0.3), expected, atol=1e-12)


@pytest.mark.parametrize("B,n,M,C", [(2, 49, 1, 16), (1, 37, 49, 24), (2, 50, 64, 32), (1, 50, 101, 16), (1, 1, 5, 8)])
@pytest.mark.parametrize("transposed", [False, True])
def test_pool_matches_reference(backend, B, n, M, C, transposed):
    require_kernel("cluster_pool", backend)
    logits = rand(B, M, n).transpose(1, 2) if transposed else rand(B, n, M)
    x = rand(B, n, C)
    check_against_reference(functional.cluster_pool, reference.cluster_pool, [logits, x])


def padded_logits_case(B, n, M, C, seed=0):
    """``(buffer, logits, x)``: logits as a ``(B, n, M)`` view of rows padded to 16 elements (the
    layout :func:`vitpatch.nn.cluster_logits` writes), NaN in the padding; ``buffer`` is the leaf."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    width = -(-M // 16) * 16
    buffer = torch.full((B, n, width), float("nan"), dtype=torch.float64)
    buffer[..., :M] = torch.randn(B, n, M, generator=g, dtype=torch.float64)
    buffer = buffer.float().to(DEVICE).requires_grad_()
    x = torch.randn(B, n, C, generator=g).to(DEVICE).requires_grad_()
    return buffer, buffer[..., :M], x


def check_padded_pool(B, n, M, C):
    """cluster_pool on padded logits rows against the float64 reference on the same values:
    z, and the gradients of logits and x; the NaN padding reaches neither."""
    buffer, logits, x = padded_logits_case(B, n, M, C)
    assert logits.stride(1) == buffer.shape[2]
    z = functional.cluster_pool(logits, x)
    logits64, x64 = logits.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    z64 = reference.cluster_pool(logits64, x64)
    assert_close(z, z64, TOL[torch.float32], "z")
    cot = torch.randn(z64.shape, generator=torch.Generator(device="cpu").manual_seed(1), dtype=torch.float64)
    cot = cot.to(DEVICE)
    d_buffer, dx = torch.autograd.grad((z.double() * cot).sum(), [buffer, x])
    dlogits64, dx64 = torch.autograd.grad((z64 * cot).sum(), [logits64, x64])
    assert_close(d_buffer[..., :M], dlogits64, TOL[torch.float32], "grad logits")
    assert_close(dx, dx64, TOL[torch.float32], "grad x")
    assert torch.count_nonzero(d_buffer[..., M:]) == 0


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over the padding
@pytest.mark.parametrize("B,n,M,C", [(2, 50, 49, 24), (1, 37, 100, 16), (2, 9, 5, 40)])
def test_pool_padded_logits_rows(backend, B, n, M, C):
    require_kernel("cluster_pool", backend)
    check_padded_pool(B, n, M, C)


def test_pool_large_logits(backend):
    require_kernel("cluster_pool", backend)
    logits = rand(2, 33, 7) * 1e4  # exp would overflow without the max shift
    x = rand(2, 33, 16)
    check_against_reference(functional.cluster_pool, reference.cluster_pool, [logits, x], tol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_pool_dtypes_noncontiguous(backend, dtype):
    require_kernel("cluster_pool", backend)
    if dtype not in dtypes_for(backend):
        pytest.skip(f"{dtype} is not run for {backend} on {DEVICE.type} (interpreter: float32 only)")
    check_against_reference(functional.cluster_pool, reference.cluster_pool,
                            [rand(2, 45, 9, dtype=dtype), rand(2, 45, 16, dtype=dtype)], noncontig=True)


@pytest.mark.parametrize("M", [1, 49, 64, 101])
@pytest.mark.parametrize("B,h,N,d", [(2, 2, 37, 16), (1, 3, 65, 32)])
def test_attention_matches_reference(backend, M, B, h, N, d):
    require_kernel("cluster_attention", backend)
    check_against_reference(lambda q, k, v: functional.cluster_attention(q, k, v),
                            lambda q, k, v: reference.cluster_attention(q, k, v), list(qkv(B, h, N, d, Nk=M)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_attention_dtypes_noncontiguous(backend, dtype):
    require_kernel("cluster_attention", backend)
    if dtype not in dtypes_for(backend):
        pytest.skip(f"{dtype} is not run for {backend} on {DEVICE.type} (interpreter: float32 only)")
    check_against_reference(lambda q, k, v: functional.cluster_attention(q, k, v, scale=0.25),
                            lambda q, k, v: reference.cluster_attention(q, k, v, scale=0.25),
                            list(qkv(2, 2, 50, 16, Nk=49, dtype=dtype)), noncontig=True)


def test_bad_input():
    with pytest.raises(ValueError, match="x has batch"):
        functional.cluster_pool(rand(2, 5, 3, device="cpu"), rand(1, 5, 4, device="cpu"))
    with pytest.raises(ValueError, match="x has 6 tokens"):
        functional.cluster_pool(rand(2, 5, 3, device="cpu"), rand(2, 6, 4, device="cpu"))
    with pytest.raises(ValueError, match="logits must have 3 dimensions"):
        functional.cluster_pool(rand(5, 3, device="cpu"), rand(2, 5, 4, device="cpu"))
    with pytest.raises(TypeError, match="dtype"):
        functional.cluster_pool(rand(2, 5, 3, device="cpu"), rand(2, 5, 4, device="cpu").double())
    q, k, v = qkv(2, 2, 5, 8, Nk=3, device="cpu")
    with pytest.raises(ValueError, match="k and v must have the same length"):
        functional.cluster_attention(q, k, v[:, :, :2])
    with pytest.raises(ValueError, match="head width"):
        functional.cluster_attention(q, k[..., :4], v)
