"""Shared test helpers: random inputs, tolerances, and comparison against the float64 reference."""
from __future__ import annotations

import importlib.util

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKEND_PARAMS = ["torch", "triton"]

# DESIGN, Conventions: absolute tolerance per dtype against the float64 reference, rtol = 0
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtypes_for(backend: str, device=DEVICE):
    """Dtypes to test a backend in: all three, except the Triton interpreter on CPU (float32, one pinned config)."""
    if backend == "triton" and device.type == "cpu":
        return [torch.float32]
    return ALL_DTYPES


def interpreter_problem():
    """Why the Triton kernels cannot run in this process's tests, or ``None``: on CPU they run in
    Triton's interpreter, which some triton / numpy pairs cannot run (:mod:`vitpatch._compat`)."""
    if DEVICE.type != "cpu" or importlib.util.find_spec("triton") is None:
        return None
    from vitpatch import _compat
    return _compat.interpreter_problem()


def needs_interpreter():
    """A ``skipif`` mark for tests that run Triton kernels (in the interpreter on CPU)."""
    import pytest
    problem = interpreter_problem()
    return pytest.mark.skipif(problem is not None, reason=problem or "")


def require_kernel(op: str, backend: str) -> None:
    """Skip a ``triton`` run for an op that has no kernel (yet), or whose kernel cannot run here
    (the interpreter of this triton / numpy pair): never report a PyTorch run as the kernel's."""
    import pytest
    from vitpatch import _backend

    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        if _backend.kernel(op) is None:
            pytest.skip(f"no Triton kernel for {op}")
        problem = interpreter_problem()
        if problem:
            pytest.skip(problem)


def rand(*shape, dtype=torch.float32, device=DEVICE, scale=1.0):
    """Random normal values, drawn in float64 and rounded to ``dtype``."""
    return (torch.randn(*shape, dtype=torch.float64, device=device) * scale).to(dtype)


def qkv(B, h, N, d, *, Nk=None, dtype=torch.float32, device=DEVICE):
    Nk = N if Nk is None else Nk
    return rand(B, h, N, d, dtype=dtype, device=device), rand(B, h, Nk, d, dtype=dtype, device=device), \
        rand(B, h, Nk, d, dtype=dtype, device=device)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (a slice of a padded buffer, differentiable)."""
    out = torch.nn.functional.pad(t, (0, 3))[..., : t.shape[-1]]
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def check_against_reference(fn, ref, inputs, *, tol=None, grad=True, noncontig=False, seed=1):
    """Compare ``fn(*inputs)`` with ``ref(*inputs in float64)``: every output and, with ``grad``,
    the gradient of a random projection of the outputs with respect to every float input.

    The float64 copies hold exactly the values of the low-precision inputs. With ``noncontig``
    ``fn`` receives non-contiguous views of its float inputs.
    """
    is_float = [isinstance(x, torch.Tensor) and x.is_floating_point() for x in inputs]
    dtype = next(x.dtype for x, f in zip(inputs, is_float) if f)
    tol = TOL[dtype] if tol is None else tol
    leaf = [x.detach().clone().requires_grad_(grad) if f else x for x, f in zip(inputs, is_float)]
    leaf64 = [x.detach().double().requires_grad_(grad) if f else x for x, f in zip(leaf, is_float)]
    run = [noncontiguous(x) if f and noncontig else x for x, f in zip(leaf, is_float)]
    out, out64 = _as_list(fn(*run)), _as_list(ref(*leaf64))
    assert len(out) == len(out64), f"{len(out)} outputs vs {len(out64)} from the reference"
    for i, (o, o64) in enumerate(zip(out, out64)):
        if o is None or o64 is None:
            assert o is None and o64 is None, f"output {i}: only one side is None"
            continue
        assert_close(o, o64, tol, f"output {i}")
    if not grad:
        return
    g = torch.Generator(device="cpu").manual_seed(seed)
    diff = [(o, o64) for o, o64 in zip(out, out64) if o is not None and o.requires_grad]
    assert diff, "no differentiable output"
    cot = [torch.randn(o64.shape, generator=g, dtype=torch.float64).to(o64.device) for _, o64 in diff]
    loss = sum((o.double() * c).sum() for (o, _), c in zip(diff, cot))
    loss64 = sum((o64 * c).sum() for (_, o64), c in zip(diff, cot))
    targets = [x for x, f in zip(leaf, is_float) if f]
    targets64 = [x for x, f in zip(leaf64, is_float) if f]
    grads = torch.autograd.grad(loss, targets, allow_unused=True)
    grads64 = torch.autograd.grad(loss64, targets64, allow_unused=True)
    for i, (gr, gr64, t) in enumerate(zip(grads, grads64, targets)):
        gr = torch.zeros_like(t) if gr is None else gr
        gr64 = torch.zeros_like(t, dtype=torch.float64) if gr64 is None else gr64
        assert_close(gr, gr64, tol, f"gradient of float input {i}")


def random_windows(B, gh, gw, generator=None):
    """Random valid windows (B, n, 4) containing their own patch."""
    n = gh * gw
    p = torch.arange(n)
    x, y = p % gw, p // gw
    r = torch.randint(0, max(gh, gw), (B, n, 4), generator=generator)
    return torch.stack([(x - r[..., 0]).clamp(min=0), (y - r[..., 1]).clamp(min=0),
                        (x + r[..., 2]).clamp(max=gw - 1), (y + r[..., 3]).clamp(max=gh - 1)], -1)


def write_square_images(root, n: int = 5, seed: int = 3):
    """``n`` 64 px RGB images in two class folders (``a``: the first 3, ``b``: the rest) under ``root``, each a
    grey field with one bright 8 x 8 square at a random place (SIFT finds it) and a little noise; returns ``root``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = root / ("a" if i < 3 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        img = np.full((64, 64, 3), 110, np.uint8)
        y, x = rng.integers(8, 56, 2)
        img[y - 4:y + 4, x - 4:x + 4] = 250
        img = (img.astype(int) + rng.integers(-8, 8, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(sub / f"img{i}.png")
    return root
