"""In-memory dataset whose items carry a subgroup id, shared by the DataModules."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset


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
