"""A small CNN for square images: 3x3 conv blocks, one max-pool and a 2-layer head."""

from __future__ import annotations

import math

import torch
from torch import nn

from wattflow.zoo import MODELS


@MODELS.register("cnn")
class SmallCNN(nn.Module):
    """Takes [N, C, S, S] images or the same rows flattened ([N, C*S*S]: the bundled digits)."""

    def __init__(self, in_features: int, channels: list[int], hidden: int, num_classes: int, in_channels: int = 1):
        super().__init__()
        side = math.isqrt(in_features // in_channels)
        if in_channels * side * side != in_features:
            raise ValueError(f"cnn needs square images: in_features={in_features} is not in_channels={in_channels} "
                             "x a square")
        self.side, self.in_channels = side, in_channels
        convs: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            convs += [nn.Conv2d(c_in, c, kernel_size=3, padding=1), nn.ReLU()]
            c_in = c
        convs.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*convs)
        flat = c_in * (side // 2) ** 2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, self.in_channels, self.side, self.side)))

    @staticmethod
    def spec(input_shape: list[int], num_classes: int, channels: list[int] = (16, 32), hidden: int = 64) -> dict:
        """The spec of a SmallCNN for samples of `input_shape` ([F] flat square images, or [C, S, S])."""
        in_channels = int(input_shape[0]) if len(input_shape) == 3 else 1
        spec = {"kind": "cnn", "in_features": math.prod(input_shape), "channels": list(channels), "hidden": hidden,
                "num_classes": num_classes}
        if in_channels != 1:  # one-channel specs stay as they were, so their checkpoints and cache keys do too
            spec["in_channels"] = in_channels
        return spec
