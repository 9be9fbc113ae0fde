"""``dplit report`` on a sweep folder built by hand in the exact layout `dplit sweep` and `dplit fit` write."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from dplit.cli.main import main
from dplit.report.stats import mean_ci
from dplit.sweep.cells import expand
from dplit.sweep.run import write_manifest
from dplit.sweep.spec import SweepSpec

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("a", "b", "c")


def write_version(cell_dir: Path, version: int, acc: dict[str, float], seed: int, eps: float | None, status: str):
    """``CELL/version_N/{metrics.csv,config.yaml,summary.json}`` as CSVLogger, LightningCLI and RunSummary write."""
    out = cell_dir / f"version_{version}"
    out.mkdir(parents=True)
    rows: list[dict[str, float]] = [{"epoch": 0, "step": 9, "train/loss_step": 0.7}]
    if eps is not None:
        rows[0] |= {"privacy/epsilon": eps * 0.999, "privacy/delta": 1e-5}
    val = {"epoch": 0, "step": 9, "val/acc": float(np.mean(list(acc.values())))}
    val |= {f"val/acc/group={g}": a for g, a in acc.items()} | {f"val/count/group={g}": 100 for g in acc}
    rows.append(val)
    with (out / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({k for r in rows for k in r}), restval="")
        writer.writeheader()
        writer.writerows(rows)
    config = {"seed_everything": seed, "data": {"class_path": "dplit.data.ImbalancedMNISTDataModule"}}
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {"kind": "fit", "status": status, "error": None if status == "completed" else "RuntimeError: boom"}
    (out / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep(tmp_path: Path) -> tuple[Path, dict[str, dict[str, float]]]:
    """dpsgd at epsilon 1 and 8 and nodp, 3 seeds; dpsgd-eps8-seed2 failed, dpsgd-eps1-seed2 never ran, and
    nodp-seed0 failed once before completing (version_0 failed, version_1 completed)."""
    spec = SweepSpec(config=ROOT / "configs" / "quickstart.yaml", out=tmp_path / "sw", algorithms=["dpsgd", "nodp"],
                     epsilons=[1.0, 8.0], seeds=[0, 1, 2])  # fmt: skip
    cells = expand(spec)
    rng = np.random.default_rng(7)
    accs: dict[str, dict[str, float]] = {}
    for cell in cells:
        if cell.name == "dpsgd-eps1-seed2":
            continue
        level = {None: 0.9, 1.0: 0.6, 8.0: 0.8}[cell.epsilon]
        acc = {g: float(np.clip(level - 0.2 * i + rng.normal(0, 0.03), 0, 1)) for i, g in enumerate(GROUPS)}
        folder = spec.out / cell.name
        if cell.name == "dpsgd-eps8-seed2":
            write_version(folder, 0, acc, cell.seed or 0, cell.epsilon, "failed")
            continue
        version = 0
        if cell.name == "nodp-seed0":
            write_version(folder, 0, {g: 0.0 for g in GROUPS}, 0, None, "failed")
            version = 1
        write_version(folder, version, acc, cell.seed or 0, cell.epsilon, "completed")
        accs[cell.name] = acc
    write_manifest(spec, cells)
    return spec.out, accs


def _scipy_interval(values: list[float]) -> tuple[float, float]:
    x = np.asarray(values)
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    return float(x.mean()), float(high - x.mean())


def test_sweep_report_aggregates_across_seeds(sweep, capsys):
    out, accs = sweep
    assert main(["report", str(out), "--no-wandb"]) == 0
    err = capsys.readouterr().err
    assert "cell dpsgd-eps8-seed2: failed: RuntimeError: boom" in err and "cell dpsgd-eps1-seed2: pending" in err
    report = out / "report"
    data = json.loads((report / "sweep_report.json").read_text())
    labels = [(s["method"], s["target_epsilon"]) for s in data["settings"]]
    assert labels == [("nodp", None), ("dpsgd", 1.0), ("dpsgd", 8.0)]
    members = {
        ("nodp", None): ["nodp-seed0", "nodp-seed1", "nodp-seed2"],
        ("dpsgd", 1.0): ["dpsgd-eps1-seed0", "dpsgd-eps1-seed1"],
        ("dpsgd", 8.0): ["dpsgd-eps8-seed0", "dpsgd-eps8-seed1"],
    }
    for setting in data["settings"]:
        names = members[(setting["method"], setting["target_epsilon"])]
        assert setting["cells"] == names and setting["n"] == len(names)
        for g in GROUPS:
            mean, half = _scipy_interval([accs[n][g] for n in names])
            assert setting["group_acc"][g]["mean"] == pytest.approx(mean)
            assert setting["group_acc"][g]["half_width"] == pytest.approx(half)
        mean, half = _scipy_interval([min(accs[n].values()) for n in names])
        assert (setting["worst_group_acc"]["mean"], setting["worst_group_acc"]["half_width"]) == pytest.approx(
            (mean, half)
        )
        mean, half = _scipy_interval([float(np.mean(list(accs[n].values()))) for n in names])
        assert setting["overall_acc"]["mean"] == pytest.approx(mean)
        assert setting["overall_acc"]["low"] == pytest.approx(mean - half)
    nodp = data["settings"][0]
    assert nodp["reference"] and nodp["epsilon"] is None and nodp["seeds"] == [0, 1, 2]
    assert data["settings"][2]["epsilon"]["mean"] == pytest.approx(8 * 0.999)
    incomplete = {c["cell"]: c["problem"] for c in data["incomplete"]}
    assert set(incomplete) == {"dpsgd-eps8-seed2", "dpsgd-eps1-seed2"}
    assert incomplete["dpsgd-eps1-seed2"].startswith("pending")
    md = (report / "report.md").read_text()
    assert "- `dpsgd-eps8-seed2`: failed: RuntimeError: boom" in md and "- `dpsgd-eps1-seed2`: pending" in md
    worst = data["settings"][1]["worst_group_acc"]
    assert "| dpsgd | 1 | — | 0.999 | 2 |" in md
    assert f"{100 * worst['mean']:.2f} ± {100 * worst['half_width']:.2f}" in md
    for png in ("accuracy_vs_epsilon.png", "pareto.png"):
        assert (report / png).stat().st_size > 5000 and (report / png).read_bytes()[:4] == b"\x89PNG"


def _one_method_sweep(out: Path, method: str, level: float) -> dict[str, dict[str, float]]:
    """A completed sweep of one method (``nodp`` or ``dpsgd`` at epsilon 8), seeds 0-2."""
    grid = {"epsilons": [8.0]} if method != "nodp" else {}
    spec = SweepSpec(config=ROOT / "configs" / "quickstart.yaml", out=out, algorithms=[method], seeds=[0, 1, 2], **grid)
    accs = {}
    for k, cell in enumerate(expand(spec)):
        accs[cell.name] = {g: level - 0.1 * i + 0.01 * k for i, g in enumerate(GROUPS)}
        write_version(spec.out / cell.name, 0, accs[cell.name], cell.seed or 0, cell.epsilon, "completed")
    write_manifest(spec, expand(spec))
    return accs


def test_sweep_report_takes_the_reference_from_a_twin_sweep(tmp_path, capsys):
    """A DP-only sweep and the sweep of its non-DP twins (e.g. another learning rate): `--baseline TWIN_SWEEP` makes
    the twins' cells the reference, with the same aggregation as a sweep's own nodp cells."""
    dp = _one_method_sweep(tmp_path / "dp", "dpsgd", 0.7)
    twins = _one_method_sweep(tmp_path / "twins", "nodp", 0.9)
    report = tmp_path / "report"
    assert main(["report", str(tmp_path / "dp"), "--baseline", str(tmp_path / "twins"), "--out", str(report)]) == 0
    data = json.loads((report / "sweep_report.json").read_text())
    ref, dpsgd = data["settings"]
    assert ref["reference"] and ref["seeds"] == [0, 1, 2] and ref["cells"] == sorted(twins)
    assert dpsgd["method"] == "dpsgd" and dpsgd["cells"] == sorted(dp)
    worst = [min(a.values()) for a in twins.values()]
    assert ref["worst_group_acc"]["mean"] == pytest.approx(np.mean(worst))
    md = (report / "report.md").read_text()
    assert f"The non-DP reference is the `nodp` cells of the sweep `{tmp_path / 'twins'}` (`--baseline`)." in md
    gap = 100 * (np.mean([min(a.values()) for a in dp.values()]) - np.mean(worst))
    assert f"| {gap:+.2f} |" in md  # Δ worst vs the twins' reference


def test_sweep_report_refuses_a_baseline_it_cannot_use(sweep, tmp_path, capsys):
    out, _ = sweep
    assert main(["report", str(out), "--baseline", str(tmp_path)]) == 2
    assert "--baseline takes one other sweep folder (holding sweep.json)" in capsys.readouterr().err
    _one_method_sweep(tmp_path / "twins", "nodp", 0.9)
    assert main(["report", str(out), "--baseline", str(tmp_path / "twins")]) == 2
    assert "has `nodp` cells of its own, its non-DP reference: drop --baseline" in capsys.readouterr().err
    _one_method_sweep(tmp_path / "dp", "dpsgd", 0.7)
    assert main(["report", str(tmp_path / "dp"), "--baseline", str(tmp_path / "dp")]) == 2
    assert "that sweep has no `nodp` cells" in capsys.readouterr().err


def test_sweep_report_without_completed_cells_is_an_error(tmp_path, capsys):
    spec = SweepSpec(config=ROOT / "configs" / "quickstart.yaml", out=tmp_path / "sw", algorithms=["nodp"])
    write_manifest(spec, expand(spec))
    assert main(["report", str(spec.out)]) == 2
    assert "no cell has a completed run yet; run `dplit sweep` first" in capsys.readouterr().err


def test_t_interval_matches_scipy_and_handles_small_samples():
    x = [0.61, 0.58, 0.66, 0.70]
    est = mean_ci(x)
    low, high = stats.t.interval(0.95, 3, loc=np.mean(x), scale=stats.sem(x))
    assert (est.mean - est.half, est.mean + est.half, est.n) == pytest.approx((low, high, 4))
    assert mean_ci([0.5]).half is None and mean_ci([0.5, 0.5]).half == 0.0
