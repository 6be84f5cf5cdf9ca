"""The one launch selection of every op (``kernels/_launch.select``) and the keyword launch helpers."""
import pytest
import torch

from vitpatch.kernels import _launch


def _cands(n):
    return [_launch.LaunchConfig((("BLOCK_M", 16 << i),), num_warps=4, num_stages=2) for i in range(n)]


@pytest.fixture
def policy(monkeypatch):
    """Three candidates for every unit, a stand-in timer (each candidate's time by its tile) and a fresh cache."""
    cands = _cands(3)
    monkeypatch.setattr(_launch, "configs", lambda unit, dtype, d: list(cands))
    monkeypatch.setattr(_launch, "_SELECTED", {})
    times = {16: 3.0, 32: 1.0, 64: 2.0}
    timed = []

    def bench(fn):
        fn()
        return times[timed[-1]["BLOCK_M"]]

    monkeypatch.setattr(_launch, "_bench", bench)
    return cands, timed


def test_select_times_every_candidate_once_and_keeps_the_fastest(policy):
    cands, timed = policy
    got = _launch.select("winft_fwd", torch.float16, 64, key=(577,), run=timed.append)
    assert got == cands[1] and timed == cands
    again = _launch.select("winft_fwd", torch.float16, 64, key=(577,), run=timed.append)
    assert again == cands[1] and len(timed) == 3  # cached: nothing timed again
    _launch.select("winft_fwd", torch.float16, 64, key=(1025,), run=timed.append)  # another case: timed
    assert len(timed) == 6


def test_select_skips_candidates_out_of_resources(policy, monkeypatch):
    from triton.runtime.errors import OutOfResources
    cands, timed = policy

    def run(cfg):
        if cfg["BLOCK_M"] == 32:
            raise OutOfResources(1 << 20, 1 << 18, "shared memory")
        timed.append(cfg)

    assert _launch.select("window_fwd", torch.bfloat16, 64, key=(577,), run=run) == cands[2]
    with pytest.raises(RuntimeError, match="window_bwd"):
        _launch.select("window_bwd", torch.bfloat16, 64, run=lambda cfg: (_ for _ in ()).throw(
            OutOfResources(1 << 20, 1 << 18, "shared memory")))


def test_select_takes_the_first_without_a_choice_to_make(policy, monkeypatch):
    cands, timed = policy
    assert _launch.select("paca_attn_fwd", torch.float16, 64) == cands[0]  # no run: nothing to time
    assert _launch.select("paca_attn_fwd", torch.float16, 64, run=timed.append,
                          fits=lambda c: c["BLOCK_M"] == 64) == cands[2]  # one fits: no timing
    assert _launch.select("paca_attn_fwd", torch.float16, 64, run=timed.append,
                          fits=lambda c: False) == cands[0]  # none fits: the first, as before the filter
    with _launch.recording():
        assert _launch.select("paca_attn_fwd", torch.float16, 64, run=timed.append) == cands[0]
    assert timed == []


def test_strides_name_every_axis():
    t = torch.empty(2, 3, 5, 7).transpose(1, 2)
    assert _launch.strides("q", t) == {"stride_qb": 105, "stride_qh": 7, "stride_qn": 35, "stride_qd": 1}
    assert _launch.strides("l", torch.empty(2, 5, 4), "bnm") == {"stride_lb": 20, "stride_ln": 4, "stride_lm": 1}
    with pytest.raises(ValueError, match="axes"):
        _launch.strides("q", torch.empty(2, 3))


def test_recording_keeps_launches_by_name():
    """A launcher's keyword launch is recorded with every argument under the kernel's parameter name,
    and nothing is recorded (or dispatched to the recorder) outside the block."""
    from vitpatch.kernels import window_attention as wa
    out = torch.empty(1, 2, 5, 16, device="meta")
    with _launch.recording() as launches:
        wa._delta_kernel[(1, 2, 1)](O=out, DO=out, DELTA=out[..., 0], **_launch.strides("o", out),
                                    **_launch.strides("do", out), H=2, N=5, HEAD_DIM=16, BLOCK_D=16, BLOCK_M=16)
    assert len(launches) == 1 and launches[0].named["HEAD_DIM"] == 16 and launches[0].named["stride_don"] == 16
    assert set(launches[0].named) == set(wa._delta_kernel.jit.arg_names)
    assert _launch._DISPATCH.get() is _launch._run
