"""SoftHebb networks: presets as data, the network, its layer-by-layer unsupervised training
and the linear read-out trained on its frozen features.

A block is BatchNorm2d(affine=False) -> SoftHebbConv2d -> triangle^p -> pooling (Journé et
al. 2023). The Hebbian blocks are trained one after the other, each for `hebbian_epochs`
over the data at `hebbian_batch_size` (one epoch at batch 10 in the paper), earlier blocks
frozen and in eval mode; then a read-out (dropout 0.5, linear, Adam 1e-3) learns the
classes from the flattened features with everything before it frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.softhebb import SoftHebbConv2d, Triangle

__all__ = [
    "CIFAR10_NET",
    "DIGITS8_NET",
    "GREY28_NET",
    "NET_PRESETS",
    "SoftHebbBlock",
    "SoftHebbLayerConfig",
    "SoftHebbNet",
    "SoftHebbNetConfig",
    "SoftHebbTraining",
    "batch_indices",
    "features_of",
    "fit_readout",
    "train_hebbian",
    "train_readout",
]

BatchHook = Callable[[int, "SoftHebbBlock"], None]  # (block index, block) after each Hebbian update


@dataclass(frozen=True, kw_only=True)
class SoftHebbLayerConfig:
    """One block: its convolution, its learning rule's settings, its activation and its pooling."""

    channels: int
    kernel_size: int
    inverse_temperature: float  # 1/tau of the soft winner-take-all
    lr: float  # η, the base learning rate
    power: float  # p of the triangle activation
    pool: Literal["max", "avg"]
    pool_kernel: int
    pool_stride: int
    pool_padding: int


@dataclass(frozen=True)
class SoftHebbNetConfig:
    """The shape of a network: input, blocks, classes and the read-out's dropout."""

    name: str
    in_channels: int
    image_size: int
    n_classes: int
    layers: tuple[SoftHebbLayerConfig, ...]
    dropout: float = 0.5


@dataclass(frozen=True)
class SoftHebbTraining:
    """How a network is trained: the Hebbian pass per block, then the read-out."""

    hebbian_epochs: int = 1
    hebbian_batch_size: int = 10
    readout_epochs: int = 50
    readout_batch_size: int = 64
    readout_lr: float = 1e-3


# The published CIFAR-10 network: 96 -> 384 -> 1536 channels, 4 x 4 x 1536 = 24,576 features.
CIFAR10_NET = SoftHebbNetConfig(
    name="softhebb-cifar10",
    in_channels=3,
    image_size=32,
    n_classes=10,
    layers=(
        SoftHebbLayerConfig(
            channels=96,
            kernel_size=5,
            inverse_temperature=1.0,
            lr=0.08,
            power=0.7,
            pool="max",
            pool_kernel=4,
            pool_stride=2,
            pool_padding=1,
        ),
        SoftHebbLayerConfig(
            channels=384,
            kernel_size=3,
            inverse_temperature=0.65,
            lr=0.005,
            power=1.4,
            pool="max",
            pool_kernel=4,
            pool_stride=2,
            pool_padding=1,
        ),
        SoftHebbLayerConfig(
            channels=1536,
            kernel_size=3,
            inverse_temperature=0.25,
            lr=0.01,
            power=1.0,
            pool="avg",
            pool_kernel=2,
            pool_stride=2,
            pool_padding=0,
        ),
    ),
)

# 28 x 28 grey images (MNIST-like) on a few CPU cores: the first two published blocks, narrowed.
GREY28_NET = SoftHebbNetConfig(
    name="softhebb-grey28",
    in_channels=1,
    image_size=28,
    n_classes=10,
    layers=(
        SoftHebbLayerConfig(
            channels=32,
            kernel_size=5,
            inverse_temperature=1.0,
            lr=0.08,
            power=0.7,
            pool="max",
            pool_kernel=4,
            pool_stride=2,
            pool_padding=1,
        ),  # 28 -> 14
        SoftHebbLayerConfig(
            channels=128,
            kernel_size=3,
            inverse_temperature=0.65,
            lr=0.005,
            power=1.4,
            pool="avg",
            pool_kernel=2,
            pool_stride=2,
            pool_padding=0,
        ),  # 14 -> 7: 6,272 features
    ),
)

# scikit-learn's 8 x 8 digits, for tests and smoke runs.
DIGITS8_NET = SoftHebbNetConfig(
    name="softhebb-digits8",
    in_channels=1,
    image_size=8,
    n_classes=10,
    layers=(
        SoftHebbLayerConfig(
            channels=16,
            kernel_size=3,
            inverse_temperature=1.0,
            lr=0.08,
            power=0.7,
            pool="max",
            pool_kernel=4,
            pool_stride=2,
            pool_padding=1,
        ),  # 8 -> 4
        SoftHebbLayerConfig(
            channels=32,
            kernel_size=3,
            inverse_temperature=0.65,
            lr=0.005,
            power=1.4,
            pool="avg",
            pool_kernel=2,
            pool_stride=2,
            pool_padding=0,
        ),  # 4 -> 2: 128 features
    ),
)

NET_PRESETS = {"cifar10": CIFAR10_NET, "grey28": GREY28_NET, "digits8": DIGITS8_NET}


class SoftHebbBlock(nn.Module):
    """BatchNorm2d(affine=False) -> SoftHebbConv2d -> Triangle -> pooling."""

    def __init__(self, in_channels: int, layer: SoftHebbLayerConfig) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels, affine=False)
        self.conv = SoftHebbConv2d(
            in_channels,
            layer.channels,
            layer.kernel_size,
            lr=layer.lr,
            inverse_temperature=layer.inverse_temperature,
        )
        self.activation = Triangle(layer.power)
        pool = nn.MaxPool2d if layer.pool == "max" else nn.AvgPool2d
        self.pool = pool(layer.pool_kernel, stride=layer.pool_stride, padding=layer.pool_padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.activation(self.conv(self.norm(x))))

    @torch.no_grad()
    def learn(self, x: Tensor) -> Tensor:
        """Normalise with this batch's statistics, update the kernels, pass the activation on."""
        self.norm.train()
        return self.pool(self.activation(self.conv.learn(self.norm(x))))


class SoftHebbNet(nn.Module):
    """Hebbian blocks and a single-head linear read-out over their flattened output."""

    def __init__(self, config: SoftHebbNetConfig) -> None:
        super().__init__()
        self.config = config
        blocks, channels = [], config.in_channels
        for layer in config.layers:
            blocks.append(SoftHebbBlock(channels, layer))
            channels = layer.channels
        self.blocks = nn.ModuleList(blocks)
        self.n_features = self._count_features()
        self.readout = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(self.n_features, config.n_classes))

    def _count_features(self) -> int:
        probe = torch.zeros(2, self.config.in_channels, self.config.image_size, self.config.image_size)
        was_training = self.training
        self.eval()
        with torch.no_grad():
            size = self.features(probe).shape[1]
        self.train(was_training)
        return int(size)

    def hebbian_blocks(self) -> list[SoftHebbBlock]:
        return [cast(SoftHebbBlock, block) for block in self.blocks]

    def conv_layers(self) -> dict[str, SoftHebbConv2d]:
        """The Hebbian convolutions by a stable name ("block0", ...) that records can key on."""
        return {f"block{i}": block.conv for i, block in enumerate(self.hebbian_blocks())}

    def features(self, x: Tensor, upto: int | None = None) -> Tensor:
        """Output of the first `upto` blocks (all by default); flattened when all of them ran."""
        blocks = self.blocks if upto is None else self.blocks[:upto]
        for block in blocks:
            x = block(x)
        return x.flatten(1) if upto is None else x

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.features(x))


def batch_indices(
    n: int, batch_size: int, generator: torch.Generator | None, *, shuffle: bool = True
) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    yield from order.split(batch_size)


@torch.no_grad()
def train_hebbian(
    net: SoftHebbNet,
    images: Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 10,
    generator: torch.Generator | None = None,
    on_batch: BatchHook | None = None,
) -> None:
    """Train the blocks one after the other, each on the frozen output of those before it.

    `images` are normalised, on the network's device. `on_batch(i, block)` runs after each
    update of block i: kernel statistics and neuromodulation hook in there.
    """
    for i, block in enumerate(net.hebbian_blocks()):
        net.eval()
        for _ in range(epochs):
            for index in batch_indices(images.shape[0], batch_size, generator):
                block.learn(net.features(images[index.to(images.device)], upto=i))
                if on_batch is not None:
                    on_batch(i, block)
    net.eval()


@torch.no_grad()
def features_of(net: SoftHebbNet, images: Tensor, batch_size: int = 1024) -> Tensor:
    """Frozen features of the whole set, in eval mode."""
    net.eval()
    return torch.cat([net.features(chunk) for chunk in images.split(batch_size)])


def train_readout(
    net: SoftHebbNet,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    generator: torch.Generator | None = None,
) -> float:
    """Fit the read-out on frozen features (computed once); returns the last epoch's mean loss."""
    features = features_of(net, images)
    return fit_readout(net.readout, features, labels, epochs=epochs, batch_size=batch_size, lr=lr, generator=generator)


def fit_readout(
    readout: nn.Module,
    features: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    generator: torch.Generator | None = None,
    replay: tuple[Tensor, Tensor] | None = None,
) -> float:
    """Fit a read-out on given features; returns the last epoch's mean loss.

    With `replay` (features and labels kept from earlier tasks), every batch is joined by as
    many replayed rows, drawn uniformly with `generator`: latent replay.
    """
    replayed = replay is not None and replay[0].shape[0] > 0
    optimizer = torch.optim.Adam(readout.parameters(), lr=lr)
    readout.train()
    loss_sum, seen = 0.0, 0
    for _ in range(epochs):
        loss_sum, seen = 0.0, 0
        for index in batch_indices(features.shape[0], batch_size, generator):
            index = index.to(features.device)
            inputs, targets = features[index], labels[index]
            if replayed:
                assert replay is not None
                drawn = torch.randint(replay[0].shape[0], (index.numel(),), generator=generator)
                inputs = torch.cat([inputs, replay[0][drawn.to(replay[0].device)]])
                targets = torch.cat([targets, replay[1][drawn.to(replay[1].device)]])
            loss = F.cross_entropy(readout(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * index.numel()
            seen += index.numel()
    readout.eval()
    return loss_sum / max(seen, 1)
