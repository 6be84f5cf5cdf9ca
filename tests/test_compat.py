"""What differs between the supported versions (vitpatch/_compat.py): the checks and their effect."""
import importlib.util

import pytest
import torch

from vitpatch import WindowMask, _compat, functional

from _helpers import qkv

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_version_tuple():
    assert _compat.version_tuple("2.11.0+cu130") == (2, 11, 0)
    assert _compat.version_tuple("3.6.0") == (3, 6, 0) and _compat.version_tuple("2.5.0rc1") == (2, 5, 0)
    with pytest.raises(ValueError, match="version"):
        _compat.version_tuple("dev")


@pytest.mark.parametrize("triton_v, numpy_v, broken", [
    ("3.6.0", "2.4.0", True), ("3.6.0", "2.5.5", True), ("3.5.1", "2.4.6", True),
    ("3.6.0", "2.3.5", False), ("3.7.1", "2.5.5", False), ("3.8.0", "2.4.6", False)])
def test_interpreter_problem_for(triton_v, numpy_v, broken):
    """triton < 3.7 calls int() on one-element arrays in its interpreter; numpy >= 2.4 refuses that."""
    why = _compat.interpreter_problem_for(triton_v, numpy_v)
    assert (why is not None) == broken
    if broken:
        assert triton_v in why and numpy_v in why


def test_versions_names_what_matters():
    v = _compat.versions()
    assert set(v) == {"python", "torch", "triton", "numpy"} and v["torch"] == torch.__version__


@needs_triton
def test_an_unusable_interpreter_declines_the_kernels(monkeypatch):
    """With a triton / numpy pair that cannot interpret, the kernels decline CPU tensors with the
    reason (an error naming it when the Triton backend is forced); a direct interpreted launch
    raises the same reason."""
    from vitpatch.kernels import _launch
    why = "Triton's interpreter in triton 3.6.0 cannot run with numpy 2.5.5 (test)"
    monkeypatch.setattr(_compat, "interpreter_problem", lambda: why)
    monkeypatch.setattr(_launch, "interpreting", lambda: True)
    q, k, v = qkv(1, 2, 5, 16)
    mask = WindowMask(torch.tensor([[0, 0, 1, 1]] * 4), (2, 2), 1)
    assert _launch.supports(("window_fwd", "window_bwd"), torch.float32, 16) == why
    monkeypatch.setenv("VITPATCH_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="cannot run with numpy 2.5.5"):
        functional.window_attention(q, k, v, mask)
    with pytest.raises(RuntimeError, match="cannot interpret _probe: .*numpy 2.5.5"):
        _launch.Kernel(_probe).interpreted


def _probe():
    pass
