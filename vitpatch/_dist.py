"""Process-group setup shared by the commands that run under ``torchrun`` (``windows``, ``train``, ``eval``).

Nothing home-made: ``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous
variables (``--nnodes``, ``--rdzv-backend``, ``--rdzv-endpoint`` for several machines); this joins
the default process group with NCCL on CUDA and gloo on CPU.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

__all__ = ["default_device", "init_distributed", "world"]


def default_device(requested: Optional[str]) -> str:
    """``requested``, else ``"cuda"`` when a CUDA device exists, else ``"cpu"``."""
    import torch

    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(device: Optional[str]) -> Tuple[str, bool]:
    """``(device, initialised_here)``: join the torchrun process group when ``WORLD_SIZE > 1``.

    Under torchrun on CUDA each process takes ``cuda:LOCAL_RANK``; ``device="cpu"`` forces gloo.
    The caller destroys the group when ``initialised_here`` is true.
    """
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return default_device(device), False
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = device or "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        return device, True
    return device, False


def world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
