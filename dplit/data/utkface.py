"""UTKFace faces with age, gender and race in the file names (Bagdasaryan & Shmatikov 2019, section 4.1).

File names are ``<age>_<gender>_<race>_<datetime>.jpg.chip.jpg`` in the official "Aligned&Cropped Faces" release
and ``<age>_<gender>_<race>_<datetime>.jpg`` in the resized copy under ``../shared/data/utkface``; gender 0 = male,
1 = female; race 0 = White, 1 = Black, 2 = Asian, 3 = Indian, 4 = Others. A few official names are malformed
(no race field, a space or a missing dot before ``jpg``): names that carry all three labels are read, the others
are skipped and reported with their count and examples.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
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
    list_images,
    require_dirs,
    require_root,
    seeded_split,
)

log = logging.getLogger(__name__)

RACES = ["White", "Black", "Asian", "Indian", "Others"]
GENDERS = ["male", "female"]
MAX_AGE = 116
# The official names, the shared copy's names, and the two malformed official names ("... .jpg", "...jpg").
_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)\s*\.?jpg(?:\.chip\.jpg)?$", re.IGNORECASE)
WHERE = (
    "Get the 'Aligned&Cropped Faces' archive (UTKFace.tar.gz) from https://susanqq.github.io/UTKFace/ (research "
    "use only), extract it and pass the folder with `--data.root` (here: ../shared/data/utkface holds a 64x64 copy)."
)


def parse_utkface_name(name: str) -> tuple[int, int, int] | None:
    """``(age, gender, race)`` of a UTKFace file name, or None when the name does not carry all three in range."""
    match = _NAME.match(name)
    if match is None:
        return None
    age, gender, race = (int(v) for v in match.groups()[:3])
    if not (0 <= age <= MAX_AGE and gender < len(GENDERS) and race < len(RACES)):
        return None
    return age, gender, race


@dataclass
class UTKFaceIndex:
    """The images of a UTKFace folder, sorted by file name, with their labels."""

    files: list[Path]
    labels: np.ndarray  # [N, 3] int64: age, gender, race
    bad: list[str] = field(default_factory=list)  # JPEG names that did not parse (skipped)


def scan_utkface(root: str | Path) -> UTKFaceIndex:
    """Lists and parses the faces under ``root`` (or ``root/UTKFace``, the archive's folder).

    Raises:
        FileNotFoundError: no folder, or no parseable face in it (the message says where to get UTKFace).
    """
    folder = Path(root)
    if not any(folder.glob("*.jpg")) and (folder / "UTKFace").is_dir():
        folder = folder / "UTKFace"
    require_dirs([folder], "UTKFace", WHERE)
    files, labels, bad = [], [], []
    for path in list_images(folder, ("jpg",)):  # also the malformed official names ending in "jpg"
        parsed = parse_utkface_name(path.name)
        if parsed is None:
            bad.append(path.name)
        else:
            files.append(path)
            labels.append(parsed)
    if not files:
        raise FileNotFoundError(
            f"UTKFace: no face named <age>_<gender>_<race>_<datetime>.jpg[.chip.jpg] in {folder} "
            f"({len(bad)} unparseable JPEG names). {WHERE}"
        )
    if bad:
        log.warning(
            "UTKFace: skipped %d of %d JPEG files whose names do not parse as <age>_<gender>_<race>_<datetime>.jpg "
            "(age 0-%d, gender 0-1, race 0-4), e.g. %s",
            len(bad),
            len(bad) + len(files),
            MAX_AGE,
            ", ".join(bad[:3]),
        )
    return UTKFaceIndex(files, np.asarray(labels, dtype=np.int64).reshape(-1, 3), bad)


def age_band_names(edges: list[int]) -> list[str]:
    """``[0, 20, 40]`` -> ``["0-19", "20-39", "40+"]``."""
    return [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])] + [f"{edges[-1]}+"]


class UTKFaceDataModule(GroupedDataModule):
    """UTKFace for gender or age-band classification, with race, gender and age-band groups.

    Batches are ``(x, y, group)``: ``x`` float32 [B, 3, crop, crop] normalised (``normalization``); ``y`` the
    gender (``task: gender``, 2 classes) or the age band (``task: age``, one class per band); ``group`` int64
    [B, 3] with columns race (primary), gender, age band. Per-group metrics of the intersections age x gender x
    race: ``SubgroupMetrics(intersections: true)``.

    The folder has no official split: train/val/test are drawn at random with ``split_seed`` (the same test faces
    for every training ``seed``). ``underrepresented`` then cuts groups of one attribute in the TRAINING split only
    (e.g. ``{Black: 500}``: the paper's rare darker-skinned faces), drawn with ``seed``; val/test keep every group.

    Args:
        root: Folder of the face JPEGs (or the folder holding the archive's ``UTKFace/``).
        task: ``gender`` (targets male/female) or ``age`` (targets the age bands).
        age_bands: Lower edges of the age bands, increasing from 0 (``[0, 20, 40, 60]``: 0-19, 20-39, 40-59, 60+).
        underrepresented: Group name -> number of training faces kept, for groups of ``underrepresented_attribute``.
        underrepresented_attribute: The attribute whose groups ``underrepresented`` names.
        val_fraction: Share of all faces in the validation split.
        test_fraction: Share of all faces in the test split.
        split_seed: Seed of the train/val/test split.
        seed: Seed of the under-representation cut and of ``limit_train``.
        resize: Side the faces are resized to before cropping (the paper: 80).
        crop: Side of the crop fed to the model (the paper: 64; random in training, centre in evaluation).
        augment: Random crop and horizontal flip in training (else the centre crop).
        augmentation_multiplicity: K > 1: each training face is K augmented views ``[K, 3, crop, crop]``, one
            privacy unit (De et al. 2022); train with :class:`~dplit.tasks.MultiViewClassificationTask`, whose K
            rows the DP callback averages per face before clipping (the sensitivity stays ``max_grad_norm``).
        normalization: Input statistics the backbone expects: ``imagenet`` or ``inception`` (0.5/0.5; TF-ported
            models such as EfficientNet-Lite).
        limit_train: Keep a random subset of this many training faces, after the cut.
        limit_eval: Keep a fixed random subset of this many validation and test faces each.
        batch_size: Training batch size (the DP callback replaces the sampling with Poisson sampling).
        eval_batch_size: Batch size of the validation and test loaders.
        num_workers: DataLoader worker processes (JPEGs are decoded per item).
    """

    def __init__(
        self,
        root: str | None = None,
        task: Literal["gender", "age"] = "gender",
        age_bands: list[int] | None = None,
        underrepresented: dict[str, int] | None = None,
        underrepresented_attribute: Literal["race", "gender", "age"] = "race",
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        seed: int = 0,
        resize: int = 80,
        crop: int = 64,
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
        if task not in ("gender", "age"):
            raise ValueError(f"data.task must be 'gender' or 'age', got {task!r}")
        edges = [0, 20, 40, 60] if age_bands is None else [int(a) for a in age_bands]
        if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"data.age_bands must be increasing lower edges starting at 0, got {age_bands}")
        if underrepresented_attribute not in ("race", "gender", "age"):
            raise ValueError(
                f"data.underrepresented_attribute must be race, gender or age, got {underrepresented_attribute!r}"
            )
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"data.val_fraction ({val_fraction}) and data.test_fraction ({test_fraction}) must be in "
                             "(0, 1) with a sum below 1")  # fmt: skip
        check_at_least(1, resize=resize, crop=crop, limit_train=limit_train, limit_eval=limit_eval,
                       augmentation_multiplicity=augmentation_multiplicity)  # fmt: skip
        if augmentation_multiplicity > 1 and not augment:
            raise ValueError("data.augmentation_multiplicity > 1 needs data.augment: true (else the K views are equal)")
        if crop > resize:
            raise ValueError(f"data.crop ({crop}) must be <= data.resize ({resize})")
        self.save_hyperparameters()
        self.root = root
        self.task = task
        self.age_edges = edges
        self.underrepresented_attribute = underrepresented_attribute
        self.group_attributes = {"race": list(RACES), "gender": list(GENDERS), "age": age_band_names(edges)}
        self.num_classes = 2 if task == "gender" else len(edges)
        self.underrepresented = (
            None if underrepresented is None else {str(k): int(v) for k, v in underrepresented.items()}
        )
        if self.underrepresented:
            names = self.group_attributes[underrepresented_attribute]
            unknown = sorted(set(self.underrepresented) - set(names))
            if unknown or any(v < 0 for v in self.underrepresented.values()):
                raise ValueError(f"data.underrepresented: expected {underrepresented_attribute} groups {names} -> "
                                 f"count >= 0, got {underrepresented}")  # fmt: skip
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split_seed, self.seed = split_seed, seed
        self.resize, self.crop, self.augment = resize, crop, augment
        self.augmentation_multiplicity = augmentation_multiplicity
        self.normalization: Normalization = normalization
        self.limit_train, self.limit_eval = limit_train, limit_eval
        self.bad_names: list[str] = []  # set by setup
        self.train_group_counts: dict[str, list[int]] = {}  # attribute -> training count per group, set by setup

    def load_splits(self) -> Mapping[str, Dataset]:
        """Scans the folder, splits it, cuts the training groups and wraps each split for lazy decoding."""
        index = scan_utkface(require_root(self.root, "UTKFace", WHERE))
        self.bad_names = index.bad
        age, gender, race = index.labels.T
        band = np.searchsorted(np.asarray(self.age_edges), age, side="right") - 1  # [N]
        group = np.stack([race, gender, band], axis=1)  # [N, 3]: race, gender, age band
        target = gender if self.task == "gender" else band
        val_idx, test_idx, train_idx = seeded_split(len(age), [self.val_fraction, self.test_fraction], self.split_seed)
        if self.underrepresented:
            column = list(self.group_attributes).index(self.underrepresented_attribute)
            names = self.group_attributes[self.underrepresented_attribute]
            kept, _ = cut_groups(
                group[train_idx, column], names, self.underrepresented, self.seed, "data.underrepresented"
            )
            train_idx = train_idx[kept]
        train_idx = limit_training(train_idx, self.limit_train, self.seed)
        if self.limit_eval is not None:
            val_idx, test_idx = (fixed_subset(idx, self.limit_eval) for idx in (val_idx, test_idx))

        def make(idx: np.ndarray, train: bool) -> GroupedImageDataset:
            transform = image_transforms(self.resize, self.crop, train and self.augment, self.normalization)
            views = self.augmentation_multiplicity if train else 1
            return GroupedImageDataset([index.files[i] for i in idx], torch.from_numpy(target[idx]),
                                       torch.from_numpy(group[idx]), transform, views=views)  # fmt: skip

        splits: dict[str, GroupedImageDataset] = {
            "train": make(train_idx, True),
            "val": make(val_idx, False),
            "test": make(test_idx, False),
        }
        for name, dataset in splits.items():
            self._check_groups(name, dataset.group)
        train = splits["train"]
        self.train_group_counts = {
            attr: train.group_counts(len(names), column)
            for column, (attr, names) in enumerate(self.group_attributes.items())
        }
        log.info(
            "UTKFace (%s task): %d train / %d val / %d test faces; training faces per race %s",
            self.task,
            len(train),
            len(splits["val"]),
            len(splits["test"]),
            dict(zip(RACES, self.train_group_counts["race"], strict=True)),
        )
        return splits


__all__ = [
    "GENDERS",
    "RACES",
    "UTKFaceDataModule",
    "UTKFaceIndex",
    "age_band_names",
    "parse_utkface_name",
    "scan_utkface",
]
