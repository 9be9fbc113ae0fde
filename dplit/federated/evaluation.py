"""Per-user-group evaluation of the global model, under SubgroupMetrics' metric names, and the run folder.

Every user's held-out samples are scored by the global model (centrally, like a validation epoch; these metrics
read user data and are NOT differentially private, exactly as SubgroupMetrics' are not). An example's groups are
its user's buckets: by data size (``size``) and by vocabulary size (``vocab``). The primary bucketing is logged
under the plain names, ``val/acc/group=<bucket>``, ``val/worst_group_acc``, ``val/acc_gap``, the other as
``val/acc/<attr>=<bucket>``, and, as SubgroupMetrics does with several attributes, every summary also per
attribute: ``val/worst_group_acc/size``, ``val/acc_gap/vocab``. Accuracy is next-token accuracy for Shakespeare
and Reddit. ``val/output_vocab`` is the number of distinct classes (words, characters) the model predicts on the
held-out data: the seed paper's "output vocabulary" statistic (a DP model predicting fewer distinct words).

The run folder (``output_dir/version_N``) holds ``metrics.csv`` (one row per round), ``config.yaml`` and
``summary.json``: what ``dplit report`` reads.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from dplit.federated.data import FederatedData
from dplit.metrics import GroupMetrics, flatten_group_metrics
from dplit.tasks.base import GroupedTask


@torch.no_grad()
def evaluate(task: GroupedTask, data: FederatedData, primary: str, batch_size: int = 512) -> dict[str, float]:
    """``val/...`` metrics of ``task`` on every user's held-out samples, per bucket of each attribute."""
    attrs = [primary] + [a for a in data.buckets if a != primary]
    x = torch.cat([u.x_eval for u in data.users])  # [M, T]
    y = torch.cat([u.y_eval for u in data.users])  # [M]
    groups = torch.tensor(
        [[data.user_bucket[a][i] for a in attrs] for i, u in enumerate(data.users) for _ in range(len(u.y_eval))],
        dtype=torch.long,
    ).reshape(-1, len(attrs))  # [M, A]
    metrics = {
        a: GroupMetrics(len(data.buckets[a]), data.num_classes, compute_auc=data.num_classes == 2) for a in attrs
    }
    task.eval()
    loss_sum, correct = 0.0, 0
    predicted: set[int] = set()
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        outputs = task(xb)
        loss = task.per_example_loss(outputs, yb)  # [B]
        preds, probs = task.predict(outputs)
        loss_sum, correct = loss_sum + float(loss.sum()), correct + int((preds == yb).sum())
        predicted.update(preds.tolist())
        for col, attr in enumerate(attrs):
            metrics[attr].update(preds, yb, groups[start : start + batch_size, col], loss=loss, probs=probs)
    out = {"val/acc": correct / len(y), "val/loss": loss_sum / len(y), "val/output_vocab": float(len(predicted))}
    for attr in attrs:
        part = flatten_group_metrics(metrics[attr].compute(), data.buckets[attr], "val")
        for key, value in part.items():
            if "/group=" in key:
                out[key if attr == primary else key.replace("/group=", f"/{attr}=")] = value
            else:
                if attr == primary:
                    out[key] = value
                out[f"{key}/{attr}"] = value
    return out


class RunWriter:
    """Writes ``metrics.csv`` (rewritten each round: columns grow as groups appear), ``config.yaml``, ``summary.json``.

    Args:
        output_dir: the run's save dir; this run goes to the next free ``version_N`` under it.
    """

    def __init__(self, output_dir: str | Path, config: dict[str, Any]) -> None:
        root = Path(output_dir)
        root.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for d in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", d.name))]
        self.dir = root / f"version_{max(taken, default=-1) + 1}"
        self.dir.mkdir()
        (self.dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.rows: list[dict[str, float]] = []

    def log(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        columns: list[str] = []
        for r in self.rows:
            columns += [k for k in r if k not in columns]
        tmp = self.dir / "metrics.csv.tmp"
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.dir / "metrics.csv")

    def summary(self, summary: dict[str, Any]) -> None:
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


__all__ = ["RunWriter", "evaluate"]
