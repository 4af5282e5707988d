"""Dropout for convolutional feature maps: ``spatial_dropout`` and ``dropblock``.

Neighbouring activations of a conv map are strongly correlated, so per-element dropout removes
little information there: the unit next to a dropped one carries nearly the same signal. These
variants drop correlated groups instead.

* ``spatial_dropout`` drops whole channels (Tompson et al., "Efficient Object Localization Using
  Convolutional Networks", CVPR 2015), after 1d, 2d and 3d convolutions.
* ``dropblock`` drops contiguous square blocks of 2d maps (Ghiasi, Lin and Le, "DropBlock: A
  regularization method for convolutional networks", NeurIPS 2018), at an exact expected rate
  on any map size (see :mod:`regfw.layers.drop_block`).

Both act on the ``conv`` kind (table: 0.1-0.3) and belong to the ``dropout`` family.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from regfw.extend import CONV, CONV_TYPES, InjectingRegularizer, InjectionConfig, PlanItem, hookimpl, rate
from regfw.layers import DropBlock2d, SpatialDropout

_CONV2D = (nn.Conv2d, nn.ConvTranspose2d)


@dataclass
class SpatialDropoutConfig(InjectionConfig):
    """The conv rate; null takes the rate policy (or the table default), 0 switches it off."""

    conv: float | None = rate(doc="share of channels dropped after conv layers (table: 0.1-0.3)")


class SpatialDropoutRegularizer(InjectingRegularizer):
    """Whole-channel dropout after conv layers (and their norm and activation)."""

    name = "spatial_dropout"
    family = "dropout"
    description = "channel (spatial) dropout after conv layers, 1d/2d/3d"
    Config = SpatialDropoutConfig
    kinds = (CONV,)

    def supports(self, kind: str, module: nn.Module, out_dim: int | None) -> str | None:
        if out_dim is not None and out_dim < 3:
            return f"spatial dropout needs (N, C, *spatial) maps, the output there has rank {out_dim}"
        return None

    def make_module(self, kind: str, rate: float, item: PlanItem) -> nn.Module:
        return SpatialDropout(rate)


@dataclass
class DropBlockConfig(InjectionConfig):
    """The conv rate (expected fraction dropped) and the block shape."""

    conv: float | None = rate(doc="expected fraction dropped after 2d conv layers (table: 0.1-0.3)")
    #: Side of the square block, or [height, width]; 7 in the paper. Blocks larger than a map are
    #: clipped to it, with the rate kept.
    block_size: int | list[int] = 7
    #: One mask per sample shared by all channels instead of one per channel.
    shared_channels: bool = False

    def __post_init__(self) -> None:
        size = [self.block_size] * 2 if isinstance(self.block_size, int) else list(self.block_size)
        if len(size) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in size):
            raise ValueError(f"block_size: got {self.block_size!r}, expected a positive whole number or "
                             f"[height, width] of positive whole numbers")
        self.block_size = size[0] if size[0] == size[1] else size


class DropBlockRegularizer(InjectingRegularizer):
    """DropBlock after 2d conv layers (and their norm and activation), at an exact rate."""

    name = "dropblock"
    family = "dropout"
    description = "DropBlock on 2d conv maps (contiguous blocks; exact drop rate on any map size)"
    Config = DropBlockConfig
    kinds = (CONV,)

    def supports(self, kind: str, module: nn.Module, out_dim: int | None) -> str | None:
        if out_dim is not None:
            ok = out_dim == 4
        else:
            ok = isinstance(module, _CONV2D) or not isinstance(module, CONV_TYPES)
        if not ok:
            shown = f"rank {out_dim}" if out_dim is not None else type(module).__name__
            return f"DropBlock2d needs (N, C, H, W) maps, got {shown}; use spatial_dropout there"
        return None

    def make_module(self, kind: str, rate: float, item: PlanItem) -> nn.Module:
        size = self.config.block_size
        return DropBlock2d(rate, size if isinstance(size, int) else tuple(size),
                           shared_channels=self.config.shared_channels)


@hookimpl
def regfw_register_regularizers(register):
    register(SpatialDropoutRegularizer)
    register(DropBlockRegularizer)
