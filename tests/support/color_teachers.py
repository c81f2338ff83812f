"""Stand-in image teachers for the inspect tests: the class is the image's dominant colour channel.

    kdcache cache --teacher tests.support.color_teachers:sharp ...     # confident
    kdcache cache --teacher tests.support.color_teachers:blurry ...    # weaker, with a fixed bias

Each returns an ``nn.Module`` mapping normalised RGB images [B, 3, H, W] to 3 logits: a scale
times the per-channel mean (``blurry`` adds a bias towards class 0), so a red image is class 0,
green 1, blue 2, whatever the file's label says.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelMean(nn.Module):
    def __init__(self, scale: float, bias: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("bias", torch.tensor(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.mean(dim=(2, 3)) + self.bias


def sharp() -> nn.Module:
    return ChannelMean(6.0)


def blurry() -> nn.Module:
    return ChannelMean(1.0, bias=(1.5, 0.0, 0.0))
