"""CheXpertDataModule: multi-label chest X-ray findings with sex, age-band and race groups (Berrada et al. 2023).

The reader, the label policies and the demographics join are in :mod:`dplit.data.chexpert`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from dplit.data.base import GroupedDataModule, check_at_least
from dplit.data.chexpert import (
    COMPETITION,
    FINDINGS,
    POLICIES,
    RACES,
    SEXES,
    WHERE,
    read_chexpert_csv,
    read_demographics,
)
from dplit.data.utkface import age_band_names
from dplit.data.vision import (
    GroupedImageDataset,
    Normalization,
    fixed_subset,
    image_transforms,
    limit_training,
    require_listed_files,
    require_root,
)

log = logging.getLogger(__name__)


class CheXpertDataModule(GroupedDataModule):
    """CheXpert findings as a multi-label task; groups sex (primary), age band and, with demographics, race.

    Batches are ``(x, y, group)``: ``x`` float32 [B, 3, crop, crop] (the grey X-ray on 3 channels), ``y`` float32
    [B, L] with 1, 0 or -1 (left out by the label policy), ``group`` int64 [B, A]. Train with
    :class:`~dplit.tasks.MultiLabelTask`; SubgroupMetrics then logs per-group AUC per finding and macro
    (``multilabel_names``). Validation: ``val_fraction`` of the training PATIENTS (all their images), drawn with
    ``split_seed``; test: the official ``valid.csv`` (radiologist labels, no uncertain ones).

    Args:
        root: The folder holding ``train.csv`` and ``valid.csv`` (the release folder), or its parent.
        labels: Findings predicted (default: the 5 competition findings); any of :data:`FINDINGS`.
        uncertain: -1 labels -> ``ones`` (U-Ones), ``zeros`` (U-Zeros) or ``ignore`` (left out).
        blank: Blank labels -> ``zeros`` or ``ignore``.
        demographics: CSV of the CHEXPERT DEMO table (``PATIENT``, ``PRIMARY_RACE``) for the race attribute.
        age_bands: Lower edges of the age bands, from 0.
        frontal_only: Keep frontal views only (the usual CheXpert setting).
        val_fraction: Share of training patients held out for validation.
        split_seed: Seed of the patient hold-out.
        seed: Seed of ``limit_train``.
        resize, crop, augment, normalization: As for the other image DataModules (the paper: 224 crops).
        limit_train: Keep a random subset of this many training images.
        limit_eval: Keep a fixed random subset of this many validation and test images each.
        batch_size, eval_batch_size, num_workers: Loaders.
    """

    def __init__(
        self,
        root: str | None = None,
        labels: list[str] | None = None,
        uncertain: Literal["ones", "zeros", "ignore"] = "ones",
        blank: Literal["zeros", "ignore"] = "zeros",
        demographics: str | None = None,
        age_bands: list[int] | None = None,
        frontal_only: bool = True,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        seed: int = 0,
        resize: int = 256,
        crop: int = 224,
        augment: bool = True,
        normalization: Normalization = "imagenet",
        limit_train: int | None = None,
        limit_eval: int | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 512,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        chosen = list(COMPETITION if labels is None else labels)
        unknown = [name for name in chosen if name not in FINDINGS]
        if unknown or not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(f"data.labels: {unknown or chosen} must be distinct CheXpert findings from {FINDINGS}")
        for name, value in (("uncertain", uncertain), ("blank", blank)):
            if value not in POLICIES[name]:
                raise ValueError(f"data.{name} must be one of {list(POLICIES[name])}, got {value!r}")
        edges = [0, 40, 60, 80] if age_bands is None else [int(a) for a in age_bands]
        if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"data.age_bands must be increasing lower edges starting at 0, got {age_bands}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        check_at_least(1, resize=resize, crop=crop, limit_train=limit_train, limit_eval=limit_eval)
        if crop > resize:
            raise ValueError(f"data.crop ({crop}) must be <= data.resize ({resize})")
        self.save_hyperparameters()
        self.root, self.labels, self.uncertain, self.blank = root, chosen, uncertain, blank
        self.demographics, self.age_edges, self.frontal_only = demographics, edges, frontal_only
        self.val_fraction, self.split_seed, self.seed = val_fraction, split_seed, seed
        self.resize, self.crop, self.augment, self.normalization = resize, crop, augment, normalization
        self.limit_train, self.limit_eval = limit_train, limit_eval
        self.group_attributes = {"sex": list(SEXES), "age": age_band_names(edges)}
        if demographics is not None:
            self.group_attributes["race"] = list(RACES)
        self.multilabel_names = list(chosen)
        self.num_classes = len(chosen)  # one logit per finding
        self.skipped_rows: list[str] = []  # set by setup

    def load_splits(self) -> Mapping[str, Dataset]:
        """Reads both label files (and the demographics), holds out validation patients and wraps the splits."""
        root = require_root(self.root, "CheXpert", WHERE)
        if not (root / "train.csv").is_file():
            inner = sorted(p for p in root.glob("CheXpert*") if (p / "train.csv").is_file())
            root = inner[0] if inner else root
        args = (self.labels, self.uncertain, self.blank, self.frontal_only)
        train = read_chexpert_csv(root / "train.csv", root, *args)
        test = read_chexpert_csv(root / "valid.csv", root, *args)
        self.skipped_rows = train.bad + test.bad
        for table in (train, test):
            require_listed_files(table.files, "CheXpert", WHERE)
        races = None if self.demographics is None else read_demographics(self.demographics)
        if races is not None:
            known = sum(p in races for p in set(train.patients) | set(test.patients))
            log.info("CheXpert demographics: %d of %d patients found (the rest: race Unknown)", known,
                     len(set(train.patients) | set(test.patients)))  # fmt: skip

        def groups(table) -> np.ndarray:  # [N, A]: sex, age band[, race]
            band = np.searchsorted(np.asarray(self.age_edges), table.age, side="right") - 1
            columns = [table.sex, band]
            if races is not None:
                columns.append(np.asarray([RACES.index(races.get(p, "Unknown")) for p in table.patients]))
            return np.stack(columns, axis=1).astype(np.int64).reshape(len(table.files), -1)

        patients = sorted(set(train.patients))
        held = set(np.asarray(patients)[np.random.default_rng(self.split_seed).permutation(len(patients))[
            : max(1, int(round(self.val_fraction * len(patients))))]].tolist())  # fmt: skip
        is_val = np.asarray([p in held for p in train.patients], dtype=bool)
        train_idx = limit_training(np.flatnonzero(~is_val), self.limit_train, self.seed)
        val_idx = fixed_subset(np.flatnonzero(is_val), self.limit_eval)
        test_idx = fixed_subset(np.arange(len(test.files)), self.limit_eval)

        def make(table, group: np.ndarray, idx: np.ndarray, training: bool) -> GroupedImageDataset:
            transform = image_transforms(self.resize, self.crop, training and self.augment, self.normalization)
            files: list[Path] = [table.files[i] for i in idx]
            return GroupedImageDataset(files, torch.from_numpy(table.target[idx]), torch.from_numpy(group[idx]),
                                       transform)  # fmt: skip

        train_groups, test_groups = groups(train), groups(test)
        splits = {
            "train": make(train, train_groups, train_idx, True),
            "val": make(train, train_groups, val_idx, False),
            "test": make(test, test_groups, test_idx, False),
        }
        for name, dataset in splits.items():
            self._check_groups(name, dataset.group)
        log.info("CheXpert (%s; uncertain->%s, blank->%s): %d train / %d val / %d test images", ", ".join(self.labels),
                 self.uncertain, self.blank, *(len(splits[s]) for s in ("train", "val", "test")))  # fmt: skip
        return splits


__all__ = ["CheXpertDataModule"]
