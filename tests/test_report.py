"""``dplit report`` on run folders written in the exact CSVLogger/LightningCLI layout; stats against scipy."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from dplit.report.cli import log_to_wandb, main
from dplit.report.runs import ReportError, group_settings, load_run, online_wandb_run
from dplit.report.stats import difference_ci, mean_ci, spearman_rho, t_quantile

MNIST = "dplit.data.ImbalancedMNISTDataModule"
NONDP = {"a": 0.98, "b": 0.70, "c": 0.90}
DP = {"a": 0.96, "b": 0.50, "c": 0.85}  # cost: a 2 pp, b 20 pp, c 5 pp -> gap 18 pp, rho -1
COUNTS = {"a": 500, "b": 50, "c": 200}


def write_run(root, acc, *, sigma=None, eps=None, seed=0, test=None, data=MNIST, version=0, groups=True):
    """A run as `dplit fit` writes it: ROOT/version_N/{metrics.csv,config.yaml}, CSVLogger's sorted header and
    empty cells; epoch 0 logs worse accuracies than the last epoch (1); optional test/ row at the end."""
    rows = []
    for epoch in range(2):
        step = 10 * epoch + 9
        train = {"epoch": epoch, "step": step, "train/loss_step": 1.0 / (epoch + 1)}
        if sigma is not None:
            train |= {
                "privacy/epsilon": eps * (epoch + 1) / 2,
                "privacy/delta": 1e-5,
                "privacy/noise_multiplier": sigma,
            }
        val = {"epoch": epoch, "step": step, "val/acc": float(np.mean(list(acc.values()))) - 0.1 * (1 - epoch)}
        if groups:
            for g, a in acc.items():
                val |= {f"val/acc/group={g}": a - 0.1 * (1 - epoch), f"val/count/group={g}": COUNTS[g]}
            val |= {f"val/loss/group={g}": 0.5 for g in acc} | {"val/worst_group_acc": min(acc.values())}
        rows += [train, val]
    if test is not None:
        rows.append({"epoch": 1, "step": 19} | {f"test/acc/group={g}": a for g, a in test.items()})
    out = Path(root) / f"version_{version}"
    out.mkdir(parents=True)
    with (out / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({k for r in rows for k in r}), restval="")
        writer.writeheader()
        writer.writerows(rows)
    callbacks = [] if sigma is None else [
        {"class_path": "dplit.callbacks.DifferentialPrivacy",
         "init_args": {"noise_multiplier": sigma, "target_epsilon": None, "max_grad_norm": 1.0, "delta": 1e-5}}
    ]  # fmt: skip
    config = {
        "seed_everything": seed,
        "trainer": {"max_epochs": 2, "callbacks": callbacks, "logger": [
            {"class_path": "dplit.loggers.AutoWandbLogger", "init_args": {"project": "dplit", "entity": "lab"}}]},
        "model": {"class_path": "dplit.tasks.ClassificationTask", "init_args": {"lr": 0.1}},
        "data": {"class_path": data, "init_args": {"batch_size": 128}},
    }  # fmt: skip
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    return Path(root)


def shifted(acc, delta):
    return {g: a + delta for g, a in acc.items()}


def png_ok(path):
    return path.is_file() and path.stat().st_size > 1024 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_dp_vs_baseline(tmp_path, capsys):
    dp = write_run(tmp_path / "dp", DP, sigma=1.0, eps=3.0)
    base = write_run(tmp_path / "nodp", NONDP)
    out = tmp_path / "out"
    assert main([str(dp), "--baseline", str(base), "--out", str(out), "--title", "Demo"]) == 0
    md = (out / "report.md").read_text()
    assert md.startswith("# Demo\n") and "`val` split" in md
    for row in (
        "| a | 500 | 98.00 | 96.00 | 2.00 |",
        "| b | 50 | 70.00 | 50.00 | 20.00 |",
        "| c | 200 | 90.00 | 85.00 | 5.00 |",
    ):
        assert row in md  # last epoch (1), not epoch 0
    assert "**Cost gap** (max - min privacy cost over groups): 18.00 pp (largest: group b, smallest: group a)" in md
    assert "**Worst-group accuracy**: DP 50.00% (group b) vs non-DP 70.00% (group b)" in md
    assert "-1.000: strong negative" in md and '"the poor get poorer"' in md
    assert "| 3 | 1e-05 | 0 | 77.00 |" in md  # runs table: epsilon, delta, seed, overall accuracy
    for name in ("group_accuracy", "privacy_cost", "poor_get_poorer"):
        assert png_ok(out / f"{name}.png") and f"]({name}.png)" in md
    assert not (out / "accuracy_vs_epsilon.png").exists()
    table = list(csv.DictReader((out / "groups.csv").open()))
    assert [r["group"] for r in table] == ["a", "b", "c"]
    assert float(table[1]["privacy_cost"]) == pytest.approx(0.20)
    assert "Traceback" not in capsys.readouterr().err


def test_seeds_give_paired_confidence_intervals(tmp_path):
    offsets = [0.0, 0.02, -0.01]  # per seed; baseline seeds move half as much -> paired costs differ by seed
    dp = [write_run(tmp_path / f"dp{s}", shifted(DP, o), sigma=1.0, eps=3.0 + 0.01 * s, seed=s)
          for s, o in enumerate(offsets)]  # fmt: skip
    base = [write_run(tmp_path / f"nodp{s}", shifted(NONDP, o / 2), seed=s) for s, o in enumerate(offsets)]
    assert len(group_settings([load_run(p) for p in dp])) == 1  # same sigma, epsilons within 5%: one setting
    out = tmp_path / "out"
    assert main([*map(str, dp), "--baseline", *map(str, base), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    diffs = np.array([(NONDP["b"] + o / 2) - (DP["b"] + o) for o in offsets])
    half = sps.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3)
    dp_b = DP["b"] + np.array(offsets)
    dp_half = sps.t.ppf(0.975, 2) * dp_b.std(ddof=1) / math.sqrt(3)
    assert f"| {100 * dp_b.mean():.2f} ± {100 * dp_half:.2f} | {100 * diffs.mean():.2f} ± {100 * half:.2f} |" in md
    assert "95% confidence interval" in md and not (tmp_path / "out" / "accuracy_vs_epsilon.png").exists()


def test_several_epsilons_add_accuracy_vs_epsilon(tmp_path):
    runs = [write_run(tmp_path / f"dp_s{sig}_{seed}", shifted(DP, 0.02 * sig), sigma=sig, eps=8.0 / sig**2, seed=seed)
            for sig in (1.0, 2.0) for seed in (0, 1)]  # fmt: skip
    settings = group_settings([load_run(p) for p in runs])
    assert [sorted(r.seed for r in s) for s in settings] == [[0, 1], [0, 1]]
    assert [s[0].epsilon for s in settings] == [2.0, 8.0]
    out = tmp_path / "out"
    assert main([*map(str, runs), "--baseline", str(write_run(tmp_path / "nodp", NONDP)), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## DP ε=2 vs non-DP" in md and "## DP ε=8 vs non-DP" in md
    assert png_ok(out / "accuracy_vs_epsilon.png") and "](accuracy_vs_epsilon.png)" in md


def test_without_baseline_only_dp_side(tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "privacy_cost.png").write_bytes(b"stale")
    assert main([str(write_run(tmp_path / "dp", DP, sigma=1.0, eps=3.0)), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "privacy cost per group needs the non-DP twin" in md and "--baseline" in md
    assert "| b | 50 | 50.00 |" in md and "Worst-group accuracy**: DP 50.00% (group b)." in md
    assert png_ok(out / "group_accuracy.png")
    assert not (out / "privacy_cost.png").exists() and not (out / "poor_get_poorer.png").exists()


def write_summary(version_dir, **fields):
    """summary.json as dplit.callbacks.RunSummary writes it (only the fields the report reads)."""
    summary = {"kind": "fit", "status": "completed", "error": None, "privacy": None, "acc": 0.8, "split": "val"}
    summary.update(fields)
    (Path(version_dir) / "summary.json").write_text(json.dumps(summary))


def test_split_and_version_selection(tmp_path):
    dp = write_run(tmp_path / "dp", shifted(DP, -0.3), sigma=1.0, eps=3.0)
    write_run(dp, DP, sigma=1.0, eps=3.0, version=1, test=shifted(DP, -0.05))
    base = write_run(tmp_path / "nodp", NONDP, test=NONDP)
    with pytest.raises(ReportError, match="holds 2 training runs") as err:  # never silently the newest
        load_run(dp)
    assert str(dp / "version_0") in str(err.value) and str(dp / "version_1") in str(err.value)
    write_summary(dp / "version_0", status="failed", error="RuntimeError: boom")
    assert load_run(dp).path.name == "version_1" and load_run(dp / "version_0").path.name == "version_0"
    assert load_run(dp).group_acc("val")["b"] == pytest.approx(0.50)  # last epoch of version_1
    out = tmp_path / "out"
    assert main([str(dp), "--baseline", str(base), "--out", str(out), "--split", "auto"]) == 0
    md = (out / "report.md").read_text()
    assert "`test` split" in md and "| b | — | 70.00 | 45.00 | 25.00 |" in md  # test rows log no counts


def test_report_picks_the_one_training_run_and_says_which(tmp_path, capsys):
    """Audits, evaluations, failed and empty runs next to a training run are never picked; the report names the
    folder it read; several training runs are refused with the candidates listed."""
    dp = write_run(tmp_path / "dp", DP, sigma=1.0, eps=3.0)
    write_summary(dp / "version_0", privacy={"epsilon": 3.0})
    write_run(dp, shifted(DP, -0.4), sigma=1.0, eps=9.0, version=1)
    write_summary(dp / "version_1", kind="audit")
    (dp / "version_2").mkdir()  # a run that failed before logging: config.yaml at most
    (dp / "version_2" / "config.yaml").write_text("trainer: {}\n")
    write_run(dp, shifted(DP, -0.4), sigma=1.0, eps=9.0, version=3)
    write_summary(dp / "version_3", status="interrupted")
    write_run(dp, shifted(DP, -0.4), version=4, test=DP)
    write_summary(dp / "version_4", kind="test")
    base = write_run(tmp_path / "nodp", NONDP)
    out = tmp_path / "picked"
    assert main([str(dp), "--baseline", str(base), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"DP run: reading {dp / 'version_0'}, fit completed, epsilon 3" in stdout
    assert f"(the one completed training run in {dp})" in stdout
    assert f"baseline: reading {base / 'version_0'}, no summary.json" in stdout
    assert "| b | 50 | 70.00 | 50.00 | 20.00 |" in (out / "report.md").read_text()  # version_0's numbers
    write_run(dp, DP, sigma=1.0, eps=3.0, version=5)
    err = _error(tmp_path, capsys, [dp, "--baseline", base])
    assert "holds 2 training runs; pass the one to compare" in err
    assert f"{dp / 'version_0'}, fit completed" in err and f"{dp / 'version_5'}, no summary.json" in err
    only_bad = tmp_path / "bad"
    write_run(only_bad, DP, sigma=1.0, eps=3.0)
    write_summary(only_bad / "version_0", kind="audit")
    (only_bad / "version_1").mkdir()
    err = _error(tmp_path, capsys, [only_bad])
    assert "no completed training run in it" in err and "version_0: a `dplit audit` canary run" in err
    assert "version_1: no metrics.csv" in err
    # named explicitly, a non-training run is read, with a warning
    assert main([str(dp / "version_3"), "--baseline", str(base), "--out", str(out)]) == 0
    assert "interrupted; read because it was named explicitly" in capsys.readouterr().err


def test_test_split_points_at_the_test_run(tmp_path, capsys):
    dp = write_run(tmp_path / "dp", DP, sigma=1.0, eps=3.0)
    write_summary(dp / "version_0")
    write_run(dp, DP, version=1, test=DP)
    write_summary(dp / "version_1", kind="test")
    base = write_run(tmp_path / "nodp", NONDP, test=NONDP)
    err = _error(tmp_path, capsys, [dp, "--baseline", base, "--split", "test"])
    assert f"`dplit test` writes its own run folder: pass that one ({dp / 'version_1'})" in err


def test_last_evaluation_is_read_not_stale_values(tmp_path):
    rows = [
        {"epoch": 0, "step": 9, "val/acc/group=a": 0.5, "val/acc/group=c": 0.4, "val/acc": 0.45},
        {"epoch": 0, "step": 9, "privacy/epsilon": 1.0, "train/loss_step": 0.3},
        {"epoch": 1, "step": 19, "val/acc/group=a": 0.9, "val/acc": 0.9},  # c had no examples: not logged
        {"epoch": 1, "step": 19, "privacy/epsilon": 2.0},
    ]
    (tmp_path / "version_0").mkdir()
    with (tmp_path / "version_0" / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({k for r in rows for k in r}), restval="")
        writer.writeheader()
        writer.writerows(rows)
    run = load_run(tmp_path)
    assert run.group_acc("val") == {"a": 0.9} and run.overall_acc("val") == 0.9
    assert run.is_dp and run.epsilon == 2.0 and run.seed is None  # no config.yaml: DP read from the metrics


def _error(tmp_path, capsys, argv):
    code = main([*map(str, argv), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not (tmp_path / "out" / "report.md").exists()
    return err


def test_errors_name_the_run_and_the_fix(tmp_path, capsys):
    dp = write_run(tmp_path / "dp", DP, sigma=1.0, eps=3.0)
    base = write_run(tmp_path / "nodp", NONDP)
    empty = tmp_path / "empty" / "version_0"
    empty.mkdir(parents=True)
    err = _error(tmp_path, capsys, [empty.parent, "--baseline", base])
    assert f"{empty.parent}: no metrics.csv" in err and "CSVLogger" in err
    assert "no such run directory" in _error(tmp_path, capsys, [tmp_path / "nope"])
    bare = write_run(tmp_path / "bare", DP, sigma=1.0, eps=3.0, groups=False)
    err = _error(tmp_path, capsys, [bare, "--baseline", base])
    assert str(bare) in err and "no per-group metrics: add dplit.callbacks.SubgroupMetrics to the config" in err
    other = write_run(tmp_path / "other", NONDP, data="dplit.data.OtherDataModule")
    err = _error(tmp_path, capsys, [dp, "--baseline", other])
    assert "mismatched tasks" in err and "dplit.data.OtherDataModule" in err and str(other) in err
    fewer = write_run(tmp_path / "fewer", {"a": 0.9, "b": 0.8})
    assert "mismatched tasks" in _error(tmp_path, capsys, [dp, "--baseline", fewer])
    err = _error(tmp_path, capsys, [dp, "--baseline", write_run(tmp_path / "dp2", DP, sigma=2.0, eps=1.0)])
    assert "given as --baseline but it is a DP run" in err and "non-DP twin" in err
    err = _error(tmp_path, capsys, [base])
    assert f"{base / 'version_0'}: not a DP run" in err and "--baseline" in err
    err = _error(tmp_path, capsys, [dp, "--baseline", base, "--split", "test"])
    assert "no per-group test/ metrics" in err and "dplit test" in err and "--split val" in err
    assert _error(tmp_path, capsys, [dp, "--split", "train"])  # argparse: invalid choice, exit 2


def test_wandb_only_for_online_runs(tmp_path, monkeypatch):
    run_dir = write_run(tmp_path / "dp", DP, sigma=1.0, eps=3.0)
    assert online_wandb_run(load_run(run_dir)) is None  # no wandb/ folder
    wandb_dir = run_dir / "wandb"
    (wandb_dir / "offline-run-20260101_000000-off123").mkdir(parents=True)
    (wandb_dir / "latest-run").symlink_to("offline-run-20260101_000000-off123")
    assert online_wandb_run(load_run(run_dir)) is None
    (wandb_dir / "run-20260102_000000-abc123").mkdir()
    (wandb_dir / "latest-run").unlink()
    (wandb_dir / "latest-run").symlink_to("run-20260102_000000-abc123")
    assert online_wandb_run(load_run(run_dir)) == ("abc123", "dplit", "lab")
    calls: list = []
    fake_run = SimpleNamespace(log=lambda data: calls.append(("log", sorted(data))), finish=lambda: None)
    fake = SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)) or fake_run,
        Image=lambda path: path,
        Table=lambda columns, data: (columns, data),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)  # never the real client: no network in tests
    png = tmp_path / "group_accuracy.png"
    log_to_wandb([load_run(run_dir)], [png], [])
    assert calls == []  # WANDB_MODE=disabled (conftest) wins
    monkeypatch.setenv("WANDB_MODE", "online")  # with the fake module above: still no network
    log_to_wandb([load_run(run_dir)], [png], [])
    assert calls[0][0] == "init" and calls[0][1]["id"] == "abc123" and calls[0][1]["resume"] == "allow"
    assert calls[1] == ("log", ["report/group_accuracy", "report/groups"])


def test_spearman_rho_against_scipy():
    assert spearman_rho([0.9, 0.8, 0.7, 0.6], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(-1.0)
    assert spearman_rho([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    x, y = [0.9, 0.7, 0.7, 0.5, 0.9, 0.3], [1.0, 3.0, 2.0, 3.0, 1.0, 5.0]  # ties on both sides
    assert spearman_rho(x, y) == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-12)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 30).tolist(), rng.normal(size=30).tolist()
    assert spearman_rho(a, b) == pytest.approx(sps.spearmanr(a, b).statistic, abs=1e-12)
    assert math.isnan(spearman_rho([1, 1, 1], [1, 2, 3])) and math.isnan(spearman_rho([1], [2]))


def test_confidence_intervals_against_scipy():
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 3)
    rng = np.random.default_rng(1)
    for n in (2, 3, 5, 10):
        x = rng.normal(0.8, 0.05, n)
        est = mean_ci(x.tolist())
        lo, hi = sps.t.interval(0.95, n - 1, loc=x.mean(), scale=sps.sem(x))
        assert (est.mean, est.half, est.n) == (pytest.approx(x.mean()), pytest.approx((hi - lo) / 2), n)
    assert mean_ci([0.7]).half is None
    a, b = rng.normal(0.9, 0.02, 4), rng.normal(0.8, 0.05, 3)
    welch = sps.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    est = difference_ci(a.tolist(), b.tolist())  # no seeds: Welch
    assert est.mean - est.half == pytest.approx(welch.low) and est.mean + est.half == pytest.approx(welch.high)
    paired = difference_ci(a[:3].tolist(), b.tolist(), [0, 1, 2], [2, 1, 0])  # paired by seed, not by position
    assert paired.half == pytest.approx(mean_ci((a[:3] - b[::-1]).tolist()).half)


def _capture_figures(monkeypatch) -> dict[str, object]:
    from dplit.report import plots

    figures: dict[str, object] = {}
    save = plots._save

    def keep(fig, path):
        figures[Path(path).stem] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def test_poor_get_poorer_sizes_are_training_counts_and_single_seed_is_said(tmp_path, monkeypatch):
    train = {"a": 5000, "b": 100, "c": 2000}  # validation counts are 500/50/200 (COUNTS): a different ranking scale
    dp = write_run(tmp_path / "dp", DP, sigma=1.0, eps=3.0)
    base = write_run(tmp_path / "nodp", NONDP)
    for run in (dp, base):
        write_summary(run / "version_0", train_counts=train)
    figures = _capture_figures(monkeypatch)
    out = tmp_path / "out"
    assert main([str(dp), "--baseline", str(base), "--out", str(out)]) == 0
    ax = figures["poor_get_poorer"].axes[0]
    sizes = list(ax.collections[0].get_sizes())
    assert sizes == pytest.approx([30 + 400 * train[g] / 5000 for g in ("a", "b", "c")])
    assert "point size: training examples of the group" in ax.get_title()
    for name in ("group_accuracy", "privacy_cost", "poor_get_poorer"):
        assert "n=1 seed, no intervals" in figures[name].axes[0].get_title(), name
    md = (out / "report.md").read_text()
    assert "Error bars: n=1 seed, no intervals." in md and "(point size: training examples of the group)" in md


def test_several_seeds_and_unknown_training_counts_are_said(tmp_path, monkeypatch):
    dp = [write_run(tmp_path / f"dp{s}", shifted(DP, 0.01 * s), sigma=1.0, eps=3.0, seed=s) for s in range(3)]
    base = [write_run(tmp_path / f"nodp{s}", shifted(NONDP, 0.01 * s), seed=s) for s in range(3)]
    figures = _capture_figures(monkeypatch)
    assert main([*map(str, dp), "--baseline", *map(str, base), "--out", str(tmp_path / "out")]) == 0
    title = figures["poor_get_poorer"].axes[0].get_title()
    assert "n=3 seeds, bars: 95% CI" in title and "point size: evaluation examples" in title
    sizes = list(figures["poor_get_poorer"].axes[0].collections[0].get_sizes())
    assert sizes == pytest.approx([30 + 400 * COUNTS[g] / 500 for g in ("a", "b", "c")])


def test_no_baseline_hint_names_a_config_that_exists(tmp_path):
    configs = Path(__file__).resolve().parents[1] / "configs"
    dp = write_run(tmp_path / "dp", DP, sigma=1.0, eps=3.0)
    write_summary(dp / "version_0", config=[str(configs / "quickstart.yaml")])
    assert main([str(dp), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    hint = md.split("**No baseline**", 1)[1].split("\n", 1)[0]
    named = hint.split("dplit fit --config ", 1)[1].split("`", 1)[0]
    assert Path(named).name == "quickstart_nodp.yaml" and Path(named).is_file()
    assert "--baseline runs/quickstart_nodp" in hint
    other = write_run(tmp_path / "other", DP, sigma=1.0, eps=3.0)  # no summary.json: no config known
    assert main([str(other), "--out", str(tmp_path / "out2")]) == 0
    md = (tmp_path / "out2" / "report.md").read_text()
    assert "<task>" not in md and "without the `DifferentialPrivacy` callback" in md
