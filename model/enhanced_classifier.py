"""The seed's EnhancedClassifier: a backbone's features answered by a memory or by a network head.

Input -> backbone -> features; the memory retrieves the nearest stored item (its class and
similarity) and the head (dropout, linear) gives logits. At inference the memory's class
is used where its confidence reaches the threshold (>=), the head's elsewhere, and each
sample says which path it took. Training uses the head's logits for the classification
loss on every sample (the seed took it on the mixed output, where memory-path samples
carry a constant one-hot and so no gradient) plus the memory's contrastive loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.memory_modules import CachedMemory, MemoryReadout, TrainableMemory

Memory = CachedMemory | TrainableMemory


@dataclass
class ClassifierOutput:
    """Per sample: the head's logits, the features, the chosen class and whether the memory chose it."""

    logits: torch.Tensor
    features: torch.Tensor
    prediction: torch.Tensor
    from_memory: torch.Tensor  # bool
    memory_prediction: torch.Tensor  # the memory's class, -1 where it holds nothing
    memory_confidence: torch.Tensor  # 0 where there is no memory


@dataclass
class ClassifierLoss:
    total: torch.Tensor
    classification: torch.Tensor
    memory: torch.Tensor


class EnhancedClassifier(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        memory: Memory | None = None,
        *,
        confidence_threshold: float = 0.85,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        self.memory = memory
        self.num_classes = num_classes
        self.confidence_threshold = confidence_threshold

    def forward(self, images: torch.Tensor) -> ClassifierOutput:
        """Both paths for every sample (training needs the head's logits everywhere), then the choice."""
        features = self.backbone(images)
        logits = self.head(features)
        readout = self.read_memory(features)
        from_memory = self.memory_path(readout)
        prediction = torch.where(from_memory, readout.prediction, logits.detach().argmax(dim=1))
        return ClassifierOutput(logits, features, prediction, from_memory, readout.prediction, readout.confidence)

    def read_memory(self, features: torch.Tensor) -> MemoryReadout:
        if self.memory is None:
            n = len(features)
            return MemoryReadout(
                torch.full((n,), -1, dtype=torch.long, device=features.device), torch.zeros(n, device=features.device)
            )
        return self.memory.retrieve(features.detach())

    def memory_path(self, readout: MemoryReadout) -> torch.Tensor:
        """True where the memory answers: it holds something and its confidence reaches the threshold."""
        return (readout.prediction >= 0) & (readout.confidence >= self.confidence_threshold)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference as deployed: the head runs only on the samples the memory does not answer."""
        features = self.backbone(images)
        readout = self.read_memory(features)
        from_memory = self.memory_path(readout)
        prediction = readout.prediction.clone()
        network = ~from_memory
        if bool(network.any()):
            prediction[network] = self.head(features[network]).argmax(dim=1)
        return prediction, from_memory

    def loss(self, output: ClassifierOutput, labels: torch.Tensor, memory_loss_weight: float) -> ClassifierLoss:
        """Cross-entropy of the head plus `memory_loss_weight` times the memory's loss."""
        classification = F.cross_entropy(output.logits, labels)
        if self.memory is None or memory_loss_weight == 0:
            memory = classification.new_zeros(())
        else:
            memory = self.memory.memory_loss(output.features, labels)
        return ClassifierLoss(classification + memory_loss_weight * memory, classification, memory)


# ---------------------------------------------------------------- backbones


class SmallCNN(nn.Module):
    """Conv blocks (3x3 conv, batch norm, ReLU, 2x2 max-pool), then global average pooling: widths[-1] features."""

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for width in widths:
            blocks += [
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_channels = width
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = widths[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


class BackboneUnavailable(RuntimeError):
    """The named backbone can't be built here (timm missing, an unknown name, a weights file not found)."""


def make_backbone(
    name: str, in_channels: int, widths: tuple[int, ...] = (32, 64, 128), weights: Path | None = None
) -> tuple[nn.Module, int]:
    """`small_cnn` (from scratch), or a timm model by name: random weights unless a local weights file is given.

    Nothing is downloaded: timm's pretrained weights are taken from `weights` only.
    Returns the module and its number of features.
    """
    if name == "small_cnn":
        if weights is not None:
            raise BackboneUnavailable("small_cnn trains from scratch; --backbone-weights is for timm models")
        backbone = SmallCNN(in_channels, widths)
        return backbone, backbone.num_features
    try:
        import timm
    except ImportError as error:
        raise BackboneUnavailable(
            f"backbone {name!r} needs timm, which is not installed (pip install timm), or use --backbone small_cnn"
        ) from error
    if weights is not None and not Path(weights).is_file():
        raise BackboneUnavailable(f"weights file {weights} not found (nothing is downloaded)")
    overlay = {"pretrained_cfg_overlay": {"file": str(weights)}} if weights is not None else {}
    try:
        backbone = timm.create_model(
            name, pretrained=weights is not None, num_classes=0, in_chans=in_channels, **overlay
        )
    except RuntimeError as error:  # timm: "Unknown model"
        raise BackboneUnavailable(f"timm cannot build {name!r}: {error}") from error
    return backbone, int(backbone.num_features)
