"""``simple_unet``: the MNIST tutorial's network, two encoder levels, a bottleneck, two decoder levels."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.architectures.blocks import conv_bn_relu, double_conv


class SimpleUNet(nn.Module):
    """Widths w, 2w, 4w; the very first conv keeps its bias and has no BatchNorm, as in the tutorial."""

    # Two 2x poolings: a side that is not a multiple of 4 leaves an upsampled map and its skip of different sizes.
    size_multiple = 4

    def __init__(self, in_channels: int, out_channels: int, width: int = 64):
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.enc1 = nn.Sequential(
            nn.Conv2d(in_channels, w1, 3, padding=1, bias=True),
            nn.ReLU(inplace=True),
            *conv_bn_relu(w1, w1),
        )
        self.enc2 = double_conv(w1, w2)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = nn.Sequential(
            double_conv(w2, w3), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        )
        self.dec1 = nn.Sequential(
            double_conv(w3 + w2, w2), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        )
        self.dec2 = double_conv(w2 + w1, w1)
        self.head = nn.Conv2d(w1, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip1 = self.enc1(x)
        skip2 = self.enc2(self.pool(skip1))
        x = self.bottleneck(self.pool(skip2))
        x = self.dec1(torch.cat([x, skip2], dim=1))
        x = self.dec2(torch.cat([x, skip1], dim=1))
        return self.head(x)
