"""Archiving a sweep's completed cells (no checkpoints) and restoring them on another machine: the sweep skips them
and ``dplit report`` reads them beside the cells trained since, with the same numbers as on the first machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_sweep_report import GROUPS, ROOT, write_version

from dplit.cli.main import main
from dplit.sweep.archive import ARCHIVE, archive_cells, cell_minutes, restore_cells
from dplit.sweep.cells import expand
from dplit.sweep.run import RUNNING, completed_run, write_manifest
from dplit.sweep.spec import SweepSpec


def _sweep(out: Path, seeds: list[int], noise: bool = False) -> tuple[SweepSpec, list]:
    budget = {"noise_multipliers": [0.8]} if noise else {"epsilons": [8.0]}
    spec = SweepSpec(config=ROOT / "configs" / "quickstart.yaml", out=out, algorithms=["dpsgd", "nodp"],
                     seeds=seeds, **budget)  # type: ignore[arg-type]  # fmt: skip
    cells = expand(spec)
    write_manifest(spec, cells)
    return spec, cells


def _acc(cell_name: str) -> dict[str, float]:
    base = 0.9 if cell_name.startswith("nodp") else 0.7
    seed = int(cell_name[-1])
    return {g: base - 0.1 * i + 0.01 * seed for i, g in enumerate(GROUPS)}


def _train(folder: Path, cell, *, minutes: float, status: str = "completed", version: int = 0) -> None:
    """A finished fit as dplit writes it, with a checkpoint, and file times ``minutes`` apart."""
    write_version(folder, version, _acc(cell.name), cell.seed or 0, cell.epsilon, status)
    run = folder / f"version_{version}"
    (run / "hparams.yaml").write_text("lr: 0.1\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "epoch=0.ckpt").write_bytes(b"x" * 1000)
    (folder / "config.yaml").write_text("seed_everything: 0\n")
    (folder / "fit.log").write_text("training\n")
    start = 1_700_000_000.0
    os.utime(run / "hparams.yaml", (start, start))
    for f in run.rglob("*"):
        if f.is_file() and f.name != "hparams.yaml":
            os.utime(f, (start + 60 * minutes, start + 60 * minutes))


def test_archive_keeps_completed_cells_without_checkpoints_and_their_minutes(tmp_path):
    spec, cells = _sweep(tmp_path / "out", [0, 1])
    by_name = {c.name: c for c in cells}
    _train(spec.out / "nodp-seed0", by_name["nodp-seed0"], minutes=12)
    _train(spec.out / "dpsgd-eps8-seed0", by_name["dpsgd-eps8-seed0"], minutes=30, status="failed")  # not kept
    (spec.out / "nodp-seed1").mkdir()
    (spec.out / "nodp-seed1" / RUNNING).write_text("{}")  # a cell in training: not kept

    archive = tmp_path / "archive"
    assert archive_cells(spec.out, archive) == ["nodp-seed0"]
    assert archive_cells(spec.out, archive) == []  # already kept: not copied again
    kept = archive / "nodp-seed0"
    assert not list(kept.rglob("*.ckpt")) and not (kept / "version_0" / "checkpoints").exists()
    assert (kept / "version_0" / "metrics.csv").read_text() == (
        spec.out / "nodp-seed0" / "version_0" / "metrics.csv"
    ).read_text()
    record = json.loads((kept / ARCHIVE).read_text())
    assert record["completed_version"] == "version_0" and record["minutes"] == pytest.approx(12)
    assert cell_minutes(spec.out / "nodp-seed0") == pytest.approx(12)
    # version control does not keep file times: the archived figure is used, not the (new) mtimes
    os.utime(kept / "version_0" / "metrics.csv", None)
    assert cell_minutes(kept) == pytest.approx(12)
    assert cell_minutes(spec.out / "dpsgd-eps8-seed0") is None
    assert not (archive / "dpsgd-eps8-seed0").exists() and not (archive / "nodp-seed1").exists()
    assert not [p for p in archive.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_restored_cells_are_skipped_by_the_sweep_and_reported_with_new_ones(tmp_path, capsys):
    # machine 1 trains seed 0 of both methods and archives them
    spec1, cells1 = _sweep(tmp_path / "m1", [0, 1])
    for cell in cells1:
        if cell.seed == 0:
            _train(spec1.out / cell.name, cell, minutes=5)
    archive = tmp_path / "archive"
    assert archive_cells(spec1.out, archive) == ["dpsgd-eps8-seed0", "nodp-seed0"]
    assert main(["report", str(spec1.out), "--no-wandb"]) == 0

    # machine 2: a new OUT with a stopped partial attempt of one archived cell, and one cell trained there
    spec2, cells2 = _sweep(tmp_path / "m2", [0, 1])
    by_name = {c.name: c for c in cells2}
    _train(spec2.out / "nodp-seed0", by_name["nodp-seed0"], minutes=1, status="failed")
    assert restore_cells(archive, spec2.out) == ["dpsgd-eps8-seed0", "nodp-seed0"]
    assert completed_run(spec2.out / "nodp-seed0") is not None
    assert not (spec2.out / "nodp-seed0" / "version_0" / "checkpoints").exists()  # the failed attempt was replaced
    assert restore_cells(archive, spec2.out) == []  # already there
    for name in ("dpsgd-eps8-seed1", "nodp-seed1"):
        _train(spec2.out / name, by_name[name], minutes=7)
    todo = [c.name for c in cells2 if completed_run(spec2.out / c.name) is None]
    assert todo == []  # what `dplit sweep` would train: nothing

    assert main(["report", str(spec2.out), "--no-wandb"]) == 0
    capsys.readouterr()
    first = json.loads((spec1.out / "report" / "sweep_report.json").read_text())
    both = json.loads((spec2.out / "report" / "sweep_report.json").read_text())
    assert all(s["n"] == 1 for s in first["settings"]) and all(s["n"] == 2 for s in both["settings"])
    for s in both["settings"]:
        names = s["cells"]
        assert [n[-1] for n in names] == ["0", "1"]
        for g in GROUPS:
            assert s["group_acc"][g]["mean"] == pytest.approx(sum(_acc(n)[g] for n in names) / 2)

    # archiving machine 2 adds only its own cells (the restored ones are the archive's copies)
    assert archive_cells(spec2.out, archive) == ["dpsgd-eps8-seed1", "nodp-seed1"]
    assert sorted(p.name for p in archive.iterdir()) == sorted(c.name for c in cells2)


def test_a_running_cell_is_not_overwritten_by_a_restore(tmp_path):
    spec1, cells1 = _sweep(tmp_path / "m1", [0])
    for cell in cells1:
        _train(spec1.out / cell.name, cell, minutes=3)
    archive = tmp_path / "archive"
    archive_cells(spec1.out, archive)
    spec2, _ = _sweep(tmp_path / "m2", [0])
    busy = spec2.out / "nodp-seed0"
    busy.mkdir(parents=True)
    (busy / RUNNING).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    assert restore_cells(archive, spec2.out) == ["dpsgd-eps8-seed0"]
    assert (busy / RUNNING).is_file() and not (busy / ARCHIVE).exists()


def test_minutes_of_a_resumed_cell_ignore_the_ledger_the_resumed_run_keeps_writing(tmp_path):
    """A stopped attempt (version_0, 3 min) resumed by version_1 (50 min): the resumed run writes the cell's one privacy
    ledger, which lives in version_0's folder, so that file's time is the end of version_1, not of version_0."""
    spec, cells = _sweep(tmp_path / "out", [0])
    cell = next(c for c in cells if c.name == "dpsgd-eps8-seed0")
    folder = spec.out / cell.name
    _train(folder, cell, minutes=3, status="failed", version=0)
    _train(folder, cell, minutes=50, version=1)
    later = 1_700_000_000.0 + 60 * 75  # version_1 started 25 min after version_0 stopped
    for f in (folder / "version_1").rglob("*"):
        if f.is_file():
            stamp = later - 60 * 50 if f.name == "hparams.yaml" else later
            os.utime(f, (stamp, stamp))
    ledger = folder / "version_0" / "privacy_ledger-0123456789ab.json"
    ledger.write_text("{}")
    os.utime(ledger, (later, later))
    assert cell_minutes(folder) == pytest.approx(53)


def test_reproduction_script_restores_and_archives(tmp_path):
    """``scripts/reproduce_mnist_disparate_impact.py --report-only`` on a new OUT reads the archived cells (restored
    there) and writes the table with their recorded minutes."""
    spec1, cells1 = _sweep(tmp_path / "m1", [0], noise=True)
    archive = tmp_path / "docs" / "cells"
    for cell in cells1:
        _train(spec1.out / cell.name, cell, minutes=4)
        summary_path = spec1.out / cell.name / "version_0" / "summary.json"
        summary = json.loads(summary_path.read_text()) | {"global_step": 1000}
        if cell.name.startswith("dpsgd"):  # resumed: its stopped attempt took 100 steps after the checkpoint
            summary["privacy"] = {"epsilon": 6.01, "delta": 1e-6, "steps": 1100}
        stamp = summary_path.stat().st_mtime
        summary_path.write_text(json.dumps(summary))
        os.utime(summary_path, (stamp, stamp))
    archive_cells(spec1.out, archive)
    out = tmp_path / "m2"
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce_mnist_disparate_impact.py"), "--out", str(out),
           "--docs", str(tmp_path / "docs"), "--seeds", "0", "--methods", "nodp", "dpsgd", "--noise", "0.8",
           "--report-only"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "restored 2 archived cell(s)" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert completed_run(out / "nodp-seed0") is not None and completed_run(out / "dpsgd-sigma0.8-seed0") is not None
    table = (tmp_path / "docs" / "README.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| nodp |")
            or line.startswith("| dpsgd |")}  # fmt: skip
    assert rows["nodp"].startswith("| nodp | 1 | — | 80.0 | "), table
    assert rows["dpsgd"].startswith("| dpsgd | 1 | "), table
    assert all(row.endswith(" | 4 |") for row in rows.values()), rows  # the archived minutes, not re-measured
    assert (
        "- `dpsgd-sigma0.8-seed0`: epsilon 6.010 after 1,100 accounted steps, 100 more than its model took (1,000)."
        in table
    )
    assert "- `nodp-seed0`" not in table


def test_sweep_command_archives_completed_cells_and_restores_them_on_a_new_machine(tmp_path, capsys):
    """`dplit sweep --archive DEST`: completed cells are copied to DEST when the sweep ends; a sweep into a new OUT
    with the same DEST restores them first, so it trains nothing."""
    spec1, cells1 = _sweep(tmp_path / "m1", [0])
    for cell in cells1:
        _train(spec1.out / cell.name, cell, minutes=6)
    dest = tmp_path / "kept"
    flags = ["sweep", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--algorithms", "dpsgd", "nodp",
             "--epsilons", "8", "--seeds", "0", "--archive", str(dest)]  # fmt: skip
    assert main([*flags, "--out", str(spec1.out)]) == 0
    assert "archived 2 cell(s)" in capsys.readouterr().out
    assert sorted(p.name for p in dest.iterdir()) == ["dpsgd-eps8-seed0", "nodp-seed0"]
    assert not list(dest.rglob("*.ckpt"))
    out2 = tmp_path / "m2"
    assert main([*flags, "--out", str(out2)]) == 0
    said = capsys.readouterr().out
    assert "restored 2 archived cell(s)" in said and "archived 0 cell(s)" in said
    assert all(completed_run(out2 / c.name) is not None for c in cells1)
    assert cell_minutes(out2 / "nodp-seed0") == pytest.approx(6)
