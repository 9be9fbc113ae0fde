"""Tabular transfer results: scratch / transfer (all layers, head only) / GBDT / ensemble, non-DP and DP at two
epsilons, several seeds, per-group test accuracy and AUC; writes a markdown table with 95% t intervals.

For each experiment (``credit``: source = education graduate school/university, target = high school/other;
``german``: source = age 40+, target = under 40) and each seed:

1. pretrain on the public source domain without DP (the experiment's ``*_source_nodp.yaml``);
2. on the private target domain, from the target configs (``*_transfer_{nodp,dp}.yaml``): from scratch
   (``init_from: null``), transfer fine-tuning all layers, transfer fine-tuning the head only; each non-DP and with
   DP-Adam at each target epsilon (the DP callback calibrates the noise);
3. the NON-private baselines (``dplit baseline``'s HistGradientBoosting and soft-voting ensemble) on the same target
   split.

Every model is scored on the target test split with ``dplit.metrics`` (the functions SubgroupMetrics uses).
Results accumulate in ``RUNS/results.jsonl`` (a rerun skips what is done), then the table is written.

    nice -n 10 python scripts/run_tabular_results.py                     # default: 3 seeds, eps 1 and 8
    python scripts/run_tabular_results.py --table-only                   # rebuild the table from results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {
    "credit": {
        "source": "credit_source_nodp",
        "target": "credit_transfer",
        "root": "credit",
        "title": "Taiwan credit default: source = education graduate school/university (public), "
        "target = high school/other (private)",
    },
    "german": {
        "source": "german_source_nodp",
        "target": "german_transfer",
        "root": "tabular/german",
        "title": "German credit: source = applicants aged 40+ (public), target = under 40 (private)",
    },
    "adult": {  # no transfer pair: scratch and baselines only
        "source": None,
        "target": "adult",
        "root": "tabular/adult",
        "title": "UCI Adult (whole training file; official adult.test), no transfer",
    },
}
METHODS = ("scratch", "transfer-all", "transfer-head", "hgb", "ensemble")


def load_config(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())


def prepare(config: dict[str, Any], data_root: Path, out_dir: str, seed: int, epochs: int | None) -> dict[str, Any]:
    """A copy of ``config`` for this script: CSV logger only, no progress bar, absolute data root, the seed."""
    config = json.loads(json.dumps(config))
    config["seed_everything"] = seed
    trainer = config["trainer"]
    trainer["default_root_dir"] = out_dir
    trainer["logger"] = [{"class_path": "dplit.loggers.CSVLogger", "init_args": {"name": ""}}]
    trainer["enable_progress_bar"] = False
    trainer["enable_model_summary"] = False
    if epochs is not None:
        trainer["max_epochs"] = epochs
    config["data"]["init_args"]["root"] = str(data_root)
    return config


def fit(config: dict[str, Any], path: Path) -> Any:
    from dplit.cli import DplitCLI

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return DplitCLI(args=["fit", f"--config={path}"])


def score(probs: np.ndarray, datamodule: Any) -> dict[str, float]:
    """Test-split metrics under SubgroupMetrics' names, plus the overall AUC (``test/auc``)."""
    from dplit.baselines import group_metrics
    from dplit.metrics import binary_auc

    _, y, g = datamodule.arrays("test")
    out = group_metrics(probs, y, g, datamodule.group_attributes, "test")
    out["test/auc"] = binary_auc(torch.as_tensor(probs[:, 1]), torch.as_tensor(y))
    return out


def neural_probs(cli: Any) -> np.ndarray:
    x, _, _ = cli.datamodule.arrays("test")
    model = cli.model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(x)).softmax(-1).numpy()


def run_seed(name: str, exp: dict[str, Any], seed: int, args: argparse.Namespace, done: set, sink: Path) -> None:
    runs = args.runs_dir / name
    data_root = args.data_root / exp["root"]
    ckpt = runs / f"source_s{seed}.ckpt"

    def record(method: str, privacy: str, metrics: dict[str, float], extra: dict[str, Any]) -> None:
        row = {"experiment": name, "method": method, "privacy": privacy, "seed": seed, **extra, "metrics": metrics}
        with sink.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"[{name} s{seed}] {method:13s} {privacy:6s} acc {metrics['test/acc']:.4f} auc "
              f"{metrics['test/auc']:.4f} gap {metrics.get('test/acc_gap', float('nan')):.4f}", flush=True)  # fmt: skip

    if exp["source"] is not None and not ckpt.is_file():
        cfg = prepare(load_config(exp["source"]), data_root, str(runs / f"source_s{seed}"), seed, args.source_epochs)
        cfg["trainer"]["callbacks"] = [
            c for c in cfg["trainer"]["callbacks"] if "ModelCheckpoint" not in c["class_path"]
        ]
        cli = fit(cfg, runs / "configs" / f"source_s{seed}.yaml")
        cli.trainer.save_checkpoint(ckpt)
    base = load_config(exp["target"] + "_dp")
    privacies = ["nodp"] + [f"eps{e:g}" for e in args.epsilons]
    neural = ("scratch", "transfer-all", "transfer-head") if exp["source"] is not None else ("scratch",)
    for method in neural:
        for privacy in privacies:
            if (name, method, privacy, seed) in done:
                continue
            cfg = prepare(base, data_root, str(runs / f"{method}_{privacy}_s{seed}"), seed, args.target_epochs)
            backbone = cfg["model"]["init_args"]["backbone"]["init_args"]
            backbone["init_from"] = None if method == "scratch" else str(ckpt)
            backbone["finetune"] = "head" if method == "transfer-head" else "all"
            callbacks = cfg["trainer"]["callbacks"]
            dp = next(c for c in callbacks if c["class_path"].endswith("DifferentialPrivacy"))
            if privacy == "nodp":
                callbacks.remove(dp)
            else:
                dp["init_args"]["target_epsilon"] = float(privacy[3:])
            start = time.time()
            cli = fit(cfg, runs / "configs" / f"{method}_{privacy}_s{seed}.yaml")
            dp_cb = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "DifferentialPrivacy"]
            extra = {"epsilon": float(dp_cb[0].epsilon) if dp_cb else None, "seconds": round(time.time() - start, 1)}
            record(method, privacy, score(neural_probs(cli), cli.datamodule), extra)
    from dplit.baselines.cli import build_datamodule
    from dplit.baselines.models import make_baseline
    from dplit.baselines.runs import write_run

    datamodule = None
    for method in ("hgb", "ensemble"):
        if (name, method, "nodp", seed) in done:
            continue
        datamodule = datamodule or build_datamodule(prepare(base, data_root, "", seed, None)["data"])
        x, y, _ = datamodule.arrays("train")
        start = time.time()
        model = make_baseline(method, seed).fit(x, y)
        metrics = score(model.predict_proba(datamodule.arrays("test")[0]), datamodule)
        write_run(runs / method, metrics, {"seed_everything": seed, "baseline": {"name": method, "dp": False},
                                          "data": base["data"]})  # fmt: skip
        record(method, "nodp", metrics, {"epsilon": None, "seconds": round(time.time() - start, 1)})


# ---------------------------------------------------------------- the table
def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (NaN with one value)."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return math.nan, math.nan
    if len(v) < 2:
        return float(np.mean(v)), math.nan
    return float(np.mean(v)), float(stats.t.ppf(0.975, len(v) - 1) * stats.sem(v))


def fmt(values: list[float], scale: float = 100.0) -> str:
    mean, half = mean_ci(values)
    if math.isnan(mean):
        return "—"
    return f"{scale * mean:.1f}" + ("" if math.isnan(half) else f" ± {scale * half:.1f}")


def group_names(rows: list[dict[str, Any]], attr: str) -> list[str]:
    mark = "test/acc/group=" if attr == "group" else f"test/acc/{attr}="
    names = [k[len(mark) :] for r in rows for k in r["metrics"] if k.startswith(mark)]
    return list(dict.fromkeys(names))  # the DataModule's group order (the order the metrics were logged in)


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines: list[str] = []
    privacies = ["nodp"] + [f"eps{e:g}" for e in args.epsilons]
    for name in dict.fromkeys(r["experiment"] for r in rows):
        exp_rows = [r for r in rows if r["experiment"] == name]
        sexes = group_names(exp_rows, "group")
        ages = group_names(exp_rows, "age")
        lines += [f"### {EXPERIMENTS[name]['title']}", ""]
        head = ["method", "privacy", "ε (spent)", "seeds", "acc", "AUC"] + [f"acc {s}" for s in sexes]
        head += ["sex gap (pp)", "AUC gap sex"] + [f"acc age {a}" for a in ages] + ["age gap (pp)"]
        race = any("test/acc_gap/race" in r["metrics"] for r in exp_rows)
        head += ["race gap (pp)"] if race else []
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in METHODS:
            for privacy in privacies:
                sel = [r for r in exp_rows if r["method"] == method and r["privacy"] == privacy]
                if not sel:
                    continue
                m = [r["metrics"] for r in sel]
                eps = [r["epsilon"] for r in sel if r.get("epsilon") is not None]
                cells = [method, "non-DP" if privacy == "nodp" else "DP", f"{np.mean(eps):.2f}" if eps else "—",
                         str(len(sel)), fmt([x["test/acc"] for x in m]), fmt([x["test/auc"] for x in m])]  # fmt: skip
                cells += [fmt([x.get(f"test/acc/group={s}", math.nan) for x in m]) for s in sexes]
                cells += [fmt([x.get("test/acc_gap/sex", x.get("test/acc_gap", math.nan)) for x in m])]
                cells += [fmt([x.get("test/auc_gap/sex", x.get("test/auc_gap", math.nan)) for x in m])]
                cells += [fmt([x.get(f"test/acc/age={a}", math.nan) for x in m]) for a in ages]
                cells += [fmt([x.get("test/acc_gap/age", math.nan) for x in m])]
                cells += [fmt([x.get("test/acc_gap/race", math.nan) for x in m])] if race else []
                lines.append("| " + " | ".join(cells) + " |")
        first = exp_rows[0]["metrics"]
        counts = [f"{s} {first.get(f'test/count/group={s}', 0):.0f}" for s in sexes]
        counts += [f"age {a} {first.get(f'test/count/age={a}', 0):.0f}" for a in ages]
        lines += ["", f"Test rows per group: {', '.join(counts)}. Cells: mean ± half-width of the 95% t interval over "
                  "seeds (%; gaps and differences in pp).", ""]  # fmt: skip
        if not any(r["method"] == "transfer-all" for r in exp_rows):
            continue
        lines += ["Paired differences (transfer-all minus scratch, same seed), in pp:", ""]
        lines += ["| privacy | Δ acc | Δ AUC | Δ sex gap | Δ age gap |", "|---|---|---|---|---|"]
        for privacy in privacies:
            pairs = []
            for seed in sorted({r["seed"] for r in exp_rows}):
                pick = {r["method"]: r["metrics"] for r in exp_rows if r["seed"] == seed and r["privacy"] == privacy}
                if "scratch" in pick and "transfer-all" in pick:
                    pairs.append((pick["transfer-all"], pick["scratch"]))
            if not pairs:
                continue
            diff = {k: [a.get(k, math.nan) - b.get(k, math.nan) for a, b in pairs]
                    for k in ("test/acc", "test/auc", "test/acc_gap/sex", "test/acc_gap/age")}  # fmt: skip
            label = "non-DP" if privacy == "nodp" else privacy
            lines.append(f"| {label} | " + " | ".join(fmt(v) for v in diff.values()) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 8.0])
    parser.add_argument("--source-epochs", type=int, default=None, help="default: the source config's")
    parser.add_argument("--target-epochs", type=int, default=None, help="default: the target config's")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "tabular_results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "tabular" / "results_table.md")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="delete RUNS first")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    args.runs_dir, args.data_root = args.runs_dir.resolve(), args.data_root.resolve()
    if args.fresh and args.runs_dir.exists():
        shutil.rmtree(args.runs_dir)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    sink = args.runs_dir / "results.jsonl"
    if not args.table_only:
        os.chdir(args.runs_dir)
        for seed in args.seeds:
            for name in args.experiments:
                rows = [json.loads(line) for line in sink.open()] if sink.is_file() else []
                done = {(r["experiment"], r["method"], r["privacy"], r["seed"]) for r in rows}
                run_seed(name, EXPERIMENTS[name], seed, args, done, sink)
    rows = [json.loads(line) for line in sink.open()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(rows, args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
