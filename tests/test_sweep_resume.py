"""A sweep cell stopped part-way continues from its checkpoint (``dplit.sweep.resume``), with an epsilon checked
against dp_accounting's for every step both attempts took; what must not be resumed starts over."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from dplit.callbacks import SubgroupMetrics
from dplit.cli.main import main
from dplit.sweep import resume as sweep_resume
from dplit.sweep.cells import expand
from dplit.sweep.spec import from_dict

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
ARGS = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1"]


def _ckpt(path: Path, payload: bytes = b"x" * 1000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
    return path


def test_the_newest_complete_checkpoint_of_the_same_attempt_is_resumed(tmp_path, monkeypatch):
    """Same key: the newest checkpoint that passes the zip check, across versions; a truncated newest one is
    skipped; checkpoints older than the key's first attempt (another config's) and a changed key are not used."""
    folder = tmp_path / "cell"
    old = _ckpt(folder / "version_0" / "checkpoints" / "epoch=4-step=40.ckpt")
    sweep_resume.record_attempt(folder, "A")
    since = json.loads((folder / sweep_resume.ATTEMPT).read_text())["since"]
    assert sweep_resume.resume_checkpoint(folder, "A") is None  # the only checkpoint predates attempt A
    os.utime(old, (since - 10, since - 10))
    first = _ckpt(folder / "version_1" / "checkpoints" / "epoch=0-step=8.ckpt")
    second = _ckpt(folder / "version_2" / "checkpoints" / "epoch=2-step=24.ckpt")
    os.utime(first, (since + 1, since + 1))
    os.utime(second, (since + 2, since + 2))
    assert sweep_resume.resume_checkpoint(folder, "A") == second
    second.write_bytes(second.read_bytes()[:-40])  # killed while writing
    assert not sweep_resume.complete(second)
    os.utime(second, (since + 2, since + 2))
    assert sweep_resume.resume_checkpoint(folder, "A") == first
    sweep_resume.record_attempt(folder, "A")  # a later attempt with the same key keeps the first start time
    assert json.loads((folder / sweep_resume.ATTEMPT).read_text())["since"] == since
    assert sweep_resume.resume_checkpoint(folder, "B") is None  # another config or fit_args: start over
    monkeypatch.setattr(sweep_resume.time, "time", lambda: since + 3)  # B's first attempt starts after them
    sweep_resume.record_attempt(folder, "B")
    assert sweep_resume.resume_checkpoint(folder, "B") is None  # B's own attempts have no checkpoint yet


def test_the_key_covers_the_cell_config_and_the_fit_args(tmp_path):
    grid = {"algorithm": ["dpsgd"], "seed": [0]}
    spec = from_dict({"config": str(QUICKSTART), "out": str(tmp_path / "sw"), "grid": grid, "fit_args": ARGS})
    cell = expand(spec)[0]
    folder = spec.out / cell.name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("# written from /a/spec.yaml\na: 1\n")
    key = sweep_resume.attempt_key(spec, cell)
    (folder / "config.yaml").write_text("a: 2\n")
    assert sweep_resume.attempt_key(spec, cell) != key
    (folder / "config.yaml").write_text("# written from elsewhere\na: 1\n")  # comments do not count
    other = from_dict({**spec.to_dict(absolute=True), "fit_args": [*ARGS, "--trainer.max_epochs=3"]})
    assert sweep_resume.attempt_key(other, cell) != key == sweep_resume.attempt_key(spec, cell)


def _rdp_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    accountant = RdpAccountant()
    accountant.compose(SelfComposedDpEvent(PoissonSampledDpEvent(rate, GaussianDpEvent(noise)), steps))
    return accountant.get_epsilon(delta)


def _kill_in_second_epoch(self, trainer, pl_module, batch, batch_idx):  # before epoch 1's second step
    if trainer.current_epoch == 1 and batch_idx == 1:
        raise RuntimeError("simulated kill")


def _stop_and_resume(tmp_path: Path, monkeypatch, capsys, grid: dict) -> tuple[Path, dict, Path]:
    """Cell 0 of ``grid`` is killed in epoch 1 after one step past its epoch-0 checkpoint (3 steps), then the sweep
    trains it again; returns (cell folder, the resumed version's summary, sweep out)."""
    out = tmp_path / "sw"
    spec = {"config": str(QUICKSTART), "out": str(out), "grid": grid, "fit_args": ARGS}
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))
    with monkeypatch.context() as patch:
        patch.setattr(SubgroupMetrics, "on_train_batch_start", _kill_in_second_epoch, raising=False)
        with pytest.raises(RuntimeError, match="simulated kill"):
            main(["sweep", "--spec", str(tmp_path / "spec.yaml"), "--cell", "0"])
    (cell,) = [p for p in out.iterdir() if p.is_dir() and p.name.startswith("dpsgd")][:1]
    assert [p.name for p in (cell / "version_0" / "checkpoints").glob("*.ckpt")] == ["epoch=0-step=3.ckpt"]
    ledger = json.loads(next((cell / "version_0").glob("privacy_ledger-*.json")).read_text())
    assert ledger["accountant"]["steps"] == 4  # the step after the checkpoint is in the ledger
    capsys.readouterr()
    assert main(["sweep", "--spec", str(tmp_path / "spec.yaml"), "--cell", "0"]) == 0
    ckpt = cell / "version_0" / "checkpoints" / "epoch=0-step=3.ckpt"
    assert f"resuming the stopped attempt from {ckpt}" in capsys.readouterr().out
    summary = json.loads((cell / "version_1" / "summary.json").read_text())
    assert summary["status"] == "completed"
    rows = (cell / "version_1" / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("epoch")
    assert {r.split(",")[col] for r in rows[1:] if r.split(",")[col]} == {"1"}  # only the epochs after the checkpoint
    return cell, summary, out


def test_a_cell_stopped_mid_epoch_resumes_and_accounts_every_step(tmp_path, monkeypatch, capsys):
    """Fixed noise (as the MNIST reproduction sweeps): the resumed run trains all of epoch 1, and its epsilon is
    dp_accounting's for 3 + 1 + 3 accounted steps (the step after the checkpoint was taken, so it counts), above
    that of the same cell trained without a stop (6 steps)."""
    grid = {"algorithm": ["dpsgd"], "noise_multiplier": [0.8], "seed": [0, 1]}
    cell, summary, out = _stop_and_resume(tmp_path, monkeypatch, capsys, grid)
    assert summary["epochs"] == 2 and summary["global_step"] == 6  # the model's updates: 3 + 3
    assert main(["sweep", "--spec", str(tmp_path / "spec.yaml"), "--cell", "1"]) == 0  # never stopped
    (other,) = [p for p in out.iterdir() if p.name.endswith("seed1")]
    plain = json.loads((other / "version_0" / "summary.json").read_text())
    assert plain["privacy"]["steps"] == 6 and summary["privacy"]["steps"] == 7
    ledger = json.loads(next((cell / "version_0").glob("privacy_ledger-*.json")).read_text())
    assert [h[2] for h in ledger["accountant"]["history"]] == [7]
    noise, rate, _ = ledger["accountant"]["history"][0]
    assert noise == 0.8
    delta = summary["privacy"]["delta"]
    assert summary["privacy"]["epsilon"] == pytest.approx(_rdp_epsilon(noise, rate, 7, delta), rel=1e-3)
    assert plain["privacy"]["epsilon"] == pytest.approx(_rdp_epsilon(noise, rate, 6, delta), rel=1e-3)
    assert summary["privacy"]["epsilon"] > plain["privacy"]["epsilon"]


def test_a_resumed_cell_with_a_target_epsilon_stops_at_its_budget(tmp_path, monkeypatch, capsys):
    """With ``target_epsilon`` (noise calibrated for 6 steps) the step the stopped attempt lost still counts, so the
    resumed run stops after 2 of epoch 1's 3 steps: 6 accounted steps, epsilon within the target (dp_accounting)."""
    cell, summary, _ = _stop_and_resume(tmp_path, monkeypatch, capsys, {"algorithm": ["dpsgd"], "epsilon": [3.0]})
    assert summary["privacy"]["steps"] == 6 and summary["global_step"] == 5
    assert summary["stop_reason"].startswith("privacy budget reached")
    ledger = json.loads(next((cell / "version_0").glob("privacy_ledger-*.json")).read_text())
    noise, rate, steps = ledger["accountant"]["history"][0]
    assert steps == 6
    expected = _rdp_epsilon(noise, rate, 6, summary["privacy"]["delta"])
    assert summary["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-3) and expected <= 3.0


RECORDING_PYTHON = """#!/bin/bash
# stands in for `python -m dplit.cli fit --config OUT/<cell>/config.yaml ...`: records its arguments, completes
dir=$(dirname "$5")
echo "$@" >> "$SWEEP_CALLS"
n=$(ls -d "$dir"/version_* 2>/dev/null | wc -l)
mkdir -p "$dir/version_$n"
echo '{"kind": "fit", "status": "completed"}' > "$dir/version_$n/summary.json"
"""


def test_the_sequential_runner_passes_the_checkpoint_of_a_stopped_attempt(tmp_path, monkeypatch, capsys):
    """`dplit sweep` (each cell its own process): a cell whose last attempt, with the same config and fit_args, left
    a checkpoint is started with `--ckpt_path` (shown in its fit.log); after its config changes it starts over."""
    from dplit.sweep import run as sweep_run

    fake = tmp_path / "python"
    fake.write_text(RECORDING_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    monkeypatch.setattr(sweep_run, "PYTHON", str(fake))
    monkeypatch.setenv("SWEEP_CALLS", str(calls))
    out = tmp_path / "sw"
    args = ["sweep", "--config", str(QUICKSTART), "--algorithms", "dpsgd", "--epsilons", "3", "--seeds", "0",
            "--out", str(out), "--", *ARGS]  # fmt: skip
    spec = from_dict({"config": str(QUICKSTART), "out": str(out), "grid": {"algorithm": ["dpsgd"], "epsilon": [3.0],
                      "seed": [0]}, "fit_args": ARGS})  # fmt: skip
    cell = expand(spec)[0]
    folder = out / cell.name
    from dplit.sweep.cells import load_base, write_cell_config

    write_cell_config(load_base(spec), spec, cell)  # what the runner writes before training the cell
    sweep_resume.record_attempt(folder, sweep_resume.attempt_key(spec, cell))  # the stopped attempt
    ckpt = _ckpt(folder / "version_0" / "checkpoints" / "epoch=3-step=12.ckpt")
    assert main(args) == 0
    assert calls.read_text().split()[-2:] == ["--ckpt_path", str(ckpt)]
    assert f"--ckpt_path {ckpt}" in (folder / "fit.log").read_text()

    calls.unlink()
    (folder / "version_1" / "summary.json").unlink()  # as if that attempt had been stopped too
    assert main([*args[: -len(ARGS)], *ARGS, "--trainer.max_epochs=3"]) == 0  # other fit_args: start over
    assert "--ckpt_path" not in calls.read_text()
    capsys.readouterr()
