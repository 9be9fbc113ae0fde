"""Bagdasaryan & Shmatikov 2019, section 5, on the real MNIST: who pays for DP-SGD, and what each mitigation changes.

Imbalanced MNIST (class 8 cut to 500 training examples), the paper's CNN, batch 256, noise multiplier 0.8, clip 1,
delta 1e-6: the non-DP twin, DP-SGD and every registered mitigation, all at the same noise multiplier and therefore
(dplit's mitigations share the step's budget, see the README) at exactly the same epsilon. One ``dplit sweep``
(resumable: rerun the same command to continue) and one ``dplit report``; then the table under ``--docs`` with the
paper's numbers beside ours, labelled with the scale that ran. Each cell is copied without its checkpoints to
``--archive`` (default ``DOCS/cells``, committed) as soon as it completes, and archived cells are restored into
``--out`` first: a sweep spread over machines that do not keep ``runs/`` still ends with every seed's raw logs.

    python scripts/reproduce_mnist_disparate_impact.py --root ../shared/data/mnist --epochs 60 --seeds 0 1 2

The paper's full setting is 60 epochs; ``--epochs`` runs fewer (the epsilon then is smaller: it is printed and
written). Nothing here is imported by dplit.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dplit.sweep.aggregate import to_json
from dplit.sweep.archive import archive_cells, cell_minutes, restore_cells
from dplit.sweep.cells import expand
from dplit.sweep.merge import check_confidence, merge_settings, settings_from_json
from dplit.sweep.plots import accuracy_vs_epsilon, pareto
from dplit.sweep.run import completed_run, write_manifest
from dplit.sweep.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
METHODS = ["nodp", "dpsgd", "dpsgd_f", "global_adapt", "adaptive_clipping", "automatic_clipping"]
PAPER = {  # Bagdasaryan & Shmatikov 2019, section 5 (60 epochs, eps 5.9 with delta 1e-6 by their accountant)
    "nodp": {"overall": None, "8": 0.97, "2": 0.99},
    "dpsgd": {"overall": 0.975, "8": 0.77, "2": 0.98},
}
RAW_OPACUS = {"nodp": {"8": 0.932, "2": 0.995}, "dpsgd": {"8": 0.660, "2": 0.961}}  # issue 11: eps 5.90 (RDP)


def config_optimiser(args: argparse.Namespace) -> None:
    """Fills ``--lr`` / ``--momentum`` left unset from ``--config``'s optimiser (written into every cell's flags, so the
    sweep spec records them)."""
    opt = yaml.safe_load(args.config.read_text())["model"]["init_args"]["optimizer"].get("init_args", {})
    args.lr = float(opt["lr"]) if args.lr is None else args.lr
    args.momentum = float(opt.get("momentum", 0.0)) if args.momentum is None else args.momentum


def spec(args: argparse.Namespace) -> dict:
    fit_args = [
        f"--data.root={args.root}",
        "--data.download=false",
        f"--trainer.max_epochs={args.epochs}",
        "--trainer.enable_progress_bar=false",
        f"--model.init_args.optimizer.init_args.lr={args.lr}",
        f"--model.init_args.optimizer.init_args.momentum={args.momentum}",
        *args.fit_arg,
    ]
    return {
        "config": str(args.config.resolve()),
        "out": str(args.out),
        "grid": {"algorithm": args.methods, "noise_multiplier": [args.noise], "seed": args.seeds},
        "fit_args": fit_args,
        "wandb": False,
    }


def run(cmd: list[str]) -> int:
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def fmt(est: dict | None) -> str:
    if not est or est.get("mean") is None:
        return "—"
    half = est.get("half_width")
    return f"{100 * est['mean']:.1f}" + (f" ± {100 * half:.1f}" if half is not None else "")


def table(report: dict, args: argparse.Namespace, minutes: float) -> str:
    rows = {s["method"]: s for s in report["settings"]}
    ref = rows.get("nodp")
    lines = [
        "| method | seeds run | epsilon | overall | class 8 | class 2 | worst class | class-8 cost vs non-DP (pts) "
        "| min per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in args.methods:
        s = rows.get(method)
        if s is None:
            lines.append(f"| {method} | 0 | not run | | | | | | |")
            continue
        eps = s["epsilon"]["mean"] if s.get("epsilon") and s["epsilon"].get("mean") is not None else None
        g8 = s["group_acc"].get("8")
        cost = "—"
        if ref is not None and g8 and method != "nodp":
            cost = f"{100 * (ref['group_acc']['8']['mean'] - g8['mean']):.1f}"
        lines.append(
            f"| {method} | {s['n']} | {'—' if eps is None else f'{eps:.2f}'} | {fmt(s['overall_acc'])} | {fmt(g8)} | "
            f"{fmt(s['group_acc'].get('2'))} | {fmt(s['worst_group_acc'])} | {cost} | {run_minutes(args.out, method)} |"
        )
    paper = [
        "| source | setting | overall | class 8 | class 2 |",
        "|---|---|---|---|---|",
        "| Bagdasaryan & Shmatikov 2019 | non-DP, 60 epochs | — | 97 | 99 |",
        "| Bagdasaryan & Shmatikov 2019 | DP-SGD, 60 epochs, eps 5.9 | 97.5 | 77 | 98 |",
        "| raw Opacus on this data (issue 11) | non-DP | — | 93.2 | 99.5 |",
        "| raw Opacus on this data (issue 11) | DP-SGD, eps 5.90 (RDP) | — | 66.0 | 96.1 |",
        "| Esipova et al. 2023 (class 8 at 9%) | DP-SGD / Global-Adapt | — | 26.3 / 65.5 | — |",
    ]
    seeds = sorted(set(args.seeds) | set(report.get("merged_from", {}).get("earlier_seeds", [])))
    n = len(seeds)
    return "\n".join(
        [
            "# Mitigating disparate impact: imbalanced MNIST (Bagdasaryan & Shmatikov 2019, section 5)",
            "",
            f"Written by `scripts/reproduce_mnist_disparate_impact.py` on {time.strftime('%Y-%m-%d')}. **Scale: "
            f"{args.epochs} epoch(s) per run (the paper: 60), {n} seed(s) requested "
            f"({', '.join(map(str, seeds))}; "
            "the `seeds run` column says how many completed), "
            f"{platform.machine()} CPU ({_cores()} cores), "
            + (
                "table written from the cells completed so far "
                if args.report_only
                else f"{args.jobs} run(s) at a time, {minutes:.0f} min for this invocation "
            )
            + "(cells finished by earlier invocations are skipped; the last column is each cell's own wall time, "
            "summed over a stopped run and the run that resumed it).** Real MNIST from "
            f"`{args.root}` (class 8 cut to 500 training examples, N = 54,649), {setting(args)}; "
            f"accuracy of the last `{report.get('split', 'val')}/` evaluation, which for "
            "this DataModule is the MNIST test set (10,000 images; class 8: 974), as in the paper. Every DP method "
            "runs at the same noise "
            "multiplier and so at the same epsilon (the mitigations' noisy counts share the step's budget). Each cell "
            f"entry is the mean ± the {int(100 * report.get('confidence', 0.95))}% Student t half-width across seeds "
            "(none with one seed), in percent.",
            "",
            *merge_note(report),
            "Command:",
            "",
            "```",
            " ".join(["python scripts/reproduce_mnist_disparate_impact.py", *sys.argv[1:]]),
            "```",
            "",
            *lines,
            "",
            *resumed_note(args.out),
            "For comparison (published or measured elsewhere, not by this script):",
            "",
            *paper,
            "",
            "Plots (from `dplit report` on the sweep): `pareto.png` (overall vs worst-class accuracy, one marker per "
            "method, intervals across seeds) and `accuracy_vs_epsilon.png`.",
            "",
            *companions(args.docs),
            *(
                [
                    "**Not run yet** (the table above covers only completed cells): "
                    + ", ".join(f"`{c['cell']}`" for c in report["incomplete"])
                    + (
                        ". Rerun the command without `--report-only` to train them"
                        if args.report_only
                        else ". Rerun the command to continue"
                    )
                    + "; finished cells are skipped (also on a new machine: they are restored from `cells/`).",
                    "",
                ]
                if report.get("incomplete")
                else []
            ),
        ]
    )


def setting(args: argparse.Namespace) -> str:
    """Model, optimiser, batch, noise, clip and delta of the runs, read from ``--config`` and the flags."""
    config = yaml.safe_load(args.config.read_text())
    backbone = config["model"]["init_args"]["backbone"]["class_path"]
    dp = next(c["init_args"] for c in config["trainer"]["callbacks"] if c["class_path"].endswith("DifferentialPrivacy"))
    model = f"the paper's CNN (`{backbone}`)" if backbone.endswith(".MnistCNN") else f"`{backbone}`"
    return (
        f"{model}, SGD lr {args.lr} momentum {args.momentum} (the seed code's `params_mnist.yaml`: 0.01, 0.5), batch "
        f"{config['data']['init_args']['batch_size']} (Poisson), noise multiplier {args.noise}, clip "
        f"{dp['max_grad_norm']}, delta {dp['delta']:g} (`{args.config.name}`)"
    )


COMPANIONS = {
    "why_92_not_97.md": "why the paper's CNN ends at 93% overall where the paper reports 97.5%",
    "moonshot.md": "what was tried toward class 8's privacy cost <= 5 points",
    "lr_probe.md": "the learning-rate probe",
    "eight_epochs.md": "the first, 8-epoch run",
}


def companions(docs: Path) -> list[str]:
    """Links to the other write-ups kept beside the table (those that exist)."""
    found = [f"- [{name}]({name}): {what}" for name, what in COMPANIONS.items() if (docs / name).is_file()]
    return ["See also:", "", *found, ""] if found else []


def resumed_note(out: Path) -> list[str]:
    """A line per completed cell whose accountant counted more steps than its model took: a stopped attempt's steps
    after its last checkpoint (discarded work, still spent), so that cell's epsilon is above an uninterrupted one's."""
    lines = []
    for cell in sorted(p for p in out.iterdir() if p.is_dir()):
        run = completed_run(cell)
        summary = json.loads((run / "summary.json").read_text()) if run is not None else {}
        privacy = summary.get("privacy") or {}
        extra = (privacy.get("steps") or 0) - (summary.get("global_step") or 0)
        if extra > 0:
            lines.append(f"- `{cell.name}`: epsilon {privacy['epsilon']:.3f} after {privacy['steps']:,} accounted "
                         f"steps, {extra:,} more than its model took ({summary['global_step']:,}).")  # fmt: skip
    if not lines:
        return []
    return [
        "**Stopped and resumed cells spent more.** A cell stopped part-way resumes from its last checkpoint, and its "
        "accountant also counts the steps the stopped attempt took after that checkpoint (their noisy gradients were "
        "computed and their metrics logged, so they are spent, although the weights were discarded). Such a cell's "
        "epsilon is above the uninterrupted cells' and enters the table's mean:",
        "",
        *lines,
        "",
    ]


def run_minutes(out: Path, method: str) -> str:
    """Wall minutes of the method's completed cells (range over seeds): ``dplit.sweep.archive.cell_minutes``, the sum
    over a stopped run and the run that resumed it, or the figure recorded when an archived cell was trained."""
    minutes = [m for cell in sorted(out.glob(f"{method}-*/")) if (m := cell_minutes(cell)) is not None]
    if not minutes:
        return "—"
    low, high = min(minutes), max(minutes)
    return f"{low:.0f}" if round(low) == round(high) else f"{low:.0f}-{high:.0f}"


def sweep_archiving(cmd: list[str], out: Path, archive: Path, every: float = 60.0) -> int:
    """Runs ``dplit sweep`` and copies each cell to ``archive`` (no checkpoints) as soon as it completes, so cells
    finished before the machine goes away are kept."""
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd)
    while True:
        try:
            code = proc.wait(timeout=every)
            break
        except subprocess.TimeoutExpired:
            archive_cells(out, archive)
    archived = archive_cells(out, archive)
    if archived:
        print(f"archived {len(archived)} cell(s) to {archive}", flush=True)
    return code


def merged_report(args: argparse.Namespace, report: dict) -> dict:
    """This sweep's report pooled with ``--merge``'s (earlier seeds), and the plots redrawn from the pooled numbers."""
    prior = json.loads(args.merge.read_text())
    confidence = check_confidence(prior, report)
    settings = merge_settings(settings_from_json(prior), settings_from_json(report), confidence)
    merged = to_json(settings, [], report.get("split", "val"), confidence)
    merged["incomplete"] = report.get("incomplete", [])
    merged["merged_from"] = {
        "earlier": str(args.merge),
        "earlier_seeds": sorted({x for s in prior["settings"] for x in s["seeds"]}),
        "this_sweep": str(args.out),
        "method": "per-metric summaries pooled exactly (dplit.sweep.merge.pool)",
    }
    split = merged["split"]
    accuracy_vs_epsilon(settings, args.docs / "accuracy_vs_epsilon.png", split)
    pareto(settings, args.docs / "pareto.png", split)
    return merged


def merge_note(report: dict) -> list[str]:
    """The paragraph saying which seeds come from an earlier summary (empty without ``--merge``)."""
    source = report.get("merged_from")
    if not source:
        return []
    earlier = ", ".join(map(str, source["earlier_seeds"]))
    return [
        f"**Seeds {earlier} come from `{Path(source['earlier']).name}`**, the committed summary of an earlier run of "
        "this script whose raw logs were on a machine that no longer exists; the other seeds' runs are archived in "
        "`cells/` beside this file. Per metric, the two summaries (mean and t half-width over disjoint seeds) are "
        "pooled exactly into the mean and interval over all seeds (`dplit.sweep.merge.pool`); the `min per run` "
        "column covers only the archived runs.",
        "",
    ]


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="../shared/data/mnist", help="MNIST folder (torchvision layout)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "mnist_dp.yaml", help="the base config")
    parser.add_argument("--noise", type=float, default=0.8, help="noise multiplier of every DP cell (the paper: 0.8)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--out", type=Path, default=Path("runs/sweeps/mnist_disparate_impact"))
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "mitigations")
    parser.add_argument("--lr", type=float, default=None, help="SGD lr (default: --config's; seed code 0.01)")
    parser.add_argument("--momentum", type=float, default=None, help="momentum (default: --config's; seed code 0.5)")
    parser.add_argument("--fit-arg", action="append", default=[], help="extra `dplit fit` argument (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at a time (`dplit sweep --jobs`)")
    parser.add_argument(
        "--archive",
        type=Path,
        default=None,
        help="where completed cells are kept without checkpoints (default: DOCS/cells); archived cells missing from "
        "--out are restored there first, so a new machine skips them and the table still counts them",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="a sweep_report.json of earlier seeds whose runs are gone: the table pools its per-metric summaries "
        "exactly with this sweep's (disjoint seeds; dplit.sweep.merge)",
    )
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument(
        "--report-only", action="store_true", help="run no cell: write the table from the cells completed so far"
    )
    args = parser.parse_args()
    config_optimiser(args)
    args.out.mkdir(parents=True, exist_ok=True)
    archive = args.archive or args.docs / "cells"
    restored = restore_cells(archive, args.out)
    if restored:
        print(f"restored {len(restored)} archived cell(s) from {archive}: {', '.join(restored)}", flush=True)
    spec_path = args.out / "reproduce_spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec(args), sort_keys=False))
    dplit = [sys.executable, "-m", "dplit.cli"]
    start = time.time()
    code = 0
    if not args.report_only:
        flags = ["--dry-run"] if args.dry_run else ["--jobs", str(args.jobs)]
        sweep = [*dplit, "sweep", "--spec", str(spec_path), *flags]
        code = run(sweep) if args.dry_run else sweep_archiving(sweep, args.out, archive)
    if args.dry_run:
        return code
    if args.report_only:  # a new machine's OUT may hold only restored cells: the manifest names the whole grid
        write_manifest(load_spec(spec_path), expand(load_spec(spec_path)))
    minutes = (time.time() - start) / 60
    if run([*dplit, "report", str(args.out)]) != 0:
        return 1
    written = args.out / "report"  # where `dplit report OUT` writes a sweep's report
    report = json.loads((written / "sweep_report.json").read_text())
    args.docs.mkdir(parents=True, exist_ok=True)
    if args.merge is not None:
        report = merged_report(args, report)
    else:
        for png in ("pareto.png", "accuracy_vs_epsilon.png"):
            if (written / png).exists():
                shutil.copy(written / png, args.docs / png)
    (args.docs / "sweep_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.docs / "README.md").write_text(table(report, args, minutes))
    print(f"wrote {args.docs / 'README.md'} (exit code of the sweep: {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
