"""CausalLMTask: next-token cross-entropy on packed blocks, privacy units of K rows, per-group perplexity.

Batches are ``(ids, labels, group)``: ``ids`` and ``labels`` int64 [B, K, T] (``labels`` -100 at padding), one
``group`` id per unit [B]. The task flattens them unit-major into B*K rows [B*K, T] (unit 0's K rows first), as
the privacy core expects of multi-row privacy units. Knows nothing about DP.

Loss: each row's loss is the mean next-token cross-entropy over its labelled tokens; the training loss is the mean
over the B*K rows, which equals the mean over units of each unit's mean row loss (every unit has K rows). What is
clipped under DP is, per unit, the mean of its K rows' gradients (the privacy core's rule), i.e. the gradient of
the unit's mean loss; a unit's whole contribution is bounded by ``max_grad_norm`` however many rows (original,
counterfactual) it has.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from dplit.data.lm_corpus import IGNORE_INDEX
from dplit.tasks.base import GroupedTask, default_optimizer

__all__ = ["CausalLMTask", "TokenCrossEntropy", "token_nll"]


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(summed next-token NLL [N], labelled next-token count [N])`` of logits [N, T, V] and labels [N, T]."""
    target = labels[:, 1:]  # [N, T-1]: token t+1 is predicted at position t
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
    return nll.sum(1), (target != IGNORE_INDEX).sum(1)


class TokenCrossEntropy(nn.Module):
    """Next-token cross-entropy of logits [N, T, V] against labels [N, T] (-100 ignored), one value per row.

    ``reduction='none'`` gives [N]: each row's mean over its labelled next tokens (0 for a row with none);
    ``'mean'`` the mean of those over rows; ``'sum'`` their sum.
    """

    def __init__(self, reduction: Literal["mean", "none", "sum"] = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        total, count = token_nll(logits, labels)
        rows = total / count.clamp(min=1)  # [N]
        if self.reduction == "none":
            return rows
        return rows.sum() if self.reduction == "sum" else rows.mean() if len(rows) else rows.sum()


class CausalLMTask(GroupedTask):
    """Fine-tunes a causal LM (:class:`~dplit.models.CausalLM`) on packed blocks with group ids.

    Logs ``train/loss``; at validation/test, token-weighted over the labelled next tokens, ``{stage}/loss`` (mean
    NLL), ``{stage}/ppl`` (its exp) and ``{stage}/acc`` (next-token argmax accuracy), the same per group
    (``{stage}/loss/group=<name>``, ...) and ``{stage}/ppl_gap`` (max - min over groups); group names come from
    the DataModule's ``group_names``. Evaluation steps return per-unit ``loss`` and ``group`` (not the ``preds`` of
    :class:`~dplit.callbacks.SubgroupMetrics`, which is for classifiers: this task logs its groups itself).

    Args:
        backbone: The causal LM (token ids [N, T] -> logits [N, T, V]).
        optimizer: Any ``torch.optim`` class with its ``init_args`` (Adam is DP-Adam under the DP callback).
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
        self.criterion = TokenCrossEntropy()
        self._sums: dict[str, list[Tensor]] = {}

    @override
    def forward_batch(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits [B*K, T, V], labels [B*K, T], group [B])``, rows unit-major."""
        ids, labels, group = batch
        if ids.dim() == 2:  # [B, T]: one row a unit
            ids, labels = ids.unsqueeze(1), labels.unsqueeze(1)
        rows = ids.reshape(-1, ids.shape[-1])  # [B*K, T]: unit 0's K rows, then unit 1's
        return self(rows), labels.reshape(-1, labels.shape[-1]), group

    @override
    def predict(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """Next-token argmax [N, T] and probabilities [N, T, V]."""
        probs = outputs.softmax(-1)
        return probs.argmax(-1), probs

    def unit_loss(self, outputs: Tensor, targets: Tensor, units: int) -> Tensor:
        """Per-unit loss [B]: the mean of its K rows' losses."""
        rows = self.per_example_loss(outputs, targets)  # [B*K]
        return rows.reshape(units, -1).mean(1) if units else rows

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        if len(batch[0]) == 0:  # an empty Poisson batch: no rows to run; the privacy core adds the noise only
            zero = sum((p.sum() for p in self.parameters() if p.requires_grad), torch.zeros((), device=self.device))
            return {"loss": zero * 0.0, "example_loss": batch[0].new_zeros(0, dtype=torch.float32)}
        outputs, targets, group = self.forward_batch(batch)
        loss = self.criterion(outputs, targets)  # exactly this: ghost clipping hooks the criterion
        with torch.no_grad():
            example_loss = self.unit_loss(outputs.detach(), targets, len(group))  # [B], diagnostics
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, batch_size=len(group))
        return {"loss": loss, "example_loss": example_loss}

    def _eval_step(self, batch: Any, stage: str) -> dict[str, Tensor]:
        outputs, targets, group = self.forward_batch(batch)
        primary = group if group.dim() == 1 else group[:, 0]
        total, count = token_nll(outputs, targets)  # per row
        units = len(primary)
        total, count = total.reshape(units, -1).sum(1), count.reshape(units, -1).sum(1)  # per unit
        hits = (outputs[:, :-1].argmax(-1) == targets[:, 1:]).sum(1).reshape(units, -1).sum(1)  # correct next tokens
        num_groups = len(self._group_names())
        sums = self._sums.setdefault(stage, [torch.zeros(num_groups, dtype=torch.float64, device=total.device)] * 3)
        for i, value in enumerate((total, count, hits)):
            sums[i] = sums[i].index_add(0, primary, value.double())
        loss = total / count.clamp(min=1)
        return {"loss": loss, "group": group}

    def _group_names(self) -> list[str]:
        try:
            names = getattr(getattr(self.trainer, "datamodule", None), "group_names", None)
        except RuntimeError:  # not attached to a trainer
            names = None
        return list(names) if names else ["all"]

    def _log_groups(self, stage: str) -> None:
        sums = self._sums.pop(stage, None)
        if sums is None:
            return
        total, count, hits = (self.trainer.strategy.reduce(s, reduce_op="sum") for s in sums)
        names = self._group_names()
        metrics = {f"{stage}/loss": total.sum() / count.sum().clamp(min=1),
                   f"{stage}/acc": hits.sum() / count.sum().clamp(min=1)}  # fmt: skip
        ppl = {}
        for g, name in enumerate(names):
            if count[g] > 0:
                metrics[f"{stage}/loss/group={name}"] = total[g] / count[g]
                ppl[name] = torch.exp(total[g] / count[g])
                metrics[f"{stage}/ppl/group={name}"] = ppl[name]
                metrics[f"{stage}/acc/group={name}"] = hits[g] / count[g]
        metrics[f"{stage}/ppl"] = torch.exp(metrics[f"{stage}/loss"])
        if len(ppl) > 1:
            metrics[f"{stage}/ppl_gap"] = max(ppl.values()) - min(ppl.values())
        self.log_dict({k: v.float() for k, v in metrics.items()}, sync_dist=False)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_groups("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_groups("test")
