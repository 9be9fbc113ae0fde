"""Writing a baseline run in the format of ``dplit fit``: ``RUN/version_N/{metrics.csv,config.yaml,summary.json}``."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import yaml

GROUP = "/group="


def next_version_dir(root: Path) -> Path:
    """``root/version_N`` with N one above the largest existing version (0 for a new folder)."""
    taken = [int(m.group(1)) for d in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", d.name))]
    return root / f"version_{max(taken, default=-1) + 1}"


def write_run(
    root: Path, metrics: dict[str, float], config: dict[str, Any], train_counts: dict[str, int] | None = None
) -> Path:
    """Writes one completed run (one metrics row holding the val/ and test/ evaluations); returns its folder.

    ``summary.json`` says ``kind: fit`` and ``status: completed`` (so ``dplit report`` picks it like a finished
    training run), ``privacy: null`` and ``differentially_private: false``.
    """
    run = next_version_dir(root)
    run.mkdir(parents=True)
    row = {"epoch": 0, "step": 0, **metrics}
    with (run / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    split = "test" if any(k.startswith(f"test/acc{GROUP}") for k in metrics) else "val"
    groups: dict[str, dict[str, float | None]] = {
        key.split(GROUP, 1)[1]: {"acc": value, "count": metrics.get(f"{split}/count{GROUP}{key.split(GROUP, 1)[1]}")}
        for key, value in metrics.items()
        if key.startswith(f"{split}/acc{GROUP}")
    }
    worst = min(groups, key=lambda g: groups[g]["acc"] or 0.0) if groups else None
    summary: dict[str, Any] = {
        "kind": "fit",
        "status": "completed",
        "stop_reason": "baseline fitted",
        "error": None,
        "privacy": None,
        "differentially_private": False,
        "split": split,
        "acc": metrics.get(f"{split}/acc"),
        "count": sum(g["count"] or 0 for g in groups.values()),
        "groups": groups,
        "train_counts": train_counts or {},
        "worst_group": worst,
        "worst_group_acc": metrics.get(f"{split}/worst_group_acc"),
        "acc_gap": metrics.get(f"{split}/acc_gap"),
        "run_dir": str(run),
        "checkpoint": None,
        "wandb": [],
        "config": [],
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return run


__all__ = ["next_version_dir", "write_run"]
