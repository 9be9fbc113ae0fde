"""Why does ``configs/mnist_dp.yaml`` reach 92.6% where Bagdasaryan & Shmatikov report 97.5%? A learning-rate probe.

The seed code (github.com/ebagdasa/differential-privacy-vs-fairness, ``utils/params_mnist.yaml`` + ``playing.py``)
matches dplit's setting in everything but the optimiser: the same CNN (conv 20-5, conv 50-5, fc 500), the same input
normalisation (0.1307, 0.3081), batch 256, per-example clipping to S = 1, noise N(0, (0.8 S)^2) on the sum divided by
256, class 8 cut to 500, evaluation on the full MNIST test set, no learning-rate schedule. Its optimiser is SGD
lr 0.01, momentum 0.5; dplit's config uses lr 0.05 without momentum. This script trains the DP config for a few epochs
at several (lr, momentum) pairs, the rest unchanged (seed 1 of the config, Poisson sampling, sigma 0.8), and writes
the per-epoch test accuracy (overall / class 8) as a markdown table.

    python scripts/probe_mnist_dp_lr.py --root ../shared/data/mnist --epochs 3 \
        --grid 0.05:0 0.25:0 0.05:0.9 1.0:0 --out runs/lrprobe --docs docs/mitigations/lr_probe.md

Resumable: a cell whose run has ``--epochs`` validated epochs is not run again. Nothing here is imported by dplit.
"""

from __future__ import annotations

import argparse
import csv
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cell_dir(out: Path, lr: str, momentum: str) -> Path:
    return out / f"lr{lr}_m{momentum}"


def epochs_of(run: Path) -> list[tuple[int, float, float]]:
    """(epoch, overall, class 8) of each validated epoch of the run's first version."""
    metrics = run / "version_0" / "metrics.csv"
    if not metrics.exists():
        return []
    with metrics.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/acc")]
    return [(int(r["epoch"]), float(r["val/acc"]), float(r["val/acc/group=8"])) for r in rows]


def train(args: argparse.Namespace, lr: str, momentum: str, run: Path) -> None:
    cmd = [
        sys.executable, "-m", "dplit.cli", "fit", "--config", str(REPO / "configs" / "mnist_dp.yaml"),
        f"--data.root={args.root}", "--data.download=false", f"--trainer.max_epochs={args.epochs}",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={run}",
        f"--model.init_args.optimizer.init_args.lr={lr}", f"--model.init_args.optimizer.init_args.momentum={momentum}",
    ]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    if run.exists():  # an unfinished cell starts again from scratch
        subprocess.call(["rm", "-rf", str(run)])
    if subprocess.call(cmd) != 0:
        raise SystemExit(f"training failed for lr={lr} momentum={momentum}; see the output above")


def table(args: argparse.Namespace, cells: list[tuple[str, str]]) -> str:
    head = " | ".join(f"epoch {e + 1}" for e in range(args.epochs))
    lines = [f"| lr | momentum | {head} |", "|---|---|" + "---|" * args.epochs]
    for lr, m in cells:
        done = {e: (o, c8) for e, o, c8 in epochs_of(cell_dir(args.out, lr, m))}
        vals = [
            f"{100 * done[e][0]:.1f} / {100 * done[e][1]:.1f}" if e in done else "not run" for e in range(args.epochs)
        ]
        lines.append(f"| {lr} | {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="MNIST folder (raw IDX files)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--grid", nargs="+", default=["0.05:0", "0.25:0", "0.05:0.9", "1.0:0"], help="lr:momentum pairs")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "lrprobe")
    p.add_argument("--docs", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--report-only", action="store_true", help="only write the table from the runs that exist")
    args = p.parse_args()
    cells = [tuple(g.split(":", 1)) for g in args.grid]
    start = time.time()
    for lr, m in cells:
        run = cell_dir(args.out, lr, m)
        if args.report_only or len(epochs_of(run)) >= args.epochs:
            continue
        train(args, lr, m, run)
    text = table(args, cells)  # type: ignore[arg-type]
    print(text)
    if args.docs is not None:
        args.docs.parent.mkdir(parents=True, exist_ok=True)
        note = (
            f"Test accuracy overall / class 8 (%) of `configs/mnist_dp.yaml` after each epoch (sigma 0.8, batch 256, "
            f"clip 1, seed 1), real MNIST with class 8 cut to 500; {args.epochs} epochs of the paper's 60; "
            f"{platform.machine()} CPU, 2 shared cores"
            + ("; table from the existing runs" if args.report_only else f"; {(time.time() - start) / 60:.0f} min")
            + f". Command: `python scripts/probe_mnist_dp_lr.py --root {args.root} --epochs {args.epochs} --grid "
            + " ".join(args.grid)
            + "`.\n\n"
        )
        args.docs.write_text(note + text + "\n")


if __name__ == "__main__":
    main()
