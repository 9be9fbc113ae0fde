"""RunSummary: the end-of-run table and summary.json hold the run's real numbers; the CLI adds it once; outputs follow
``--trainer.default_root_dir``; the console carries no noise the user cannot act on."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from dp_helpers import TinyData, tiny_task, trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from dplit.callbacks import DifferentialPrivacy, RunSummary, SubgroupMetrics
from dplit.callbacks.progress import _with_version, run_version
from dplit.callbacks.summary import _stop_reason
from dplit.cli import DplitCLI

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _fit(tmp_path, callbacks, **kwargs) -> tuple[L.Trainer, TinyData, torch.nn.Module]:
    L.seed_everything(0)
    data, model = TinyData(), tiny_task()
    kwargs.setdefault("limit_val_batches", None)
    fit = trainer(tmp_path, [SubgroupMetrics(), *callbacks], logger=CSVLogger(tmp_path, name=""), **kwargs)
    fit.fit(model, datamodule=data)
    return fit, data, model


def test_summary_holds_the_runs_real_numbers(tmp_path, capsys):
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, ledger=False)
    summary = RunSummary()
    fit, data, model = _fit(tmp_path, [dp, summary], max_epochs=2)
    s = json.loads((tmp_path / "version_0" / "summary.json").read_text())
    assert s["kind"] == "fit" and s["status"] == "completed" and s["stop_reason"] == "max_epochs=2 reached"
    rows = list(csv.DictReader((tmp_path / "version_0" / "metrics.csv").open()))
    logged_eps = [float(r["privacy/epsilon"]) for r in rows if r.get("privacy/epsilon")][-1]
    assert s["privacy"]["epsilon"] == pytest.approx(logged_eps) and s["privacy"]["epsilon"] > 0
    assert s["privacy"]["steps"] == fit.global_step == 20 and s["privacy"]["delta"] == 1e-5
    # per-group accuracy of the final model, computed here by hand
    model.eval()
    with torch.no_grad():
        pred = model(data.x).argmax(-1)
    for gid, name in enumerate(data.group_names):
        mask = data.group == gid
        assert s["groups"][name]["acc"] == pytest.approx(float((pred[mask] == data.y[mask]).float().mean()), abs=1e-6)
        assert s["groups"][name]["count"] == int(mask.sum())
        assert s["train_counts"][name] == int(mask.sum())
    accs = {g: v["acc"] for g, v in s["groups"].items()}
    assert s["worst_group"] == min(accs, key=accs.__getitem__)
    assert s["acc_gap"] == pytest.approx(max(accs.values()) - min(accs.values()), abs=1e-6)
    out = capsys.readouterr().out
    assert "dplit fit summary" in out and f"epsilon {logged_eps:.3f} at delta 1e-05, 20 steps" in out
    assert f"worst group   {s['worst_group']}: {100 * accs[s['worst_group']]:.1f}%" in out


def test_budget_stop_is_the_reason_given(tmp_path):
    """Training stopped by the privacy budget long before max_epochs: the summary says so, not max_epochs."""
    dp = DifferentialPrivacy(noise_multiplier=2.0, max_epsilon=1.0, delta=1e-5, ledger=False)
    fit, _, _ = _fit(tmp_path, [dp, RunSummary(print_table=False)], max_epochs=50)
    s = json.loads((tmp_path / "version_0" / "summary.json").read_text())
    assert fit.current_epoch < 50
    assert s["stop_reason"].startswith("privacy budget reached: epsilon=") and s["privacy"]["epsilon"] <= 1.0


def test_stop_reason_of_the_privacy_callback_wins():
    fake_trainer = SimpleNamespace(max_steps=10, global_step=10, max_epochs=None, current_epoch=0, callbacks=[])
    dp = SimpleNamespace(stop_reason="privacy budget reached")
    assert _stop_reason(fake_trainer, dp, "fit", "completed") == "privacy budget reached"
    assert _stop_reason(fake_trainer, SimpleNamespace(stop_reason=None), "fit", "completed") == "max_steps=10 reached"
    assert _stop_reason(fake_trainer, None, "fit", "failed") == "failed"


class _Boom(Callback):
    def on_train_batch_end(self, *args, **kwargs) -> None:
        raise RuntimeError("boom at step 1")


def test_failed_run_is_marked_failed(tmp_path, capsys):
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, [RunSummary(), _Boom()], max_epochs=1)
    s = json.loads((tmp_path / "version_0" / "summary.json").read_text())
    assert s["status"] == "failed" and s["error"] == "RuntimeError: boom at step 1"
    assert "failed (failed)" in capsys.readouterr().out


def test_validate_and_test_runs_say_what_they_are(tmp_path):
    fit, data, model = _fit(tmp_path, [RunSummary(print_table=False)], max_epochs=1)
    summary = next(cb for cb in fit.callbacks if isinstance(cb, RunSummary))
    fit.validate(model, datamodule=data)
    assert summary.summary is not None and summary.summary["kind"] == "validate"
    assert summary.summary["stop_reason"] == "validate finished" and summary.summary["privacy"] is None


def _cli(args: list[str]) -> DplitCLI:
    return DplitCLI(args=[f"--config={QUICKSTART}", "--trainer.enable_progress_bar=false", *args], run=False)


def test_cli_adds_one_summary_and_default_root_dir_moves_the_loggers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _cli([f"--trainer.default_root_dir={tmp_path / 'elsewhere'}"])
    assert sum(isinstance(cb, RunSummary) for cb in cli.trainer.callbacks) == 1
    summary = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RunSummary))
    assert summary.config_files == [str(QUICKSTART)]
    assert [Path(lg.save_dir) for lg in cli.trainer.loggers] == [tmp_path / "elsewhere"] * 2
    listed = tmp_path / "listed.yaml"
    listed.write_text(QUICKSTART.read_text().replace(
        "    - class_path: dplit.callbacks.SubgroupMetrics\n",
        "    - class_path: dplit.callbacks.SubgroupMetrics\n    - class_path: dplit.callbacks.RunSummary\n"
        "      init_args: {print_table: false}\n"))  # fmt: skip
    cli = DplitCLI(args=[f"--config={listed}", "--trainer.enable_progress_bar=false"], run=False)
    summaries = [cb for cb in cli.trainer.callbacks if isinstance(cb, RunSummary)]
    assert len(summaries) == 1 and summaries[0].print_table is False
    assert [Path(lg.save_dir) for lg in cli.trainer.loggers] == [Path("runs/quickstart")] * 2


def test_progress_bar_shows_the_version_folder_not_the_wandb_id():
    loggers = [SimpleNamespace(version="7lgurv83"), SimpleNamespace(version=3)]
    fake = SimpleNamespace(loggers=loggers)
    assert run_version(fake) == 3
    assert _with_version({"v_num": "urv8", "loss": 1.0}, fake) == {"v_num": "3", "loss": 1.0}


NOISE = ("💡 Tip", "litlogger", "litmodels", "anonymous setting", "LeafSpec", "args parameter", "Traceback")


def test_quickstart_process_end_to_end(tmp_path):
    """A real `dplit fit` process: all outputs under --trainer.default_root_dir, the summary table and summary.json
    agree with metrics.csv, W&B says where it goes, and none of the known noise is printed."""
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "dplit.cli", "fit", f"--config={QUICKSTART}", "--trainer.max_steps=3",
           "--trainer.limit_val_batches=2", "--trainer.default_root_dir=elsewhere"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "elsewhere"
    assert not (tmp_path / "runs").exists(), "the config's runs/quickstart must not be used"
    for name in ("metrics.csv", "config.yaml", "summary.json"):
        assert (run / "version_0" / name).is_file(), name
    assert len(list((run / "version_0").glob("privacy_ledger-*.json"))) == 1  # this run's own ledger
    assert list((run / "version_0" / "checkpoints").glob("*.ckpt"))
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    output = proc.stdout + proc.stderr
    for noise in NOISE:
        assert noise not in output, noise
    assert "Privacy budget reached" not in output  # the budget ran out with the planned 3 steps: no early stop
    assert output.count(f"W&B: offline (upload later: wandb sync elsewhere/wandb/{offline[0].name})") == 1
    s = json.loads((run / "version_0" / "summary.json").read_text())
    rows = list(csv.DictReader((run / "version_0" / "metrics.csv").open()))
    assert s["stop_reason"] == "max_steps=3 reached" and s["privacy"]["steps"] == 3
    assert s["privacy"]["epsilon"] == pytest.approx(
        [float(r["privacy/epsilon"]) for r in rows if r["privacy/epsilon"]][-1]
    )
    last_val = [r for r in rows if r.get("val/acc/group=8")][-1]
    assert s["groups"]["8"]["acc"] == pytest.approx(float(last_val["val/acc/group=8"]))
    assert "dplit fit summary" in proc.stdout and "status        completed (max_steps=3 reached)" in proc.stdout
    compare = next(line for line in proc.stdout.splitlines() if line.startswith("compare"))
    assert (
        "quickstart_nodp.yaml" in compare
        and "dplit report elsewhere/version_0 --baseline runs/quickstart_nodp" in compare
    )


def test_dplit_warnings_are_not_silenced(tmp_path):
    """A budget that stops training early: dplit's own warning reaches the console of a real `dplit` process."""
    config = yaml.safe_load(QUICKSTART.read_text())
    dp = next(cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("DifferentialPrivacy"))
    dp["init_args"] = {"noise_multiplier": 1.0, "max_epsilon": 2.0, "delta": 1e-5, "grad_sample_mode": "ghost"}
    path = tmp_path / "budget.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "dplit.cli", "fit", f"--config={path}", "--trainer.max_steps=40",
           "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path / 'out'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Privacy budget reached" in output and "privacy budget reached: epsilon=" in proc.stdout
