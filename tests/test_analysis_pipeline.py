"""vitpatch.analysis.pipeline: dataset windows to memmapped .npy, resume, shards, WindowDataset."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from vitpatch import WindowMask, analysis
from vitpatch.analysis import pipeline
from vitpatch.analysis.pipeline import ImageFiles, WindowDataset, eval_transform, read_windows, run_windows

FILES = ("windows.npy", "keep.npy", "files.npy", "done.npy", "meta.json")
ALPHA, BETA, BS = 0.1, 0.2, 3


def tiny_vit(**kw):
    import timm

    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=4)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def write_images(root, layout="folders", count=10, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for i in range(count):
        h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        sub = os.path.join(root, "cat" if i % 2 else "dog") if layout == "folders" else root
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(arr).save(os.path.join(sub, f"img_{i:02d}.png"))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    data = write_images(str(base / "data"))
    torch.manual_seed(0)
    model = tiny_vit()
    dataset = ImageFiles(data, eval_transform(model)[0])
    reference = str(base / "reference")
    summary = run_windows(model, dataset, reference, alpha=ALPHA, beta=BETA, batch_size=BS, progress=False)
    return {"base": base, "data": data, "model": model, "dataset": dataset, "reference": reference,
            "summary": summary}


def same_files(a, b):
    for f in FILES:
        with open(os.path.join(a, f), "rb") as fa, open(os.path.join(b, f), "rb") as fb:
            assert fa.read() == fb.read(), f"{f} differs between {a} and {b}"


def test_image_files_layouts(tmp_path):
    ds = ImageFiles(write_images(str(tmp_path / "folders")))
    assert len(ds) == 10 and ds.classes == ["cat", "dog"]
    assert ds.files == sorted(ds.files) and ds.files[0].startswith("cat/")
    img, label = ds[0]
    assert label == 0 and img.mode == "RGB"
    flat = ImageFiles(write_images(str(tmp_path / "flat"), layout="flat", count=3))
    assert flat.files == ["img_00.png", "img_01.png", "img_02.png"] and flat.labels == [-1] * 3
    with pytest.raises(ValueError, match="data folder"):
        ImageFiles(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no images"):
        ImageFiles(str(tmp_path / "empty"))


def test_run_writes_expected_files(setup):
    out, ds, model = setup["reference"], setup["dataset"], setup["model"]
    assert setup["summary"]["complete"] and setup["summary"]["batches_done"] == 4
    windows, keep, files, meta = read_windows(out)
    assert windows.dtype == np.int16 and windows.shape == (10, 16, 4)
    assert keep.dtype == np.bool_ and keep.shape == (10, 16)
    assert isinstance(windows, np.memmap) and isinstance(keep, np.memmap)
    assert list(files) == ds.files
    assert meta["alpha"] == ALPHA and meta["beta"] == BETA and meta["grid"] == [4, 4]
    assert meta["num_prefix_tokens"] == 1 and meta["T"] == 26 and meta["num_dropped"] == 3
    assert (~keep).sum(1).tolist() == [3] * 10
    # rows equal the per-batch computation done directly on the images
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    for start in range(0, 10, BS):
        w, k = analysis.compute_windows(model, images[start:start + BS], ALPHA, BETA)
        assert np.array_equal(windows[start:start + BS], w.numpy()) and np.array_equal(keep[start:start + BS], k.numpy())
    # every window holds its own patch and lies in the grid
    p = np.arange(16)
    w = windows.astype(np.int64)
    assert np.all((w[..., 0] <= p % 4) & (p % 4 <= w[..., 2]) & (w[..., 1] <= p // 4) & (p // 4 <= w[..., 3]))


def test_interrupted_by_max_batches_then_resumed_is_identical(setup):
    out = str(setup["base"] / "max_batches")
    s = run_windows(setup["model"], setup["dataset"], out, alpha=ALPHA, beta=BETA, batch_size=BS,
                    max_batches=1, progress=False)
    assert s["batches_done"] == 1 and not s["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        read_windows(out)
    assert np.load(os.path.join(out, "done.npy")).tolist() == [1, 0, 0, 0]
    s = run_windows(setup["model"], setup["dataset"], out, alpha=ALPHA, beta=BETA, batch_size=BS, progress=False)
    assert s["batches_done"] == 3 and s["batches_skipped"] == 1 and s["complete"]
    same_files(out, setup["reference"])


def test_exception_after_first_batch_then_resumed_is_identical(setup, monkeypatch):
    out = str(setup["base"] / "crash")
    real = pipeline.compute_windows
    calls = []

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected crash")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "compute_windows", crashing)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_windows(setup["model"], setup["dataset"], out, alpha=ALPHA, beta=BETA, batch_size=BS, progress=False)
    assert np.load(os.path.join(out, "done.npy")).tolist() == [1, 0, 0, 0]
    monkeypatch.setattr(pipeline, "compute_windows", real)
    s = run_windows(setup["model"], setup["dataset"], out, alpha=ALPHA, beta=BETA, batch_size=BS, progress=False)
    assert s["batches_done"] == 3 and s["complete"]
    same_files(out, setup["reference"])


def test_two_shards_in_sequence_equal_single_run(setup):
    out = str(setup["base"] / "shards")
    assert [list(pipeline.shard_batches(4, r, 2)) for r in range(2)] == [[0, 1], [2, 3]]
    assert [list(pipeline.shard_batches(5, r, 3)) for r in range(3)] == [[0], [1, 2], [3, 4]]
    s0 = run_windows(setup["model"], setup["dataset"], out, alpha=ALPHA, beta=BETA, batch_size=BS,
                     rank=0, world_size=2, progress=False)
    assert s0["batches_done"] == 2 and not s0["complete"]
    assert np.load(os.path.join(out, "done.npy")).tolist() == [1, 1, 0, 0]
    s1 = run_windows(setup["model"], setup["dataset"], out, alpha=ALPHA, beta=BETA, batch_size=BS,
                     rank=1, world_size=2, progress=False)
    assert s1["batches_done"] == 2 and s1["complete"]
    same_files(out, setup["reference"])


def _gloo_worker(rank, world, init_file, data, out, state_path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_vit()
        model.load_state_dict(torch.load(state_path))
        ds = ImageFiles(data, eval_transform(model)[0])
        s = run_windows(model, ds, out, alpha=ALPHA, beta=BETA, batch_size=BS, progress=False)
        assert s["world_size"] == 2 and s["rank"] == rank and s["batches_done"] == 2 and s["complete"]
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_single_run(setup):
    """torch.distributed with world_size = 2 (gloo, CPU): each rank writes its half of the same files."""
    import torch.multiprocessing as mp

    base = setup["base"]
    state_path = str(base / "state.pth")
    torch.save(setup["model"].state_dict(), state_path)
    out = str(base / "gloo")
    # fork (as DataLoader workers do, one intra-op thread each) spares two fresh imports of torch and timm
    mp.start_processes(_gloo_worker, args=(2, str(base / "gloo_init"), setup["data"], out, state_path), nprocs=2,
                       join=True, start_method="fork")
    same_files(out, setup["reference"])


def test_rerun_with_other_settings(setup, tmp_path):
    out = str(tmp_path / "other")
    run_windows(setup["model"], setup["dataset"], out, alpha=ALPHA, beta=BETA, batch_size=BS, max_batches=1,
                progress=False)
    with pytest.raises(ValueError, match="alpha"):
        run_windows(setup["model"], setup["dataset"], out, alpha=0.2, beta=BETA, batch_size=BS, progress=False)
    s = run_windows(setup["model"], setup["dataset"], out, alpha=0.2, beta=BETA, batch_size=BS, overwrite=True,
                    progress=False)
    assert s["complete"] and s["batches_skipped"] == 0
    assert json.load(open(os.path.join(out, "meta.json")))["alpha"] == 0.2


@pytest.mark.parametrize("kw, match", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.2), "alpha"), (dict(beta=1.0), "beta"), (dict(beta=-0.5), "beta"),
    (dict(batch_size=0), "batch_size"), (dict(rank=2, world_size=2), "rank"), (dict(world_size=0), "world_size"),
    (dict(grid=(3, 3)), "grid"),
])
def test_run_bad_arguments(setup, tmp_path, kw, match):
    args = dict(alpha=ALPHA, beta=BETA, batch_size=BS, progress=False)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        run_windows(setup["model"], setup["dataset"], str(tmp_path / "bad"), **args)


def test_window_dataset_and_collate_feed_a_window_attention_model(setup):
    from vitpatch.nn import WindowAttention

    ds = WindowDataset(setup["dataset"], setup["reference"])
    image, label, w, k = ds[3]
    windows, keep, _, _ = read_windows(setup["reference"])
    assert image.shape == (3, 32, 32) and label == setup["dataset"].labels[3]
    assert w.dtype == torch.int64 and torch.equal(w, torch.from_numpy(windows[3].astype(np.int64)))
    assert k.dtype == torch.bool and torch.equal(k, torch.from_numpy(np.array(keep[3])))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ds.collate())
    images, labels, mask, keep_b = next(iter(loader))
    assert isinstance(mask, WindowMask) and mask.grid == (4, 4) and mask.num_prefix_tokens == 1
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4,) and keep_b.shape == (4, 16)
    assert torch.equal(mask.windows.long(), torch.from_numpy(windows[:4].astype(np.int64)))
    assert torch.equal(mask.key_keep[:, 1:], keep_b) and bool(mask.key_keep[:, 0].all())
    # the batch drives a WindowAttention model (same weights as the analysed ViT)
    model = tiny_vit(attn_layer=WindowAttention)
    model.load_state_dict(setup["model"].state_dict())
    with torch.no_grad():
        logits = model(images, attn_mask=mask)
    assert logits.shape == (4, 4) and torch.isfinite(logits).all()
    # a plain item (no label) gets (image, windows, keep)
    plain = WindowDataset([t for t, _ in (setup["dataset"][i] for i in range(10))], setup["reference"])
    assert len(plain[0]) == 3
    assert ds.collate(drop_keys=False)([ds[0], ds[1]])[2].key_keep is None


def test_window_dataset_checks(setup, tmp_path):
    with pytest.raises(ValueError, match="items"):
        WindowDataset(list(range(7)), setup["reference"])
    other = ImageFiles(write_images(str(tmp_path / "other"), layout="flat"))
    with pytest.raises(ValueError, match="files"):
        WindowDataset(other, setup["reference"])
    with pytest.raises(ValueError, match="no vitpatch windows run"):
        WindowDataset(other, str(tmp_path))


def test_load_model_from_local_checkpoints(tmp_path):
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("test_vit", img_size=64, num_classes=7)
    torch.save({"model": src.state_dict()}, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for f in ("w.pth", "w.safetensors"):
        model, weights = pipeline.load_model("test_vit", tmp_path / f, img_size=64)
        assert weights.startswith(f"checkpoint {f} (sha256 ") and not model.training
        assert model.head.out_features == 7  # read from the checkpoint's head
        for k, v in src.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
    # another input size: the position embedding is resampled to the new grid
    model, _ = pipeline.load_model("test_vit", tmp_path / "w.pth", img_size=32)
    assert model.patch_embed.grid_size == (2, 2) and model.pos_embed.shape[1] == 1 + 4
    with pytest.warns(UserWarning, match="random weights"):
        pipeline.load_model("test_vit", img_size=32)
    with pytest.raises(ValueError, match="does not fit"):
        pipeline.load_model("test_vit2", tmp_path / "w.pth", img_size=64)
    with pytest.raises(ValueError, match="model"):
        pipeline.load_model("no_such_vit")
    with pytest.raises(ValueError, match="img_size"):
        pipeline.load_model("test_vit", img_size=0)
