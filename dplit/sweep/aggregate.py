"""A sweep's runs aggregated per method and budget: mean and Student t interval across seeds (``scipy.stats``).

Runs are read with the report's own readers (``dplit.report.runs.load_run``: metrics.csv, config.yaml,
summary.json of the cell's completed ``version_N``). A setting is one method at one grid budget (target epsilon, or
fixed noise multiplier); its seeds give the intervals. The ``nodp`` cells are the reference. Cells without a
completed, readable run are kept as ``Incomplete`` with the reason, never dropped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dplit.report.runs import Run, load_run, natural_key
from dplit.report.select import ReportError
from dplit.report.stats import CONFIDENCE, Estimate, mean_ci
from dplit.sweep.run import completed_run, folder_status
from dplit.sweep.spec import NODP


@dataclass
class CellRun:
    """One cell of the manifest and its completed run (None, with ``problem``, when it has none)."""

    name: str
    method: str
    seed: int | None
    epsilon: float | None
    noise_multiplier: float | None
    run: Run | None
    problem: str | None = None


@dataclass
class Setting:
    """One method at one grid budget, across seeds."""

    method: str
    target_epsilon: float | None
    noise_multiplier: float | None
    cells: list[str]
    seeds: list[int | None]
    epsilon: Estimate | None
    """The epsilon the runs reached (``privacy/epsilon``); None for the non-DP reference."""
    overall: Estimate | None
    worst: Estimate
    """Worst-group accuracy: each seed's lowest group accuracy, then mean and interval across seeds."""
    groups: dict[str, Estimate] = field(default_factory=dict)

    @property
    def is_reference(self) -> bool:
        return self.method == NODP

    @property
    def x(self) -> float | None:
        """Where the setting sits on an epsilon axis: the grid's target epsilon, else the mean reached epsilon."""
        return self.target_epsilon if self.target_epsilon is not None else self.epsilon.mean if self.epsilon else None

    @property
    def label(self) -> str:
        if self.is_reference:
            return "non-DP"
        if self.target_epsilon is not None:
            return f"{self.method} ε={self.target_epsilon:g}"
        if self.noise_multiplier is not None:
            return f"{self.method} σ={self.noise_multiplier:g}"
        return self.method


def read_cells(out: Path, entries: list[dict[str, Any]]) -> list[CellRun]:
    """The manifest's cells with their runs, read from ``out/<cell>/`` (the folder given to the report, so a moved
    sweep still reads)."""
    cells: list[CellRun] = []
    for entry in entries:
        name = str(entry["name"])
        folder = out / name
        run: Run | None = None
        problem: str | None = None
        version = completed_run(folder)
        if version is None:
            problem = cell_status_from_folder(folder)
        else:
            try:
                run = load_run(version)
            except ReportError as exc:
                problem = f"completed but unreadable: {exc}"
        cells.append(
            CellRun(
                name,
                str(entry["method"]),
                entry.get("seed"),
                entry.get("epsilon"),
                entry.get("noise_multiplier"),
                run,
                problem,
            )
        )
    return cells


def cell_status_from_folder(folder: Path) -> str:
    """Why a cell has no completed run: pending (never ran) or failed (with the run's error)."""
    status = folder_status(folder)
    if status["status"] == "pending":
        return "pending: not run yet (rerun `dplit sweep` to run it)"
    if status["status"] == "running":
        return "running: a sweep process is training it now"
    return f"failed: {status.get('error')} (rerun `dplit sweep` to retry it)"


def _estimate_groups(runs: list[Run], split: str) -> dict[str, Estimate]:
    groups = sorted(runs[0].groups(split), key=natural_key)
    return {g: mean_ci([r.group_acc(split)[g] for r in runs]) for g in groups}


def aggregate(cells: list[CellRun], split: str, confidence: float = CONFIDENCE) -> list[Setting]:
    """Settings (the non-DP reference first, then by method in grid order and budget), from the completed cells."""
    keys: list[tuple[str, float | None, float | None]] = []
    members: dict[tuple[str, float | None, float | None], list[CellRun]] = {}
    for cell in cells:
        if cell.run is None:
            continue
        key = (cell.method, cell.epsilon, cell.noise_multiplier)
        if key not in members:
            keys.append(key)
        members.setdefault(key, []).append(cell)
    methods = list(dict.fromkeys([NODP] + [k[0] for k in keys]))
    keys.sort(key=lambda k: (methods.index(k[0]), k[1] if k[1] is not None else k[2] if k[2] is not None else math.inf))
    settings: list[Setting] = []
    for key in keys:
        group = members[key]
        runs = [c.run for c in group if c.run is not None]
        eps = [r.epsilon for r in runs if r.epsilon is not None]
        overall = [a for r in runs if (a := r.overall_acc(split)) is not None]
        settings.append(
            Setting(
                method=key[0],
                target_epsilon=key[1],
                noise_multiplier=key[2],
                cells=[c.name for c in group],
                seeds=[c.seed for c in group],
                epsilon=mean_ci(eps, confidence) if eps and key[0] != NODP else None,
                overall=mean_ci(overall, confidence) if overall else None,
                worst=mean_ci([min(r.group_acc(split).values()) for r in runs], confidence),
                groups=_estimate_groups(runs, split),
            )
        )
    return settings


def _est(e: Estimate | None) -> dict[str, Any] | None:
    if e is None:
        return None
    low = e.mean - e.half if e.half is not None else None
    high = e.mean + e.half if e.half is not None else None
    return {"mean": e.mean, "half_width": e.half, "low": low, "high": high, "n": e.n}


def to_json(settings: list[Setting], cells: list[CellRun], split: str, confidence: float = CONFIDENCE) -> dict:
    """The aggregated numbers (fractions, not percent) as a JSON-ready dict."""
    return {
        "split": split,
        "confidence": confidence,
        "interval": "Student t across seeds (scipy.stats.t); half_width null when n=1",
        "settings": [
            {
                "method": s.method,
                "reference": s.is_reference,
                "target_epsilon": s.target_epsilon,
                "noise_multiplier": s.noise_multiplier,
                "epsilon": _est(s.epsilon),
                "n": len(s.cells),
                "seeds": s.seeds,
                "cells": s.cells,
                "overall_acc": _est(s.overall),
                "worst_group_acc": _est(s.worst),
                "group_acc": {g: _est(e) for g, e in s.groups.items()},
            }
            for s in settings
        ],
        "incomplete": [{"cell": c.name, "problem": c.problem} for c in cells if c.run is None],
    }


__all__ = ["CellRun", "Setting", "aggregate", "read_cells", "to_json"]
