"""WindowMask: validation, the dense mask against the docs/math.md §1 rule written as loops, statistics."""
import numpy as np
import pytest
import torch

from vitpatch import WindowMask
from vitpatch.masks import effective_operations

from _helpers import random_windows


def loop_allowed(windows, grid, P, key_keep, B):
    gh, gw = grid
    n = gh * gw
    N = P + n
    w = windows if windows.dim() == 3 else windows.expand(B, -1, -1)
    out = torch.zeros(B, N, N, dtype=torch.bool)
    for b in range(B):
        for i in range(N):
            for j in range(N):
                if key_keep is not None and not key_keep[b, j]:
                    continue
                if i < P or j < P:
                    out[b, i, j] = True
                    continue
                xl, yt, xr, yb = w[b, i - P].tolist()
                xj, yj = (j - P) % gw, (j - P) // gw
                out[b, i, j] = xl <= xj <= xr and yt <= yj <= yb
    return out


@pytest.mark.parametrize("grid,P", [((3, 4), 0), ((4, 3), 1), ((1, 1), 2), ((2, 5), 3)])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("keep", [False, True])
def test_dense_matches_loops(grid, P, shared, keep):
    B = 2
    w = random_windows(B, *grid)
    w = w[0] if shared else w
    kk = torch.rand(B, P + grid[0] * grid[1]) > 0.3 if keep else None
    m = WindowMask(w, grid, P, kk)
    expected = loop_allowed(m.windows.long(), grid, P, kk, B)
    assert torch.equal(m.dense(B), expected)
    # rows() on an arbitrary key subset is the corresponding slice
    keys = torch.tensor([0, m.seq_len - 1, m.seq_len // 2])
    assert torch.equal(m.rows(1, m.seq_len, B, keys), expected[:, 1:, keys])
    # counts, density and EO in O(n) agree with the dense mask
    assert torch.equal(m.allowed_counts(B), expected.sum(-1))
    assert m.density(B) == pytest.approx(expected.double().mean().item())
    patch = expected[:, P:, P:]
    assert m.effective_operations() == pytest.approx(patch.sum((1, 2)).double().mean().item())


def test_effective_operations_full_windows_is_n_squared():
    assert WindowMask.full((14, 14), 1).effective_operations() == 196 ** 2 == 38416
    assert WindowMask.full((24, 24), 1).effective_operations() == 331776
    assert effective_operations(WindowMask.full((14, 14)).windows, (14, 14)) == 38416


def test_effective_operations_with_keep_and_numpy():
    grid = (3, 3)
    w = WindowMask.full(grid).windows.numpy()
    keep = np.ones(9, dtype=bool)
    keep[[0, 4]] = False
    assert effective_operations(w, grid, keep) == 9 * 7
    self_only = WindowMask.square(grid, 0)
    assert self_only.effective_operations() == 9
    assert effective_operations(self_only.windows, grid, torch.from_numpy(keep)) == 7


def test_square_windows():
    m = WindowMask.square((5, 6), 1)
    assert m.windows[0].tolist() == [0, 0, 1, 1]
    assert m.windows[6 + 1].tolist() == [0, 0, 2, 2]
    assert m.windows[-1].tolist() == [4, 3, 5, 4]


def test_bad_input():
    grid = (2, 3)
    ok = WindowMask.full(grid).windows
    with pytest.raises(ValueError, match="inside the grid"):
        WindowMask(ok + 1, grid)
    with pytest.raises(ValueError, match="inside the grid"):
        WindowMask(ok - 1, grid)
    bad = ok.clone()
    bad[0] = torch.tensor([2, 0, 1, 0])
    with pytest.raises(ValueError, match="x_left <= x_right"):
        WindowMask(bad, grid)
    bad[0] = torch.tensor([0, 1, 0, 0])
    with pytest.raises(ValueError, match="y_top <= y_bottom"):
        WindowMask(bad, grid)
    with pytest.raises(ValueError, match="gh \\* gw"):
        WindowMask(ok[:5], grid)
    with pytest.raises(TypeError, match="integer"):
        WindowMask(ok.float(), grid)
    with pytest.raises(ValueError, match="shape"):
        WindowMask(ok[:, :3], grid)
    with pytest.raises(ValueError, match="grid"):
        WindowMask(ok, (2, 0))
    with pytest.raises(TypeError, match="key_keep"):
        WindowMask(ok, grid, 1, torch.ones(1, 7))
    with pytest.raises(ValueError, match="key_keep"):
        WindowMask(ok, grid, 1, torch.ones(1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch"):
        WindowMask(ok.expand(2, -1, -1), grid, 0, torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        WindowMask(ok, grid, -1)
    m = WindowMask(ok, grid, 1)
    with pytest.raises(ValueError, match="num_prefix_tokens \\+ gh \\* gw"):
        m.check(2, 8)
    with pytest.raises(ValueError, match="batch"):
        WindowMask(ok.expand(2, -1, -1), grid).check(3, 6)


def test_to_device_is_cached():
    m = WindowMask.full((2, 2))
    assert m.to("cpu") is m
    assert "grid=(2, 2)" in repr(m)


@pytest.mark.parametrize("grid,density", [((14, 14), 0.23), ((24, 24), 0.1), ((5, 9), 0.5)])
def test_synthetic_awd_windows(grid, density):
    from vitpatch.masks import synthetic_awd_windows

    w = synthetic_awd_windows(grid, batch_size=3, density=density, seed=1)
    m = WindowMask(w, grid, 1)  # validates: inside the grid, ordered corners
    n = grid[0] * grid[1]
    assert abs(m.effective_operations() / n ** 2 - density) < 0.03
    p = torch.arange(n)
    assert ((w[..., 0] <= p % grid[1]) & (p % grid[1] <= w[..., 2])).all()  # each window holds its patch
    assert torch.equal(w, synthetic_awd_windows(grid, batch_size=3, density=density, seed=1))
    with pytest.raises(ValueError, match="density"):
        synthetic_awd_windows(grid, density=0)
