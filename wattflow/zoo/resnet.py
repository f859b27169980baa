"""ResNet for small images in the CIFAR layout (He et al. 2016, section 4.2): a 3x3 stem, three stages of
basic blocks at widths w, 2w, 4w (stride 2 at the start of stages 2 and 3, 1x1-conv shortcuts where the shape
changes), global average pooling and a linear classifier. depth = 6n + 2: ResNet-8 (n=1), -14, -20 (n=3).
Compute-bound for its size: ResNet-8 at width 16 has ~78k parameters and ~12 MFLOPs per 32x32 image.
"""

from __future__ import annotations

import torch
from torch import nn

from wattflow.zoo import MODELS


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@MODELS.register("resnet")
class ResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, depth: int = 8, width: int = 16):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"resnet depth must be 6n + 2 with n >= 1 (8, 14, 20, ...); got {depth}")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        layers, c_in = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                layers.append(BasicBlock(c_in, c_out, stride=2 if stage > 0 and b == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


    @staticmethod
    def spec(input_shape: list[int], num_classes: int, depth: int = 8, width: int = 16) -> dict:
        """The spec of a CIFAR-layout ResNet for [C, H, W] images."""
        if len(input_shape) != 3:
            raise ValueError(f"resnet takes [channels, height, width] images; the samples have shape "
                             f"{list(input_shape)}")
        return {"kind": "resnet", "in_channels": int(input_shape[0]), "num_classes": num_classes, "depth": depth,
                "width": width}
