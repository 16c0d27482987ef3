"""Stream demo: a small CNN learns scikit-learn's bundled 8x8 digits while its penultimate
layer's activations stream into the store.

It shows the writer in a real training loop: one write per minibatch, with sample ids,
step, epoch, label and task, and no effect on training (the results are the same with
USE_DB on or off, because the writer never touches torch's random state). Offline and
CPU-only; a few seconds.

    python -m model.experiments.stream_demo                # USE_DB from the environment / .env
    USE_DB=1 python -m model.experiments.stream_demo --epochs 3
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

from eidetic.client import LayerSummary
from eidetic.config import ClientSettings
from eidetic.writer import ActivationWriter
from model.experiments.options import CommandLine, config_json, option
from model.experiments.store_logger import open_run
from model.recording import ActivationRecorder, ActivationSink, WriterSink

EXPERIMENT = "stream_demo"
LAYER_NAME = "penultimate"


@dataclass(frozen=True)
class DemoConfig:
    """Train a small CNN on the bundled 8x8 digits; with USE_DB, stream its penultimate activations to the
    Eidetic store and print the stored layer's summary."""

    epochs: int = option(3)
    batch_size: int = option(32)
    lr: float = option(5e-3, help="Adam learning rate")
    hidden: int = option(64, help="units of the streamed layer")
    seed: int = option(0)
    test_fraction: float = option(0.2, help="share of the digits held out for testing")
    task: str = option("digits", help="the task recorded with every row")
    out_dir: Path = option(Path("outputs"), help="where metrics JSON is written")
    run_name: str | None = option(None, help="name of the run in the store (default: unique)")
    progress: bool = option(True, help="show the progress bar")


COMMAND = CommandLine(
    DemoConfig,
    prog=f"python -m model.experiments.{EXPERIMENT}",
    store_flags={"use_db": "--use-db", "eidetic_transport": "--transport"},
)


class DigitsCNN(nn.Module):
    """conv 16, conv 32, max-pool, fc `hidden` (the streamed layer), fc 10, log-softmax."""

    def __init__(self, hidden: int = 64, n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, hidden)
        self.penultimate = nn.ReLU()  # its output is what the last layer reads (the streamed activations)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities and the penultimate activations (what the last layer reads)."""
        x = F.relu(self.conv1(images))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        features = self.penultimate(self.fc1(torch.flatten(x, 1)))
        return F.log_softmax(self.fc2(features), dim=1), features


@dataclass(frozen=True)
class DigitsSplit:
    """Images (N x 1 x 8 x 8, scaled to [0, 1]), labels, and each sample's index in load_digits()."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    train_ids: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_split(config: DemoConfig) -> DigitsSplit:
    digits = load_digits()
    images = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    ids = np.arange(len(labels))
    train_ids, test_ids = train_test_split(
        ids, test_size=config.test_fraction, random_state=config.seed, stratify=digits.target
    )
    train_ids, test_ids = torch.from_numpy(train_ids), torch.from_numpy(test_ids)
    return DigitsSplit(images[train_ids], labels[train_ids], train_ids, images[test_ids], labels[test_ids])


def train(
    model: DigitsCNN,
    data: DigitsSplit,
    config: DemoConfig,
    sink: ActivationSink | None,
) -> list[float]:
    """Trains in place, the penultimate activations of every batch going to `sink` (when given); returns the mean
    training loss of each epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    order = torch.Generator().manual_seed(config.seed)
    n_train = len(data.train_labels)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    losses: list[float] = []
    step = 0
    recorder = ActivationRecorder(model, {LAYER_NAME: sink}, task=config.task) if sink is not None else None
    with tqdm(total=config.epochs * steps_per_epoch, desc=EXPERIMENT, unit="step", disable=not config.progress) as bar:
        for epoch in range(config.epochs):
            model.train()
            permutation = torch.randperm(n_train, generator=order)
            total = 0.0
            for start in range(0, n_train, config.batch_size):
                index = permutation[start : start + config.batch_size]
                labels = data.train_labels[index]
                if recorder is not None:
                    recorder.annotate(sample_id=data.train_ids[index], step=step, epoch=epoch, label=labels)
                log_probs, _features = model(data.train_images[index])
                loss = F.nll_loss(log_probs, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(index)
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            losses.append(total / n_train)
    if recorder is not None:
        recorder.remove()
    return losses


@torch.no_grad()
def accuracy(model: DigitsCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    log_probs, _ = model(images)
    return float((log_probs.argmax(dim=1) == labels).float().mean())


def run(config: DemoConfig, settings: ClientSettings) -> dict:
    """Trains, streams (with USE_DB), evaluates; returns the metrics it also writes as JSON (and logs as the run's)."""
    torch.manual_seed(config.seed)
    data = load_split(config)
    model = DigitsCNN(config.hidden)
    started = time.perf_counter()
    metrics: dict[str, Any] = {"experiment": EXPERIMENT, "config": config_json(config), "use_db": settings.use_db}

    name = config.run_name or f"{EXPERIMENT}-{uuid.uuid4().hex[:8]}"
    with open_run(settings, name, config) as logger:
        layer_id = logger.create_layer(LAYER_NAME, config.hidden)
        if logger.client is None or logger.run_id is None or layer_id is None:
            metrics["train_loss"] = train(model, data, config, None)
        else:
            with logger.open_writer(layer_id) as writer:
                metrics["train_loss"] = train(model, data, config, WriterSink(writer))
            summary = logger.client.layer_summary(logger.run_id, layer_id)
            metrics.update(run_id=logger.run_id, layer_id=layer_id)
            metrics.update(writer=_stats_json(writer), summary=_summary_json(summary))
        metrics["test_accuracy"] = accuracy(model, data.test_images, data.test_labels)
        metrics["train_accuracy"] = accuracy(model, data.train_images, data.train_labels)
        metrics["seconds"] = round(time.perf_counter() - started, 3)
        logger.log({name: metrics[name] for name in ("test_accuracy", "train_accuracy", "seconds")})
    config.out_dir.mkdir(parents=True, exist_ok=True)
    (config.out_dir / f"{EXPERIMENT}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _stats_json(writer: ActivationWriter) -> dict:
    stats = writer.stats()
    return {**asdict(stats), "rows_pending": stats.rows_pending}


def _summary_json(summary: LayerSummary) -> dict:
    def floats(values: np.ndarray) -> list[float | None]:
        return [None if not math.isfinite(v) else round(float(v), 6) for v in values]

    return {"rows": summary.rows, **{name: floats(getattr(summary, name)) for name in ("mean", "std", "min", "max")}}


def report(metrics: dict) -> str:
    lines = [f"test accuracy {metrics['test_accuracy']:.4f} (train {metrics['train_accuracy']:.4f})"]
    if metrics["use_db"]:
        summary = metrics["summary"]
        means = np.array([np.nan if v is None else v for v in summary["mean"]])
        maxima = np.array([np.nan if v is None else v for v in summary["max"]])
        lines.append(
            f"run {metrics['run_id']}, layer {metrics['layer_id']} ({LAYER_NAME}): {summary['rows']} rows stored, "
            f"{metrics['writer']['batches_sent']} batches, {metrics['writer']['retries']} retries"
        )
        lines.append(
            f"layer summary: unit means {np.nanmin(means):.3f}..{np.nanmax(means):.3f} "
            f"(average {np.nanmean(means):.3f}), {int((maxima <= 0).sum())} of {len(means)} units never active"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parsed = COMMAND.parse(argv)
    metrics = run(parsed.config, parsed.settings)
    print(report(metrics))
    print(f"metrics: {parsed.config.out_dir / (EXPERIMENT + '.json')}")
    return metrics


if __name__ == "__main__":
    main()
