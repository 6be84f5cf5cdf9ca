"""Backend choice in one place: defaults, VITPATCH_BACKEND, and clear errors."""
import logging

import pytest
import torch

from vitpatch import WindowMask, functional

from _helpers import qkv


def test_cpu_default_is_the_torch_path(monkeypatch, caplog):
    monkeypatch.delenv("VITPATCH_BACKEND", raising=False)
    q, k, v = qkv(1, 1, 4, 8, device="cpu")
    assert functional.backend_for("window_attention", q, k, v, WindowMask.full((2, 2))) == "torch"
    with caplog.at_level(logging.DEBUG, logger="vitpatch"):
        functional.window_attention(q, k, v, WindowMask.full((2, 2)))
    assert "backend torch" in caplog.text


def test_forced_reference(monkeypatch):
    monkeypatch.setenv("VITPATCH_BACKEND", "reference")
    q, k, v = qkv(1, 1, 4, 8, device="cpu")
    assert functional.backend_for("cluster_attention", q, k, v) == "reference"
    out = functional.window_attention(q, k, v, WindowMask.full((2, 2)))
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6)


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("VITPATCH_BACKEND", "cuda")
    q, k, v = qkv(1, 1, 4, 8, device="cpu")
    with pytest.raises(ValueError, match="VITPATCH_BACKEND"):
        functional.cluster_attention(q, k, v)
    with pytest.raises(ValueError, match="op must be one of"):
        functional.backend_for("flash", q)


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("VITPATCH_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv(1, 1, 4, 8, device="cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET|no Triton kernel"):
        functional.cluster_attention(q, k, v)


def test_bad_chunk_budget(monkeypatch):
    monkeypatch.setenv("VITPATCH_BACKEND", "torch")
    monkeypatch.setenv("VITPATCH_CHUNK_MB", "lots")
    q, k, v = qkv(1, 1, 4, 8, device="cpu")
    with pytest.raises(ValueError, match="VITPATCH_CHUNK_MB"):
        functional.window_attention(q, k, v, WindowMask.full((2, 2)))


def test_import_does_no_work():
    import subprocess
    import sys

    code = ("import sys, vitpatch; mods = [m for m in ('vitpatch.functional', 'vitpatch.kernels', 'timm', "
            "'triton', 'vitpatch.analysis') if m in sys.modules]; print(mods)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_flags_are_read_at_call_time(monkeypatch):
    from vitpatch import _env
    q, k, v = qkv(1, 1, 4, 8, device="cpu")
    monkeypatch.delenv("VITPATCH_BACKEND", raising=False)
    monkeypatch.delenv("VITPATCH_CHUNK_MB", raising=False)
    assert functional.backend_for("window_attention", q, k, v, WindowMask.full((2, 2))) == "torch"
    assert _env.chunk_budget_bytes() == 64 * 2**20
    monkeypatch.setenv("VITPATCH_BACKEND", " Reference ")
    monkeypatch.setenv("VITPATCH_CHUNK_MB", "0.5")
    assert functional.backend_for("window_attention", q, k, v, WindowMask.full((2, 2))) == "reference"
    assert _env.chunk_budget_bytes() == 2**19
    monkeypatch.setenv("VITPATCH_BACKEND", "  ")  # blank: no override
    assert _env.backend_override() is None
    monkeypatch.delenv("VITPATCH_BACKEND")
    monkeypatch.delenv("VITPATCH_CHUNK_MB")
    assert _env.backend_override() is None and _env.chunk_budget_bytes() == 64 * 2**20


def test_backend_for_takes_the_ops_own_arguments(monkeypatch):
    """``backend_for`` validates and answers for exactly the call it is given, with the op's own
    arguments (keywords included): bad arguments raise as the op would."""
    monkeypatch.delenv("VITPATCH_BACKEND", raising=False)
    q, k, v = qkv(1, 2, 5, 8, device="cpu")
    win = torch.tensor([[0, 0, 1, 1]] * 4, dtype=torch.int32)
    assert functional.backend_for("window_attention", q, k, v, win, grid=(2, 2), num_prefix_tokens=1) == "torch"
    assert functional.backend_for("winft_attention", q, k, v, mode="mask") == "torch"
    assert functional.backend_for("cluster_pool", torch.randn(1, 5, 3), torch.randn(1, 5, 8)) == "torch"
    assert functional.backend_for("cluster_attention", q, k[:, :, :3], v[:, :, :3], scale=0.5) == "torch"
    with pytest.raises(ValueError, match="scale"):
        functional.backend_for("cluster_attention", q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="mode"):
        functional.backend_for("winft_attention", q, k, v, mode="add")
    with pytest.raises(TypeError):
        functional.backend_for("window_attention", q)  # the windows are missing, as for the op
    from vitpatch import _backend
    assert set(functional._CALLS) == set(_backend.KERNEL_MODULES)
