"""One small forward + backward of every Triton kernel on CUDA: the case ``compute-sanitizer`` runs.

    python bench/gpu_smoke.py            # on a machine with a CUDA GPU
    python bench/gpu_smoke.py --dry-run  # anywhere: imports everything, lists the cases

Odd sizes on purpose (N not a multiple of any tile, a key_keep with dropped keys, a prefix
token), bfloat16, so the sanitizer sees the masked edges of every kernel.
"""
from __future__ import annotations

import argparse
import sys


def cases():
    import torch

    from vitpatch import WindowMask, functional
    from vitpatch.masks import synthetic_awd_windows

    def qkv(B, h, N, d, Nk=None):
        g = torch.Generator(device="cuda").manual_seed(0)
        shape_k = (B, h, Nk or N, d)
        return [torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                for s in ((B, h, N, d), shape_k, shape_k)]

    def window():
        grid = (9, 11)
        keep = torch.rand(2, 1 + 99, device="cuda") > 0.2
        mask = WindowMask(synthetic_awd_windows(grid, 2, 0.23, seed=1), grid, 1, keep).to("cuda")
        q, k, v = qkv(2, 3, 100, 64)
        functional.window_attention(q, k, v, mask).float().square().sum().backward()

    def winft():
        grid = (9, 11)
        target = WindowMask(synthetic_awd_windows(grid, 2, 0.23, seed=2), grid, 1).to("cuda")
        q, k, v = qkv(2, 3, 100, 64)
        out, loss = functional.winft_attention(q, k, v, target=target)
        (out.float().square().sum() + loss.float()).backward()

    def pool():
        logits, x = (torch.randn(2, 101, n, device="cuda", dtype=torch.bfloat16).requires_grad_() for n in (49, 96))
        functional.cluster_pool(logits, x).float().square().sum().backward()

    def cluster():
        q, k, v = qkv(2, 3, 101, 64, Nk=49)
        functional.cluster_attention(q, k, v).float().square().sum().backward()

    return {"window_attention": window, "winft_attention": winft, "cluster_pool": pool,
            "cluster_attention": cluster}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    found = cases()
    if args.dry_run:
        print("gpu_smoke cases:", ", ".join(found))
        return 0
    import torch
    for name, fn in found.items():
        fn()
        torch.cuda.synchronize()
        print(f"{name}: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
