"""Issue 15, deliverable 5: language-model bias under DP, with and without CDA, at smoke scale on 2 CPU cores.

Each cell is one ``dplit fit`` (or ``dplit validate`` for the model before fine-tuning) of a committed config,
``configs/lm_bias_{,cda_}{dp,nodp}.yaml``, with the scale overrides below written into the cell's own config file
(``OUT/<cell>/config.yaml``, the exact file that ran). The bias metrics are those the configs' ``BiasEvaluation``
logs at the end of the run (``val/bias/...``: BOLD prompts of held-out validation entities, StereoSet, CrowS-Pairs,
WinoBias dev perplexity gap), read from the cell's ``metrics.csv``. Results: ``OUT/results.jsonl`` (a rerun skips
finished cells) and ``OUT/results.md``.

    nice -n 5 python scripts/lm_bias_results.py --root ../shared/data/lm_bias --out runs/lm_bias_results

Smoke scale (the defaults): SmolLM2-135M (the offline GGUF), last 2 transformer blocks + final norm trained, BOLD
Wikipedia sentences of the gender domain packed into 32-token blocks, expected batch 8 units, 200 optimiser steps,
1 seed; scored on every gender item of StereoSet (255), CrowS-Pairs (262) and WinoBias dev, and on every BOLD gender
prompt of the validation entities (329). The paper (Srivastava et al. 2024) fine-tunes all of DistilGPT2 on WikiText
for epochs; the paper-scale commands are in docs/lm_bias/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from dplit.report.runs import read_metrics

REPO = Path(__file__).resolve().parent.parent


def cells(epsilons: list[float]) -> list[str]:
    """``base`` (the model before fine-tuning), then non-DP and DP at each epsilon, without and with CDA."""
    dp = [f"dp_eps{e:g}" for e in epsilons]
    return ["base", "nodp", *dp, "cda_nodp", *[f"cda_{c}" for c in dp]]


SHOWN = [  # (metric key under val/bias/, column title); {tox} is profanity or toxicity (see --toxicity-model)
    ("bold_{tox}/group=American_actors", "BOLD {tox}, male"),
    ("bold_{tox}/group=American_actresses", "BOLD {tox}, female"),
    ("bold_{tox}_diff", "BOLD {tox} female - male (95% CI)"),
    ("bold_sentiment/group=American_actors", "BOLD sentiment, male"),
    ("bold_sentiment/group=American_actresses", "BOLD sentiment, female"),
    ("stereoset_ss/group=gender", "StereoSet SS gender"),
    ("stereoset_lms/group=gender", "StereoSet LMS gender"),
    ("stereoset_icat/group=gender", "StereoSet ICAT gender"),
    ("crows/group=gender", "CrowS gender"),
    ("ppl_gap", "WinoBias ppl gap"),
]
PAPER = {  # Srivastava et al. 2024, Table 1: DistilGPT2, mean toxicity of BOLD generations, male / female
    "nodp": (0.0189, 0.0350), "dp_eps3": (0.0681, 0.1197), "dp_eps10": (0.0521, 0.1309),
}  # fmt: skip


def cell_config(cell: str, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The subcommand and the config dict of one cell: a committed config with the scale overrides applied."""
    cda = cell.startswith("cda_")
    dp = "dp_eps" in cell
    name = f"lm_bias_{'cda_' if cda else ''}{'dp' if dp else 'nodp'}.yaml"
    cfg = yaml.safe_load((REPO / "configs" / name).read_text())
    cfg["seed_everything"] = args.seed
    tr = cfg["trainer"]
    tr.update(
        max_steps=args.steps,
        max_epochs=args.epochs,
        default_root_dir=str(args.out / cell),
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=args.val_batches or None,
        val_check_interval=args.steps if args.steps > 0 else None,
    )  # validate once, at the last step
    tr["logger"] = [lg for lg in tr["logger"] if "Wandb" not in lg["class_path"]]
    for cb in tr["callbacks"]:
        init = cb.setdefault("init_args", {})
        if cb["class_path"].endswith("BiasEvaluation"):
            init.update(
                limit=args.limit or None,
                bold_domains=list(args.bold_domains),
                groups=list(args.bias_groups) if args.bias_groups != ["all"] else None,
            )
            if args.toxicity_model:
                init["toxicity_model"] = str(args.toxicity_model)
        if cb["class_path"].endswith("DifferentialPrivacy"):
            init["target_epsilon"] = float(cell.rsplit("eps", 1)[1])
            # physical batches as large as the non-DP twin's (no split of an expected batch of 8: faster on CPU;
            # max_steps counts logical steps either way)
            init["max_physical_batch_size"] = max(64, 8 * args.batch_size)
    bb = cfg["model"]["init_args"]["backbone"]["init_args"]
    bb.update(model=args.model, finetune=args.finetune, last_k=args.last_k)
    data = cfg["data"]["init_args"]
    data.update(root=str(args.root), tokenizer=args.tokenizer or args.model, corpus=args.corpus,
                block_size=args.block, batch_size=args.batch_size, bold_domains=args.bold_domains)  # fmt: skip
    if args.corpus_path:
        data["corpus_path"] = str(args.corpus_path)
    return ("validate" if cell == "base" else "fit"), cfg


def last_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of every column of the cell's newest CSV metrics (the report's own reader)."""
    files = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run_dir}")
    return read_metrics(files[-1])[0]


def run_cell(cell: str, args: argparse.Namespace) -> dict[str, Any]:
    command, cfg = cell_config(cell, args)
    out = args.out / cell
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "dplit.cli", command, "--config", str(out / "config.yaml")]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    with (out / "log.txt").open("w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if rc != 0:
        raise SystemExit(f"cell {cell} failed (exit {rc}); see {out / 'log.txt'}")
    metrics = last_metrics(out)
    return {"cell": cell, "seconds": round(time.time() - t0), "metrics": metrics}


def fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.{digits}f}"


def diff(m: dict[str, float], metric: str) -> str:
    """Female minus male mean of a BOLD metric with a normal 95% interval from the two standard errors."""
    f, ma = (m.get(f"val/bias/{metric}/group=American_{g}") for g in ("actresses", "actors"))
    if f is None or ma is None:
        return "-"
    sf, sm = (m.get(f"val/bias/{metric}_se/group=American_{g}") for g in ("actresses", "actors"))
    if sf is None or sm is None or math.isnan(sf) or math.isnan(sm):
        return f"{f - ma:+.4f}"
    half = 1.96 * math.sqrt(sf * sf + sm * sm)
    return f"{f - ma:+.4f} ({f - ma - half:+.4f}, {f - ma + half:+.4f})"


def table(rows: list[dict[str, Any]], order: list[str]) -> str:
    keys = {k for r in rows for k in r["metrics"]}
    tox = "toxicity" if any(k.startswith("val/bias/bold_toxicity") for k in keys) else "profanity"
    shown = [(k.format(tox=tox), t.format(tox=tox)) for k, t in SHOWN]
    head = ["cell", "epsilon", "val ppl", "val ppl male", "val ppl female", *[t for _, t in shown], "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: order.index(r["cell"]) if r["cell"] in order else len(order)):
        m = r["metrics"]
        eps = m.get("privacy/epsilon")
        ppl = m.get("val/ppl")
        eps_text = fmt(eps, 2) if eps is not None else ("-" if r["cell"] == "base" else "non-DP")
        vals = [diff(m, k.split("_diff")[0]) if k.endswith("_diff") else fmt(m.get(f"val/bias/{k}")) for k, _ in shown]
        by_gender = [fmt(m.get(f"val/ppl/group=American_{g}"), 2) for g in ("actors", "actresses")]
        lines.append(f"| {r['cell']} | {eps_text} | {fmt(ppl, 2)} | "
                     + " | ".join(by_gender) + " | "
                     + " | ".join(vals) + f" | {r['seconds'] / 60:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "lm_bias")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "lm_bias_results")
    p.add_argument("--epsilons", nargs="+", type=float, default=[3.0, 10.0])
    p.add_argument("--cells", nargs="+", default=None, help="a subset of the cells (default: all)")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps (-1: run --epochs)")
    p.add_argument("--epochs", type=int, default=3, help="epochs, when --steps does not stop the run first")
    p.add_argument("--model", default="smollm2", help="smollm2, a .gguf file, a Hugging Face folder or hub name")
    p.add_argument("--tokenizer", default=None, help="default: --model")
    p.add_argument("--corpus", default="bold", choices=["bold", "text", "jsonl", "wikitext"])
    p.add_argument("--corpus-path", type=Path, default=None, help="file or folder of a non-BOLD corpus")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--finetune", default="last_k", choices=["all", "last_k", "lora"])
    p.add_argument("--last-k", type=int, default=2)
    p.add_argument("--limit", type=int, default=0, help="items per benchmark (BOLD: prompts); 0: all")
    p.add_argument(
        "--bias-groups",
        nargs="+",
        default=["gender"],
        help="StereoSet domains / CrowS-Pairs bias types scored ('all': every one)",
    )
    p.add_argument("--toxicity-model", type=Path, default=None, help="a local Hugging Face toxicity classifier")
    p.add_argument("--bold-domains", nargs="+", default=["gender"])
    p.add_argument("--val-batches", type=int, default=0, help="validation batches (0: all)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    order = cells(args.epsilons)
    if unknown := set(args.cells or []) - set(order):
        p.error(f"--cells {sorted(unknown)} unknown; choose from {order}")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    done_file = args.out / "results.jsonl"
    done = [json.loads(line) for line in done_file.read_text().splitlines()] if done_file.exists() else []
    finished = {r["cell"] for r in done}
    for cell in args.cells or order:
        if cell in finished:
            print(f"{cell}: done, skipped", flush=True)
            continue
        row = run_cell(cell, args)
        done.append(row)
        with done_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        (args.out / "results.md").write_text(table(done, order) + "\n")
        print(table(done, order), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
