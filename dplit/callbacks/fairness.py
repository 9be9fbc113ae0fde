"""SubgroupMetrics: per-group accuracy, loss, rates and gaps every validation/test epoch; DP training diagnostics.

Metric names (stable; see ``dplit.metrics.subgroup``): ``val/acc/group=<name>``, ``val/loss/group=<name>``,
``val/count/group=<name>``, binary tasks also ``val/tpr|fpr|positive_rate|auc/group=<name>``; summaries
``val/worst_group_acc``, ``val/acc_gap``, ``val/equalized_odds_diff``, ``val/demographic_parity_diff``,
``val/auc_gap``, ``val/missing_groups``; the same under ``test/``. Other attributes and their intersections use
``<stage>/<metric>/<attr>=<name>`` and ``<stage>/<metric>/<a>&<b>=<x>&<y>``.

Training diagnostics (``diag/grad_norm|frac_clipped|loss/group=<name>``, per epoch) read the raw per-example
gradient norms of the training data: they are NOT differentially private. Turn them off with
``train_diagnostics: false`` when the logs themselves must be private.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from dplit.callbacks.privacy import DifferentialPrivacy
from dplit.callbacks.wandb_panels import WandbGroupPanels
from dplit.metrics import GroupMetrics, flatten_group_metrics, intersect_groups, intersection_names

log = logging.getLogger(__name__)


class SubgroupMetrics(Callback):
    """Per-group metrics of the DataModule's group attribute(s), every validation and test epoch.

    The DataModule exposes ``group_names`` (primary attribute, batch ``group`` of shape [B]) or, for several
    attributes, ``group_attributes: dict[str, list[str]]`` with batch ``group`` of shape [B, A] (column 0 primary).

    Args:
        intersections: also report every combination of all attributes (e.g. age x gender x race).
        train_diagnostics: per-group pre-clip gradient norm, fraction clipped and loss on training batches, when the
            DifferentialPrivacy callback is active. NOT differentially private.
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
        self._dp: DifferentialPrivacy | None = None
        self._batch_groups: torch.Tensor | None = None
        self._diag: dict[str, torch.Tensor] = {}
        self.last: dict[str, float] = {}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        attributes: dict[str, list[str]] | None = getattr(dm, "group_attributes", None)
        names: list[str] | None = getattr(dm, "group_names", None)
        num_classes = getattr(dm, "num_classes", None)
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
        self.metrics = {
            s: {
                view: GroupMetrics(len(names_), int(num_classes), compute_auc=self.compute_auc).to(pl_module.device)
                for view, (names_, _) in self.views.items()
            }
            for s in ("val", "test")
        }
        dps = [cb for cb in trainer.callbacks if isinstance(cb, DifferentialPrivacy)]  # type: ignore[attr-defined]
        self._dp = dps[0] if dps and self.train_diagnostics and stage == "fit" else None

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
            prefix = stage if view == "group" else f"{stage}@{view}"
            part = flatten_group_metrics(result, names, prefix)
            if view != "group":  # "<stage>/<metric>/<attr>=<name>" for the other attributes
                part = {
                    k.replace(f"{prefix}/", f"{stage}/").replace("/group=", f"/{view}="): v
                    for k, v in part.items()
                    if "/group=" in k
                }
            flat.update(part)
        missing = flat.get(f"{stage}/missing_groups", 0)
        if missing:
            log.warning("%s: %d group(s) had no examples this epoch; reported as missing, not 0.", stage, int(missing))
        if trainer.sanity_checking:
            return
        pl_module.log_dict(flat, on_step=False, on_epoch=True, sync_dist=False)  # already synced by torchmetrics
        self.last.update(flat)
        if self.panels is not None:
            self.panels.update(trainer, stage, flat, self.views["group"][0], self._dp)

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
        if self._dp is not None:
            self._batch_groups = self._view_groups(batch[2], [0]).detach()

    @override
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._dp is None or self._batch_groups is None:
            return
        norms = self._dp.per_sample_grad_norms()
        if norms is None or len(norms) != len(self._batch_groups):
            return
        g, n = self._batch_groups.to(norms.device), len(self.views["group"][0])
        clipped = (norms > self._dp.config.max_grad_norm).double()
        self._accumulate({"norm": norms.double(), "clipped": clipped, "count": torch.ones_like(clipped)}, g, n)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._dp is None or self._batch_groups is None or not isinstance(outputs, dict):
            return
        loss = outputs.get("example_loss")
        if isinstance(loss, torch.Tensor) and len(loss) == len(self._batch_groups):
            g = self._batch_groups.to(loss.device)
            self._accumulate(
                {"loss": loss.double(), "loss_count": torch.ones_like(loss, dtype=torch.double)},
                g,
                len(self.views["group"][0]),
            )

    def _accumulate(self, values: dict[str, torch.Tensor], group: torch.Tensor, num_groups: int) -> None:
        for key, v in values.items():
            sums = torch.zeros(num_groups, dtype=torch.double, device=v.device).index_add_(0, group, v.detach())
            self._diag[key] = self._diag.get(key, torch.zeros_like(sums)) + sums

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._dp is None or not self._diag:
            return
        sums = {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in self._diag.items()}
        self._diag = {}
        names = self.views["group"][0]
        flat: dict[str, float] = {}
        for i, name in enumerate(names):
            count = float(sums.get("count", torch.zeros(len(names)))[i])
            if count > 0:
                flat[f"diag/grad_norm/group={name}"] = float(sums["norm"][i]) / count
                flat[f"diag/frac_clipped/group={name}"] = float(sums["clipped"][i]) / count
            loss_count = float(sums.get("loss_count", torch.zeros(len(names)))[i])
            if loss_count > 0:
                flat[f"diag/loss/group={name}"] = float(sums["loss"][i]) / loss_count
        pl_module.log_dict(flat, on_step=False, on_epoch=True, sync_dist=False)
        self.last.update(flat)
