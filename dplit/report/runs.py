"""Reading runs written by ``dplit fit``: ``RUN/version_N/{metrics.csv,config.yaml,summary.json}``.

``metrics.csv`` comes from the CSV logger, ``config.yaml`` from LightningCLI and ``summary.json`` from
``dplit.callbacks.RunSummary``. Which ``version_N`` of a folder is read is decided in ``dplit.report.select``.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dplit.report.select import ReportError, find_version_dir, read_summary

GROUP_MARK = "/group="
SPLITS = ("val", "test")
_VERSION = re.compile(r"version_(\d+)")


def natural_key(name: str) -> list[Any]:
    """Sort key that puts ``2`` before ``10`` (group names are often numbers)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def read_metrics(metrics_csv: Path) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Reads a CSVLogger ``metrics.csv`` (one row per logging call, empty cells = not logged in that row).

    Returns the last logged value of every column, and per split (``val``, ``test``) the ``<split>/...`` values of
    the last row that logged per-group accuracies: the last evaluation, in which a group without examples is absent
    (SubgroupMetrics reports it missing, not 0) rather than carried over from an earlier epoch.
    """
    last: dict[str, float] = {}
    evals: dict[str, dict[str, float]] = {}
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            values: dict[str, float] = {}
            for key, cell in row.items():
                if key is None or cell is None or cell.strip() == "":
                    continue
                try:
                    values[key] = float(cell)
                except ValueError as exc:
                    raise ReportError(f"{metrics_csv}: column {key!r} holds {cell!r}, not a number") from exc
            last.update(values)
            for split in SPLITS:
                if any(key.startswith(f"{split}/acc{GROUP_MARK}") for key in values):
                    evals[split] = {k: v for k, v in values.items() if k.startswith(f"{split}/")}
    return last, evals


@dataclass
class Run:
    """One run: its last logged metric values, its last evaluation per split, and its LightningCLI config."""

    path: Path
    last: dict[str, float]
    evals: dict[str, dict[str, float]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    """``summary.json`` written by RunSummary (empty for runs written before it existed)."""

    @property
    def root(self) -> Path:
        """The run's save dir (the parent of ``version_N``), where ``wandb/`` lives."""
        return self.path.parent if _VERSION.fullmatch(self.path.name) else self.path

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed_everything")
        return int(seed) if isinstance(seed, int | float) and not isinstance(seed, bool) else None

    @property
    def data_class(self) -> str | None:
        data = self.config.get("data")
        return data.get("class_path") if isinstance(data, dict) else None

    def _trainer_list(self, key: str) -> list[dict[str, Any]]:
        trainer = self.config.get("trainer") or {}
        items = trainer.get(key) if isinstance(trainer, dict) else None
        items = [items] if isinstance(items, dict) else items if isinstance(items, list) else []
        return [item for item in items if isinstance(item, dict)]

    @property
    def privacy_args(self) -> dict[str, Any] | None:
        """``init_args`` of the config's ``DifferentialPrivacy`` callback; None for a non-DP config."""
        for cb in self._trainer_list("callbacks"):
            if str(cb.get("class_path", "")).rsplit(".", 1)[-1] == "DifferentialPrivacy":
                return dict(cb.get("init_args") or {})
        return None

    @property
    def wandb_logger_args(self) -> dict[str, Any]:
        """``init_args`` of the config's W&B logger (empty when there is none)."""
        for logger in self._trainer_list("logger"):
            if str(logger.get("class_path", "")).endswith("WandbLogger"):
                return dict(logger.get("init_args") or {})
        return {}

    @property
    def is_dp(self) -> bool:
        """A DP run: ``DifferentialPrivacy`` in the config's callbacks, or ``privacy/epsilon`` in its metrics."""
        return self.privacy_args is not None or "privacy/epsilon" in self.last

    @property
    def epsilon(self) -> float | None:
        """The last logged ``privacy/epsilon``; for an evaluation run, the epsilon its checkpoint's training spent."""
        epsilon = self.last.get("privacy/epsilon")
        if epsilon is None:
            epsilon = (self.summary.get("privacy") or {}).get("epsilon")
        return float(epsilon) if epsilon is not None else None

    def train_counts(self) -> dict[str, float]:
        """Training examples per group (from ``summary.json``; empty when unknown)."""
        counts = self.summary.get("train_counts") or {}
        return {str(g): float(c) for g, c in counts.items() if c is not None}

    @property
    def delta(self) -> float | None:
        delta = self.last.get("privacy/delta", (self.privacy_args or {}).get("delta"))
        return float(delta) if delta is not None else None

    def groups(self, split: str) -> list[str]:
        """Names of the groups in the last ``split`` evaluation."""
        prefix = f"{split}/acc{GROUP_MARK}"
        return [key[len(prefix) :] for key in self.evals.get(split, {}) if key.startswith(prefix)]

    def group_acc(self, split: str) -> dict[str, float]:
        return {g: self.evals[split][f"{split}/acc{GROUP_MARK}{g}"] for g in self.groups(split)}

    def group_auc(self, split: str) -> dict[str, float]:
        """Per-group ROC AUC of the last ``split`` evaluation (``<split>/auc/group=<g>``: binary tasks, and the
        macro AUC of multi-label tasks); groups whose AUC is undefined (NaN: one class only) are left out."""
        prefix = f"{split}/auc{GROUP_MARK}"
        return {
            key[len(prefix) :]: v
            for key, v in self.evals.get(split, {}).items()
            if key.startswith(prefix) and not math.isnan(v)
        }

    def group_count(self, split: str) -> dict[str, float]:
        prefix = f"{split}/count{GROUP_MARK}"
        return {key[len(prefix) :]: v for key, v in self.evals.get(split, {}).items() if key.startswith(prefix)}

    def overall_acc(self, split: str) -> float | None:
        """``<split>/acc`` of the last evaluation (else its last logged value)."""
        return self.evals.get(split, {}).get(f"{split}/acc", self.last.get(f"{split}/acc"))

    @property
    def setting_key(self) -> str:
        """The privacy settings without the seed: runs sharing it (and their epsilon) are seeds of one setting."""
        args = {k: v for k, v in (self.privacy_args or {}).items() if k != "seed"}
        return json.dumps(args, sort_keys=True, default=str)


def load_run(path: Path) -> Run:
    """Reads a run directory (RUN or RUN/version_N); raises ReportError saying what is missing and how to fix it."""
    version_dir = find_version_dir(path)
    metrics = version_dir / "metrics.csv"
    if not metrics.is_file():
        raise ReportError(
            f"{path}: no metrics.csv (looked in {version_dir}): pass a run directory written by `dplit fit` with "
            "a lightning.pytorch.loggers.CSVLogger in trainer.logger (RUN or RUN/version_N)"
        )
    last, evals = read_metrics(metrics)
    if not any(GROUP_MARK in key for key in last):
        raise ReportError(
            f"{path}: no per-group metrics: add dplit.callbacks.SubgroupMetrics to the config (trainer.callbacks) "
            f"and train again ({metrics} has no .../group=<name> columns)"
        )
    config: dict[str, Any] = {}
    config_file = version_dir / "config.yaml"
    if config_file.is_file():
        try:
            loaded = yaml.safe_load(config_file.read_text())
        except yaml.YAMLError as exc:
            raise ReportError(f"{config_file}: not valid YAML ({exc}); restore the config `dplit fit` wrote") from exc
        config = loaded if isinstance(loaded, dict) else {}
    return Run(path=version_dir, last=last, evals=evals, config=config, summary=read_summary(version_dir))


def choose_split(runs: list[Run], requested: str) -> str:
    """``val``/``test`` as requested (every run must have it); ``auto``: ``test`` if every run has it, else ``val``."""
    if requested == "auto":
        requested = "test" if all(r.groups("test") for r in runs) else "val"
    for run in runs:
        if not run.groups(requested):
            other = [s for s in SPLITS if s != requested and run.groups(s)]
            fix = f"use --split {other[0]}" if other else "log per-group metrics with dplit.callbacks.SubgroupMetrics"
            if requested == "test" and other:
                fix = f"{_test_run_hint(run)}, or {fix}"
            raise ReportError(f"{run.path}: no per-group {requested}/ metrics ({requested}/acc/group=...): {fix}")
    return requested


def _test_run_hint(run: Run) -> str:
    """How to get test metrics for a training run: its sibling ``dplit test`` run, or the command to make one."""
    siblings = [d for d in sorted(run.path.parent.glob("version_*")) if read_summary(d).get("kind") == "test"]
    if siblings:
        return f"`dplit test` writes its own run folder: pass that one ({', '.join(map(str, siblings))})"
    ckpt = run.summary.get("checkpoint") or f"{run.path}/checkpoints/<file>.ckpt"
    return (
        f"evaluate it with `dplit test --config {run.path / 'config.yaml'} --ckpt_path {ckpt}` and pass the "
        "folder that run writes"
    )


def check_same_task(runs: list[Run], split: str) -> None:
    """All runs must share the data ``class_path`` and the group names; raises ReportError ("mismatched tasks")."""
    ref = runs[0]
    for run in runs[1:]:
        same_data = ref.data_class is None or run.data_class is None or ref.data_class == run.data_class
        if not same_data or set(run.groups(split)) != set(ref.groups(split)):
            describe = [
                f"{r.path} has data {r.data_class} with groups {sorted(r.groups(split), key=natural_key)}"
                for r in (ref, run)
            ]
            raise ReportError(
                f"mismatched tasks: {describe[0]}, but {describe[1]}; compare runs of one task (same "
                "data.class_path and group names, e.g. configs/<task>_dp.yaml with configs/<task>_nodp.yaml; a group "
                "without examples in a run's last evaluation is not logged)"
            )


def group_settings(runs: list[Run], rel_tol: float = 0.05) -> list[list[Run]]:
    """Splits DP runs into settings: same privacy config (seed aside) and final epsilons within ``rel_tol``.

    Settings come back sorted by epsilon (unknown epsilon last); each holds the seeds of one setting.
    """
    by_key: dict[str, list[Run]] = {}
    for run in runs:
        by_key.setdefault(run.setting_key, []).append(run)
    settings: list[list[Run]] = []
    for members in by_key.values():
        current: list[Run] = []
        for run in sorted(members, key=lambda r: math.inf if r.epsilon is None else r.epsilon):
            first = current[0].epsilon if current else None
            if current and (
                (first is None and run.epsilon is None)
                or (first is not None and run.epsilon is not None and run.epsilon <= first * (1 + rel_tol) + 1e-12)
            ):
                current.append(run)
            else:
                current = [run]
                settings.append(current)
    return sorted(settings, key=lambda s: math.inf if s[0].epsilon is None else s[0].epsilon)


def online_wandb_run(run: Run) -> tuple[str, str, str | None] | None:
    """``(id, project, entity)`` of the run's W&B run if it ran online (``wandb/latest-run`` -> ``run-*``), else None.

    Offline runs (``offline-run-*``) and runs without W&B give None: the report is then not uploaded.
    """
    for base in (run.path, run.root):
        latest = base / "wandb" / "latest-run"
        if latest.exists():
            name = latest.resolve().name
            if not name.startswith("run-"):
                return None
            args = run.wandb_logger_args
            return name.rsplit("-", 1)[-1], args.get("project") or "dplit", args.get("entity")
    return None
