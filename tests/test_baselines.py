"""`dplit baseline`: NON-private scikit-learn baselines on a config's data, written in the run format of `dplit fit`
with SubgroupMetrics' metric names, so `dplit report` reads them beside a DP run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from tabular_fixtures import write_credit

from dplit.baselines import group_metrics
from dplit.cli import DplitCLI, main

ROOT = Path(__file__).resolve().parents[1]


def _header(run: Path) -> set[str]:
    return set(next(csv.reader(next(run.glob("version_0/metrics.csv")).open())))


def test_baseline_runs_have_the_neural_metric_names_and_feed_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_credit(tmp_path / "credit", n=800)
    config = ROOT / "configs" / "credit_dp.yaml"
    root = f"--data.init_args.root={tmp_path / 'credit'}"
    DplitCLI(args=["fit", f"--config={config}", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
                   "--trainer.enable_progress_bar=false", root])  # fmt: skip
    data = f"--set=root={tmp_path / 'credit'}"
    assert main(["baseline", f"--config={config}", data, "--models=ensemble", "--seed=0", "--threads=1"]) == 0
    code = main(["baseline", f"--config={config}", data, "--models=hgb", "--seed", "0", "1", "--threads=1"])
    out = capsys.readouterr().out
    assert code == 0 and "NOT differentially private" in out
    neural = {k for k in _header(tmp_path / "runs" / "credit_dp") if k.startswith("val/")}
    hgb_runs = sorted(p.name for p in (tmp_path / "runs" / "credit_dp_hgb").glob("version_*"))
    assert hgb_runs == ["version_0", "version_1"]  # one per seed
    for name in ("credit_dp_hgb", "credit_dp_ensemble"):
        run = tmp_path / "runs" / name
        assert neural == {k for k in _header(run) if k.startswith("val/")}  # same names as SubgroupMetrics logs
        summary = json.loads((run / "version_0" / "summary.json").read_text())
        assert summary["differentially_private"] is False and summary["privacy"] is None
    assert "val/acc/sex&age=female&25-39" in neural  # intersections, as the config's SubgroupMetrics asks

    report = tmp_path / "report"
    code = main(["report", "runs/credit_dp", "--baseline", "runs/credit_dp_hgb/version_1", "--out", str(report),
                 "--no-wandb"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader((tmp_path / "runs/credit_dp_hgb/version_1/metrics.csv").open()))
    text = (report / "report.md").read_text()
    assert f"{100 * float(rows[0]['val/acc/group=female']):.2f}" in text  # the baseline's group accuracy shown


def test_group_metrics_match_independent_references():
    rng = np.random.default_rng(0)
    n = 500
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    group = np.stack([rng.integers(0, 2, n), rng.integers(0, 3, n)], 1)
    attributes = {"sex": ["male", "female"], "age": ["<25", "25-39", "40+"]}
    out = group_metrics(probs, y, group, attributes, "test", intersections=True)
    preds = probs.argmax(1)
    for g, name in enumerate(attributes["sex"]):
        m = group[:, 0] == g
        assert out[f"test/acc/group={name}"] == pytest.approx(float((preds[m] == y[m]).mean()))
        assert out[f"test/auc/group={name}"] == pytest.approx(roc_auc_score(y[m], p1[m]))
    for g, name in enumerate(attributes["age"]):
        m = group[:, 1] == g
        assert out[f"test/acc/age={name}"] == pytest.approx(float((preds[m] == y[m]).mean()))
    m = (group[:, 0] == 1) & (group[:, 1] == 2)
    assert out["test/acc/sex&age=female&40+"] == pytest.approx(float((preds[m] == y[m]).mean()))
    accs = [float((preds[group[:, 1] == g] == y[group[:, 1] == g]).mean()) for g in range(3)]
    assert out["test/acc_gap/age"] == pytest.approx(max(accs) - min(accs))
    assert out["test/loss"] == pytest.approx(float(-np.log(probs[np.arange(n), y]).mean()))


def test_baseline_without_data_is_a_clear_error(tmp_path, capsys):
    code = main(["baseline", f"--config={ROOT / 'configs' / 'german_transfer_dp.yaml'}", f"--set=root={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "german.data not found" in err and "data.init_args.root" in err
