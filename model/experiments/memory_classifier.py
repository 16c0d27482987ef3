"""Memory classifier (seed 001): a backbone's features answered by cached or trainable memory, or by a network head.

Each run trains EnhancedClassifier (backbone -> features -> memory + head) with the head's
cross-entropy plus `memory_loss_weight` times the memory's contrastive loss, writes each
batch's features into the memory after the step, and tests after every epoch: accuracy
of the chosen path (memory where its confidence reaches the threshold, else the head),
the head's accuracy alone, the share of test samples on the memory path and the accuracy
on each path, and the memory's fill. After training it times inference per sample:
feature extraction, memory retrieval through the device cache, the network head, and
the two paths they make. `--memory none` is the same backbone and head with no memory.

Defaults are the seed's (memory 10000, confidence threshold 0.85, 5 epochs, batch 128,
memory loss weight 0.4, Adam 1e-3 with weight decay 1e-4, one-cycle schedule, gradient
clipping at 2). The backbone is a small CNN trained from scratch, or a timm model by
name (random weights unless --backbone-weights names a local file; nothing is
downloaded). Data: CIFAR-10 from a torchvision root (--data-dir), or offline
Fashion-MNIST (Debian's dataset-fashion-mnist) or scikit-learn's digits.

With USE_DB each run is recorded in the store (its config, a `metrics` layer with one row
per epoch, its status); cached memory lives in a bank of the run's name, trainable
memory saves a generation `NAME@EPOCH` after every epoch. Results are the same with the
store or without. `--resume` continues each run from its checkpoint in --out-dir (and
the memory from its bank).

    python -m model.experiments.memory_classifier --dataset digits --memory cached trainable none --seed 1 2 3
    USE_DB=1 python -m model.experiments.memory_classifier --dataset fashion --train-limit 10000 --memory trainable
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from eidetic.config import ClientSettings
from model import data as datasets
from model.enhanced_classifier import BackboneUnavailable, EnhancedClassifier, make_backbone
from model.experiments.options import CommandLine, config_json, option
from model.experiments.store_logger import RunLogger, open_run
from model.memory_modules import CachedMemory, MemoryStore, TrainableMemory

EXPERIMENT = "memory_classifier"
MEMORIES = ("cached", "trainable", "none")
DATASETS = ("cifar10", "fashion", "digits")
EPOCH_METRICS = (
    "train_loss",
    "train_classification_loss",
    "memory_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "head_accuracy",
    "memory_path_share",
    "memory_path_accuracy",
    "network_path_accuracy",
    "memory_fill",
)
SPEED_METRICS = ("feature_ms", "retrieval_ms", "head_ms", "memory_path_ms", "network_path_ms", "deployed_ms")


@dataclass(frozen=True)
class MemoryClassifierConfig:
    """EnhancedClassifier with cached or trainable memory against the same network without one.

    Everything a run depends on: its command line, and its config in the store.
    """

    dataset: str = option("digits", choices=DATASETS)
    memory: str = option("cached", choices=MEMORIES, sweep=True, help="one or more memory kinds, one run each")
    memory_size: int = option(10_000, help="memory slots")
    confidence_threshold: float = option(
        0.85, flags=("--threshold", "--confidence-threshold"), help="memory path when its confidence is at least this"
    )
    similarity_threshold: float = option(
        0.85, help="a full memory stores an item only if its best similarity is below this"
    )
    epochs: int = option(5)
    batch_size: int = option(128)
    memory_loss_weight: float = option(0.4, help="weight of the memory's contrastive loss")
    temperature: float = option(0.1, help="of the memory's contrastive loss")
    written_confidence: float = option(0.9, help="trainable memory: class probability of a freshly written slot")
    lr: float = option(1e-3, help="Adam's peak learning rate (one-cycle schedule)")
    weight_decay: float = option(1e-4)
    grad_clip: float = option(2.0, help="max gradient norm")
    dropout: float = option(0.2, help="of the network head")
    backbone: str = option("small_cnn", help="small_cnn, or a timm model name")
    backbone_weights: Path | None = option(None, help="local weights file for a timm backbone")
    widths: tuple[int, ...] = option((32, 64, 128), help="small_cnn channels per block")
    train_limit: int | None = option(None, help="training samples (a fixed subsample; default all)")
    test_limit: int | None = option(None, help="test samples (a fixed subsample; default all)")
    eval_batch_size: int = option(512)
    speed_batches: int = option(20, help="test batches timed for the inference speed")
    speed_repeats: int = option(3, help="timed passes (the best counts)")
    seed: int = option(1, sweep=True, help="one or more seeds, one run each")
    device: str = option("auto", help="cpu, cuda, cuda:1, ... (auto: cuda when there is one)")
    threads: int | None = option(None, help="torch CPU threads")
    data_dir: Path | None = option(None, help="torchvision root (CIFAR-10; nothing is downloaded)")
    out_dir: Path = option(Path("outputs"), help="metrics JSON, PNGs and checkpoints")
    run_name: str | None = option(None, help="run name in the store (default: unique)")
    bank_name: str | None = option(None, help="memory bank name (default: the run's); an existing one warms the memory")
    resume: bool = option(False, help="continue each run from its checkpoint in --out-dir")
    progress: bool = option(True, help="show the progress bar")


COMMAND = CommandLine(MemoryClassifierConfig, prog=f"python -m model.experiments.{EXPERIMENT}")


def resolve_device(device: str) -> str:
    """'auto' is cuda when there is one, else cpu."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class ImageData:
    """Normalised images (N x C x H x W) and labels of both splits."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(max(self.train_labels.max(), self.test_labels.max())) + 1

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])


def load_data(
    dataset: str, data_dir: Path | None, train_limit: int | None = None, test_limit: int | None = None
) -> ImageData:
    """Both splits of a data set; a limit keeps that many samples of a fixed shuffle (the same for every
    seed and arm)."""
    if dataset == "cifar10":
        train, test = datasets.load_cifar10(data_dir, True), datasets.load_cifar10(data_dir, False)
    elif dataset == "fashion":
        train, test = datasets.load_fashion_mnist(data_dir, True), datasets.load_fashion_mnist(data_dir, False)
    elif dataset == "digits":
        train, test = datasets.load_digits_28(True), datasets.load_digits_28(False)
    else:
        raise ValueError(f"dataset is one of {DATASETS}, not {dataset!r}")
    train, test = _subsample(train, train_limit), _subsample(test, test_limit)
    return ImageData(train.name, train.normalised(), train.labels.long(), test.normalised(), test.labels.long())


def _subsample(split: datasets.LabelledImages, limit: int | None) -> datasets.LabelledImages:
    if limit is None or limit >= len(split):
        return split
    return split.select(torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:limit])


# ---------------------------------------------------------------- the model


def build_model(
    config: MemoryClassifierConfig, data: ImageData, store: MemoryStore | None, weights: Path | None = None
) -> EnhancedClassifier:
    device = torch.device(config.device)
    backbone, feature_dim = make_backbone(config.backbone, data.in_channels, config.widths, weights)
    options: dict[str, Any] = {
        "similarity_threshold": config.similarity_threshold,
        "temperature": config.temperature,
        "device": device,
        "store": store,
    }
    memory: CachedMemory | TrainableMemory | None
    if config.memory == "cached":
        memory = CachedMemory(feature_dim, data.num_classes, config.memory_size, **options)
    elif config.memory == "trainable":
        memory = TrainableMemory(
            feature_dim, data.num_classes, config.memory_size, written_confidence=config.written_confidence, **options
        )
    elif config.memory == "none":
        memory = None
    else:
        raise ValueError(f"memory is one of {MEMORIES}, not {config.memory!r}")
    model = EnhancedClassifier(
        backbone,
        feature_dim,
        data.num_classes,
        memory,
        confidence_threshold=config.confidence_threshold,
        dropout=config.dropout,
    )
    return model.to(device)


def make_scheduler(optimizer: torch.optim.Optimizer, config: MemoryClassifierConfig, total_steps: int):
    """The seed's one-cycle schedule (10% warm-up, at least 2 steps of it); a constant rate for runs too
    short for one."""
    if total_steps < 4:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=max(0.1, 2.0 / total_steps)
    )


def forget_optimizer_rows(optimizer: torch.optim.Optimizer, memory: TrainableMemory, slots: list[int]) -> None:
    """Clears Adam's moments of slots that now hold a new item, so the old item's momentum does not move it."""
    written = torch.tensor([slot for slot in slots if slot >= 0], dtype=torch.long)
    if not len(written):
        return
    for parameter in (memory.keys, memory.values):
        state = optimizer.state.get(parameter, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                state[name][written.to(state[name].device)] = 0


# ---------------------------------------------------------------- training and testing


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_epoch(
    model: EnhancedClassifier,
    data: ImageData,
    config: MemoryClassifierConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    bar: Any,
) -> dict[str, Any]:
    """One pass over the training data in an order fixed by (seed, epoch); the memory takes each batch
    after the step."""
    device = torch.device(config.device)
    model.train()
    n = len(data.train_labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
    sums = {"loss": 0.0, "classification": 0.0, "memory": 0.0, "correct": 0.0}
    writes = {"inserted": 0, "replaced": 0, "skipped": 0}
    for start in range(0, n, config.batch_size):
        index = order[start : start + config.batch_size]
        images, labels = data.train_images[index].to(device), data.train_labels[index].to(device)
        output = model(images)
        loss = model.loss(output, labels, config.memory_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        if model.memory is not None:
            outcome = model.memory.write(output.features.detach(), labels)
            if isinstance(model.memory, TrainableMemory):
                forget_optimizer_rows(optimizer, model.memory, outcome.slots)
            for name in writes:
                writes[name] += getattr(outcome, name)
        size = len(index)
        sums["loss"] += loss.total.item() * size
        sums["classification"] += loss.classification.item() * size
        sums["memory"] += loss.memory.item() * size
        sums["correct"] += float((output.prediction == labels).sum())
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{loss.total.item():.3f}", mem=f"{loss.memory.item():.3f}")
    return {
        "train_loss": sums["loss"] / n,
        "train_classification_loss": sums["classification"] / n,
        "memory_loss": sums["memory"] / n,
        "train_accuracy": sums["correct"] / n,
        "writes": writes,
    }


@torch.no_grad()
def evaluate(
    model: EnhancedClassifier, images: torch.Tensor, labels: torch.Tensor, config: MemoryClassifierConfig
) -> dict:
    """Accuracy of the chosen path and of the head alone, the memory-path share and each path's accuracy."""
    device = torch.device(config.device)
    model.eval()
    loss = correct = head_correct = on_memory = memory_correct = 0.0
    for start in range(0, len(labels), config.eval_batch_size):
        x, y = (
            images[start : start + config.eval_batch_size].to(device),
            labels[start : start + config.eval_batch_size].to(device),
        )
        output = model(x)
        loss += float(model.loss(output, y, config.memory_loss_weight).total) * len(y)
        right = output.prediction == y
        correct += float(right.sum())
        head_correct += float((output.logits.argmax(dim=1) == y).sum())
        on_memory += float(output.from_memory.sum())
        memory_correct += float((right & output.from_memory).sum())
    n = len(labels)
    return {
        "test_loss": loss / n,
        "test_accuracy": correct / n,
        "head_accuracy": head_correct / n,
        "memory_path_share": on_memory / n,
        "memory_path_accuracy": memory_correct / on_memory if on_memory else None,
        "network_path_accuracy": (correct - memory_correct) / (n - on_memory) if n > on_memory else None,
    }


SWEEP_THRESHOLDS = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


@torch.no_grad()
def threshold_sweep(
    model: EnhancedClassifier, images: torch.Tensor, labels: torch.Tensor, config: MemoryClassifierConfig
) -> list[dict]:
    """Test accuracy and memory-path share had the confidence threshold been each of SWEEP_THRESHOLDS.

    An analysis of the trained model on the test set (not a way to pick the threshold):
    is there a threshold at which the memory path beats the head alone?
    """
    if model.memory is None:
        return []
    device = torch.device(config.device)
    model.eval()
    confidences, memory_rights, head_rights = [], [], []
    for start in range(0, len(labels), config.eval_batch_size):
        x, y = (
            images[start : start + config.eval_batch_size].to(device),
            labels[start : start + config.eval_batch_size].to(device),
        )
        output = model(x)
        confidences.append(torch.where(output.memory_prediction >= 0, output.memory_confidence, -1.0))
        memory_rights.append(output.memory_prediction == y)
        head_rights.append(output.logits.argmax(dim=1) == y)
    confidence, memory_right, head_right = torch.cat(confidences), torch.cat(memory_rights), torch.cat(head_rights)
    sweep = []
    for threshold in SWEEP_THRESHOLDS:
        on_memory = confidence >= threshold
        right = torch.where(on_memory, memory_right, head_right)
        sweep.append(
            {
                "threshold": threshold,
                "test_accuracy": float(right.float().mean()),
                "memory_path_share": float(on_memory.float().mean()),
            }
        )
    return sweep


@torch.no_grad()
def inference_speed(model: EnhancedClassifier, images: torch.Tensor, config: MemoryClassifierConfig) -> dict[str, Any]:
    """Milliseconds per sample of each stage, best of `speed_repeats` passes over `speed_batches` test batches.

    memory path = features + retrieval (through the device cache); network path =
    features + head; deployed = EnhancedClassifier.predict (retrieval for all, the head
    only where the memory does not answer).
    """
    device = torch.device(config.device)
    model.eval()
    batches = [images[i : i + config.batch_size].to(device) for i in range(0, len(images), config.batch_size)]
    batches = batches[: config.speed_batches + 1]
    for x in batches[:1]:  # warm-up
        features = model.backbone(x)
        model.read_memory(features)
        model.head(features)
        model.predict(x)
    timed = batches[1:] or batches
    samples = sum(len(x) for x in timed)
    best = {name: math.inf for name in ("feature", "retrieval", "head", "deployed")}
    for _ in range(config.speed_repeats):
        spent = dict.fromkeys(best, 0.0)
        for x in timed:
            t0 = _clock(device)
            features = model.backbone(x)
            t1 = _clock(device)
            if model.memory is not None:
                model.read_memory(features)
            t2 = _clock(device)
            model.head(features)
            t3 = _clock(device)
            model.predict(x)
            t4 = _clock(device)
            for name, seconds in zip(best, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                spent[name] += seconds
        best = {name: min(best[name], spent[name]) for name in best}
    per_sample = {name: 1000.0 * seconds / samples for name, seconds in best.items()}
    memory = model.memory is not None
    items = model.memory.size if model.memory is not None else 0
    return {
        "feature_ms": per_sample["feature"],
        "retrieval_ms": per_sample["retrieval"] if memory else None,
        "head_ms": per_sample["head"],
        "memory_path_ms": per_sample["feature"] + per_sample["retrieval"] if memory else None,
        "network_path_ms": per_sample["feature"] + per_sample["head"],
        "deployed_ms": per_sample["deployed"],
        "retrieval_over_head": per_sample["retrieval"] / per_sample["head"] if memory else None,
        "samples": samples,
        "batch_size": config.batch_size,
        "memory_items": items,
    }


# ---------------------------------------------------------------- one run


def checkpoint_path(out_dir: Path, config: MemoryClassifierConfig) -> Path:
    return out_dir / f"{EXPERIMENT}_{config.dataset}_{config.memory}_s{config.seed}.ckpt.pt"


_RESUME_MUST_MATCH = (
    "dataset",
    "memory",
    "memory_size",
    "confidence_threshold",
    "similarity_threshold",
    "epochs",
    "batch_size",
    "memory_loss_weight",
    "temperature",
    "backbone",
    "widths",
    "train_limit",
    "seed",
)


def _memory_in_store(model: EnhancedClassifier) -> bool:
    return model.memory is not None and model.memory.store is not None


def run_once(config: MemoryClassifierConfig, settings: ClientSettings, data: ImageData) -> dict[str, Any]:
    """One memory kind and seed: train, test after each epoch, checkpoint, then time inference.

    With USE_DB the run is recorded in the store (each epoch's metrics under `epoch_N`); a
    resumed run continues the checkpoint's run there.
    """
    config = replace(config, device=resolve_device(config.device))
    started = time.perf_counter()
    path = checkpoint_path(config.out_dir, config)
    resumed = _load_checkpoint(path, config) if config.resume and path.exists() else None
    name = (
        (resumed or {}).get("run_name")
        or config.run_name
        or f"{EXPERIMENT}-{config.dataset}-{config.memory}-s{config.seed}-{uuid.uuid4().hex[:8]}"
    )
    bank = (resumed or {}).get("bank_name") or config.bank_name or name
    torch.manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(data.train_labels) / config.batch_size)
    resume_run_id = (resumed or {}).get("run_id")
    with open_run(settings, name, config, resume_run_id=resume_run_id) as logger:
        memory_store = (
            MemoryStore(logger.client, bank) if logger.client is not None and config.memory != "none" else None
        )
        model = build_model(config, data, memory_store, config.backbone_weights)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        scheduler = make_scheduler(optimizer, config, config.epochs * steps_per_epoch)
        history: list[dict[str, Any]] = []
        first_epoch = 0
        warm_start = getattr(model.memory, "restored_epoch", None)
        if resumed is not None:
            _restore(model, optimizer, scheduler, resumed)
            history, first_epoch = resumed["history"], resumed["epoch"] + 1
        with tqdm(
            total=(config.epochs - first_epoch) * steps_per_epoch,
            unit="step",
            disable=not config.progress,
            desc=f"{EXPERIMENT} {config.dataset} {config.memory} seed {config.seed}",
        ) as bar:
            for epoch in range(first_epoch, config.epochs):
                epoch_started = time.perf_counter()
                trained = train_epoch(model, data, config, optimizer, scheduler, epoch, bar)
                slots = model.memory.end_epoch(epoch) if model.memory is not None else None
                tested = evaluate(model, data.test_images, data.test_labels, config)
                fill = model.memory.size / config.memory_size if model.memory is not None else 0.0
                metrics = {
                    "epoch": epoch,
                    **trained,
                    **tested,
                    "memory_fill": fill,
                    "memory_items": model.memory.size if model.memory is not None else 0,
                    "seconds": round(time.perf_counter() - epoch_started, 3),
                }
                history.append(metrics)
                logger.log({key: metrics[key] for key in EPOCH_METRICS}, key=f"epoch_{epoch}")
                _save_checkpoint(path, config, model, optimizer, scheduler, epoch, history, name, bank, logger, slots)
                tqdm.write(_epoch_line(config, metrics))
        sweep = threshold_sweep(model, data.test_images, data.test_labels, config)
        speed = inference_speed(model, data.test_images, config)
    return {
        "memory": config.memory,
        "seed": config.seed,
        "use_db": settings.use_db,
        "run_name": name if settings.use_db else None,
        "run_id": logger.run_id,
        "bank_name": bank if memory_store is not None else None,
        "warm_start_epoch": warm_start,
        "resumed_from_epoch": resumed["epoch"] if resumed is not None else None,
        "epochs": history,
        "final": history[-1] if history else None,
        "threshold_sweep": sweep,
        "speed": speed,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _epoch_line(config: MemoryClassifierConfig, m: dict[str, Any]) -> str:
    return (
        f"[{config.memory} s{config.seed}] epoch {m['epoch'] + 1}/{config.epochs}: train loss {m['train_loss']:.4f} "
        f"(memory {m['memory_loss']:.4f}), train acc {100 * m['train_accuracy']:.2f}%, test acc "
        f"{100 * m['test_accuracy']:.2f}% (head {100 * m['head_accuracy']:.2f}%), memory path "
        f"{100 * m['memory_path_share']:.2f}%, memory {m['memory_items']}/{config.memory_size}"
    )


def _save_checkpoint(
    path: Path,
    config: MemoryClassifierConfig,
    model: EnhancedClassifier,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    history: list[dict[str, Any]],
    run_name: str,
    bank: str,
    logger: RunLogger,
    slots: torch.Tensor | None,
) -> None:
    """Everything a resumed run needs; a memory kept in the store is left out of it (it comes back from its bank)."""
    in_store = _memory_in_store(model)
    state = {k: v for k, v in model.state_dict().items() if not (in_store and k.startswith("memory."))}
    checkpoint = {
        "epoch": epoch,
        "config": asdict(config),
        "model": state,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "history": history,
        "run_name": run_name,
        "bank_name": bank if in_store else None,
        "run_id": logger.run_id,
        "memory_slots": slots.cpu() if slots is not None else None,
        "cached_items": model.memory.stored_items()
        if isinstance(model.memory, CachedMemory) and not in_store
        else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(checkpoint, partial)
    partial.replace(path)


def _load_checkpoint(path: Path, config: MemoryClassifierConfig) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    saved = checkpoint["config"]
    differs = [name for name in _RESUME_MUST_MATCH if _plain(saved[name]) != _plain(getattr(config, name))]
    if differs:
        raise ValueError(f"{path} was written with other settings ({', '.join(differs)}); resume needs the same ones")
    return checkpoint


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _restore(model: EnhancedClassifier, optimizer, scheduler, checkpoint: dict) -> None:
    in_store = _memory_in_store(model)
    model.load_state_dict(checkpoint["model"], strict=not in_store)
    if isinstance(model.memory, TrainableMemory) and in_store:
        model.memory.restore(epoch=checkpoint["epoch"], slots=checkpoint["memory_slots"])
    if isinstance(model.memory, CachedMemory) and not in_store:
        model.memory.load_items(*checkpoint["cached_items"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"])


# ---------------------------------------------------------------- many runs, reporting

SUMMARY_METRICS = (
    "test_accuracy",
    "head_accuracy",
    "memory_path_share",
    "memory_path_accuracy",
    "network_path_accuracy",
    "memory_fill",
)


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float] | None]]:
    """Per memory kind and metric (final epoch, and speed): mean, sample std (0 with one seed), min, max over seeds."""
    summary: dict[str, dict[str, dict[str, float] | None]] = {}
    for kind in dict.fromkeys(run["memory"] for run in runs):
        chosen = [run for run in runs if run["memory"] == kind]
        rows = {name: [run["final"][name] for run in chosen] for name in SUMMARY_METRICS}
        rows |= {name: [run["speed"][name] for run in chosen] for name in SPEED_METRICS}
        summary[kind] = {name: _stats(values) for name, values in rows.items()}
    return summary


def _stats(values: list[float | None]) -> dict[str, float] | None:
    present = np.array([v for v in values if v is not None], dtype=np.float64)
    if not len(present):
        return None
    return {
        "mean": float(present.mean()),
        "std": float(present.std(ddof=1)) if len(present) > 1 else 0.0,
        "min": float(present.min()),
        "max": float(present.max()),
        "n": len(present),
    }


def table(metrics: dict[str, Any]) -> str:
    config = metrics["config"]
    lines = [
        f"{EXPERIMENT} on {config['dataset']} ({metrics['train_size']} train / {metrics['test_size']} test, memory "
        f"{config['memory_size']}, threshold {config['confidence_threshold']}): seeds {metrics['seeds']}, mean +- std"
    ]
    head = (
        "memory",
        "test acc",
        "head acc",
        "mem path",
        "mem-path acc",
        "net-path acc",
        "fill",
        "feat ms",
        "retr ms",
        "head ms",
        "mem path ms",
        "net path ms",
        "deployed ms",
    )
    lines.append("  ".join(h.rjust(12) for h in head))
    for kind, values in metrics["summary"].items():
        cells = [kind.rjust(12)]
        for name in SUMMARY_METRICS:
            s = values[name]
            cells.append(("-" if s is None else f"{100 * s['mean']:.2f}+-{100 * s['std']:.2f}").rjust(12))
        for name in SPEED_METRICS:
            s = values[name]
            cells.append(("-" if s is None else f"{s['mean']:.4f}").rjust(12))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def plot(metrics: dict[str, Any], kind: str, path: Path) -> None:
    """The seed's four curves per epoch (one line per seed): loss, memory loss, accuracy, memory-path share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run for run in metrics["runs"] if run["memory"] == kind]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    panels = (
        ("loss", (("train_loss", "train"), ("test_loss", "test")), 1.0),
        ("memory loss", (("memory_loss", "train"),), 1.0),
        (
            "accuracy (%)",
            (("train_accuracy", "train"), ("test_accuracy", "test"), ("head_accuracy", "test, head only")),
            100.0,
        ),
        ("share (%)", (("memory_path_share", "test on memory path"), ("memory_fill", "memory fill")), 100.0),
    )
    for ax, (title, series, scale) in zip(axes, panels):
        for key, label in series:
            for k, run in enumerate(runs):
                epochs = [m["epoch"] + 1 for m in run["epochs"]]
                values = [np.nan if m[key] is None else scale * m[key] for m in run["epochs"]]
                ax.plot(
                    epochs,
                    values,
                    marker="o",
                    color=f"C{series.index((key, label))}",
                    alpha=0.8,
                    label=label if k == 0 else None,
                )
        ax.set_title(f"{kind} memory: {title}")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.suptitle(f"{EXPERIMENT}: {metrics['config']['dataset']}, {kind}, seeds {metrics['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(configs: Sequence[MemoryClassifierConfig], settings: ClientSettings) -> dict[str, Any]:
    """Every run (one per memory kind and seed), then the summary, table, JSON and one PNG per kind."""
    config = configs[0]
    data = load_data(config.dataset, config.data_dir, config.train_limit, config.test_limit)
    memories = list(dict.fromkeys(each.memory for each in configs))
    seeds = list(dict.fromkeys(each.seed for each in configs))
    runs = []
    for each in configs:
        suffix = f"-{each.memory}-s{each.seed}" if len(configs) > 1 else ""
        named = replace(
            each,
            run_name=f"{each.run_name}{suffix}" if each.run_name else None,
            bank_name=f"{each.bank_name}{suffix}" if each.bank_name else None,
        )
        runs.append(run_once(named, settings, data))
    metrics: dict[str, Any] = {
        "experiment": EXPERIMENT,
        "config": {**config_json(config), "memory": memories, "seed": None},
        "memories": memories,
        "seeds": seeds,
        "use_db": settings.use_db,
        "train_size": len(data.train_labels),
        "test_size": len(data.test_labels),
        "num_classes": data.num_classes,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": resolve_device(config.device),
        },
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "runs": runs,
    }
    metrics["summary"] = summarise(runs)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    stem = config.out_dir / f"{EXPERIMENT}_{config.dataset}"
    stem.with_suffix(".json").write_text(json.dumps(metrics, indent=2) + "\n")
    for kind in memories:
        plot(metrics, kind, config.out_dir / f"{EXPERIMENT}_{config.dataset}_{kind}.png")
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parsed = COMMAND.parse(argv)
    config = parsed.config
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        metrics = run(parsed.configs, parsed.settings)
    except (BackboneUnavailable, datasets.DatasetUnavailable) as error:
        raise SystemExit(f"{EXPERIMENT}: {error}") from error
    print(table(metrics))
    print(f"metrics: {config.out_dir / (EXPERIMENT + '_' + config.dataset + '.json')} (and one .png per memory kind)")
    return metrics


if __name__ == "__main__":
    main()
