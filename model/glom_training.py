"""Training and evaluation loops for the GLOM experiment: GLOM and its CNN baseline alike.

Any model with `loss(images, labels)` and `predict(images)` trains here; GLOM's
accuracy after every iteration is measured too (`predict_by_iteration`). Metrics go to
a `MetricSink` (a list in memory by default; the experiment adds the store's), so these
loops never talk to the store themselves. Runs are reproducible from `TrainConfig.seed`
on one device: the seed fixes the initial weights (when the caller builds the model
inside `seeded`), the batch order and the training noise.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

__all__ = [
    "Classifier",
    "EpochRecord",
    "Evaluation",
    "ListSink",
    "MetricSink",
    "TrainConfig",
    "evaluate",
    "seed_all",
    "seeded",
    "train",
]


class Classifier(Protocol):
    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def predict(self, images: torch.Tensor) -> torch.Tensor: ...


class MetricSink(Protocol):
    """Where metrics go: `step` is the epoch (or any increasing count), `metrics` a flat name -> value mapping."""

    def record(self, metrics: Mapping[str, float], step: int) -> None: ...


@dataclass
class ListSink:
    """Keeps every record in memory."""

    records: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    def record(self, metrics: Mapping[str, float], step: int) -> None:
        self.records.append((step, dict(metrics)))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    test_batch_size: int = 256
    optimizer: Literal["adam", "adadelta"] = "adam"
    lr: float = 1e-2
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max gradient norm; None leaves gradients alone
    seed: int = 0
    device: str = "cpu"
    progress: bool = False  # a tqdm bar over the training batches


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    n: int
    accuracy_by_iteration: tuple[float, ...] | None = None  # GLOM: the vote's accuracy after each iteration


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    seconds: float
    test: Evaluation | None


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seeds Python, numpy and torch (CPU and CUDA) for the block, e.g. while building a model."""
    seed_all(seed)
    yield


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adadelta":
        return torch.optim.Adadelta(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    *,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    sink: MetricSink | None = None,
) -> list[EpochRecord]:
    """Trains `model` (a Classifier) in place on (images, labels); evaluates on `test` after every epoch if given."""
    device = torch.device(config.device)
    model.to(device)
    seed_all(config.seed)
    order_generator = torch.Generator().manual_seed(config.seed)
    optimizer = _optimizer(model, config)
    n = len(labels)
    batches = (n + config.batch_size - 1) // config.batch_size
    bar = tqdm(total=config.epochs * batches, disable=not config.progress, desc=type(model).__name__)
    history = []
    try:
        for epoch in range(config.epochs):
            model.train()
            started = time.perf_counter()
            order = torch.randperm(n, generator=order_generator)
            total = 0.0
            for start in range(0, n, config.batch_size):
                index = order[start : start + config.batch_size]
                loss = model.loss(images[index].to(device), labels[index].to(device))  # type: ignore[operator]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                total += loss.item() * len(index)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
            seconds = time.perf_counter() - started
            result = evaluate(model, *test, config) if test is not None else None
            record = EpochRecord(epoch, total / n, seconds, result)
            history.append(record)
            if sink is not None:
                sink.record(_flat(record), epoch)
    finally:
        bar.close()
    return history


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig) -> Evaluation:
    """Accuracy of `model.predict`; for models with `predict_by_iteration` (GLOM), after every iteration too."""
    device = torch.device(config.device)
    model.eval()
    by_iteration = hasattr(model, "predict_by_iteration")
    correct = None
    for start in range(0, len(labels), config.test_batch_size):
        batch = images[start : start + config.test_batch_size].to(device)
        target = labels[start : start + config.test_batch_size].to(device)
        if by_iteration:
            predicted = model.predict_by_iteration(batch)  # type: ignore[operator]  # (B, T)
            hits = (predicted == target.unsqueeze(1)).sum(dim=0)
        else:
            hits = (model.predict(batch) == target).sum().view(1)  # type: ignore[operator]
        correct = hits if correct is None else correct + hits
    n = len(labels)
    accuracies = tuple(float(c) / n for c in correct.cpu()) if correct is not None else (0.0,)
    return Evaluation(accuracy=accuracies[-1], n=n, accuracy_by_iteration=accuracies if by_iteration else None)


def _flat(record: EpochRecord) -> dict[str, float]:
    metrics = {"train_loss": record.train_loss, "epoch_seconds": record.seconds}
    if record.test is not None:
        metrics["test_accuracy"] = record.test.accuracy
        for t, accuracy in enumerate(record.test.accuracy_by_iteration or ()):
            metrics[f"test_accuracy_iteration_{t + 1}"] = accuracy
    return metrics
