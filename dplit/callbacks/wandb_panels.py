"""W&B panels for subgroup metrics: one live chart per metric with every group, a per-epoch table, run summary."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

PANEL_METRICS = ("acc", "loss", "tpr", "fpr", "auc")


class WandbGroupPanels:
    """Keeps the per-group history and re-logs it to every W&B logger at each evaluation epoch (rank zero only).

    Scalars keep their stable names (``val/acc/group=<name>``) with ``epoch`` as their x-axis; in addition
    ``<stage>/<metric>_by_group`` is a line chart with one line per group (all groups in one panel, updated live),
    ``<stage>/groups`` a table of the epoch's group metrics, and the run summary holds the final epsilon.
    """

    def __init__(self) -> None:
        # (stage, metric) -> group -> [(epoch, value)]
        self.history: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
        self._defined: set[int] = set()

    def update(self, trainer: L.Trainer, stage: str, flat: dict[str, float], groups: list[str], dp: Any) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        rows: dict[str, dict[str, float]] = defaultdict(dict)
        for key, value in flat.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[2].startswith("group="):
                group = parts[2][len("group=") :]
                self.history[(stage, parts[1])][group].append((epoch, value))
                rows[group][parts[1]] = value
        import wandb

        payload: dict[str, Any] = {}
        for (st, metric), series in self.history.items():
            if st != stage or metric not in PANEL_METRICS:
                continue
            names = [g for g in groups if g in series]
            payload[f"{stage}/{metric}_by_group"] = wandb.plot.line_series(
                xs=[[e for e, _ in series[g]] for g in names],
                ys=[[v for _, v in series[g]] for g in names],
                keys=names,
                title=f"{stage} {metric} by group",
                xname="epoch",
            )
        columns: list[Any] = ["epoch", "group"] + sorted({m for r in rows.values() for m in r})
        table = [[epoch, g] + [rows[g].get(c) for c in columns[2:]] for g in groups if g in rows]
        payload[f"{stage}/groups"] = wandb.Table(columns=columns, data=table)
        payload["trainer/global_step"] = trainer.global_step
        for lg in loggers:
            exp = lg.experiment
            if id(exp) not in self._defined:
                exp.define_metric("epoch")
                for prefix in ("val", "test", "diag"):
                    exp.define_metric(f"{prefix}/*", step_metric="epoch")
                self._defined.add(id(exp))
            exp.log(payload)
            for key in (f"{stage}/worst_group_acc", f"{stage}/acc_gap"):
                if key in flat:
                    exp.summary[key] = flat[key]
            if dp is not None and getattr(dp, "accountant", None) is not None:
                exp.summary["privacy/epsilon"] = dp.epsilon
                exp.summary["privacy/delta"] = dp.config.delta
