"""Backend choice for every op, in one place.

CUDA tensors with Triton installed and a kernel for the op → ``"triton"``; otherwise the
PyTorch path ``"torch"`` (:mod:`vitpatch.chunked`). ``VITPATCH_BACKEND=triton|torch|reference``
forces one; ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``. The reason for each choice
is logged at debug level on the ``vitpatch`` logger.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Callable, Optional, Tuple

import torch

from . import _env
from . import kernels as _kernel_package  # the (empty) package; kernel modules load lazily

log = logging.getLogger("vitpatch")

# op name -> module under vitpatch.kernels that implements it (a function of the same name)
KERNEL_MODULES = {
    "window_attention": "window_attention",
    "winft_attention": "winft_attention",
    "cluster_pool": "cluster_attention",
    "cluster_attention": "cluster_attention",
}


@torch.compiler.assume_constant_result
def _kernel_available(op: str) -> bool:
    """Whether Triton and the kernel module of ``op`` exist; imports that module when they do.

    Under ``torch.compile`` this runs once at trace time and its (constant) result is used in
    the graph: the import machinery itself cannot be traced.
    """
    if importlib.util.find_spec("triton") is None:
        return False
    name = f"vitpatch.kernels.{KERNEL_MODULES[op]}"
    try:
        if importlib.util.find_spec(name) is None:
            return False
    except ModuleNotFoundError:
        return False
    importlib.import_module(name)
    return True


def _kernel_module(op: str):
    """The (already imported) kernel module of ``op``: plain attribute lookups, traceable by dynamo."""
    return getattr(_kernel_package, KERNEL_MODULES[op])


def kernel(op: str) -> Optional[Callable]:
    """The Triton implementation of ``op``, or ``None`` when Triton or that kernel is missing."""
    if not _kernel_available(op):
        return None
    return getattr(_kernel_module(op), op, None)


def _unsupported(op: str, args: tuple) -> Optional[str]:
    """A kernel module may define ``<op>_unsupported(*args)`` returning why it cannot run these inputs."""
    check = getattr(_kernel_module(op), f"{op}_unsupported", None)
    return None if check is None else check(*args)


def _debug(msg: str, *args) -> None:
    # logging cannot be traced by torch.compile; the choice is logged in eager calls only
    if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
        log.debug(msg, *args)


def choose(op: str, *tensors: torch.Tensor, args: tuple = ()) -> Tuple[str, Optional[Callable]]:
    """Pick ``"triton"``, ``"torch"`` or ``"reference"`` for ``op`` on ``tensors``.

    Returns ``(backend, kernel_fn)``; ``kernel_fn`` is set only for ``"triton"``. ``args`` is
    handed to the kernel module's ``<op>_unsupported`` check, if it has one.
    """
    forced = _env.backend_override()
    if forced in ("torch", "reference"):
        _debug("%s: backend %s forced by VITPATCH_BACKEND", op, forced)
        return forced, None
    on_cuda = len(tensors) == 0 or (tensors[0].is_cuda and all(t.is_cuda for t in tensors[1:]))
    if forced is None and not on_cuda:  # the common CPU call: no kernel lookup (it costs more than a small op)
        _debug("%s: backend torch (CPU tensors)", op)
        return "torch", None
    fn = kernel(op)
    if forced == "triton":
        if fn is None:
            raise RuntimeError(f"VITPATCH_BACKEND=triton but no Triton kernel for {op} is available "
                               "(is triton installed?)")
        if not on_cuda and not _env.triton_interpret():
            raise RuntimeError(f"VITPATCH_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 "
                               f"(set before vitpatch.kernels is imported) for {op}")
        reason = _unsupported(op, args)
        if reason:
            raise RuntimeError(f"VITPATCH_BACKEND=triton but the {op} kernel cannot run these inputs: {reason}")
        _debug("%s: backend triton forced by VITPATCH_BACKEND", op)
        return "triton", fn
    if fn is not None and on_cuda:
        reason = _unsupported(op, args)
        if reason is None:
            _debug("%s: backend triton (CUDA tensors, kernel available)", op)
            return "triton", fn
        _debug("%s: backend torch, the kernel cannot run these inputs: %s", op, reason)
        return "torch", None
    _debug("%s: backend torch (%s)", op, "no Triton kernel" if fn is None else "CPU tensors")
    return "torch", None

