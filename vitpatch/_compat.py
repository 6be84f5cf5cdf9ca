"""Where vitpatch depends on the versions of Python, torch, triton and numpy: every such fact in one place.

Supported (``setup.py`` says the same): Python 3.11-3.13, torch >= 2.11 with the triton release it
ships with (3.6 for torch 2.11, 3.8 for torch 2.14; the compile gate passes with both), numpy 2.x.
The GPU machine this project's GPU check runs on has Python 3.12, torch 2.11, triton 3.6 and
numpy 2.5 (``bench/gpu_image_env.sh`` builds the same stack here).

What differs between those versions, and how the code handles it:

* **Triton's CPU interpreter with numpy >= 2.4** (:func:`interpreter_problem`). Triton < 3.7
  turns a one-element array into a loop bound with ``int(array)``, which numpy 2.4 refuses
  (deprecated since numpy 1.25); triton 3.7 and later take the element first. With that pair the
  interpreter cannot run our kernels, so on CPU tensors they are declined with that reason
  (:func:`vitpatch.kernels._launch.supports`), a direct interpreted launch raises it, and the
  tests that need the interpreter skip with it. GPU launches are not affected.
* **``torch.compile`` before torch 2.12**: dynamo cannot trace ``ContextVar.get``, which the
  launch policy's state (interpreter, recording, forced configurations, compile target) is kept
  in. On every version, the functions that read that state from traced code
  (:func:`vitpatch.kernels._launch.interpreting`, :func:`~vitpatch.kernels._launch.supports`,
  and :func:`vitpatch._backend._kernel_available`) are marked
  ``torch.compiler.assume_constant_result``: their answer is taken once, at trace time, and is a
  constant of the graph. Changing the backend flags after a model was compiled therefore needs
  ``torch._dynamo.reset()``, as for any Python state a compiled graph has read.

Nothing here runs at import; each check is computed once, on first use.
"""
from __future__ import annotations

import functools
import re
from typing import Optional, Tuple

def version_tuple(text: str) -> Tuple[int, ...]:
    """``"2.11.0+cu130"`` -> ``(2, 11, 0)``: the leading dotted integers of a version string."""
    m = re.match(r"\d+(?:\.\d+)*", text.strip())
    if m is None:
        raise ValueError(f"version must start with a number, got {text!r}")
    return tuple(int(p) for p in m.group(0).split("."))


def interpreter_problem_for(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why Triton's CPU interpreter cannot run vitpatch's kernels with these versions, or ``None``."""
    if version_tuple(triton_version)[:2] < (3, 7) and version_tuple(numpy_version)[:2] >= (2, 4):
        return (f"Triton's interpreter in triton {triton_version} cannot run with numpy {numpy_version} "
                "(it calls int() on one-element arrays, which numpy >= 2.4 refuses; triton >= 3.7 or "
                "numpy < 2.4 works)")
    return None


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> Optional[str]:
    """:func:`interpreter_problem_for` the installed triton and numpy (``None`` without triton)."""
    import numpy
    try:
        import triton
    except ImportError:
        return None
    return interpreter_problem_for(triton.__version__, numpy.__version__)


def versions() -> dict:
    """The versions that matter here, as strings (for logs and benchmark rows)."""
    import platform

    import numpy
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "numpy": numpy.__version__}
