"""vitpatch: efficient window-masked (AWD), gated (WinfT) and patch-to-cluster (PaCa) attention for ViTs.

Importing the package does no work: submodules load on first use.

>>> from vitpatch import WindowMask
>>> from vitpatch.functional import window_attention, winft_attention, cluster_pool, cluster_attention
>>> from vitpatch.nn import WindowAttention, WinfTAttention, PaCaAttention
>>> from vitpatch import reference, analysis
"""
from __future__ import annotations

import importlib

from .masks import WindowMask

__version__ = "0.1.0"
__all__ = ["WindowMask", "functional", "reference", "nn", "analysis", "models", "__version__"]

_SUBMODULES = {"functional", "reference", "nn", "analysis", "models", "chunked", "cli", "kernels"}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'vitpatch' has no attribute {name!r}")
