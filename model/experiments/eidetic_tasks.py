"""Eidetic tasks: the seed's Task A / Task B experiment with Eidetic and Indexed layers.

Protocol (the seed's, batched): train the whole CNN on Task A; run the Task B training
data through it and record the pre-bias outputs of its EideticIndexed layer (hooks of an
ActivationRecorder send them to the store with USE_DB, else to a local reservoir); compute
NUM_QUANTILES boundaries per unit of those outputs (exact: numpy's inverted CDF, identical either
way); build the index of the final IndexedLinear layer (its trained weight copied into
every bucket); freeze everything else; train Task B with each input unit of that layer
picking its weight row by the bucket of its own activation; test both tasks.

The comparison is the seed's own: the same network with NUM_QUANTILES=1 (one bucket:
exactly the plain CNN whose last layer alone learns Task B). Both arms share the Task A
phase and draw the same random numbers in the Task B phase, so they differ only in the
bucket-selected weights. Reported: accuracy per task after each phase, and from that
accuracy matrix GEM's BWT and FWT, RWalk's forgetting and average accuracy.

Labels follow the seed's 36-output layout: Task B classes take outputs 0.. (EMNIST
letters 0..25), Task A classes take outputs 26.. (MNIST digits +26). Offline stand-ins
split one data set in two: Fashion-MNIST or the bundled digits, classes 0-4 as Task A
and 5-9 as Task B.

    python -m model.experiments.eidetic_tasks --dataset digits
    USE_DB=1 NUM_QUANTILES=4 python -m model.experiments.eidetic_tasks --dataset fashion --seed 1 2 3
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import platform
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import StepLR
from tqdm import tqdm

from eidetic.config import ClientSettings
from eidetic.torch.quantile_cache import QuantileCache, local_boundaries
from model import data as datasets
from model.cl_metrics import ContinualMetrics
from model.experiments.options import CommandLine, config_json, option
from model.experiments.store_logger import RunLogger, open_run
from model.layers import EideticIndexedLinear, EideticLinear, IndexedLinear, freeze_all_but, indexed_parameters
from model.recording import ActivationRecorder, ActivationSink, ReservoirSink, WriterSink

EXPERIMENT = "eidetic_tasks"
STORED_LAYER = "eidetic_indexed"
RECORDED = "eidetic_indexed.pre_bias"  # the hook point of the layer whose outputs are stored
N_OUTPUTS = 36
TASK_A_OFFSET = 26  # the seed: digits shifted by +26, letters take 0..25
TASK_NAMES = ("A", "B")
DATASETS = ("digits", "fashion", "mnist-emnist")  # the keys of SOURCES


@dataclass(frozen=True)
class TasksConfig:
    """Task A then Task B with Eidetic and Indexed layers, against the one-bucket baseline.

    Everything a run depends on: its command line, and its config in the store.
    """

    dataset: str = option("digits", choices=DATASETS, help="the two tasks' data")
    task_a_subset_cardinality: int = option(1000, env="TASK_A_SUBSET_CARDINALITY", help="Task A training samples")
    task_b_subset_cardinality: int = option(1000, env="TASK_B_SUBSET_CARDINALITY", help="Task B training samples")
    num_quantiles: int = option(
        4, env="NUM_QUANTILES", help="buckets per unit of the indexed layer; 1 runs the baseline only"
    )
    epochs: int = option(3, help="epochs of each task")
    batch_size: int = option(16)
    test_batch_size: int = option(1000)
    lr: float = option(1.0, help="Adadelta learning rate")
    gamma: float = option(0.7, help="StepLR decay per epoch")
    seed: int = option(1, sweep=True, help="one or more seeds, one run each")
    test_limit: int | None = option(None, help="test samples per task (default: all)")
    device: str = option("cpu", env="DEVICE")
    data_dir: Path | None = option(None, help="torchvision root (nothing is downloaded)")
    out_dir: Path = option(Path("outputs"), help="metrics JSON and PNG go here")
    log_file: Path | None = option(Path("benchmark.log"), help="results are appended here")
    save_model: bool = option(False, help="save each arm's state_dict in --out-dir")
    run_name: str | None = option(None, help="name of the run in the store (default: unique)")
    progress: bool = option(True, help="show the progress bar")

    def __post_init__(self) -> None:
        if min(self.task_a_subset_cardinality, self.task_b_subset_cardinality) < 1:
            raise ValueError("the subset cardinalities are at least 1")
        if not 1 <= self.num_quantiles <= 1024:
            raise ValueError("num_quantiles is in 1..1024")

    @property
    def arms(self) -> dict[str, int]:
        """Arm name -> quantiles: the one-bucket baseline beside the eidetic model."""
        arms = {"baseline": 1}
        if self.num_quantiles > 1:
            arms["eidetic"] = self.num_quantiles
        return arms


COMMAND = CommandLine(TasksConfig, prog=f"python -m model.experiments.{EXPERIMENT}")


# ---------------------------------------------------------------- the network


class EideticTasksNet(nn.Module):
    """The seed's CNN: conv 32, conv 64, max-pool, dropout .25, fc 128, dropout .5, fc 36,
    EideticLinear, EideticIndexedLinear, IndexedLinear, log-softmax.

    The three custom layers are linear (no activation between them), as in the seed; the
    buckets of the EideticIndexed layer's outputs select the IndexedLinear weights.
    """

    def __init__(self, n_quantiles: int = 1, n_outputs: int = N_OUTPUTS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, n_outputs)
        self.eidetic = EideticLinear(n_outputs, n_outputs)
        self.eidetic_indexed = EideticIndexedLinear(n_outputs, n_outputs, n_quantiles)
        self.indexed = IndexedLinear(n_outputs, n_outputs, n_quantiles)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(images)))), 2)
        x = self.dropout2(F.relu(self.fc1(torch.flatten(self.dropout1(x), 1))))
        x, buckets = self.eidetic(self.fc2(x))
        x, buckets = self.eidetic_indexed(x, buckets)
        return F.log_softmax(self.indexed(x, buckets), dim=1)


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state that carries over between arms: everything but the per-bucket weights (their shape is the arm's)."""
    return {name: value.clone() for name, value in model.state_dict().items() if not name.endswith("bucket_weights")}


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class TaskData:
    """One task's images (normalised, N x 1 x 28 x 28), output labels (0..35) and sample ids."""

    name: str
    classes: tuple[int, ...]
    outputs: tuple[int, ...]  # the network outputs of the task's classes
    train_images: torch.Tensor
    train_labels: torch.Tensor
    train_ids: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@dataclass(frozen=True)
class TaskSource:
    load: Callable[[Path | None, bool], datasets.LabelledImages]
    classes: tuple[int, ...]
    offset: int  # output of the task's first class


def _load_digits(_data_dir: Path | None, train: bool) -> datasets.LabelledImages:
    return datasets.load_digits_28(train)


SOURCES: dict[str, tuple[TaskSource, TaskSource]] = {
    "mnist-emnist": (
        TaskSource(datasets.load_mnist, tuple(range(10)), TASK_A_OFFSET),
        TaskSource(datasets.load_emnist_letters, tuple(range(26)), 0),
    ),
    "fashion": (
        TaskSource(datasets.load_fashion_mnist, (0, 1, 2, 3, 4), TASK_A_OFFSET),
        TaskSource(datasets.load_fashion_mnist, (5, 6, 7, 8, 9), 0),
    ),
    "digits": (
        TaskSource(_load_digits, (0, 1, 2, 3, 4), TASK_A_OFFSET),
        TaskSource(_load_digits, (5, 6, 7, 8, 9), 0),
    ),
}


def load_tasks(config: TasksConfig) -> tuple[TaskData, TaskData]:
    """Task A and Task B: the first `cardinality` training samples of each task's classes (data set order),
    and all of its test samples (or the first `test_limit`)."""
    loaded: dict[tuple[int, bool], datasets.LabelledImages] = {}
    tasks = []
    for name, source, cardinality in zip(
        TASK_NAMES, SOURCES[config.dataset], (config.task_a_subset_cardinality, config.task_b_subset_cardinality)
    ):
        splits: dict[bool, datasets.LabelledImages] = {}
        for is_train in (True, False):
            key = (id(source.load), is_train)
            if key not in loaded:
                loaded[key] = source.load(config.data_dir, is_train)
            splits[is_train] = loaded[key]
        of_task = torch.isin(splits[True].labels, torch.tensor(source.classes))
        train_ids = torch.nonzero(of_task).squeeze(1)[:cardinality]
        train = splits[True].select(train_ids)
        test = splits[False].of_classes(list(source.classes), config.test_limit)
        tasks.append(
            TaskData(
                name=name,
                classes=source.classes,
                outputs=tuple(range(source.offset, source.offset + len(source.classes))),
                train_images=train.normalised(),
                train_labels=_outputs(train.labels, source),
                train_ids=train_ids,
                test_images=test.normalised(),
                test_labels=_outputs(test.labels, source),
            )
        )
    return tasks[0], tasks[1]


def _outputs(labels: torch.Tensor, source: TaskSource) -> torch.Tensor:
    """Class labels -> network outputs: the task's offset plus the class's rank among the task's classes."""
    lookup = torch.full((max(source.classes) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(source.classes)] = torch.arange(len(source.classes)) + source.offset
    return lookup[labels]


# ---------------------------------------------------------------- training and testing


@dataclass
class Progress:
    bar: Any

    def step(self, **postfix: Any) -> None:
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix(**postfix)


def train_phase(
    model: nn.Module,
    task: TaskData,
    parameters: list[nn.Parameter],
    config: TasksConfig,
    generator: torch.Generator,
    progress: Progress,
) -> list[float]:
    """Adadelta (lr, StepLR gamma per epoch) over `parameters`; returns the mean training loss of each epoch."""
    device = torch.device(config.device)
    optimizer = torch.optim.Adadelta(parameters, lr=config.lr)
    scheduler = StepLR(optimizer, step_size=1, gamma=config.gamma)
    n = len(task.train_labels)
    losses = []
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            images, labels = task.train_images[index].to(device), task.train_labels[index].to(device)
            loss = F.nll_loss(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
            progress.step(task=task.name, epoch=epoch, loss=f"{loss.item():.3f}")
        scheduler.step()
        losses.append(total / n)
    return losses


@dataclass(frozen=True)
class TestResult:
    accuracy: float  # argmax over all 36 outputs: one head for both tasks, as in the seed
    task_aware_accuracy: float  # argmax over the task's own outputs only (the task is known at test time)
    loss: float  # mean NLL


@torch.no_grad()
def evaluate(model: nn.Module, task: TaskData, config: TasksConfig) -> TestResult:
    model.eval()
    device = torch.device(config.device)
    outputs = torch.tensor(task.outputs, device=device)
    correct, task_aware, loss = 0, 0, 0.0
    for start in range(0, len(task.test_labels), config.test_batch_size):
        end = start + config.test_batch_size
        images, target = task.test_images[start:end].to(device), task.test_labels[start:end].to(device)
        log_probs = model(images)
        loss += float(F.nll_loss(log_probs, target, reduction="sum"))
        correct += int((log_probs.argmax(dim=1) == target).sum())
        task_aware += int((outputs[log_probs[:, outputs].argmax(dim=1)] == target).sum())
    n = len(task.test_labels)
    return TestResult(correct / n, task_aware / n, loss / n)


def test_tasks(model: nn.Module, tasks: tuple[TaskData, TaskData], config: TasksConfig) -> list[TestResult]:
    return [evaluate(model, task, config) for task in tasks]


@torch.no_grad()
def record_task_outputs(model: EideticTasksNet, task: TaskData, config: TasksConfig, sink: ActivationSink) -> int:
    """Runs the task's training data through the network (eval mode), the EideticIndexed layer's pre-bias
    outputs going to `sink`; returns how many rows were recorded."""
    model.eval()
    device = torch.device(config.device)
    with ActivationRecorder(model, {RECORDED: sink}, task=task.name) as recorder:
        for step, start in enumerate(range(0, len(task.train_labels), config.test_batch_size)):
            end = start + config.test_batch_size
            recorder.annotate(
                sample_id=task.train_ids[start:end], label=task.train_labels[start:end], step=step, epoch=0
            )
            model(task.train_images[start:end].to(device))
    return recorder.rows_recorded[RECORDED]


def task_quantiles(
    model: EideticTasksNet, task: TaskData, config: TasksConfig, logger: RunLogger
) -> tuple[QuantileCache, int, int | None]:
    """Records the task's outputs of the EideticIndexed layer and computes NUM_QUANTILES boundaries per unit.

    With the store, the rows stream into a layer of the run and the service computes the
    exact boundaries; without it, a local reservoir holding every row gives the very same
    ones (the same order statistics). Returns the boundaries, the rows recorded and the
    stored layer's id (None without the store).
    """
    device = torch.device(config.device)
    layer_id = logger.create_layer(STORED_LAYER, N_OUTPUTS)
    if logger.client is not None and layer_id is not None:
        with logger.open_writer(layer_id) as writer:  # closed (every row committed) before the quantiles
            rows = record_task_outputs(model, task, config, WriterSink(writer))
        if config.num_quantiles == 1:
            return QuantileCache(torch.empty(N_OUTPUTS, 0, device=device)), rows, layer_id
        assert logger.run_id is not None
        answer = logger.client.compute_quantiles(logger.run_id, layer_id, config.num_quantiles, "exact", task=task.name)
        return QuantileCache.from_quantile_set(answer, device), rows, layer_id
    reservoir = ReservoirSink(N_OUTPUTS, capacity=max(1, len(task.train_labels)))
    rows = record_task_outputs(model, task, config, reservoir)
    if config.num_quantiles == 1:
        return QuantileCache(torch.empty(N_OUTPUTS, 0, device=device)), rows, None
    return QuantileCache(local_boundaries(reservoir.values(), config.num_quantiles).to(device)), rows, None


def run_once(
    config: TasksConfig,
    settings: ClientSettings,
    tasks: tuple[TaskData, TaskData],
    *,
    run_name: str | None = None,
) -> dict[str, Any]:
    """One seed: the shared Task A phase, then each arm's Task B phase; returns its metrics (also logged as the
    run's in the store)."""
    task_a, task_b = tasks
    device = torch.device(config.device)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    model = EideticTasksNet(config.num_quantiles).to(device)
    steps = config.epochs * (
        math.ceil(len(task_a.train_labels) / config.batch_size)
        + len(config.arms) * math.ceil(len(task_b.train_labels) / config.batch_size)
    )
    result: dict[str, Any] = {"seed": config.seed, "use_db": settings.use_db}
    name = run_name or f"{EXPERIMENT}-{config.dataset}-s{config.seed}-{uuid.uuid4().hex[:8]}"
    with (
        open_run(settings, name, config) as logger,
        tqdm(
            total=steps,
            desc=f"{EXPERIMENT} {config.dataset} seed {config.seed}",
            unit="step",
            disable=not config.progress,
        ) as bar,
    ):
        ticker = Progress(bar)
        initial = test_tasks(model, tasks, config)
        task_a_losses = train_phase(
            model, task_a, list(model.parameters()), config, torch.Generator().manual_seed(config.seed), ticker
        )
        after_a = test_tasks(model, tasks, config)
        shared = trained_state(model)

        quantiles, recorded, layer_id = task_quantiles(model, task_b, config, logger)
        if logger.run_id is not None:
            result.update(run_id=logger.run_id, layer_id=layer_id)
        result["quantiles"] = {
            "n_quantiles": config.num_quantiles,
            "rows": recorded,
            "set_id": quantiles.set_id,
            "version": quantiles.version,
            "boundaries_sha": _digest(quantiles.boundaries),
        }

        result["arms"] = {}
        for arm, n_quantiles in config.arms.items():
            net = EideticTasksNet(n_quantiles).to(device)
            unmatched = net.load_state_dict(shared, strict=False)
            assert not unmatched.unexpected_keys and all(k.endswith("bucket_weights") for k in unmatched.missing_keys)
            if n_quantiles > 1:
                net.eidetic_indexed.quantiles = quantiles
            net.indexed.build_index()
            trainable = freeze_all_but(net, indexed_parameters(net))
            torch.manual_seed(config.seed + 1)  # the same dropout masks in every arm
            task_b_losses = train_phase(
                net, task_b, trainable, config, torch.Generator().manual_seed(config.seed + 1), ticker
            )
            after_b = test_tasks(net, tasks, config)
            result["arms"][arm] = _arm_metrics(
                n_quantiles, initial, after_a, after_b, task_a_losses, task_b_losses, trainable
            )
            if config.save_model:
                config.out_dir.mkdir(parents=True, exist_ok=True)
                torch.save(net.state_dict(), config.out_dir / f"{EXPERIMENT}_{config.dataset}_s{config.seed}_{arm}.pt")
        logger.log({"arms": result["arms"], "quantiles": result["quantiles"]})
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _arm_metrics(
    n_quantiles: int,
    initial: list[TestResult],
    after_a: list[TestResult],
    after_b: list[TestResult],
    task_a_losses: list[float],
    task_b_losses: list[float],
    trainable: list[nn.Parameter],
) -> dict[str, Any]:
    accuracy = [[r.accuracy for r in after_a], [r.accuracy for r in after_b]]
    task_aware = [[r.task_aware_accuracy for r in after_a], [r.task_aware_accuracy for r in after_b]]
    return {
        "n_quantiles": n_quantiles,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "accuracy_matrix": accuracy,
        "initial_accuracy": [r.accuracy for r in initial],
        **ContinualMetrics.of(accuracy, [r.accuracy for r in initial]).as_dict(),
        "task_aware": {
            "accuracy_matrix": task_aware,
            "initial_accuracy": [r.task_aware_accuracy for r in initial],
            **ContinualMetrics.of(task_aware, [r.task_aware_accuracy for r in initial]).as_dict(),
        },
        "loss_matrix": [[r.loss for r in after_a], [r.loss for r in after_b]],
        "train_loss": {"A": task_a_losses, "B": task_b_losses},
    }


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------- many seeds, reporting

METRIC_NAMES = (
    "acc_A_after_A",
    "acc_B_after_A",
    "acc_A_after_B",
    "acc_B_after_B",
    "average_accuracy",
    "backward_transfer",
    "forward_transfer",
    "forgetting",
)
VIEWS = {
    "single_head": "one head: argmax over all 36 outputs (the seed's test)",
    "task_aware": "task-aware: argmax over the task's own outputs",
}


def _row(arm: dict[str, Any], view: str) -> dict[str, float]:
    values = arm if view == "single_head" else arm[view]
    (a_a, b_a), (a_b, b_b) = values["accuracy_matrix"]
    return {
        "acc_A_after_A": a_a,
        "acc_B_after_A": b_a,
        "acc_A_after_B": a_b,
        "acc_B_after_B": b_b,
        **{name: values[name] for name in ("average_accuracy", "backward_transfer", "forward_transfer", "forgetting")},
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Per view, arm and metric: mean, sample std (ddof=1; 0 with one seed), min and max over seeds."""
    summary: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for view in VIEWS:
        summary[view] = {}
        for arm in runs[0]["arms"]:
            rows = [_row(run["arms"][arm], view) for run in runs]
            summary[view][arm] = {}
            for name in METRIC_NAMES:
                values = np.array([row[name] for row in rows])
                summary[view][arm][name] = {
                    "mean": float(values.mean()),
                    "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                    "min": float(values.min()),
                    "max": float(values.max()),
                }
    return summary


def table(metrics: dict[str, Any]) -> str:
    """The printed comparison: per view, one line per arm, mean +- std over seeds."""
    config, seeds = metrics["config"], metrics["seeds"]
    lines = [
        f"{EXPERIMENT} on {config['dataset']}: "
        f"Task A {metrics['task_sizes']['A']}, Task B {metrics['task_sizes']['B']} "
        f"training samples, {metrics['test_sizes']['A']} / {metrics['test_sizes']['B']} test; "
        f"{len(seeds)} seed(s) {seeds}; mean +- std over seeds"
    ]
    columns = ("arm", "Q", "A after A", "B after A", "A after B", "B after B", "avg acc", "BWT", "FWT", "forgetting")
    widths = (9, 3) + (14,) * 8
    for view, title in VIEWS.items():
        lines += [title, "  ".join(c.rjust(w) for c, w in zip(columns, widths))]
        for arm, values in metrics["summary"][view].items():
            q = metrics["runs"][0]["arms"][arm]["n_quantiles"]
            cells = [arm.rjust(widths[0]), str(q).rjust(widths[1])]
            for name, width in zip(METRIC_NAMES, widths[2:]):
                cells.append(f"{values[name]['mean']:+.3f}+-{values[name]['std']:.3f}".rjust(width))
            lines.append("  ".join(cells))
    return "\n".join(lines)


def plot(metrics: dict[str, Any], path: Path) -> None:
    """Per view: accuracy per task after each phase, and the transfer metrics, per arm (mean, min-max whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = (METRIC_NAMES[:4], METRIC_NAMES[4:])
    fig, axes = plt.subplots(len(VIEWS), 2, figsize=(12, 4.2 * len(VIEWS)), squeeze=False)
    for row, (view, title) in enumerate(VIEWS.items()):
        summary = metrics["summary"][view]
        arms = list(summary)
        width = 0.8 / len(arms)
        kinds = ("accuracy per task after each phase", "continual-learning metrics")
        for ax, names, kind in zip(axes[row], groups, kinds):
            positions = np.arange(len(names))
            for k, arm in enumerate(arms):
                means = np.array([summary[arm][n]["mean"] for n in names])
                low = means - np.array([summary[arm][n]["min"] for n in names])
                high = np.array([summary[arm][n]["max"] for n in names]) - means
                q = metrics["runs"][0]["arms"][arm]["n_quantiles"]
                offset = (k - (len(arms) - 1) / 2) * width
                ax.bar(positions + offset, means, width, yerr=[low, high], capsize=3, label=f"{arm} (Q={q})")
            ax.set_xticks(positions, [n.replace("_", " ") for n in names], rotation=20, ha="right")
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_title(f"{kind}\n{title}", fontsize=9)
            ax.legend(fontsize=8)
    fig.suptitle(f"{EXPERIMENT}: {metrics['config']['dataset']}, seeds {metrics['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def append_benchmark_log(metrics: dict[str, Any], path: Path) -> None:
    """The seed's benchmark.log: one line per seed, arm and view, then the table, appended."""
    stamp = dt.datetime.now().isoformat(timespec="seconds")
    config = metrics["config"]
    lines = []
    for run in metrics["runs"]:
        for arm, values in run["arms"].items():
            for view in VIEWS:
                row = _row(values, view)
                lines.append(
                    f"{stamp} {EXPERIMENT} dataset={config['dataset']} seed={run['seed']} arm={arm} "
                    f"Q={values['n_quantiles']} view={view} use_db={run['use_db']} "
                    + " ".join(f"{k}={v:.4f}" for k, v in row.items())
                )
    lines.extend(f"{stamp} " + line for line in table(metrics).splitlines())
    with path.open("a") as handle:
        handle.write("\n".join(lines) + "\n")


def run(configs: Sequence[TasksConfig], settings: ClientSettings) -> dict[str, Any]:
    """Every run (one per seed; the configs differ only in it), then the summary, table, plot, JSON and log."""
    config = configs[0]
    seeds = [each.seed for each in configs]
    tasks = load_tasks(config)
    runs = []
    for each in configs:
        name = f"{each.run_name}-s{each.seed}" if each.run_name and len(configs) > 1 else each.run_name
        runs.append(run_once(each, settings, tasks, run_name=name))
    metrics: dict[str, Any] = {
        "experiment": EXPERIMENT,
        "config": {**config_json(config), "seed": None},
        "seeds": seeds,
        "use_db": settings.use_db,
        "task_sizes": {t.name: len(t.train_labels) for t in tasks},
        "test_sizes": {t.name: len(t.test_labels) for t in tasks},
        "classes": {t.name: list(t.classes) for t in tasks},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": config.device,
        },
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "runs": runs,
    }
    metrics["summary"] = summarise(runs)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    stem = config.out_dir / f"{EXPERIMENT}_{config.dataset}"
    stem.with_suffix(".json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot(metrics, stem.with_suffix(".png"))
    if config.log_file is not None:
        append_benchmark_log(metrics, config.log_file)
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parsed = COMMAND.parse(argv)
    metrics = run(parsed.configs, parsed.settings)
    config = parsed.config
    print(table(metrics))
    print(f"metrics: {config.out_dir / (EXPERIMENT + '_' + config.dataset + '.json')} (and .png)")
    return metrics


if __name__ == "__main__":
    main()
