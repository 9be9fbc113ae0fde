"""Running a sweep: each cell as `dplit fit` in its own process, resumable (the loop is ``dplit.sweep.local``).

A cell is done when ``OUT/<cell>/version_N/summary.json`` says a fit ``completed`` (``dplit.callbacks.RunSummary``);
done cells are skipped, so rerunning the same command resumes the sweep. A failed cell is reported, the sweep goes on
with the others and exits non-zero at the end; the next invocation retries it (a new ``version_N``). The manifest
``OUT/sweep.json`` (spec, cells, status) is rewritten after every cell; statuses are read back from the cell folders,
so concurrent cluster tasks, each rewriting it, cannot leave a wrong status behind for long.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dplit.report.select import read_summary
from dplit.sweep.cells import Cell, write_cell_config
from dplit.sweep.spec import SweepSpec

MANIFEST = "sweep.json"
SPEC_FILE = "sweep.yaml"
"""The spec as the sweep ran it (absolute paths), read back by cluster jobs: ``dplit sweep --spec OUT/sweep.yaml``."""
LOG_NAME = "fit.log"
RUNNING = ".running"
HEARTBEAT_S = 60.0
"""The process training a cell refreshes its marker's modification time this often."""
STALE_S = 600.0
"""A marker not refreshed for this long is left over from a process that is gone (a stopped machine, another node
that died): its cell is no longer running, and a sweep trains it again."""
"""Marker file in a cell folder while a sweep process trains it (pid and host)."""
_VERSION = re.compile(r"version_(\d+)")
PYTHON = sys.executable
"""The interpreter that runs each cell's ``-m dplit.cli fit``."""


def versions(cell_dir: Path) -> list[Path]:
    """The cell's ``version_N`` folders, oldest first."""
    if not cell_dir.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in cell_dir.iterdir() if d.is_dir() and (m := _VERSION.fullmatch(d.name))]
    return [d for _, d in sorted(found)]


def completed_run(cell_dir: Path) -> Path | None:
    """The cell's completed fit (``summary.json``: kind fit, status completed), the newest if several; else None."""
    done = [d for d in versions(cell_dir) if _is_completed(read_summary(d))]
    return done[-1] if done else None


def _is_completed(summary: dict[str, Any]) -> bool:
    return summary.get("status") == "completed" and summary.get("kind", "fit") == "fit"


def cell_status(spec: SweepSpec, cell: Cell) -> dict[str, Any]:
    """``{"status": completed|failed|pending, "run": version dir, "error": why}`` read from the cell folder."""
    return folder_status(spec.out / cell.name)


def folder_status(folder: Path) -> dict[str, Any]:
    """``cell_status`` of a cell folder ``OUT/<cell>``."""
    run = completed_run(folder)
    if run is not None:
        return {"status": "completed", "run": str(run)}
    if is_running(folder):
        return {"status": "running", "run": None}
    tried = versions(folder)
    if not tried and not (folder / LOG_NAME).is_file():
        return {"status": "pending", "run": None}
    summary = read_summary(tried[-1]) if tried else {}
    error = summary.get("error") or (
        f"{summary['status']}" if summary.get("status") else f"no completed run; see {folder / LOG_NAME}"
    )
    return {"status": "failed", "run": str(tried[-1]) if tried else None, "error": str(error)[:300]}


def is_running(folder: Path) -> bool:
    """A sweep process is training this cell now: its marker exists, was refreshed within ``STALE_S`` (a heartbeat
    every ``HEARTBEAT_S``) and, on this host, names a live process."""
    try:
        marker = json.loads((folder / RUNNING).read_text())
        age = time.time() - (folder / RUNNING).stat().st_mtime
    except (OSError, ValueError):
        return False
    if age > STALE_S:
        return False  # no heartbeat: the machine or process that wrote it is gone
    if marker.get("host") != socket.gethostname():
        return True  # another node (a cluster task), still beating: cannot check its process from here
    try:
        os.kill(int(marker.get("pid", -1)), 0)
    except (OSError, ValueError):
        return False  # the process is gone: the attempt ended without a completed run
    return True


def write_marker(folder: Path) -> None:
    """Marks ``folder`` as being trained by this process (pid and host), until its ``.running`` file is removed."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_atomic(folder / RUNNING, json.dumps(marker) + "\n")


def touch_marker(folder: Path) -> None:
    """The heartbeat: refreshes the modification time of ``folder``'s marker (if it still exists)."""
    try:
        os.utime(folder / RUNNING)
    except OSError:
        pass


@contextmanager
def running(folder: Path) -> Iterator[None]:
    """Marks ``folder`` as being trained by this process while the block runs (a thread beats every
    ``HEARTBEAT_S``)."""
    write_marker(folder)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            touch_marker(folder)

    thread = threading.Thread(target=beat, name="dplit-sweep-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        (folder / RUNNING).unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifest(spec: SweepSpec, cells: list[Cell], extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """``OUT/sweep.json``: the spec, every cell (index, name, grid values, fit command) and its status."""
    entries = []
    for cell in cells:
        entry = {**cell.to_dict(), "dir": str(spec.out / cell.name), "command": fit_command(spec, cell)}
        entry.update(cell_status(spec, cell))
        entry.update((extra or {}).get(cell.name, {}))
        entries.append(entry)
    counts = {s: sum(e["status"] == s for e in entries) for s in ("completed", "running", "failed", "pending")}
    manifest = {"spec": spec.to_dict(absolute=True), "cwd": os.getcwd(), "counts": counts, "cells": entries}
    path = spec.out / MANIFEST
    write_atomic(path, json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def read_manifest(out: Path) -> dict[str, Any]:
    """``OUT/sweep.json`` as written by ``write_manifest`` ({} when absent or unreadable)."""
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def fit_argv(spec: SweepSpec, cell: Cell) -> list[str]:
    """The ``dplit`` arguments that train ``cell``: ``fit --config OUT/<cell>/config.yaml [fit_args...]``."""
    return ["fit", "--config", str(spec.out / cell.name / "config.yaml"), *spec.fit_args]


def fit_command(spec: SweepSpec, cell: Cell) -> str:
    """The shell command that reruns ``cell`` by hand."""
    import shlex

    return shlex.join(["dplit", *fit_argv(spec, cell)])


def _child_env() -> dict[str, str]:
    """The environment of a cell's process: the sweep's, with this dplit first on the path when it is a checkout
    (not installed), so every cell runs the same code as the sweep."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[2])
    if "site-packages" not in root:
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_cell_here(spec: SweepSpec, base: dict[str, Any], cell: Cell, wandb: bool | None = None) -> int:
    """Writes the cell's config and runs ``dplit fit`` on it in this process (a cluster task: one cell, one
    process, output on the console); returns the exit code."""
    write_cell_config(base, spec, cell, wandb)
    from dplit.cli.main import main as dplit_main
    from dplit.sweep.resume import resume_args

    with running(spec.out / cell.name):
        resume = resume_args(spec, cell)
        if resume:
            print(f"dplit sweep: {cell.name}: resuming the stopped attempt from {resume[1]}", flush=True)
        return dplit_main([*fit_argv(spec, cell), *resume])


__all__ = [
    "LOG_NAME",
    "MANIFEST",
    "SPEC_FILE",
    "cell_status",
    "completed_run",
    "folder_status",
    "fit_argv",
    "is_running",
    "touch_marker",
    "fit_command",
    "read_manifest",
    "run_cell_here",
    "running",
    "versions",
    "write_atomic",
    "write_manifest",
    "write_marker",
]
