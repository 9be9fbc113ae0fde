"""In-memory dataset whose items carry a subgroup id, shared by the DataModules."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


class GroupedTensorDataset(Dataset[tuple[Tensor | tuple[Tensor, ...], Tensor, Tensor]]):
    """Tensors held in memory; item ``i`` is ``(x[i], y[i], group[i])``.

    Args:
        x: Inputs, first dimension N; or a tuple of such tensors (e.g. token ids and attention mask), in which case
            ``x[i]`` is the tuple of their ``i``-th rows.
        y: Targets [N].
        group: Subgroup ids [N], converted to int64.
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

    def group_counts(self, num_groups: int) -> list[int]:
        """Number of items in each group ``0..num_groups-1``."""
        return torch.bincount(self.group, minlength=num_groups).tolist()


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
