"""``vitpatch demo``: the whole pipeline, end to end, on a CPU in minutes.

1. Data shipped with scikit-learn: the 1,797 8x8 handwritten digits, upsampled to 32x32, so a
   ViT with 4x4 patches sees an 8x8 patch grid (64 patches + CLS). No download.
2. Train a small timm ViT (CLS token) from scratch.
3. Analysis (paper 000): U per image from the trained ViT's attention maps (eq. 2–3), AWD
   windows (eq. 4, alpha = 0.1), indiscriminative patches (DIP, beta = 0.2), EO (eq. 5).
4. Retrain from scratch with :class:`~vitpatch.nn.WindowAttention` and each image's windows
   (AWD-ViT), without and with DIP (the dropped patches' tokens multiplied by 0 before every
   block, paper 000 §4.2: :func:`vitpatch.nn.zero_dropped_tokens`).
5. Train :class:`~vitpatch.nn.WinfTAttention` with the BCE loss against the windows (WinfT,
   eq. 12) and report its EO (``sum W``) on the test set.
6. Train the same ViT with :class:`~vitpatch.nn.PaCaAttention` (patch-to-cluster attention).
7. Write ``summary.json`` and figures made from this run's data, and print a table like the
   paper's Tables 1–3.

After step 3 a short stage runs papers 002 and 003 on the trained ViT (64 test digits): KK/NK
and the attention focus index per layer (SIFT keypoints, if OpenCV is installed), head
importance by pruning (modes 1 and 4) and k-hop attention strength, with their figures.

Everything is seeded; accuracies change with ``--seed`` and ``--epochs``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DemoConfig", "run_demo", "load_digits_split", "make_vit"]


@dataclass
class DemoConfig:
    """Settings of the demo; the defaults run in a few minutes on 2 CPU cores."""

    out: str = "vitpatch_demo"
    seed: int = 0
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    img_size: int = 32
    patch_size: int = 4
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    alpha: float = 0.1
    beta: float = 0.2
    num_clusters: int = 16
    winft_lambda: float = 1.0
    test_fraction: float = 0.2
    max_steps: Optional[int] = None  # cap on optimizer steps per model (for quick checks / CI)
    subset: Optional[int] = None  # use only this many training images (and a quarter as many test images)
    semantic_images: int = 64  # test digits of the paper 002 / 003 stage
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.subset is not None and self.subset < 4:
            raise ValueError(f"subset must be >= 4 images, got {self.subset}")

    @property
    def grid(self):
        g = self.img_size // self.patch_size
        return (g, g)


# ----------------------------------------------------------------------------------------- data
def load_digits_split(cfg: DemoConfig):
    """scikit-learn's bundled digits, upsampled to ``img_size``, normalised, split with ``cfg.seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(cfg.img_size, cfg.img_size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))
    n_test = int(round(cfg.test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    if cfg.subset is not None:
        train, test = train[:cfg.subset], test[:max(1, cfg.subset // 4)]
    return x[train], y[train], x[test], y[test]


def make_vit(cfg: DemoConfig, attn_layer=None) -> nn.Module:
    """A small timm ``VisionTransformer`` with a CLS token, optionally with a vitpatch attention layer."""
    from timm.models.vision_transformer import VisionTransformer

    kw = {} if attn_layer is None else {"attn_layer": attn_layer}
    return VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=1, num_classes=10,
                             embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                             mlp_ratio=cfg.mlp_ratio, class_token=True, global_pool="token", **kw)


# ------------------------------------------------------------------------------------- training
MaskFn = Callable[[torch.Tensor, str], Optional[object]]


def _batches(n: int, batch_size: int, gen: Optional[torch.Generator]):
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def _train_config(cfg: DemoConfig, winft: bool):
    """The demo's recipe as a :class:`vitpatch.train.config.TrainConfig`: timm's AdamW (no decay on biases
    and norms), cosine to 0 after one warm-up epoch, label smoothing 0.1, gradient norm clipped to 1."""
    from .train.config import TrainConfig

    return TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       warmup_epochs=1, warmup_lr=1e-6, min_lr=0.0, smoothing=0.1, clip_grad=1.0,
                       attention="winft" if winft else "dense", lambda1=1.0, lambda2=cfg.winft_lambda)


def train_model(model: nn.Module, data, cfg: DemoConfig, *, name: str, mask_fn: Optional[MaskFn] = None,
                winft: bool = False) -> Dict[str, float]:
    """Train ``model`` with ``vitpatch train``'s pieces (:func:`vitpatch.train.engine.create_optimization`,
    ``create_criterion``, ``train_step``) on the in-memory digits; returns train time and final train loss.

    ``mask_fn(indices, split)`` gives the ``attn_mask`` of a batch (a WindowMask) or ``None``;
    with ``winft`` the loss is ``CE + lambda * winft_loss(model)`` (paper 000 eq. 12).
    """
    from tqdm.auto import tqdm

    from .train.engine import create_criterion, create_optimization, train_step

    xtr, ytr = data[0], data[1]
    dev = torch.device(cfg.device)
    model.to(dev).train()
    steps_per_epoch = math.ceil(len(ytr) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    tc = _train_config(cfg, winft)
    opt, sched = create_optimization(model, tc, steps_per_epoch)
    criterion, _ = create_criterion(tc, 10)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, start, last = 0, time.perf_counter(), float("nan")
    bar = tqdm(total=total, desc=f"train {name}", unit="step", leave=False)
    while step < total:
        for idx in _batches(len(ytr), cfg.batch_size, gen):
            if step >= total:
                break
            sched.step_update(step)
            mask = None if mask_fn is None else mask_fn(idx, "train")
            loss, _ = train_step(model, xtr[idx].to(dev), ytr[idx].to(dev), mask, cfg=tc, criterion=criterion,
                                 opt=opt, device=dev)
            step += 1
            last = float(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{last:.3f}")
    bar.close()
    return {"train_time_s": time.perf_counter() - start, "final_train_loss": last, "steps": step}


@torch.no_grad()
def evaluate(model: nn.Module, data, cfg: DemoConfig, mask_fn: Optional[MaskFn] = None,
             on_batch: Optional[Callable[[nn.Module], None]] = None) -> float:
    """Test accuracy; ``on_batch(model)`` runs after each batch (e.g. to collect WinfT's gate sums)."""
    xte, yte = data[2], data[3]
    dev = torch.device(cfg.device)
    model.to(dev).eval()
    correct = 0
    for idx in _batches(len(yte), 256, None):
        mask = None if mask_fn is None else mask_fn(idx, "test")
        logits = model(xte[idx].to(dev), attn_mask=mask) if mask is not None else model(xte[idx].to(dev))
        correct += int((logits.argmax(-1).cpu() == yte[idx]).sum())
        if on_batch is not None:
            on_batch(model)
    return correct / len(yte)


# ------------------------------------------------------------------------------------- analysis
@torch.no_grad()
def analyse(model: nn.Module, images: torch.Tensor, cfg: DemoConfig, desc: str):
    """AWD windows, DIP keep masks (and U of the first batch) for ``images``, in batches with a progress bar."""
    from tqdm.auto import tqdm

    from . import analysis

    dev = torch.device(cfg.device)
    model.to(dev).eval()
    windows, keep, first_u = [], [], None
    for i in tqdm(range(0, len(images), 128), desc=desc, unit="batch", leave=False):
        w, k, U = analysis.compute_windows(model, images[i:i + 128].to(dev), cfg.alpha, cfg.beta, return_u=True)
        windows.append(w.cpu())
        keep.append(k.cpu())
        if first_u is None:
            first_u = U[:4].cpu()
    return torch.cat(windows), torch.cat(keep), first_u


def _digits_uint8(x: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """``(B, 3, H*scale, W*scale)`` uint8 of normalised 1-channel digits: min-max per image, nearest upsampling.

    SIFT needs the upsampling: at 32 px a digit is below the scales its default octaves search.
    """
    lo = x.amin((1, 2, 3), keepdim=True)
    hi = x.amax((1, 2, 3), keepdim=True)
    u = ((x - lo) / (hi - lo).clamp_min(1e-12) * 255).round().clamp(0, 255)
    u = F.interpolate(u, scale_factor=scale, mode="nearest")
    return u.to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def semantic_heads_stage(model: nn.Module, images: torch.Tensor, cfg: DemoConfig) -> Dict[str, object]:
    """Papers 002 and 003 on the trained ViT (docs/math.md §8–9): KK/NK and AFI per layer, head
    importance by pruning (modes 1 and 4) and k-hop strength, from ``images`` (a few test digits).

    Keypoints: SIFT on each digit upsampled 4x (:func:`_digits_uint8`), counted on patches of
    ``4 * patch_size`` pixels, the same grid the model sees.
    """
    from . import analysis

    dev = torch.device(cfg.device)
    model.to(dev).eval()
    x = images.to(dev)
    out: Dict[str, object] = {"images": len(images)}
    try:
        counts = analysis.keypoint_counts(_digits_uint8(images.cpu()), 4 * cfg.patch_size)
    except ImportError as exc:  # OpenCV is an optional extra
        counts = None
        out["semantic_skipped"] = str(exc)
    if counts is not None:
        sem = analysis.layer_semantics(analysis.attention_maps(model, x), counts, 1)
        out["keypoints_per_image"] = float(counts.sum(1).double().mean())
        out["keypoint_patch_fraction"] = float((counts > 0).double().mean())
        for k in ("KK", "KN", "NK", "NN", "AFI"):
            out[k] = torch.nanmean(getattr(sem, k), 0).nanmean(-1).tolist()  # per layer, mean over heads
    modes = (1, 4)
    imp = analysis.head_importance(model, x, modes=modes)
    out["head_importance_modes"] = list(modes)
    out["I_prob"] = imp.prob.mean(0).tolist()  # (L, h, modes)
    out["I_prob_std"] = imp.prob.std(0, unbiased=False).tolist()  # over images (paper 003 Fig. 1 B1 band)
    out["I_jsd"] = imp.jsd.mean(0).tolist()
    out["I_patch"] = imp.patch.mean(0).tolist()
    st = analysis.layer_strengths(analysis.attention_maps(model, x), cfg.grid, cfg.patch_size, 1)
    out["khop_strength"] = st.strength.mean(0).tolist()  # (L, h, K)
    out["strength_entropy"] = st.entropy.mean(0).tolist()
    out["mad_px"] = st.mad.mean(0).tolist()
    return out


def _semantic_heads_figures(res: Dict[str, object], cfg: DemoConfig) -> List[str]:
    from .analysis import plots

    figs = {}
    if "KK" in res:
        fig = plots.plot_stage_summary(res["KK"], res["KN"], res["NK"], res["NN"], res["AFI"],
                                       stages=[cfg.depth // 2] if cfg.depth > 1 else [])
        fig.suptitle("digits ViT: keypoint interrelation and focus index per layer (paper 002)", fontsize=9)
        figs["semantic_layers.png"] = fig
    prob = torch.tensor(res["I_prob"])
    figs["head_importance.png"] = plots.plot_head_importance(prob[..., 0], "I_prob (mode 1)",
                                                             std=torch.tensor(res["I_prob_std"])[..., 0])
    figs["mode_bars.png"] = plots.plot_mode_bars(prob, res["head_importance_modes"])
    strength = torch.tensor(res["khop_strength"])
    figs["khop_strength.png"] = plots.plot_khop_strength(strength[-1], cfg.depth - 1)
    figs["strength_entropy.png"] = plots.plot_entropy_layers(torch.tensor(res["strength_entropy"]))
    return [plots.save_figure(f, os.path.join(cfg.out, name)) for name, f in figs.items()]


def _mask_factory(windows: Dict[str, torch.Tensor], keep: Optional[Dict[str, torch.Tensor]], cfg: DemoConfig):
    """``mask_fn(indices, split)``: a WindowMask of the batch's own windows; with ``keep`` its
    ``token_keep`` zeroes the dropped patches' tokens before every block (DIP, paper 000 §4.2, with
    :func:`vitpatch.nn.zero_dropped_tokens` on the model)."""
    from .masks import WindowMask

    dev = torch.device(cfg.device)

    def mask_fn(idx: torch.Tensor, split: str):
        tk = None
        if keep is not None:
            k = keep[split][idx]
            tk = torch.cat([torch.ones(len(idx), 1, dtype=torch.bool), k], 1).to(dev)
        return WindowMask(windows[split][idx].to(dev), cfg.grid, 1, token_keep=tk)

    return mask_fn


def _backend(op: str, cfg: DemoConfig) -> str:
    """The backend ``op`` runs on for this demo's shapes and device (``functional.backend_for``)."""
    from .functional import backend_for
    from .masks import WindowMask

    gh, gw = cfg.grid
    d = cfg.embed_dim // cfg.num_heads
    q = torch.empty(1, cfg.num_heads, 1 + gh * gw, d, device=cfg.device)
    if op == "window_attention":
        return backend_for(op, q, q, q, WindowMask.full(cfg.grid, 1, device=cfg.device))
    if op == "cluster_attention":
        kv = torch.empty(1, cfg.num_heads, cfg.num_clusters, d, device=cfg.device)
        return backend_for(op, q, kv, kv)
    return backend_for(op, q, q, q)


def _figures(cfg: DemoConfig, data, U, windows, keep, paca_model, rows) -> List[str]:
    """Figures from this run's data: U matrix, windows, responsive-field arrows, clusters, accuracy vs EO."""
    from matplotlib.figure import Figure

    from .analysis import plots, responsive_field

    x = data[2][:4]
    img = plots.display_image(x[0])
    w0, k0 = windows["test"][0], keep["test"][0]
    size, tendency = responsive_field(w0[None], k0[None], cfg.grid)
    figs = {
        "u_matrix.png": plots.plot_uncertainty_matrix(U[0], k0, img, cfg.grid),
        "windows.png": plots.plot_windows(img, w0, cfg.grid, keep=k0),
        "responsive_field.png": plots.plot_field_tendency(img, tendency[0], cfg.grid, keep=k0),
    }
    paca_model.eval()
    layers = [blk.attn for blk in paca_model.blocks]
    for attn in layers:
        attn.store_assignment = True
    with torch.no_grad():
        paca_model(x[:1].to(cfg.device))
    # show the block whose clusters differ most (mean L1 distance between assignment columns)
    spread = [float((a.last_assignment[0][:, :, None] - a.last_assignment[0][:, None, :]).abs().sum(0).mean())
              for a in layers]
    best = int(np.argmax(spread))
    for attn in layers:
        attn.store_assignment = False
    fig = plots.plot_cluster_heatmaps(img, layers[best].last_assignment[0].cpu(), cfg.grid)
    fig.suptitle(f"PaCa cluster assignments of block {best} (softmax over tokens per cluster)", fontsize=10)
    figs["clusters.png"] = fig

    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    ax = fig.subplots()
    names = [r["model"] for r in rows]
    acc = [100 * r["test_accuracy"] for r in rows]
    bars = ax.bar(names, acc, color=["#888888", "#4c72b0", "#55a868", "#c44e52", "#8172b2"][: len(rows)])
    for b, r in zip(bars, rows):
        ax.annotate(f"EO {r['eo']:.0f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(max(0.0, min(acc) - 10), 100)
    ax.set_title(f"digits, {cfg.epochs} epochs, seed {cfg.seed}: accuracy and effective operations "
                 f"(full = {cfg.grid[0] * cfg.grid[1]}^2)", fontsize=9)
    figs["accuracy_vs_eo.png"] = fig
    return [plots.save_figure(f, os.path.join(cfg.out, name)) for name, f in figs.items()]


def _table(rows) -> str:
    head = f"{'model':<16}{'attention':<30}{'EO':>10}{'EO %':>8}{'top-1 %':>9}{'train s':>9}  backend"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<16}{r['attention']:<30}{r['eo']:>10.0f}{100 * r['eo_fraction']:>8.1f}"
                     f"{100 * r['test_accuracy']:>9.2f}{r['train_time_s']:>9.1f}  {r['backend']}")
    return "\n".join(lines)


def run_demo(cfg: Optional[DemoConfig] = None) -> dict:
    """Run the whole pipeline (module docstring), write ``summary.json`` and figures to ``cfg.out``."""
    from . import analysis
    from .nn import (PaCaAttention, WindowAttention, WinfTAttention, record_winft_gates, set_token_layout,
                     winft_gate_sum, zero_dropped_tokens)

    cfg = cfg or DemoConfig()
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    t0 = time.perf_counter()
    data = load_digits_split(cfg)
    n = cfg.grid[0] * cfg.grid[1]
    rows = []

    def fresh(attn_layer=None):
        torch.manual_seed(cfg.seed)  # every model starts from the same seed: retrained from scratch
        return make_vit(cfg, attn_layer)

    def record(model_name, attention, model, fit, mask_fn=None, eo=None, op=None, extra=None, on_batch=None):
        acc = evaluate(model, data, cfg, mask_fn, on_batch)
        row = {"model": model_name, "attention": attention, "test_accuracy": acc,
               "eo": float(n * n if eo is None else eo() if callable(eo) else eo),
               "backend": "timm (SDPA)" if op is None else _backend(op, cfg), **fit, **(extra or {})}
        row["eo_fraction"] = row["eo"] / (n * n)
        rows.append(row)
        print(f"  {model_name}: test accuracy {100 * acc:.2f}%  EO {row['eo']:.0f}", flush=True)
        return model

    print(f"vitpatch demo: digits {tuple(data[0].shape)} train / {len(data[3])} test, grid {cfg.grid}, "
          f"device {cfg.device}, out {cfg.out}", flush=True)
    # 1-2. baseline ViT
    vit = fresh()
    record("ViT", "dense", vit, train_model(vit, data, cfg, name="ViT"))
    # 3. analysis with the trained ViT: U, windows, DIP, EO
    windows, keep, U = {}, {}, None
    for split, images in (("train", data[0]), ("test", data[2])):
        windows[split], keep[split], u = analyse(vit, images, cfg, f"analyse {split}")
        U = u if split == "test" else U
    eo_awd = analysis.effective_operations(windows["test"], cfg.grid)
    eo_dip = analysis.effective_operations(windows["test"], cfg.grid, keep["test"])
    print(f"  AWD windows (alpha={cfg.alpha}): EO {eo_awd:.0f} of {n * n} ({100 * eo_awd / n ** 2:.1f}%); "
          f"with DIP (beta={cfg.beta}): {eo_dip:.0f}", flush=True)
    # 3b. papers 002 and 003 on the trained ViT: keypoint interrelation, focus index, head importance, k-hop
    t_sh = time.perf_counter()
    sem_heads = semantic_heads_stage(vit, data[2][:cfg.semantic_images], cfg)
    sem_heads["time_s"] = time.perf_counter() - t_sh
    if "KK" in sem_heads:
        print(f"  paper 002: KK per layer {[round(v, 3) for v in sem_heads['KK']]}, NK "
              f"{[round(v, 3) for v in sem_heads['NK']]}, AFI {[round(v, 2) for v in sem_heads['AFI']]}", flush=True)
    top = torch.tensor(sem_heads["I_prob"])[..., 0]
    best = int(top.argmax())
    print(f"  paper 003: most important head L{best // cfg.num_heads}H{best % cfg.num_heads} (I_prob "
          f"{float(top.reshape(-1)[best]):.3f}); strength entropy per layer "
          f"{[round(float(v), 2) for v in torch.tensor(sem_heads['strength_entropy']).mean(-1)]} "
          f"({sem_heads['time_s']:.1f} s)", flush=True)
    # 4. AWD-ViT, without and with DIP
    awd_fn = _mask_factory(windows, None, cfg)
    m = fresh(WindowAttention)
    record("AWD-ViT", f"windows a={cfg.alpha}", m, train_model(m, data, cfg, name="AWD-ViT", mask_fn=awd_fn),
           awd_fn, eo_awd, "window_attention")
    dip_fn = _mask_factory(windows, keep, cfg)
    m = zero_dropped_tokens(fresh(WindowAttention))
    record("AWD-ViT+DIP", f"windows a={cfg.alpha} b={cfg.beta}", m,
           train_model(m, data, cfg, name="AWD-ViT+DIP", mask_fn=dip_fn), dip_fn, eo_dip, "window_attention")
    # 5. WinfT with the BCE loss against the windows; EO = sum W on the test set
    m = fresh(WinfTAttention)
    fit = train_model(m, data, cfg, name="WinfT", mask_fn=awd_fn, winft=True)
    gate, gate_all = [], []
    record_winft_gates(set_token_layout(m), True)

    def on_batch(model):
        gate.append(winft_gate_sum(model, pairs="patch").cpu())
        gate_all.append(winft_gate_sum(model).cpu())

    record("WinfT", "gated (multiply)", m, fit, None, lambda: float(torch.cat(gate).mean()), "winft_attention",
           on_batch=on_batch)
    record_winft_gates(m, False)
    rows[-1]["eo_all_tokens"] = float(torch.cat(gate_all).mean())
    rows[-1]["eo_note"] = ("sum W_ij over patch pairs (the paper's Tables 3-4), mean over test images and layers; "
                           "eo_all_tokens counts all N x N pairs, CLS row and column included")
    # 6. PaCa in the same ViT
    paca_layer = PaCaAttention.with_options(num_clusters=cfg.num_clusters, clustering="paper",
                                            num_prefix_tokens=1, grid=cfg.grid)
    paca = fresh(paca_layer)
    record("PaCa-ViT", f"{cfg.num_clusters} clusters", paca, train_model(paca, data, cfg, name="PaCa"),
           None, n * cfg.num_clusters, "cluster_attention", {"clusters": cfg.num_clusters})
    rows[-1]["eo_note"] = "patch-to-cluster pairs n * M"
    # 7. figures and summary
    figures = _figures(cfg, data, U, windows, keep, paca, rows) + _semantic_heads_figures(sem_heads, cfg)
    summary = {
        "config": asdict(cfg), "grid": list(cfg.grid), "num_patches": n, "full_eo": n * n,
        "data": {"train": len(data[1]), "test": len(data[3]), "source": "sklearn.datasets.load_digits"},
        "analysis": {"eo_awd": eo_awd, "eo_awd_dip": eo_dip,
                     "dropped_patches_per_image": float((~keep["test"]).sum(1).double().mean())},
        "semantic_heads": sem_heads,
        "models": rows, "figures": [os.path.basename(f) for f in figures],
        "torch": torch.__version__, "python": platform.python_version(),
        "total_time_s": time.perf_counter() - t0,
    }
    with open(os.path.join(cfg.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    print()
    print(_table(rows))
    print(f"\nwrote {os.path.join(cfg.out, 'summary.json')} and {len(figures)} figures in "
          f"{summary['total_time_s']:.0f} s")
    return summary
