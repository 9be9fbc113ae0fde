"""DP vs non-DP federated runs on real data, and the per-bucket table for docs/federated/results.md.

    nice -n 10 python scripts/fed_results.py --dataset sent140 --rounds 10 --sample-rate 0.02 --out runs/fed_results
    python scripts/fed_results.py --dataset sent140 --out runs/fed_results --table-only   # table from finished runs
    (or --variant dp / --variant nodp in two processes at once, then --table-only)

Runs ``configs/fed_<dataset>_{dp,nodp}.yaml`` through Flower's simulation (``dplit.federated.simulation.simulate``)
with the given rounds and sampling rate (both runs the same), then writes ``OUT/<dataset>.md``: accuracy per
vocabulary bucket and per data-size bucket, DP vs non-DP, the privacy cost per bucket, and the epsilon spent.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(
    dataset: str,
    variant: str,
    rounds: int,
    sample_rate: float,
    out: Path,
    cpus: int,
    overrides: dict[str, float] | None = None,
) -> Path:
    """One run of ``configs/fed_<dataset>_<variant>.yaml``; ``overrides`` set ``federated.*`` keys (same for both)."""
    from dplit.federated.config import load_config, validate
    from dplit.federated.simulation import simulate

    cfg = load_config(ROOT / "configs" / f"fed_{dataset}_{variant}.yaml")
    cfg.federated.sample_rate = sample_rate
    for key, value in (overrides or {}).items():
        setattr(cfg.federated, key, type(getattr(cfg.federated, key))(value))
    validate(cfg)
    cfg.simulation.num_cpus = cpus
    cfg.output_dir = str(out / f"{dataset}_{variant}")
    return Path(simulate(cfg, rounds).run_dir or "")


def last_eval(run_dir: Path) -> dict[str, float]:
    with (run_dir / "metrics.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/acc")]
    return {k: float(v) for k, v in rows[-1].items() if v not in ("", None)}


def latest(folder: Path) -> Path:
    versions = sorted(folder.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    done = [v for v in versions if json.loads((v / "summary.json").read_text()).get("status") == "completed"]
    if not done:
        raise SystemExit(f"{folder}: no completed run (summary.json status)")
    return done[-1]


def unigram_baseline(data_config: dict) -> dict[str, float]:
    """Accuracy of always predicting the most frequent training target (pooled over users), overall and per bucket,
    keyed like the runs' metrics (``val/acc``, ``val/acc/group=<b>`` for the primary bucketing, ``val/acc/<attr>=``).
    """
    import torch

    from dplit.federated.config import DataConfig
    from dplit.federated.data import load_data

    data = load_data(DataConfig(**data_config))
    mode = int(torch.cat([u.y_train for u in data.users]).bincount().argmax())
    hits = [(u.y_eval == mode).float() for u in data.users]
    out = {"val/acc": float(torch.cat(hits).mean())}
    for attr, names in data.buckets.items():
        mark = "group" if attr == data_config["primary"] else attr
        for b, name in enumerate(names):
            part = [h for h, ub in zip(hits, data.user_bucket[attr], strict=True) if ub == b]
            out[f"val/acc/{mark}={name}"] = float(torch.cat(part).mean()) if part else math.nan
    return out


def curve(run_dir: Path) -> str:
    with (run_dir / "metrics.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/acc")]
    return ", ".join(f"{int(float(r['round']))}: {float(r['val/acc']):.3f}" for r in rows)


def table(dataset: str, out: Path) -> str:
    dp_dir, nodp_dir = latest(out / f"{dataset}_dp"), latest(out / f"{dataset}_nodp")
    dp, nodp = last_eval(dp_dir), last_eval(nodp_dir)
    config = json.loads(json.dumps(__import__("yaml").safe_load((dp_dir / "config.yaml").read_text())))
    fed, priv = config["federated"], json.loads((dp_dir / "summary.json").read_text())["privacy"]
    primary = config["data"]["primary"]
    lines = [
        f"### {dataset}: {int(dp['round'])} rounds, q = {fed['sample_rate']}, {fed['local_epochs']} local epoch(s)",
        "",
        f"DP: clip S = {priv['clip']}, noise multiplier z = {priv['noise_multiplier']:.3f}, user-level epsilon = "
        f"{priv['epsilon']:.2f} at delta = {priv['delta']:.2g}. Runs: `{dp_dir}`, `{nodp_dir}`.",
        "",
        f"Held-out accuracy by round (round: acc): non-DP {curve(nodp_dir)}; DP {curve(dp_dir)}.",
        "",
        "| bucket | held-out examples | unigram baseline | non-DP acc | DP acc | cost (non-DP - DP) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = unigram_baseline(config["data"])
    for attr in (primary, "size" if primary == "vocab" else "vocab"):
        mark = "group" if attr == primary else attr
        names = [k.split("=", 1)[1] for k in nodp if k.startswith(f"val/acc/{mark}=")]
        for name in names:
            a, b = nodp[f"val/acc/{mark}={name}"], dp.get(f"val/acc/{mark}={name}", math.nan)
            count = int(nodp.get(f"val/count/{mark}={name}", 0))
            u = base.get(f"val/acc/{mark}={name}", math.nan)
            lines.append(f"| {attr} {name} | {count} | {u:.3f} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    a, b = nodp["val/acc"], dp["val/acc"]
    lines.append(f"| **all** | | {base['val/acc']:.3f} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    if "val/output_vocab" in nodp and "val/output_vocab" in dp:
        a, b = nodp["val/output_vocab"], dp["val/output_vocab"]
        lines.append(f"| distinct predicted classes (output vocabulary) | | 1 | {a:.0f} | {b:.0f} | {a - b:+.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["sent140", "shakespeare"], default="sent140")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sample-rate", type=float, default=0.02)
    parser.add_argument("--cpus", type=int, default=1, help="Ray CPUs per run")
    parser.add_argument("--out", type=Path, default=Path("runs/fed_results"))
    parser.add_argument("--local-epochs", type=int, default=None, help="override federated.local_epochs")
    parser.add_argument("--local-lr", type=float, default=None, help="override federated.local_lr")
    parser.add_argument("--eval-every", type=int, default=None, help="override federated.eval_every")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--variant", choices=["both", "dp", "nodp"], default="both", help="run only one (in parallel)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    if not args.table_only:
        for variant in ("nodp", "dp") if args.variant == "both" else (args.variant,):
            overrides = {
                k: v
                for k, v in (
                    ("local_epochs", args.local_epochs),
                    ("local_lr", args.local_lr),
                    ("eval_every", args.eval_every),
                )
                if v is not None
            }
            run(args.dataset, variant, args.rounds, args.sample_rate, args.out, args.cpus, overrides)
        if args.variant != "both":
            return
    text = table(args.dataset, args.out)
    (args.out / f"{args.dataset}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
