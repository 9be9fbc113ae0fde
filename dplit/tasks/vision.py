"""MultiViewClassificationTask: augmentation multiplicity (K augmented views of an item as one privacy unit)."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from typing_extensions import override

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

    Works with the per-sample backends ``hooks`` and ``functorch`` (``ghost`` and ``bookkeeping`` clip rows and refuse
    multi-row units). Arguments as :class:`~dplit.tasks.ClassificationTask`.
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


__all__ = ["MultiViewClassificationTask"]
