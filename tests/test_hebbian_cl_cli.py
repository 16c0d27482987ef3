"""The Hebbian continual-learning command line: its flags (the shared experiment options), the
data-set sequence (MNIST then Fashion-MNIST under one head), and CIFAR-10/100 and STL-10 read
from torchvision's on-disk layout, checked against torchvision's own readers on tiny fake sets
written in that layout."""

from __future__ import annotations

import json
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from model import data as datasets
from model.experiments import hebbian_cl as experiment
from model.hebbian_cl import ARMS, sequence_tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- flags


def test_every_flag_keeps_its_meaning_and_the_defaults_stay_the_recorded_runs():
    defaults = experiment.COMMAND.parse([]).config
    assert (defaults.dataset, defaults.seeds, defaults.arms) == ("mnist5k", (0, 1, 2), ARMS)
    assert (defaults.hebbian_epochs, defaults.readout_epochs, defaults.backprop_epochs) == (1, 20, 3)
    assert (defaults.latent_per_task, defaults.n_tasks, defaults.threads) == (100, None, 1)
    assert defaults.sanity and defaults.progress and defaults.out_dir == Path("bench/hebbian_cl")
    assert (defaults.top_fraction, defaults.slow_factor, defaults.boost_factor, defaults.interval) == (
        0.15,
        0.0,
        1.15,
        10,
    )

    parsed = experiment.COMMAND.parse(
        shlex.split(
            "--dataset fashion digits --arms softhebb backprop_er_20 --seed 3 4 --hebbian-epochs 2 --readout-epochs 5 "
            "--backprop-epochs 1 --latent-per-task 7 --n-tasks 2 --train-per-class 30 --test-per-class 10 --no-sanity "
            "--threads 2 --out-dir o --no-use-db --no-progress --interval 4 --slow-factor 0.5"
        )
    )
    assert [config.dataset for config in parsed.configs] == ["fashion", "digits"]
    config = parsed.config
    assert config.arms == ("softhebb", "backprop_er_20") and config.seeds == (3, 4)
    assert (config.hebbian_epochs, config.readout_epochs, config.backprop_epochs, config.latent_per_task) == (
        2,
        5,
        1,
        7,
    )
    assert (config.n_tasks, config.train_per_class, config.test_per_class, config.threads) == (2, 30, 10, 2)
    assert not config.sanity and not config.progress and config.out_dir == Path("o")
    assert parsed.settings.use_db is False
    continual = config.continual(experiment.NET_PRESETS["grey28"], seed=3)
    assert (continual.neuromodulation.interval, continual.neuromodulation.slow_factor, continual.seed) == (4, 0.5, 3)

    sequence = experiment.COMMAND.parse(["--sequence", "mnist5k,fashion"]).config
    assert sequence.is_sequence and sequence.datasets == ["mnist5k", "fashion"] and sequence.slug == "mnist5k-fashion"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arms", "softhebb", "hopfield"], "unknown arms hopfield"),
        (["--dataset", "mnist5k,imagenet"], "unknown dataset imagenet"),
        (["--net", "resnet"], "invalid choice"),
    ],
)
def test_bad_arms_data_sets_and_presets_are_refused_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        experiment.COMMAND.parse(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------- a sequence of data sets


def write_fake_fashion_mnist(root: Path, train_per_class: int = 8, test_per_class: int = 4) -> Path:
    """Fashion-MNIST as torchvision keeps it (IDX files under FashionMNIST/raw/), random pixels, every class."""
    folder = root / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    for prefix, per_class, seed in (("train", train_per_class, 1), ("t10k", test_per_class, 2)):
        labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
        images = np.random.default_rng(seed).integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        header = np.asarray([0x803, len(labels), 28, 28], dtype=">i4").tobytes()
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        header = np.asarray([0x801, len(labels)], dtype=">i4").tobytes()
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.tobytes())
    return root


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory) -> Path:
    """A tiny Fashion-MNIST under a torchvision root, so the tests need neither Debian's package nor a download."""
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def mnist_then_fashion(fashion_dir) -> list[tuple[datasets.LabelledImages, datasets.LabelledImages]]:
    return [
        (datasets.load_mnist_5k(train=True), datasets.load_mnist_5k(train=False)),
        (datasets.load_fashion_mnist(fashion_dir, train=True), datasets.load_fashion_mnist(fashion_dir, train=False)),
    ]


def test_a_sequence_is_one_task_per_data_set_with_labels_past_the_ones_before(mnist_then_fashion):
    tasks = sequence_tasks(mnist_then_fashion)

    assert [task.classes for task in tasks] == [tuple(range(10)), tuple(range(10, 20))]
    (mnist_train, _), (fashion_train, fashion_test) = mnist_then_fashion
    assert torch.equal(tasks[0].train.labels, mnist_train.labels)
    assert torch.equal(tasks[1].train.labels, fashion_train.labels + 10)
    assert torch.equal(tasks[1].test.labels, fashion_test.labels + 10)
    assert tasks[1].train.images is fashion_train.images and tasks[1].train.mean == fashion_train.mean
    digits8 = (datasets.load_digits_28(train=True, size=8), datasets.load_digits_28(train=False, size=8))
    with pytest.raises(ValueError, match="a sequence needs one shape"):
        sequence_tasks([mnist_then_fashion[0], digits8])


def test_mnist_then_fashion_runs_every_arm_through_the_cl_metrics(tmp_path, fashion_dir):
    argv = ["--sequence", "mnist5k,fashion", "--data-dir", str(fashion_dir), "--seed", "0"]
    argv += ["--train-per-class", "8", "--test-per-class", "4"]
    argv += ["--readout-epochs", "2", "--backprop-epochs", "1", "--latent-per-task", "4", "--interval", "2"]
    argv += ["--no-use-db", "--no-progress", "--out-dir", str(tmp_path)]

    metrics = experiment.main(argv)["mnist5k,fashion"]

    assert metrics["scenario"] == "dataset_sequence" and metrics["datasets"] == ["mnist5k", "fashion"]
    assert metrics["classes"] == [list(range(10)), list(range(10, 20))]
    assert metrics["net"]["n_classes"] == 20 and metrics["sanity"] == []
    assert (metrics["train_size"], metrics["test_size"]) == (160, 80)
    assert [run["arm"] for run in metrics["runs"]] == list(ARMS)
    for run in metrics["runs"]:
        matrix = np.asarray(run["class_incremental"])
        assert matrix.shape == (2, 2) and ((matrix >= 0) & (matrix <= 1)).all()
        assert matrix[0, 1] == 0.0  # after MNIST the single head never answers a Fashion class
        assert set(run["metrics"]["class_incremental"]) >= {"average_accuracy", "backward_transfer", "forgetting"}
    assert set(metrics["summary"]["arms"]) == set(ARMS)
    assert json.loads((tmp_path / "hebbian_cl_mnist5k-fashion.json").read_text())["classes"] == metrics["classes"]
    assert (tmp_path / "hebbian_cl_mnist5k-fashion_kernel_change.png").exists()
    assert "Data set sequence, one task each: mnist5k (classes 0-9), then fashion (classes 10-19)" in (
        experiment.table(metrics)
    )


# ---------------------------------------------------------------- CIFAR and STL-10 in torchvision's layout


def _pixels(n: int, seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3 * size * size), dtype=np.uint8)


def write_fake_cifar10(root: Path, per_batch: int = 4, n_test: int = 10) -> Path:
    """CIFAR-10's python version as torchvision finds it: five training pickles, the test pickle, the meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        labels = [(per_batch * (i - 1) + j) % 10 for j in range(per_batch)]
        batch = {"batch_label": f"training batch {i} of 5", "labels": labels, "data": _pixels(per_batch, i, 32)}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {
        "batch_label": "testing batch 1 of 1",
        "labels": [j % 10 for j in range(n_test)],
        "data": _pixels(n_test, 0, 32),
    }
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def write_fake_cifar100(root: Path, n_train: int = 12, n_test: int = 6) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        fine = [(7 * j) % 100 for j in range(n)]
        entry = {
            "filenames": [f"{j}.png" for j in range(n)],
            "fine_labels": fine,
            "coarse_labels": [f // 5 for f in fine],
        }
        entry["data"] = _pixels(n, seed, 32)
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def write_fake_stl10(root: Path, n_train: int = 5, n_test: int = 3) -> Path:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        _pixels(n, seed, 96).tofile(folder / f"{split}_X.bin")
        np.asarray([1 + j % 10 for j in range(n)], dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    return root


@pytest.fixture
def torchvision_without_md5(monkeypatch):
    """torchvision's readers with the md5 check against the published archives turned off (the fake sets
    are in the same layout but not the same bytes)."""
    tv = pytest.importorskip("torchvision.datasets")
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *_args, **_kw: True)
    monkeypatch.setattr(tv.STL10, "_check_integrity", lambda _self: True)
    return tv


@pytest.mark.parametrize("train", [True, False])
def test_cifar10_cifar100_and_stl10_read_as_torchvision_reads_the_same_files(tmp_path, torchvision_without_md5, train):
    tv = torchvision_without_md5
    write_fake_cifar10(tmp_path)
    write_fake_cifar100(tmp_path)
    write_fake_stl10(tmp_path)
    split = "train" if train else "test"
    theirs_and_ours = [
        (tv.CIFAR10(str(tmp_path), train=train, download=False), datasets.load_cifar10(tmp_path, train), "targets"),
        (tv.CIFAR100(str(tmp_path), train=train, download=False), datasets.load_cifar100(tmp_path, train), "targets"),
        (tv.STL10(str(tmp_path), split=split, download=False), datasets.load_stl10(tmp_path, train), "labels"),
    ]
    for theirs, ours, labels in theirs_and_ours:
        pixels = torch.as_tensor(np.asarray(theirs.data))
        if pixels.shape[-1] == 3:  # CIFAR keeps height x width x channels
            pixels = pixels.permute(0, 3, 1, 2)
        assert ours.images.dtype == torch.uint8 and torch.equal(ours.images, pixels)
        assert torch.equal(ours.labels, torch.as_tensor(np.asarray(getattr(theirs, labels)), dtype=torch.long))
    assert len(datasets.load_cifar10(tmp_path, train)) == (20 if train else 10)
    assert datasets.load_stl10(tmp_path, train).images.shape[1:] == (3, 96, 96)


def test_a_missing_colour_set_names_its_directory_and_is_never_downloaded(tmp_path):
    with pytest.raises(datasets.DatasetUnavailable, match="needs --data-dir"):
        datasets.load_cifar10(None, True)
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(datasets.DatasetUnavailable, match=r"cifar-10-batches-py: missing data_batch_3"):
        datasets.load_cifar10(tmp_path, True)
    with pytest.raises(SystemExit) as exited:
        experiment.main(["--dataset", "stl10", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")])
    assert f"STL-10 not found in {tmp_path / 'stl10_binary'}" in str(exited.value.code)
    assert not (tmp_path / "stl10_binary").exists()


def test_the_cli_runs_cifar10_end_to_end_on_the_published_network(tmp_path):
    write_fake_cifar10(tmp_path / "data")
    argv = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--n-tasks", "1", "--seed", "0"]
    argv += ["--arms", "softhebb", "backprop_finetune", "--readout-epochs", "1", "--backprop-epochs", "1"]
    argv += ["--no-sanity", "--no-use-db", "--no-progress", "--out-dir", str(tmp_path / "out")]

    metrics = experiment.main(argv)["cifar10"]

    assert metrics["net"]["name"] == "softhebb-cifar10"
    assert [layer["channels"] for layer in metrics["net"]["layers"]] == [96, 384, 1536]
    assert (metrics["net"]["in_channels"], metrics["net"]["image_size"]) == (3, 32)
    assert (metrics["train_size"], metrics["test_size"]) == (20, 10) and metrics["classes"] == [[0, 1]]
    for run in metrics["runs"]:
        assert np.asarray(run["class_incremental"]).shape == (1, 1)
    assert (tmp_path / "out" / "hebbian_cl_cifar10.json").exists()
    assert (tmp_path / "out" / "hebbian_cl_cifar10_first_layer.png").exists()
