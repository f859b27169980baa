"""A multi-layer perceptron on flattened inputs (LeNet-300-100 shape with hidden=[300, 100])."""

from __future__ import annotations

import math

import torch
from torch import nn

from wattflow.zoo import MODELS


@MODELS.register("mlp")
class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # any sample shape: images are read row by row

    @staticmethod
    def spec(input_shape: list[int], num_classes: int, hidden: list[int] = (128, 64)) -> dict:
        """The spec of an MLP for samples of `input_shape`."""
        return {"kind": "mlp", "in_features": math.prod(input_shape), "hidden": list(hidden),
                "num_classes": num_classes}
