"""Keeping a sweep's finished cells beyond the machine that trained them.

A sweep folder (``OUT``) usually lives on scratch disk that goes away with the machine (a cluster job's node, a
session's sandbox). Its checkpoints are large, but what ``dplit report`` reads is small: each completed fit's
``metrics.csv``, ``config.yaml`` and ``summary.json``, plus the privacy ledger. ``archive_cells`` copies every
completed cell's folder, without checkpoints, into ``DEST`` (e.g. a folder kept under version control), with an
``archive.json`` recording which version completed and the cell's wall time (file times do not survive version
control). ``restore_cells`` copies archived cells back into a (new) ``OUT`` wherever that cell has no completed fit,
so the sweep skips them and the report reads them beside the cells trained since.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from dplit.privacy.ledger import LEDGER_PREFIX
from dplit.sweep.run import RUNNING, completed_run, is_running, versions

ARCHIVE = "archive.json"
SKIPPED_SUFFIXES = (".ckpt", ".pt", ".pth")


def _ignore(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n.endswith(SKIPPED_SUFFIXES) or n == RUNNING or n == "checkpoints"}


def cell_minutes(folder: Path) -> float | None:
    """Wall minutes of a completed cell: the recorded figure of an archived cell, else the sum over its runs (a
    stopped attempt and the run that resumed it), each from its ``hparams.yaml`` (written when the fit starts) to the
    newest file in its folder other than the privacy ledger (one ledger per cell: a run that resumes a stopped attempt
    keeps writing it in that attempt's folder). None when the cell has no completed fit."""
    record = folder / ARCHIVE
    if record.is_file():
        minutes = json.loads(record.read_text()).get("minutes")
        return None if minutes is None else float(minutes)
    if completed_run(folder) is None:
        return None
    total = 0.0
    for run in versions(folder):
        start = run / "hparams.yaml"
        stamps = [f.stat().st_mtime for f in run.rglob("*") if f.is_file() and not f.name.startswith(LEDGER_PREFIX)]
        if start.is_file() and stamps:
            total += max(stamps) - start.stat().st_mtime
    return total / 60


def archive_cells(out: Path, dest: Path) -> list[str]:
    """Copies each cell of ``out`` that has a completed fit, without checkpoints, to ``dest/<cell>`` (replacing an
    older copy) and writes its ``archive.json``. Returns the cells archived."""
    done: list[str] = []
    if not out.is_dir():
        return done
    for cell in sorted(p for p in out.iterdir() if p.is_dir()):
        run = completed_run(cell)
        if run is None or (cell / ARCHIVE).is_file() and (dest / cell.name / ARCHIVE).is_file():
            continue  # not finished, or restored from this archive (already there)
        kept = dest / cell.name / ARCHIVE
        if kept.is_file() and json.loads(kept.read_text()).get("completed_version") == run.name:
            continue  # archived before (a completed cell is never trained again)
        record: dict[str, Any] = {
            "completed_version": run.name,
            "minutes": cell_minutes(cell),
            "archived": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "from": str(out.resolve() / cell.name),
        }
        target = dest / cell.name
        staging = dest / f".{cell.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(cell, staging, ignore=_ignore)
        (staging / ARCHIVE).write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # a copy cut short never looks like an archived cell
        done.append(cell.name)
    return done


def restore_cells(dest: Path, out: Path) -> list[str]:
    """Copies each archived cell of ``dest`` into ``out`` where ``out`` has no completed fit of that cell and no sweep
    is training it (a stopped partial attempt there is replaced). Returns the cells restored."""
    restored: list[str] = []
    if not dest.is_dir():
        return restored
    for cell in sorted(p for p in dest.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (cell / ARCHIVE).is_file() or completed_run(cell) is None:
            continue
        target = out / cell.name
        if completed_run(target) is not None or is_running(target):
            continue
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(cell, target)
        restored.append(cell.name)
    return restored
