"""The main job, reduced: `vitpatch demo` end to end on a subset with a few steps per model."""
import json
import os

import pytest

from vitpatch.cli import main
from vitpatch.demo import DemoConfig, run_demo

MODELS = ["ViT", "AWD-ViT", "AWD-ViT+DIP", "WinfT", "PaCa-ViT"]


def _png_ok(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000


def test_demo_reduced_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    cfg = DemoConfig(out=str(out), epochs=2, max_steps=4, subset=128, seed=3, device="cpu", num_clusters=8)
    summary = run_demo(cfg)
    with open(out / "summary.json") as f:
        on_disk = json.load(f)
    assert on_disk["models"] == json.loads(json.dumps(summary["models"]))
    assert [r["model"] for r in summary["models"]] == MODELS
    n = 64
    for r in summary["models"]:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["steps"] == 4 and r["train_time_s"] > 0
        assert 0 < r["eo"] <= n * n
        assert r["backend"]
    eo = {r["model"]: r["eo"] for r in summary["models"]}
    assert eo["ViT"] == n * n
    assert eo["AWD-ViT+DIP"] <= eo["AWD-ViT"] < n * n  # windows from this run's U
    assert eo["PaCa-ViT"] == n * 8
    for name in summary["figures"]:
        assert _png_ok(out / name), name
    assert set(summary["figures"]) >= {"u_matrix.png", "windows.png", "responsive_field.png", "clusters.png",
                                       "accuracy_vs_eo.png"}
    table = capsys.readouterr().out
    assert all(m in table for m in MODELS) and "EO" in table


def test_demo_results_depend_on_seed(tmp_path):
    """Nothing is hard-coded: another seed gives other losses and windows."""
    runs = []
    for seed in (0, 1):
        cfg = DemoConfig(out=str(tmp_path / f"s{seed}"), epochs=1, max_steps=2, subset=64, seed=seed, device="cpu")
        runs.append(run_demo(cfg))
    loss = [[r["final_train_loss"] for r in s["models"]] for s in runs]
    assert loss[0] != loss[1]
    assert runs[0]["analysis"]["eo_awd"] != runs[1]["analysis"]["eo_awd"]


def test_demo_cli_help_and_bad_input(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--epochs" in capsys.readouterr().out
    assert main(["demo", "--alpha", "0"]) == 2
    assert "alpha" in capsys.readouterr().err
    with pytest.raises(ValueError, match="epochs"):
        DemoConfig(epochs=0)
