"""Every environment flag vitpatch reads, in one place, read at call time (never at import).

``VITPATCH_BACKEND``      ``triton`` | ``torch`` | ``reference``: force one backend for every op.
``VITPATCH_CHUNK_MB``     working-set budget of the PyTorch path's query chunks (default 64 MB).
``TRITON_INTERPRET``      ``1`` runs the Triton kernels on CPU tensors in Triton's interpreter.
"""
from __future__ import annotations

import os

BACKENDS = ("triton", "torch", "reference")


def _get(name: str, default: str) -> str:
    """``os.environ.get(name, default)``: read at every call, so a flag set after import counts."""
    return os.environ.get(name, default)


def backend_override() -> str | None:
    """The backend forced by ``VITPATCH_BACKEND``, or ``None`` when it is unset or empty."""
    value = _get("VITPATCH_BACKEND", "")
    if not value:  # the common call: unset
        return None
    value = value.strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"VITPATCH_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def triton_interpret() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), i.e. on CPU tensors."""
    return _get("TRITON_INTERPRET", "0").strip() not in ("", "0")


_BUDGET = ("64", 64 * 2**20)  # the last value read and its parse: every op call reads the flag


def chunk_budget_bytes() -> int:
    """Bytes one query chunk of the PyTorch path may use for its logits (``VITPATCH_CHUNK_MB``)."""
    global _BUDGET
    value = _get("VITPATCH_CHUNK_MB", "64")
    if value == _BUDGET[0]:
        return _BUDGET[1]
    try:
        mb = float(value)
    except ValueError:
        raise ValueError(f"VITPATCH_CHUNK_MB must be a number of megabytes, got {value!r}") from None
    if mb <= 0:
        raise ValueError(f"VITPATCH_CHUNK_MB must be positive, got {value!r}")
    _BUDGET = (value, int(mb * 2**20))
    return _BUDGET[1]
