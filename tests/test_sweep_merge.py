"""Pooling a sweep report over some seeds with a report over other seeds (``dplit.sweep.merge``), checked against
``mean_ci`` / scipy over all the seeds' values, and the reproduction script's ``--merge`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats
from test_sweep_archive import _acc, _sweep, _train
from test_sweep_report import GROUPS, ROOT

from dplit.cli.main import main
from dplit.report.stats import Estimate, mean_ci
from dplit.sweep.archive import archive_cells
from dplit.sweep.merge import MergeError, check_confidence, merge_settings, pool, settings_from_json


@pytest.mark.parametrize(("n1", "n2"), [(2, 1), (1, 1), (3, 4), (1, 5), (2, 2)])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_pooled_summary_equals_the_summary_of_all_values(n1, n2, confidence):
    rng = np.random.default_rng(n1 * 10 + n2)
    a, b = rng.normal(0.7, 0.1, n1), rng.normal(0.6, 0.05, n2)
    whole = np.concatenate([a, b])
    pooled = pool(mean_ci(a, confidence), mean_ci(b, confidence), confidence)
    assert pooled.n == n1 + n2
    assert pooled.mean == pytest.approx(whole.mean(), abs=1e-12)
    low, high = stats.t.interval(confidence, whole.size - 1, loc=whole.mean(), scale=stats.sem(whole))
    assert pooled.half == pytest.approx((high - low) / 2, rel=1e-9)


def test_pool_of_equal_values_has_zero_width_and_a_missing_width_is_refused():
    assert pool(Estimate(0.5, 0.0, 2), Estimate(0.5, None, 1)) == Estimate(0.5, 0.0, 3)
    with pytest.raises(MergeError, match="without its half-width"):
        pool(Estimate(0.5, None, 2), Estimate(0.4, None, 1))


def _report(out) -> dict:
    assert main(["report", str(out), "--no-wandb"]) == 0
    return json.loads((out / "report" / "sweep_report.json").read_text())


def test_merged_reports_equal_the_report_over_every_seed(tmp_path, capsys):
    whole, cells = _sweep(tmp_path / "whole", [0, 1, 2])
    first, _ = _sweep(tmp_path / "first", [0, 1])
    second, _ = _sweep(tmp_path / "second", [2])
    for cell in cells:
        _train(whole.out / cell.name, cell, minutes=1)
        _train((first if cell.seed in (0, 1) else second).out / cell.name, cell, minutes=1)
    reference, a, b = _report(whole.out), _report(first.out), _report(second.out)
    capsys.readouterr()
    merged = merge_settings(settings_from_json(a), settings_from_json(b), check_confidence(a, b))
    expect = settings_from_json(reference)
    assert [(s.method, s.target_epsilon) for s in merged] == [(s.method, s.target_epsilon) for s in expect]
    for m, e in zip(merged, expect, strict=True):
        assert sorted(m.seeds) == [0, 1, 2] and sorted(m.cells) == sorted(e.cells)
        for got, want in [(m.overall, e.overall), (m.worst, e.worst), (m.epsilon, e.epsilon)] + [
            (m.groups[g], e.groups[g]) for g in GROUPS
        ]:
            if want is None:
                assert got is None
                continue
            assert got is not None and got.n == want.n == 3
            assert got.mean == pytest.approx(want.mean, abs=1e-12)
            assert got.half == pytest.approx(want.half, rel=1e-9, abs=1e-12)
    with pytest.raises(MergeError, match="seeds \\[0, 1\\] are in both"):
        merge_settings(settings_from_json(a), settings_from_json(a))
    with pytest.raises(MergeError, match="confidence"):
        check_confidence(a, {**b, "confidence": 0.9})


def test_reproduction_script_merges_an_earlier_summary(tmp_path):
    """Seeds 0-1 survive only as a committed summary; seed 2 is archived. ``--merge`` writes the 3-seed table, the
    pooled ``sweep_report.json`` and the plots, and says where each seed came from."""
    earlier, cells = _sweep(tmp_path / "earlier", [0, 1], noise=True)
    for cell in cells:
        _train(earlier.out / cell.name, cell, minutes=2)
    summary = tmp_path / "seeds01.json"
    summary.write_text(json.dumps(_report(earlier.out)))
    later, cells2 = _sweep(tmp_path / "later", [2], noise=True)
    for cell in cells2:
        _train(later.out / cell.name, cell, minutes=9)
    docs = tmp_path / "docs"
    archive_cells(later.out, docs / "cells")
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce_mnist_disparate_impact.py"), "--out",
           str(tmp_path / "new"), "--docs", str(docs), "--seeds", "2", "--methods", "nodp", "dpsgd", "--report-only",
           "--merge", str(summary)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((docs / "sweep_report.json").read_text())
    nodp = next(s for s in report["settings"] if s["method"] == "nodp")
    values = [float(np.mean(list(_acc(f"nodp-seed{k}").values()))) for k in (0, 1, 2)]
    assert nodp["n"] == 3 and nodp["seeds"] == [0, 1, 2]
    assert nodp["overall_acc"]["mean"] == pytest.approx(np.mean(values))
    assert report["merged_from"]["earlier_seeds"] == [0, 1]
    table = (docs / "README.md").read_text()
    assert "3 seed(s) requested (0, 1, 2;" in table and "**Seeds 0, 1 come from `seeds01.json`**" in table
    assert "| nodp | 3 | — |" in table and "| 9 |" in table  # minutes of the archived run only
    for png in ("pareto.png", "accuracy_vs_epsilon.png"):
        assert (docs / png).read_bytes()[:4] == b"\x89PNG"
