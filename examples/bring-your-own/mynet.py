"""A user's own model, defined outside wattflow: wattflow imports it by the path the recipe names
(`train.model.factory: "mynet:build"`, `path: examples/bring-your-own`). Any torch.nn.Module works that maps a
batch of images [N, C, H, W] to class scores [N, classes]."""

import torch
from torch import nn


class ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class MyNet(nn.Module):
    """Three conv stages (the second with a residual connection), each halving the image, then global average
    pooling and a linear head."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(ConvBlock(in_channels, width), nn.MaxPool2d(2))
        self.down = nn.Sequential(ConvBlock(width, 2 * width), nn.MaxPool2d(2))
        self.residual = nn.Sequential(ConvBlock(2 * width, 2 * width), ConvBlock(2 * width, 2 * width))
        self.top = nn.Sequential(ConvBlock(2 * width, 4 * width), nn.MaxPool2d(2))
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.stem(x))
        x = self.top(x + self.residual(x))
        return self.classifier(x.mean(dim=(2, 3)))


def build(in_channels: int = 3, num_classes: int = 10, width: int = 16) -> nn.Module:
    return MyNet(in_channels, num_classes, width)
