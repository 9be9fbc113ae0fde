"""LightningDataModules and real-format readers; every batch is ``(x, y, group)``."""

from dplit.data.base import GroupedTensorDataset, eval_dataloader
from dplit.data.mnist import ImbalancedMNISTDataModule
from dplit.data.tweets import TweetsDataModule

__all__ = ["ImbalancedMNISTDataModule", "GroupedTensorDataset", "TweetsDataModule", "eval_dataloader"]
