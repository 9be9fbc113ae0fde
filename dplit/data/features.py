"""Cached feature tensors as a grouped DataModule: DP training of a head on a frozen backbone's outputs.

On a CPU, running a frozen pretrained trunk at every step costs far more than the trainable head; running it ONCE
over the images and training on the cached outputs gives the same model when there is no data augmentation (a frozen
trunk with BatchNorm in eval mode is a fixed function of each image). The privacy unit is unchanged: one cached row
per example, Poisson-sampled and clipped by the DP callback like any other batch. Used by ``scripts/vision_results.py``
(CIFAR-10 (JPEG), UTKFace) and ``scripts/mnist_pretrained_head.py`` (imbalanced MNIST).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor
from torch.utils.data import Dataset

from dplit.data.base import GroupedDataModule, GroupedTensorDataset


class FeatureDataModule(GroupedDataModule):
    """``{split: {key: features [N, ...], "y": [N], "group": [N] or [N, A]}}`` as batches ``(x, y, group)``.

    Args:
        cache: The cached tensors per split: ``train``, ``val`` and ``test``.
        key: Which cached tensor is ``x`` (e.g. ``"pooled"``).
        group_attributes: Attribute name -> group names, as the image DataModule declared them.
        num_classes: Number of classes of ``y``.
        batch_size: Training batch size (the DP callback replaces the sampling with Poisson sampling).
        eval_batch_size: Batch size of the validation and test loaders.
    """

    def __init__(self, cache: Mapping[str, Mapping[str, Tensor]], key: str, group_attributes: dict[str, list[str]],
                 num_classes: int, batch_size: int, eval_batch_size: int = 1024) -> None:  # fmt: skip
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size)
        if not {"train", "val", "test"} <= set(cache):
            raise ValueError(f"FeatureDataModule: cache has splits {sorted(cache)}; it needs 'train', 'val' and 'test' "
                             "(the same tensors may serve as val and test)")  # fmt: skip
        missing = sorted(s for s, d in cache.items() if key not in d or "y" not in d or "group" not in d)
        if missing:
            raise ValueError(f"FeatureDataModule: splits {missing} lack {key!r}, 'y' or 'group' in the cache")
        self.cache, self.key = cache, key
        self.group_attributes = dict(group_attributes)
        self.num_classes = num_classes

    def load_splits(self) -> Mapping[str, Dataset]:
        return {s: GroupedTensorDataset(d[self.key], d["y"], d["group"]) for s, d in self.cache.items()}


__all__ = ["FeatureDataModule"]
