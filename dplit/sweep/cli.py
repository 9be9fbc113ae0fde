"""``dplit sweep``: train a grid of epsilons x seeds x algorithms, one `dplit fit` run per cell, resumable.

Examples::

    dplit sweep --spec configs/sweeps/quickstart_sweep.yaml
    dplit sweep --config configs/quickstart.yaml --epsilons 1 3 8 --seeds 0 1 2 --algorithms dpsgd nodp \\
        --out runs/sweeps/x -- --trainer.max_epochs=3
    dplit sweep --spec configs/sweeps/quickstart_sweep.yaml --emit slurm   # OUT/sweep.sbatch, one task per cell
    dplit sweep --spec OUT/sweep.yaml --cell 3                             # one cell (what a cluster job runs)
    dplit sweep --spec configs/sweeps/quickstart_sweep.yaml --jobs 2       # two cells at a time, threads shared
    dplit sweep --spec configs/sweeps/quickstart_sweep.yaml --archive docs/x/cells   # keep finished cells' logs
    dplit report OUT

Mistakes in the spec exit with code 2 and a message naming the field; a failed cell makes the exit code 1 once the
other cells have run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dplit.cli.main import error_exit
from dplit.sweep.spec import SpecError, SweepSpec, from_dict, load_spec

PROG = "dplit sweep"


def build_parser() -> argparse.ArgumentParser:
    """The ``dplit sweep`` argument parser (arguments after ``--`` go to every cell's `dplit fit`)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train a grid of epsilons x seeds x algorithms (and the non-DP twin, `nodp`), one `dplit fit` "
        "run per cell in OUT/<cell>/, sequentially and resumably, or emit it as cluster jobs. Arguments after `--` "
        "are passed to every cell's `dplit fit`.",
        epilog=f"example: {PROG} --config configs/quickstart.yaml --epsilons 1 8 --seeds 0 1 --algorithms dpsgd nodp "
        "--out runs/sweeps/x -- --trainer.max_epochs=3; then: dplit report runs/sweeps/x",
    )
    parser.add_argument("--spec", type=Path, help="sweep YAML (config, out, grid, methods, fit_args, wandb)")
    parser.add_argument("--config", type=Path, help="base `dplit fit` config with a DifferentialPrivacy callback")
    parser.add_argument("--algorithms", nargs="+", metavar="NAME", help="DP algorithms and/or nodp (the non-DP twin)")
    parser.add_argument("--epsilons", nargs="+", type=float, metavar="EPS", help="target epsilons")
    parser.add_argument("--noise-multipliers", nargs="+", type=float, metavar="SIGMA", help="fixed noise instead")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="seed_everything values")
    parser.add_argument("--out", type=Path, help="sweep folder (overrides the spec's `out`)")
    parser.add_argument("--wandb", action="store_true", help="keep the config's W&B logger: one W&B run per cell")
    parser.add_argument("--dry-run", action="store_true", help="list the cells, their status and commands; run nothing")
    parser.add_argument("--emit", choices=["slurm", "wandb"], help="write cluster jobs instead of running the cells")
    parser.add_argument("--cell", metavar="INDEX|NAME", help="run only this cell, in this process (cluster jobs)")
    parser.add_argument(
        "--archive",
        type=Path,
        metavar="DEST",
        help="keep finished cells beyond this machine: restore DEST's archived cells into OUT before running, and "
        "copy every completed cell (without checkpoints) to DEST when the sweep ends (dplit.sweep.archive)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="train N cells at a time on this machine, each with cpu_count/N threads (default 1)",
    )
    return parser


def _spec(args: argparse.Namespace, fit_args: list[str]) -> SweepSpec:
    grid_flags = {
        "--config": args.config,
        "--algorithms": args.algorithms,
        "--epsilons": args.epsilons,
        "--noise-multipliers": args.noise_multipliers,
        "--seeds": args.seeds,
    }
    given = [flag for flag, value in grid_flags.items() if value is not None]
    if args.spec is not None:
        if given:
            raise SpecError(f"{' '.join(given)} with --spec: give the grid either in the spec file or as flags")
        spec = load_spec(args.spec)
    else:
        if args.config is None or args.out is None or args.algorithms is None:
            missing = [
                f
                for f, v in (("--config", args.config), ("--algorithms", args.algorithms), ("--out", args.out))
                if v is None
            ]
            raise SpecError(
                f"missing {', '.join(missing)}: give --spec SWEEP.yaml, or --config FIT.yaml --algorithms "
                "dpsgd nodp --epsilons 1 8 --seeds 0 1 --out runs/sweeps/NAME"
            )
        grid: dict[str, object] = {"algorithm": args.algorithms}
        for key, value in (
            ("epsilon", args.epsilons),
            ("noise_multiplier", args.noise_multipliers),
            ("seed", args.seeds),
        ):
            if value is not None:
                grid[key] = value
        spec = from_dict({"config": str(args.config), "out": str(args.out), "grid": grid}, source="the flags")
    if args.out is not None:
        spec.out = args.out
    spec.fit_args += fit_args
    spec.wandb = spec.wandb or args.wandb
    return spec


def _dry_run(spec: SweepSpec, cells: list) -> int:
    from dplit.sweep.run import cell_status, fit_command

    print(f"dplit sweep: {len(cells)} cells in {spec.out} (base config {spec.config})")
    for cell in cells:
        status = cell_status(spec, cell)["status"]
        print(f"  {cell.index:>3}  {cell.name:<28} {status:<9}  {fit_command(spec, cell)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs ``dplit sweep`` on ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    fit_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    try:
        args = parser.parse_args(own)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    from dplit.sweep.cells import expand, find_cell, load_base

    try:
        spec = _spec(args, fit_args)
        if args.cell is not None and args.emit is not None:
            raise SpecError("--cell with --emit: emit the jobs first, then each job runs one --cell")
        if args.jobs < 1:
            raise SpecError(f"--jobs {args.jobs}: give the number of cells to train at a time, 1 or more")
        base = load_base(spec)
        cells = expand(spec)
        picked = [find_cell(cells, args.cell)] if args.cell is not None else cells
    except SpecError as exc:
        return error_exit(str(exc), traceback_hint=False)
    if args.dry_run:
        return _dry_run(spec, picked)
    from dplit.sweep import run

    if args.cell is None:  # the spec as run, for cluster jobs and for the report
        run.write_atomic(spec.out / run.SPEC_FILE, _spec_yaml(spec))
    if args.emit is not None:
        from dplit.sweep.emit import emit

        path = emit(args.emit, spec, cells)
        run.write_manifest(spec, cells)
        how = f"sbatch {path}" if args.emit == "slurm" else f"wandb sweep {path}"
        print(f"wrote {path} ({len(cells)} cells) and {spec.out / run.SPEC_FILE}; start it with: {how}")
        return 0
    if args.cell is None:
        from dplit.sweep.local import run_sweep

        if args.archive is None:
            return run_sweep(spec, base, cells, jobs=args.jobs)
        from dplit.sweep.archive import archive_cells, restore_cells

        restored = restore_cells(args.archive, spec.out)
        if restored:
            print(f"dplit sweep: restored {len(restored)} archived cell(s) from {args.archive}: {', '.join(restored)}")
        try:
            return run_sweep(spec, base, cells, jobs=args.jobs)
        finally:  # also after a failed or interrupted sweep: the cells that completed are kept
            kept = archive_cells(spec.out, args.archive)
            print(
                f"dplit sweep: archived {len(kept)} cell(s) to {args.archive}"
                + (f": {', '.join(kept)}" if kept else "")
            )
    cell = picked[0]
    done = run.completed_run(spec.out / cell.name)
    if done is not None:
        print(f"dplit sweep: cell {cell.index} {cell.name} already completed ({done}): skipped")
        return 0
    print(f"dplit sweep: cell {cell.index} {cell.name}: {run.fit_command(spec, cell)}", flush=True)
    code = run.run_cell_here(spec, base, cell)
    run.write_manifest(spec, cells)
    return code


def _spec_yaml(spec: SweepSpec) -> str:
    import yaml

    header = "# the sweep as `dplit sweep` ran it; cluster jobs run one cell each: dplit sweep --spec THIS --cell I\n"
    return header + yaml.safe_dump(spec.to_dict(absolute=True), sort_keys=False)


if __name__ == "__main__":
    sys.exit(main())
