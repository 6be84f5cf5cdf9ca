"""The WinfT part of the chunked PyTorch path (vitpatch/chunked.py, docs/math.md §6): bounded chunks, edge values.

Peak-memory numbers against the reference come from the CPU memory rows of
``python -m bench --ops winft_attention`` (a measurement, not a pass/fail test).
"""
import pytest
import torch

from vitpatch import WindowMask, chunked, functional, reference

from _helpers import check_against_reference, qkv, random_windows


@pytest.mark.parametrize("mode", ["multiply", "mask"])
def test_chunks_never_hold_h_n_n(monkeypatch, mode):
    """With a small budget every probability buffer covers a few query rows, never ``(B, h, N, N)``."""
    monkeypatch.setenv("VITPATCH_BACKEND", "torch")
    monkeypatch.setenv("VITPATCH_CHUNK_MB", "0.02")
    B, h, grid, P, d = 1, 2, (6, 7), 1, 8
    N = P + 42
    rows = chunked._winft_rows(B, h, N)
    assert 1 < rows < N // 2
    shapes = []
    real = chunked._winft_probs

    def spy(*args):
        p = real(*args)
        shapes.append(tuple(p.shape))
        return p

    monkeypatch.setattr(chunked, "_winft_probs", spy)
    target = WindowMask(random_windows(B, *grid), grid, P, torch.rand(B, N) > 0.2)
    q, k, v = qkv(B, h, N, d, device="cpu")
    check_against_reference(lambda q, k, v: functional.winft_attention(q, k, v, mode=mode, target=target),
                            lambda q, k, v: reference.winft_attention(q, k, v, mode=mode, target=target),
                            [q, k, v])
    assert shapes and all(s[:2] == (B, h) and s[2] <= rows and s[3] == N for s in shapes)
    assert sum(s[2] for s in shapes) >= 2 * N  # forward and backward each cover every query row


@pytest.mark.parametrize("mode", ["multiply", "mask"])
def test_large_logits_match_reference(monkeypatch, mode):
    """Logits spread over hundreds: many probabilities underflow; values and gradients still match."""
    monkeypatch.setenv("VITPATCH_BACKEND", "torch")
    B, h, N, d = 2, 2, 12, 16
    q, k, v = qkv(B, h, N, d, device="cpu")
    q = q * 12
    check_against_reference(lambda q, k, v: functional.winft_attention(q, k, v, mode=mode, return_gate_sum=True),
                            lambda q, k, v: reference.winft_attention(q, k, v, mode=mode, return_gate_sum=True),
                            [q, k, v])


def test_chunk_probs_exact_zeros_and_rows():
    """Mask mode: removed keys get probability exactly 0; multiply mode: gated-off logits are 0, not removed."""
    g = torch.Generator().manual_seed(3)
    qs, kf = torch.randn(2, 3, 5, 8, generator=g) * 4, torch.randn(2, 3, 9, 8, generator=g)
    allowed = torch.rand(2, 5, 9, generator=g) > 0.5
    allowed[:, torch.arange(5), torch.arange(5)] = True
    s = qs @ kf.transpose(-2, -1)
    p = chunked._winft_probs(qs, kf, allowed, None)
    assert torch.equal(p == 0, ~allowed[:, None].expand_as(p))
    torch.testing.assert_close(p, torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), -1), atol=1e-6, rtol=0)
    gate = allowed.float()
    pm = chunked._winft_probs(qs, kf, None, gate)
    assert (pm > 0).all()
    torch.testing.assert_close(pm, torch.softmax(s * gate[:, None], -1), atol=1e-6, rtol=0)
