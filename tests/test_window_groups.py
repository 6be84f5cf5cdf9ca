"""The grouped CPU plan of window attention (vitpatch/chunked.py, docs/math.md §1; paper 000 §4.1, eq. 4).

Every plan the cost estimate can pick — dense (with or without the mask), grouped packs without
a mask, grouped packs with their rows, a group whose keys are the whole sequence — is checked
against the float64 reference, values and gradients of q, k and v.
"""
import pytest
import torch

from vitpatch import WindowMask, chunked, functional, reference

from _helpers import TOL, check_against_reference, qkv, random_windows


def _check(mask, B, h=2, d=8, dtype=torch.float32, scale=0.35):
    q, k, v = qkv(B, h, mask.seq_len, d, dtype=dtype, device="cpu")
    check_against_reference(lambda q, k, v: chunked.window_attention(q, k, v, mask, scale),
                            lambda q, k, v: reference.window_attention(q, k, v, mask, scale=scale),
                            [q, k, v], tol=TOL[dtype])
    return chunked.window_plan(mask, q)


@pytest.fixture
def force(monkeypatch):
    def set_(value):
        monkeypatch.setattr(chunked, "_FORCE_PLAN", value)
    return set_


def _windows(kind, B, grid, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = random_windows(B, *grid, gen)
    return w[0] if kind == "shared" else w


GRIDS = [(5, 7), (6, 6), (1, 1), (9, 4)]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("P", [0, 1, 2])
@pytest.mark.parametrize("kind", ["shared", "per_image"])
@pytest.mark.parametrize("plan", ["dense", ("grouped", 4), ("grouped", 16)], ids=str)
def test_every_plan_matches_reference(force, grid, P, kind, plan):
    force(plan)
    B = 2
    mask = WindowMask(_windows(kind, B, grid), grid, P)
    got = _check(mask, B)
    want = "dense" if plan == "dense" else "grouped"
    assert got.kind == want
    if want == "grouped":
        assert got.per_image == (kind == "per_image")
        # every patch query is in exactly one group, prefix queries in the prefix pack
        rows = torch.cat([p.qidx if p.valid is None else p.qidx[p.valid.reshape(-1)] for p in got.packs])
        N, h = mask.seq_len, 2
        want_rows = (torch.arange(B)[:, None] * h * N + torch.arange(N)).reshape(-1) if got.per_image \
            else torch.arange(N)
        assert torch.equal(torch.sort(rows).values, want_rows)


def test_grouped_without_mask(force):
    """Full windows: every query of a group allows every gathered key, so no pack carries a mask."""
    force(("grouped", 8))
    grid, P = (5, 7), 1
    mask = WindowMask.full(grid, P)
    plan = _check(mask, 2)
    assert plan.kind == "grouped" and plan.packs and all(p.bias is None for p in plan.packs)


def test_grouped_with_rows_and_unmasked_groups_side_by_side(force):
    """Self-only windows: patch groups need their rows; the prefix pack (all keys) needs none."""
    force(("grouped", 8))
    grid, P = (6, 5), 2
    mask = WindowMask.square(grid, 0, P)
    plan = _check(mask, 3)
    assert plan.packs[0].G == P and plan.packs[0].bias is None and plan.packs[0].kidx is None
    assert all(p.bias is not None for p in plan.packs[1:])
    assert max(p.K for p in plan.packs[1:]) <= P + 8   # each group gathers only its own patches


def test_group_that_falls_back_to_dense_rows(force):
    """One query window covers the grid: its group gathers every key and runs with its rows."""
    force(("grouped", 8))
    grid, P, B = (5, 7), 1, 2
    w = WindowMask.square(grid, 1).windows.clone()
    w[17] = torch.tensor([0, 0, grid[1] - 1, grid[0] - 1])
    mask = WindowMask(w, grid, P)
    plan = _check(mask, B)
    whole = [p for p in plan.packs[1:] if p.K == mask.seq_len]
    assert whole and all(p.bias is not None for p in whole)
    assert any(p.K < mask.seq_len for p in plan.packs[1:])


@pytest.mark.parametrize("plan", ["dense", ("grouped", 8), None], ids=str)
@pytest.mark.parametrize("P", [0, 1, 2])
def test_key_keep_with_empty_rows(force, plan, P):
    """Dropped keys leave some queries (and, for image 1, every query) with no allowed key:
    zeros and zero gradient, never NaN, on every plan."""
    force(plan)
    grid, B = (5, 7), 3
    n = grid[0] * grid[1]
    w = WindowMask.square(grid, 0).windows
    gen = torch.Generator().manual_seed(2)
    kk = torch.rand(B, P + n, generator=gen) > 0.4
    kk[1] = False
    kk[2, :P] = False
    mask = WindowMask(w, grid, P, kk)
    _check(mask, B)
    counts = mask.allowed_counts(B)
    assert bool((counts == 0).any()) and bool((counts > 0).any())
    q, k, v = (t.requires_grad_() for t in qkv(B, 2, P + n, 8, device="cpu"))
    out = chunked.window_attention(q, k, v, mask, 0.35)
    empty = counts == 0
    assert torch.equal(out.transpose(1, 2)[empty], torch.zeros_like(out.transpose(1, 2)[empty]))
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad.transpose(1, 2)[empty], torch.zeros_like(q.grad.transpose(1, 2)[empty]))
    assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1]))


def test_padding_rows_of_a_partial_group(force):
    """n = 35 in groups of 16: the last group is padded with duplicates that must not count twice."""
    force(("grouped", 16))
    grid = (5, 7)
    mask = WindowMask(_windows("per_image", 2, grid, seed=5), grid, 1)
    plan = _check(mask, 2)
    assert any(p.valid is not None for p in plan.packs)


def test_half_precision_and_noncontiguous_inputs(force):
    force(("grouped", 8))
    grid, P, B = (6, 6), 1, 2
    mask = WindowMask(_windows("per_image", B, grid, seed=7), grid, P)
    q, k, v = qkv(B, 2, mask.seq_len, 16, dtype=torch.float16, device="cpu")
    check_against_reference(lambda q, k, v: chunked.window_attention(q, k, v, mask, 0.25),
                            lambda q, k, v: reference.window_attention(q, k, v, mask, scale=0.25),
                            [q, k, v], noncontig=True)


@pytest.mark.parametrize("layout", ["padded_rows", "strided_d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_plan_on_strided_inputs(force, layout, dtype):
    """The dense plan calls PyTorch's fused CPU kernel directly when ``d`` has unit stride (rows of a
    padded buffer, as q/k/v sliced out of a qkv projection are) and SDPA otherwise (``d`` strided)."""
    force("dense")
    grid, P, B = (5, 7), 1, 2
    mask = WindowMask(_windows("per_image", B, grid, seed=11), grid, P)

    def run(q, k, v):
        if layout == "strided_d":  # the same values with stride(-1) = N: SDPA's own choice
            q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v))
            assert q.stride(-1) != 1
        return chunked.window_attention(q, k, v, mask, 0.3)

    q, k, v = qkv(B, 2, mask.seq_len, 8, dtype=dtype, device="cpu")
    check_against_reference(run, lambda q, k, v: reference.window_attention(q, k, v, mask, scale=0.3),
                            [q, k, v], noncontig=layout == "padded_rows")
    assert chunked.window_plan(mask, q).kind == "dense"


def test_cost_estimate_picks_groups_for_small_windows_and_dense_for_full(monkeypatch):
    """The choice is made from the O(n) windows: no N x N mask is built on the grouped side."""
    grid, P = (32, 32), 1
    B, h, d = 1, 2, 16
    q = torch.zeros(B, h, P + 1024, d)
    small = WindowMask.square(grid, 2, P)
    real_rows = WindowMask.rows

    def rows(self, start, end, *a, **kw):
        assert end - start < self.seq_len, "the grouped plan must not build the full mask"
        return real_rows(self, start, end, *a, **kw)

    monkeypatch.setattr(WindowMask, "rows", rows)
    plan = chunked.window_plan(small, q)
    assert plan.kind == "grouped" and plan.estimates["dense"] > min(
        v for key, v in plan.estimates.items() if key.startswith("grouped"))
    pairs = sum(p.Bt * p.G * p.K for p in plan.packs) * B * h
    assert pairs < 0.1 * B * h * small.seq_len ** 2
    full = WindowMask.full(grid, P)
    plan = chunked.window_plan(full, q)
    assert plan.kind == "dense" and plan.bias is None


def test_tiny_problems_run_one_dense_call():
    for grid in [(1, 1), (2, 3), (8, 8)]:
        mask = WindowMask(_windows("per_image", 2, grid), grid, 1)
        plan = _check(mask, 2)
        everything = bool((mask.allowed_counts(2) == mask.seq_len).all())
        assert plan.kind == "dense" and (plan.bias is None) == everything


def test_packs_stay_within_the_budget(monkeypatch, force):
    """Each pack's working set is bounded (one group per pack at a tiny budget): memory stays
    O(B h N d) plus one pack, and the answer does not change."""
    monkeypatch.setenv("VITPATCH_CHUNK_MB", "0.05")
    force(("grouped", 8))
    grid, P, B = (7, 9), 1, 2
    mask = WindowMask(_windows("per_image", B, grid, seed=3), grid, P)
    plan = _check(mask, B, h=2, d=8)
    limit = chunked._env.chunk_budget_bytes() // 4
    for p in plan.packs[1:]:
        size = 4 * (2 * 8 * 4 * (p.G + p.K) + p.G * p.K)
        assert p.Bt == 1 or p.Bt * size <= limit
    assert len(plan.packs) > 10


def test_plan_is_memoised_and_rebuilt_after_in_place_edits():
    grid = (12, 12)
    mask = WindowMask.square(grid, 1, 1)
    q = torch.zeros(1, 2, 145, 8)
    a = chunked.window_plan(mask, q)
    assert chunked.window_plan(mask, q) is a
    mask.windows[3] = torch.tensor([0, 0, 11, 11], dtype=mask.windows.dtype)
    b = chunked.window_plan(mask, q)
    assert b is not a
    _check(mask, 1)


def test_public_function_on_the_torch_path(monkeypatch):
    """Through vitpatch.functional with VITPATCH_BACKEND=torch, at a size where grouping pays."""
    monkeypatch.setenv("VITPATCH_BACKEND", "torch")
    grid, P, B = (20, 20), 1, 1
    mask = WindowMask.square(grid, 1, P)
    q, k, v = qkv(B, 2, mask.seq_len, 8, device="cpu")
    assert chunked.window_plan(mask, q).kind == "grouped"
    check_against_reference(lambda q, k, v: functional.window_attention(q, k, v, mask),
                            lambda q, k, v: reference.window_attention(q, k, v, mask), [q, k, v])


def test_plan_rejects_a_mask_of_another_size():
    mask = WindowMask.square((3, 3), 1, 1)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        chunked.window_plan(mask, torch.zeros(1, 1, 9, 4))
