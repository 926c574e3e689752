"""``vgg_unet``: the classic U-Net with VGG blocks, 4 levels down and 4 up."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.architectures.blocks import double_conv


class VGGUNet(nn.Module):
    """Widths w, 2w, 4w, 8w, 8w; bilinear upsampling, an odd-sized map padded to its skip's size."""

    levels = 4
    size_multiple = 2**levels

    def __init__(self, in_channels: int, out_channels: int, width: int = 64):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        self.inc = double_conv(in_channels, widths[0])
        self.down = nn.ModuleList(double_conv(widths[i], widths[i + 1]) for i in range(self.levels))
        # Up level i concatenates its skip with the upsampled level below, of the same width: 8w+8w -> 4w, ...
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
