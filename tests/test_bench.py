"""Tests of the benchmark harness itself (bench/): schema, ratios, tables, plots, JSON lines, a smoke run.

No timing is asserted anywhere: only that measurements exist and have the right form.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402

META = {"schema": harness.SCHEMA_VERSION, "run_id": "run-a", "date": "2026-01-01T00:00:00+00:00",
        "torch": "2.x", "triton": None, "timm": "1.x", "git_commit": "abc", "git_dirty": False, "quick": True}


def synthetic_row(impl, median, *, op="window_attention", mode="fwd", shape=None, mem=None, run="run-a",
                  status="ok", device="Test CPU", density=None):
    shape = dict(shape or {"B": 2, "h": 4, "N": 65, "d": 32, "window": "r1"})
    case = harness.Case("bench.window_attention", op, impl, mode, shape, "cpu", "float32")
    timing = None if median is None else harness.Timing(median, median * 0.9, median * 1.1, 5, "synthetic")
    row = harness.make_row({**META, "run_id": run}, case, timing=timing, peak_mem_mb=mem,
                           mem_method="synthetic" if mem is not None else None,
                           info={"density": density}, status=status, device=device)
    return row


def test_row_schema_has_every_required_key_with_its_type():
    case = harness.Case("bench.window_attention", "window_attention", "vitpatch", "bwd",
                        {"B": 1, "h": 2, "N": 17, "d": 8, "window": "awd0.23"}, "cpu", "float32")
    meta = harness.run_metadata(quick=True)
    row = harness.make_row(meta, case, timing=harness.Timing(1.0, 0.5, 2.0, 3, "t"), peak_mem_mb=3.5,
                           mem_method="m", info={"backend": "torch", "density": 0.5, "extra": {"k": 1}, "other": 2})
    assert harness.validate_row(row) == []
    for key, types in harness.REQUIRED_KEYS.items():
        assert key in row and isinstance(row[key], types), key
    assert row["device"] == harness.cpu_model_name() and row["device_type"] == "cpu"
    assert row["backend"] == "torch" and row["density"] == 0.5 and row["extra"] == {"k": 1, "other": 2}
    assert row["visited_tile_fraction"] is None and row["max_abs_err"] is None
    json.dumps(row, allow_nan=False)  # serialisable as a JSON line

    bad = dict(row)
    del bad["median_ms"]
    bad["mode"] = "sideways"
    bad["n_repeats"] = "3"
    problems = " ".join(harness.validate_row(bad))
    assert "missing median_ms" in problems and "sideways" in problems and "n_repeats" in problems


def test_not_run_rows_are_valid_and_carry_no_numbers():
    row = synthetic_row("flex", None, mode="bwd", status="unsupported")
    assert harness.validate_row(row) == []
    assert row["median_ms"] is None and row["n_repeats"] == 0 and row["peak_mem_mb"] is None


def test_device_slug():
    assert harness.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert harness.device_slug("Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz") == "intel-xeon-gold-6338-cpu-2-00ghz"
    assert harness.device_slug("???") == "unknown-device"


def test_quantiles_interpolate():
    assert harness.quantiles_ms([4.0, 1.0, 3.0, 2.0, 5.0]) == (3.0, 1.8, 4.2)
    assert harness.quantiles_ms([7.0]) == (7.0, 7.0, 7.0)


def test_ratio_arithmetic_within_one_run():
    windowed = {"B": 2, "h": 4, "N": 65, "d": 32, "window": "r1"}
    rows = [
        synthetic_row("vitpatch", 2.0, shape=windowed, mem=10.0),
        synthetic_row("reference", 8.0, shape=windowed, mem=40.0),
        synthetic_row("sdpa_dense", 4.0, shape={"B": 2, "h": 4, "N": 65, "d": 32}, mem=5.0),
        synthetic_row("sdpa_dense", 1.0, shape={"B": 2, "h": 4, "N": 65, "d": 32}, run="run-b"),  # other run
        synthetic_row("sdpa_dense", 3.0, shape={"B": 2, "h": 4, "N": 65, "d": 32}, mode="bwd"),  # other mode
        synthetic_row("sdpa_mask", 5.0, shape=windowed, status="error"),
    ]
    vp = rows[0]
    assert harness.find_anchor(vp, rows, "sdpa_dense") is rows[2]
    assert harness.ratio(vp, harness.find_anchor(vp, rows, "sdpa_dense")) == pytest.approx(0.5)
    assert harness.ratio(vp, harness.find_anchor(vp, rows, "reference")) == pytest.approx(0.25)
    assert harness.ratio(vp, harness.find_anchor(vp, rows, "reference"), "peak_mem_mb") == pytest.approx(0.25)
    assert harness.ratio(vp, harness.find_anchor(vp, rows, "sdpa_dense"), "peak_mem_mb") == pytest.approx(2.0)
    assert harness.ratio(vp, harness.find_anchor(vp, rows, "sdpa_mask")) is None  # anchor did not run
    assert harness.find_anchor(vp, rows, "flex") is None
    pairs = harness.ratio_rows(rows, "vitpatch", "reference")
    assert len(pairs) == 1 and pairs[0][2] == pytest.approx(0.25)
    assert harness.ratio_rows(rows, "vitpatch", "reference", op="winft_attention") == []
    # a subject of the other run finds only that run's anchor
    other = synthetic_row("vitpatch", 3.0, shape=windowed, run="run-b")
    assert harness.ratio(other, harness.find_anchor(other, rows + [other], "sdpa_dense")) == pytest.approx(3.0)
    # the most specific anchor shape wins
    specific = synthetic_row("sdpa_dense", 2.0, shape=windowed)
    assert harness.find_anchor(vp, rows + [specific], "sdpa_dense") is specific


def test_table_prints_times_ratios_and_statuses():
    windowed = {"B": 2, "h": 4, "N": 65, "d": 32, "window": "awd0.23"}
    rows = [synthetic_row("vitpatch", 2.0, shape=windowed, mem=10.0, density=0.25),
            synthetic_row("sdpa_dense", 8.0, shape={"B": 2, "h": 4, "N": 65, "d": 32}, mem=20.0),
            synthetic_row("flex", None, shape=windowed, status="unsupported"),
            synthetic_row("vitpatch", 1.0, shape=windowed, mode="bwd")]
    text = harness.format_tables(rows)
    assert "== window_attention | fwd | float32 | Test CPU" in text
    assert "== window_attention | bwd" in text
    assert "vitpatch/sdpa_dense" in text and "0.25x" in text and "0.50x" in text  # time and memory ratios
    assert "unsupported" in text and "window=awd0.23" in text and "0.250" in text  # status and density
    counts = harness.count_rows(rows)
    assert "vitpatch" in counts and "flex" in counts


def test_jsonl_append_semantics(tmp_path):
    path = harness.rows_path(tmp_path / "out", "Test CPU")
    assert path.name == "test-cpu.jsonl"
    first = [synthetic_row("vitpatch", 1.0), synthetic_row("reference", 2.0)]
    assert harness.append_rows(path, first) == 2
    assert harness.append_rows(path, [synthetic_row("sdpa_dense", 3.0, run="run-b")]) == 1
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(l) for l in lines)
    back = harness.read_rows(path)
    assert [r["impl"] for r in back] == ["vitpatch", "reference", "sdpa_dense"]
    assert harness.read_rows(path.parent) == back  # a directory reads every .jsonl in it
    assert {r["run_id"] for r in harness.latest_run(back)} == {"run-b"}


def test_plots_from_synthetic_rows(tmp_path):
    import matplotlib.image as mpimg

    from bench import plot
    rows = []
    for n, scale in ((65, 1.0), (197, 3.0), (577, 9.0)):
        for mode in ("fwd", "fwd+bwd"):
            base = {"B": 2, "h": 4, "N": n, "d": 32}
            rows.append(synthetic_row("sdpa_dense", 2.0 * scale, mode=mode, shape=base, mem=4.0 * scale))
            for kind, dens in (("r1", 0.1), ("full", 1.0), ("awd0.23", 0.23)):
                shape = {**base, "grid": [8, 8], "P": 1, "window": kind}
                rows.append(synthetic_row("vitpatch", scale * (0.5 + dens), mode=mode, shape=shape,
                                          mem=scale * 2, density=dens))
                rows.append(synthetic_row("reference", scale * 3, mode=mode, shape=shape, mem=scale * 8, density=dens))
    for impl, ms in (("vit", 10.0), ("awd_vit", 6.0)):
        r = synthetic_row(impl, ms, op="vit_model", shape={"model": "vit_tiny", "img": [64, 64], "batch": 4})
        r["img_per_s"] = 4 / (ms / 1000)
        rows.append(r)
    src = tmp_path / "rows"
    harness.append_rows(harness.rows_path(src, "Test CPU"), rows)
    out = tmp_path / "plots"
    assert plot.main([str(src), "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    names = {p.name for p in pngs}
    assert "test-cpu__time_vs_n__window_attention__fwd.png" in names
    assert "test-cpu__time_vs_density__window_attention__fwd_bwd.png" in names
    assert "test-cpu__memory__window_attention.png" in names
    assert "test-cpu__models__vit_model.png" in names
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        img = mpimg.imread(p)
        assert img.shape[0] > 0 and img.shape[1] > 0


def test_every_module_lists_well_formed_cases():
    import importlib

    from bench import common
    from bench.__main__ import MODULES
    for device, quick in (("cpu", True), ("cuda", False)):
        cfg = harness.Config(device=device, dtype="float32" if device == "cpu" else "float16", quick=quick)
        for name in MODULES.values():
            cases = importlib.import_module(name).cases(cfg)
            assert cases, name
            for c in cases:
                assert c.mode in harness.MODES and c.module == name and c.shape
                json.dumps(c.shape)
        anchors = {(c.op, c.impl) for n in MODULES.values() for c in importlib.import_module(n).cases(cfg)}
        for op, pairs in harness.RATIO_PAIRS.items():
            for subject, anchor in pairs:
                if device == "cpu" and anchor in common.SDPA_BACKENDS:  # forced SDPA backends: CUDA runs only
                    assert (op, anchor) not in anchors
                    continue
                assert (op, subject) in anchors and (op, anchor) in anchors, (op, subject, anchor)


def test_importing_bench_does_no_work():
    code = ("import sys, bench, bench.harness, bench.common, bench.window_attention, bench.winft_attention, "
            "bench.cluster_attention, bench.models, bench.uncertainty, bench.plot, bench.__main__; "
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_smoke_run_one_op_smallest_shape(tmp_path, capsys):
    from bench.__main__ import main
    out = tmp_path / "out"
    rc = main(["--quick", "--ops", "cluster_pool", "--limit", "1", "--repeats", "1", "--warmup", "0",
               "--out", str(out)])
    assert rc == 0
    rows = harness.read_rows(out)
    assert len(rows) == 1
    row = rows[0]
    assert harness.validate_row(row) == []
    assert (row["op"], row["impl"], row["mode"], row["status"]) == ("cluster_pool", "vitpatch", "fwd", "ok")
    assert row["n_repeats"] == 1 and row["median_ms"] > 0
    assert row["backend"] in ("torch", "triton", "reference")
    assert isinstance(row["peak_mem_mb"], float) and "child process" in row["mem_method"]
    assert row["max_abs_err"] is not None
    printed = capsys.readouterr().out
    assert "== cluster_pool | fwd | float32" in printed and "1 rows appended" in printed


def test_plot_selects_the_newest_row_of_each_case():
    from bench import plot
    old = synthetic_row("vitpatch", 5.0, run="run-a")
    new = synthetic_row("vitpatch", 4.0, run="run-b")
    new["date"] = "2026-01-02T00:00:00+00:00"
    other_n = synthetic_row("vitpatch", 9.0, run="run-a", shape={"B": 2, "h": 4, "N": 197, "d": 32, "window": "r1"})
    full = synthetic_row("reference", 7.0, run="run-c", device="GPU X")
    full["quick"] = False
    quick = synthetic_row("reference", 1.0, run="run-d", device="GPU X", shape={"B": 1, "h": 1, "N": 17, "d": 8})
    chosen = plot.select_rows([old, new, other_n, full, quick])
    assert new in chosen and other_n in chosen and full in chosen
    assert old not in chosen and quick not in chosen  # superseded; quick rows beside full ones
    assert plot.select_rows([old, new], run="run-a") == [old]


def test_non_finite_values_become_null_and_are_reported():
    case = harness.Case("bench.window_attention", "window_attention", "vitpatch", "fwd", {"N": 5}, "cpu", "float32")
    row = harness.make_row(META, case, timing=harness.Timing(1.0, 1.0, 1.0, 1, "t"),
                           info={"max_abs_err": float("nan")}, device="Test CPU")
    assert row["max_abs_err"] is None and row["extra"]["non_finite"] == {"max_abs_err": "nan"}
    assert harness.validate_row(row) == []
    json.dumps(row, allow_nan=False)


def test_interleaved_timing_runs_cases_in_rotating_rounds():
    calls = []

    def prep(name):
        return harness.Prepared(step=lambda: calls.append(name), setup=lambda: calls.append(name + ".setup"))

    a, b, c = prep("a"), prep("b"), prep("c")
    timings = harness.time_cpu_interleaved([a, b, c], warmup=1, min_reps=4, max_reps=4, budget_s=0.0)
    steps = [x for x in calls if "." not in x]
    assert steps[:3] == ["a", "b", "c"]  # the warm-up, one call each
    # four timed rounds, each starting one case later
    assert steps[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert calls.count("a.setup") == 5  # every call, warm-up included, gets its untimed set-up
    assert [t.n_repeats for t in timings] == [4, 4, 4]
    assert all("interleaved" in t.timer and t.median_ms >= 0 for t in timings)
    alone = harness.time_cpu(a, warmup=0, min_reps=2, max_reps=2, budget_s=0.0)
    assert alone.n_repeats == 2 and "interleaved" not in alone.timer


def test_timing_groups_collect_one_size_and_mode_in_first_seen_order():
    from bench import window_attention

    def case(impl, mode, N, window=None):
        shape = {"B": 2, "h": 4, "N": N, "d": 32}
        if window:
            shape.update(window=window, grid=[8, 8], P=1)
        return harness.Case(window_attention.MODULE, window_attention.OP, impl, mode, shape)

    cases = [case("sdpa_dense", "fwd", 65), case("sdpa_dense", "bwd", 65), case("vitpatch", "fwd", 65, "r0"),
             case("sdpa_mask", "fwd", 65, "r0"), case("vitpatch", "fwd", 197, "r0"), case("vitpatch", "bwd", 65, "r0")]
    groups = harness.timing_groups(cases, window_attention)
    assert [[c.impl + "/" + c.mode + "/" + str(c.shape["N"]) for c in g] for g in groups] == [
        ["sdpa_dense/fwd/65", "vitpatch/fwd/65", "sdpa_mask/fwd/65"],
        ["sdpa_dense/bwd/65", "vitpatch/bwd/65"],
        ["vitpatch/fwd/197"]]
    assert [len(g) for g in harness.timing_groups(cases, object())] == [1] * len(cases)  # no timing_group


def test_a_group_with_a_failing_build_still_times_the_rest():
    import types

    def build(case, check=True):
        if case.impl == "broken":
            raise RuntimeError("cannot build")
        return harness.Prepared(step=lambda: None)

    module = types.SimpleNamespace(build=build, __name__="fake")
    cfg = harness.Config(quick=True, memory=False, repeats=3)
    cases = [harness.Case("fake", "window_attention", impl, "fwd", {"B": 1, "h": 1, "N": 4, "d": 2})
             for impl in ("a", "broken", "b")]
    rows = harness.run_group(cases, cfg, META, module)
    assert [r["impl"] for r in rows] == ["a", "broken", "b"]
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[0]["n_repeats"] == 3 and "interleaved round-robin with 1 other" in rows[0]["timer"]
    assert "cannot build" in rows[1]["note"]


def test_gpu_anchor_rows_exist_and_have_the_row_schema():
    """The CUDA anchors of the GPU check are cases of a ``--device cuda`` run: SDPA with the flash
    and cuDNN backends forced (``unsupported`` rows off CUDA), the SDPA + bool mask one-liner,
    Flex with and without its mask build (window attention) and dense SDPA + one batched ``Q K^T``
    (WinfT). Built here on CPU, their rows carry TFLOP/s on dense-equivalent and on visited pairs."""
    from bench import common, window_attention, winft_attention
    cuda = harness.Config(device="cuda", dtype="bfloat16")
    impls = {(c.op, c.impl) for c in window_attention.cases(cuda) + winft_attention.cases(cuda)}
    for impl in ("sdpa_dense", "sdpa_flash", "sdpa_cudnn", "sdpa_mask", "flex", "flex_build", "flex+build",
                 "vitpatch", "reference"):
        assert ("window_attention", impl) in impls, impl
    assert ("winft_attention", "sdpa_qk") in impls and ("winft_attention", "reference") in impls
    cpu_impls = {c.impl for c in window_attention.cases(harness.Config(quick=True))}
    assert not cpu_impls & {"sdpa_flash", "sdpa_cudnn"}  # CUDA anchors only

    shape = {"B": 2, "h": 2, "N": 17, "d": 8}
    for impl in ("sdpa_flash", "sdpa_cudnn"):
        case = harness.Case("bench.window_attention", "window_attention", impl, "fwd", dict(shape), "cpu", "float32")
        with pytest.raises(harness.Unsupported, match="CUDA anchor"):
            window_attention.build(case)
    case = harness.Case("bench.winft_attention", "winft_attention", "sdpa_qk", "fwd+bwd", dict(shape), "cpu",
                        "float32")
    prepared = winft_attention.build(case)
    prepared.step()  # dense SDPA and Q K^T, forward and backward
    timing = harness.Timing(2.0, 1.9, 2.1, 5, "synthetic")
    row = harness.make_row(META, case, timing=timing, info=prepared.info)
    assert harness.validate_row(row) == []
    flop = common.attention_flop(2, 2, 17, 8, "fwd+bwd") * 10 / 7
    assert row["tflops_dense"] == pytest.approx(flop / 2e-3 / 1e12) and "flop_dense" not in row["extra"]

    windowed = dict(shape, N=1 + 16, grid=[4, 4], P=1, window="awd0.23")
    case = harness.Case("bench.window_attention", "window_attention", "vitpatch", "fwd", windowed, "cpu", "float32")
    row = harness.make_row(META, case, timing=timing, info={"flop_dense": 8e9, "flop_visited": 2e9,
                                                            "visited_tile_fraction": 0.25})
    assert harness.validate_row(row) == [] and row["tflops_dense"] == pytest.approx(4.0)
    assert row["tflops_visited"] == pytest.approx(1.0)
    assert common.attention_flop(1, 1, 10, 4, "fwd") == 1600 and common.attention_flop(1, 1, 10, 4, "bwd") == 4000
