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
- backprop_er_N: fine-tuning with experience replay (Chaudhry et al. 2019): every batch is
  joined by as many samples drawn from a reservoir buffer of N inputs, which takes each
  task's samples after the task (the standard control; N = 200 and 500 by default);
- softhebb: the Hebbian blocks learn each task unsupervised, then the read-out fine-tunes;
- softhebb_plasticity: as softhebb, with neuromodulation of the kernels' plasticity from
  the statistics earlier tasks recorded in the sink;
- softhebb_replay: as softhebb, with latent replay: the read-out inputs of
  `latent_per_task` samples of each task are kept, and every read-out batch of a later task
  is joined by as many of them (the control that separates replay from plasticity);
- softhebb_plasticity_replay: as softhebb_plasticity, with the same latent replay.
Every SoftHebb arm records per-kernel change and importance for every (task, layer).
Buffers and records live in memory here, or in the store (`model.store_replay`,
`model.store_kernel_stats`) with the same results.
"""

from __future__ import annotations

import re
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
from model.replay import InMemoryLatentMemory, InMemoryReservoir, LatentMemory, SampleBuffer
from model.softhebb import Triangle
from model.softhebb_net import (
    GREY28_NET,
    SoftHebbNet,
    SoftHebbNetConfig,
    SoftHebbTraining,
    batch_indices,
    features_of,
    fit_readout,
    train_hebbian,
)

__all__ = [
    "ARMS",
    "LATENT_REPLAY_ARMS",
    "SOFTHEBB_ARMS",
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
    "replay_capacity",
    "run_arms",
    "run_continual",
    "sequence_tasks",
    "task_accuracies",
]

ARMS = (
    "backprop_finetune",
    "backprop_joint",
    "backprop_er_200",
    "backprop_er_500",
    "softhebb",
    "softhebb_plasticity",
    "softhebb_replay",
    "softhebb_plasticity_replay",
)
SOFTHEBB_ARMS = tuple(arm for arm in ARMS if arm.startswith("softhebb"))
LATENT_REPLAY_ARMS = ("softhebb_replay", "softhebb_plasticity_replay")  # keep read-out inputs to replay
SinkFactory = Callable[[str], KernelStatsSink]  # arm name -> where that arm records
_REPLAY_ARM = re.compile(r"backprop_er_([1-9][0-9]*)")


def replay_capacity(arm: str) -> int | None:
    """The buffer size of an experience-replay arm (backprop_er_N), None for any other arm."""
    found = _REPLAY_ARM.fullmatch(arm)
    return int(found.group(1)) if found else None


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
    latent_per_task: int = 100  # read-out inputs kept per task by the latent-replay arm
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


def sequence_tasks(datasets: Sequence[tuple[LabelledImages, LabelledImages]]) -> list[Task]:
    """One task per data set (train, test), all of its classes at once; each data set's labels are moved past
    the ones before it (MNIST 0..9, then Fashion-MNIST 10..19), so one head over every class sees them all."""
    tasks, offset = [], 0
    for index, (train, test) in enumerate(datasets):
        if index and train.images.shape[1:] != datasets[0][0].images.shape[1:]:
            raise ValueError(
                f"{train.name} images are {tuple(train.images.shape[1:])}, "
                f"{datasets[0][0].name}'s {tuple(datasets[0][0].images.shape[1:])}: a sequence needs one shape"
            )
        n_classes = int(max(train.labels.max(), test.labels.max())) + 1
        tasks.append(
            Task(
                index,
                tuple(range(offset, offset + n_classes)),
                _shifted(train, offset),
                _shifted(test, offset),
            )
        )
        offset += n_classes
    return tasks


def _shifted(data: LabelledImages, offset: int) -> LabelledImages:
    return LabelledImages(data.images, data.labels + offset, data.mean, data.std, data.name)


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
    """Backprop on each task in turn (`joint=False`), on all tasks so far (`joint=True`), or on each
    task with experience replay from `replay`."""

    def __init__(
        self,
        config: HebbianCLConfig,
        *,
        joint: bool,
        generator: torch.Generator,
        replay: SampleBuffer | None = None,
    ) -> None:
        if joint and replay is not None:
            raise ValueError("joint training sees every task already; it takes no replay buffer")
        self.name = "backprop_joint" if joint else "backprop_finetune"
        if replay is not None:
            self.name = f"backprop_er_{replay.capacity}"
        self.config = config
        self.joint = joint
        self.replay = replay
        self.generator = generator
        self.device = torch.device(config.device)
        self.model = BackpropTwin(config.net).to(self.device)

    def learn(self, task: Task, seen: Sequence[Task]) -> None:
        parts = [_inputs(t.train, self.device) for t in (seen if self.joint else [task])]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        kept: tuple[Tensor, Tensor] | None = None
        if self.replay is not None:
            kept_images, kept_labels = self.replay.contents()
            if kept_labels.numel():
                kept = (kept_images.to(self.device), kept_labels.to(self.device))
        optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.backprop_lr)
        self.model.train()
        for _ in range(self.config.backprop_epochs):
            for index in batch_indices(images.shape[0], self.config.backprop_batch_size, self.generator):
                index = index.to(self.device)
                inputs, targets = images[index], labels[index]
                if kept is not None:
                    drawn = torch.randint(kept[1].shape[0], (index.numel(),), generator=self.generator)
                    drawn = drawn.to(self.device)
                    inputs = torch.cat([inputs, kept[0][drawn]])
                    targets = torch.cat([targets, kept[1][drawn]])
                loss = F.cross_entropy(self.model(inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.model.eval()
        if self.replay is not None:  # the task's samples are offered in data set order
            self.replay.extend(task.train.normalised(), task.train.labels)

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        self.model.eval()
        return self.model(images)


class SoftHebbLearner:
    """Hebbian blocks learn every task without labels, then the single-head read-out fine-tunes.

    Per task and layer it records the kernels' mean change and importance in `sink`; with
    `neuromodulation`, later tasks set each kernel's plasticity from the earlier records;
    with `latent`, the read-out also replays the inputs it kept from earlier tasks.
    """

    def __init__(
        self,
        config: HebbianCLConfig,
        *,
        sink: KernelStatsSink,
        neuromodulation: Neuromodulation | None,
        generator: torch.Generator,
        latent: LatentMemory | None = None,
    ) -> None:
        self.name = "softhebb" if neuromodulation is None else "softhebb_plasticity"
        if latent is not None:
            self.name += "_replay"
        self.config = config
        self.sink = sink
        self.neuromodulation = neuromodulation
        self.latent = latent
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
            self.sink.record(task.index, name, changes[name], importance.totals[name], self.meter.looks(name))
        features = features_of(self.net, images)
        replay = self.latent.recall(range(task.index)) if self.latent is not None else None
        fit_readout(
            self.net.readout,
            features,
            labels,
            epochs=training.readout_epochs,
            batch_size=training.readout_batch_size,
            lr=training.readout_lr,
            generator=self.generator,
            replay=None if replay is None else (replay[0].to(self.device), replay[1].to(self.device)),
        )
        if self.latent is not None:
            chosen = torch.randperm(features.shape[0], generator=self.generator)[: self.config.latent_per_task]
            self.latent.add_task(task.index, features[chosen.to(self.device)], labels[chosen.to(self.device)], chosen)

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        self.net.eval()
        return self.net(images)


def make_learner(
    arm: str,
    config: HebbianCLConfig,
    sink: KernelStatsSink | None = None,
    *,
    replay: SampleBuffer | None = None,
    latent: LatentMemory | None = None,
) -> ContinualLearner:
    """A fresh arm, its weights and batch order fixed by `config.seed`; the memories it needs are
    made in host memory unless given (store-backed ones, say)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    if arm in ("backprop_finetune", "backprop_joint"):
        return BackpropLearner(config, joint=arm == "backprop_joint", generator=generator)
    capacity = replay_capacity(arm)
    if capacity is not None:
        if replay is None:
            replay = InMemoryReservoir(capacity, config.seed)
        elif replay.capacity != capacity:
            raise ValueError(f"{arm} needs a buffer of {capacity}, not {replay.capacity}")
        return BackpropLearner(config, joint=False, generator=generator, replay=replay)
    if arm in SOFTHEBB_ARMS:
        policy = Neuromodulation(config.neuromodulation) if "plasticity" in arm else None
        replays = arm in LATENT_REPLAY_ARMS
        if replays and latent is None:
            latent = InMemoryLatentMemory()
        return SoftHebbLearner(
            config,
            sink=sink if sink is not None else InMemoryKernelStatsSink(),
            neuromodulation=policy,
            generator=generator,
            latent=latent if replays else None,
        )
    raise ValueError(f"unknown arm {arm!r}; the arms are {', '.join(ARMS)} (backprop_er_N for any N)")


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


TaskHook = Callable[[ContinualLearner, Task], None]  # (learner, task just learnt), after each task


def run_continual(
    learner: ContinualLearner,
    tasks: Sequence[Task],
    device: torch.device | str = "cpu",
    *,
    before_task: TaskHook | None = None,
    after_task: TaskHook | None = None,
) -> ArmResult:
    """Learn the tasks in order, testing every task before training and after each task.

    The hooks see the learner around each task (progress, snapshots of weights for pictures).
    """
    started = time.perf_counter()
    initial_ci, initial_ti = task_accuracies(learner, tasks, device)
    rows_ci, rows_ti = [], []
    for i, task in enumerate(tasks):
        if before_task is not None:
            before_task(learner, task)
        learner.learn(task, tasks[: i + 1])
        ci, ti = task_accuracies(learner, tasks, device)
        rows_ci.append(ci)
        rows_ti.append(ti)
        if after_task is not None:
            after_task(learner, task)
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
