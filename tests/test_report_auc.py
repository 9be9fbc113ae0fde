"""``dplit report`` shows per-group ROC AUC and the AUC gap beside accuracy when the runs logged them.

The runs are real fits (SubgroupMetrics + CSVLogger, so the metric names are the ones SubgroupMetrics writes); the
AUC values the report shows are checked against sklearn's ``roc_auc_score`` on the final models' scores.
"""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from dp_helpers import TinyData, tiny_task, trainer
from lightning.pytorch.loggers import CSVLogger
from sklearn.metrics import roc_auc_score

from dplit.callbacks import DifferentialPrivacy, SubgroupMetrics
from dplit.report.cli import main
from dplit.report.runs import load_run


def _fit(root, dp: bool, compute_auc: bool = True):
    """One epoch on TinyData (200 examples, groups majority/minority), evaluated on the same 200 examples."""
    L.seed_everything(0)
    data, model = TinyData(), tiny_task()
    callbacks = [SubgroupMetrics(compute_auc=compute_auc, train_diagnostics=False, wandb_panels=False)]
    if dp:
        callbacks.append(DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, ledger=False))
    fit = trainer(root, callbacks, logger=CSVLogger(root, name=""), limit_val_batches=None)
    fit.fit(model, datamodule=data)
    model.eval()
    with torch.no_grad():
        scores = model(data.x).softmax(-1)[:, 1]
    aucs = {name: roc_auc_score(data.y[data.group == g], scores[data.group == g])
            for g, name in enumerate(data.group_names)}  # fmt: skip
    return root, aucs


def _row(md: str, group: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {group} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_report_shows_group_auc_and_gap(tmp_path):
    dp, dp_auc = _fit(tmp_path / "dp", dp=True)
    base, base_auc = _fit(tmp_path / "nodp", dp=False)
    assert load_run(dp).group_auc("val") == pytest.approx(dp_auc, abs=1e-6)
    out = tmp_path / "out"
    assert main([str(dp), "--baseline", str(base), "--out", str(out), "--no-wandb"]) == 0
    md = (out / "report.md").read_text()
    assert "Per-group ROC AUC (val/auc/group=..., binary and multi-label tasks) in %" in md
    assert "| group | count | non-DP acc (%) | DP acc (%) | privacy cost (pp) | non-DP AUC (%) | DP AUC (%) |" in md
    for group in ("majority", "minority"):
        cells = _row(md, group)
        assert cells[5:] == [f"{100 * base_auc[group]:.2f}", f"{100 * dp_auc[group]:.2f}"]
    gap_dp = abs(dp_auc["majority"] - dp_auc["minority"])
    gap_base = abs(base_auc["majority"] - base_auc["minority"])
    low_dp, low_base = min(dp_auc, key=dp_auc.__getitem__), min(base_auc, key=base_auc.__getitem__)
    assert (f"- **AUC gap** (max - min per-group ROC AUC): DP {100 * gap_dp:.2f} pp (lowest AUC: group {low_dp}) vs "
            f"non-DP {100 * gap_base:.2f} pp (lowest AUC: group {low_base}).") in md  # fmt: skip
    table = {r["group"]: r for r in csv.DictReader((out / "groups.csv").open())}
    for group in ("majority", "minority"):
        assert float(table[group]["dp_auc"]) == pytest.approx(dp_auc[group], abs=1e-6)
        assert float(table[group]["nondp_auc"]) == pytest.approx(base_auc[group], abs=1e-6)


def test_runs_without_auc_keep_the_accuracy_table(tmp_path):
    dp, _ = _fit(tmp_path / "dp", dp=True, compute_auc=False)
    base, base_auc = _fit(tmp_path / "nodp", dp=False)
    out = tmp_path / "out"
    assert main([str(dp), "--out", str(out), "--no-wandb"]) == 0  # no baseline, no AUC: the old table
    md = (out / "report.md").read_text()
    assert "| group | count | DP acc (%) |\n" in md and "AUC" not in md
    assert main([str(dp), "--baseline", str(base), "--out", str(out), "--no-wandb"]) == 0  # AUC on one side only
    md = (out / "report.md").read_text()
    assert _row(md, "minority")[5:] == [f"{100 * base_auc['minority']:.2f}", "—"]
    assert "AUC gap** (max - min per-group ROC AUC): DP — pp vs non-DP" in md
