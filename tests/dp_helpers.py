"""Tiny grouped task + datamodule for privacy tests (synthetic, linearly separable, two groups of unequal size)."""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from dplit.data.base import GroupedTensorDataset, eval_dataloader
from dplit.tasks.classification import ClassificationTask


class TinyData(L.LightningDataModule):
    """N examples of dim ``dim`` with 2 classes; group 1 is the first 20% (minority)."""

    def __init__(self, n: int = 200, dim: int = 20, batch_size: int = 20, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, generator=g)
        self.x = torch.randn(n, dim, generator=g)
        self.y = (self.x @ w > 0).long()
        self.group = (torch.arange(n) < n // 5).long()
        self.batch_size = batch_size
        self.group_names = ["majority", "minority"]
        self.num_classes = 2

    def train_dataloader(self) -> DataLoader:
        return DataLoader(GroupedTensorDataset(self.x, self.y, self.group), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return eval_dataloader(GroupedTensorDataset(self.x, self.y, self.group), batch_size=100)


def tiny_task(dim: int = 20, hidden: int = 32, lr: float = 0.5, **kwargs) -> ClassificationTask:
    """A small MLP task; plain SGD with ``lr`` unless ``optimizer=`` (a callable ``params -> Optimizer``) is given."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    kwargs.setdefault("optimizer", partial(torch.optim.SGD, lr=lr))
    return ClassificationTask(backbone, **kwargs)


def trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


def ddp_trainer(callbacks, **kwargs) -> L.Trainer:
    """The 2-process CPU DDP trainer (gloo) of the tests' DDP jobs; DP needs Lightning's sampler off."""
    defaults = dict(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


def run_job(script: str, args: list[str], cwd=None, returncode: int = 0) -> None:
    """Run a tests/ script in a fresh Python (DDP jobs start 2 processes themselves; crash jobs kill themselves)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    # the repository root first (absolute): a relative PYTHONPATH=. would point at cwd, not at this checkout
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(here / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == returncode, proc.stderr[-4000:]


def run_ddp_job(script: str, args: list[str], cwd) -> None:
    """Run a tests/ script that starts 2-process DDP itself (Lightning relaunches the script for rank 1)."""
    run_job(script, args, cwd)
