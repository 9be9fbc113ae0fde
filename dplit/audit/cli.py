"""``dplit audit``: an empirical lower bound on a training run's epsilon, from one run (Steinke et al. 2023).

Example::

    dplit audit --config configs/quickstart.yaml --canaries 1000 --out audit/
    dplit audit --config configs/mnist_nodp.yaml --canaries 500 --trainer.max_epochs 3

The canary run is written to ``--out``/run (its ``summary.json`` says ``kind: audit``), never next to the config's
training runs, so ``dplit report`` cannot mistake it for one.

The config trains as with ``dplit fit`` (any LightningCLI override may follow), with ``--canaries`` training examples
turned into mislabelled canaries, each trained on with probability 1/2. Afterwards the canaries with the lowest loss
on their wrong label are guessed "in", those with the highest "out", and the number of correct guesses gives a
lower bound on epsilon that holds with probability ``--confidence`` (see ``dplit.audit.bound``). A few
human-readable lines go to stdout; the LAST line is one JSON object (also written to ``--out/audit.json``).
Bad input exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from dplit.audit.bound import audit_from_scores, guess_grid
from dplit.audit.canaries import AuditError, CanaryDataModule, canary_scores
from dplit.callbacks.privacy import DifferentialPrivacy
from dplit.cli.errors import CLIUsageError

PROG = "dplit audit"


@dataclass(frozen=True)
class AuditResult:
    """Outcome of a one-run audit."""

    epsilon_lower_bound: float
    claimed_epsilon: float | None
    """Epsilon spent according to the DifferentialPrivacy callback's accountant; None for a non-DP run."""
    claimed_delta: float | None
    delta: float
    """Delta of the (eps, delta)-DP hypothesis the bound rejects."""
    confidence: float
    canaries: int
    included: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    grid: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        """The summary printed as the last output line and written to ``audit.json``."""
        return {
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "claimed_epsilon": self.claimed_epsilon,
            "confidence": self.confidence,
            "canaries": self.canaries,
            "included": self.included,
            "guesses": self.guesses,
            "correct": self.correct,
            "delta": self.delta,
        }


def run_audit(
    trainer: L.Trainer,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    *,
    canaries: int,
    confidence: float = 0.95,
    seed: int = 0,
    delta: float | None = None,
    guesses: list[int] | None = None,
) -> AuditResult:
    """Train ``model`` on ``datamodule`` with ``canaries`` mislabelled canaries and audit the result.

    Args:
        trainer: a fresh single-device trainer, DP (DifferentialPrivacy callback) or not.
        canaries: number of canaries m (taken out of the training set).
        confidence: probability with which the returned lower bound holds.
        seed: seed of the canaries and of their inclusion.
        delta: delta of the tested (eps, delta)-DP hypothesis; default: the DifferentialPrivacy callback's
            delta, or 0 (pure DP) without one.
        guesses: guess counts r to try (Bonferroni over them); default: ``guess_grid(canaries)``.
    """
    if trainer.world_size > 1:
        raise AuditError("the audit runs on one device; set `--trainer.devices 1` (and no multi-node strategy).")
    grid = guess_grid(canaries) if guesses is None else sorted(set(guesses))
    if any(not 1 <= r <= canaries for r in grid):
        raise AuditError(f"--guesses must be between 1 and --canaries ({canaries}), got {guesses}")
    wrapped = CanaryDataModule(datamodule, canaries=canaries, seed=seed)
    wrapped.prepare_data()
    wrapped.setup("fit")  # builds the canaries now: a bad --canaries fails before training
    trainer.fit(model, datamodule=wrapped)
    dps = [cb for cb in trainer.callbacks if isinstance(cb, DifferentialPrivacy)]  # type: ignore[attr-defined]
    claimed = float(dps[0].epsilon) if dps else None
    claimed_delta = float(dps[0].config.delta) if dps else None
    tested_delta = delta if delta is not None else (claimed_delta or 0.0)
    assert wrapped.included is not None
    scores = canary_scores(model, wrapped)
    best = audit_from_scores(scores, wrapped.included, confidence, tested_delta, grid)
    return AuditResult(
        epsilon_lower_bound=best.epsilon_lower_bound,
        claimed_epsilon=claimed,
        claimed_delta=claimed_delta,
        delta=tested_delta,
        confidence=confidence,
        canaries=canaries,
        included=int(wrapped.included.sum()),
        guesses=best.guesses,
        correct=best.correct,
        k_plus=best.k_plus,
        k_minus=best.k_minus,
        grid=best.grid,
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``dplit audit`` argument parser (its own flags; everything else goes to LightningCLI)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        description="Empirical privacy audit in one training run (Steinke, Nasr & Jagielski 2023): trains the config "
        "with mislabelled canaries, half of them included at random, and turns correct membership guesses into a "
        "lower bound on epsilon. Other arguments (--config, --trainer.*, --model.*, --data.*) are those of "
        "`dplit fit`. The last output line is a JSON object.",
        epilog=f"example: {PROG} --config configs/quickstart.yaml --canaries 1000 --out audit/",
    )
    parser.add_argument("--canaries", type=int, default=1000, metavar="M", help="canaries m (default: 1000)")
    parser.add_argument(
        "--confidence", type=float, default=0.95, help="probability that the lower bound holds (default: 0.95)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("audit"),
        help="folder for audit.json and, in its run/ sub-folder, the canary training run (default: audit/); the "
        "run is kept apart from the config's training runs so that `dplit report` never reads it",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the canaries and their inclusion (default: seed_everything)"
    )
    parser.add_argument(
        "--delta",
        type=float,
        default=None,
        help="delta of the tested (eps, delta)-DP hypothesis (default: the DifferentialPrivacy callback's delta, "
        "0 for a non-DP run)",
    )
    parser.add_argument(
        "--guesses",
        type=int,
        nargs="+",
        default=None,
        metavar="R",
        help="guess counts r to try, the best one Bonferroni-corrected (default: 2%%..100%% of the canaries, 8 "
        "values); one value fixed in advance needs no correction",
    )
    return parser


def _input_error(args: argparse.Namespace, rest: list[str]) -> str | None:
    if args.canaries < 1:
        return f"--canaries must be >= 1, got {args.canaries}"
    if not 0.0 < args.confidence < 1.0:
        return f"--confidence must be in (0, 1), got {args.confidence}"
    if args.delta is not None and not 0.0 <= args.delta < 1.0:
        return f"--delta must be in [0, 1), got {args.delta}"
    if args.guesses is not None and any(not 1 <= r <= args.canaries for r in args.guesses):
        return f"--guesses must be between 1 and --canaries ({args.canaries}), got {args.guesses}"
    if not rest:
        return "give the run to audit: --config X.yaml (and/or LightningCLI arguments as for `dplit fit`)"
    return None


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _report(result: AuditResult, seed: int) -> list[str]:
    if result.claimed_epsilon is None:
        claimed = "claimed epsilon: none (no DifferentialPrivacy callback: a non-private run)"
    else:
        claimed = f"claimed epsilon: {result.claimed_epsilon:.4g} at delta {result.claimed_delta:g} (accountant)"
    correction = f"best of {len(result.grid)} guess counts, Bonferroni-corrected" if len(result.grid) > 1 else "fixed"
    return [
        claimed,
        f"canaries: {result.canaries} mislabelled training examples, {result.included} included "
        f"(each with probability 1/2, seed {seed})",
        f"guesses: {result.guesses} ({result.k_plus} in, {result.k_minus} out, {correction}), "
        f"correct: {result.correct} ({result.correct / result.guesses:.1%})",
        f"epsilon lower bound: {result.epsilon_lower_bound:.4g} at confidence {result.confidence:g} "
        f"(delta {result.delta:g}; Steinke et al. 2023, Theorem 3.1)",
    ]


def main(argv: list[str] | None = None) -> int:
    """Runs ``dplit audit`` on ``argv`` (default: ``sys.argv[1:]``); returns the exit code (2 on bad input)."""
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:  # argparse printed usage and the message; --help exits 0
        return exc.code if isinstance(exc.code, int) else 2
    error = _input_error(args, rest)
    if error is not None:
        parser.print_usage(sys.stderr)
        return _fail(error)
    from dplit.callbacks.summary import RunSummary
    from dplit.cli.lightning import DplitCLI  # the LightningCLI stack only once the flags are valid

    if not any(a.split("=", 1)[0] == "--trainer.default_root_dir" for a in rest):
        rest = [*rest, f"--trainer.default_root_dir={args.out / 'run'}"]
    try:
        cli = DplitCLI(args=rest, run=False)
        for run_summary in (cb for cb in cli.trainer.callbacks if isinstance(cb, RunSummary)):  # type: ignore[attr-defined]
            run_summary.kind, run_summary.print_table = "audit", False  # summary.json marks the canary run as an audit
        if cli.datamodule is None:
            raise AuditError("the config has no `data:` DataModule; the audit needs one to place the canaries")
        seed_cfg = cli.config.get("seed_everything")
        seed = args.seed if args.seed is not None else (seed_cfg if type(seed_cfg) is int else 0)
        result = run_audit(
            cli.trainer,
            cli.model,
            cli.datamodule,
            canaries=args.canaries,
            confidence=args.confidence,
            seed=int(seed),
            delta=args.delta,
            guesses=args.guesses,
        )
    except SystemExit as exc:  # jsonargparse printed the usage and the bad argument
        return exc.code if isinstance(exc.code, int) else 2
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("DPLIT_TRACEBACK"):
            raise
        prefix = "" if isinstance(err, AuditError | CLIUsageError) else f"{type(err).__name__}: "
        return _fail(f"{prefix}{err}")
    summary = json.dumps(result.to_json())
    print("\n".join(_report(result, int(seed))))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "audit.json").write_text(summary + "\n")
    print(f"wrote {args.out / 'audit.json'} (the canary training run: {cli.trainer.log_dir})")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
