"""Class-incremental continual learning of SoftHebb networks, with and without kernel plasticity.

Tasks split a data set's classes into disjoint groups (2 classes each: 5 tasks on 10
classes). Every arm has a single head over all classes and never sees a task id at test
time (class-incremental); the task-incremental view of the same model masks the logits to
the classes of the task being tested. After each task every task is tested, which fills
one T x T accuracy matrix per view; `model.cl_metrics` turns them into ACC, BWT, FWT and
forgetting.

Arms, all through `run_continual`:
- backprop_finetune: the same topology trained end to end by backprop on each task in turn;
- backprop_joint: the same, on the union of the tasks so far (the usual upper bound);
- softhebb: the Hebbian blocks learn each task unsupervised, then the read-out fine-tunes;
- softhebb_plasticity: as softhebb, with neuromodulation of the kernels' plasticity from
  the statistics earlier tasks recorded in the sink.
Both SoftHebb arms record per-kernel change and importance for every (task, layer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.cl_metrics import ContinualMetrics
from model.data import LabelledImages
from model.kernel_plasticity import (
    ActivationImportance,
    InMemoryKernelStatsSink,
    KernelChangeMeter,
    KernelRecord,
    KernelStatsSink,
    Neuromodulation,
    NeuromodulationConfig,
)
from model.softhebb import Triangle
from model.softhebb_net import (
    GREY28_NET,
    SoftHebbNet,
    SoftHebbNetConfig,
    SoftHebbTraining,
    batch_indices,
    features_of,
    train_hebbian,
    train_readout,
)

__all__ = [
    "ARMS",
    "ArmResult",
    "BackpropLearner",
    "BackpropTwin",
    "ContinualLearner",
    "HebbianCLConfig",
    "SoftHebbLearner",
    "Task",
    "class_incremental_splits",
    "make_learner",
    "make_tasks",
    "run_arms",
    "run_continual",
    "task_accuracies",
]

ARMS = ("backprop_finetune", "backprop_joint", "softhebb", "softhebb_plasticity")
SinkFactory = Callable[[str], KernelStatsSink]  # arm name -> where that arm records


@dataclass(frozen=True)
class HebbianCLConfig:
    """Everything a continual run depends on."""

    net: SoftHebbNetConfig = GREY28_NET
    training: SoftHebbTraining = field(default_factory=SoftHebbTraining)
    neuromodulation: NeuromodulationConfig = field(default_factory=NeuromodulationConfig)
    classes_per_task: int = 2
    n_tasks: int | None = None  # the first n tasks of the split; None: all of them
    backprop_epochs: int = 1
    backprop_batch_size: int = 64
    backprop_lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"


# ---------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    index: int
    classes: tuple[int, ...]
    train: LabelledImages
    test: LabelledImages


def class_incremental_splits(classes: Sequence[int], classes_per_task: int = 2) -> list[tuple[int, ...]]:
    """Consecutive disjoint groups of `classes_per_task` classes, in the order given."""
    ordered = list(dict.fromkeys(int(c) for c in classes))
    if len(ordered) != len(list(classes)):
        raise ValueError("classes repeat")
    if classes_per_task < 1 or len(ordered) % classes_per_task:
        raise ValueError(f"{len(ordered)} classes do not split into groups of {classes_per_task}")
    return [tuple(ordered[i : i + classes_per_task]) for i in range(0, len(ordered), classes_per_task)]


def make_tasks(
    train: LabelledImages,
    test: LabelledImages,
    *,
    classes_per_task: int = 2,
    n_tasks: int | None = None,
    class_order: Sequence[int] | None = None,
) -> list[Task]:
    """The tasks of a class-incremental split; labels stay the data set's (one head over all classes)."""
    classes = class_order if class_order is not None else sorted(int(c) for c in torch.unique(train.labels))
    groups = class_incremental_splits(classes, classes_per_task)
    groups = groups if n_tasks is None else groups[:n_tasks]
    return [
        Task(i, group, train.of_classes(list(group)), test.of_classes(list(group))) for i, group in enumerate(groups)
    ]


# ---------------------------------------------------------------- learners


class ContinualLearner(Protocol):
    """An arm: learns one task at a time (`seen` are the tasks so far, this one last) and classifies."""

    name: str

    def learn(self, task: Task, seen: Sequence[Task]) -> None: ...

    def logits(self, images: Tensor) -> Tensor: ...


class BackpropTwin(nn.Module):
    """The SoftHebb network's topology (normalisation, convolutions, triangle, pooling, read-out),
    with ordinary convolutions that backprop trains end to end."""

    def __init__(self, config: SoftHebbNetConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = config.in_channels
        for layer in config.layers:
            pool = nn.MaxPool2d if layer.pool == "max" else nn.AvgPool2d
            layers += [
                nn.BatchNorm2d(channels, affine=False),
                nn.Conv2d(
                    channels,
                    layer.channels,
                    layer.kernel_size,
                    padding=layer.kernel_size // 2,
                    padding_mode="reflect",
                    bias=False,
                ),
                Triangle(layer.power),
                pool(layer.pool_kernel, stride=layer.pool_stride, padding=layer.pool_padding),
            ]
            channels = layer.channels
        self.body = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            self.body.eval()
            n_features = self.body(torch.zeros(2, config.in_channels, config.image_size, config.image_size)).shape[1]
            self.body.train()
        self.readout = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(n_features, config.n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.body(x))


def _inputs(data: LabelledImages, device: torch.device) -> tuple[Tensor, Tensor]:
    return data.normalised().to(device), data.labels.to(device)


class BackpropLearner:
    """Backprop on each task in turn (`joint=False`) or on all tasks so far (`joint=True`)."""

    def __init__(self, config: HebbianCLConfig, *, joint: bool, generator: torch.Generator) -> None:
        self.name = "backprop_joint" if joint else "backprop_finetune"
        self.config = config
        self.joint = joint
        self.generator = generator
        self.device = torch.device(config.device)
        self.model = BackpropTwin(config.net).to(self.device)

    def learn(self, task: Task, seen: Sequence[Task]) -> None:
        parts = [_inputs(t.train, self.device) for t in (seen if self.joint else [task])]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.backprop_lr)
        self.model.train()
        for _ in range(self.config.backprop_epochs):
            for index in batch_indices(images.shape[0], self.config.backprop_batch_size, self.generator):
                index = index.to(self.device)
                loss = F.cross_entropy(self.model(images[index]), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.model.eval()

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        self.model.eval()
        return self.model(images)


class SoftHebbLearner:
    """Hebbian blocks learn every task without labels, then the single-head read-out fine-tunes.

    Per task and layer it records the kernels' mean change and importance in `sink`; with
    `neuromodulation`, later tasks set each kernel's plasticity from the earlier records.
    """

    def __init__(
        self,
        config: HebbianCLConfig,
        *,
        sink: KernelStatsSink,
        neuromodulation: Neuromodulation | None,
        generator: torch.Generator,
    ) -> None:
        self.name = "softhebb" if neuromodulation is None else "softhebb_plasticity"
        self.config = config
        self.sink = sink
        self.neuromodulation = neuromodulation
        self.generator = generator
        self.device = torch.device(config.device)
        self.net = SoftHebbNet(config.net).to(self.device)
        self.convs = self.net.conv_layers()
        self.layer_names = list(self.convs)
        self.meter = KernelChangeMeter(self.convs, config.neuromodulation.interval)
        self.importance = ActivationImportance(
            {name: block.activation for name, block in zip(self.layer_names, self.net.hebbian_blocks())}
        )

    def earlier_records(self, task: int, layer: str) -> list[KernelRecord]:
        found = (self.sink.read(t, layer) for t in range(task))
        return [record for record in found if record is not None]

    def learn(self, task: Task, seen: Sequence[Task]) -> None:
        images, labels = _inputs(task.train, self.device)
        training = self.config.training
        earlier = {name: self.earlier_records(task.index, name) for name in self.layer_names}
        for conv in self.convs.values():
            conv.plasticity.fill_(1.0)
        self.meter.start_task()

        def after_update(i: int, _block: nn.Module) -> None:
            name = self.layer_names[i]
            measured = self.meter.after_update(name)
            if measured and self.neuromodulation is not None and earlier[name]:
                multipliers = self.neuromodulation.plasticity(self.meter.mean_change(name), earlier[name])
                self.convs[name].plasticity.copy_(multipliers)

        train_hebbian(
            self.net,
            images,
            epochs=training.hebbian_epochs,
            batch_size=training.hebbian_batch_size,
            generator=self.generator,
            on_batch=after_update,
        )
        changes = {name: self.meter.finish_task(name) for name in self.layer_names}
        with self.importance.watching() as importance:
            features_of(self.net, images)
        for name in self.layer_names:
            self.sink.record(task.index, name, changes[name], importance.totals[name])
        train_readout(
            self.net,
            images,
            labels,
            epochs=training.readout_epochs,
            batch_size=training.readout_batch_size,
            lr=training.readout_lr,
            generator=self.generator,
        )

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        self.net.eval()
        return self.net(images)


def make_learner(arm: str, config: HebbianCLConfig, sink: KernelStatsSink | None = None) -> ContinualLearner:
    """A fresh arm, its weights and batch order fixed by `config.seed`."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    if arm in ("backprop_finetune", "backprop_joint"):
        return BackpropLearner(config, joint=arm == "backprop_joint", generator=generator)
    if arm in ("softhebb", "softhebb_plasticity"):
        policy = Neuromodulation(config.neuromodulation) if arm == "softhebb_plasticity" else None
        return SoftHebbLearner(
            config,
            sink=sink if sink is not None else InMemoryKernelStatsSink(),
            neuromodulation=policy,
            generator=generator,
        )
    raise ValueError(f"unknown arm {arm!r}; the arms are {', '.join(ARMS)}")


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def task_accuracies(
    learner: ContinualLearner, tasks: Sequence[Task], device: torch.device | str
) -> tuple[list[float], list[float]]:
    """Test accuracy on every task: (class-incremental over all outputs, task-incremental masked to the
    task's classes)."""
    class_incremental, task_incremental = [], []
    for task in tasks:
        images, labels = _inputs(task.test, torch.device(device))
        logits = learner.logits(images)
        class_incremental.append(float((logits.argmax(1) == labels).float().mean()))
        allowed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        allowed[list(task.classes)] = True
        masked = logits.masked_fill(~allowed, float("-inf"))
        task_incremental.append(float((masked.argmax(1) == labels).float().mean()))
    return class_incremental, task_incremental


@dataclass(frozen=True)
class ArmResult:
    """One arm's accuracy matrices (row i: after task i; column j: task j) and their metrics."""

    arm: str
    classes: list[tuple[int, ...]]
    class_incremental: np.ndarray
    task_incremental: np.ndarray
    initial_class_incremental: np.ndarray
    initial_task_incremental: np.ndarray
    seconds: float

    def metrics(self) -> dict[str, ContinualMetrics]:
        return {
            "class_incremental": ContinualMetrics.of(self.class_incremental, self.initial_class_incremental),
            "task_incremental": ContinualMetrics.of(self.task_incremental, self.initial_task_incremental),
        }

    def as_dict(self) -> dict[str, object]:
        return {
            "arm": self.arm,
            "classes": [list(c) for c in self.classes],
            "class_incremental": self.class_incremental.tolist(),
            "task_incremental": self.task_incremental.tolist(),
            "initial_class_incremental": self.initial_class_incremental.tolist(),
            "initial_task_incremental": self.initial_task_incremental.tolist(),
            "seconds": self.seconds,
            "metrics": {view: m.as_dict() for view, m in self.metrics().items()},
        }


def run_continual(learner: ContinualLearner, tasks: Sequence[Task], device: torch.device | str = "cpu") -> ArmResult:
    """Learn the tasks in order, testing every task before training and after each task."""
    started = time.perf_counter()
    initial_ci, initial_ti = task_accuracies(learner, tasks, device)
    rows_ci, rows_ti = [], []
    for i, task in enumerate(tasks):
        learner.learn(task, tasks[: i + 1])
        ci, ti = task_accuracies(learner, tasks, device)
        rows_ci.append(ci)
        rows_ti.append(ti)
    return ArmResult(
        arm=learner.name,
        classes=[task.classes for task in tasks],
        class_incremental=np.asarray(rows_ci),
        task_incremental=np.asarray(rows_ti),
        initial_class_incremental=np.asarray(initial_ci),
        initial_task_incremental=np.asarray(initial_ti),
        seconds=time.perf_counter() - started,
    )


def run_arms(
    config: HebbianCLConfig,
    train: LabelledImages,
    test: LabelledImages,
    *,
    arms: Sequence[str] = ARMS,
    sink_factory: SinkFactory | None = None,
) -> dict[str, ArmResult]:
    """Every arm on the same tasks and seed; each SoftHebb arm records into its own sink."""
    tasks = make_tasks(train, test, classes_per_task=config.classes_per_task, n_tasks=config.n_tasks)
    factory = sink_factory if sink_factory is not None else (lambda _arm: InMemoryKernelStatsSink())
    results = {}
    for arm in arms:
        learner = make_learner(arm, config, factory(arm) if arm.startswith("softhebb") else None)
        results[arm] = run_continual(learner, tasks, config.device)
    return results
