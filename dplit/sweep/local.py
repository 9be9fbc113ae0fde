"""Running a sweep on this machine: every cell without a completed fit, ``jobs`` at a time, under a progress bar.

Each cell is ``python -m dplit.cli fit`` in its own process (``dplit.sweep.run`` has the per-cell pieces). With
``jobs > 1`` the cells run concurrently and each gets ``cpu_count // jobs`` intra-op threads (``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS``, unless the caller set them): on a small CPU machine several single-threaded cells train more
examples per second than one cell on every core. Cells that another process is training (a live ``.running``
marker) are left to it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import IO, Any

from dplit.report.select import read_summary
from dplit.sweep.cells import Cell, write_cell_config
from dplit.sweep.resume import resume_args
from dplit.sweep.run import (
    HEARTBEAT_S,
    LOG_NAME,
    RUNNING,
    _child_env,
    cell_status,
    completed_run,
    fit_argv,
    fit_command,
    is_running,
    touch_marker,
    write_manifest,
    write_marker,
)
from dplit.sweep.spec import SweepSpec

POLL_S = 0.5
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class _Active:
    cell: Cell
    proc: subprocess.Popen
    log: IO[str]
    start: float


def threads_per_cell(jobs: int) -> int:
    """Intra-op threads for each of ``jobs`` concurrent cells: the CPUs this process may use, shared evenly."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, jobs))


def cell_env(jobs: int) -> dict[str, str]:
    """The environment of each cell's process (threads shared out when ``jobs > 1``; the caller's settings win)."""
    env = _child_env()
    if jobs > 1:
        for var in THREAD_VARS:
            env.setdefault(var, str(threads_per_cell(jobs)))
    return env


def _start(spec: SweepSpec, base: dict[str, Any], cell: Cell, env: dict[str, str]) -> _Active:
    write_cell_config(base, spec, cell)
    folder = spec.out / cell.name
    write_marker(folder)
    resume = resume_args(spec, cell)  # a stopped attempt's checkpoint, if it can be continued
    log = (folder / LOG_NAME).open("a")
    log.write(f"$ {fit_command(spec, cell)}{' ' + shlex.join(resume) if resume else ''}\n")
    log.flush()
    proc = subprocess.Popen(
        [_python(), "-m", "dplit.cli", *fit_argv(spec, cell), *resume],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    return _Active(cell, proc, log, time.monotonic())


def _python() -> str:
    from dplit.sweep import run

    return run.PYTHON  # read at call time: tests put a stand-in interpreter there


def _finish(spec: SweepSpec, active: _Active) -> tuple[int, float]:
    active.log.close()
    (spec.out / active.cell.name / RUNNING).unlink(missing_ok=True)
    return active.proc.returncode, time.monotonic() - active.start


def _stop(spec: SweepSpec, actives: list[_Active]) -> None:
    """Ctrl-C: stops the running cells (SIGTERM, then SIGKILL after 30 s) and removes their markers."""
    for active in actives:
        if active.proc.poll() is None:
            active.proc.terminate()
    deadline = time.monotonic() + 30
    for active in actives:
        try:
            active.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            active.proc.kill()
            active.proc.wait()
        _finish(spec, active)


def run_sweep(spec: SweepSpec, base: dict[str, Any], cells: list[Cell], jobs: int = 1) -> int:
    """Runs every cell without a completed fit, ``jobs`` at a time, in grid order; returns 0, 1 if any failed, 130
    if interrupted (Ctrl-C: the running cells are stopped; rerunning resumes)."""
    from tqdm import tqdm

    if jobs < 1:
        raise ValueError(f"jobs must be >= 1 (cells trained at a time), got {jobs}")
    todo = [c for c in cells if completed_run(spec.out / c.name) is None]
    elsewhere = [c for c in todo if is_running(spec.out / c.name)]
    todo = [c for c in todo if c not in elsewhere]
    done = len(cells) - len(todo) - len(elsewhere)
    busy = f", {len(elsewhere)} being trained by another process (skipped)" if elsewhere else ""
    how = f" ({jobs} at a time, {threads_per_cell(jobs)} thread(s) each)" if jobs > 1 else ""
    print(
        f"dplit sweep: {len(cells)} cells in {spec.out}: {done} done (skipped){busy}, {len(todo)} to run{how}",
        flush=True,
    )
    extra: dict[str, dict[str, Any]] = {}
    write_manifest(spec, cells)
    failed: list[Cell] = []
    env = cell_env(jobs)
    queue = deque(todo)
    actives: list[_Active] = []
    bar = tqdm(total=len(todo), desc="sweep", unit="cell", dynamic_ncols=True, file=sys.stderr)
    beat = time.monotonic()
    try:
        while queue or actives:
            if time.monotonic() - beat >= HEARTBEAT_S:  # the running cells' markers stay fresh (see is_running)
                beat = time.monotonic()
                for active in actives:
                    touch_marker(spec.out / active.cell.name)
            while queue and len(actives) < jobs:
                actives.append(_start(spec, base, queue.popleft(), env))
                bar.set_postfix_str(", ".join(a.cell.name for a in actives))
            ended = [a for a in actives if a.proc.poll() is not None]
            if not ended:
                time.sleep(POLL_S)
                continue
            for active in ended:
                actives.remove(active)
                code, seconds = _finish(spec, active)
                cell = active.cell
                extra[cell.name] = {"returncode": code, "seconds": round(seconds, 1)}
                if code == 0 and cell_status(spec, cell)["status"] == "completed":
                    bar.write(f"{cell.name}: completed in {seconds:.0f} s{_result(spec, cell)}")
                else:
                    failed.append(cell)
                    log = spec.out / cell.name / LOG_NAME
                    bar.write(f"{cell.name}: FAILED (exit code {code}); log {log}:\n{_tail(log)}", file=sys.stderr)
                bar.update(1)
                write_manifest(spec, cells, extra)
    except KeyboardInterrupt:
        _stop(spec, actives)
        bar.close()
        write_manifest(spec, cells, extra)
        print(
            "dplit sweep: interrupted; rerun the same command to resume (finished cells are skipped)", file=sys.stderr
        )
        return 130
    bar.close()
    manifest = write_manifest(spec, cells, extra)
    if failed:
        print(
            f"dplit sweep: {len(failed)} cell(s) failed: {', '.join(c.name for c in failed)}; fix the cause and "
            "rerun the same command (finished cells are skipped)",
            file=sys.stderr,
        )
        return 1
    if elsewhere:
        print(
            f"dplit sweep: this process trained {len(todo)} cell(s); {', '.join(c.name for c in elsewhere)} "
            f"are being trained by another process; manifest {manifest}"
        )
        return 0
    print(f"dplit sweep: all {len(cells)} cells completed; manifest {manifest}; next: dplit report {spec.out}")
    return 0


def _tail(path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(f"    {line}" for line in text[-lines:])


def _result(spec: SweepSpec, cell: Cell) -> str:
    """``, val acc 91.2%, epsilon 2.99`` from the cell's summary.json."""
    run = completed_run(spec.out / cell.name)
    summary = read_summary(run) if run is not None else {}
    parts = []
    if summary.get("acc") is not None:
        parts.append(f"{summary.get('split', 'val')} acc {100 * float(summary['acc']):.1f}%")
    epsilon = (summary.get("privacy") or {}).get("epsilon")
    if epsilon is not None:
        parts.append(f"epsilon {float(epsilon):.3g}")
    return "".join(f", {p}" for p in parts)


__all__ = ["cell_env", "run_sweep", "threads_per_cell"]
