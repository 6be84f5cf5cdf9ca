"""A small cache keyed on tensors, valid while those very tensors are alive and unmodified."""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional, Sequence

import torch


class TensorCache:
    """At most ``size`` values, each made from some tensors (``None`` allowed) and other hashable
    arguments, returned again while the same tensor objects are alive and unmodified.

    An entry holds weak references and the tensors' version counters: a freed, replaced or
    modified-in-place tensor never matches (a new tensor at a freed one's address included). Used
    for what is built once per set of window tensors and shared by every layer of a model: the
    :class:`~vitpatch.WindowMask` of raw windows, the window kernels' tile schedule.
    """

    def __init__(self, size: int):
        self.size = size
        self._entries: "OrderedDict[tuple, tuple]" = OrderedDict()

    def get_or_build(self, tensors: Sequence[Optional[torch.Tensor]], extra: Hashable, build: Callable[[], Any]):
        key = (tuple(None if t is None else id(t) for t in tensors), extra)
        hit = self._entries.get(key)
        if hit is not None:
            refs, versions, value = hit
            if all((t is None and r is None) or (r is not None and r() is t and v == t._version)
                   for t, r, v in zip(tensors, refs, versions)):
                self._entries.move_to_end(key)
                return value
        value = build()
        self._entries[key] = (tuple(None if t is None else weakref.ref(t) for t in tensors),
                              tuple(None if t is None else t._version for t in tensors), value)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
