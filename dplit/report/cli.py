"""``dplit report``: per-group disparate-impact report of DP runs against their non-DP twin.

Example::

    dplit report runs/mnist_dp --baseline runs/mnist_nodp --out report/
    dplit report runs/dp_eps1_s0 runs/dp_eps1_s1 runs/dp_eps8_s0 runs/dp_eps8_s1 --baseline runs/nodp_s0 runs/nodp_s1

Writes ``report.md``, ``groups.csv`` and PNGs into ``--out``. Bad input exits with code 2 and a message that names the
run directory and the fix.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from dplit.report.markdown import TABLE_COLUMNS, render, table_rows
from dplit.report.runs import (
    ReportError,
    Run,
    check_same_task,
    choose_split,
    group_settings,
    load_run,
    online_wandb_run,
)
from dplit.report.select import describe_run, why_not_a_training_run
from dplit.report.stats import Summary, summarize

PROG = "dplit report"
PNG_NAMES = ("group_accuracy", "privacy_cost", "poor_get_poorer", "accuracy_vs_epsilon")


def build_parser() -> argparse.ArgumentParser:
    """The ``dplit report`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Per-group report of who pays for the privacy: DP runs (several epsilons and/or seeds) against "
        "their non-DP twin. Writes report.md, groups.csv and PNGs.",
        epilog=f"example: {PROG} runs/mnist_dp --baseline runs/mnist_nodp --out report/",
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="DP runs (RUN or RUN/version_N)")
    parser.add_argument(
        "--baseline",
        nargs="+",
        type=Path,
        default=[],
        metavar="NONDP_RUN_DIR",
        help="non-DP twin run(s) (seeds); for a sweep folder without nodp cells: the sweep of its non-DP twins",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: report/; for a sweep folder: SWEEP/report/)"
    )
    parser.add_argument(
        "--split",
        choices=["val", "test", "auto"],
        default="auto",
        help="metrics to compare; auto: test/ when every run has it, else the last val/ epoch (default: auto)",
    )
    parser.add_argument("--title", default=None, help="title of report.md")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report to the runs' online W&B runs")
    return parser


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _load(paths: list[Path], role: str) -> list[Run]:
    runs: list[Run] = []
    for path in paths:
        run = load_run(path)
        if any(r.path.resolve() == run.path.resolve() for r in runs):
            _warn(f"{path}: given twice, used once")
            continue
        picked = f" (the one completed training run in {path})" if run.path != path else ""
        print(f"{role}: reading {describe_run(run.path)}{picked}")
        why = why_not_a_training_run(run.path)
        if why is not None:
            _warn(f"{run.path}: {why}; read because it was named explicitly")
        if not (run.path / "config.yaml").is_file():
            _warn(f"{path}: no config.yaml next to metrics.csv: seed and task unknown, DP read from the metrics")
        runs.append(run)
    return runs


def _validate(dp: list[Run], baseline: list[Run]) -> None:
    for run in baseline:
        if run.is_dp:
            why = "DifferentialPrivacy in trainer.callbacks" if run.privacy_args is not None else "privacy/epsilon"
            raise ReportError(
                f"{run.path}: given as --baseline but it is a DP run ({why}): the baseline must be the non-DP twin "
                "(e.g. configs/<task>_nodp.yaml); pass DP runs before --baseline"
            )
    for run in dp:
        if not run.is_dp:
            raise ReportError(
                f"{run.path}: not a DP run (no dplit.callbacks.DifferentialPrivacy in trainer.callbacks, no "
                f"privacy/epsilon logged): pass it as the non-DP twin with --baseline {run.path}"
            )
        if run.epsilon is None:
            _warn(f"{run.path}: DP run without a logged privacy/epsilon: its epsilon is unknown")
    seeds = [r.seed for r in baseline if r.seed is not None]
    if len(seeds) != len(set(seeds)):
        _warn(f"baseline runs share a seed ({sorted(seeds)}): they are not independent seeds")


def _summaries(dp: list[Run], baseline: list[Run], split: str) -> list[Summary]:
    summaries: list[Summary] = []
    for members in group_settings(dp):
        seeds = [r.seed for r in members if r.seed is not None]
        if len(seeds) != len(set(seeds)):
            _warn(f"{', '.join(str(r.path) for r in members)}: same privacy setting and same seed: not independent")
        eps = [r.epsilon for r in members if r.epsilon is not None]
        epsilon = sum(eps) / len(eps) if eps else None
        sigma = (members[0].privacy_args or {}).get("noise_multiplier")
        label = f"ε={epsilon:.3g}" if epsilon is not None else f"σ={sigma}" if sigma is not None else "ε=?"
        if any(s.label == label for s in summaries):
            label = f"{label} #{sum(s.label.startswith(label) for s in summaries) + 1}"
        summaries.append(summarize(label, epsilon, members, baseline, split))
    return summaries


def _plots(summaries: list[Summary], out: Path, split: str, has_baseline: bool) -> list[Path]:
    from dplit.report import plots  # matplotlib only once the input is valid

    pngs = [plots.group_accuracy(summaries, out / "group_accuracy.png", split)]
    if has_baseline:
        pngs.append(plots.privacy_cost(summaries, out / "privacy_cost.png"))
        pngs.append(plots.poor_get_poorer(summaries, out / "poor_get_poorer.png"))
    if len({f"{s.epsilon:.3g}" for s in summaries if s.epsilon is not None}) >= 2:
        pngs.append(plots.accuracy_vs_epsilon(summaries, out / "accuracy_vs_epsilon.png", split))
    for name in PNG_NAMES:  # a plot from an earlier report in the same folder that no longer applies
        stale = out / f"{name}.png"
        if stale not in pngs and stale.is_file():
            stale.unlink()
    return pngs


def log_to_wandb(runs: list[Run], pngs: list[Path], summaries: list[Summary]) -> None:
    """Optional: log the PNGs and the per-group table into each DP run's *online* W&B run (resumed by id).

    Skipped when ``WANDB_MODE`` is disabled/offline, when no run's ``wandb/latest-run`` is an online run, when
    wandb is not installed, or when W&B is not reachable with credentials (``dplit.loggers.resolve_wandb_mode``).
    Upload failures only warn: the local report is the product.
    """
    if os.environ.get("WANDB_MODE", "").lower() in ("disabled", "offline", "dryrun"):
        return
    targets = {t[0]: (run, t) for run in runs if (t := online_wandb_run(run)) is not None}
    if not targets:
        return
    try:
        import wandb
    except ImportError:
        return
    from dplit.loggers import resolve_wandb_mode

    if resolve_wandb_mode("auto") != "online":  # not logged in, or the server is unreachable: never block
        _warn("W&B is not reachable with credentials: the report was not logged to W&B")
        return
    for run_id, (run, (_, project, entity)) in targets.items():
        try:
            wrun = wandb.init(id=run_id, project=project, entity=entity, resume="allow", dir=str(run.root))
            data: dict[str, object] = {f"report/{png.stem}": wandb.Image(str(png)) for png in pngs}
            columns: list[str | int] = [*TABLE_COLUMNS]
            data["report/groups"] = wandb.Table(columns=columns, data=table_rows(summaries))
            wrun.log(data)
            wrun.finish()
            print(f"logged the report to W&B run {run_id}")
        except Exception as exc:  # noqa: BLE001 - an upload problem must not fail the local report
            _warn(f"could not log the report to W&B run {run_id} ({exc})")


def main(argv: list[str] | None = None) -> int:
    """Runs ``dplit report`` on ``argv`` (default: ``sys.argv[1:]``); returns the exit code (2 on bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed usage and the message; --help exits 0
        return exc.code if isinstance(exc.code, int) else 2
    if len(args.runs) == 1 and (args.runs[0] / "sweep.json").is_file():  # a `dplit sweep` folder: its own report
        from dplit.sweep.report import report_sweep

        return report_sweep(args.runs[0], args.out, args.split, args.title, args.baseline)
    try:
        dp, baseline = _load(args.runs, "DP run"), _load(args.baseline, "baseline")
        _validate(dp, baseline)
        split = choose_split(dp + baseline, args.split)
        check_same_task(dp + baseline, split)
    except ReportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    summaries = _summaries(dp, baseline, split)
    out: Path = args.out or Path("report")
    out.mkdir(parents=True, exist_ok=True)
    pngs = _plots(summaries, out, split, bool(baseline))
    data = dp[0].data_class
    title = args.title or "Who pays for the privacy? Per-group impact of DP" + (
        f" ({data.rsplit('.', 1)[-1]})" if data else ""
    )
    (out / "report.md").write_text(render(title, summaries, dp, baseline, split, pngs))
    with (out / "groups.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TABLE_COLUMNS)
        writer.writerows(table_rows(summaries))
    print(f"wrote {out / 'report.md'}, {out / 'groups.csv'} and {', '.join(p.name for p in pngs)}")
    if not args.no_wandb:
        log_to_wandb(dp, pngs, summaries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
