"""Test configuration. Runs before any test module, hence before any Triton kernel is imported.

Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors, so CI
checks every kernel without a GPU (DESIGN: tests).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _helpers import BACKEND_PARAMS, DEVICE, interpreter_problem  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request, monkeypatch):
    """Run the test under each backend: the PyTorch path and, where the op has one, the Triton kernel."""
    problem = interpreter_problem() if request.param == "triton" else None
    if problem:
        pytest.skip(problem)
    monkeypatch.setenv("VITPATCH_BACKEND", request.param)
    return request.param
