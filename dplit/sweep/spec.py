"""The sweep spec: a base fit config, an output folder, and a grid of epsilons x seeds x algorithms.

A spec is a YAML file (``dplit sweep --spec sweep.yaml``) or the same fields given as flags (``dplit sweep --config
configs/quickstart.yaml --epsilons 1 3 8 --seeds 0 1 2 --algorithms dpsgd nodp --out runs/sweeps/x``)::

    config: configs/quickstart.yaml   # the base `dplit fit` config (a LightningCLI YAML)
    out: runs/sweeps/quickstart       # OUT/<cell>/ per cell, OUT/sweep.json (the manifest)
    grid:
      algorithm: [dpsgd, nodp]        # registered DP algorithms, `nodp` (the non-DP twin), or names under methods:
      epsilon: [1, 3, 8]              # target_epsilon of the DP cells (or noise_multiplier: [...] for fixed noise)
      seed: [0, 1, 2]                 # seed_everything (data split, init); DP noise is secret and never seeded
    methods:                          # optional: DifferentialPrivacy init_args per method
      dpsgd: {max_grad_norm: 0.5}
      dpsgd_c01: {algorithm: dpsgd, max_grad_norm: 0.1}
    fit_args: [--trainer.max_epochs=3]  # optional: extra `dplit fit` arguments for every cell
    wandb: false                      # keep the config's W&B logger (one W&B run per cell); default: dropped

Relative paths are relative to the working directory, as for ``dplit fit``. Validation errors name the field and
the fix (``SpecError``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dplit.cli.errors import did_you_mean

NODP = "nodp"
AXES = ("algorithm", "epsilon", "noise_multiplier", "seed")
FIELDS = ("config", "out", "grid", "methods", "fit_args", "wandb")
BUDGET_KEYS = ("target_epsilon", "noise_multiplier", "max_epsilon")
"""DP-callback init_args that the grid's epsilon / noise_multiplier axes own (not settable under ``methods:``)."""
DP_CLASS = "DifferentialPrivacy"


class SpecError(ValueError):
    """A mistake in a sweep spec; the message names the field and the fix."""


@dataclass
class SweepSpec:
    """A validated sweep: ``cells()`` (in ``dplit.sweep.cells``) expands the grid."""

    config: Path
    out: Path
    algorithms: list[str]
    epsilons: list[float] = field(default_factory=list)
    noise_multipliers: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    fit_args: list[str] = field(default_factory=list)
    wandb: bool = False

    def to_dict(self, absolute: bool = False) -> dict[str, Any]:
        """The spec in its YAML form (``absolute``: paths resolved, so a cluster job reads it from anywhere)."""
        grid: dict[str, list[Any]] = {"algorithm": list(self.algorithms)}
        if self.epsilons:
            grid["epsilon"] = list(self.epsilons)
        if self.noise_multipliers:
            grid["noise_multiplier"] = list(self.noise_multipliers)
        if self.seeds:
            grid["seed"] = list(self.seeds)
        path = (lambda p: str(p.resolve())) if absolute else str
        data: dict[str, Any] = {"config": path(self.config), "out": path(self.out), "grid": grid}
        if self.methods:
            data["methods"] = {k: dict(v) for k, v in self.methods.items()}
        data["fit_args"] = list(self.fit_args)
        data["wandb"] = self.wandb
        return data

    def dp_algorithm(self, method: str) -> str | None:
        """The registered algorithm a grid name runs (None for ``nodp``)."""
        if method == NODP:
            return None
        return str(self.methods.get(method, {}).get("algorithm", method))


def _number_list(value: Any, where: str, kind: type) -> list[Any]:
    values = value if isinstance(value, list) else [value]
    out: list[Any] = []
    for v in values:
        ok = isinstance(v, int | float) and not isinstance(v, bool)
        if kind is int and not (ok and float(v).is_integer()):
            raise SpecError(f"`{where}` must hold integers (seed_everything values); got {v!r}")
        if kind is float and not (ok and math.isfinite(v) and v > 0):
            raise SpecError(f"`{where}` must hold positive numbers; got {v!r}")
        out.append(int(v) if kind is int else float(v))
    if not out:
        raise SpecError(f"`{where}` is empty: give at least one value, or leave the axis out")
    if len(set(out)) != len(out):
        raise SpecError(f"`{where}` lists a value twice ({out}): each cell must be distinct")
    return out


def from_dict(data: Any, source: str = "the sweep spec") -> SweepSpec:
    """Validates a spec given as a dict (the parsed YAML); raises SpecError naming the field and the fix."""
    if not isinstance(data, dict):
        raise SpecError(f"{source} must be a YAML mapping with keys {', '.join(FIELDS)}; got {type(data).__name__}")
    for key in data:
        if key not in FIELDS:
            raise SpecError(
                f"{source}: unknown field `{key}`{did_you_mean(str(key), FIELDS)}; fields: {', '.join(FIELDS)}"
            )
    for key in ("config", "out", "grid"):
        if not data.get(key):
            raise SpecError(
                f"{source}: `{key}` is missing (e.g. config: configs/quickstart.yaml, out: runs/sweeps/x, "
                "grid: {algorithm: [dpsgd, nodp], epsilon: [1, 8], seed: [0, 1]})"
            )
    grid = data["grid"]
    if not isinstance(grid, dict):
        raise SpecError(f"{source}: `grid` must map axes ({', '.join(AXES)}) to lists of values; got {grid!r}")
    for axis in grid:
        if axis not in AXES:
            raise SpecError(
                f"{source}: unknown grid axis `{axis}`{did_you_mean(str(axis), AXES)}; axes: {', '.join(AXES)}"
            )
    if "epsilon" in grid and "noise_multiplier" in grid:
        raise SpecError(
            f"{source}: `grid` has both `epsilon` and `noise_multiplier`: sweep one (target epsilon, or "
            "fixed noise whose epsilon then results)"
        )
    if "algorithm" not in grid:
        raise SpecError(f"{source}: `grid.algorithm` is missing: list the methods to compare, e.g. [dpsgd, nodp]")
    algorithms = grid["algorithm"] if isinstance(grid["algorithm"], list) else [grid["algorithm"]]
    if not algorithms or not all(isinstance(a, str) and a for a in algorithms):
        raise SpecError(f"{source}: `grid.algorithm` must be a non-empty list of names; got {grid['algorithm']!r}")
    if len(set(algorithms)) != len(algorithms):
        raise SpecError(f"{source}: `grid.algorithm` lists a name twice ({algorithms})")
    for name in algorithms:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise SpecError(
                f"{source}: `grid.algorithm` name {name!r} names the cells' folders: use letters, digits, _ . -"
            )
    methods = data.get("methods") or {}
    if not isinstance(methods, dict) or not all(isinstance(v or {}, dict) for v in methods.values()):
        raise SpecError(
            f"{source}: `methods` must map names to DifferentialPrivacy init_args, e.g. "
            "{dpsgd_c01: {algorithm: dpsgd, max_grad_norm: 0.1}}"
        )
    fit_args = data.get("fit_args") or []
    if not isinstance(fit_args, list) or not all(isinstance(a, str | int | float) for a in fit_args):
        raise SpecError(f"{source}: `fit_args` must be a list of `dplit fit` arguments, e.g. [--trainer.max_epochs=3]")
    wandb = data.get("wandb", False)
    if not isinstance(wandb, bool):
        raise SpecError(f"{source}: `wandb` must be true or false; got {wandb!r}")
    spec = SweepSpec(
        config=Path(str(data["config"])),
        out=Path(str(data["out"])),
        algorithms=list(algorithms),
        epsilons=_number_list(grid["epsilon"], "grid.epsilon", float) if "epsilon" in grid else [],
        noise_multipliers=(
            _number_list(grid["noise_multiplier"], "grid.noise_multiplier", float) if "noise_multiplier" in grid else []
        ),
        seeds=_number_list(grid["seed"], "grid.seed", int) if "seed" in grid else [],
        methods={str(k): dict(v or {}) for k, v in methods.items()},
        fit_args=[str(a) for a in fit_args],
        wandb=wandb,
    )
    _check_methods(spec, source)
    return spec


def _check_methods(spec: SweepSpec, source: str) -> None:
    """Method names against the algorithm registry, and method init_args against the DifferentialPrivacy callback."""
    for name, args in spec.methods.items():
        if name == NODP:
            raise SpecError(f"{source}: `methods.{NODP}`: the non-DP twin has no DP arguments; remove it")
        for key in BUDGET_KEYS:
            if key in args:
                axis = "epsilon" if key != "noise_multiplier" else "noise_multiplier"
                raise SpecError(
                    f"{source}: `methods.{name}.{key}`: the budget is set by the grid (grid.{axis}); "
                    f"remove {key} from methods"
                )
    dp_names = [a for a in spec.algorithms if a != NODP]
    if not dp_names and (spec.epsilons or spec.noise_multipliers):
        axis = "epsilon" if spec.epsilons else "noise_multiplier"
        raise SpecError(f"{source}: `grid.{axis}` is set but `grid.algorithm` has only {NODP}: add a DP algorithm")
    if not dp_names:
        return
    from dplit.privacy.algorithms import ALGORITHMS  # the registry as it is now (algorithms may be added)

    for name in dp_names:
        algorithm = spec.dp_algorithm(name)
        if algorithm not in ALGORITHMS:
            known = ", ".join([*sorted(ALGORITHMS), NODP])
            where = f"`methods.{name}.algorithm`" if name in spec.methods else "`grid.algorithm`"
            raise SpecError(
                f"{source}: {where}: unknown algorithm `{algorithm}`{did_you_mean(str(algorithm), ALGORITHMS)}"
                f"; registered: {known} (or define `{name}` under methods: with an algorithm)"
            )
    unused = [m for m in spec.methods if m not in spec.algorithms]
    if unused:
        raise SpecError(
            f"{source}: `methods` defines {', '.join(unused)} but `grid.algorithm` does not list it: add "
            "it to grid.algorithm or remove it"
        )
    if any(spec.methods.values()):
        from dplit.cli.errors import init_parameters

        params = init_parameters(f"dplit.callbacks.{DP_CLASS}")
        for name, args in spec.methods.items():
            for key in args:
                if params and key not in params:
                    raise SpecError(
                        f"{source}: `methods.{name}.{key}` is not a parameter of dplit.callbacks."
                        f"{DP_CLASS}{did_you_mean(key, params)}; valid: {', '.join(params)}"
                    )


def load_spec(path: Path) -> SweepSpec:
    """Reads and validates a spec YAML file."""
    if not path.is_file():
        raise SpecError(f"--spec {path}: no such file (write a sweep YAML, e.g. configs/sweeps/quickstart_sweep.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    return from_dict(data, source=str(path))


def dp_callback(config: dict[str, Any]) -> dict[str, Any] | None:
    """The ``trainer.callbacks`` entry of a fit config that is dplit's DifferentialPrivacy (None if absent)."""
    trainer = config.get("trainer") if isinstance(config, dict) else None
    callbacks = trainer.get("callbacks") if isinstance(trainer, dict) else None
    for cb in callbacks if isinstance(callbacks, list) else []:
        path = cb.get("class_path", "") if isinstance(cb, dict) else cb
        if isinstance(path, str) and path.rsplit(".", 1)[-1] == DP_CLASS:
            return cb if isinstance(cb, dict) else {"class_path": cb}
    return None


__all__ = ["AXES", "NODP", "SpecError", "SweepSpec", "dp_callback", "from_dict", "load_spec"]
