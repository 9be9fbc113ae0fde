"""LightningDataModules and real-format readers; every batch is ``(x, y, group)``."""

from dplit.data.base import GroupedDataModule, GroupedTensorDataset, eval_dataloader
from dplit.data.mnist import ImbalancedMNISTDataModule
from dplit.data.tabular_datasets import AdultDataModule, CreditDefaultDataModule, GermanCreditDataModule
from dplit.data.tabular_module import TabularDataModule
from dplit.data.tweets import TweetsDataModule

__all__ = [
    "AdultDataModule",
    "CreditDefaultDataModule",
    "GermanCreditDataModule",
    "GroupedDataModule",
    "GroupedTensorDataset",
    "ImbalancedMNISTDataModule",
    "TabularDataModule",
    "TweetsDataModule",
    "eval_dataloader",
]
