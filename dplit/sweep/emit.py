"""A sweep as independent cluster jobs: a SLURM array script, or a W&B sweep config.

Both run one cell per job with ``dplit sweep --spec OUT/sweep.yaml --cell <index or name>`` (the spec written with
absolute paths, so a job finds it from any folder): a finished cell is skipped, so resubmitting resumes the sweep.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import yaml

from dplit.sweep.cells import Cell
from dplit.sweep.run import SPEC_FILE
from dplit.sweep.spec import SweepSpec

SBATCH_FILE = "sweep.sbatch"
WANDB_FILE = "wandb_sweep.yaml"


def cell_argv(spec_file: Path, cell: str, python: str = sys.executable) -> list[str]:
    """The command that runs one cell (``cell``: an index, a name, or a shell variable such as
    ``${SLURM_ARRAY_TASK_ID}``, left for the shell to expand)."""
    return [python, "-m", "dplit.cli", "sweep", "--spec", str(spec_file.resolve()), "--cell", cell]


def slurm_script(spec: SweepSpec, cells: list[Cell], python: str = sys.executable) -> str:
    """A SLURM array script: task ``i`` runs cell ``i`` in this working directory; logs in ``OUT/slurm/``."""
    out = spec.out.resolve()
    spec_file = out / SPEC_FILE
    command = shlex.join(cell_argv(spec_file, "__DPLIT_CELL__", python)).replace(
        "__DPLIT_CELL__", '"${SLURM_ARRAY_TASK_ID}"'
    )
    listing = "\n".join(f"#   {c.index:>3}  {c.name}" for c in cells)
    return f"""#!/bin/bash
# dplit sweep {out.name}: one SLURM array task per cell ({len(cells)} cells), written by `dplit sweep --emit slurm`.
# Submit:  sbatch {shlex.quote(str(out / SBATCH_FILE))}
# Each task trains one cell with `dplit fit` in {out}/<cell>/; a finished cell is skipped, so resubmitting the
# array (or `--array=<failed indices>`) resumes the sweep. Then: dplit report {shlex.quote(str(out))}
# Add your cluster's resources below (e.g. #SBATCH --time=02:00:00, #SBATCH --gres=gpu:1, #SBATCH --partition=...).
# Cells (task id, name):
{listing}
#SBATCH --job-name=dplit-sweep-{out.name}
#SBATCH --array=0-{len(cells) - 1}
#SBATCH --output={out}/slurm/%x-%A_%a.out
#SBATCH --chdir={os.getcwd()}

set -euo pipefail
# the python that emitted this script (edit to activate your environment on the compute nodes)
exec {command}
"""


def wandb_sweep(spec: SweepSpec, cells: list[Cell]) -> dict[str, object]:
    """A W&B sweep config (``method: grid``) whose one parameter is the cell name.

    The grid's axes are not separate W&B parameters on purpose: a ``nodp`` cell does not vary with epsilon, so the
    product algorithm x epsilon x seed would train the same non-DP cell once per epsilon. Each W&B run is named after
    its cell, and the cell's algorithm, epsilon and seed are in the run's config.
    """
    out = spec.out.resolve()
    command: list[str] = ["${env}", "${interpreter}", "-m", "dplit.cli", "sweep", "--spec", str(out / SPEC_FILE)]
    return {
        "name": f"dplit-{out.name}",
        "description": f"dplit sweep {out} ({len(cells)} cells: {', '.join(spec.algorithms)}); "
        f"written by `dplit sweep --emit wandb`; report: dplit report {out}",
        "program": "dplit",
        "method": "grid",
        "metric": {"name": "val/worst_group_acc", "goal": "maximize"},
        "parameters": {"cell": {"values": [c.name for c in cells]}},
        "command": [*command, "--wandb", "${args}"],
    }


def emit(kind: str, spec: SweepSpec, cells: list[Cell]) -> Path:
    """Writes ``OUT/sweep.sbatch`` (``kind`` slurm) or ``OUT/wandb_sweep.yaml`` (wandb); returns its path."""
    spec.out.mkdir(parents=True, exist_ok=True)
    if kind == "slurm":
        (spec.out / "slurm").mkdir(exist_ok=True)  # SLURM does not create the --output folder
        path = spec.out / SBATCH_FILE
        path.write_text(slurm_script(spec, cells))
        path.chmod(0o755)
        return path
    path = spec.out / WANDB_FILE
    header = f"# start: wandb sweep {path.resolve()}, then on each machine: wandb agent <entity/project/sweep id>\n"
    path.write_text(header + yaml.safe_dump(wandb_sweep(spec, cells), sort_keys=False, width=1000))
    return path


__all__ = ["SBATCH_FILE", "WANDB_FILE", "cell_argv", "emit", "slurm_script", "wandb_sweep"]
