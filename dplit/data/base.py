"""The grouped DataModule base and the in-memory dataset whose items carry subgroup ids.

A DataModule of a new task family subclasses :class:`GroupedDataModule`, sets ``num_classes`` and
``group_attributes`` in ``__init__`` (cheap: nothing is read there) and implements ``load_splits``; the base
validates the shared arguments, loads lazily, checks the group ids and builds the loaders.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


class GroupedTensorDataset(Dataset[tuple[Tensor | tuple[Tensor, ...], Tensor, Tensor]]):
    """Tensors held in memory; item ``i`` is ``(x[i], y[i], group[i])``.

    Args:
        x: Inputs, first dimension N; or a tuple of such tensors (e.g. token ids and attention mask), in which case
            ``x[i]`` is the tuple of their ``i``-th rows.
        y: Targets [N].
        group: Subgroup ids [N], or [N, A] for A group attributes (column 0 the primary one); converted to int64.
    """

    def __init__(self, x: Tensor | tuple[Tensor, ...], y: Tensor, group: Tensor) -> None:
        xs = x if isinstance(x, tuple) else (x,)
        n = len(y)
        if not xs or any(len(t) != n for t in xs) or len(group) != n:
            sizes = [len(t) for t in xs]
            raise ValueError(f"GroupedTensorDataset: sizes differ (x {sizes}, y {n}, group {len(group)})")
        self.x = x
        self.y = y
        self.group = group.to(torch.int64)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[Tensor | tuple[Tensor, ...], Tensor, Tensor]:
        x = tuple(t[index] for t in self.x) if isinstance(self.x, tuple) else self.x[index]
        return x, self.y[index], self.group[index]

    def group_counts(self, num_groups: int, attribute: int = 0) -> list[int]:
        """Number of items in each group ``0..num_groups-1`` of one attribute (column; the primary by default)."""
        group = self.group if self.group.dim() == 1 else self.group[:, attribute]
        return torch.bincount(group, minlength=num_groups).tolist()


def eval_dataloader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Validation/test loader that evaluates every example exactly once, also under DDP.

    Under DDP each rank gets a disjoint shard without the padding duplicates of ``DistributedSampler`` (so metrics
    summed across ranks equal single-process values). This matters because DP training runs with
    ``use_distributed_sampler: false``, which would otherwise leave evaluation unsharded on every rank.
    """
    sampler = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0
    )


def check_at_least(minimum: int, **values: int | None) -> None:
    """Raise ``ValueError`` naming ``data.<field>`` for each given value below ``minimum`` (None is allowed)."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise ValueError(f"data.{name} must be >= {minimum}, got {value}")


class GroupedDataModule(L.LightningDataModule):
    """Base of dplit's DataModules: batches ``(x, y, group)`` with one or several group attributes.

    Subclasses set, in ``__init__``, :attr:`num_classes` and :attr:`group_attributes` (attribute name -> group
    names; the first attribute is the primary one), and implement :meth:`load_splits`. Nothing is read in
    ``__init__`` (so ``--help`` and config parsing stay cheap): the splits are built on the first ``setup`` or
    :attr:`train_size` access, once; ``prepare_data`` stays free for downloads. With one attribute a batch's
    ``group`` is [B]; with A attributes it is [B, A], column ``a`` holding ids of ``list(group_attributes)[a]``,
    as :class:`~dplit.callbacks.SubgroupMetrics` reads them.

    Args:
        batch_size: Training batch size (the DP callback replaces the sampling with Poisson sampling of this
            expected size).
        eval_batch_size: Batch size of the validation and test loaders.
        num_workers: DataLoader worker processes.
    """

    num_classes: int
    group_attributes: dict[str, list[str]]

    def __init__(self, batch_size: int = 64, eval_batch_size: int = 512, num_workers: int = 0) -> None:
        super().__init__()
        check_at_least(1, batch_size=batch_size, eval_batch_size=eval_batch_size)
        check_at_least(0, num_workers=num_workers)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self._splits: dict[str, Dataset] | None = None

    # ---------------------------------------------------------------- what a subclass supplies
    def load_splits(self) -> Mapping[str, Dataset]:
        """Build the ``train``, ``val`` and ``test`` datasets (called once, lazily); items ``(x, y, group)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement `load_splits()`")

    # ---------------------------------------------------------------- groups
    @property
    def group_names(self) -> list[str]:
        """Names of the primary attribute's groups (index = id)."""
        return list(next(iter(self._attributes().values())))

    @property
    def num_groups(self) -> int:
        """Number of groups of the primary attribute."""
        return len(self.group_names)

    def _attributes(self) -> dict[str, list[str]]:
        attributes = getattr(self, "group_attributes", None)
        if not attributes or any(not names for names in attributes.values()):
            raise ValueError(
                f"{type(self).__name__} must set `group_attributes` (attribute -> non-empty list of group names) "
                f"in __init__; got {attributes!r}"
            )
        return attributes

    # ---------------------------------------------------------------- lazy loading
    def splits(self) -> dict[str, Dataset]:
        """The ``train``/``val``/``test`` datasets, loaded (and their group ids checked) on first use."""
        if self._splits is None:
            splits = dict(self.load_splits())
            missing = {"train", "val", "test"} - splits.keys()
            if missing:
                raise ValueError(f"{type(self).__name__}.load_splits() returned no {', '.join(sorted(missing))} split")
            for name, dataset in splits.items():
                if isinstance(dataset, GroupedTensorDataset):
                    self._check_groups(name, dataset.group)
            self._splits = splits
        return self._splits

    def _check_groups(self, split: str, group: Tensor) -> None:
        sizes = [len(names) for names in self._attributes().values()]
        columns = group.unsqueeze(1) if group.dim() == 1 else group
        if (len(sizes) == 1 and group.dim() != 1) or (len(sizes) > 1 and tuple(group.shape[1:]) != (len(sizes),)):
            raise ValueError(
                f"{type(self).__name__}: {split} group ids have shape {tuple(group.shape)}; with "
                f"{len(sizes)} group attribute(s) {list(self._attributes())} they must be [N]"
                + ("" if len(sizes) == 1 else f" x {len(sizes)} (one column per attribute, primary first)")
            )
        for column, (attr, size) in enumerate(zip(self._attributes(), sizes, strict=True)):
            ids = columns[:, column]
            bad = (ids < 0) | (ids >= size)
            if ids.numel() and bool(bad.any()):
                raise ValueError(
                    f"{type(self).__name__}: {split} has group id {int(ids[bad][0])} for attribute {attr!r}, which "
                    f"has {size} groups {self._attributes()[attr]} (ids 0..{size - 1})"
                )

    @property
    def train_size(self) -> int:
        """Number of training examples N (loads the data on first access, so it can be read before ``setup``)."""
        return len(self.splits()["train"])  # type: ignore[arg-type]

    def setup(self, stage: str | None = None) -> None:
        """Loads the splits into memory; idempotent."""
        self.splits()

    # ---------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of ``batch_size`` training examples."""
        return DataLoader(
            self.splits()["train"],
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation examples, each evaluated once, also under DDP."""
        return eval_dataloader(self.splits()["val"], self.eval_batch_size, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """Test examples, each evaluated once, also under DDP."""
        return eval_dataloader(self.splits()["test"], self.eval_batch_size, self.num_workers)
