"""``dplit baseline``: NON-private scikit-learn baselines trained on a config's data, written as report-ready runs.

Example::

    dplit baseline --config configs/credit_transfer_dp.yaml --seed 0 1 2
    dplit report runs/credit_transfer_dp --baseline runs/credit_transfer_dp_hgb

The config's ``data`` section builds the same DataModule (same split, same preprocessing, same groups) as the neural
run; the baselines train on its training split and are evaluated on its validation and test splits with the metrics
of ``dplit.callbacks.SubgroupMetrics`` (its ``intersections`` / ``compute_auc`` settings are read from the config).
Each (baseline, seed) writes ``ROOT/<config name>_<baseline>/version_N``. These baselines are NOT differentially
private: nothing about them is clipped, noised or accounted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dplit.baselines.evaluate import group_metrics
from dplit.baselines.models import BASELINES, make_baseline
from dplit.baselines.runs import write_run

PROG = "dplit baseline"
NOT_DP = "NOT differentially private"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=f"Scikit-learn baselines ({NOT_DP}) on the data section of a dplit config, written in the run "
        "format of `dplit fit` so `dplit report` shows them beside neural runs.",
    )
    parser.add_argument("--config", type=Path, required=True, help="a dplit config (its `data` section is used)")
    parser.add_argument("--models", nargs="+", default=list(BASELINES), choices=list(BASELINES), help="baselines")
    parser.add_argument("--seed", nargs="+", type=int, default=None, help="seeds (default: the config's seed)")
    parser.add_argument("--root-dir", type=Path, default=None, help="where run folders go (default: the parent of "
                        "the config's trainer.default_root_dir, else runs/)")  # fmt: skip
    parser.add_argument("--name", default=None, help="run folder prefix (default: the config's file name)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OpenMP/BLAS threads for scikit-learn (default: its own choice; "
        "1 on a busy shared machine, where gradient boosting's OpenMP threads can be 10x slower)",
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="override data init_args, e.g. root=../data/credit"
    )
    return parser


def _subgroup_args(config: dict[str, Any]) -> dict[str, Any]:
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("SubgroupMetrics"):
            return dict(cb.get("init_args") or {})
    return {}


def build_datamodule(data: dict[str, Any]) -> Any:
    """The DataModule of a config's ``data`` section (``class_path`` + ``init_args``)."""
    class_path = data.get("class_path") if isinstance(data, dict) else None
    if not class_path:
        raise ValueError("the config has no data.class_path")
    module, _, name = str(class_path).rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    datamodule = cls(**(data.get("init_args") or {}))
    if not hasattr(datamodule, "arrays"):
        raise ValueError(f"{class_path} is not a tabular DataModule (no `arrays(split)`): baselines need tabular data")
    return datamodule


def run_baselines(config: dict[str, Any], name: str, root: Path, models: list[str], seeds: list[int]) -> list[Path]:
    """Fits each baseline for each seed and writes its run; returns the run folders."""
    datamodule = build_datamodule(config["data"])
    attributes = datamodule.group_attributes
    sub = _subgroup_args(config)
    x_train, y_train, g_train = datamodule.arrays("train")
    primary = g_train if g_train.ndim == 1 else g_train[:, 0]
    names = next(iter(attributes.values()))
    counts = {n: int(c) for n, c in zip(names, np.bincount(primary, minlength=len(names)), strict=True)}
    written = []
    for model_name in models:
        for seed in seeds:
            model = make_baseline(model_name, seed)
            model.fit(x_train, y_train)
            metrics: dict[str, float] = {}
            for split in ("val", "test"):
                x, y, g = datamodule.arrays(split)
                metrics.update(
                    group_metrics(
                        model.predict_proba(x), y, g, attributes, split,
                        intersections=bool(sub.get("intersections", False)),
                        compute_auc=bool(sub.get("compute_auc", True)),
                    )
                )  # fmt: skip
            run_config = {
                "seed_everything": seed,
                "baseline": {"name": model_name, "estimator": repr(model), "differentially_private": False},
                "model": {"class_path": f"{type(model).__module__}.{type(model).__name__}"},
                "data": config["data"],
                "trainer": {"callbacks": [{"class_path": "dplit.callbacks.SubgroupMetrics", "init_args": sub}]},
            }
            run = write_run(root / f"{name}_{model_name}", metrics, run_config, counts)
            print(f"{model_name} seed {seed}: test acc {100 * metrics['test/acc']:.1f}% ({NOT_DP}) -> {run}")
            written.append(run)
    return written


def _apply_overrides(data: dict[str, Any], pairs: list[str]) -> None:
    init_args = data.setdefault("init_args", {})
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        init_args[key.removeprefix("data.init_args.")] = yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    """Runs ``dplit baseline``; returns the exit code (2 on bad input or missing data)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = yaml.safe_load(args.config.read_text())
        if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
            raise ValueError(f"{args.config}: no `data` section")
        _apply_overrides(config["data"], args.set)
        seeds = args.seed if args.seed is not None else [int(config.get("seed_everything") or 0)]
        default_root = (config.get("trainer") or {}).get("default_root_dir")
        root = args.root_dir or (Path(default_root).parent if default_root else Path("runs"))
        from threadpoolctl import threadpool_limits  # installed with scikit-learn

        with threadpool_limits(limits=args.threads):
            run_baselines(config, args.name or args.config.stem, root, args.models, seeds)
    except (OSError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(f"note: these baselines are {NOT_DP} (no clipping, noise or privacy accounting)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
