"""window_attention (docs/math.md §1): reference against loops; every backend against the float64 reference."""
import math

import pytest
import torch

from vitpatch import WindowMask, functional, reference

from _helpers import (DEVICE, check_against_reference, dtypes_for, qkv, random_windows,
                      require_kernel)

OP = "window_attention"


def loop_window_attention(q, k, v, mask, scale):
    """docs/math.md §1 as plain loops over (b, head, query)."""
    B, h, N, d = q.shape
    allowed = mask.dense(B)
    out = torch.zeros_like(q)
    for b in range(B):
        for hh in range(h):
            for i in range(N):
                js = [j for j in range(N) if allowed[b, i, j]]
                if not js:
                    continue
                logits = torch.stack([scale * (q[b, hh, i] @ k[b, hh, j]) for j in js])
                p = torch.softmax(logits, 0)
                out[b, hh, i] = sum(pj * v[b, hh, j] for pj, j in zip(p, js))
    return out


@pytest.mark.parametrize("P,shared", [(0, True), (1, False), (2, False)])
def test_reference_matches_loops(P, shared):
    grid, B, h, d = (3, 4), 2, 2, 5
    N = P + 12
    w = random_windows(B, *grid)
    kk = torch.rand(B, N) > 0.25
    kk[1] = False  # an image with every key dropped: zeros
    mask = WindowMask(w[0] if shared else w, grid, P, kk)
    q, k, v = qkv(B, h, N, d, dtype=torch.float64, device="cpu")
    out = reference.window_attention(q, k, v, mask, scale=0.3)
    assert torch.allclose(out, loop_window_attention(q, k, v, mask, 0.3), atol=1e-12)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


# shapes: (B, h, grid, P, d); odd N, N not a multiple of any tile, n = 1
SHAPES = [
    (2, 2, (5, 7), 1, 16),
    (1, 3, (4, 4), 0, 32),
    (2, 1, (1, 1), 2, 16),
    (3, 2, (6, 5), 2, 16),
    (1, 2, (9, 11), 1, 16),
]


def _mask(kind, B, grid, P, device):
    gen = torch.Generator().manual_seed(3)
    n = grid[0] * grid[1]
    if kind == "shared":
        return WindowMask(random_windows(1, *grid, gen)[0], grid, P).to(device)
    if kind == "per_image":
        return WindowMask(random_windows(B, *grid, gen), grid, P).to(device)
    if kind == "self":
        return WindowMask.square(grid, 0, P, device=device)
    if kind == "full":
        return WindowMask.full(grid, P, device=device)
    if kind == "keep":  # dropped keys, and the last image with every key dropped
        kk = torch.rand(B, P + n, generator=gen) > 0.3
        kk[-1] = False
        return WindowMask(random_windows(B, *grid, gen), grid, P, kk).to(device)
    raise AssertionError(kind)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}h{s[1]}g{s[2][0]}x{s[2][1]}P{s[3]}d{s[4]}")
@pytest.mark.parametrize("kind", ["shared", "per_image", "self", "full", "keep"])
def test_matches_reference(backend, shape, kind):
    require_kernel(OP, backend)
    B, h, grid, P, d = shape
    N = P + grid[0] * grid[1]
    mask = _mask(kind, B, grid, P, DEVICE)
    q, k, v = qkv(B, h, N, d, dtype=torch.float32)
    check_against_reference(lambda q, k, v: functional.window_attention(q, k, v, mask),
                            lambda q, k, v: reference.window_attention(q, k, v, mask), [q, k, v])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dtypes_and_noncontiguous(backend, dtype):
    require_kernel(OP, backend)
    if dtype not in dtypes_for(backend):
        pytest.skip(f"{dtype} is not run for {backend} on {DEVICE.type} (interpreter: float32 only)")
    B, h, grid, P, d = 2, 2, (5, 5), 1, 16
    mask = _mask("keep", B, grid, P, DEVICE)
    q, k, v = qkv(B, h, P + 25, d, dtype=dtype)
    check_against_reference(lambda q, k, v: functional.window_attention(q, k, v, mask, scale=0.2),
                            lambda q, k, v: reference.window_attention(q, k, v, mask, scale=0.2),
                            [q, k, v], noncontig=True)


def test_tensor_windows_and_layout_arguments(backend):
    require_kernel(OP, backend)
    grid, P, B = (3, 3), 1, 2
    w = random_windows(B, *grid).to(DEVICE)
    kk = (torch.rand(B, P + 9) > 0.2).to(DEVICE)
    q, k, v = qkv(B, 2, P + 9, 16)
    a = functional.window_attention(q, k, v, w, grid=grid, num_prefix_tokens=P, key_keep=kk)
    b = reference.window_attention(q.double(), k.double(), v.double(), WindowMask(w, grid, P, kk))
    assert (a.double() - b).abs().max() < 1e-4


def test_empty_rows_give_zero_and_finite_gradients(backend):
    require_kernel(OP, backend)
    grid, P, B = (2, 3), 1, 2
    kk = torch.ones(B, P + 6, dtype=torch.bool)
    kk[0] = False
    mask = WindowMask(WindowMask.square(grid, 0).windows, grid, P, kk.to(DEVICE))
    q, k, v = (t.requires_grad_() for t in qkv(B, 2, P + 6, 16))
    out = functional.window_attention(q, k, v, mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[0], torch.zeros_like(t.grad[0]))


def test_chunked_path_with_many_chunks(monkeypatch):
    """The PyTorch path with a tiny chunk budget: many chunks, restricted key sets, same answer."""
    monkeypatch.setenv("VITPATCH_BACKEND", "torch")
    monkeypatch.setenv("VITPATCH_CHUNK_MB", "0.001")
    B, h, grid, P = 2, 2, (7, 9), 2
    for kind in ("per_image", "keep", "self"):
        mask = _mask(kind, B, grid, P, DEVICE)
        q, k, v = qkv(B, h, P + 63, 8)
        check_against_reference(lambda q, k, v: functional.window_attention(q, k, v, mask),
                                lambda q, k, v: reference.window_attention(q, k, v, mask), [q, k, v])


def test_chunked_path_never_allocates_h_n_n(monkeypatch):
    """The PyTorch path's largest tensor stays far below h * N * N elements."""
    monkeypatch.setenv("VITPATCH_BACKEND", "torch")
    monkeypatch.setenv("VITPATCH_CHUNK_MB", "1")
    from vitpatch import chunked

    B, h, grid, P, d = 1, 4, (32, 32), 1, 16
    N = P + 1024
    mask = WindowMask.square(grid, 3, P)
    q, k, v = (t.requires_grad_() for t in qkv(B, h, N, d, device="cpu"))
    largest = []
    real_chunk = chunked._window_chunk_graph

    def spy(*a):
        inputs, out = real_chunk(*a)
        largest.append(B * h * inputs[0].shape[2] * inputs[1].shape[2])  # the chunk's logits
        return inputs, out

    monkeypatch.setattr(chunked, "_window_chunk_graph", spy)
    functional.window_attention(q, k, v, mask).sum().backward()
    assert max(largest) * 8 < h * N * N
    assert len(largest) > 4


def test_default_scale(backend):
    require_kernel(OP, backend)
    mask = WindowMask.full((2, 2), 0, device=DEVICE)
    q, k, v = qkv(1, 1, 4, 16)
    a = functional.window_attention(q, k, v, mask)
    b = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (a - b).abs().max() < 1e-5
    c = functional.window_attention(q, k, v, mask, scale=1 / math.sqrt(16))
    assert (a - c).abs().max() < 1e-6


def test_bad_input():
    grid, P = (2, 3), 1
    mask = WindowMask.full(grid, P)
    q, k, v = qkv(2, 2, 7, 8, device="cpu")
    f = functional.window_attention
    with pytest.raises(ValueError, match="num_prefix_tokens \\+ gh \\* gw"):
        f(q[:, :, :6], k[:, :, :6], v[:, :, :6], mask)
    with pytest.raises(ValueError, match="k has batch"):
        f(q, k[:1], v, mask)
    with pytest.raises(ValueError, match="heads"):
        f(q, k[:, :1], v, mask)
    with pytest.raises(ValueError, match="head width"):
        f(q, k[..., :4], v, mask)
    with pytest.raises(ValueError, match="length"):
        f(q, k[:, :, :6], v[:, :, :6], mask)
    with pytest.raises(TypeError, match="dtype"):
        f(q, k.double(), v, mask)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        f(q.numpy(), k, v, mask)
    with pytest.raises(ValueError, match="grid is required"):
        f(q, k, v, mask.windows)
    with pytest.raises(TypeError, match="integer"):
        f(q, k, v, mask.windows.float(), grid=grid, num_prefix_tokens=P)
    with pytest.raises(ValueError, match="inside the grid"):
        f(q, k, v, mask.windows + 1, grid=grid, num_prefix_tokens=P)
    with pytest.raises(ValueError, match="scale"):
        f(q, k, v, mask, scale=-1.0)
    with pytest.raises(ValueError, match="batch"):
        f(q, k, v, WindowMask(mask.windows.expand(3, -1, -1), grid, P))


def test_torch_path_backward_twice_with_retain_graph(monkeypatch):
    """The saved probabilities survive a first backward with retain_graph=True."""
    monkeypatch.setenv("VITPATCH_BACKEND", "torch")
    mask = WindowMask.square((3, 3), 1, 1)
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 10, 8, device="cpu"))
    out = functional.window_attention(q, k, v, mask)
    g1 = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    g2 = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_raw_windows_reuse_one_mask_while_unchanged(monkeypatch):
    """Tensor windows passed to window_attention are validated into a WindowMask once while the same
    tensors are unchanged (every layer of a model passes the same ones); a changed tensor, or a new
    one, builds a new mask; bad windows are still refused."""
    from vitpatch import _checks, masks
    built = []
    real = masks.WindowMask.__init__

    def counting(self, *a, **kw):
        built.append(1)
        real(self, *a, **kw)
    monkeypatch.setattr(masks.WindowMask, "__init__", counting)
    _checks._RAW_MASKS.clear()
    grid = (3, 4)
    windows = random_windows(2, *grid, torch.Generator().manual_seed(0))
    keep = torch.rand(2, 13, generator=torch.Generator().manual_seed(1)) > 0.3
    q, k, v = qkv(2, 2, 13, 8)
    first = functional.window_attention(q, k, v, windows, grid=grid, num_prefix_tokens=1, key_keep=keep)
    again = functional.window_attention(q, k, v, windows, grid=grid, num_prefix_tokens=1, key_keep=keep)
    assert torch.equal(first, again) and len(built) == 1
    ref = reference.window_attention(q, k, v, WindowMask(windows, grid, 1, keep))
    assert (first - ref).abs().max() < 1e-5
    windows[0, 0] = torch.tensor([0, 0, 3, 2])  # in place: a new version
    functional.window_attention(q, k, v, windows, grid=grid, num_prefix_tokens=1, key_keep=keep)
    functional.window_attention(q, k, v, windows.clone(), grid=grid, num_prefix_tokens=1, key_keep=keep)
    assert len(built) == 4
    bad = windows.clone()
    bad[0, 0, 2] = 9
    with pytest.raises(ValueError, match="inside the grid"):
        functional.window_attention(q, k, v, bad, grid=grid, num_prefix_tokens=1, key_keep=keep)
