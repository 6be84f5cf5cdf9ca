"""The launch policy of every vitpatch kernel, in one place.

Every kernel file and the compile gate (``python -m bench.compile``) read this module for:

* **Interpreter or GPU** (:func:`interpreting`): ``TRITON_INTERPRET=1`` (read at each launch,
  never at import) or an :func:`interpreter` block runs the kernels in Triton's CPU interpreter.
  Kernels are declared with :func:`kernel` and their device functions with :func:`helper`; a
  :class:`Kernel` builds its GPU (``JITFunction``) or interpreted form on first use in each
  mode, so one process can interpret kernels (tests on CPU tensors) and compile them for a GPU
  target (the gate) side by side. Interpreted kernels call their helpers as plain Python
  functions, which spares the interpreter re-patching ``triton.language`` on every helper call.
* **Dot precision** (:func:`dot_precision`): float16 and bfloat16 always run on tensor cores
  with float32 accumulation. float32 follows ``torch.get_float32_matmul_precision()``:
  ``"highest"`` (PyTorch's default) gives three-pass TF32 (``tf32x3``, on tensor cores, about
  float32 accuracy), ``"high"`` and ``"medium"`` give one-pass TF32. ``exact=True`` (WinfT's
  gate logits, a hard threshold) is ``tf32x3`` whatever the setting. IEEE float32 dots are never
  used: they run on FMA units and spill at useful tile sizes.
* **Configurations** (:data:`CANDIDATES`): per tuning unit, the candidate launch
  configurations. Which of them ship, per target (sm_90a, sm_80), precision label and
  head-width bucket, is the table ``kernels/_shipped.py`` that the compile gate writes from its
  own results (``python -m bench.compile --write-policy``): only candidates with 0 spill bytes,
  shared memory within the limit and wgmma (sm_90a, half precision) ship; the gate's reports in
  ``bench/results/`` show every candidate, pruned ones included. :func:`configs` gives what a
  launch may use now, :func:`supports` why a case is declined. Every launcher picks among them
  through :func:`select` (one candidate: it; several: timed once per case on the GPU, the
  fastest kept). :data:`INTERPRET` holds the one small pinned configuration each unit runs in the
  interpreter.
* **Names**: the attention kernels of the three ops name their arguments in one dialect (the
  schedule's build kernels share its strides and tiles, plus names of their own such as ``BR``
  for a block of windows), and every launcher passes them by keyword: tensors in capitals
  (``Q``, ``K``, ``V``, ``O``, ``DO``, ``LSE``, ...), strides ``stride_<tensor><axis>``
  (:func:`strides`; axes ``b``, ``h``, ``n``, ``d``, or ``_b`` for a per-image table), sizes
  ``B``, ``H``, ``N`` (tokens), ``M`` (clusters), ``HEAD_DIM``; tiles ``BLOCK_M`` (a program's
  query rows, or output rows: the clusters of the PaCa pooling), ``BLOCK_N`` (the key or
  reduction tile), ``BLOCK_D`` (the head width padded to a power of two).
* **The compile gate's hooks**: :func:`recording` collects the launches a launcher would make
  (on ``meta`` tensors, with nothing run) and :func:`forcing` pins a unit's configuration, so
  the gate compiles exactly what the launchers launch, with their own argument lists.

Nothing here imports ``vitpatch`` beyond :mod:`vitpatch._env` and :mod:`vitpatch._compat`, and nothing runs
at import.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import types
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from triton.runtime.jit import JITFunction

from vitpatch import _compat, _env

__all__ = ["interpreting", "interpreter", "kernel", "helper", "combine", "Kernel", "dot_precision", "precision_label",
           "strides", "LaunchConfig", "CANDIDATES", "INTERPRET", "configs", "select", "keywords", "candidates",
           "shipped", "supports", "forcing", "forced", "recording", "Launch", "num_sms", "current_target",
           "width_bucket", "TARGETS", "WIDTH_BUCKETS", "HALF", "FP32", "TF32", "ALL_DTYPES"]

# ================================================================================ interpreter
_FORCE_INTERPRET: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("vitpatch_interpret",
                                                                                 default=None)


@torch.compiler.assume_constant_result
def interpreting() -> bool:
    """Whether kernels launched now run in Triton's interpreter (CPU tensors).

    ``TRITON_INTERPRET``, unless an :func:`interpreter` block (yes) or :func:`recording` (no:
    the compile gate records GPU launches) decides. A constant under ``torch.compile`` (read once
    at trace time: dynamo before torch 2.12 cannot trace ``ContextVar.get``; see
    :mod:`vitpatch._compat`).
    """
    forced_mode = _FORCE_INTERPRET.get()
    return _env.triton_interpret() if forced_mode is None else forced_mode


def interpreter_ready() -> bool:
    """Whether this process can interpret kernels: Triton builds its own language library for the
    interpreter only when ``TRITON_INTERPRET=1`` is set before triton is first imported (and such
    a process cannot compile for a GPU target: the compile gate runs without it)."""
    import triton.language.standard as standard
    return not isinstance(standard.max, JITFunction)


@contextlib.contextmanager
def interpreter() -> Iterator[None]:
    """Run the kernels launched inside this block in Triton's interpreter (CPU tensors).

    Needs :func:`interpreter_ready`; raises ``RuntimeError`` otherwise.
    """
    if not interpreter_ready():
        raise RuntimeError("Triton's interpreter needs TRITON_INTERPRET=1 set before triton is first imported")
    token = _FORCE_INTERPRET.set(True)
    try:
        yield
    finally:
        _FORCE_INTERPRET.reset(token)


def helper(fn) -> JITFunction:
    """Declare a device function (called from kernels): a ``JITFunction`` in every mode."""
    return JITFunction(fn)


def combine(fn) -> JITFunction:
    """Declare the combine function of a ``tl.associative_scan`` or ``tl.reduce``: a ``JITFunction``
    in every mode, the interpreter's included (Triton calls its ``.fn`` there)."""
    jit = JITFunction(fn)
    jit.vitpatch_combine = True
    return jit


_PLAIN_GLOBALS: Dict[int, dict] = {}


def _plain(fn: types.FunctionType) -> types.FunctionType:
    """``fn`` rebound to a copy of its module's globals in which every device function is plain Python."""
    source = fn.__globals__
    plain = _PLAIN_GLOBALS.get(id(source))
    if plain is None:
        plain = _PLAIN_GLOBALS[id(source)] = dict(source)
        for name, value in source.items():
            if isinstance(value, JITFunction) and not getattr(value, "vitpatch_combine", False):
                plain[name] = _plain(value.fn)
    return types.FunctionType(fn.__code__, plain, fn.__name__, fn.__defaults__, fn.__closure__)


class Kernel:
    """A Triton kernel built lazily for the mode it is launched in (GPU or interpreter).

    ``kernel[grid](**arguments)`` launches it like a ``JITFunction`` (the launchers name every
    argument); :attr:`jit` is the GPU form (what the compile gate compiles). Under :func:`recording`
    a launch is recorded instead of run.
    """

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    @functools.cached_property
    def jit(self) -> JITFunction:
        return JITFunction(self.fn)

    @functools.cached_property
    def interpreted(self):
        problem = _compat.interpreter_problem()
        if problem:
            raise RuntimeError(f"cannot interpret {self.__name__}: {problem}")
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(_plain(self.fn))

    def __getitem__(self, grid):
        return _DISPATCH.get()(self, grid)

    def __repr__(self) -> str:
        return f"Kernel({self.fn.__module__}.{self.__name__})"


def _run(k: Kernel, grid):
    """How a launch runs: the interpreted or the GPU form, by the mode (:func:`interpreting`)."""
    return (k.interpreted if interpreting() else k.jit)[grid]


# what ``kernel[grid]`` returns: :func:`_run`, or inside :func:`recording` a recorder (the test
# hook stays out of the launch path: one context-variable read either way)
_DISPATCH: contextvars.ContextVar[Callable] = contextvars.ContextVar("vitpatch_dispatch", default=_run)


def kernel(fn) -> Kernel:
    """Declare a kernel (see :class:`Kernel`)."""
    return Kernel(fn)


def strides(name: str, t: torch.Tensor, axes: str = "bhnd") -> Dict[str, int]:
    """``t``'s strides as keyword arguments, named as every kernel names them: ``stride_<name><axis>``
    (``strides("q", q)``: ``stride_qb, stride_qh, stride_qn, stride_qd``)."""
    if len(axes) != t.dim():
        raise ValueError(f"axes must name each of the {t.dim()} dimensions of {name}, got {axes!r}")
    return {f"stride_{name}{a}": s for a, s in zip(axes, t.stride())}


# ================================================================================ precision
def dot_precision(dtype: torch.dtype, exact: bool = False) -> str:
    """``input_precision`` of ``tl.dot`` for operands of ``dtype`` (see the module docstring)."""
    if dtype != torch.float32:
        return "tf32"  # ignored by Triton for float16 / bfloat16 operands
    if exact or torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def precision_label(dtype: torch.dtype, exact: bool = False) -> str:
    """What a configuration must ship for: ``float16``, ``bfloat16``, ``float32`` (three-pass TF32) or ``tf32``."""
    if dtype == torch.float32:
        return "float32" if dot_precision(dtype, exact) == "tf32x3" else "tf32"
    return str(dtype).replace("torch.", "")


# ================================================================================ configurations
HALF = ("float16", "bfloat16")
FP32 = ("float32", "tf32")  # float32 operands: three-pass TF32 ("highest") and one-pass TF32
TF32 = ("tf32",)
ALL_DTYPES = HALF + FP32


@dataclass(frozen=True)
class LaunchConfig:
    """One launch configuration of a tuning unit.

    ``params``: the unit's block sizes and layout choices (constexprs), as ``(name, value)``
    pairs; ``num_warps``, ``num_stages``; ``dtypes`` (precision labels, see
    :func:`precision_label`) and the head-width range ``head_dims`` (inclusive) it ships for.
    """

    params: Tuple[Tuple[str, object], ...]
    num_warps: int = 4
    num_stages: int = 2
    dtypes: Tuple[str, ...] = ALL_DTYPES
    head_dims: Tuple[int, int] = (1, 1 << 30)

    def __getitem__(self, name: str):
        return dict(self.params)[name]

    @property
    def meta(self) -> dict:
        """The constexprs plus ``num_warps`` and ``num_stages``: the launch keywords."""
        return dict(self.params, num_warps=self.num_warps, num_stages=self.num_stages)

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.params) + f",w{self.num_warps},s{self.num_stages}"

    def ships(self, label: str, head_dim: int) -> bool:
        lo, hi = self.head_dims
        return label in self.dtypes and lo <= head_dim <= hi


def _c(num_warps: int, num_stages: int, dtypes=ALL_DTYPES, head_dims=(1, 1 << 30), **params) -> LaunchConfig:
    return LaunchConfig(tuple(params.items()), num_warps, num_stages, tuple(dtypes), tuple(head_dims))


# The candidates of every unit. What ships is what the compile gate found clean
# (python -m bench.compile --write-policy): kernels/_shipped.py lists, per candidate, target,
# precision label and head-width bucket (32, 64, 96, 128: a width is rounded up to one), the cases
# in which every kernel of the unit compiled with 0 spill bytes, shared memory within the
# target's limit and (sm_90a, half precision) wgmma in its dot kernels, in every variant the gate
# tries (key_keep or not, both WinfT modes, 49 and 100 clusters). A case that no candidate covers
# is declined (:func:`supports`) and the PyTorch path runs. ``dtypes`` / ``head_dims`` of a
# candidate only say what the gate tries it for.
_W = dict(ORDER=1, UNIT=64, QUERY_ORDER="auto")
CANDIDATES: Dict[str, List[LaunchConfig]] = {
    # Window attention (kernels/window_attention.py). BLOCK_M / BLOCK_N are the query and key tiles
    # of the patch slots; ORDER 1 = tiled key layout in UNIT-slot squares (8 x 8 for 64);
    # QUERY_ORDER "auto" picks spatial, window-sorted or grouped query tiles per image. "fwd" covers the
    # schedule and forward kernels, "bwd" the backward ones (the schedule depends on the block
    # sizes, so these units are tuned by the window kernel itself, schedule build included).
    # (64 x 32 tiles with 4 warps were dropped: with triton 3.6 the prefix-query forward spills 4 B
    # at d = 128 on sm_90a; the reports keep their rows, marked not shipped)
    # Every candidate has 3 stages: with list entries read ahead, the main loops wait only for
    # older copies (async_wait >= 1; python -m bench.cost). The forward ships 128-row query tiles
    # first: by the cost model (docs/cost_model.md) the tiles are bound by L2 traffic, and a
    # 128-row tile halves the K / V bytes per score against 64 rows, more than its larger visited
    # fraction costs (N = 577: 0.74 vs 0.71 of the tile pairs). The backward keeps 64 x 64 with 4
    # warps (2-3 resident blocks per SM; 128-row dq / dk-dv tiles predict slower).
    "window_fwd": [_c(4, 3, BLOCK_M=128, BLOCK_N=64, **_W), _c(8, 3, BLOCK_M=128, BLOCK_N=64, **_W),
                   _c(4, 3, BLOCK_M=64, BLOCK_N=64, **_W), _c(8, 3, BLOCK_M=64, BLOCK_N=32, **_W)],
    # 32 x 32 tiles (mma.sync only: a warpgroup MMA needs 64 rows) only where the 64-row ones
    # spill, above head width 64; 64 x 32 with 8 warps runs dk/dv's 32-row products on mma.sync
    # inside its main loops, so the gate ships it on sm_80 and in float32 only. (64 x 64 with 8
    # warps was dropped: its dk/dv holds 1 block per SM, and the cost model predicts its backward
    # 1.2x the 4-warp one's at every benchmark shape; 64 x 32 covers its float32 cases.)
    "window_bwd": [_c(4, 3, BLOCK_M=64, BLOCK_N=64, **_W), _c(8, 3, BLOCK_M=64, BLOCK_N=32, **_W),
                   _c(4, 3, head_dims=(65, 1 << 30), BLOCK_M=32, BLOCK_N=32, **_W)],
    # WinfT (kernels/winft_attention.py): each unit timed over its clean candidates (select); the order is the
    # cost model's (python -m bench.cost, docs/cost_model.md "WinfT"). The gate passes are GEMMs of
    # width C = H d bound by their tiles' L2 reads: 128 x 128 reads half the bytes per score of
    # 64 x 64. Pass 1 with a target (its sigmoid, softplus, target tile and the kept
    # sigmoid(g) - T) spills at 128 x 128, so it is a unit of its own. 128-row forward and dq tiles
    # halve the K / V (and sigmoid(g) - T) bytes per score; dk/dv runs 32-query tiles of a
    # 64-key block with 4 warps (64 x 64 spills with the folded tile). The gate passes' BLOCK_M
    # and BLOCK_N are multiples of 32 (pass 2a packs W^T 32 queries a word). float32 (three-pass
    # TF32) fits the backward only in 16 x 16 tiles; its dk/dv with 4 warps only up to head width
    # 32 (at 64 it spills 4 B with triton 3.6, the GPU machine's, as the 64 x 64 / 8-warp / 2-stage
    # dk/dv does in bfloat16 at 128), with 8 warps up to 64 (252 registers, no spill with triton
    # 3.6 or 3.8).
    "winft_threshold": [_c(8, 3, BLOCK_M=128, BLOCK_N=64), _c(8, 3, BLOCK_M=64, BLOCK_N=128),
                        _c(8, 3, BLOCK_M=64, BLOCK_N=64), _c(8, 2, BLOCK_M=64, BLOCK_N=32)],
    "winft_gate": [_c(8, 3, BLOCK_M=128, BLOCK_N=128), _c(8, 3, BLOCK_M=128, BLOCK_N=64),
                   _c(8, 3, BLOCK_M=64, BLOCK_N=64), _c(8, 2, BLOCK_M=64, BLOCK_N=32)],
    "winft_fwd": [_c(4, 3, BLOCK_M=128, BLOCK_N=64), _c(8, 3, BLOCK_M=128, BLOCK_N=64),
                  _c(4, 3, BLOCK_M=64, BLOCK_N=64), _c(8, 2, BLOCK_M=64, BLOCK_N=32),
                  _c(4, 1, dtypes=("float32", "tf32"), BLOCK_M=32, BLOCK_N=32)],
    "winft_dq": [_c(8, 3, BLOCK_M=128, BLOCK_N=64), _c(4, 3, BLOCK_M=64, BLOCK_N=64), _c(8, 3, BLOCK_M=64, BLOCK_N=64),
                 _c(8, 2, BLOCK_M=64, BLOCK_N=32), _c(4, 2, BLOCK_M=32, BLOCK_N=32),
                 _c(4, 1, dtypes=("float32", "tf32"), BLOCK_M=16, BLOCK_N=16)],
    "winft_dkdv": [_c(4, 3, BLOCK_M=32, BLOCK_N=64), _c(8, 3, BLOCK_M=64, BLOCK_N=64), _c(8, 2, BLOCK_M=64, BLOCK_N=32),
                   _c(8, 1, BLOCK_M=64, BLOCK_N=32),
                   _c(4, 1, dtypes=("float32", "tf32"), head_dims=(1, 32), BLOCK_M=16, BLOCK_N=16),
                   _c(8, 1, dtypes=("float32",), head_dims=(1, 64), BLOCK_M=16, BLOCK_N=16)],
    # PaCa (kernels/cluster_attention.py): BLOCK_N is the pooling's token tile (its clusters are
    # its output rows, BLOCK_M, fixed by M), BLOCK_M the attention's query tile (its keys, the M
    # clusters, are one tile). "Head width" is the channel count for the pooling units.
    # The pooling's logits tiles are 16-byte vectors when the rows are padded (as
    # vitpatch.nn.cluster_logits writes them): then the forward's token loop can keep the next
    # tiles in flight (3 stages: async_wait 2). The backward's loops run over C and M, one or two
    # iterations at the models' widths, so more stages buy them nothing.
    "paca_pool_fwd": [_c(4, 2, BLOCK_N=32), _c(8, 2, BLOCK_N=64), _c(4, 2, BLOCK_N=64), _c(8, 2, BLOCK_N=128),
                      _c(4, 3, BLOCK_N=32), _c(8, 3, BLOCK_N=64)],
    "paca_pool_dlogits": [_c(4, 2, BLOCK_N=32), _c(8, 2, BLOCK_N=64), _c(4, 2, BLOCK_N=16)],
    # float32 (three-pass TF32) dx: 32-token tiles of 4 warps spill reading padded logits rows
    # (16 B at width 32 with triton 3.8, 8 B at 64 with 3.6), 64-token tiles spill on sm_80 at
    # width 64; 32-token tiles of 8 warps are clean at every width, layout and target.
    "paca_pool_dx": [_c(4, 2, dtypes=("float16", "bfloat16", "tf32"), BLOCK_N=32), _c(8, 2, BLOCK_N=64),
                     _c(4, 2, BLOCK_N=64), _c(8, 2, dtypes=("float32",), BLOCK_N=32)],
    "paca_attn_fwd": [_c(4, 1, BLOCK_M=32), _c(4, 1, BLOCK_M=64), _c(8, 1, BLOCK_M=64)],
    # 64-row query tiles, 8 warps: every product a wgmma on sm_90a and no spills at M = 100
    # (4 warps spill 228-240 B there), 3 stages (the next tile's q and do in flight: async_wait 2);
    # 2 stages only for heads wider than 64. 32- and 16-row tiles run q k^T, do v^T and ds k on
    # mma.sync: the gate ships them on sm_90a in half precision only where no 64-row tile is clean.
    "paca_attn_bwd": [_c(8, 3, BLOCK_M=64), _c(8, 2, head_dims=(65, 1 << 30), BLOCK_M=64),
                      _c(8, 1, BLOCK_M=32), _c(8, 1, BLOCK_M=16)],
}
# The kernels each unit's configuration governs, by kernel name (the compile gate compiles a
# unit's candidates for these; a unit's driver also launches its neighbours' kernels).
_WINDOW_SCHEDULE = {"_window_code_kernel", "_cut_kernel", "_schedule_kernel", "_choice_kernel", "_slot_tables_kernel"}
UNIT_KERNELS: Dict[str, set] = {
    "window_fwd": _WINDOW_SCHEDULE | {"_fwd_kernel"},
    "window_bwd": _WINDOW_SCHEDULE | {"_transpose_kernel", "_delta_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"},
    "winft_threshold": {"_threshold_kernel"},
    "winft_gate": {"_gate_bits_kernel"},
    "winft_fwd": {"_attn_fwd_kernel", "_delta_kernel"},
    "winft_dq": {"_attn_dq_kernel"},
    "winft_dkdv": {"_attn_dkdv_kernel"},
    "paca_pool_fwd": {"_pool_fwd_kernel", "_pool_combine_kernel"},
    "paca_pool_dlogits": {"_pool_bwd_dlogits_kernel"},
    "paca_pool_dx": {"_pool_bwd_dx_kernel"},
    "paca_attn_fwd": {"_attn_fwd_kernel"},
    "paca_attn_bwd": {"_attn_bwd_kernel", "_attn_bwd_reduce_kernel"},
}
TARGETS = ("sm_90a", "sm_80")
WIDTH_BUCKETS = (32, 64, 96, 128)

# The one configuration each unit runs under the interpreter: small tiles.
INTERPRET: Dict[str, LaunchConfig] = {
    "window_fwd": _c(1, 1, BLOCK_M=16, BLOCK_N=16, ORDER=1, UNIT=16, QUERY_ORDER="auto"),
    "window_bwd": _c(1, 1, BLOCK_M=16, BLOCK_N=16, ORDER=1, UNIT=16, QUERY_ORDER="auto"),
    "winft_threshold": _c(1, 1, BLOCK_M=32, BLOCK_N=32),
    "winft_gate": _c(1, 1, BLOCK_M=32, BLOCK_N=32),  # the bits pass packs W^T 32 queries a word
    "winft_fwd": _c(1, 1, BLOCK_M=16, BLOCK_N=16),
    "winft_dkdv": _c(1, 1, BLOCK_M=16, BLOCK_N=16),
    "winft_dq": _c(1, 1, BLOCK_M=16, BLOCK_N=16),
    "paca_pool_fwd": _c(1, 1, BLOCK_N=16),
    "paca_pool_dlogits": _c(1, 1, BLOCK_N=16),
    "paca_pool_dx": _c(1, 1, BLOCK_N=16),
    "paca_attn_fwd": _c(1, 1, BLOCK_M=16),
    "paca_attn_bwd": _c(1, 1, BLOCK_M=16),
}

# Units whose gate logits must be exact (WinfT's hard threshold): float32 always three-pass TF32.
EXACT_UNITS = ("winft_threshold", "winft_gate")


def candidates(unit: str) -> List[LaunchConfig]:
    """Every candidate configuration of ``unit``, whatever dtype, head width or target."""
    if unit not in CANDIDATES:
        raise ValueError(f"unit must be one of {sorted(CANDIDATES)}, got {unit!r}")
    return list(CANDIDATES[unit])


def width_bucket(head_dim: int) -> Optional[int]:
    """The head-width bucket the gate checked for ``head_dim`` (rounded up), or None above 128."""
    return next((w for w in WIDTH_BUCKETS if head_dim <= w), None)


def current_target() -> str:
    """The compile target whose table applies now: the gate's while recording, else the current GPU's
    (compute capability 9.x: ``sm_90a``; 8.x: ``sm_80``, the Ampere build)."""
    recorded = _TARGET.get()
    if recorded is not None:
        return recorded
    major, _ = torch.cuda.get_device_capability()
    return "sm_90a" if major >= 9 else "sm_80"


def shipped(unit: str, dtype: torch.dtype, head_dim: int, target: Optional[str] = None) -> List[LaunchConfig]:
    """The candidates of ``unit`` the gate found clean for this case on ``target`` (default: now)."""
    from ._shipped import SHIPPED
    target = target or current_target()
    label = precision_label(dtype, unit in EXACT_UNITS)
    bucket = width_bucket(head_dim)
    table = SHIPPED.get(unit, {})
    return [c for c in candidates(unit) if bucket in table.get(c.label, {}).get(target, {}).get(label, ())]


def configs(unit: str, dtype: torch.dtype, head_dim: int) -> List[LaunchConfig]:
    """The configurations ``unit`` may launch now for ``dtype`` and ``head_dim``.

    In the interpreter: the pinned one. Under :func:`forcing`: the forced one. Otherwise the
    shipped ones for the current target, precision label and head width (see :func:`supports`).
    """
    pinned = forced(unit)
    if pinned is not None:
        return [pinned]
    if interpreting():
        return [INTERPRET[unit]]
    found = shipped(unit, dtype, head_dim)
    if not found and is_recording():  # the gate compiles one unit at a time; its neighbours just have to run
        found = candidates(unit)[:1]
    if not found:
        raise RuntimeError(f"no shipped {unit} configuration for {precision_label(dtype, unit in EXACT_UNITS)} "
                           f"at head width {head_dim} on {current_target()}")
    return found


def keywords(cfg: LaunchConfig) -> dict:
    """A configuration's launch keywords: its constexprs and, on a GPU, ``num_warps`` and ``num_stages``."""
    return dict(cfg.params) if interpreting() else cfg.meta


_SELECTED: Dict[tuple, LaunchConfig] = {}
_log = logging.getLogger("vitpatch.kernels")


def _bench(fn: Callable[[], object]) -> float:
    """Milliseconds of one call of ``fn`` (median of ``triton.testing.do_bench``); tests replace it."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=3, rep=10)


def select(unit: str, dtype: torch.dtype, head_dim: int, *, key: tuple = (), device: Optional[torch.device] = None,
           run: Optional[Callable[[LaunchConfig], object]] = None,
           fits: Optional[Callable[[LaunchConfig], bool]] = None) -> LaunchConfig:
    """The configuration ``unit`` launches for this call: the one launch selection of every op.

    The candidates are :func:`configs` (the interpreter's pinned one, a forced one, or those the
    compile gate shipped for the target, precision and head width), less those ``fits`` rejects
    (all of them kept if it rejects every one). One candidate: it. Several, on a GPU: the first
    call per ``(unit, dtype, head_dim, key, device)`` runs ``run(cfg)`` for each under
    ``triton.testing.do_bench`` and keeps the fastest (candidates that run out of resources are
    skipped; the choice is logged on ``vitpatch.kernels`` at DEBUG). ``key`` holds what else
    changes the best configuration (token and cluster counts, the query tiles' schedule); ``run``
    launches the unit's kernels with ``cfg`` on the call's own tensors (the work must be
    repeatable: every kernel here writes its outputs whole, no atomics). Without ``run``, or
    while the compile gate records launches, the first candidate.
    """
    cands = configs(unit, dtype, head_dim)
    if fits is not None:
        cands = [c for c in cands if fits(c)] or cands[:1]
    if len(cands) == 1 or run is None or is_recording():
        return cands[0]
    index = None if device is None else device.index
    cache_key = (unit, dtype, head_dim, tuple(key), index, tuple(cands))
    chosen = _SELECTED.get(cache_key)
    if chosen is None:
        from triton.runtime.errors import OutOfResources
        times = {}
        for cand in cands:
            try:
                times[cand] = _bench(lambda: run(cand))
            except OutOfResources as err:
                _log.debug("%s %s: %s", unit, cand.label, err)
        if not times:
            raise RuntimeError(f"no {unit} configuration fits this device for {precision_label(dtype)} at head "
                               f"width {head_dim}: every candidate ran out of resources")
        chosen = _SELECTED[cache_key] = min(times, key=times.get)
        _log.debug("%s for %s, head width %d, %s: %s (%s)", unit, dtype, head_dim, key, chosen.label,
                   ", ".join(f"{c.label} {t:.3f} ms" for c, t in times.items()))
    return chosen


@torch.compiler.assume_constant_result
def supports(units, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why the kernels of ``units`` cannot run ``dtype`` at ``head_dim`` on this GPU now, or ``None``.

    In the interpreter ``None`` (its pinned configurations run every case), unless the installed
    triton and numpy cannot interpret at all (:func:`vitpatch._compat.interpreter_problem`). Under
    ``torch.compile`` the answer is taken once at trace time (it reads the launch-policy state and
    the GPU, which traced code may not; :mod:`vitpatch._compat`).
    """
    if interpreting():
        return _compat.interpreter_problem()
    for unit in units:
        if not shipped(unit, dtype, head_dim):
            label = precision_label(dtype, unit in EXACT_UNITS)
            why = " at torch.get_float32_matmul_precision() 'highest'" if label == "float32" else ""
            return (f"no spill-free {unit} configuration ships for {label} at head width {head_dim}{why} on "
                    f"{current_target()} (kernels/_shipped.py, from the compile gate)")
    return None


# ================================================================================ gate hooks
_FORCED: contextvars.ContextVar[Dict[str, LaunchConfig]] = contextvars.ContextVar("vitpatch_forced", default={})


@contextlib.contextmanager
def forcing(pins: Dict[str, LaunchConfig]) -> Iterator[None]:
    """Pin the configuration of the given units inside this block (the compile gate, tests)."""
    token = _FORCED.set({**_FORCED.get(), **pins})
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced(unit: str) -> Optional[LaunchConfig]:
    """The configuration pinned for ``unit`` by :func:`forcing`, if any."""
    return _FORCED.get().get(unit)


@dataclass
class Launch:
    """One recorded launch: the kernel, its grid and exactly the arguments the launcher passed."""

    kernel: Kernel
    grid: object
    args: tuple
    kwargs: dict

    @property
    def named(self) -> dict:
        """Every argument by the kernel's parameter name (launches pass them by keyword)."""
        return {**dict(zip(self.kernel.jit.arg_names, self.args)), **self.kwargs}


def _record(rec: List[Launch], k: Kernel, grid, *args, **kwargs) -> None:
    rec.append(Launch(k, grid, args, kwargs))


_TARGET: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("vitpatch_target", default=None)


@contextlib.contextmanager
def recording(target: str = "sm_90a") -> Iterator[List[Launch]]:
    """Inside this block kernel launches are recorded, not run (launchers get ``meta`` tensors).

    The launchers take their GPU branch (configurations, tiles) for ``target``, whatever
    ``TRITON_INTERPRET`` says.
    """
    launches: List[Launch] = []
    dispatch = _DISPATCH.set(lambda k, grid: functools.partial(_record, launches, k, grid))
    mode = _FORCE_INTERPRET.set(False)
    tgt = _TARGET.set(target)
    try:
        yield launches
    finally:
        _TARGET.reset(tgt)
        _FORCE_INTERPRET.reset(mode)
        _DISPATCH.reset(dispatch)


def is_recording() -> bool:
    """Whether launches are recorded now (:func:`recording`): the dispatch is not the one that runs them."""
    return _DISPATCH.get() is not _run


# ================================================================================ device facts
GATE_SMS = 132  # what launchers assume while recording (an H100 SXM / H200)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``GATE_SMS`` while recording for the compile gate)."""
    if is_recording() or device.type != "cuda":
        return GATE_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
