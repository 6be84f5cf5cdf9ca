"""The static cost model (bench/cost.py, docs/cost_model.md) and its dense reference kernel.

The SASS parser is checked on a hand-written listing; one real compile (the dense reference for
sm_90a, no GPU needed) checks that its loop is found, classified and pipelined; the dense
reference itself runs in Triton's interpreter against SDPA.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _helpers import DEVICE, needs_interpreter

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
	//## File "/k.py", line 10
.L_x_0:
        /*0010*/                   IMAD R2, R2, 0x2, RZ ;
        /*0020*/                   FFMA R3, R3, R4, R5 ;
	//## File "/k.py", line 11
        /*0030*/                   MUFU.EX2 R6, R6 ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
.L_x_1:
        /*0050*/                   LDG.E R7, desc[UR4][R8.64] ;
        /*0060*/               @P0 BRA `(.L_x_1) ;
	//## File "/k.py", line 20
        /*0070*/              @!P1 BRA `(.L_x_0) ;
        /*0080*/                   SHFL.BFLY PT, R9, R9, 0x1, 0x1f ;
        /*0090*/                   EXIT ;
"""


def test_sass_loops_and_classes():
    from bench import cost
    loops = sorted(cost.sass_loops(SASS), key=lambda lp: lp.instructions)
    inner, outer = loops
    assert (inner.instructions, outer.instructions) == (2, 7)
    assert inner.by_class["load"] == 1 and inner.by_class["control"] == 1 and inner.nested == 0
    assert outer.nested == 1 and outer.by_class["hgmma"] == 1 and outer.by_class["mufu"] == 1
    assert outer.by_class["integer"] == 1 and outer.by_class["float"] == 1 and outer.by_class["control"] == 2
    # the nested loop's two instructions vote for it, not for the outer loop
    assert outer.lines[("/k.py", 11)] == 2 and outer.lines[("/k.py", 10)] == 2
    assert outer.outside_nested == 5 and inner.outside_nested == 2
    assert cost.opcode_class("UIADD3") == "uniform" and cost.opcode_class("SHFL") == "shuffle"
    assert cost.opcode_class("HMMA") == "hmma" and cost.opcode_class("WEIRD") == "other"
    assert outer.tensor_flop == 2 * 64 * 64 * 16 / 4  # a warpgroup's HGMMA, a quarter per warp
    assert inner.global_bytes == 0 and outer.global_bytes == 0  # a 4-byte LDG is a scalar read


def test_tensor_flop_and_load_bytes_of_opcodes():
    from bench import cost
    assert cost.tensor_flop("HGMMA", ".64x128x16.F32.BF16") == 2 * 64 * 128 * 16 / 4
    assert cost.tensor_flop("HGMMA", ".64x64x8.F32.TF32") == 2 * 64 * 64 * 8 / 4
    assert cost.tensor_flop("HMMA", ".16816.F32.BF16") == 2 * 16 * 8 * 16
    assert cost.tensor_flop("HMMA", ".1688.F32.TF32") == 2 * 16 * 8 * 8
    assert cost.tensor_flop("FFMA", "") == 0
    assert cost.global_load_bytes("LDGSTS", ".E.BYPASS.128") == 16 and cost.global_load_bytes("LDG", ".E.64") == 8
    assert cost.global_load_bytes("LDG", ".E") == 0 and cost.global_load_bytes("LDS", ".128") == 0
    line = "        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;"
    m = cost._INSTR.search(line)
    assert m.group(2) == "HGMMA" and m.group(3) == ".64x64x16.F32.BF16"


def test_classify_by_tagged_source_loops():
    from bench import cost
    tags = {"masked": ("/k.py", 10, 12), "full": ("/k.py", 19, 21)}
    loop = cost.Loop(0, 5, dict.fromkeys(cost.CLASSES, 0), {("/k.py", 11): 4, ("/k.py", 20): 1, ("/h.py", 3): 9}, 0)
    assert cost.classify(loop, tags) == "masked"
    assert cost.classify(cost.Loop(0, 1, {}, {("/h.py", 3): 2}, 0), tags) is None


def test_tagged_loops_of_the_kernels():
    from bench import cost, dense_attention
    from vitpatch.kernels import window_attention as wa
    dense = cost.tagged_loops(dense_attention._dense_fwd_kernel.fn)
    assert set(dense) == {"dense"}
    path, lo, hi = dense["dense"]
    lines = Path(path).read_text().splitlines()
    assert "# cost: dense" in lines[lo - 1] and lo < hi
    assert set(cost.tagged_loops(wa._fwd_kernel.fn)) == {"prefix", "prefix_query", "masked", "full"}
    assert set(cost.tagged_loops(wa._bwd_dkdv_kernel.fn)) == {"prefix", "prefix_query", "masked", "full"}
    from vitpatch.kernels import cluster_attention as ca, winft_attention as wt
    assert set(cost.tagged_loops(wt._attn_fwd_kernel.fn)) == {"main"}
    assert set(cost.tagged_loops(wt._threshold_kernel.fn)) == {"gate_threshold", "gate_heads"}  # the helper's loop too
    assert set(cost.tagged_loops(ca._attn_bwd_kernel.fn)) == {"main"}
    from vitpatch.kernels.window import schedule as ws
    assert set(cost.tagged_loops(ws._cut_kernel.fn)) == {"steps"}
    assert set(cost.OP_OF_FAMILY) == {"window", "winft", "paca"}


def test_build_launch_cycles(monkeypatch):
    """A build kernel costs its issue cycles spread over the SMs; the sequential ``_cut_kernel`` its
    steps' latency instead, one program per SM and wave (docs/cost_model.md)."""
    from bench import cost
    from vitpatch.kernels import _launch
    from vitpatch.kernels.window import schedule as ws
    m = cost.MACHINE
    monkeypatch.setattr(cost.gate, "launch_key", lambda launch, target: launch.kernel.__name__)
    monkeypatch.setitem(cost._KERNEL_CYCLES, "_cut_kernel", (1000, 16, 500))
    monkeypatch.setitem(cost._KERNEL_CYCLES, "_schedule_kernel", (1368, 4, 0))

    def launch(kernel, grid, **named):
        return _launch.Launch(kernel, grid, (), named)

    cut = launch(ws._cut_kernel, (64,), n=576, LMIN=64)
    trips = 9  # the steps loop's own range(0, n, LMIN)
    step = max(m["dependent_issue_cycles"], 16 / m["issue_per_cycle"])
    assert cost._steps(cut) == trips and cost._steps(launch(ws._cut_kernel, (64,), n=577, LMIN=32)) == 19
    assert cost.launch_cycles(cut, "sm_90a") == (1000 + (trips - 1) * 500) * step + trips * m["l2_latency_cycles"]
    assert cost.launch_cycles(launch(ws._cut_kernel, (200,), n=576, LMIN=64), "sm_90a") == \
        2 * cost.launch_cycles(cut, "sm_90a")  # two waves of 132 programs
    sched = launch(ws._schedule_kernel, (9, 64, 2))
    assert cost._steps(sched) == 0  # no sequential loop
    assert cost.launch_cycles(sched, "sm_90a") == 9 * 64 * 2 * 1368 * 4 / 4 / m["sms"]


def test_blocks_per_sm():
    from bench import cost
    assert cost.blocks_per_sm(128, 4, 45056) == 4           # registers: 65536 / (4 x 4096)
    assert cost.blocks_per_sm(187, 8, 40000) == 1           # 192 x 32 x 8 = 49,152 registers per block
    assert cost.blocks_per_sm(32, 4, 120 * 1024) == 1       # shared memory
    assert cost.blocks_per_sm(16, 1, 0) == 32               # the block limit


def test_tile_cycles_overlap_rule():
    from bench import cost
    loop = {"kernel": "window_attention._fwd_kernel", "num_warps": 4, "block_m": 64, "block_n": 64,
            "instructions": 400, "by_class": {"mufu": 34}, "async_wait": 0, "blocks_per_sm": 1}
    serial = cost.tile_cycles(loop, 64)
    assert serial["issue"] == 400 and serial["tensor"] == 256 and serial["memory"] == 512
    assert serial["mufu"] == 34 * 4 * 32 / 16 and serial["total"] == 400 + 512 and not serial["overlap"]
    assert cost.tile_cycles({**loop, "async_wait": 1}, 64)["total"] == 512
    dkdv = cost.tile_cycles({**loop, "kernel": "window_attention._bwd_dkdv_kernel", "block_m": 32}, 64)
    assert dkdv["tensor"] == 8 * 32 * 64 * 64 / 4096 and dkdv["memory"] == 2 * 32 * 64 * 2 / 32
    # the SASS's own figures win over the tile shape: a masked tile's extra product and table tile
    read = cost.tile_cycles({**loop, "tensor_flop": 4.5 * 64 ** 3, "global_load_bytes": 18432}, 64)
    assert read["tensor"] == 4.5 * 64 ** 3 / 4096 and read["memory"] == 18432 / 32
    assert cost.role("dense_attention._dense_bwd_dq_kernel") == "dq" and cost.role("x._fwd_kernel") == "fwd"


@pytest.mark.parametrize("bm, bn", [(16, 16), (32, 16)])
@needs_interpreter()
def test_dense_reference_matches_sdpa(bm, bn):
    if DEVICE.type != "cpu":
        pytest.skip("the interpreter run is the CPU check; the GPU runs the kernel in bench.cost only")
    from bench import dense_attention
    q, k, v = (torch.randn(2, 3, 64, 16) for _ in range(3))
    out = dense_attention.attention(q, k, v, 0.25, bm, bn, 1, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.25)
    assert (out.double() - ref).abs().max() < 1e-5
    with pytest.raises(ValueError, match="multiple"):
        dense_attention.attention(q[:, :, :60], k[:, :, :60], v[:, :, :60], 0.25, bm, bn)


@needs_interpreter()
def test_dense_reference_backward_matches_autograd():
    if DEVICE.type != "cpu":
        pytest.skip("the interpreter run is the CPU check")
    from bench import dense_attention
    q, k, v, dout = (torch.randn(2, 2, 32, 16) for _ in range(4))
    dq, dk, dv = dense_attention.attention_backward(dout, q, k, v, 0.3, 16, 16, 1, 1)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*leaves, scale=0.3)
    ref = torch.autograd.grad(out, leaves, dout.double())
    for got, want in zip((dq, dk, dv), ref):
        assert (got.double() - want).abs().max() < 1e-4


COMPILE = """
import json
from bench import cost
specs = cost.dense_specs("bfloat16", 64, "sm_90a")
bwd = len(cost.DENSE_CONFIGS)  # the first backward configuration's dq and dk/dv kernels follow the forwards
print(json.dumps([cost.cost_rows(s, "bfloat16", 64, "sm_90a") for s in (specs[0], specs[bwd], specs[bwd + 1])]))
"""


def test_dense_reference_compiles_to_one_pipelined_wgmma_loop():
    """sm_90a, bf16, d = 64, 64 x 64 tiles: the cost rows of the real compile of the forward, and of
    the backward's two kernels (one wgmma loop each)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    if done.returncode != 0 and "GPUTarget" in done.stderr:  # pragma: no cover - a triton without NVIDIA
        pytest.skip("Triton's CUDA backend is not available here")
    assert done.returncode == 0, done.stderr[-2000:]
    import json
    fwd, dq, dkdv = json.loads(done.stdout.strip().splitlines()[-1])
    for rows, kernel in ((dq, "_dense_bwd_dq_kernel"), (dkdv, "_dense_bwd_dkdv_kernel")):
        assert [r["loop"] for r in rows] == ["dense"] and rows[0]["kernel"].endswith(kernel), rows
        assert rows[0]["by_class"]["hgmma"] >= 3 and rows[0]["by_class"]["hmma"] == 0
    rows = fwd
    assert [r["loop"] for r in rows] == ["dense"]
    r = rows[0]
    assert r["by_class"]["hgmma"] >= 2 and r["by_class"]["hmma"] == 0 and r["by_class"]["mufu"] >= 32
    assert r["async_wait"] >= 1 and r["registers"] and r["blocks_per_sm"] >= 1
    assert 150 < r["instructions"] < 600  # 314 with triton 3.8


LAUNCHES = """
import json
from bench import cost
calls = cost.call_launches(24, 4, 2, "bfloat16", 64, "sm_90a")
names = {k: [x.kernel.__name__ for x in v] if isinstance(v, list) else v for k, v in calls.items()}
print(json.dumps([cost.launch_counts(), names]))
"""


def test_launch_counts_of_one_window_call():
    """Recorded, not run: the first forward builds the schedule (five small launches), a later
    forward reuses it, the backward builds its own when its block sizes differ from the forward's
    (else it reuses the forward's), and the prefix programs are launches of their own. The cost
    model's split of one step's launches agrees, with the PyTorch ops of the build counted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", LAUNCHES], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import json
    c, calls = json.loads(done.stdout.strip().splitlines()[-1])
    build = ["_window_code_kernel", "_cut_kernel", "_schedule_kernel", "_choice_kernel", "_slot_tables_kernel"]
    assert c["forward_first"] == build + ["_fwd_kernel", "_fwd_kernel"]
    assert c["forward_cached"] == ["_fwd_kernel", "_fwd_kernel"]
    blocks = [label.split(",ORDER")[0] for label in (c["forward_config"], c["backward_config"])]
    own = build if blocks[0] != blocks[1] else []
    assert c["backward"] == own + ["_transpose_kernel", "_delta_kernel", "_bwd_dq_kernel", "_bwd_dq_kernel",
                                   "_bwd_dkdv_kernel", "_bwd_dkdv_kernel"]
    assert calls["fwd_build"] == build and calls["fwd"] == ["_fwd_kernel", "_fwd_kernel"]
    assert calls["bwd_build"] == own + ["_transpose_kernel"]
    assert calls["bwd"] == ["_delta_kernel", "_bwd_dq_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel",
                            "_bwd_dkdv_kernel"]
    assert calls["torch_fwd_build"] >= 1  # argsort of the sorted order, at least


def _winft_rows(pins, dense_total=600.0):
    """Made-up loop rows for every WinfT kernel of ``pins`` and for the dense reference."""
    from bench import winft_cost
    rows = []

    def row(kernel, config, loop, instr, warps=4, mufu=0, flop=0.0, nbytes=0, outside=None, op="winft_attention",
            bm=64, bn=64):
        rows.append({"row": "loop", "op": op, "kernel": kernel, "config": config, "loop": loop, "instructions": instr,
                     "outside_nested": instr if outside is None else outside, "num_warps": warps,
                     "by_class": {"mufu": mufu}, "tensor_flop": flop, "global_load_bytes": nbytes, "async_wait": 2,
                     "blocks_per_sm": 1, "block_m": bm, "block_n": bn, "launch_variant": {}})
    for unit, cfg in pins.items():
        for name in __import__("vitpatch.kernels._launch", fromlist=["x"]).UNIT_KERNELS[unit]:
            full = f"winft_attention.{name}"
            if name in winft_cost.GATE_KERNELS:
                row(full, cfg.label, "gate_heads", 100, warps=8, flop=4096.0 * 300, nbytes=32 * 400)
                row(full, cfg.label, "gate_" + ("threshold" if "threshold" in name else "bits"), 1100, warps=8,
                    mufu=64, outside=1000)
            elif name != "_delta_kernel":
                row(full, cfg.label, "main", 500, nbytes=32 * 100)
    for name in ("_dense_fwd_kernel", "_dense_bwd_dq_kernel", "_dense_bwd_dkdv_kernel"):
        row(f"dense_attention.{name}", "BM=64,BN=64,w4,s3", "dense", dense_total, op="dense")
    return rows


def test_winft_step_is_costed_kernel_by_kernel():
    """One WinfT step with the loss, recorded through the launchers: two gate passes in the forward
    and none in the backward (sigmoid(g) - T kept by pass 1); each launch costed from its loop rows:
    a gate pass as tiles x (heads x its head loop + its own work), an attention kernel as programs
    x tiles x its loop; the byte count has the kept tile."""
    from bench import cost, winft_cost
    from vitpatch.kernels import _launch
    pins = {u: _launch.candidates(u)[0] for u in winft_cost.UNITS}
    N, B, H, d = 197, 4, 3, 64
    calls = winft_cost.step_launches(N, B, H, d, "bfloat16", "sm_90a", pins)
    assert [x.kernel.__name__ for x in calls["fwd"]] == ["_threshold_kernel", "_gate_bits_kernel", "_attn_fwd_kernel"]
    assert [x.kernel.__name__ for x in calls["bwd"]] == ["_delta_kernel", "_attn_dq_kernel", "_attn_dkdv_kernel"]
    rows = _winft_rows(pins)
    by = winft_cost._index(rows)
    m = cost.MACHINE
    thr = calls["fwd"][0]
    gate = pins["winft_threshold"]
    grid = thr.grid
    tiles = grid[0] * grid[1] * -(-N // gate["BLOCK_N"])
    head = max(100 * 8 / 4, 300.0, 400.0)  # issue, tensor (4096 x 300 / 4096), memory (32 x 400 / 32): overlapped
    own = max(1000 * 8 / 4, 64 * 8 * 32 / 16)
    assert winft_cost.launch_cycles(thr, gate.label, by, d) == pytest.approx(tiles * (H * head + own) / m["sms"])
    fwd = calls["fwd"][2]
    progs = fwd.grid[0] * fwd.grid[1]
    assert winft_cost.launch_cycles(fwd, pins["winft_fwd"].label, by, d) == pytest.approx(
        progs * -(-N // pins["winft_fwd"]["BLOCK_N"]) * max(500, 100) / m["sms"])
    assert winft_cost.launch_cycles(calls["bwd"][0], pins["winft_fwd"].label, by, d) == 0.0  # delta: left out
    dg = thr.named["DG"]
    assert tuple(dg.shape) == (B, N, 208)  # kept for the backward, rows 16-element aligned
    assert winft_cost.compulsory_bytes(calls["bwd"][1]) > dg.numel() * 2
    preds = winft_cost.predict(rows, B, H, d, pins=pins, shapes=(N,))
    assert [p["mode"] for p in preds] == ["fwd", "fwd+bwd"]
    p = preds[1]
    assert p["predicted_ratio_vs_dense"] == pytest.approx(p["winft_cycles_per_sm"] / p["dense_cycles_per_sm"])
    assert p["bytes"]["gate_and_loss"] == p["bytes"]["compulsory"] - p["bytes"]["dense_attention"] > 0
