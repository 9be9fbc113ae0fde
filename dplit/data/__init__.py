"""LightningDataModules and real-format readers; every batch is ``(x, y, group)``."""

from dplit.data.base import GroupedDataModule, GroupedTensorDataset, eval_dataloader
from dplit.data.celeba import CelebADataModule
from dplit.data.chexpert_module import CheXpertDataModule
from dplit.data.cifar import CIFARDataModule
from dplit.data.fairface import FairFaceDataModule
from dplit.data.inat import INaturalistDataModule
from dplit.data.lm_bias import LMCorpusDataModule
from dplit.data.mnist import ImbalancedMNISTDataModule
from dplit.data.tabular_datasets import AdultDataModule, CreditDefaultDataModule, GermanCreditDataModule
from dplit.data.tabular_module import TabularDataModule
from dplit.data.tweets import TweetsDataModule
from dplit.data.utkface import UTKFaceDataModule

__all__ = [
    "CIFARDataModule",
    "CelebADataModule",
    "CheXpertDataModule",
    "FairFaceDataModule",
    "AdultDataModule",
    "CreditDefaultDataModule",
    "GermanCreditDataModule",
    "GroupedDataModule",
    "GroupedTensorDataset",
    "INaturalistDataModule",
    "ImbalancedMNISTDataModule",
    "TabularDataModule",
    "LMCorpusDataModule",
    "TweetsDataModule",
    "UTKFaceDataModule",
    "eval_dataloader",
]
