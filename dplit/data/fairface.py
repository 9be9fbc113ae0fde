"""FairFace (Kärkkäinen & Joo 2021): faces balanced over 7 race groups, with age band, gender and race labels.

The release is two label files, ``fairface_label_train.csv`` and ``fairface_label_val.csv`` (columns
``file,age,gender,race,service_test``, e.g. ``train/1.jpg,50-59,Male,East Asian,True``), and the image folders
``train/`` and ``val/`` they point into (``fairface-img-margin025-trainval.zip`` or the margin-1.25 version). Rows
whose values are not FairFace's are skipped and reported with their count and examples.
"""

from __future__ import annotations

import csv
import logging
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
    require_listed_files,
    require_root,
    seeded_split,
)

log = logging.getLogger(__name__)

RACES = ["White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"]
GENDERS = ["Male", "Female"]
AGES = ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70"]
LABEL_FILES = {"train": "fairface_label_train.csv", "val": "fairface_label_val.csv"}
WHERE = (
    "Get the images (Padding=0.25: fairface-img-margin025-trainval.zip) and the label files fairface_label_train.csv "
    "and fairface_label_val.csv from https://github.com/joojs/fairface (CC BY 4.0), put them in one folder and pass "
    "it with `--data.root`."
)


def read_fairface_labels(root: str | Path, split: Literal["train", "val"]) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image paths, labels [N, 3] (race, gender, age band ids) and the skipped rows of one FairFace label file.

    Raises:
        FileNotFoundError: the label file is missing (the message says where to get FairFace).
        ValueError: the file lacks FairFace's columns.
    """
    path = Path(root) / LABEL_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"FairFace: no {path}. {WHERE}")
    files, labels, bad = [], [], []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"file", "age", "gender", "race"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"FairFace: {path} lacks the columns {sorted(missing)} (has {reader.fieldnames})")
        for row in reader:
            race, gender, age = row["race"], row["gender"], row["age"]
            if race in RACES and gender in GENDERS and age in AGES and row["file"]:
                files.append(Path(root) / row["file"])
                labels.append((RACES.index(race), GENDERS.index(gender), AGES.index(age)))
            else:
                bad.append(",".join(str(v) for v in row.values()))
    if bad:
        log.warning("FairFace: skipped %d of %d rows of %s with unknown values, e.g. %s", len(bad),
                    len(bad) + len(files), path.name, " | ".join(bad[:3]))  # fmt: skip
    return files, np.asarray(labels, dtype=np.int64).reshape(-1, 3), bad


class FairFaceDataModule(GroupedDataModule):
    """FairFace for gender, age-band or race classification; groups race (primary), gender, age band.

    Batches are ``(x, y, group)`` with ``group`` [B, 3]. Validation is ``val_fraction`` of the official training
    split (drawn with ``split_seed``); test is the official validation split (FairFace publishes no test labels).

    Args:
        root: Folder holding the two label files and the ``train/`` and ``val/`` image folders.
        task: The target: ``gender``, ``age`` (9 bands) or ``race``.
        underrepresented: Race name -> number of training faces kept (others kept whole).
        val_fraction: Share of the official training split held out for validation.
        split_seed: Seed of the validation hold-out.
        seed: Seed of the ``underrepresented`` cut and of ``limit_train``.
        resize: Side the faces are resized to before cropping.
        crop: Side of the crop fed to the model.
        augment: Random crop and horizontal flip in training.
        normalization: Input statistics the backbone expects (``imagenet`` or ``inception``).
        limit_train: Keep a random subset of this many training faces.
        limit_eval: Keep a fixed random subset of this many validation and test faces each.
        batch_size: Training batch size (the DP callback replaces the sampling with Poisson sampling).
        eval_batch_size: Batch size of the validation and test loaders.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        root: str | None = None,
        task: Literal["gender", "age", "race"] = "gender",
        underrepresented: dict[str, int] | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        seed: int = 0,
        resize: int = 80,
        crop: int = 64,
        augment: bool = True,
        normalization: Normalization = "imagenet",
        limit_train: int | None = None,
        limit_eval: int | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 512,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        if task not in ("gender", "age", "race"):
            raise ValueError(f"data.task must be 'gender', 'age' or 'race', got {task!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        check_at_least(1, resize=resize, crop=crop, limit_train=limit_train, limit_eval=limit_eval)
        if crop > resize:
            raise ValueError(f"data.crop ({crop}) must be <= data.resize ({resize})")
        unknown = sorted(set(underrepresented or ()) - set(RACES))
        if unknown:
            raise ValueError(f"data.underrepresented: unknown races {unknown}; the races are {RACES}")
        self.save_hyperparameters()
        self.root, self.task = root, task
        self.underrepresented = (
            None if underrepresented is None else {str(k): int(v) for k, v in underrepresented.items()}
        )
        self.val_fraction, self.split_seed, self.seed = val_fraction, split_seed, seed
        self.resize, self.crop, self.augment, self.normalization = resize, crop, augment, normalization
        self.limit_train, self.limit_eval = limit_train, limit_eval
        self.group_attributes = {"race": list(RACES), "gender": list(GENDERS), "age": list(AGES)}
        self.num_classes = len(self.group_attributes[task])
        self.skipped_rows: list[str] = []  # set by setup

    def load_splits(self) -> Mapping[str, Dataset]:
        """Reads both label files, holds out validation faces, cuts races and wraps the splits."""
        root = require_root(self.root, "FairFace", WHERE)
        train_files, train_labels, bad_train = read_fairface_labels(root, "train")
        test_files, test_labels, bad_test = read_fairface_labels(root, "val")
        self.skipped_rows = bad_train + bad_test
        for files in (train_files, test_files):
            require_listed_files(files, "FairFace", WHERE)
        column = list(self.group_attributes).index(self.task)
        val_idx, train_idx = seeded_split(len(train_files), [self.val_fraction], self.split_seed)
        if self.underrepresented:
            kept, _ = cut_groups(train_labels[train_idx, 0], RACES, self.underrepresented, self.seed,
                                 "data.underrepresented")  # fmt: skip
            train_idx = train_idx[kept]
        train_idx = limit_training(train_idx, self.limit_train, self.seed)
        test_idx = fixed_subset(np.arange(len(test_files)), self.limit_eval)
        val_idx = fixed_subset(val_idx, self.limit_eval)

        def make(files: list[Path], labels: np.ndarray, idx: np.ndarray, train: bool) -> GroupedImageDataset:
            transform = image_transforms(self.resize, self.crop, train and self.augment, self.normalization)
            group = torch.from_numpy(labels[idx])
            return GroupedImageDataset([files[i] for i in idx], group[:, column].clone(), group, transform)

        splits = {
            "train": make(train_files, train_labels, train_idx, True),
            "val": make(train_files, train_labels, val_idx, False),
            "test": make(test_files, test_labels, test_idx, False),
        }
        for name, dataset in splits.items():
            self._check_groups(name, dataset.group)
        log.info("FairFace (%s task): %d train / %d val / %d test faces", self.task,
                 *(len(splits[s]) for s in ("train", "val", "test")))  # fmt: skip
        return splits


__all__ = ["AGES", "GENDERS", "RACES", "FairFaceDataModule", "read_fairface_labels"]
