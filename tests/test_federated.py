"""Federated runs end to end: a real Flower simulation (Ray on loopback), every configs/fed_*.yaml on fixtures
through the real ClientApp, crashed clients and the accountant, bad input, and `dplit report` on the run folders."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml
from federated_fixtures import LocalGrid, write_reddit, write_sent140, write_shakespeare

from dplit.cli.main import main as dplit_main
from dplit.federated.config import FederatedConfigError, load_config, parse_config
from dplit.federated.server import RunOutcome, run_rounds
from dplit.privacy.accounting import compute_epsilon

pytest.importorskip("flwr", reason="the `federated` extra (flwr[simulation]) is not installed")
pytestmark = [
    pytest.mark.federated,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:DifferentialPrivacy. `insecure_testing_seed`"),
]

ROOT = Path(__file__).resolve().parents[1]
FED_CONFIGS = sorted((ROOT / "configs").glob("fed_*.yaml"))
TINY_MODEL = {"hidden_size": 8, "embedding_dim": 8, "oov_buckets": 64, "embedding_source": None}


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def _fixture_config(config: Path, tmp_path: Path, rounds: int = 2, **federated: float) -> dict:
    """A fed config with its data on tiny fixtures, a tiny model, q = 0.5 over 4 users."""
    raw = yaml.safe_load(config.read_text())
    if raw["data"]["dataset"] == "sent140":
        raw["data"].update(root=str(write_sent140(tmp_path / "sent140")), size_bins=[5], vocab_bins=[10])
    elif raw["data"]["dataset"] == "reddit":
        root = write_reddit(tmp_path / "reddit")
        raw["data"].update(root=str(root), vocab_file=str(root / "vocab.txt"), size_bins=[20], vocab_bins=[8])
    else:
        raw["data"].update(root=str(write_shakespeare(tmp_path / "plays", repeat=12)), seq_len=10, stride=5,
                           size_bins=[10], vocab_bins=[12])  # fmt: skip
    raw["model"].update({k: v for k, v in TINY_MODEL.items() if k in raw["model"]})
    raw["federated"].update({"rounds": rounds, "sample_rate": 0.5, "local_batch_size": 4, **federated})
    if raw.get("privacy"):
        raw["privacy"].update(delta=1e-3, insecure_testing_seed=0)
    raw["output_dir"] = str(tmp_path / "runs" / config.stem)
    return raw


def test_flower_simulation_two_rounds_four_clients(tmp_path):
    """The real engine: `dplit federate` runs Flower's simulation (Ray, loopback) with one SuperNode per user."""
    config = tmp_path / "fed.yaml"
    raw = _fixture_config(ROOT / "configs" / "fed_sent140_dp.yaml", tmp_path, rounds=5)
    raw["privacy"].update(noise_multiplier=1.0, target_epsilon=None)
    raw["simulation"] = {"num_cpus": 1, "client_cpus": 1}  # one Ray worker: one import of the training stack
    config.write_text(yaml.safe_dump(raw))
    assert dplit_main(["federate", "--config", str(config), "--rounds", "2"]) == 0
    run = Path(raw["output_dir"]) / "version_0"
    rows = _rows(run)
    assert [int(float(r["round"])) for r in rows] == [1, 2]
    for r, row in enumerate(rows, start=1):  # accounted per round, as dplit's accountant composes (q, z) r times
        expected = compute_epsilon(noise_multiplier=1.0, sample_rate=0.5, steps=r, delta=1e-3)
        assert float(row["privacy/epsilon"]) == pytest.approx(expected)
        assert int(float(row["fed/updates"])) == int(float(row["fed/participants"]))
    assert any(int(float(r["fed/participants"])) > 0 for r in rows)
    assert "val/acc/group=<10" in rows[-1] or "val/acc/group=>=10" in rows[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["privacy"]["steps"] == 2


@pytest.mark.parametrize("config", FED_CONFIGS, ids=[c.stem for c in FED_CONFIGS])
def test_fed_configs_run_on_fixtures(config, tmp_path):
    """Every configs/fed_*.yaml (not `dplit fit` configs: tests/test_configs.py leaves them to this test)."""
    from dplit.federated.client import make_client_app

    cfg = parse_config(_fixture_config(config, tmp_path))
    outcome = RunOutcome()
    from dplit.federated.data import load_data

    grid = LocalGrid(make_client_app(cfg), load_data(cfg.data).num_users)
    run_rounds(grid, cfg, 2, outcome)
    assert outcome.error is None, outcome.error
    rows = _rows(Path(outcome.run_dir))
    assert len(rows) == 2 and float(rows[-1]["val/acc"]) >= 0
    assert any(k.startswith("val/acc/group=") for k in rows[-1]) and any(
        k.startswith("val/acc/size=") for k in rows[-1]
    )
    assert ("privacy/epsilon" in rows[-1]) == ("_dp" in config.stem)
    if "_dp" in config.stem:  # target_epsilon calibrated z over the 2 rounds run (not the config's planned rounds)
        target = cfg.privacy.target_epsilon
        assert 0.99 * target <= float(rows[-1]["privacy/epsilon"]) <= target
    assert sum(len(s) for s in grid.sent) == sum(int(float(r["fed/participants"])) for r in rows)


def test_crashed_clients_still_account_the_round(tmp_path):
    raw = _fixture_config(ROOT / "configs" / "fed_sent140_dp.yaml", tmp_path, sample_rate=1.0)
    raw["privacy"].update(noise_multiplier=2.0, target_epsilon=None)
    cfg = parse_config(raw)
    from dplit.federated.client import make_client_app

    grid = LocalGrid(make_client_app(cfg), 4, crash=frozenset({0, 2}))
    outcome = RunOutcome()
    run_rounds(grid, cfg, 2, outcome)
    assert outcome.error is None
    rows = _rows(Path(outcome.run_dir))
    assert [int(float(r["fed/failed"])) for r in rows] == [2, 2]
    assert [int(float(r["fed/updates"])) for r in rows] == [2, 2]
    expected = compute_epsilon(noise_multiplier=2.0, sample_rate=1.0, steps=2, delta=1e-3)
    assert float(rows[-1]["privacy/epsilon"]) == pytest.approx(expected)


def test_fewer_nodes_than_users_is_refused(tmp_path):
    cfg = parse_config(_fixture_config(ROOT / "configs" / "fed_sent140_dp.yaml", tmp_path))
    from dplit.federated.client import make_client_app

    outcome = RunOutcome()
    run_rounds(LocalGrid(make_client_app(cfg), 3), cfg, 2, outcome, node_timeout_s=0.0)
    assert isinstance(outcome.error, FederatedConfigError)
    assert "3 client node(s) are connected but the data has 4 users" in str(outcome.error)
    summary = json.loads((Path(outcome.run_dir) / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds"] == 0  # nothing sampled, nothing accounted


def test_client_without_data_or_user_is_a_clear_error(tmp_path):
    from dplit.federated.client import local_train
    from dplit.federated.data import load_data

    cfg = parse_config(_fixture_config(ROOT / "configs" / "fed_sent140_nodp.yaml", tmp_path))
    data = load_data(cfg.data)
    with pytest.raises(ValueError, match="partition-id 7 is outside the 4 users"):
        local_train(cfg, data, 7, None, 1)  # type: ignore[arg-type]
    data.users[0].y_train = data.users[0].y_train[:0]
    try:
        with pytest.raises(ValueError, match="has no training data"):
            local_train(cfg, data, 0, None, 1)  # type: ignore[arg-type]
    finally:
        from dplit.federated import data as data_module

        data_module._load.cache_clear()  # the cached users were modified above


def test_missing_extra_and_bad_config_messages(tmp_path, monkeypatch, capsys):
    good = _fixture_config(ROOT / "configs" / "fed_sent140_dp.yaml", tmp_path)
    cases = {
        "unknown key(s) ['clipp'] in": {**good, "privacy": {**good["privacy"], "clipp": 1}},
        "exactly one of `noise_multiplier` and `target_epsilon`": {
            **good,
            "privacy": {**good["privacy"], "noise_multiplier": 1.0},
        },  # noqa: E501
        "federated.sample_rate (q) must be in (0, 1]": {**good, "federated": {**good["federated"], "sample_rate": 2}},
        "data.size_bins must be increasing": {**good, "data": {**good["data"], "size_bins": [10, 5]}},
        "LEAF data not found": {**good, "data": {**good["data"], "root": str(tmp_path / "nowhere")}},
    }
    for needle, raw in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(raw))
        assert dplit_main(["federate", "--config", str(path)]) == 2
        assert needle in capsys.readouterr().err
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(good))
    assert load_config(tmp_path / "ok.yaml").privacy is not None
    monkeypatch.setitem(sys.modules, "flwr", None)
    monkeypatch.setitem(sys.modules, "flwr.simulation", None)
    assert dplit_main(["federate", "--config", str(tmp_path / "ok.yaml")]) == 2
    assert "pip install 'dplit[federated]'" in capsys.readouterr().err


def test_report_reads_dp_and_nodp_federated_runs(tmp_path):
    from dplit.federated.client import make_client_app
    from dplit.report.runs import load_run

    dirs = []
    for name in ("fed_sent140_dp", "fed_sent140_nodp"):
        cfg = parse_config(_fixture_config(ROOT / "configs" / f"{name}.yaml", tmp_path))
        outcome = RunOutcome()
        run_rounds(LocalGrid(make_client_app(cfg), 4), cfg, 2, outcome)
        assert outcome.error is None
        dirs.append(Path(cfg.output_dir))
    dp, nodp = (load_run(d) for d in dirs)
    assert dp.is_dp and not nodp.is_dp and dp.epsilon is not None and dp.epsilon > 0
    assert dp.groups("val") and set(dp.group_acc("val")) <= {"<10", ">=10"}
    out = tmp_path / "report"
    assert dplit_main(["report", str(dirs[0]), "--baseline", str(dirs[1]), "--out", str(out), "--no-wandb"]) == 0
    assert (out / "report.md").is_file()
