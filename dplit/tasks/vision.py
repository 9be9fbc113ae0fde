"""Vision tasks: augmentation multiplicity (K views of an item as one privacy unit) and multi-label findings."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from dplit.metrics.multilabel import IGNORE
from dplit.tasks.base import GroupedTask, default_optimizer
from dplit.tasks.classification import ClassificationTask


class MultiViewClassificationTask(ClassificationTask):
    """Classification whose training items carry K augmented views ``x`` [B, K, C, H, W] (De et al. 2022).

    The K views of an item become K consecutive rows (unit-major: item 0's K rows, then item 1's, ...) with the
    item's target repeated, while the batch's ``group`` keeps one id per item: that is how a privacy callback finds
    the privacy units (it sums each item's K row gradients before clipping, so one item still moves the model by at
    most ``max_grad_norm``; the task knows nothing about DP). The training loss is the criterion's mean over rows,
    i.e. the mean over items of each item's mean over its views; per-example losses are per item. Under the DP
    callback a unit's gradient is the MEAN of its K row gradients (averaged before clipping, as De et al. 2022), so
    DP and non-DP updates share one scale. Evaluation batches are single images [B, C, H, W]. Several group
    attributes ([B, A] group ids) are fine: the privacy core counts units from the items.

    Works with the per-sample backends ``hooks``, ``functorch`` and ``bookkeeping`` (which combines a unit's rows in
    every rule, Conv2d and GroupNorm included); ``ghost`` refuses multi-row units. Arguments as
    :class:`~dplit.tasks.ClassificationTask`.
    """

    _views = 1  # K of the last batch seen by forward_batch

    @override
    def forward_batch(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        x, y, group = batch
        if x.dim() != 5:  # [B, C, H, W]: one view an item (evaluation)
            self._views = 1
            return self(x), y, group
        k = x.shape[1]
        self._views = k
        return self(x.flatten(0, 1)), y.repeat_interleave(k), group  # rows [B*K, ...], unit-major

    @override
    def per_example_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """One loss per item [B]: the mean of its K rows' losses."""
        loss = super().per_example_loss(outputs, targets)  # [B*K]
        return loss if self._views == 1 else loss.reshape(-1, self._views).mean(dim=1)


class MaskedBCEWithLogits(nn.Module):
    """Binary cross-entropy per label, averaged over each example's observed labels (targets -1 are ignored).

    ``reduction='none'`` gives one loss per example [B] (what per-example clipping needs); ``'mean'`` their mean,
    ``'sum'`` their sum. An example with no observed label has loss 0 (and so no gradient).

    Shapes: logits [B, L], targets [B, L] with 1, 0 or -1.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        observed = (targets != IGNORE).to(logits.dtype)
        per_label = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0).to(logits.dtype), reduction="none")
        loss = (per_label * observed).sum(1) / observed.sum(1).clamp(min=1)  # [B]
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        if self.reduction == "mean":
            return loss.mean() if len(loss) else loss.sum()  # an empty Poisson batch: 0, not NaN
        raise ValueError(f"MaskedBCEWithLogits: reduction must be none, mean or sum, got {self.reduction!r}")


class MultiLabelTask(GroupedTask):
    """Multi-label classification (e.g. CheXpert findings): one sigmoid per label, targets [B, L] in {1, 0, -1}.

    The loss is :class:`MaskedBCEWithLogits` (ignored labels, -1, left out; one loss per example, so per-example
    clipping treats an example as one unit). ``predict`` gives 0/1 decisions at ``threshold`` [B, L] and the
    sigmoid scores [B, L]; the logged ``acc`` is the accuracy of the observed label decisions. Pair it with a
    DataModule exposing ``multilabel_names`` so that SubgroupMetrics logs per-group AUC per label and macro.
    Other arguments as :class:`~dplit.tasks.ClassificationTask`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_monitor: str = "val/loss",
        threshold: float = 0.5,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler, lr_scheduler_interval, lr_scheduler_monitor)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"model.threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self.criterion = MaskedBCEWithLogits()

    @override
    def predict(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        probs = outputs.sigmoid()  # [B, L]
        return (probs >= self.threshold).long(), probs

    @staticmethod
    def label_accuracy(preds: Tensor, targets: Tensor) -> Tensor:
        """Share of correct decisions among the observed labels (0-dim)."""
        observed = targets != IGNORE
        return ((preds == targets) & observed).sum() / observed.sum().clamp(min=1)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        outputs, targets, _group = self.forward_batch(batch)
        loss = self.criterion(outputs, targets)  # exactly this: ghost clipping hooks the criterion
        with torch.no_grad():
            example_loss = self.per_example_loss(outputs.detach(), targets)  # [B]
        if len(targets) > 0:
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, batch_size=len(targets))
            acc = self.label_accuracy(self.predict(outputs.detach())[0], targets)
            self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=len(targets))
        return {"loss": loss, "example_loss": example_loss}

    @override
    def _eval_step(self, batch: Any, stage: str) -> dict[str, Tensor]:
        outputs, targets, group = self.forward_batch(batch)
        loss = self.per_example_loss(outputs, targets)  # [B]
        preds, probs = self.predict(outputs)
        size = len(targets)
        self.log(f"{stage}/loss", loss.mean(), on_epoch=True, batch_size=size, sync_dist=True)
        acc = self.label_accuracy(preds, targets)
        self.log(f"{stage}/acc", acc, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
        return {"preds": preds, "probs": probs, "y": targets, "group": group, "loss": loss}


__all__ = ["MaskedBCEWithLogits", "MultiLabelTask", "MultiViewClassificationTask"]
