"""The ``vitpatch`` command: --help everywhere, ``windows`` (resumable) and ``analyze`` end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from vitpatch import cli

MODEL = "test_vit"  # timm's small CI ViT (embed 64, depth 6, 2 heads): fast to build
FILES = ("windows.npy", "keep.npy", "files.npy", "done.npy", "meta.json")
FIGURES = ("fig3_uncertainty_rows.png", "fig4_windows.png", "fig5_indiscriminative.png",
           "fig11_field_tendency.png", "fig12_field_size.png")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Ten random PNGs in class folders, one loose image, and a local checkpoint of the model at 64 px."""
    import timm
    from PIL import Image

    base = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(1)
    for i in range(10):
        sub = base / "data" / ("a" if i < 5 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((48 + i, 70, 3)) * 255).astype(np.uint8)).save(sub / f"{i}.png")
    Image.fromarray((rng.random((90, 120, 3)) * 255).astype(np.uint8)).save(base / "photo.png")
    torch.manual_seed(0)
    model = timm.create_model(MODEL, img_size=64, num_classes=3)
    torch.save({"state_dict": model.state_dict()}, base / "ckpt.pth")
    return base


@pytest.mark.parametrize("argv", [[]] + [[name] for name in cli.COMMANDS])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vitpatch") and "--help" in out
    if not argv:
        assert all(name in out for name in ("windows", "analyze", "demo"))
    elif argv[0] == "demo":
        assert "--out" in out and "--epochs" in out and "--seed" in out
    elif argv[0] == "eval":
        assert "--checkpoint" in out and "--data" in out and "--windows" in out and "--out" in out
    else:
        assert "--model" in out and "--checkpoint" in out and "--out" in out


def test_commands_registered_and_extensible():
    assert list(cli.COMMANDS)[:2] == ["windows", "analyze"]
    with pytest.raises(ValueError, match="already registered"):
        cli.command("windows", help="again")(lambda p: None)


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage: vitpatch" in capsys.readouterr().out


def test_entry_point_help_imports_nothing_heavy():
    """``python -m vitpatch.cli analyze --help`` in a fresh process: importing ``vitpatch.analysis`` and
    the CLI, and printing help, load neither timm nor matplotlib nor the analysis submodules."""
    code = ("import vitpatch.analysis, runpy, sys; sys.argv = ['vitpatch', 'analyze', '--help']; "
            "runpy.run_module('vitpatch.cli', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "IMAGE" in proc.stdout and "--alpha" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "vitpatch.analysis" in imported and "vitpatch.masks" in imported
    heavy = {"timm", "matplotlib", "vitpatch.analysis.maps", "vitpatch.analysis.pipeline"} & imported
    assert not heavy, f"imported at --help: {sorted(heavy)}"


@pytest.mark.parametrize("flag, value, name", [("--alpha", "0", "alpha"), ("--alpha", "1.5", "alpha"),
                                               ("--beta", "1", "beta"), ("--beta", "-0.2", "beta")])
def test_bad_fractions_are_reported(files, tmp_path, capsys, flag, value, name):
    argv = ["windows", "--model", MODEL, "--data", str(files / "data"), "--out", str(tmp_path), flag, value]
    assert cli.main(argv) == 2
    assert name in capsys.readouterr().err


def test_bad_checkpoint_and_model(files, tmp_path, capsys):
    assert cli.main(["analyze", str(files / "photo.png"), "--model", MODEL, "--out", str(tmp_path),
                     "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert cli.main(["analyze", str(files / "photo.png"), "--model", "no_such_model", "--out", str(tmp_path)]) == 2
    assert "no_such_model" in capsys.readouterr().err


def test_windows_interrupted_and_resumed_equals_one_run(files, tmp_path, capsys):
    common = ["windows", "--model", MODEL, "--checkpoint", str(files / "ckpt.pth"), "--img-size", "64",
              "--data", str(files / "data"), "--batch-size", "4", "--no-progress", "--device", "cpu"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert cli.main(common + ["--out", str(full)]) == 0
    assert "complete" in capsys.readouterr().out
    assert cli.main(common + ["--out", str(parts), "--max-batches", "1"]) == 0
    assert "incomplete" in capsys.readouterr().out
    assert np.load(parts / "done.npy").tolist() == [1, 0, 0]
    assert cli.main(common + ["--out", str(parts)]) == 0
    for f in FILES:
        assert (full / f).read_bytes() == (parts / f).read_bytes(), f
    meta = json.loads((full / "meta.json").read_text())
    assert meta["model"] == MODEL and meta["weights"].startswith("checkpoint ckpt.pth (sha256 ") and meta["grid"] == [4, 4]
    assert meta["num_prefix_tokens"] == 1 and meta["alpha"] == 0.1 and meta["beta"] == 0.2
    assert np.load(full / "windows.npy", mmap_mode="r").shape == (10, 16, 4)
    assert "random weights" not in capsys.readouterr().err


def test_analyze_writes_figures(files, tmp_path, capsys):
    out = tmp_path / "figs"
    argv = ["analyze", str(files / "photo.png"), "--model", MODEL, "--img-size", "64", "--out", str(out),
            "--alpha", "0.2", "--beta", "0.1", "--patches", "0", "5", "15", "--dpi", "60"]
    assert cli.main(argv + ["--checkpoint", str(files / "ckpt.pth")]) == 0
    captured = capsys.readouterr()
    assert "random weights" not in captured.err
    from PIL import Image

    for name in FIGURES:
        path = out / name
        assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            im.verify()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grid"] == [4, 4] and summary["full_attention_operations"] == 256
    assert 16 <= summary["effective_operations"] <= 256 and summary["dropped_patches"] == 2
    assert summary["effective_operations_with_dip"] <= summary["effective_operations"]


def test_random_weights_warning(files, tmp_path, capsys):
    out = tmp_path / "random"
    argv = ["windows", "--model", MODEL, "--img-size", "32", "--data", str(files / "data"), "--out", str(out),
            "--max-batches", "0", "--no-progress"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"no checkpoint given: {MODEL} has random weights; its windows are meaningless" in err
    assert json.loads((out / "meta.json").read_text())["weights"] == "random (no checkpoint)"
    bad = ["analyze", str(files / "photo.png"), "--model", MODEL, "--img-size", "32", "--out", str(out),
           "--patches", "99"]
    assert cli.main(bad) == 2 and "--patches" in capsys.readouterr().err
