"""Backend choice in one place: defaults, VITPATCH_BACKEND, and clear errors."""
import logging

import pytest
import torch

from vitpatch import WindowMask, functional

from _helpers import qkv


def test_cpu_default_is_the_torch_path(monkeypatch, caplog):
    monkeypatch.delenv("VITPATCH_BACKEND", raising=False)
    q, k, v = qkv(1, 1, 4, 8, device="cpu")
    assert functional.backend_for("window_attention", q) == "torch"
    with caplog.at_level(logging.DEBUG, logger="vitpatch"):
        functional.window_attention(q, k, v, WindowMask.full((2, 2)))
    assert "backend torch" in caplog.text


def test_forced_reference(monkeypatch):
    monkeypatch.setenv("VITPATCH_BACKEND", "reference")
    q, k, v = qkv(1, 1, 4, 8, device="cpu")
    assert functional.backend_for("cluster_attention", q) == "reference"
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
    assert functional.backend_for("window_attention", q) == "torch"
    assert _env.chunk_budget_bytes() == 64 * 2**20
    monkeypatch.setenv("VITPATCH_BACKEND", " Reference ")
    monkeypatch.setenv("VITPATCH_CHUNK_MB", "0.5")
    assert functional.backend_for("window_attention", q) == "reference"
    assert _env.chunk_budget_bytes() == 2**19
    monkeypatch.setenv("VITPATCH_BACKEND", "  ")  # blank: no override
    assert _env.backend_override() is None
    monkeypatch.delenv("VITPATCH_BACKEND")
    monkeypatch.delenv("VITPATCH_CHUNK_MB")
    assert _env.backend_override() is None and _env.chunk_budget_bytes() == 64 * 2**20
