"""Reversible patches through which the DP callback reaches into a Lightning run (public attributes only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader

from dplit.privacy.config import PrivacyConfigError


class TrainLoaderPatch:
    """Replaces the ``train_dataloader`` hook of the DataModule (or module) that Lightning will call.

    Lightning looks the hook up on the instance each time it (re)builds the train loader, so an instance attribute
    wraps every rebuild; ``restore()`` deletes it and the class method is back.
    """

    def __init__(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and is_overridden("train_dataloader", datamodule):
            self.source: Any = datamodule
        elif is_overridden("train_dataloader", pl_module):
            self.source = pl_module
        else:
            raise PrivacyConfigError(
                "DifferentialPrivacy must replace the train loader's sampling, which Lightning allows only for "
                "loaders built by a LightningDataModule (or the module's `train_dataloader`). Pass `datamodule=...` "
                "to `trainer.fit` instead of `train_dataloaders=...`."
            )
        self.original: Callable[[], DataLoader] = self.source.train_dataloader

    def apply(self, make_private: Callable[[DataLoader], DataLoader]) -> None:
        def private_train_dataloader() -> DataLoader:
            loader = make_private(self.original())
            loader._dplit_private = True  # type: ignore[attr-defined]
            return loader

        self.source.train_dataloader = private_train_dataloader

    def restore(self) -> None:
        if "train_dataloader" in vars(self.source):
            del self.source.train_dataloader


class CriterionPatch:
    """Swaps ``pl_module.criterion`` (an nn.Module child) for a plain callable, counting its calls."""

    def __init__(self, pl_module: L.LightningModule, wrap: Callable[[Any], Callable[..., Any]]) -> None:
        self.module = pl_module
        self.original = pl_module.criterion
        self.calls = 0
        wrapped = wrap(self.original)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return wrapped(*args, **kwargs)

        delattr(pl_module, "criterion")  # a child module cannot be replaced by a non-Module attribute
        pl_module.criterion = counted  # type: ignore[assignment]

    def restore(self) -> None:
        delattr(self.module, "criterion")
        self.module.criterion = self.original
