"""LightningDataModules and real-format readers; every batch is ``(x, y, group)``."""

from dplit.data.base import GroupedTensorDataset, eval_dataloader
from dplit.data.mnist import ImbalancedMNISTDataModule

__all__ = ["ImbalancedMNISTDataModule", "GroupedTensorDataset", "eval_dataloader"]
