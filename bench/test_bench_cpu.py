"""pytest-benchmark regression timings of vitpatch's CPU paths (never pass/fail on speed).

    python -m pytest bench/ --benchmark-only
    python -m pytest bench/ --benchmark-only --benchmark-autosave      # keep a history
    python -m pytest bench/ --benchmark-only --benchmark-compare       # against the last saved run

The project's default test run (``pytest.ini``: ``testpaths = tests``) does not collect this
file. Each benchmark prepares its inputs with the same builders as ``python -m bench`` and
records the backend that ran in ``extra_info``.
"""
from __future__ import annotations

import pytest

from bench import cluster_attention, harness, window_attention, winft_attention

pytest.importorskip("pytest_benchmark")

WINDOW_SHAPE = {"B": 2, "h": 4, "N": 197, "d": 32, "grid": [14, 14], "P": 1, "window": "awd0.23"}
WINFT_SHAPE = {"B": 2, "h": 4, "N": 197, "d": 32, "grid": [14, 14], "P": 1, "gate": "multiply"}
CLUSTER = {"B": 2, "side": 14, "h": 3}

CASES = [
    ("window_attention", window_attention.MODULE, WINDOW_SHAPE, "fwd"),
    ("window_attention", window_attention.MODULE, WINDOW_SHAPE, "fwd+bwd"),
    ("winft_attention", winft_attention.MODULE, {**WINFT_SHAPE, "loss": False}, "fwd"),
    ("winft_attention", winft_attention.MODULE, {**WINFT_SHAPE, "loss": True}, "fwd+bwd"),
    ("cluster_pool", cluster_attention.MODULE, cluster_attention.shape_for("cluster_pool", CLUSTER), "fwd+bwd"),
    ("cluster_attention", cluster_attention.MODULE, cluster_attention.shape_for("cluster_attention", CLUSTER),
     "fwd+bwd"),
    ("paca_layer", cluster_attention.MODULE, cluster_attention.shape_for("paca_layer", CLUSTER), "fwd"),
    ("paca_layer", cluster_attention.MODULE, cluster_attention.shape_for("paca_layer", CLUSTER), "fwd+bwd"),
]


@pytest.mark.parametrize("op,module,shape,mode", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_vitpatch_cpu(benchmark, op, module, shape, mode):
    import importlib

    import torch
    torch.manual_seed(0)
    case = harness.Case(module, op, "vitpatch", mode, shape, "cpu", "float32")
    prep = importlib.import_module(module).build(case, check=False)
    benchmark.extra_info.update({"backend": prep.info.get("backend"), "shape": shape, "mode": mode,
                                 "threads": torch.get_num_threads()})

    def run():
        prep.clear_grads()
        prep.run_step()

    benchmark(run)
