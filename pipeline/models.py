"""The model registry (``<ds>.train.arch`` -> network class) and the one place that builds a model from its config.

Each architecture is a class of ``pipeline/architectures/`` taking ``(in_channels, out_channels, width=...)``
with a ``size_multiple``; adding one is that file and a line in ``ARCHITECTURES``.
"""

from __future__ import annotations

from torch import nn

from pipeline.architectures.simple_unet import SimpleUNet
from pipeline.architectures.vgg_unet import VGGUNet

ARCHITECTURES: dict[str, type[nn.Module]] = {"simple_unet": SimpleUNet, "vgg_unet": VGGUNet}


def build_model(config: dict) -> nn.Module:
    try:
        cls = ARCHITECTURES[config["arch"]]
    except KeyError:
        raise ValueError(f"unknown model architecture {config.get('arch')!r}; known: {sorted(ARCHITECTURES)}") from None
    return cls(int(config["in_channels"]), int(config["out_channels"]), width=int(config["width"]))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
