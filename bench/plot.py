"""``python -m bench.plot DIR``: PNG plots from the JSON rows in ``DIR`` (it measures nothing).

From the newest row of each measured case (or one run with ``--run RUN_ID``, or every row
with ``--all-runs``), rows with ``status == "ok"`` only, it draws per device:

* ``time_vs_n__<op>__<mode>.png``: median time (20-80% band) against the sequence length,
  one line per impl; window attention gets one panel per window kind.
* ``time_vs_density__window_attention__<mode>.png``: time against the mask density, one panel
  per ``N``; impls without a mask (``sdpa_dense``) are horizontal lines.
* ``memory__<op>.png``: peak memory against the sequence length, one panel per mode.
* ``models__<op>.png``: images per second (inference) and step time (training) per shape.

Files go to ``--out`` (default ``DIR/plots``), prefixed with the device slug.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from . import harness

SEQ_OPS = ("window_attention", "winft_attention", "cluster_pool", "cluster_attention", "paca_layer")
MODEL_OPS = ("vit_model", "pyramid_model")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def seq_len(row) -> Optional[int]:
    s = row.get("shape", {})
    return s.get("N", s.get("n"))


def series_name(row, group) -> str:
    """The impl, plus heads and head width when the group mixes several (e.g. WinfT's CPU rows)."""
    hd = {(r["shape"].get("h"), r["shape"].get("d", r["shape"].get("C"))) for r in group}
    if len(hd) <= 1:
        return row["impl"]
    h, d = row["shape"].get("h"), row["shape"].get("d", row["shape"].get("C"))
    return f"{row['impl']} (h={h}, {'d' if 'd' in row['shape'] else 'C'}={d})"


def _save(fig, path: Path, written: List[Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    written.append(path)


KNOWN_IMPLS = ("vitpatch", "reference", "sdpa_dense", "sdpa_mask", "sdpa", "flex", "flex_build", "flex+build",
               "pvt_sra", "vit", "awd_vit", "winft_vit", "paca_vit", "pvt_v2")


def color(label: str):
    """The same colour for an impl in every panel and plot."""
    impl = label.split(" ")[0]
    i = KNOWN_IMPLS.index(impl) if impl in KNOWN_IMPLS else len(KNOWN_IMPLS) + sum(map(ord, impl))
    return f"C{i % 10}" if i < 10 else _pyplot().get_cmap("tab20")(i % 20)


def _line(ax, rows, x_of, label):
    pts = sorted((x_of(r), r) for r in rows if x_of(r) is not None)
    if not pts:
        return
    xs = [p[0] for p in pts]
    ys = [p[1]["median_ms"] for p in pts]
    lo = [p[1]["p20_ms"] if p[1]["p20_ms"] is not None else y for p, y in zip(pts, ys)]
    hi = [p[1]["p80_ms"] if p[1]["p80_ms"] is not None else y for p, y in zip(pts, ys)]
    c = color(label)
    ax.plot(xs, ys, marker="o", label=label, color=c)
    ax.fill_between(xs, lo, hi, alpha=0.2, color=c)


def plot_time_vs_n(rows, prefix: str, out: Path, written: List[Path]) -> None:
    plt = _pyplot()
    by = defaultdict(list)
    for r in rows:
        if r["op"] in SEQ_OPS:
            by[(r["op"], r["mode"], r["dtype"])].append(r)
    for (op, mode, dtype), grp in sorted(by.items()):
        kinds = sorted({r["shape"]["window"] for r in grp if "window" in r["shape"]}) or [None]
        fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            series = defaultdict(list)
            for r in grp:
                w = r["shape"].get("window")
                if kind is None or w is None or w == kind:
                    series[series_name(r, grp)].append(r)
            for impl, rs in sorted(series.items()):
                _line(ax, rs, seq_len, impl)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel("median time (ms)")
            ax.set_title(f"{op} {mode} {dtype}" + (f"\nwindow={kind}" if kind else ""))
            ax.legend(fontsize=7)
        _save(fig, out / f"{prefix}__time_vs_n__{op}__{mode.replace('+', '_')}.png", written)


def plot_time_vs_density(rows, prefix: str, out: Path, written: List[Path]) -> None:
    plt = _pyplot()
    by = defaultdict(list)
    for r in rows:
        if r["op"] == "window_attention":
            by[(r["mode"], r["dtype"])].append(r)
    for (mode, dtype), grp in sorted(by.items()):
        ns = sorted({seq_len(r) for r in grp if r.get("density") is not None})
        if not ns:
            continue
        fig, axes = plt.subplots(1, len(ns), figsize=(5 * len(ns), 4), squeeze=False)
        for ax, n in zip(axes[0], ns):
            at_n = [r for r in grp if seq_len(r) == n]
            series = defaultdict(list)
            for r in at_n:
                series[r["impl"]].append(r)
            for impl, rs in sorted(series.items()):
                if all(r.get("density") is None for r in rs):
                    ax.axhline(rs[0]["median_ms"], linestyle="--", color="gray", label=f"{impl} (no mask)")
                    continue
                _line(ax, rs, lambda r: r.get("density"), impl)
            ax.set_xlabel("density (allowed / N^2)")
            ax.set_ylabel("median time (ms)")
            ax.set_yscale("log")
            ax.set_title(f"window_attention {mode} {dtype}, N={n}")
            ax.legend(fontsize=7)
        _save(fig, out / f"{prefix}__time_vs_density__window_attention__{mode.replace('+', '_')}.png", written)


def plot_memory(rows, prefix: str, out: Path, written: List[Path]) -> None:
    plt = _pyplot()
    by = defaultdict(list)
    for r in rows:
        if r["op"] in SEQ_OPS and r.get("peak_mem_mb") is not None:
            by[(r["op"], r["dtype"])].append(r)
    for (op, dtype), grp in sorted(by.items()):
        modes = [m for m in harness.MODES if any(r["mode"] == m for r in grp)]
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            series = defaultdict(dict)
            for r in grp:
                if r["mode"] != mode:
                    continue
                # one value per impl and N: the largest over window kinds (the worst case)
                key, name = seq_len(r), series_name(r, grp)
                series[name][key] = max(series[name].get(key, 0.0), r["peak_mem_mb"])
            for impl, pts in sorted(series.items()):
                xs = sorted(pts)
                ax.plot(xs, [max(pts[x], 1e-3) for x in xs], marker="o", label=impl, color=color(impl))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel("peak memory (MiB)")
            ax.set_title(f"{op} {mode} {dtype}\n(max over window kinds)" if op == "window_attention"
                         else f"{op} {mode} {dtype}")
            ax.legend(fontsize=7)
        _save(fig, out / f"{prefix}__memory__{op}.png", written)


def plot_models(rows, prefix: str, out: Path, written: List[Path]) -> None:
    plt = _pyplot()
    by = defaultdict(list)
    for r in rows:
        if r["op"] in MODEL_OPS:
            by[r["op"]].append(r)
    for op, grp in sorted(by.items()):
        modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in grp)]
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            rs = [r for r in grp if r["mode"] == mode]
            shapes = list(dict.fromkeys(harness.shape_label(r["shape"]) for r in rs))
            impls = list(dict.fromkeys(r["impl"] for r in rs))
            width = 0.8 / max(1, len(impls))
            for j, impl in enumerate(impls):
                vals = []
                for s in shapes:
                    r = next((r for r in rs if r["impl"] == impl and harness.shape_label(r["shape"]) == s), None)
                    v = None if r is None else (r.get("img_per_s") if mode == "fwd" else r["median_ms"])
                    vals.append(0.0 if v is None else v)
                ax.bar([i + j * width for i in range(len(shapes))], vals, width, label=impl, color=color(impl))
            ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(shapes))])
            ax.set_xticklabels(shapes, fontsize=7, rotation=15)
            ax.set_ylabel("images / s (inference)" if mode == "fwd" else "training step (ms)")
            ax.set_title(f"{op} {mode}")
            ax.legend(fontsize=7)
        _save(fig, out / f"{prefix}__models__{op}.png", written)


def plot_rows(rows: List[dict], out_dir) -> List[Path]:
    """Draw every plot for ``rows`` (already chosen: one run per device) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    by_device = defaultdict(list)
    for r in rows:
        if r.get("status") == "ok" and r.get("median_ms") is not None:
            by_device[r["device"]].append(r)
    for device, rs in sorted(by_device.items()):
        prefix = harness.device_slug(device)
        plot_time_vs_n(rs, prefix, out, written)
        plot_time_vs_density(rs, prefix, out, written)
        plot_memory(rs, prefix, out, written)
        plot_models(rs, prefix, out, written)
    return written


def case_key(row) -> tuple:
    """What identifies a measurement across runs: device, op, impl, mode, dtype and shape."""
    return (row.get("device"), row.get("op"), row.get("impl"), row.get("mode"), row.get("dtype"),
            tuple(sorted((k, json.dumps(v)) for k, v in row.get("shape", {}).items())))


def select_rows(rows: List[dict], run: Optional[str] = None, all_runs: bool = False) -> List[dict]:
    """The rows to plot.

    Default: the newest row of each case (:func:`case_key`), so a full run split over several
    calls (e.g. by ``--filter`` on ``N``) plots whole; on a device with full-run rows, rows of
    ``--quick`` runs are left out. ``run``: that run only. ``all_runs``: everything.
    """
    if run is not None:
        return [r for r in rows if r.get("run_id") == run]
    if all_runs:
        return rows
    full_devices = {r.get("device") for r in rows if not r.get("quick", False)}
    newest: Dict[tuple, dict] = {}
    for r in rows:
        if r.get("quick", False) and r.get("device") in full_devices:
            continue
        k = case_key(r)
        if k not in newest or (r.get("date", ""), r.get("run_id", "")) >= (newest[k].get("date", ""),
                                                                           newest[k].get("run_id", "")):
            newest[k] = r
    return list(newest.values())


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="directory of <device-slug>.jsonl row files (or one .jsonl file)")
    p.add_argument("--out", default=None, help="where the PNGs go (default DIR/plots)")
    p.add_argument("--run", default=None, help="plot this run id only")
    p.add_argument("--all-runs", action="store_true", help="plot every row of every run (repeated cases overlap)")
    args = p.parse_args(argv)
    src = Path(args.dir)
    rows = harness.read_rows(src)
    if not rows:
        print(f"no rows in {src}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent) / "plots"
    written = plot_rows(select_rows(rows, args.run, args.all_runs), out)
    for path in written:
        print(path)
    print(f"{len(written)} plots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
