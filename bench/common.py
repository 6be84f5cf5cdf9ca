"""Pieces the op modules share: dtypes, random inputs, autograd modes, the error check."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Optional, Sequence

from .harness import Prepared, Unsupported

DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str):
    import torch
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)


def randn(*shape, device, dtype, grad: bool = False):
    """Standard normal values drawn in float32 and rounded to ``dtype`` (a leaf when ``grad``)."""
    import torch
    t = torch.randn(*shape, device=device, dtype=torch.float32).to(torch_dtype(dtype) if isinstance(dtype, str) else dtype)
    return t.requires_grad_(grad)


def attention_inputs(case):
    """``(q, k, v, scale, info)`` of a self-attention case: ``(B, h, N, d)`` leaves (with grad
    unless the mode is ``fwd``), the default scale ``d ** -0.5`` and an empty info dict."""
    import torch
    s = case.shape
    B, h, N, d = s["B"], s["h"], s["N"], s["d"]
    grad = case.mode != "fwd"
    q, k, v = (randn(B, h, N, d, device=torch.device(case.device), dtype=case.dtype, grad=grad) for _ in range(3))
    return q, k, v, d ** -0.5, {"extra": {}}


# SDPA backends of the GPU anchors: impl name -> torch.nn.attention.SDPBackend member
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}


def attention_flop(B: int, h: int, N: int, d: int, mode: str, Nk: Optional[int] = None) -> float:
    """Matmul FLOP of dense attention: ``4 B h N Nk d`` forward (``QK^T`` and ``PV``), 2.5x that
    backward (``dV``, ``dP``, ``dS`` to ``dQ`` and ``dK``: five products of the same size)."""
    fwd = 4.0 * B * h * N * (N if Nk is None else Nk) * d
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def sdpa_dense_case(q, k, v, scale: float, mode: str, info: dict, backend: Optional[str] = None) -> Prepared:
    """The dense SDPA anchor on the same inputs: PyTorch's own backend choice (flash where the
    device has it), or one backend forced (``backend``: a key of :data:`SDPA_BACKENDS`; CUDA only,
    an ``unsupported`` row where this torch or GPU lacks it)."""
    import torch.nn.functional as F
    B, h, N, d = q.shape
    info["flop_dense"] = info["flop_visited"] = attention_flop(B, h, N, d, mode, k.shape[2])
    if backend is None:
        return autograd_case(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), (q, k, v), mode, info=info)
    if not q.is_cuda:
        raise Unsupported(f"{backend} is a CUDA anchor")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    member = getattr(SDPBackend, SDPA_BACKENDS[backend], None)
    if member is None:
        raise Unsupported(f"this torch has no SDPBackend.{SDPA_BACKENDS[backend]}")
    info["extra"]["sdpa_backend"] = SDPA_BACKENDS[backend]

    def fwd():
        with sdpa_kernel(member):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    try:
        with torch_no_grad_if(mode == "fwd"):
            fwd()
    except RuntimeError as e:  # the backend refuses this device, dtype or shape
        raise Unsupported(f"SDPBackend.{SDPA_BACKENDS[backend]}: {str(e).splitlines()[0][:160]}") from None
    return autograd_case(fwd, (q, k, v), mode, info=info)


def torch_no_grad_if(flag: bool):
    import torch
    return torch.no_grad() if flag else contextlib.nullcontext()


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def autograd_case(forward: Callable[[], Any], leaves: Sequence[Any], mode: str, **kw) -> Prepared:
    """A :class:`Prepared` for ``mode`` from a differentiable ``forward()``.

    ``fwd``: ``forward()`` under ``torch.no_grad``. ``fwd+bwd``: ``forward()`` then backward of
    every output with fixed random output gradients (ones for scalars such as losses).
    ``bwd``: the forward runs untimed in ``setup``, the step is the backward alone. ``leaves``
    get their ``.grad`` reset before each step.
    """
    import torch
    state: dict = {}

    def grads_for(outs):
        if "douts" not in state:
            gen = torch.Generator(device=outs[0].device).manual_seed(1)
            state["douts"] = tuple(
                torch.ones_like(o) if o.dim() == 0 else
                torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32).to(o.dtype)
                for o in outs)
        return state["douts"]

    if mode == "fwd":
        def step():
            with torch.no_grad():
                forward()
        return Prepared(step=step, **kw)
    if mode == "fwd+bwd":
        def step():
            outs = _as_tuple(forward())
            torch.autograd.backward(outs, grads_for(outs))
        return Prepared(step=step, grads=list(leaves), **kw)
    if mode == "bwd":
        def setup():
            state["outs"] = None
            state["outs"] = _as_tuple(forward())

        def step():
            outs = state.pop("outs")
            torch.autograd.backward(outs, grads_for(outs))
        return Prepared(step=step, setup=setup, grads=list(leaves), **kw)
    raise ValueError(f"mode must be fwd, bwd or fwd+bwd, got {mode!r}")


def max_abs_err(out, ref) -> float:
    """``max |out - ref|`` in float32 (both forward outputs)."""
    out, ref = _as_tuple(out)[0], _as_tuple(ref)[0]
    return float((out.detach().float() - ref.detach().float()).abs().max()) if out.numel() else 0.0


@contextlib.contextmanager
def forced_backend(name: Optional[str]):
    """Set ``VITPATCH_BACKEND`` for the duration (vitpatch reads it at call time)."""
    if name is None:
        yield
        return
    old = os.environ.get("VITPATCH_BACKEND")
    os.environ["VITPATCH_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VITPATCH_BACKEND", None)
        else:
            os.environ["VITPATCH_BACKEND"] = old
