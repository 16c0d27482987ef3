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

import argparse
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

from eidetic.client import EideticClient, LayerSummary
from eidetic.config import ClientSettings
from eidetic.writer import ActivationWriter, open_writer

EXPERIMENT = "stream_demo"
LAYER_NAME = "penultimate"


@dataclass(frozen=True)
class DemoConfig:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-3
    hidden: int = 64
    seed: int = 0
    test_fraction: float = 0.2
    task: str = "digits"


class DigitsCNN(nn.Module):
    """conv 16, conv 32, max-pool, fc `hidden` (the streamed layer), fc 10, log-softmax."""

    def __init__(self, hidden: int = 64, n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities and the penultimate activations (what the last layer reads)."""
        x = F.relu(self.conv1(images))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        features = F.relu(self.fc1(torch.flatten(x, 1)))
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
    writer: ActivationWriter | None,
    progress: bool = True,
) -> list[float]:
    """Trains in place; returns the mean training loss of each epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    order = torch.Generator().manual_seed(config.seed)
    n_train = len(data.train_labels)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    losses: list[float] = []
    step = 0
    with tqdm(total=config.epochs * steps_per_epoch, desc=EXPERIMENT, unit="step", disable=not progress) as bar:
        for epoch in range(config.epochs):
            model.train()
            permutation = torch.randperm(n_train, generator=order)
            total = 0.0
            for start in range(0, n_train, config.batch_size):
                index = permutation[start : start + config.batch_size]
                labels = data.train_labels[index]
                log_probs, features = model(data.train_images[index])
                loss = F.nll_loss(log_probs, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if writer is not None:
                    sample_ids = data.train_ids[index]
                    writer.write(features, sample_id=sample_ids, step=step, epoch=epoch, label=labels, task=config.task)
                total += loss.item() * len(index)
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            losses.append(total / n_train)
    return losses


@torch.no_grad()
def accuracy(model: DigitsCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    log_probs, _ = model(images)
    return float((log_probs.argmax(dim=1) == labels).float().mean())


def run(config: DemoConfig, settings: ClientSettings, out_dir: Path, run_name: str | None, progress: bool) -> dict:
    """Trains, streams (with USE_DB), evaluates; returns the metrics it also writes as JSON."""
    torch.manual_seed(config.seed)
    data = load_split(config)
    model = DigitsCNN(config.hidden)
    started = time.perf_counter()
    metrics: dict[str, Any] = {"experiment": EXPERIMENT, "config": asdict(config), "use_db": settings.use_db}

    if not settings.use_db:
        metrics["train_loss"] = train(model, data, config, None, progress)
    else:
        with EideticClient.from_settings(settings) as client:
            store_run = client.create_run(run_name or f"{EXPERIMENT}-{uuid.uuid4().hex[:8]}", asdict(config))
            layer = client.create_layer(store_run.id, LAYER_NAME, config.hidden)
            try:
                with open_writer(store_run.id, layer.id, settings) as writer:
                    metrics["train_loss"] = train(model, data, config, writer, progress)
            except BaseException:
                client.set_run_status(store_run.id, "failed")
                raise
            client.set_run_status(store_run.id, "finished")
            summary = client.layer_summary(store_run.id, layer.id)
        metrics.update(run_id=store_run.id, layer_id=layer.id)
        metrics.update(writer=_stats_json(writer), summary=_summary_json(summary))

    metrics["test_accuracy"] = accuracy(model, data.test_images, data.test_labels)
    metrics["train_accuracy"] = accuracy(model, data.train_images, data.train_labels)
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    if settings.use_db:  # the run's results beside its activations
        with EideticClient.from_settings(settings) as client:
            scores = {name: metrics[name] for name in ("test_accuracy", "train_accuracy", "seconds")}
            client.record_metrics(metrics["run_id"], scores)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{EXPERIMENT}.json").write_text(json.dumps(metrics, indent=2) + "\n")
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog=f"python -m model.experiments.{EXPERIMENT}",
        description="Train a small CNN on the bundled 8x8 digits; with USE_DB, stream its penultimate "
        "activations to the Eidetic store and print the stored layer's summary.",
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="units of the streamed layer")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out-dir", type=Path, default=Path("outputs"), help="where metrics JSON is written")
    parser.add_argument(
        "--use-db",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override USE_DB from the environment / .env",
    )
    parser.add_argument("--transport", choices=["rest", "direct"], default=None, help="override EIDETIC_TRANSPORT")
    parser.add_argument("--run-name", default=None, help="name of the run in the store (default: unique)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = DemoConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, hidden=args.hidden, seed=args.seed)
    overrides = {
        name: value
        for name, value in (("use_db", args.use_db), ("eidetic_transport", args.transport))
        if value is not None
    }
    settings = ClientSettings().model_copy(update=overrides)
    metrics = run(config, settings, args.out_dir, args.run_name, progress=not args.no_progress)
    print(report(metrics))
    print(f"metrics: {args.out_dir / (EXPERIMENT + '.json')}")
    return metrics


if __name__ == "__main__":
    main()
