"""A plain CNN classifier whose width is chosen to match another model's parameter count.

It is the baseline GLOM is compared with: conv, conv, global average pool, linear, so it
reads any image size. It is trained with cross-entropy, the usual loss for a CNN, and
exposes the same `loss` / `predict` pair as `Glom`, so one training loop serves both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SmallCNN", "matched_width", "parameter_count"]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class SmallCNN(nn.Module):
    """conv3x3(width) - ReLU - conv3x3(2 width) - ReLU - max-pool 2 - conv3x3(2 width) - ReLU - global mean - linear."""

    def __init__(self, *, width: int = 16, in_channels: int = 1, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(2 * width, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, n_classes)."""
        return self.classifier(self.features(images).mean(dim=(-2, -1)))

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(images), labels)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).argmax(dim=1)


def matched_width(parameters: int, *, in_channels: int = 1, n_classes: int = 10, max_width: int = 256) -> int:
    """The width whose SmallCNN has the parameter count nearest to `parameters`."""

    def count(width: int) -> int:
        w2 = 2 * width
        return (9 * in_channels + 1) * width + (9 * width + 1) * w2 + (9 * w2 + 1) * w2 + (w2 + 1) * n_classes

    return min(range(1, max_width + 1), key=lambda width: abs(count(width) - parameters))
