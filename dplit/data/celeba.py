"""CelebA through torchvision: 40 binary face attributes, one the target, others the groups.

torchvision's ``CelebA`` reads the official files under ``ROOT/celeba/`` (``list_attr_celeba.txt``,
``list_eval_partition.txt``, ``identity_CelebA.txt``, ``list_bbox_celeba.txt``, ``list_landmarks_align_celeba.txt``
and the ``img_align_celeba/`` JPEGs), checks their checksums and can download them (``download: true``); this module
takes its file names, attributes and official train/valid/test partition and decodes the images lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from dplit.data.base import GroupedDataModule, check_at_least
from dplit.data.vision import GroupedImageDataset, Normalization, fixed_subset, image_transforms

log = logging.getLogger(__name__)

ATTRIBUTES = """5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair
Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup
High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose
Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat
Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young""".split()
WHERE = (
    "Get CelebA's aligned images (img_align_celeba.zip) and its annotation files from "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into ROOT/celeba/ (img_align_celeba/, list_attr_celeba.txt, "
    "list_eval_partition.txt, identity_CelebA.txt, list_bbox_celeba.txt, list_landmarks_align_celeba.txt) and pass "
    "ROOT with `--data.root`, or try `--data.download true` (torchvision, from Google Drive, often over its quota)."
)


class CelebADataModule(GroupedDataModule):
    """CelebA: predict one attribute, report per group of other attributes (e.g. ``Male``, ``Young``).

    Batches are ``(x, y, group)``: ``y`` the ``target`` attribute (0/1), ``group`` [B] for one group attribute or
    [B, A] for several, each with groups ``not_<attr>`` (0) and ``<attr>`` (1). Splits are CelebA's official ones.

    Args:
        root: Folder holding ``celeba/`` in torchvision's layout.
        target: The attribute to predict (one of CelebA's 40).
        groups: Attributes whose values are the groups; the first is the primary one.
        download: Let torchvision download the files when they are missing or fail their checksums.
        resize: Side the images are resized to before cropping (aligned images are 178x218).
        crop: Side of the crop fed to the model.
        augment: Random crop and horizontal flip in training.
        normalization: Input statistics the backbone expects (``imagenet`` or ``inception``).
        limit_train: Keep a random subset of this many training images (fixed by ``seed``).
        limit_eval: Keep a fixed random subset of this many validation and test images each.
        seed: Seed of ``limit_train``.
        batch_size: Training batch size (the DP callback replaces the sampling with Poisson sampling).
        eval_batch_size: Batch size of the validation and test loaders.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        root: str | None = None,
        target: str = "Smiling",
        groups: list[str] | None = None,
        download: bool = False,
        resize: int = 80,
        crop: int = 64,
        augment: bool = True,
        normalization: Normalization = "imagenet",
        limit_train: int | None = None,
        limit_eval: int | None = None,
        seed: int = 0,
        batch_size: int = 256,
        eval_batch_size: int = 512,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        group_attrs = ["Male", "Young"] if groups is None else list(groups)
        unknown = [a for a in [target, *group_attrs] if a not in ATTRIBUTES]
        if unknown or not group_attrs or target in group_attrs:
            raise ValueError(f"data.target / data.groups: {unknown or group_attrs} must be other CelebA attributes "
                             f"than the target, from {ATTRIBUTES}")  # fmt: skip
        check_at_least(1, resize=resize, crop=crop, limit_train=limit_train, limit_eval=limit_eval)
        if crop > resize:
            raise ValueError(f"data.crop ({crop}) must be <= data.resize ({resize})")
        self.save_hyperparameters()
        self.root, self.target, self.download = root, target, download
        self.resize, self.crop, self.augment, self.normalization = resize, crop, augment, normalization
        self.limit_train, self.limit_eval, self.seed = limit_train, limit_eval, seed
        self.group_attributes = {a: [f"not_{a}", a] for a in group_attrs}
        self.num_classes = 2

    def prepare_data(self) -> None:
        """Downloads with torchvision when ``download`` is set (a no-op when the files pass their checksums)."""
        if self.download:
            from torchvision.datasets import CelebA

            CelebA(self._root(), split="valid", download=True)

    def _root(self) -> str:
        if self.root is None:
            raise FileNotFoundError(f"CelebA needs `--data.root`. {WHERE}")
        return self.root

    def _split(self, split: Literal["train", "valid", "test"]) -> tuple[list[Path], torch.Tensor]:
        from torchvision.datasets import CelebA

        try:
            data = CelebA(self._root(), split=split, target_type="attr")
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise FileNotFoundError(f"CelebA: {err} (under {Path(self._root()) / 'celeba'}). {WHERE}") from None
        if list(data.attr_names[: len(ATTRIBUTES)]) != ATTRIBUTES:
            raise ValueError(f"CelebA: attribute names {data.attr_names[:5]}... are not CelebA's")
        folder = Path(self._root()) / data.base_folder / "img_align_celeba"
        return [folder / name for name in data.filename], data.attr  # attr [n, 40] in {0, 1}

    def load_splits(self) -> Mapping[str, Dataset]:
        """The official partition; targets and group columns picked from the 40 attributes."""
        target = ATTRIBUTES.index(self.target)
        columns = [ATTRIBUTES.index(a) for a in self.group_attributes]
        splits: dict[str, GroupedImageDataset] = {}
        for name, split in (("train", "train"), ("val", "valid"), ("test", "test")):
            files, attr = self._split(split)  # type: ignore[arg-type]
            if name == "train" and self.limit_train is not None and self.limit_train < len(files):
                idx = torch.randperm(len(files), generator=torch.Generator().manual_seed(self.seed))[: self.limit_train]
                idx = idx.sort().values
            else:
                idx = torch.arange(len(files))
                if name != "train":
                    idx = torch.from_numpy(fixed_subset(idx.numpy(), self.limit_eval))
            group = attr[idx][:, columns]
            transform = image_transforms(self.resize, self.crop, name == "train" and self.augment, self.normalization)
            splits[name] = GroupedImageDataset(
                [files[i] for i in idx.tolist()], attr[idx, target].long(), group[:, 0] if len(columns) == 1 else group,
                transform,
            )  # fmt: skip
            self._check_groups(name, splits[name].group)
        log.info("CelebA (%s; groups %s): %d train / %d val / %d test images", self.target, list(self.group_attributes),
                 *(len(splits[s]) for s in ("train", "val", "test")))  # fmt: skip
        return splits


__all__ = ["ATTRIBUTES", "CelebADataModule"]
