"""Every environment flag vitpatch reads, in one place, read at call time (never at import).

``VITPATCH_BACKEND``      ``triton`` | ``torch`` | ``reference``: force one backend for every op.
``VITPATCH_CHUNK_MB``     working-set budget of the PyTorch path's query chunks (default 64 MB).
``TRITON_INTERPRET``      ``1`` runs the Triton kernels on CPU tensors in Triton's interpreter.
"""
from __future__ import annotations

import os

BACKENDS = ("triton", "torch", "reference")


def _get(name: str, default: str) -> str:
    """``os.environ.get(name, default)``, a plain dict lookup where Python keeps the environment as
    one (POSIX ``os.environ._data``, which every ``os.environ[...] = ...`` updates). Every op call
    reads two flags; through ``os.environ.get`` (three Python frames) that cost 7-10 us per flag
    after an attention call had evicted them from the caches, measured at N = 65."""
    key = _KEYS.get(name)
    if key is None:
        if getattr(os.environ, "_data", None) is None or getattr(os.environ, "encodekey", None) is None:
            return os.environ.get(name, default)
        key = _KEYS[name] = os.environ.encodekey(name)
    raw = os.environ._data.get(key)
    return default if raw is None else os.environ.decodevalue(raw)


_KEYS: dict = {}   # flag name -> its key in os.environ._data, filled on first read


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
