"""DropBlock2d: exact expected rate on small and large maps, block structure, masks, rescaling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regfw.layers import DropBlock2d, drop_block_2d, drop_block_gamma


def coverage(h: int, w: int, bh: int, bw: int) -> torch.Tensor:
    """Brute force: how many seed blocks (top-left corners where a block fits) cover each pixel."""
    seeds = torch.ones(1, 1, h - bh + 1, w - bw + 1, dtype=torch.float64)
    return F.conv_transpose2d(seeds, torch.ones(1, 1, bh, bw, dtype=torch.float64))[0, 0]


@pytest.mark.parametrize(
    "h,w,block",
    [(7, 7, 3), (7, 7, 7), (8, 8, 5), (56, 56, 7), (7, 7, 1), (8, 8, 4), (5, 9, 4), (9, 5, (2, 3)), (6, 6, 10)],
)
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.95])
def test_gamma_solves_the_exact_coverage_equation(h, w, block, p):
    gamma = drop_block_gamma(h, w, block, p)
    bh, bw = (block, block) if isinstance(block, int) else block
    cov = coverage(h, w, min(bh, h), min(bw, w))
    expected = 1 - ((1 - gamma) ** cov).mean().item()
    assert expected == pytest.approx(p, abs=1e-12)


def test_gamma_edge_cases():
    assert drop_block_gamma(7, 7, 3, 0.0) == 0.0
    assert drop_block_gamma(7, 7, 3, 1.0) == 1.0
    assert drop_block_gamma(7, 7, 7, 0.1) == pytest.approx(0.1, abs=1e-15)  # one seed covers the map
    # The paper's gamma = p / block^2 * area / valid_area counts overlapping blocks twice; covering
    # p of the map with overlaps takes more seeds, so the exact gamma is larger (by about 6% here).
    naive = 0.1 / 49 * (56 * 56) / (50 * 50)
    assert naive < drop_block_gamma(56, 56, 7, 0.1) < 1.1 * naive


# (h, w, block, maps per call, calls). Per-channel masks: N*C maps per call. The binomial bound on the
# fraction's std is sqrt(p (1-p) / independent maps), worst for block == map (all-or-nothing maps):
# 7x7/7 with 64*64*4 = 16384 maps gives std 0.0023 at p = 0.1 (0.0036 at p = 0.3), so the
# +-1.5 pp tolerance is over 4 std.
RATE_CASES = [(7, 7, 3, (64, 64), 4), (7, 7, 7, (64, 64), 4), (8, 8, 5, (64, 64), 4), (56, 56, 7, (16, 32), 2)]


@pytest.mark.parametrize("h,w,block,nc,calls", RATE_CASES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("p", [0.1, 0.3])
def test_drop_fraction_within_one_and_a_half_points(h, w, block, nc, calls, shared, p):
    torch.manual_seed(0)
    n, c = nc
    if shared:  # one mask per sample: keep the number of independent masks the same
        n, c = n * c, 2
    x = torch.ones(n, c, h, w)
    fractions = [(drop_block_2d(x, p, block, shared_channels=shared) == 0).float().mean().item() for _ in range(calls)]
    assert sum(fractions) / calls == pytest.approx(p, abs=0.015)


def test_per_position_drop_probability_matches_the_coverage_formula():
    # Checks the sampler's distribution, not only its mean: corners are covered by 1 seed, the centre
    # by 9; each pixel is dropped with probability 1 - (1 - gamma)^k. 16384 maps: std <= 0.004, tol 0.02.
    torch.manual_seed(1)
    p, h, block = 0.2, 7, 3
    x = torch.ones(256, 64, h, h)
    dropped = (drop_block_2d(x, p, block) == 0).double().mean(dim=(0, 1))
    gamma = drop_block_gamma(h, h, block, p)
    theory = 1 - (1 - gamma) ** coverage(h, h, block, block)
    assert (dropped - theory).abs().max().item() < 0.02
    assert theory[3, 3] > 3 * theory[0, 0]


def test_blocks_are_contiguous_squares():
    torch.manual_seed(0)
    x = torch.ones(2, 4, 32, 32)
    out = drop_block_2d(x, 0.02, 5)
    dropped = (out == 0).double()
    # Every dropped pixel lies in some fully dropped 5x5 window: a 5x5 erosion followed by a 5x5
    # dilation (opening) reproduces the dropped set exactly.
    eroded = -F.max_pool2d(-dropped, 5, stride=1)
    opened = F.max_pool2d(F.pad(eroded, (4, 4, 4, 4)), 5, stride=1)
    assert dropped.sum() > 0
    assert torch.equal(opened, dropped)


def test_block_as_large_as_the_map_drops_whole_maps():
    torch.manual_seed(0)
    out = drop_block_2d(torch.ones(64, 64, 7, 7), 0.3, 7).flatten(2)
    assert torch.equal(out.amin(-1), out.amax(-1))


def test_per_channel_masks_differ_and_shared_masks_agree_across_channels():
    torch.manual_seed(0)
    x = torch.ones(8, 16, 14, 14)
    per_channel = drop_block_2d(x, 0.3, 3) == 0
    shared = drop_block_2d(x, 0.3, 3, shared_channels=True) == 0
    assert all(not torch.equal(per_channel[i, 0], per_channel[i, 1]) for i in range(8))
    assert torch.equal(shared, shared[:, :1].expand_as(shared))
    assert not torch.equal(shared[0], shared[1])  # but differ between samples


@pytest.mark.parametrize("shared", [False, True])
def test_rescaling_is_per_sample_numel_over_kept(shared):
    torch.manual_seed(0)
    x = torch.ones(6, 3, 16, 16)
    out = drop_block_2d(x, 0.4, 4, shared_channels=shared)
    for sample in out:
        kept = (sample != 0).sum().item()
        assert kept > 0
        values = sample[sample != 0]
        assert torch.allclose(values, torch.full_like(values, sample.numel() / kept))
        assert sample.sum().item() == pytest.approx(sample.numel(), rel=1e-5)  # sum preserved


def test_gradient_is_the_scaled_mask():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    out = drop_block_2d(x, 0.3, 3)
    out.sum().backward()
    assert torch.allclose(x.grad * x.detach(), out.detach(), atol=1e-6)


@pytest.mark.parametrize("shape,block",
                         [((2, 3, 7, 9), 4), ((2, 3, 5, 5), 7), ((2, 3, 6, 11), (2, 5)), ((1, 1, 1, 1), 3)])
def test_even_blocks_rectangular_maps_and_oversized_blocks_keep_shape(shape, block):
    torch.manual_seed(0)
    out = DropBlock2d(0.5, block).train()(torch.ones(shape))
    assert out.shape == shape
    assert torch.isfinite(out).all()


def test_invalid_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="block_size"):
        DropBlock2d(0.1, 0)
    with pytest.raises(ValueError, match="block_size"):
        DropBlock2d(0.1, (3, 3, 3))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        DropBlock2d(0.1, 3)(torch.ones(3, 8, 8))


def test_repr_shows_options():
    assert repr(DropBlock2d(0.2, 5, shared_channels=True)) == "DropBlock2d(p=0.2, block_size=5, shared_channels=True)"


def test_large_seed_counts_are_chunked_with_the_same_rate(monkeypatch):
    import regfw.layers.drop_block as db

    monkeypatch.setattr(db, "_MAX_INDICES", 50)  # force many chunks
    torch.manual_seed(0)
    out = drop_block_2d(torch.ones(32, 32, 8, 8), 0.5, 3)
    assert (out == 0).float().mean().item() == pytest.approx(0.5, abs=0.015)


def test_float16_large_sample_counts_do_not_overflow():
    # 64*32*32 = 65536 elements per sample exceeds float16's max; the count is kept in float32.
    torch.manual_seed(0)
    out = drop_block_2d(torch.ones(2, 64, 32, 32, dtype=torch.float16), 0.1, 7)
    assert torch.isfinite(out).all()
    assert out.float().mean().item() == pytest.approx(1.0, abs=0.01)
