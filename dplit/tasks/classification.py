"""ClassificationTask: a backbone + cross-entropy over batches ``(x, y, group)``. Knows nothing about DP."""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from typing_extensions import override

from dplit.tasks.base import GroupedTask, default_optimizer


class ClassificationTask(GroupedTask):
    """Multi-class classification with subgroup ids carried through every step.

    The training loss is ``self.criterion(logits, y)`` with ``criterion = nn.CrossEntropyLoss()`` (mean
    reduction); per-example losses are its ``reduction='none'`` form. Step outputs as in
    :class:`~dplit.tasks.base.GroupedTask`.

    Args:
        backbone: The network (a plain ``nn.Module`` returning logits [B, num_classes]).
        optimizer: Any ``torch.optim`` class with its ``init_args`` (default SGD, lr 0.05); only trainable
            parameters are optimised.
        lr_scheduler: Any ``torch.optim.lr_scheduler`` class with its ``init_args``, or null.
        lr_scheduler_interval: Step the scheduler every ``epoch`` or every optimizer ``step``.
        lr_scheduler_monitor: Metric that ``ReduceLROnPlateau`` watches.
    """

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_monitor: str = "val/loss",
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler, lr_scheduler_interval, lr_scheduler_monitor)
        self.criterion = nn.CrossEntropyLoss()

    @override
    def predict(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        probs = outputs.softmax(-1)  # [B, C]
        return probs.argmax(-1), probs
