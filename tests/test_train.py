"""``vitpatch train`` / ``vitpatch eval`` end to end on a tiny ImageFolder (digits written as PNGs), on CPU.

What the issue asks to see: windows then window / WinfT / PaCa-ViT training with RandomResizedCrop
and flip, then eval; torchrun (gloo) against one process; an interrupted and resumed run against
an uninterrupted one; clear errors that leave nothing written.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vitpatch import cli

MODEL = "vit_digits_patch4_32"
FAST = ["--no-progress", "--workers", "0", "--batch-size", "16", "--lr", "2e-3", "--warmup-epochs", "0",
        "--img-size", "32"]


def _write_folder(root, per_class_train=16, per_class_val=8, classes=(0, 1, 2)):
    """A tiny ImageFolder of 32x32 digits (RGB PNGs): 3 classes, 48 training and 24 validation images."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    px = (x[:, 0] * 255).round().to(torch.uint8).numpy()
    for c in classes:
        idx = np.flatnonzero(d.target == c)[:per_class_train + per_class_val]
        for j, i in enumerate(idx):
            split = "train" if j < per_class_train else "val"
            os.makedirs(root / split / str(c), exist_ok=True)
            Image.fromarray(px[i]).convert("RGB").save(root / split / str(c) / f"{i:04d}.png")
    return root


def _run(argv):
    assert cli.main(argv) == 0, argv


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _state(path, key="state_dict"):
    return torch.load(path, map_location="cpu", weights_only=True)[key]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The folder, a dense ViT trained on it for one epoch, and its windows for both splits."""
    base = tmp_path_factory.mktemp("train")
    data = _write_folder(base / "data")
    _run(["train", "--data", str(data), "--model", MODEL, "--out", str(base / "dense"), "--epochs", "1",
          "--no-plots", *FAST])
    for split in ("train", "val"):
        _run(["windows", "--model", MODEL, "--checkpoint", str(base / "dense" / "last.pth.tar"), "--data",
              str(data / split), "--out", str(base / "windows" / split), "--batch-size", "8", "--no-progress"])
    return base


@pytest.mark.parametrize("attention,extra", [
    ("window", ["--dip", "tokens"]),
    ("winft", ["--dip", "keys", "--lambda2", "0.5", "--amp"]),
    ("paca", []),
])
def test_windows_train_eval(setup, attention, extra):
    """Windows from `vitpatch windows`, 2 epochs with RandomResizedCrop + flip, then `vitpatch eval`."""
    base = setup
    out = base / f"run_{attention}"
    model = "paca_vit_b0" if attention == "paca" else MODEL
    argv = ["train", "--data", str(base / "data"), "--model", model, "--out", str(out), "--epochs", "2",
            "--scale", "0.5", "1", "--hflip", "0.5", *FAST, *extra]
    if attention != "paca":
        argv += ["--attention", attention, "--windows", str(base / "windows")]
    _run(argv)
    recs = _metrics(out)
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["val_top1"] <= 100 for r in epochs)
    assert epochs[0]["train_loss"] > epochs[1]["train_loss"]
    figures = {"loss.png", "top1.png", "accuracy_vs_eo.png"} | ({"fig13_winft_gates.png"} if attention == "winft"
                                                                 else set())
    assert figures <= set(os.listdir(out))
    _run(["eval", "--checkpoint", str(out / "last.pth.tar"), "--no-progress", "--out", str(out / "e.json")])
    res = json.loads((out / "e.json").read_text())
    assert res["images"] == 24 and res["attention"] == attention
    assert res["top1"] == pytest.approx(epochs[-1]["val_top1"])  # the same weights, the same images
    assert res["top5"] >= res["top1"] and res["images_per_s"] > 0 and res["peak_memory_bytes"] > 0
    n = 64
    if attention == "window":  # token zeroing removes nothing from the mask: EO of the windows themselves
        assert 0 < res["eo_patch"] < n * n and res["eo_full_patch"] == n * n
    elif attention == "winft":  # the paper's count (patch pairs) below the count over all tokens
        assert 0 < res["eo_patch"] < res["eo_all"] <= (n + 1) ** 2
    else:
        assert res["eo_patch"] > 0


def test_torchrun_matches_one_process(setup, tmp_path):
    """2 gloo processes with the same global batch and seed: the same per-step losses as one process
    (up to the order of the gradient all-reduce's float sums: 1e-5 here, 2.4e-7 measured), and the
    checkpoint loads and evaluates in one process."""
    base = setup
    common = ["--data", str(base / "data"), "--model", MODEL, "--attention", "window", "--windows",
              str(base / "windows"), "--dip", "both", "--epochs", "2", "--hflip", "0.5", "--log-interval", "1",
              "--no-plots", "--device", "cpu", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "vitpatch.train", "--out", str(tmp_path / "one"), *common],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vitpatch.train", "--out", str(tmp_path / "two"), *common],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = [r for r in _metrics(tmp_path / "one") if r["kind"] == "step"]
    b = [r for r in _metrics(tmp_path / "two") if r["kind"] == "step"]
    assert len(a) == len(b) == 6  # 48 images / 16 per step, 2 epochs
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=0, atol=1e-5)
    sa, sb = _state(tmp_path / "one" / "last.pth.tar"), _state(tmp_path / "two" / "last.pth.tar")
    assert sa.keys() == sb.keys() and not any(k.startswith("module.") for k in sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-4, rtol=1e-4)
    _run(["eval", "--checkpoint", str(tmp_path / "two" / "last.pth.tar"), "--no-progress"])
    assert json.loads((tmp_path / "two" / "eval.json").read_text())["images"] == 24


def test_resume_gives_the_uninterrupted_weights(setup, tmp_path):
    """Stopped after epoch 1 and resumed: bit-identical weights, EMA and metrics (timing aside), with
    random erasing, Mixup, drop-path and DataLoader workers in play."""
    base = setup
    common = ["--data", str(base / "data"), "--model", MODEL, "--attention", "window", "--windows",
              str(base / "windows"), "--epochs", "2", "--hflip", "0.5", "--reprob", "0.25", "--mixup", "0.2",
              "--model-ema", "--drop-path", "0.1", "--no-plots", *FAST]
    _run(["train", "--out", str(tmp_path / "full"), *common])
    # the interrupted run loads with 2 worker processes: per-item seeding makes that the same augmentation
    _run(["train", "--out", str(tmp_path / "cut"), "--stop-after", "1", *common, "--workers", "2"])
    assert [r["epoch"] for r in _metrics(tmp_path / "cut") if r["kind"] == "epoch"] == [0]
    _run(["train", "--out", str(tmp_path / "cut"), "--resume", "auto", *common])
    for key in ("state_dict", "state_dict_ema"):
        sa, sb = _state(tmp_path / "full" / "last.pth.tar", key), _state(tmp_path / "cut" / "last.pth.tar", key)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (key, k)
    timing = ("train_time_s", "val_images_per_s", "val_peak_memory_bytes")

    def stable(recs):
        return [{k: v for k, v in r.items() if k not in timing} for r in recs]

    assert stable(_metrics(tmp_path / "cut")) == stable(_metrics(tmp_path / "full"))


def test_digits_default_computes_windows_first(tmp_path, monkeypatch):
    """No --data: the digits are written as an ImageFolder, a dense ViT trained and its windows computed."""
    import vitpatch.train.data as data_mod

    real = data_mod.write_digits_folder

    def small(root, **kw):  # the whole pipeline on a slice of the digits, to stay fast
        real(root, **kw)
        for split, keep in (("train", 8), ("val", 4)):
            for c in os.listdir(os.path.join(root, split)):
                for f in sorted(os.listdir(os.path.join(root, split, c)))[keep:]:
                    os.remove(os.path.join(root, split, c, f))
        return root

    monkeypatch.setattr(data_mod, "write_digits_folder", small)
    import vitpatch.train.engine as engine

    monkeypatch.setattr(engine, "write_digits_folder", small)
    _run(["train", "--out", str(tmp_path), "--attention", "window", "--epochs", "1", "--batch-size", "16",
          "--no-progress", "--no-plots"])
    assert (tmp_path / "dense" / "last.pth.tar").is_file()
    meta = json.loads((tmp_path / "windows" / "train" / "meta.json").read_text())
    assert meta["grid"] == [8, 8] and meta["alpha"] == 0.1
    cfg = json.loads((tmp_path / "train_config.json").read_text())
    assert cfg["attention"] == "window" and cfg["windows"] == str(tmp_path / "windows")


def _fails(argv, match, capsys, out):
    assert cli.main(argv) == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(out), "a failed command left files behind"


def test_bad_input_is_a_clear_error_and_writes_nothing(setup, tmp_path, capsys):
    base = setup
    out = tmp_path / "out"
    win = ["--data", str(base / "data"), "--model", MODEL, "--attention", "window", "--out", str(out), *FAST]
    # windows of another dataset: the val run for the train split
    other = tmp_path / "other"
    os.makedirs(other)
    for split in ("train", "val"):
        os.symlink(base / "windows" / "val", other / split)
    _fails(["train", *win, "--windows", str(other)], "has no windows for image", capsys, out)
    # a windows run whose grid does not fit its arrays
    bad = tmp_path / "badgrid"
    for split in ("train", "val"):
        os.makedirs(bad / split)
        for f in os.listdir(base / "windows" / split):
            os.symlink(base / "windows" / split / f, bad / split / f)
        os.remove(bad / split / "meta.json")
        meta = json.loads((base / "windows" / split / "meta.json").read_text())
        (bad / split / "meta.json").write_text(json.dumps({**meta, "grid": [4, 4]}))
    _fails(["train", *win, "--windows", str(bad)], "do not fit its grid", capsys, out)
    # an incomplete windows run
    part = tmp_path / "partial"
    for split in ("train", "val"):
        _run(["windows", "--model", MODEL, "--checkpoint", str(base / "dense" / "last.pth.tar"), "--data",
              str(base / "data" / split), "--out", str(part / split), "--batch-size", "8", "--max-batches", "1",
              "--no-progress"])
    _fails(["train", *win, "--windows", str(part)], "incomplete", capsys, out)
    # missing files and settings
    _fails(["train", *win, "--windows", str(base / "windows"), "--checkpoint", str(tmp_path / "none.pth")],
           "is not a file", capsys, out)
    _fails(["train", *win, "--windows", str(base / "windows"), "--resume", str(tmp_path / "none.pth")],
           "is not a file", capsys, out)
    _fails(["train", *win], "needs --windows", capsys, out)
    _fails(["train", "--data", str(base / "data"), "--model", MODEL, "--dip", "tokens", "--out", str(out)],
           "needs windows", capsys, out)
    _fails(["train", "--data", str(base / "data"), "--out", str(out)], "--model is required", capsys, out)
    _fails(["train", *win, "--windows", str(base / "windows"), "--aa", "rand-m9-mstd0.5"], "auto_augment", capsys,
           out)
    _fails(["eval", "--checkpoint", str(tmp_path / "none.pth")], "is not a file", capsys, tmp_path / "none.pth")
    _fails(["train", "--model", "paca_vit_b0", "--attention", "window", "--out", str(out)], "is a PaCa-ViT", capsys,
           out)
