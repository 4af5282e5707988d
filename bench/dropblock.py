"""DropBlock2d: speed against F.dropout and achieved drop rates, in one run (15-40 s on 2 CPU cores).

    python bench/dropblock.py

Prints forward+backward time of ``DropBlock2d`` (p = 0.1, block 7) against ``F.dropout`` on the same
64x64x32x32 tensor as a ratio (below 1 means DropBlock is faster), the dropped fraction DropBlock2d
achieves on small and large maps at a 10% target, and, for contrast, the fraction reached with the
paper's (and timm's) seed probability, reimplemented below.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _timing import compare  # noqa: E402

from regfw.layers import DropBlock2d  # noqa: E402

P, BLOCK = 0.1, 7


def paper_gamma_drop_block(x: torch.Tensor, p: float, block: int) -> torch.Tensor:
    """timm's fast DropBlock, reimplemented for contrast: gamma = p * area / block^2 / valid area,
    seeds on every pixel, blocks centred on the seeds by a stride-1 max-pool."""
    _, _, h, w = x.shape
    b = min(block, h, w)
    gamma = p * h * w / b**2 / ((w - block + 1) * (h - block + 1))
    seeds = torch.empty_like(x).bernoulli_(min(gamma, 1.0))
    dropped = F.max_pool2d(seeds, kernel_size=b, stride=1, padding=b // 2)[..., :h, :w]
    keep = 1 - dropped
    return x * keep * (keep.numel() / keep.sum().clamp_min(1e-6))


def dropped_fraction(fn, shape: tuple[int, ...], calls: int) -> float:
    x = torch.ones(shape)
    return sum((fn(x) == 0).float().mean().item() for _ in range(calls)) / calls


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 64, 32, 32, requires_grad=True)
    grad = torch.randn_like(x)
    block = DropBlock2d(P, BLOCK).train()

    def run_dropblock() -> None:
        block(x).backward(grad)

    def run_dropout() -> None:
        F.dropout(x, P, training=True).backward(grad)

    def run_paper() -> None:
        paper_gamma_drop_block(x, P, BLOCK).backward(grad)

    ms = compare({"DropBlock2d": run_dropblock, "F.dropout": run_dropout, "paper-gamma": run_paper}, repeats=11)
    print(f"threads: {torch.get_num_threads()}, tensor 64x64x32x32 float32, p={P}, block={BLOCK}")
    print(
        f"dropblock_vs_dropout_fwd_bwd: {ms['DropBlock2d'] / ms['F.dropout']:.2f}x "
        f"(DropBlock2d {ms['DropBlock2d']:.1f} ms, F.dropout {ms['F.dropout']:.1f} ms)"
    )
    print(
        f"paper_gamma_maxpool_vs_dropout_fwd_bwd: {ms['paper-gamma'] / ms['F.dropout']:.2f}x "
        f"(timm-style DropBlock {ms['paper-gamma']:.1f} ms, F.dropout {ms['F.dropout']:.1f} ms)"
    )
    # (h, w, block, shape, calls): 16384 independent maps for the small sizes.
    cases = [(7, 7, 3, (64, 64), 4), (7, 7, 7, (64, 64), 4), (8, 8, 5, (64, 64), 4), (56, 56, 7, (16, 32), 2)]
    for h, w, b, (n, c), calls in cases:
        ours = dropped_fraction(lambda t, b=b: DropBlock2d(P, b).train()(t), (n, c, h, w), calls)
        print(f"dropblock_rate_{h}x{w}_block{b}: {ours:.2%} (target {P:.0%})")
    for h, w, b, (n, c), calls in cases:
        timm_rate = dropped_fraction(lambda t, b=b: paper_gamma_drop_block(t, P, b), (n, c, h, w), calls)
        print(f"paper_gamma_rate_{h}x{w}_block{b}: {timm_rate:.2%} (target {P:.0%})")


if __name__ == "__main__":
    main()
