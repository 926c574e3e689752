"""The two U-Nets the product trains, and the one place that builds a model from its config.

A checkpoint stores ``{"arch": ..., "in_channels": ..., "out_channels": ..., "width": ...}`` beside the
weights, so evaluate and render rebuild the right network without knowing which dataset it was trained on.
Each architecture says the multiple its input sides must have (``size_multiple``: 2 to the number of
poolings); inference pads an input to it only when needed, and patch training checks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    # No bias: the BatchNorm that follows has its own shift, so a conv bias would be redundant.
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(*conv_bn_relu(in_channels, out_channels), *conv_bn_relu(out_channels, out_channels))


class SimpleUNet(nn.Module):
    """The MNIST tutorial's network: two encoder levels, a bottleneck, two decoder levels.

    With ``width=64``: encoders of 64 and 128 channels, a 256-channel bottleneck, decoders of 128 and 64
    channels, 1,883,851 parameters for 11 classes. The very first conv keeps its bias and has no BatchNorm,
    as in the tutorial.
    """

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


class VGGUNet(nn.Module):
    """The classic U-Net with VGG blocks: 4 levels down, 4 up, widths w, 2w, 4w, 8w, 8w.

    Upsampling is bilinear; an odd-sized feature map is padded to its skip's size before concatenation, so
    any input size works, but only sides that are a multiple of ``size_multiple`` need no such padding and
    give every pixel the same kind of context.
    """

    levels = 4
    size_multiple = 2**levels

    def __init__(self, in_channels: int, out_channels: int, width: int = 64):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        self.inc = double_conv(in_channels, widths[0])
        self.down = nn.ModuleList(double_conv(widths[i], widths[i + 1]) for i in range(self.levels))
        # Up level i concatenates its skip (widths[i]) with the upsampled level below, which has the same width
        # (the bottleneck is 8w like level 3): 8w+8w -> 4w, 4w+4w -> 2w, 2w+2w -> w, w+w -> w.
        self.up = nn.ModuleList(double_conv(2 * widths[i], widths[max(i - 1, 0)]) for i in reversed(range(self.levels)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
            x = block(torch.cat([skip, x], dim=1))
        return self.head(x)


ARCHITECTURES: dict[str, type[nn.Module]] = {"simple_unet": SimpleUNet, "vgg_unet": VGGUNet}


def build_model(config: dict) -> nn.Module:
    """Build a network from the ``arch``/``in_channels``/``out_channels``/``width`` dict a checkpoint stores."""
    try:
        cls = ARCHITECTURES[config["arch"]]
    except KeyError:
        raise ValueError(f"unknown model architecture {config.get('arch')!r}; known: {sorted(ARCHITECTURES)}") from None
    return cls(int(config["in_channels"]), int(config["out_channels"]), width=int(config["width"]))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
