"""LightningDataModules and real-format readers; every batch is ``(x, y, group)``."""

from dplit.data.base import GroupedDataModule, GroupedTensorDataset, eval_dataloader
from dplit.data.lm_bias import LMCorpusDataModule
from dplit.data.mnist import ImbalancedMNISTDataModule
from dplit.data.tweets import TweetsDataModule

__all__ = [
    "GroupedDataModule",
    "GroupedTensorDataset",
    "ImbalancedMNISTDataModule",
    "LMCorpusDataModule",
    "TweetsDataModule",
    "eval_dataloader",
]
