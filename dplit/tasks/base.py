"""GroupedTask: the LightningModule base whose contract is a per-example loss. Knows nothing about DP.

A task family (classification, multi-label, causal LM, a federated client) subclasses :class:`GroupedTask` and
supplies three things:

- ``self.criterion``: an ``nn.Module`` loss with ``reduction='mean'`` whose ``reduction='none'`` form returns one
  loss per example, shape [B]. The training loss is exactly ``self.criterion(outputs, targets)``: the privacy
  core's ghost clipping hooks this module, calls it with reduction ``'none'`` and needs [B] back.
- :meth:`forward_batch`: ``batch -> (outputs, targets, group)`` (default: batches ``(x, y, group)`` and
  ``outputs = self(x)``).
- :meth:`predict`: ``outputs -> (preds [B], probs [B, C])`` for the metric callbacks.

Optimizers and LR schedulers come from the config the LightningCLI way (any ``torch.optim`` class)::

    model:
      init_args:
        optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.1, momentum: 0.9}}
        lr_scheduler: {class_path: torch.optim.lr_scheduler.CosineAnnealingLR, init_args: {T_max: 10}}

In Python, any callable ``params -> Optimizer`` works, e.g. ``functools.partial(torch.optim.Adam, lr=1e-3)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from typing_extensions import override


def default_optimizer(params: Iterable[Any]) -> torch.optim.Optimizer:
    """The default ``optimizer`` of every task: plain SGD with learning rate 0.05."""
    return torch.optim.SGD(params, lr=0.05)


class GroupedTask(L.LightningModule):
    """Base of dplit's tasks: a backbone, a per-example loss through ``self.criterion``, group ids carried along.

    ``training_step`` returns ``{"loss": self.criterion(outputs, targets), "example_loss": [B]}`` (the second,
    detached, for per-group training diagnostics); nothing is added to the loss, so a privacy callback may clip it
    per example (ghost clipping) without the task knowing. Validation/test steps return
    ``{"preds", "probs", "y", "group", "loss"}`` per example, which
    :class:`~dplit.callbacks.SubgroupMetrics` reads.

    New task families plug in by overriding :meth:`forward_batch`, :meth:`predict` and, where the criterion's
    ``reduction='none'`` output is not [B], :meth:`per_example_loss`:

    - *multi-label*: ``criterion = nn.BCEWithLogitsLoss()`` ([B, L] per label; :meth:`per_example_loss` averages
      the labels); ``predict`` thresholds the sigmoid. Ghost clipping needs the criterion's ``'none'`` output to be
      [B] itself: wrap the loss in a module that averages the labels.
    - *causal LM*: ``forward_batch`` shifts tokens (targets [B, T]); ``criterion`` a module averaging the token
      cross-entropy over each sequence's non-padding tokens (``'none'`` -> [B]), so one example is one sequence;
      ``predict`` the next-token argmax, scored per token by a metric that accepts [B, T].
    - *federated client*: the same task, driven by a client loop; the per-example loss is unchanged.

    Args:
        backbone: The network (a plain ``nn.Module``).
        optimizer: A callable ``params -> torch.optim.Optimizer``; in YAML any ``torch.optim`` class with its
            ``init_args``. Only trainable parameters are passed. Default: SGD, lr 0.05.
        lr_scheduler: A callable ``optimizer -> LRScheduler`` (any ``torch.optim.lr_scheduler`` class), or null.
        lr_scheduler_interval: Step the scheduler every ``epoch`` or every optimizer ``step``.
        lr_scheduler_monitor: Metric that ``ReduceLROnPlateau`` watches.
    """

    criterion: nn.Module

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_monitor: str = "val/loss",
    ) -> None:
        super().__init__()
        if not callable(optimizer):
            raise ValueError(
                f"`model.optimizer` must be an optimizer class with its arguments, e.g. "
                f"{{class_path: torch.optim.SGD, init_args: {{lr: 0.1}}}}; got {optimizer!r}. (The strings "
                "sgd/adam/adamw and the keys lr/momentum/weight_decay/lr_schedule are gone: put them in init_args.)"
            )
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"`model.lr_scheduler_interval` must be 'epoch' or 'step', got {lr_scheduler_interval!r}")
        # Callables are not hyper-parameters a checkpoint can hold; the CLI's config.yaml records them.
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor

    # ---------------------------------------------------------------- what a task family supplies
    @override
    def forward(self, x: Any) -> Tensor:
        return self.backbone(x)

    def forward_batch(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(outputs, targets, group)`` of a batch ``(x, y, group)``; ``group`` is [B] or [B, A]."""
        x, y, group = batch
        return self(x), y, group

    def predict(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``(preds, probs)`` from the outputs of :meth:`forward_batch`."""
        raise NotImplementedError(f"{type(self).__name__} must implement `predict(outputs) -> (preds, probs)`")

    def per_example_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """One loss per example [B]: ``self.criterion`` with reduction ``'none'``, extra dimensions averaged.

        Calls the criterion's ``forward`` (not ``__call__``), so hooks on the module (ghost clipping) do not fire.
        """
        criterion = self.criterion
        reduction = getattr(criterion, "reduction", None)
        if reduction is None:
            raise TypeError(
                f"{type(self).__name__}.criterion ({type(criterion).__name__}) has no `reduction` attribute; give it "
                "one ('mean' for training, 'none' per example) or override `per_example_loss`."
            )
        setattr(criterion, "reduction", "none")  # nn.Module types attributes as Tensor | Module
        try:
            loss = criterion.forward(outputs, targets)
        finally:
            setattr(criterion, "reduction", reduction)
        return loss.reshape(len(loss), -1).mean(dim=1) if loss.dim() > 1 else loss

    # ---------------------------------------------------------------- steps
    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        outputs, targets, _group = self.forward_batch(batch)  # B may be 0 under Poisson sampling
        loss = self.criterion(outputs, targets)  # exactly this: ghost clipping hooks the criterion
        with torch.no_grad():
            example_loss = self.per_example_loss(outputs.detach(), targets)  # [B], for diagnostics
        batch_size = len(targets)
        if batch_size > 0:
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, batch_size=batch_size)
            preds, _ = self.predict(outputs.detach())
            acc = (preds == targets).float().mean()
            self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=batch_size)
        return {"loss": loss, "example_loss": example_loss}

    def _eval_step(self, batch: Any, stage: str) -> dict[str, Tensor]:
        outputs, targets, group = self.forward_batch(batch)
        loss = self.per_example_loss(outputs, targets)  # [B], for group losses
        preds, probs = self.predict(outputs)
        batch_size = len(targets)
        self.log(f"{stage}/loss", loss.mean(), on_epoch=True, batch_size=batch_size, sync_dist=True)
        acc = (preds == targets).float().mean()
        self.log(f"{stage}/acc", acc, on_epoch=True, prog_bar=True, batch_size=batch_size, sync_dist=True)
        return {"preds": preds, "probs": probs, "y": targets, "group": group, "loss": loss}

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "test")

    # ---------------------------------------------------------------- optimisation
    @override
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self).__name__} has no trainable parameters to optimise")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.lr_scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}
