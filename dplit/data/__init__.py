"""LightningDataModules and real-format readers; every batch is ``(x, y, group)``."""

from dplit.data.base import GroupedTensorDataset
from dplit.data.mnist import ImbalancedMNISTDataModule

__all__ = ["ImbalancedMNISTDataModule", "GroupedTensorDataset"]
