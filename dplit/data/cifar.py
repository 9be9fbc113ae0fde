"""CIFAR-10/100 for transfer learning: the canonical pickled releases or an ImageFolder of JPEGs; groups = classes.

Three sources, picked by ``format`` (``auto`` looks in this order):

- ``pickle``: torchvision's canonical layout, ``ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
  or ``ROOT/cifar-100-python/{train,test,meta}`` (read here, so small test files need no official checksums);
  ``download: true`` fetches the official archive with ``torchvision.datasets.CIFAR10/100(download=True)``;
- ``imagefolder``: ``ROOT/{train,test}/<class>/*.jpg`` with the canonical class names as folders, e.g. the
  JPEG re-encoding of CIFAR-10 under ``../shared/data/cifar10_jpeg``. JPEG changed its pixels: results on it are
  "CIFAR-10 (JPEG)", never comparable with published CIFAR-10 numbers (see :attr:`CIFARDataModule.dataset_label`).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from dplit.data.base import GroupedDataModule, check_at_least
from dplit.data.vision import (
    GroupedImageDataset,
    Normalization,
    cut_groups,
    fixed_subset,
    image_transforms,
    limit_training,
    list_image_folder,
    require_dirs,
    require_root,
    seeded_split,
)

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm
""".split()
PICKLE_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
WHERE = (
    "Get it with `--data.download true` (torchvision fetches the official archive from "
    "https://www.cs.toronto.edu/~kriz/cifar.html into data.root/{folder}), or point `--data.root` at a folder that "
    "holds {folder}/ (the official python version) or train/<class>/*.jpg and test/<class>/*.jpg (ImageFolder; "
    "here: ../shared/data/cifar10_jpeg holds CIFAR-10 re-encoded as JPEG)."
)


def read_cifar_pickles(root: str | Path, dataset: Literal["cifar10", "cifar100"], split: Literal["train", "test"]):
    """``(images uint8 [N, 32, 32, 3], labels int64 [N])`` of the canonical pickled release under ``root``.

    Raises:
        FileNotFoundError: a file of the release is missing.
        ValueError: the label names in the meta file are not the dataset's.
    """
    folder = Path(root) / PICKLE_FOLDERS[dataset]
    if dataset == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta, key, label_key, classes = "batches.meta", "label_names", "labels", CIFAR10_CLASSES
    else:
        names = [split]
        meta, key, label_key, classes = "meta", "fine_label_names", "fine_labels", CIFAR100_CLASSES
    missing = [n for n in [*names, meta] if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{LABELS[dataset]}: {folder} lacks {missing}. " + WHERE.format(folder=folder.name))
    with (folder / meta).open("rb") as f:
        found = pickle.load(f, encoding="latin1")[key]
    if list(found) != classes:
        raise ValueError(f"{folder / meta}: label names {list(found)[:5]}... are not {LABELS[dataset]}'s")
    images, labels = [], []
    for name in names:
        with (folder / name).open("rb") as f:
            entry = pickle.load(f, encoding="latin1")  # the canonical release's pickles hold bytes keys
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        images.append(data.transpose(0, 2, 3, 1))  # [n, 32, 32, 3]
        labels.extend(entry[label_key])
    return np.ascontiguousarray(np.concatenate(images)), np.asarray(labels, dtype=np.int64)


class CIFARDataModule(GroupedDataModule):
    """CIFAR-10 or CIFAR-100 classification; one group per class (attribute ``class``).

    Batches are ``(x, y, group)``: ``x`` float32 [B, 3, crop, crop] (32x32 images resized to ``resize``, cropped),
    ``y`` the class, ``group`` = ``y``. Validation is ``val_size`` training images held out with ``split_seed``;
    test is the official test set.

    Args:
        root: Folder holding the pickled release's folder, or an ImageFolder (``train/``, ``test/``).
        dataset: ``cifar10`` or ``cifar100``.
        format: ``pickle``, ``imagefolder`` or ``auto`` (the pickled release if present, else an ImageFolder).
        download: Fetch the official pickled release with torchvision when it is missing (online).
        val_size: Training images held out for validation.
        split_seed: Seed of the validation hold-out.
        seed: Seed of the ``underrepresented`` cut and of ``limit_train``.
        underrepresented: Class name -> number of training images kept (class imbalance); others kept whole.
        resize: Side the images are resized to (pretrained backbones prefer larger inputs than 32).
        crop: Side of the crop fed to the model (random in training, centre in evaluation).
        augment: Random crop and horizontal flip in training.
        augmentation_multiplicity: K > 1: each training item is K augmented views ``[K, 3, crop, crop]`` of one
            image, one privacy unit (De et al. 2022); train with
            :class:`~dplit.tasks.MultiViewClassificationTask`, whose rows the DP callback combines per item.
        normalization: Input statistics the backbone expects (``imagenet`` or ``inception``).
        limit_train: Keep a random subset of this many training images.
        limit_eval: Keep a fixed random subset of this many validation and test images each.
        batch_size: Training batch size (the DP callback replaces the sampling with Poisson sampling).
        eval_batch_size: Batch size of the validation and test loaders.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        root: str | None = None,
        dataset: Literal["cifar10", "cifar100"] = "cifar10",
        format: Literal["auto", "pickle", "imagefolder"] = "auto",
        download: bool = False,
        val_size: int = 5000,
        split_seed: int = 0,
        seed: int = 0,
        underrepresented: dict[str, int] | None = None,
        resize: int = 32,
        crop: int = 32,
        augment: bool = True,
        augmentation_multiplicity: int = 1,
        normalization: Normalization = "imagenet",
        limit_train: int | None = None,
        limit_eval: int | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 512,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        if dataset not in PICKLE_FOLDERS:
            raise ValueError(f"data.dataset must be 'cifar10' or 'cifar100', got {dataset!r}")
        if format not in ("auto", "pickle", "imagefolder"):
            raise ValueError(f"data.format must be 'auto', 'pickle' or 'imagefolder', got {format!r}")
        if download and format == "imagefolder":
            raise ValueError("`data.download: true` fetches the pickled release: use format pickle or auto")
        check_at_least(0, val_size=val_size)
        check_at_least(1, augmentation_multiplicity=augmentation_multiplicity)
        if augmentation_multiplicity > 1 and not augment:
            raise ValueError("data.augmentation_multiplicity > 1 needs data.augment: true (else the K views are equal)")
        check_at_least(1, resize=resize, crop=crop, limit_train=limit_train, limit_eval=limit_eval)
        if crop > resize:
            raise ValueError(f"data.crop ({crop}) must be <= data.resize ({resize})")
        self.save_hyperparameters()
        self.root = root
        self.dataset: Literal["cifar10", "cifar100"] = dataset
        self.format = format
        self.download = download
        self.val_size, self.split_seed, self.seed = val_size, split_seed, seed
        classes = CIFAR10_CLASSES if dataset == "cifar10" else CIFAR100_CLASSES
        self.underrepresented = (
            None if underrepresented is None else {str(k): int(v) for k, v in underrepresented.items()}
        )
        unknown = sorted(set(self.underrepresented or ()) - set(classes))
        if unknown:
            raise ValueError(f"data.underrepresented: unknown classes {unknown}; the classes are {classes}")
        self.resize, self.crop, self.augment, self.normalization = resize, crop, augment, normalization
        self.augmentation_multiplicity = augmentation_multiplicity
        self.limit_train, self.limit_eval = limit_train, limit_eval
        self.group_attributes = {"class": list(classes)}
        self.num_classes = len(classes)
        self.source: Literal["pickle", "imagefolder"] | None = None  # resolved by setup

    @property
    def dataset_label(self) -> str:
        """``CIFAR-10``, ``CIFAR-100``, or with `` (JPEG)`` appended when read from an ImageFolder of JPEGs."""
        return LABELS[self.dataset] + (" (JPEG)" if self.source == "imagefolder" else "")

    def _root(self) -> Path:
        return require_root(self.root, LABELS[self.dataset], WHERE.format(folder=PICKLE_FOLDERS[self.dataset]))

    def _resolve_source(self) -> Literal["pickle", "imagefolder"]:
        root = self._root()
        if self.format != "auto":
            return self.format
        if (root / PICKLE_FOLDERS[self.dataset]).is_dir() or self.download:
            return "pickle"
        if (root / "train").is_dir():
            return "imagefolder"
        folder = PICKLE_FOLDERS[self.dataset]
        raise FileNotFoundError(f"{LABELS[self.dataset]}: nothing at {root}. " + WHERE.format(folder=folder))

    def prepare_data(self) -> None:
        """Downloads the official pickled release with torchvision when ``download`` is set and it is missing."""
        if (
            not self.download
            or (
                self._root() / PICKLE_FOLDERS[self.dataset] / ("test_batch" if self.dataset == "cifar10" else "test")
            ).is_file()
        ):
            return
        from torchvision import datasets

        cls = datasets.CIFAR10 if self.dataset == "cifar10" else datasets.CIFAR100
        for train in (True, False):
            cls(str(self._root()), train=train, download=True)

    def load_splits(self) -> Mapping[str, Dataset]:
        """Reads the source, holds out the validation images, cuts classes and wraps the splits."""
        self.source = self._resolve_source()
        root = self._root()
        train_x: list[Path] | np.ndarray
        test_x: list[Path] | np.ndarray
        if self.source == "pickle":
            self.prepare_data()  # no-op unless download is set and the files are missing
            train_x, train_y = read_cifar_pickles(root, self.dataset, "train")
            test_x, test_y = read_cifar_pickles(root, self.dataset, "test")
        else:
            where = WHERE.format(folder=PICKLE_FOLDERS[self.dataset])
            require_dirs([root / "train", root / "test"], LABELS[self.dataset], where)
            classes = self.group_attributes["class"]
            train_x, train_y = list_image_folder(root / "train", classes)
            test_x, test_y = list_image_folder(root / "test", classes)
        if self.val_size >= len(train_y):
            raise ValueError(f"data.val_size ({self.val_size}) must be below the {len(train_y)} training images")
        val_idx, train_idx = seeded_split(len(train_y), [self.val_size / len(train_y)], self.split_seed)
        if self.underrepresented:
            kept, _ = cut_groups(
                train_y[train_idx],
                self.group_attributes["class"],
                self.underrepresented,
                self.seed,
                "data.underrepresented",
            )
            train_idx = train_idx[kept]
        train_idx = limit_training(train_idx, self.limit_train, self.seed)
        test_idx = np.arange(len(test_y))
        if self.limit_eval is not None:
            val_idx, test_idx = (fixed_subset(idx, self.limit_eval) for idx in (val_idx, test_idx))

        def make(x: list[Path] | np.ndarray, y: np.ndarray, idx: np.ndarray, train: bool) -> GroupedImageDataset:
            images = x[idx] if isinstance(x, np.ndarray) else [x[i] for i in idx]
            target = torch.from_numpy(y[idx])
            transform = image_transforms(self.resize, self.crop, train and self.augment, self.normalization)
            views = self.augmentation_multiplicity if train else 1
            return GroupedImageDataset(images, target, target.clone(), transform, views=views)

        splits = {
            "train": make(train_x, train_y, train_idx, True),
            "val": make(train_x, train_y, val_idx, False),
            "test": make(test_x, test_y, test_idx, False),
        }
        for name, dataset in splits.items():
            self._check_groups(name, dataset.group)
        log.info("%s (%s): %d train / %d val / %d test images", self.dataset_label, self.source,
                 *(len(splits[s]) for s in ("train", "val", "test")))  # fmt: skip
        return splits


__all__ = ["CIFAR100_CLASSES", "CIFAR10_CLASSES", "CIFARDataModule", "list_image_folder", "read_cifar_pickles"]
