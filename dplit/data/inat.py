"""iNaturalist through torchvision's ``INaturalist``: super-category (or a 2021 taxonomic rank) classification.

Layouts (torchvision's, i.e. the competition archives extracted under ``ROOT/<version>/``):

- 2017-2019: ``ROOT/2019/<super category>/<category>/<image>.jpg`` (2018/2019 category folders are the ids
  0..C-1 over all super categories), e.g. ``ROOT/2019/Birds/200/xxx.jpg``; targets ``super`` (the super
  category: 13 in 2017, 14 in 2018, 6 in 2019) or ``full`` (the category);
- 2021: ``ROOT/2021_train_mini/00000_Animalia_Annelida_Clitellata_Haplotaxida_Lumbricidae_Lumbricus_terrestris/``
  (id and 7 ranks in the folder name); targets ``kingdom``, ``phylum``, ``class``, ``order``, ``family``,
  ``genus`` or ``full``.

Groups = the target's classes (attribute named after the target). The archives carry no train/test split per
folder, so validation and test are drawn at random (``split_seed``) from the one version folder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dplit.data.base import GroupedDataModule, check_at_least
from dplit.data.vision import (
    IMAGE_SUFFIXES,
    GroupedImageDataset,
    Normalization,
    fixed_subset,
    image_transforms,
    limit_training,
    require_root,
    seeded_split,
)

log = logging.getLogger(__name__)

VERSIONS = ("2017", "2018", "2019", "2021_train", "2021_train_mini", "2021_valid")
TARGETS_2021 = ("full", "kingdom", "phylum", "class", "order", "family", "genus")
WHERE = (
    "Get an iNaturalist competition archive (https://github.com/visipedia/inat_comp) and extract it as "
    "ROOT/<version>/ (torchvision's layout), or set `--data.download true` (online; tens to hundreds of GB), and pass "
    "ROOT with `--data.root`."
)


def read_inaturalist(root: str | Path, version: str, target: str, download: bool = False
                     ) -> tuple[list[Path], np.ndarray, list[str]]:  # fmt: skip
    """Image paths, target ids [N] and target names (index = id) of one version folder, via torchvision.

    Raises:
        FileNotFoundError: no ``ROOT/<version>`` folder with images (says where to get iNaturalist).
        ValueError: a target that the version does not have, or a folder layout torchvision rejects.
    """
    from torchvision.datasets import INaturalist

    allowed = TARGETS_2021 if version.startswith("2021") else ("full", "super")
    if target not in allowed:
        raise ValueError(f"data.target {target!r} is not available for iNaturalist {version}: use one of {allowed}")
    folder = Path(root) / version
    if not download and (not folder.is_dir() or not any(folder.iterdir())):
        raise FileNotFoundError(f"iNaturalist: no images under {folder}. {WHERE}")
    try:
        dataset: Any = INaturalist(str(root), version=version, target_type=target, download=download)
    except RuntimeError as err:  # torchvision's layout checks
        raise ValueError(f"iNaturalist {version} under {folder}: {err}. {WHERE}") from None
    names = sorted(dataset.categories_index[target], key=dataset.categories_index[target].get) if target != "full" \
        else list(dataset.all_categories)  # fmt: skip
    files, labels = [], []
    for category, fname in dataset.index:
        if fname.lower().endswith(IMAGE_SUFFIXES):
            files.append(folder / dataset.all_categories[category] / fname)
            labels.append(category if target == "full" else dataset.categories_map[category][target])
    if not files:
        raise FileNotFoundError(f"iNaturalist: no images under {folder}. {WHERE}")
    order = np.argsort([str(f) for f in files], kind="stable")  # os.listdir order is not fixed: sort by path
    return [files[i] for i in order], np.asarray(labels, dtype=np.int64)[order], names


class INaturalistDataModule(GroupedDataModule):
    """iNaturalist classification of the super category (default) or a taxonomic rank; groups = the target classes.

    Batches are ``(x, y, group)`` with ``x`` float32 [B, 3, crop, crop] (Inception v3: 299), ``y`` = ``group``.

    Args:
        root: Folder holding ``<version>/``.
        version: One of :data:`VERSIONS` (torchvision's names).
        target: ``super`` / ``full`` (2017-2019) or a rank of :data:`TARGETS_2021` (2021).
        download: Let torchvision download and extract the archive (online, very large).
        val_fraction, test_fraction: Shares of the images drawn (``split_seed``) for validation and test.
        split_seed: Seed of the split.
        seed: Seed of ``limit_train``.
        resize, crop, augment, normalization: As for the other image DataModules.
        limit_train: Keep a random subset of this many training images.
        limit_eval: Keep a fixed random subset of this many validation and test images each.
        batch_size, eval_batch_size, num_workers: Loaders.
    """

    def __init__(
        self,
        root: str | None = None,
        version: str = "2019",
        target: str = "super",
        download: bool = False,
        val_fraction: float = 0.05,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        seed: int = 0,
        resize: int = 342,
        crop: int = 299,
        augment: bool = True,
        normalization: Normalization = "inception",
        limit_train: int | None = None,
        limit_eval: int | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 512,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        if version not in VERSIONS:
            raise ValueError(f"data.version must be one of {VERSIONS}, got {version!r}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"data.val_fraction ({val_fraction}) and data.test_fraction ({test_fraction}) must be "
                             "in (0, 1) with a sum below 1")  # fmt: skip
        check_at_least(1, resize=resize, crop=crop, limit_train=limit_train, limit_eval=limit_eval)
        if crop > resize:
            raise ValueError(f"data.crop ({crop}) must be <= data.resize ({resize})")
        self.save_hyperparameters()
        self.root, self.version, self.target, self.download = root, version, target, download
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split_seed, self.seed = split_seed, seed
        self.resize, self.crop, self.augment, self.normalization = resize, crop, augment, normalization
        self.limit_train, self.limit_eval = limit_train, limit_eval
        self._classes: list[str] | None = None

    def _read(self) -> tuple[list[Path], np.ndarray]:
        files, labels, names = read_inaturalist(require_root(self.root, "iNaturalist", WHERE), self.version,
                                                self.target, self.download)  # fmt: skip
        self._classes = names
        return files, labels

    @property
    def group_attributes(self) -> dict[str, list[str]]:  # type: ignore[override]
        """``{target: class names}``; the class names come from the folder, so reading it is needed first."""
        if self._classes is None:
            self._files, self._labels = self._read()
        return {self.target: list(self._classes or [])}

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """Number of target classes (read from the folder)."""
        return len(self.group_attributes[self.target])

    def load_splits(self) -> Mapping[str, Dataset]:
        """Reads the folder through torchvision, splits it at random and wraps the splits."""
        if self._classes is None:
            self._files, self._labels = self._read()
        files, labels = self._files, self._labels
        val_idx, test_idx, train_idx = seeded_split(len(files), [self.val_fraction, self.test_fraction],
                                                    self.split_seed)  # fmt: skip
        train_idx = limit_training(train_idx, self.limit_train, self.seed)
        val_idx, test_idx = fixed_subset(val_idx, self.limit_eval), fixed_subset(test_idx, self.limit_eval)

        def make(idx: np.ndarray, train: bool) -> GroupedImageDataset:
            target = torch.from_numpy(labels[idx])
            transform = image_transforms(self.resize, self.crop, train and self.augment, self.normalization)
            return GroupedImageDataset([files[i] for i in idx], target, target.clone(), transform)

        splits = {"train": make(train_idx, True), "val": make(val_idx, False), "test": make(test_idx, False)}
        for name, dataset in splits.items():
            self._check_groups(name, dataset.group)
        log.info("iNaturalist %s (%s, %d classes): %d train / %d val / %d test images", self.version, self.target,
                 self.num_classes, *(len(splits[s]) for s in ("train", "val", "test")))  # fmt: skip
        return splits


__all__ = ["TARGETS_2021", "VERSIONS", "INaturalistDataModule", "read_inaturalist"]
