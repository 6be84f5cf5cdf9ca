"""Pieces the op modules share: dtypes, random inputs, autograd modes, the error check."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Optional, Sequence

from .harness import Prepared

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


def sdpa_dense_case(q, k, v, scale: float, mode: str, info: dict) -> Prepared:
    """The dense SDPA anchor (flash where the device has it) on the same inputs."""
    import torch.nn.functional as F
    return autograd_case(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), (q, k, v), mode, info=info)


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
