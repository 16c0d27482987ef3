"""GLOM against a CNN of matched size: accuracy after every iteration, and the islands it forms.

Arms: ``glom`` (the configured network), ``glom-concat`` (the same with the lateral term an
MLP over concatenated neighbours instead of attention) and ``cnn`` (SmallCNN with the
width whose parameter count is nearest GLOM's). Every arm starts from the same seed and
sees the same batches. Writes `results.json`, `accuracy_by_iteration.png` and
`islands.npz` (the islands of the first test images under the ``glom`` arm) to --out-dir.

Metrics go through a `RunSink`; this module ships the JSON-lines one. Recording the run
and the island rows in the store is a sink added with the store integration.

    python -m model.experiments.glom --dataset digits8 --iterations 6 --epochs 3
    python -m model.experiments.glom --dataset mnist --data-dir ~/data --column patch --patch-size 4
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from model import data as datasets
from model.glom import Glom, GlomConfig
from model.glom_training import EpochRecord, TrainConfig, seeded, train
from model.islands import IslandTable, find_islands
from model.small_cnn import SmallCNN, matched_width, parameter_count

EXPERIMENT = "glom"
ARMS = ("glom", "glom-concat", "cnn")
N_CLASSES = 10  # every data set offered here has ten classes


class RunSink(Protocol):
    """Where a run's metrics and islands go: a file here, the store later."""

    def record(self, metrics: Mapping[str, float], step: int) -> None: ...

    def islands(self, arm: str, table: IslandTable) -> None: ...


class JsonLinesSink:
    """One JSON line per record in `path` (emptied first: a file holds one run); islands kept for `islands.npz`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")
        self.arm = ""
        self.tables: dict[str, IslandTable] = {}

    def record(self, metrics: Mapping[str, float], step: int) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"arm": self.arm, "step": step, **metrics}) + "\n")

    def islands(self, arm: str, table: IslandTable) -> None:
        self.tables[arm] = table


def load(dataset: str, data_dir: Path | None, train: bool) -> datasets.LabelledImages:
    if dataset in ("digits8", "digits28"):
        return datasets.load_digits_28(train, size=8 if dataset == "digits8" else 28)
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
    sink: JsonLinesSink,
) -> dict[str, object]:
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
            model.eval()
            with torch.no_grad():
                state = model(test_images[:island_images].to(train_config.device)).state.cpu().numpy()
            table = find_islands(
                state,
                threshold=island_threshold,
                iteration=glom_config.iterations,
                labels=test_labels[:island_images].numpy(),
            )
            sink.islands(arm, table)
            results[arm]["islands_per_level"] = np.bincount(table.level, minlength=glom_config.levels).tolist()  # type: ignore[index]
    return results


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.experiments.glom", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("digits8", "digits28", "mnist", "fashion"), default="digits8")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--column", choices=("pixel", "patch"), default="pixel")
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--window-inputs", action="store_true")
    parser.add_argument("--noise-std", type=float, default=0.05)
    parser.add_argument("--denoise", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--island-images", type=int, default=16)
    parser.add_argument("--island-threshold", type=float, default=0.9)
    parser.add_argument("--out-dir", type=Path, default=Path("runs") / EXPERIMENT)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    glom_config = GlomConfig(
        levels=args.levels,
        dim=args.dim,
        iterations=args.iterations,
        column=args.column,
        patch_size=args.patch_size,
        hidden=args.hidden,
        beta=args.beta,
        window_inputs=args.window_inputs,
        noise_std=args.noise_std,
        denoise=args.denoise,
        checkpointing=args.checkpointing,
        n_classes=N_CLASSES,
        in_channels=1,
        linear_head=args.dim != N_CLASSES,
    )
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sink = JsonLinesSink(args.out_dir / "metrics.jsonl")
    results = run(
        glom_config,
        train_config,
        dataset=args.dataset,
        data_dir=args.data_dir,
        arms=tuple(args.arms),
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        island_images=args.island_images,
        island_threshold=args.island_threshold,
        sink=sink,
    )
    summary = {
        "experiment": EXPERIMENT,
        "dataset": args.dataset,
        "glom": asdict(glom_config),
        "train": asdict(train_config),
        "results": results,
    }
    (args.out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    plot(results, args.out_dir / "accuracy_by_iteration.png")
    for arm, table in sink.tables.items():
        np.savez_compressed(
            args.out_dir / "islands.npz",
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
    return summary


if __name__ == "__main__":
    main()
