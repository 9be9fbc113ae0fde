"""One-run privacy audit (Steinke et al. 2023): the statistics against scipy, canaries, real audits, the CLI."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from dp_helpers import trainer
from scipy import optimize, special, stats
from torch import nn

from dplit.audit import (
    AuditError,
    CanaryDataModule,
    audit_from_scores,
    epsilon_lower_bound,
    log_binom_tail,
    p_value,
    run_audit,
)
from dplit.audit.bound import guess_grid
from dplit.audit.cli import main as audit_main
from dplit.callbacks import DifferentialPrivacy
from dplit.cli import main as dplit_main
from dplit.data import ImbalancedMNISTDataModule
from dplit.tasks.classification import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


# ---------------------------------------------------------------- statistics, against scipy
def _scipy_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Theorem 3.1 written directly with scipy: f(v) + 2 m delta max_i (f(v - i) - f(v)) / i."""
    q = special.expit(eps)

    def f(u: int) -> float:
        return float(stats.binom.sf(u - 1, r, q))  # P[Binomial(r, q) >= u]

    if delta == 0:
        return f(v)
    alpha = max(((f(v - i) - f(v)) / i for i in range(1, m + 1)), default=0.0)
    return min(f(v) + 2 * m * delta * alpha, 1.0)


def _scipy_lower_bound(m: int, r: int, v: int, confidence: float, delta: float = 0.0) -> float:
    """Brute force: root of p(eps) = beta on a fine grid bracket, with scipy's binomial."""
    beta = 1 - confidence
    if _scipy_p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    hi = 1.0
    while _scipy_p_value(m, r, v, hi, delta) <= beta:
        hi *= 2
    return optimize.brentq(lambda e: _scipy_p_value(m, r, v, e, delta) - beta, 0.0, hi, xtol=1e-10)


@pytest.mark.parametrize(("v", "n", "p"), [(0, 10, 0.3), (3, 10, 0.3), (10, 10, 0.5), (60, 100, 0.5), (990, 1000, 0.9)])
def test_binomial_tail_matches_scipy(v, n, p):
    expected = stats.binom.sf(v - 1, n, p)
    assert math.exp(log_binom_tail(v, n, p)) == pytest.approx(expected, rel=1e-9)
    eps = math.log(p / (1 - p))
    assert math.exp(log_binom_tail(v, n, eps=eps)) == pytest.approx(expected, rel=1e-9)


def test_tail_far_beyond_double_range_stays_finite():
    # P[Binomial(5000, 1/2) = 5000] = 2^-5000 underflows a double; its log does not
    assert log_binom_tail(5000, 5000, 0.5) == pytest.approx(-5000 * math.log(2), rel=1e-12)


@pytest.mark.parametrize(("m", "r", "v", "eps", "delta"), [(100, 40, 30, 1.0, 1e-3), (1000, 200, 150, 0.5, 1e-5)])
def test_p_value_with_delta_matches_the_theorem(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(_scipy_p_value(m, r, v, eps, delta), rel=1e-9)


def test_all_correct_bound_grows_with_guesses_and_matches_scipy():
    bounds = []
    for r in (5, 10, 20, 50, 100, 200):
        eps = epsilon_lower_bound(1000, r, r, confidence=0.95)
        # all correct: p(eps) = q^r, so the bound is logit(0.05^(1/r)) in closed form
        assert eps == pytest.approx(special.logit(0.05 ** (1 / r)), abs=1e-6)
        assert eps == pytest.approx(_scipy_lower_bound(1000, r, r, 0.95), abs=1e-6)
        bounds.append(eps)
    assert bounds == sorted(bounds) and bounds[0] < bounds[-1]
    assert bounds[-1] == pytest.approx(4.19, abs=0.01)  # 200 of 200 correct, 95%


@pytest.mark.parametrize(("m", "r", "v", "confidence", "delta"), [
    (1000, 100, 80, 0.95, 0.0), (1000, 500, 400, 0.99, 0.0), (1000, 500, 400, 0.95, 1e-5), (200, 100, 90, 0.9, 1e-3),
])  # fmt: skip
def test_bound_matches_brute_force_scipy(m, r, v, confidence, delta):
    assert epsilon_lower_bound(m, r, v, confidence, delta) == pytest.approx(
        _scipy_lower_bound(m, r, v, confidence, delta), abs=1e-6
    )


def test_no_evidence_gives_zero():
    assert epsilon_lower_bound(100, 50, 0) == 0.0  # zero correct
    assert epsilon_lower_bound(100, 50, 25) == 0.0  # chance level
    assert epsilon_lower_bound(1000, 1000, 500) == 0.0
    assert epsilon_lower_bound(10, 0, 0) == 0.0  # all abstained
    # delta only weakens the evidence
    assert epsilon_lower_bound(1000, 500, 400, delta=1e-4) < epsilon_lower_bound(1000, 500, 400)


def test_audit_from_scores_bonferroni_and_guess_rule():
    m = 200
    included = torch.arange(m) % 2 == 0
    scores = included.float() + 0.001 * torch.arange(m)  # every included canary scores above every excluded one
    grid = guess_grid(m)
    assert len(grid) == 8 and grid[-1] == m
    best = audit_from_scores(scores, included, confidence=0.95)
    assert best.guesses == m and best.correct == m  # 100 in, 100 out: all right
    assert best.epsilon_lower_bound == pytest.approx(epsilon_lower_bound(m, m, m, 1 - 0.05 / 8), abs=1e-9)
    fixed = audit_from_scores(scores, included, confidence=0.95, grid=[40])  # one r fixed a priori: no correction
    assert (fixed.k_plus, fixed.k_minus, fixed.correct) == (20, 20, 40)
    assert fixed.epsilon_lower_bound == pytest.approx(epsilon_lower_bound(m, 40, 40, 0.95), abs=1e-9)
    noise = torch.randn(m, generator=torch.Generator().manual_seed(0))
    assert audit_from_scores(noise, included).epsilon_lower_bound < 0.5


# ---------------------------------------------------------------- canaries and real audits
def _mnist(mnist_root: Path) -> ImbalancedMNISTDataModule:
    return ImbalancedMNISTDataModule(root=str(mnist_root), underrepresented={}, batch_size=32, eval_batch_size=512)


def _mlp() -> ClassificationTask:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    return ClassificationTask(backbone, optimizer=partial(torch.optim.Adam, lr=1e-3))


def test_canary_datamodule(mnist_root):
    dm = _mnist(mnist_root)
    dm.setup("fit")
    original = dm.train_dataloader().dataset
    wrapped = CanaryDataModule(dm, canaries=100, seed=3)
    wrapped.setup("fit")
    assert wrapped.canary_indices is not None and wrapped.labels is not None and wrapped.included is not None
    assert len(set(wrapped.canary_indices.tolist())) == 100
    true = torch.stack([original[i][1] for i in wrapped.canary_indices.tolist()])
    assert (wrapped.labels != true).all() and ((0 <= wrapped.labels) & (wrapped.labels < 10)).all()
    included = int(wrapped.included.sum())
    assert 30 < included < 70
    loader = wrapped.train_dataloader()
    assert loader.batch_size == 32 and len(loader.dataset) == 600 - 100 + included
    # the canaries' originals are gone; the included canaries are there with their wrong labels
    inputs = torch.stack([loader.dataset[i][0] for i in range(len(loader.dataset))]).flatten(1)
    labels = torch.stack([loader.dataset[i][1] for i in range(len(loader.dataset))])
    for k, index in enumerate(wrapped.canary_indices.tolist()):
        hits = (inputs == original[index][0].flatten()).all(1)
        assert int(hits.sum()) == int(wrapped.included[k])
        assert (labels[hits] == wrapped.labels[k]).all()
    assert wrapped.group_names == dm.group_names and wrapped.num_classes == 10
    assert len(wrapped.val_dataloader().dataset) == len(dm.val_dataloader().dataset)
    again = CanaryDataModule(_mnist(mnist_root), canaries=100, seed=3)
    again.setup("fit")
    assert torch.equal(again.canary_indices, wrapped.canary_indices) and torch.equal(again.included, wrapped.included)
    with pytest.raises(AuditError, match="more than the 600 training examples"):
        CanaryDataModule(_mnist(mnist_root), canaries=601).setup("fit")


def test_non_private_run_memorises_the_canaries(mnist_root, tmp_path):
    torch.set_num_threads(1)
    L.seed_everything(0)
    result = run_audit(trainer(tmp_path, [], max_epochs=20), _mlp(), _mnist(mnist_root), canaries=200, seed=0)
    assert result.claimed_epsilon is None and result.delta == 0.0
    assert result.correct == result.guesses >= 100  # every guess right (measured: 150 of 150)
    assert result.epsilon_lower_bound > 3.0  # measured 3.37 at 95%, Bonferroni over 8 guess counts


def test_dp_run_stays_below_its_claimed_epsilon(mnist_root, tmp_path):
    torch.set_num_threads(1)
    L.seed_everything(0)
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, ledger=False)
    result = run_audit(trainer(tmp_path, [dp], max_epochs=10), _mlp(), _mnist(mnist_root), canaries=200, seed=0)
    assert result.claimed_epsilon is not None and result.claimed_epsilon > 1.0
    assert result.delta == 1e-5
    assert result.epsilon_lower_bound <= result.claimed_epsilon
    assert result.epsilon_lower_bound < 1.0  # the noise hides the canaries (measured: 0)


# ---------------------------------------------------------------- the command line
def test_cli_end_to_end_on_the_quickstart(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config writes to runs/quickstart
    torch.set_num_threads(1)
    argv = [
        "audit",
        f"--config={QUICKSTART}",
        "--canaries=60",
        "--out=audit",
        "--trainer.max_steps",  # LightningCLI overrides, also space-separated, pass through
        "3",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.batch_size=32",
    ]
    assert dplit_main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert {"epsilon_lower_bound", "claimed_epsilon", "confidence", "canaries", "guesses", "correct"} <= set(summary)
    # the quickstart calibrates its noise to target epsilon 3 over the planned 3 steps: the claim is that target
    assert summary["claimed_epsilon"] is not None and 2.97 <= summary["claimed_epsilon"] <= 3.0
    assert summary["canaries"] == 60 and summary["confidence"] == 0.95
    assert 0 <= summary["correct"] <= summary["guesses"] <= 60
    assert 0 <= summary["epsilon_lower_bound"] <= summary["claimed_epsilon"]
    assert any(line.startswith("claimed epsilon: ") for line in lines)
    assert json.loads((tmp_path / "audit" / "audit.json").read_text()) == summary
    # the canary run lives under --out, marked as an audit, never where the config's training runs are picked up
    assert not (tmp_path / "runs").exists()
    run = json.loads((tmp_path / "audit" / "run" / "version_0" / "summary.json").read_text())
    assert run["kind"] == "audit" and run["status"] == "completed"
    assert dplit_main(["report", "audit/run", "--out", "report"]) == 2
    assert "version_0: a `dplit audit` canary run" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--confidence=1.5"], "--confidence must be in (0, 1)"),
    (["--canaries=0"], "--canaries must be >= 1"),
    (["--canaries=10", "--guesses", "20"], "--guesses must be between 1 and --canaries (10)"),
    (["--delta=2"], "--delta must be in [0, 1)"),
    (["--canaries=100000"], "--canaries 100000 is more than the 3634 training examples"),
])  # fmt: skip
def test_bad_input_exits_2_with_a_message(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert audit_main([f"--config={QUICKSTART}", *argv, "--trainer.enable_progress_bar=false"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_config_and_unknown_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert audit_main(["--canaries=10"]) == 2
    assert "--config" in capsys.readouterr().err
    assert audit_main([f"--config={QUICKSTART}", "--trainer.no_such_flag=1"]) == 2
    assert "no_such_flag" in capsys.readouterr().err
