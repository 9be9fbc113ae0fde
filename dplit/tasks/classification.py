"""ClassificationTask: a backbone + cross-entropy over batches ``(x, y, group)``. Knows nothing about DP."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import nn
from typing_extensions import override


class ClassificationTask(L.LightningModule):
    """Multi-class classification with subgroup ids carried through every step.

    The training loss goes through ``self.criterion`` (mean reduction) and ``training_step`` returns
    ``{"loss": loss}``, so a privacy callback may swap the criterion (ghost clipping) without this class knowing.
    ``training_step`` also returns the detached per-example ``example_loss`` [B] (for per-group diagnostics).
    Validation/test steps return ``{"preds", "probs", "y", "group", "loss"}`` per example for metric callbacks.

    Args:
        backbone: the network (a plain ``nn.Module`` returning logits).
        optimizer: ``sgd``, ``adam`` or ``adamw``.
        lr: learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty / decoupled weight decay.
        lr_schedule: ``none``, ``cosine`` (over ``trainer.max_epochs``) or ``step`` (x0.1 every ``step_size`` epochs).
        step_size: epochs between decays for ``lr_schedule: step``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        lr_schedule: Literal["none", "cosine", "step"] = "none",
        step_size: int = 30,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.criterion = nn.CrossEntropyLoss()

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y, _group = batch
        logits = self(x)  # [B, num_classes]; B may be 0 under Poisson sampling
        loss = self.criterion(logits, y)
        example_loss = nn.functional.cross_entropy(logits.detach(), y, reduction="none")  # [B], for diagnostics
        if len(y) > 0:
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, batch_size=len(y))
            acc = (logits.detach().argmax(-1) == y).float().mean()
            self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=len(y))
        return {"loss": loss, "example_loss": example_loss}

    def _eval_step(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        x, y, group = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y, reduction="none")  # [B] per-example, for group losses
        probs = logits.softmax(-1)
        preds = probs.argmax(-1)
        self.log(f"{stage}/loss", loss.mean(), on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log(
            f"{stage}/acc", (preds == y).float().mean(), on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True
        )
        return {"preds": preds, "probs": probs, "y": y, "group": group, "loss": loss}

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "test")

    @override
    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        opt: torch.optim.Optimizer
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            raise ValueError(f"`model.optimizer` must be sgd, adam or adamw; got {hp.optimizer!r}.")
        if hp.lr_schedule == "none":
            return opt
        if hp.lr_schedule == "cosine":
            t_max = max(1, int(self.trainer.max_epochs or 1))
            sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)
        elif hp.lr_schedule == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.step_size, gamma=0.1)
        else:
            raise ValueError(f"`model.lr_schedule` must be none, cosine or step; got {hp.lr_schedule!r}.")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
