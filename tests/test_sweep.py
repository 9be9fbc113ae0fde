"""``dplit sweep``: spec validation, cell configs, the resumable runner, cluster emission, and one real sweep."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dplit.cli.main import main
from dplit.sweep import run as sweep_run
from dplit.sweep.cells import cell_config, expand
from dplit.sweep.spec import from_dict

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
EXAMPLE = ROOT / "configs" / "sweeps" / "quickstart_sweep.yaml"
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1"]
DP = "dplit.callbacks.DifferentialPrivacy"


def _spec(tmp_path: Path, **grid) -> dict:
    return {"config": str(QUICKSTART), "out": str(tmp_path / "sw"), "grid": grid or {"algorithm": ["dpsgd", "nodp"]}}


def _dp_args(config: dict) -> dict | None:
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"] == DP:
            return cb.get("init_args") or {}
    return None


def test_example_spec_dry_run_lists_the_grid_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["sweep", "--spec", str(EXAMPLE), "--out", str(out), "--dry-run"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    names = [line[1] for line in lines]
    # 3 seeds x (one nodp cell + 3 epsilons of dpsgd): nodp does not vary with epsilon
    assert len(names) == 12 and len(set(names)) == 12
    assert names[:4] == ["nodp-seed0", "dpsgd-eps1-seed0", "dpsgd-eps3-seed0", "dpsgd-eps8-seed0"]
    assert [line[0] for line in lines] == [str(i) for i in range(12)]
    assert all(line[2] == "pending" for line in lines)
    assert not out.exists(), "--dry-run must not write anything"


def test_flags_give_the_same_cells_as_the_spec_file(tmp_path, capsys):
    flags = ["sweep", "--config", str(QUICKSTART), "--algorithms", "dpsgd", "nodp", "--epsilons", "1", "3", "8",
             "--seeds", "0", "1", "2", "--out", str(tmp_path / "a"), "--dry-run"]  # fmt: skip
    assert main(flags) == 0
    from_flags = [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]]
    assert main(["sweep", "--spec", str(EXAMPLE), "--out", str(tmp_path / "b"), "--dry-run"]) == 0
    assert from_flags == [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"grid": {"algorithm": ["dpsgd"], "epsilons": [1]}}, ["unknown grid axis `epsilons`", "`epsilon`"]),
        (
            {"grid": {"algorithm": ["dpsgdd", "nodp"]}},
            ["unknown algorithm `dpsgdd`", "registered: adaptive_clipping, automatic_clipping, dpsgd, dpsgd_f", "nodp"],
        ),
        ({"grid": {"algorithm": ["dpsgd"], "epsilon": []}}, ["`grid.epsilon` is empty"]),
        ({"grid": {"algorithm": []}}, ["`grid.algorithm` must be a non-empty list"]),
        ({"grid": {"algorithm": ["dpsgd"], "epsilon": [1], "noise_multiplier": [1.0]}}, ["both `epsilon` and"]),
        ({"grid": {"algorithm": ["dpsgd"], "epsilon": [3, 3.0]}}, ["lists a value twice"]),
        ({"grid": {"algorithm": ["dpsgd"], "epsilon": [-1]}}, ["`grid.epsilon` must hold positive numbers"]),
        ({"grid": {"algorithm": ["dpsgd"], "seed": [0.5]}}, ["`grid.seed` must hold integers"]),
        ({"grid": {"algorithm": ["nodp"], "epsilon": [1]}}, ["has only nodp"]),
        ({"config": str(ROOT / "configs" / "quickstart_nodp.yaml")}, ["no dplit.callbacks.Differential", "_nodp"]),
        ({"config": "missing.yaml"}, ["`config: missing.yaml`: no such file"]),
        ({"methods": {"dpsgd": {"max_grad_nrm": 0.5}}}, ["`methods.dpsgd.max_grad_nrm` is not a", "max_grad_norm"]),
        ({"methods": {"dpsgd": {"target_epsilon": 2}}}, ["budget is set by the grid"]),
        ({"methods": {"clip01": {"algorithm": "dpsgd"}}}, ["defines clip01 but `grid.algorithm` does not list it"]),
        ({"outt": "x"}, ["unknown field `outt`", "`out`"]),
        ({"grid": {"algorithm": ["../dpsgd"]}}, ["name '../dpsgd' names the cells' folders"]),
    ],
)  # fmt: skip
def test_spec_mistakes_name_the_field_and_the_fix(tmp_path, capsys, change, expected):
    spec = _spec(tmp_path) | change
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", "--spec", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dplit: error: ") and "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)


def test_spec_and_grid_flags_are_exclusive(tmp_path, capsys):
    assert main(["sweep", "--spec", str(EXAMPLE), "--seeds", "1", "--dry-run"]) == 2
    assert "--seeds with --spec" in capsys.readouterr().err
    assert main(["sweep", "--config", str(QUICKSTART), "--algorithms", "nodp"]) == 2
    assert "missing --out" in capsys.readouterr().err


def test_cell_configs(tmp_path):
    spec = from_dict(_spec(tmp_path, algorithm=["dpsgd", "clip01", "nodp"], epsilon=[2, 8], seed=[4]) | {
        "methods": {"clip01": {"algorithm": "dpsgd", "max_grad_norm": 0.1}}})  # fmt: skip
    base = yaml.safe_load(QUICKSTART.read_text())
    cells = {c.name: c for c in expand(spec)}
    assert list(cells) == [
        "nodp-seed4", "dpsgd-eps2-seed4", "clip01-eps2-seed4", "dpsgd-eps8-seed4", "clip01-eps8-seed4"
    ]  # fmt: skip
    nodp = cell_config(base, spec, cells["nodp-seed4"])
    assert _dp_args(nodp) is None
    assert [cb["class_path"] for cb in nodp["trainer"]["callbacks"]] == ["dplit.callbacks.SubgroupMetrics"]
    assert nodp["seed_everything"] == 4 and nodp["trainer"]["default_root_dir"] == str(tmp_path / "sw" / "nodp-seed4")
    assert [lg["class_path"] for lg in nodp["trainer"]["logger"]] == ["dplit.loggers.CSVLogger"]  # W&B dropped
    clip = _dp_args(cell_config(base, spec, cells["clip01-eps8-seed4"]))
    assert clip["target_epsilon"] == 8.0 and clip["max_grad_norm"] == 0.1 and clip["algorithm"] == "dpsgd"
    assert clip["delta"] == 1e-5 and clip["grad_sample_mode"] == "bookkeeping"  # the base's other settings are kept
    assert _dp_args(cell_config(base, spec, cells["dpsgd-eps8-seed4"]))["max_grad_norm"] == 1.0
    assert _dp_args(base)["target_epsilon"] == 3.0, "the base config must not be modified"
    wandb = cell_config(base, spec, cells["dpsgd-eps2-seed4"], wandb=True)["trainer"]["logger"][1]
    assert wandb["class_path"] == "dplit.loggers.AutoWandbLogger"
    assert wandb["init_args"]["name"] == "dpsgd-eps2-seed4" and wandb["init_args"]["group"] == "sw"
    # fixed noise: epsilon results; target_epsilon and noise_multiplier are never both set
    sigma_spec = from_dict(_spec(tmp_path, algorithm=["dpsgd"], noise_multiplier=[1.1]))
    (cell,) = expand(sigma_spec)
    args = _dp_args(cell_config(base, sigma_spec, cell))
    assert cell.name == "dpsgd-sigma1.1" and args["noise_multiplier"] == 1.1 and "target_epsilon" not in args


FAKE_PYTHON = """#!/bin/bash
# stands in for `python -m dplit.cli fit --config OUT/<cell>/config.yaml ...`: writes a version_N with a summary
dir=$(dirname "$5")
echo "$(basename "$dir")" >> "$SWEEP_CALLS"
n=$(ls -d "$dir"/version_* 2>/dev/null | wc -l)
mkdir -p "$dir/version_$n"
if [[ -f "$dir/../FAIL_$(basename "$dir")" ]]; then
  echo '{"kind": "fit", "status": "failed", "error": "RuntimeError: boom"}' > "$dir/version_$n/summary.json"
  echo "RuntimeError: boom" >&2
  exit 1
fi
echo '{"kind": "fit", "status": "completed"}' > "$dir/version_$n/summary.json"
"""


def test_failed_cell_does_not_stop_the_sweep_and_is_retried(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    monkeypatch.setattr(sweep_run, "PYTHON", str(fake))
    monkeypatch.setenv("SWEEP_CALLS", str(calls))
    out = tmp_path / "sw"
    out.mkdir()
    (out / "FAIL_dpsgd-eps1-seed0").touch()
    args = ["sweep", "--config", str(QUICKSTART), "--algorithms", "dpsgd", "nodp", "--epsilons", "1", "8",
            "--seeds", "0", "--out", str(out)]  # fmt: skip
    assert main(args) == 1
    captured = capsys.readouterr()
    assert calls.read_text().split() == ["nodp-seed0", "dpsgd-eps1-seed0", "dpsgd-eps8-seed0"]  # it went on
    assert "dpsgd-eps1-seed0: FAILED (exit code 1)" in captured.err and "RuntimeError: boom" in captured.err
    assert "1 cell(s) failed: dpsgd-eps1-seed0" in captured.err
    manifest = json.loads((out / "sweep.json").read_text())
    status = {c["name"]: c["status"] for c in manifest["cells"]}
    assert status == {"nodp-seed0": "completed", "dpsgd-eps1-seed0": "failed", "dpsgd-eps8-seed0": "completed"}
    failed = next(c for c in manifest["cells"] if c["name"] == "dpsgd-eps1-seed0")
    assert failed["error"] == "RuntimeError: boom" and failed["returncode"] == 1
    assert manifest["counts"] == {"completed": 2, "running": 0, "failed": 1, "pending": 0}
    # the next invocation retries only the failed cell, in a new version_N
    (out / "FAIL_dpsgd-eps1-seed0").unlink()
    calls.unlink()
    assert main(args) == 0
    assert calls.read_text().split() == ["dpsgd-eps1-seed0"]
    assert sorted(p.name for p in (out / "dpsgd-eps1-seed0").glob("version_*")) == ["version_0", "version_1"]
    assert "2 done (skipped), 1 to run" in capsys.readouterr().out


def test_a_cell_being_trained_is_running_not_failed(tmp_path):
    folder = tmp_path / "sw" / "dpsgd-eps1-seed0"
    with sweep_run.running(folder):
        (folder / sweep_run.LOG_NAME).write_text("training\n")
        assert sweep_run.folder_status(folder)["status"] == "running"
    assert sweep_run.folder_status(folder)["status"] == "failed"  # the attempt ended without a completed run
    marker = {"pid": 2**22 + 12345, "host": socket.gethostname(), "started": "x"}  # above Linux's pid_max
    (folder / sweep_run.RUNNING).write_text(json.dumps(marker))
    assert sweep_run.folder_status(folder)["status"] == "failed"  # a marker left by a killed sweep: not running
    (folder / sweep_run.RUNNING).write_text(json.dumps(marker | {"host": "another-node"}))
    assert sweep_run.folder_status(folder)["status"] == "running"  # a cluster task elsewhere: cannot tell


def test_emitted_wandb_sweep_runs_the_named_cell(tmp_path, capsys):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    out = tmp_path / "sw"
    args = ["sweep", "--config", str(QUICKSTART), "--algorithms", "dpsgd", "nodp", "--epsilons", "1", "8",
            "--seeds", "0", "1", "--out", str(out)]  # fmt: skip
    assert main([*args, "--emit", "wandb"]) == 0
    config = yaml.safe_load((out / "wandb_sweep.yaml").read_text())
    names = [c["name"] for c in json.loads((out / "sweep.json").read_text())["cells"]]
    assert config["method"] == "grid" and config["parameters"] == {"cell": {"values": names}}
    assert len(names) == 6 and config["metric"]["goal"] == "maximize" and isinstance(config["program"], str)
    # what `wandb agent` runs for one grid point: the command with its macros expanded (as wandb_agent.py does)
    agent_args = create_sweep_command_args({"args": {"cell": {"value": "dpsgd-eps8-seed1"}}})["args"]
    macros = {"${env}": [], "${interpreter}": [sys.executable], "${args}": agent_args}
    argv = [part for c in config["command"] for part in macros.get(c, [c])]
    assert argv[:3] == [sys.executable, "-m", "dplit.cli"] and "--wandb" in argv
    capsys.readouterr()
    assert main([*argv[3:], "--dry-run"]) == 0
    listed = capsys.readouterr().out.splitlines()[1:]
    assert len(listed) == 1 and listed[0].split()[:2] == [str(names.index("dpsgd-eps8-seed1")), "dpsgd-eps8-seed1"]


def _last_val(version: Path) -> dict[str, float]:
    rows = list(csv.DictReader((version / "metrics.csv").open()))
    last = [r for r in rows if r.get("val/acc/group=0")][-1]
    return {k: float(v) for k, v in last.items() if v}


def test_real_sweep_slurm_cell_resume_and_report(tmp_path, capsys):
    """A real 2-cell sweep on the quickstart: the SLURM array's command for task 0 trains the nodp cell, the
    sequential sweep skips it and trains the DP cell in its own `dplit fit` process, a rerun trains nothing, and
    `dplit report` on the folder aggregates the numbers the cells logged."""
    out = tmp_path / "sw"
    args = ["sweep", "--config", str(QUICKSTART), "--algorithms", "dpsgd", "nodp", "--epsilons", "3", "--seeds", "0",
            "--out", str(out)]  # fmt: skip
    assert main([*args, "--emit", "slurm", "--", *FAST]) == 0
    script = out / "sweep.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "#SBATCH --array=0-1\n" in text and (out / "slurm").is_dir()
    # what SLURM's task 0 executes, expanded by bash itself (exec replaced by printing its arguments)
    shown = text.replace("\nexec ", '\nprintf "%s\\n" ')
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="0")
    proc = subprocess.run(["bash", "-c", shown], env=env, capture_output=True, text=True, check=True)
    argv = proc.stdout.splitlines()
    assert argv[:3] == [sys.executable, "-m", "dplit.cli"] and argv[-2:] == ["--cell", "0"], argv
    assert main(argv[3:]) == 0  # the cell, run for real in this process
    nodp = out / "nodp-seed0"
    assert json.loads((nodp / "version_0" / "summary.json").read_text())["status"] == "completed"
    assert "privacy/epsilon" not in (nodp / "version_0" / "metrics.csv").read_text()  # DP removed, not just off
    assert not (out / "dpsgd-eps3-seed0").exists()  # task 0 trained its own cell only
    capsys.readouterr()

    assert main(["sweep", "--spec", str(out / "sweep.yaml")]) == 0
    assert "1 done (skipped), 1 to run" in capsys.readouterr().out
    dp = out / "dpsgd-eps3-seed0"
    assert "$ dplit fit --config" in (dp / "fit.log").read_text()
    dp_val = _last_val(dp / "version_0")
    eps = [float(r["privacy/epsilon"]) for r in csv.DictReader((dp / "version_0" / "metrics.csv").open())
           if r.get("privacy/epsilon")]  # fmt: skip
    assert eps and eps[-1] == pytest.approx(3.0, rel=0.05)  # the cell's target epsilon, not the base config's

    before = sorted(str(p) for p in out.glob("*/version_*"))
    assert main(["sweep", "--spec", str(out / "sweep.yaml")]) == 0
    assert "2 done (skipped), 0 to run" in capsys.readouterr().out
    assert sorted(str(p) for p in out.glob("*/version_*")) == before == [str(dp / "version_0"), str(nodp / "version_0")]
    assert main(argv[3:]) == 0  # a resubmitted array task skips its finished cell
    assert "cell 0 nodp-seed0 already completed" in capsys.readouterr().out
    assert sorted(str(p) for p in out.glob("*/version_*")) == before

    assert main(["report", str(out), "--no-wandb"]) == 0
    report = out / "report"
    for png in ("accuracy_vs_epsilon.png", "pareto.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((report / "sweep_report.json").read_text())
    ref, dpsgd = data["settings"]
    nodp_val = _last_val(nodp / "version_0")
    assert ref["method"] == "nodp" and ref["reference"] and ref["n"] == 1
    assert ref["overall_acc"]["mean"] == pytest.approx(nodp_val["val/acc"])
    assert dpsgd["method"] == "dpsgd" and dpsgd["target_epsilon"] == 3.0
    assert dpsgd["epsilon"]["mean"] == pytest.approx(eps[-1])
    groups = {k.split("=", 1)[1]: v for k, v in dp_val.items() if k.startswith("val/acc/group=")}
    assert {g: e["mean"] for g, e in dpsgd["group_acc"].items()} == pytest.approx(groups)
    assert dpsgd["worst_group_acc"]["mean"] == pytest.approx(min(groups.values()))
    assert data["incomplete"] == []
    md = (report / "report.md").read_text()
    assert f"| dpsgd | 3 | — | 3 | 1 | {100 * dp_val['val/acc']:.2f} |" in md


FAKE_SLOW_PYTHON = """#!/bin/bash
# like FAKE_PYTHON, but each cell takes a while and records how many cells were training at once, and its threads
dir=$(dirname "$5")
name=$(basename "$dir")
touch "$SWEEP_LIVE/$name"
echo "$name $(ls "$SWEEP_LIVE" | wc -l) ${OMP_NUM_THREADS:-unset} ${MKL_NUM_THREADS:-unset}" >> "$SWEEP_CALLS"
sleep 1
rm "$SWEEP_LIVE/$name"
mkdir -p "$dir/version_0"
echo '{"kind": "fit", "status": "completed"}' > "$dir/version_0/summary.json"
"""


def test_jobs_train_cells_concurrently_with_shared_threads_and_leave_busy_cells(tmp_path, monkeypatch, capsys):
    from dplit.sweep import local
    from dplit.sweep.local import threads_per_cell

    beats = []
    monkeypatch.setattr(local, "HEARTBEAT_S", 0.0)  # every poll refreshes the running cells' markers
    monkeypatch.setattr(
        local, "touch_marker", lambda folder: beats.append(folder.name) or sweep_run.touch_marker(folder)
    )
    fake = tmp_path / "python"
    fake.write_text(FAKE_SLOW_PYTHON)
    fake.chmod(0o755)
    calls, live = tmp_path / "calls.txt", tmp_path / "live"
    live.mkdir()
    monkeypatch.setattr(sweep_run, "PYTHON", str(fake))
    monkeypatch.setenv("SWEEP_CALLS", str(calls))
    monkeypatch.setenv("SWEEP_LIVE", str(live))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "7")  # the caller's own setting wins
    out = tmp_path / "sw"
    busy = out / "dpsgd-eps8-seed1"  # a cell another machine is training: left alone
    busy.mkdir(parents=True)
    (busy / sweep_run.RUNNING).write_text(json.dumps({"pid": 1, "host": "another-node", "started": "x"}))
    args = ["sweep", "--config", str(QUICKSTART), "--algorithms", "dpsgd", "nodp", "--epsilons", "1", "8",
            "--seeds", "0", "1", "--out", str(out)]  # fmt: skip
    assert main([*args, "--jobs", "0"]) == 2
    assert "--jobs 0" in capsys.readouterr().err
    assert main([*args, "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "0 done (skipped), 1 being trained by another process (skipped), 5 to run (2 at a time" in printed
    rows = [line.split() for line in calls.read_text().splitlines()]
    assert sorted(r[0] for r in rows) == sorted(
        ["nodp-seed0", "dpsgd-eps1-seed0", "dpsgd-eps8-seed0", "nodp-seed1", "dpsgd-eps1-seed1"]
    )
    concurrent = [int(r[1]) for r in rows]
    assert max(concurrent) == 2, concurrent  # two at a time, never more
    assert {(r[2], r[3]) for r in rows} == {(str(threads_per_cell(2)), "7")}
    status = {c["name"]: c["status"] for c in json.loads((out / "sweep.json").read_text())["cells"]}
    assert status.pop("dpsgd-eps8-seed1") == "running" and set(status.values()) == {"completed"}
    assert [p.parent.name for p in out.glob("*/.running")] == ["dpsgd-eps8-seed1"]  # only the other machine's
    assert beats and set(beats) <= {r[0] for r in rows}  # the heartbeat: only cells this sweep was training
    # one at a time (the default): no thread setting is imposed
    calls.unlink()
    (busy / sweep_run.RUNNING).unlink()
    assert main(args) == 0
    assert [line.split()[1:] for line in calls.read_text().splitlines()] == [["1", "unset", "7"]]


def test_markers_beat_and_a_marker_without_heartbeat_is_stale(tmp_path, monkeypatch):
    """The process training a cell refreshes its marker (HEARTBEAT_S); one not refreshed for STALE_S is left over
    from a stopped machine or a dead node: the cell is trained again, whatever host the marker names."""
    import os
    import time

    folder = tmp_path / "sw" / "dpsgd-eps1-seed0"
    monkeypatch.setattr(sweep_run, "HEARTBEAT_S", 0.05)
    with sweep_run.running(folder):
        old = time.time() - 3600
        os.utime(folder / sweep_run.RUNNING, (old, old))
        deadline = time.time() + 10
        while (folder / sweep_run.RUNNING).stat().st_mtime < old + 1 and time.time() < deadline:
            time.sleep(0.05)
        assert (folder / sweep_run.RUNNING).stat().st_mtime > time.time() - 60  # refreshed by the heartbeat
        assert sweep_run.is_running(folder)
    assert not (folder / sweep_run.RUNNING).exists()
    marker = {"pid": os.getpid(), "host": "another-node", "started": "x"}
    (folder / sweep_run.RUNNING).write_text(json.dumps(marker))
    assert sweep_run.folder_status(folder)["status"] == "running"  # fresh: another node is training it
    stale = time.time() - sweep_run.STALE_S - 5
    os.utime(folder / sweep_run.RUNNING, (stale, stale))
    assert not sweep_run.is_running(folder)  # no heartbeat for STALE_S: gone
    (folder / sweep_run.RUNNING).write_text(json.dumps(marker | {"host": socket.gethostname()}))
    os.utime(folder / sweep_run.RUNNING, (stale, stale))
    assert not sweep_run.is_running(folder)  # this host, a live pid (reused?), but no heartbeat: gone
