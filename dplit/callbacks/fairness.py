"""SubgroupMetrics: per-group accuracy, loss, rates and gaps every validation/test epoch; DP training diagnostics.

Metric names (stable; see ``dplit.metrics.subgroup``): ``val/acc/group=<name>``, ``val/loss/group=<name>``,
``val/count/group=<name>``, binary tasks also ``val/tpr|fpr|positive_rate|auc/group=<name>``; summaries
``val/worst_group_acc``, ``val/acc_gap``, ``val/equalized_odds_diff``, ``val/demographic_parity_diff``,
``val/auc_gap``, ``val/missing_groups``; the same under ``test/``. Multi-label tasks (the DataModule exposes
``multilabel_names: list[str]``; targets [B, L]) log label accuracy as ``acc`` and per-group AUC per label and
macro: ``val/auc/group=<name>``, ``val/auc/label=<label>/group=<name>``, ``val/auc_gap``, ``val/worst_group_auc``,
``val/overall_auc`` (see ``dplit.metrics.multilabel``). Other attributes and their intersections use
``<stage>/<metric>/<attr>=<name>`` and ``<stage>/<metric>/<a>&<b>=<x>&<y>``. With several attributes, every
summary is also logged for each attribute (the primary one included) and for the intersection:
``<stage>/<summary>/<attr>``, e.g. ``val/worst_group_acc/race``, ``val/acc_gap/sex&race``.

Training diagnostics (``diag/grad_norm|frac_clipped|loss/group=<name>``, per epoch) read the raw per-example
gradient norms of the training data: they are NOT differentially private. Turn them off with
``train_diagnostics: false`` when the logs themselves must be private. They come from any callback implementing
:class:`~dplit.callbacks.diagnostics.PerExampleGradients` (the DifferentialPrivacy callback does).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from dplit.callbacks.diagnostics import GroupDiagnostics, PerExampleGradients, find_per_example_gradients
from dplit.callbacks.wandb_panels import WandbGroupPanels
from dplit.metrics import GroupMetrics, flatten_group_metrics, intersect_groups, intersection_names

log = logging.getLogger(__name__)


class SubgroupMetrics(Callback):
    """Per-group metrics of the DataModule's group attribute(s), every validation and test epoch.

    The DataModule exposes ``num_classes``, ``multilabel_names`` for a multi-label task, and ``group_names``
    (primary attribute, batch ``group`` of shape [B]) or, for several
    attributes, ``group_attributes: dict[str, list[str]]`` with batch ``group`` of shape [B, A] (column 0 primary).

    Args:
        intersections: also report every combination of all attributes (e.g. age x gender x race).
        train_diagnostics: per-group pre-clip gradient norm, fraction clipped and loss on training batches, when a
            callback exposing per-example gradients (DifferentialPrivacy) is active. NOT differentially private.
        compute_auc: per-group AUC for binary tasks (keeps the epoch's scores in memory).
        wandb_panels: on a W&B logger, one chart per metric with all groups, and a per-epoch group table.
    """

    def __init__(
        self,
        intersections: bool = False,
        train_diagnostics: bool = True,
        compute_auc: bool = True,
        wandb_panels: bool = True,
    ) -> None:
        self.intersections = intersections
        self.train_diagnostics = train_diagnostics
        self.compute_auc = compute_auc
        self.views: dict[str, tuple[list[str], list[int]]] = {}  # view key -> (group names, attribute columns)
        self.metrics: dict[str, dict[str, GroupMetrics]] = {}  # stage -> view -> metric
        self.panels = WandbGroupPanels() if wandb_panels else None
        self._grads: PerExampleGradients | None = None
        self._batch_groups: torch.Tensor | None = None
        self._diag: GroupDiagnostics | None = None
        self._summary_suffix: dict[str, str] = {}  # view -> "/<attr>" suffix of its summaries
        self.last: dict[str, float] = {}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        attributes: dict[str, list[str]] | None = getattr(dm, "group_attributes", None)
        names: list[str] | None = getattr(dm, "group_names", None)
        num_classes = getattr(dm, "num_classes", None)
        label_names: list[str] | None = getattr(dm, "multilabel_names", None)
        if (attributes is None and names is None) or num_classes is None:
            raise ValueError(
                "SubgroupMetrics needs a LightningDataModule exposing `group_names` (or `group_attributes`) and "
                f"`num_classes`; got {type(dm).__name__ if dm is not None else 'no DataModule'}."
            )
        attrs = list(attributes.items()) if attributes else [("group", list(names or []))]
        self.views = {"group": (attrs[0][1], [0])}
        for col, (attr, values) in enumerate(attrs[1:], start=1):
            self.views[attr] = (values, [col])
        if self.intersections and len(attrs) > 1:
            key = "&".join(a for a, _ in attrs)
            self.views[key] = (intersection_names([v for _, v in attrs]), list(range(len(attrs))))
        self._sizes = [len(v) for _, v in attrs]
        self._summary_suffix = {}  # one attribute: its summaries keep the plain names only
        if len(attrs) > 1:
            self._summary_suffix = {view: "/" + (attrs[0][0] if view == "group" else view) for view in self.views}
        self.metrics = {
            s: {
                view: GroupMetrics(
                    len(names_), int(num_classes), compute_auc=self.compute_auc, label_names=label_names
                ).to(pl_module.device)
                for view, (names_, _) in self.views.items()
            }
            for s in ("val", "test")
        }
        grads = find_per_example_gradients(trainer.callbacks)  # type: ignore[attr-defined]
        self._grads = grads if self.train_diagnostics and stage == "fit" else None
        self._diag = GroupDiagnostics(attrs[0][1])

    def _view_groups(self, group: torch.Tensor, columns: list[int]) -> torch.Tensor:
        if group.dim() == 1:
            return group
        if len(columns) == 1:
            return group[:, columns[0]]
        return intersect_groups(group[:, columns], [self._sizes[c] for c in columns])

    # ---------------------------------------------------------------- evaluation
    def _update(self, stage: str, outputs: Any) -> None:
        if not isinstance(outputs, dict) or not {"preds", "y", "group"} <= outputs.keys():
            raise ValueError(
                f"SubgroupMetrics: the task's {stage}_step must return a dict with `preds`, `y`, `group` (and "
                f"`probs`, per-example `loss`); got {type(outputs).__name__}."
            )
        for view, (_, columns) in self.views.items():
            self.metrics[stage][view].update(
                outputs["preds"],
                outputs["y"],
                self._view_groups(outputs["group"], columns),
                loss=outputs.get("loss"),
                probs=outputs.get("probs"),
            )

    def _log_epoch(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flat: dict[str, float] = {}
        for view, (names, _) in self.views.items():
            metric = self.metrics[stage][view]
            result = metric.compute()
            metric.reset()
            part = flatten_group_metrics(result, names, stage)
            summaries = {k: v for k, v in part.items() if "/group=" not in k}
            if view == "group":  # the primary attribute keeps the plain names
                flat.update(part)
            else:  # "<stage>/<metric>/<attr>=<name>" for the other attributes and the intersection
                flat.update({k.replace("/group=", f"/{view}="): v for k, v in part.items() if "/group=" in k})
            suffix = self._summary_suffix.get(view, "")
            if suffix:  # "<stage>/<summary>/<attr>" for every attribute when there are several
                flat.update({f"{k}{suffix}": v for k, v in summaries.items()})
        missing = flat.get(f"{stage}/missing_groups", 0)
        if missing:
            log.warning("%s: %d group(s) had no examples this epoch; reported as missing, not 0.", stage, int(missing))
        if trainer.sanity_checking:
            return
        pl_module.log_dict(flat, on_step=False, on_epoch=True, sync_dist=False)  # already synced by torchmetrics
        self.last.update(flat)
        if self.panels is not None:
            self.panels.update(trainer, stage, flat, self.views["group"][0], self._grads)

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("val", outputs)

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("test", outputs)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_epoch("val", trainer, pl_module)

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_epoch("test", trainer, pl_module)

    # ---------------------------------------------------------------- training diagnostics (NOT private)
    @override
    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._grads is not None:
            self._batch_groups = self._view_groups(batch[2], [0]).detach()

    @override
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._grads is None or self._batch_groups is None or self._diag is None:
            return
        norms = self._grads.per_sample_grad_norms()
        if norms is None or len(norms) != len(self._batch_groups):
            return
        self._diag.add_gradients(norms, self._grads.clip_bound, self._batch_groups)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._grads is None or self._batch_groups is None or self._diag is None or not isinstance(outputs, dict):
            return
        loss = outputs.get("example_loss")
        if isinstance(loss, torch.Tensor) and len(loss) == len(self._batch_groups):
            self._diag.add_losses(loss, self._batch_groups)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._grads is None or self._diag is None or not self._diag:
            return
        flat = self._diag.compute(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        pl_module.log_dict(flat, on_step=False, on_epoch=True, sync_dist=False)
        self.last.update(flat)
