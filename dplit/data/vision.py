"""Shared pieces of the image DataModules: a lazily decoded image dataset and the train/eval transforms.

Images stay on disk (or, for formats that ship pixel arrays, in memory as uint8) and are decoded per item, so a
DataModule's ``setup`` only lists files and parses labels. Training items are augmented (random crop of ``crop``
pixels out of an image resized to ``resize``, horizontal flip); evaluation items are centre-cropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

# Input normalisations of pretrained backbones (timm's ``pretrained_cfg`` names the one a model expects):
# ``imagenet`` (torchvision/timm ResNets) and ``inception`` (TF-ported models: EfficientNet-Lite, Inception v3).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
Normalization = Literal["imagenet", "inception"]

Transform = Callable[[object], Tensor]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_transforms(resize: int, crop: int, train: bool, normalization: Normalization = "imagenet") -> Transform:
    """PIL image -> normalised float32 [3, crop, crop]; random crop + flip when ``train``, centre crop otherwise."""
    from torchvision import transforms as T

    if normalization not in NORMALIZATIONS:
        raise ValueError(f"data.normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}")
    mean, std = NORMALIZATIONS[normalization]
    if crop > resize:
        raise ValueError(f"data.crop ({crop}) must be <= data.resize ({resize})")
    steps: list[object] = [T.Resize((resize, resize), antialias=True)]
    steps += [T.RandomCrop(crop), T.RandomHorizontalFlip()] if train else [T.CenterCrop(crop)]
    steps += [T.ToTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)


class GroupedImageDataset(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """Images with targets and subgroup ids; item ``i`` is ``(transform(image_i), y[i], group[i])``.

    Args:
        images: Image file paths (decoded with PIL per item), or uint8 pixels [N, H, W, 3].
        y: Targets [N] (int64), or [N, L] for multi-label targets.
        group: Subgroup ids [N] or [N, A] (column 0 the primary attribute).
        transform: PIL image -> tensor.
        views: K > 1: an item's input is K independently transformed views of its image, [K, 3, H, W]
            (augmentation multiplicity; the item stays one privacy unit).
    """

    def __init__(
        self,
        images: Sequence[str | Path] | np.ndarray,
        y: Tensor,
        group: Tensor,
        transform: Transform,
        views: int = 1,
    ) -> None:
        if len(images) != len(y) or len(group) != len(y):
            raise ValueError(
                f"GroupedImageDataset: sizes differ (images {len(images)}, y {len(y)}, group {len(group)})"
            )
        if views < 1:
            raise ValueError(f"GroupedImageDataset: views must be >= 1, got {views}")
        self.images = images
        self.y = y
        self.group = group.to(torch.int64)
        self.transform = transform
        self.views = views

    def __len__(self) -> int:
        return len(self.y)

    def load_image(self, index: int) -> object:
        """The ``index``-th image as an RGB PIL image."""
        from PIL import Image

        if isinstance(self.images, np.ndarray):
            return Image.fromarray(self.images[index])
        with Image.open(self.images[index]) as img:
            return img.convert("RGB")

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        image = self.load_image(index)
        if self.views == 1:
            return self.transform(image), self.y[index], self.group[index]
        return torch.stack([self.transform(image) for _ in range(self.views)]), self.y[index], self.group[index]

    def group_counts(self, num_groups: int, attribute: int = 0) -> list[int]:
        """Number of items in each group ``0..num_groups-1`` of one attribute (column; the primary by default)."""
        group = self.group if self.group.dim() == 1 else self.group[:, attribute]
        return torch.bincount(group, minlength=num_groups).tolist()


def seeded_split(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Splits ``range(n)`` at random (fixed by ``seed``) into parts of the given fractions plus the rest (last).

    Returns sorted index arrays, ``len(fractions) + 1`` of them.
    """
    order = np.random.default_rng(seed).permutation(n)
    parts, start = [], 0
    for fraction in fractions:
        size = int(round(fraction * n))
        parts.append(np.sort(order[start : start + size]))
        start += size
    parts.append(np.sort(order[start:]))
    return parts


def cut_groups(
    ids: np.ndarray, names: Sequence[str], keep: dict[str, int], seed: int, what: str
) -> tuple[np.ndarray, dict[str, int]]:
    """Indices of ``ids`` kept after cutting the named groups to ``keep[name]`` items (drawn at random by ``seed``).

    Args:
        ids: Group id per item [N].
        names: Group names (index = id).
        keep: Group name -> number of items kept; other groups are kept whole.
        seed: Seed of the draw.
        what: Name of the option, for errors (e.g. ``data.underrepresented``).

    Returns:
        The sorted kept indices and the available count of each cut group.
    """
    mask = np.ones(len(ids), dtype=bool)
    rng = np.random.default_rng(seed)
    available = {}
    for name in sorted(keep):
        if name not in names:
            raise ValueError(f"{what}: unknown group {name!r}; the groups are {list(names)}")
        members = np.flatnonzero(ids == list(names).index(name))
        available[name] = len(members)
        if keep[name] > len(members):
            raise ValueError(f"{what}: group {name!r} has {len(members)} training items, cannot keep {keep[name]}")
        mask[members] = False
        mask[rng.choice(members, size=keep[name], replace=False)] = True
    return np.flatnonzero(mask), available


def require_root(root: str | Path | None, dataset: str, where: str) -> Path:
    """``root`` as a Path; raises FileNotFoundError ``"<dataset> needs `--data.root`. <where>"`` when it is None."""
    if root is None:
        raise FileNotFoundError(f"{dataset} needs `--data.root`. {where}")
    return Path(root)


def require_dirs(folders: Sequence[Path], dataset: str, where: str) -> None:
    """Raises FileNotFoundError naming the first of ``folders`` that is not a directory, and where to get the data."""
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{dataset}: no folder {folder}. {where}")


def require_listed_files(files: Sequence[Path], dataset: str, where: str) -> None:
    """Raises FileNotFoundError when the first image a label file lists is missing (wrong root or no images)."""
    if files and not Path(files[0]).is_file():
        raise FileNotFoundError(f"{dataset}: the label files point at {files[0]}, which is missing. {where}")


def list_images(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """The files of ``folder`` (not recursive) whose lower-cased name ends with one of ``suffixes``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(tuple(suffixes)))


def list_image_folder(folder: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """Image files of ``folder/<class>/`` (sorted) and their class ids; the class folders must be ``classes``."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if found != sorted(classes):
        raise ValueError(f"{folder}: class folders {found[:12]} are not the expected {sorted(classes)[:12]}...")
    files, labels = [], []
    for index, name in enumerate(classes):
        members = list_images(folder / name)
        files += members
        labels += [index] * len(members)
    return files, np.asarray(labels, dtype=np.int64)


def limit_training(idx: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """A random subset (drawn with ``[seed, 1]``, order kept) of at most ``limit`` training indices (all when None)."""
    if limit is None or limit >= len(idx):
        return idx
    return idx[np.sort(np.random.default_rng([seed, 1]).choice(len(idx), limit, replace=False))]


def fixed_subset(idx: np.ndarray, limit: int | None) -> np.ndarray:
    """A fixed random subset (seed 0, the same for every run) of at most ``limit`` of ``idx`` (all when None)."""
    if limit is None or limit >= len(idx):
        return idx
    return np.sort(np.random.default_rng(0).choice(idx, size=limit, replace=False))


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
    "Normalization",
    "GroupedImageDataset",
    "IMAGE_SUFFIXES",
    "cut_groups",
    "fixed_subset",
    "image_transforms",
    "limit_training",
    "list_image_folder",
    "list_images",
    "require_dirs",
    "require_listed_files",
    "require_root",
    "seeded_split",
]
