"""Cells of a sweep: the grid expanded into named runs, and each cell's `dplit fit` config.

A cell is one (method, epsilon or noise multiplier, seed); a ``nodp`` cell does not vary with the budget, so there is
one per seed. Names are deterministic and readable (``dpsgd-eps3-seed0``, ``dpsgd-sigma1.1-seed0``,
``nodp-seed0``) and each cell writes under ``OUT/<name>/``. Cells are ordered seed by seed (the non-DP cell first,
then each epsilon, then each method), so a sweep stopped half-way already holds complete seeds.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dplit.sweep.spec import BUDGET_KEYS, NODP, SpecError, SweepSpec, dp_callback

CONFIG_NAME = "config.yaml"
"""The cell's resolved fit config, ``OUT/<cell>/config.yaml``."""


@dataclass(frozen=True)
class Cell:
    """One run of a sweep."""

    index: int
    name: str
    method: str
    """The grid's algorithm name (``nodp``, a registered algorithm, or a name under ``methods:``)."""
    algorithm: str | None
    """The registered DP algorithm it runs (None for ``nodp``)."""
    seed: int | None
    epsilon: float | None = None
    """Target epsilon (grid.epsilon)."""
    noise_multiplier: float | None = None
    """Fixed noise (grid.noise_multiplier)."""
    dp_args: dict[str, Any] = field(default_factory=dict)
    """DifferentialPrivacy init_args set for this cell."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(value: float) -> str:
    return f"{value:g}"


def cell_name(method: str, seed: int | None, epsilon: float | None = None, sigma: float | None = None) -> str:
    """``dpsgd-eps3-seed0``, ``dpsgd-sigma1.1-seed0``, ``nodp-seed0`` (no seed part when the grid has no seeds)."""
    parts = [method]
    if epsilon is not None:
        parts.append(f"eps{_num(epsilon)}")
    if sigma is not None:
        parts.append(f"sigma{_num(sigma)}")
    if seed is not None:
        parts.append(f"seed{seed}")
    return "-".join(parts)


def expand(spec: SweepSpec) -> list[Cell]:
    """All cells of the grid, in run order; ``cells[i].index == i``."""
    seeds: list[int | None] = list(spec.seeds) or [None]
    budgets: list[tuple[float | None, float | None]] = (
        [(e, None) for e in spec.epsilons] or [(None, s) for s in spec.noise_multipliers] or [(None, None)]
    )
    cells: list[Cell] = []
    for seed in seeds:
        if NODP in spec.algorithms:
            cells.append(Cell(len(cells), cell_name(NODP, seed), NODP, None, seed))
        for epsilon, sigma in budgets:
            for method in spec.algorithms:
                if method == NODP:
                    continue
                args = {k: v for k, v in spec.methods.get(method, {}).items() if k != "algorithm"}
                algorithm = spec.dp_algorithm(method)
                name = cell_name(method, seed, epsilon, sigma)
                cells.append(Cell(len(cells), name, method, algorithm, seed, epsilon, sigma, args))
    return cells


def load_base(spec: SweepSpec) -> dict[str, Any]:
    """The base fit config, checked for what the sweep needs (a CSV logger, per-group metrics, a DP callback)."""
    where = f"`config: {spec.config}`"
    if not spec.config.is_file():
        raise SpecError(f"{where}: no such file; give a `dplit fit` config such as configs/quickstart.yaml")
    try:
        base = yaml.safe_load(spec.config.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{where}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(base, dict) or not isinstance(base.get("trainer"), dict):
        raise SpecError(f"{where}: not a `dplit fit` config (no `trainer:` section)")
    trainer = base["trainer"]
    loggers = _as_list(trainer.get("logger"))
    if not any(_class_name(lg).endswith("CSVLogger") for lg in loggers):
        raise SpecError(
            f"{where}: no CSV logger in trainer.logger: the sweep report reads metrics.csv; add "
            '`- class_path: dplit.loggers.CSVLogger` with `init_args: {name: ""}`'
        )
    if not any(_class_name(cb).endswith("SubgroupMetrics") for cb in _as_list(trainer.get("callbacks"))):
        raise SpecError(
            f"{where}: no dplit.callbacks.SubgroupMetrics in trainer.callbacks: the sweep compares "
            "per-group accuracy; add it"
        )
    dp_methods = [m for m in spec.algorithms if m != NODP]
    if dp_methods and dp_callback(base) is None:
        raise SpecError(
            f"{where} has no dplit.callbacks.DifferentialPrivacy in trainer.callbacks, but grid.algorithm "
            f"asks for {', '.join(dp_methods)}: use the DP config (e.g. configs/quickstart.yaml, not its "
            "_nodp twin); the sweep derives the non-DP cells from it"
        )
    return base


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]


def _class_name(entry: Any) -> str:
    return str(entry.get("class_path", "")) if isinstance(entry, dict) else str(entry)


def cell_config(base: dict[str, Any], spec: SweepSpec, cell: Cell, wandb: bool | None = None) -> dict[str, Any]:
    """The fit config of ``cell``: the base with the cell's seed, output folder, DP settings (or no DP callback),
    the W&B logger dropped unless ``wandb`` (default: the spec's) and the fit's own progress bar off (the sweep
    shows its own)."""
    config = copy.deepcopy(base)
    if cell.seed is not None:
        config["seed_everything"] = cell.seed
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(spec.out / cell.name)
    trainer.setdefault("enable_progress_bar", False)
    loggers = _as_list(trainer.get("logger"))
    keep_wandb = spec.wandb if wandb is None else wandb
    if keep_wandb:
        wandb_loggers = [lg for lg in loggers if _class_name(lg).endswith("WandbLogger")]
        if not wandb_loggers:
            wandb_loggers = [{"class_path": "dplit.loggers.AutoWandbLogger", "init_args": {"project": "dplit"}}]
            loggers.append(wandb_loggers[0])
        for lg in wandb_loggers:
            if isinstance(lg, dict):
                lg.setdefault("init_args", {}).update({"name": cell.name, "group": spec.out.name})
    else:
        loggers = [lg for lg in loggers if not _class_name(lg).endswith("WandbLogger")]
    trainer["logger"] = loggers
    callbacks = _as_list(trainer.get("callbacks"))
    dp = dp_callback(config)
    if cell.algorithm is None:
        trainer["callbacks"] = [cb for cb in callbacks if cb is not dp and _class_name(cb) != _class_name(dp)]
        return config
    assert dp is not None  # load_base refused a DP sweep on a config without the callback
    if dp not in callbacks:  # given as a bare class path: replace it by its dict form
        callbacks = [dp if _class_name(cb) == dp["class_path"] else cb for cb in callbacks]
    trainer["callbacks"] = callbacks
    args = dict(dp.get("init_args") or {})
    args.update(cell.dp_args)
    args["algorithm"] = cell.algorithm
    if cell.epsilon is not None or cell.noise_multiplier is not None:
        for key in BUDGET_KEYS:
            args.pop(key, None)
        if cell.epsilon is not None:
            args["target_epsilon"] = cell.epsilon
        else:
            args["noise_multiplier"] = cell.noise_multiplier
            if (dp.get("init_args") or {}).get("max_epsilon") is not None:
                args["max_epsilon"] = dp["init_args"]["max_epsilon"]  # fixed noise keeps the base's budget stop
    dp["init_args"] = args
    return config


def write_cell_config(base: dict[str, Any], spec: SweepSpec, cell: Cell, wandb: bool | None = None) -> Path:
    """Writes ``OUT/<cell>/config.yaml`` and returns its path."""
    folder = spec.out / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_NAME
    header = (
        f"# sweep cell {cell.name} (written by `dplit sweep` from {spec.config}; rerun: dplit fit --config {path})\n"
    )
    path.write_text(header + yaml.safe_dump(cell_config(base, spec, cell, wandb), sort_keys=False))
    return path


def find_cell(cells: list[Cell], key: str) -> Cell:
    """A cell by index (``3``, as ``$SLURM_ARRAY_TASK_ID``) or by name (``dpsgd-eps3-seed0``, as a W&B agent)."""
    if key.isdigit():
        if int(key) < len(cells):
            return cells[int(key)]
        raise SpecError(f"--cell {key}: the sweep has {len(cells)} cells (indices 0-{len(cells) - 1})")
    for cell in cells:
        if cell.name == key:
            return cell
    from dplit.cli.errors import did_you_mean

    names = [c.name for c in cells]
    raise SpecError(f"--cell {key}: no such cell{did_you_mean(key, names)}; `dplit sweep ... --dry-run` lists them")


__all__ = ["CONFIG_NAME", "Cell", "cell_config", "cell_name", "expand", "find_cell", "load_base", "write_cell_config"]
