"""UTKFace gender by race from scratch (DP vs non-DP, augmentation multiplicity), and the by-race table of both parts.

Issue 13, deliverable 7 (a) and the augmentation-multiplicity measurement, scaled to 2 shared CPU cores:

- The data is dplit's ``UTKFaceDataModule`` (gender task, race groups) with the paper's imbalance: Black faces cut
  to ``--black`` (500) TRAINING faces, the other races keep all theirs; validation and test keep every face (the
  same seeded split as ``scripts/vision_results.py --part utkface``, so both parts are scored on the same faces).
  Faces are resized to ``--resize`` and cropped to ``--crop`` (random crop + horizontal flip in training).
- The model is :class:`SmallGNCNN`, a from-scratch GroupNorm CNN (61k parameters at the default widths). dplit's
  ``ResNet18GN`` was measured first: one DP epoch of it at 32 px took about 0.16 s per face here (~40 min for the
  13.9k training faces), too slow for the time available.
- Cells: non-DP, DP at each ``--epsilons`` (noise calibrated by the DP callback for the run's epochs, delta 1e-5,
  C = 1, Poisson sampling), and with ``--augmult K`` the DP cells again with K augmented views per face as one
  privacy unit (``MultiViewClassificationTask``: the K rows' gradients are averaged per face before clipping, so
  the epsilon is the same as K = 1).

``--table`` writes ``OUT/faces.md``: overall, per-race accuracy and AUC, worst race and gaps for these rows and for
the pretrained rows of ``OUT/utkface/results.jsonl`` (written by ``scripts/vision_results.py --part utkface``).

    nice -n 10 python scripts/vision_results_faces.py --out runs/vision_results --epsilons 8 --augmult 4
    python scripts/vision_results_faces.py --out runs/vision_results --table
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from dplit.callbacks import DifferentialPrivacy, SubgroupMetrics
from dplit.data.utkface import RACES, UTKFaceDataModule
from dplit.models.resnet import group_norm
from dplit.tasks import ClassificationTask, MultiViewClassificationTask

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


class SmallGNCNN(nn.Module):
    """Four 3x3 conv -> GroupNorm -> ReLU stages (max-pool after the first three), global average pool, linear.

    Shapes: images [B, 3, H, W] -> logits [B, num_classes]; default widths 16, 32, 64, 64 (60,994 parameters for
    2 classes). No BatchNorm: no layer mixes the examples of a batch.
    """

    def __init__(self, num_classes: int = 2, widths: tuple[int, ...] = (16, 32, 64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), group_norm(c, 8), nn.ReLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, num_classes]."""
        return self.head(self.features(x).mean(dim=(2, 3)))


def run_cell(eps: float | None, views: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Trains one from-scratch cell and returns its test metrics, epsilon and time."""
    torch.manual_seed(args.seed)
    dm = UTKFaceDataModule(root=str(SHARED / "utkface"), task="gender", underrepresented={"Black": args.black},
                           resize=args.resize, crop=args.crop, augment=True, augmentation_multiplicity=views,
                           limit_train=args.train_size or None, batch_size=args.batch_size, eval_batch_size=1024,
                           seed=args.seed)  # fmt: skip
    task_cls = ClassificationTask if views == 1 else MultiViewClassificationTask
    task = task_cls(SmallGNCNN(2, tuple(args.widths)), optimizer=partial(torch.optim.Adam, lr=args.lr))
    callbacks: list[Any] = [SubgroupMetrics(train_diagnostics=False, wandb_panels=False)]
    dp = None
    if eps is not None:
        dp = DifferentialPrivacy(target_epsilon=eps, delta=1e-5, max_grad_norm=1.0, max_physical_batch_size=512,
                                 ledger=False)  # fmt: skip
        callbacks.append(dp)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        default_root_dir=str(out), num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    start = time.time()
    trainer.fit(task, datamodule=dm)
    trainer.test(task, datamodule=dm, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    counts = dict(zip(RACES, dm.train_group_counts["race"], strict=True))
    return {"epsilon": None if dp is None else float(dp.epsilon), "seconds": round(time.time() - start, 1),
            "train_faces_per_race": counts, **metrics}  # fmt: skip


def fmt(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}"


def race_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per cell; overall acc, per-race acc and AUC, worst race, acc gap, AUC gap (percent)."""
    head = ["model", "seed", "privacy", "K", "test acc", *(f"acc {r}" for r in RACES), "worst-race acc", "acc gap",
            *(f"AUC {r}" for r in RACES), "AUC gap", "epochs", "time (s)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        privacy = "non-DP" if r["target_eps"] is None else f"eps {r['epsilon']:.2f}"
        m = {k.removeprefix("test/"): v for k, v in r.items() if k.startswith("test/")}
        cells = [r["model"], str(r.get("seed", 0)), privacy, str(r.get("views", 1)), fmt(m.get("acc"))]
        cells += [fmt(m.get(f"acc/group={race}")) for race in RACES]
        cells += [fmt(m.get("worst_group_acc/race", m.get("worst_group_acc"))), fmt(m.get("acc_gap/race",
                  m.get("acc_gap")))]  # fmt: skip
        cells += [fmt(m.get(f"auc/group={race}")) for race in RACES]
        cells += [fmt(m.get("auc_gap/race", m.get("auc_gap"))), str(r["epochs"]), str(r["seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per DP row, the privacy cost per race (non-DP twin - DP, same model, percentage points) of
    accuracy and of AUC, and the change of the race gaps (DP gap - non-DP gap)."""
    head = ["model", "seed", "privacy", "K", *(f"acc cost {r}" for r in RACES), "acc-gap change",
            *(f"AUC cost {r}" for r in RACES), "AUC-gap change"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    twins = {(r["model"], r.get("seed", 0)): r for r in rows if r["target_eps"] is None}
    for r in rows:
        base = twins.get((r["model"], r.get("seed", 0)))
        if r["target_eps"] is None or base is None:
            continue

        def diff(key: str, sign: int = 1) -> str:
            a, b = base.get(f"test/{key}"), r.get(f"test/{key}")
            return "n/a" if a is None or b is None else f"{100 * sign * (a - b):+.1f}"

        cells = [r["model"], str(r.get("seed", 0)), f"eps {r['epsilon']:.2f}", str(r.get("views", 1))]
        cells += [diff(f"acc/group={race}") for race in RACES] + [diff("acc_gap/race", -1)]
        cells += [diff(f"auc/group={race}") for race in RACES] + [diff("auc_gap/race", -1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "vision_results")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0])
    parser.add_argument("--augmult", type=int, default=0, help="also the DP cells with K views per face (0: no)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-DP cell")
    parser.add_argument("--black", type=int, default=500)
    parser.add_argument("--resize", type=int, default=36)
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=0, help="training faces after the cut (0: all)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 64], help="SmallGNCNN channels")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", action="store_true", help="only write OUT/faces.md from the results")
    args = parser.parse_args()
    torch.set_num_threads(1)  # 2 cores shared with other sessions
    out = args.out / "faces_scratch"
    out.mkdir(parents=True, exist_ok=True)
    sink = out / "results.jsonl"
    rows = read(sink)
    if not args.table:
        cells = [] if args.no_baseline else [(None, 1)]
        cells += [(e, 1) for e in args.epsilons] + [(e, args.augmult) for e in args.epsilons if args.augmult > 1]
        done = {(r["target_eps"], r["views"], r["epochs"], r["crop"], r["model"], r.get("seed", 0)) for r in rows}
        model = f"SmallGNCNN {'-'.join(map(str, args.widths))} (scratch)"
        for eps, views in cells:
            if (eps, views, args.epochs, args.crop, model, args.seed) in done:
                continue
            result = run_cell(eps, views, args, out)
            row = {"model": model, "target_eps": eps, "views": views, "epochs": args.epochs, "seed": args.seed,
                   "crop": args.crop, "scale": f"UTKFace gender, all training faces with Black cut to {args.black}, "
                   f"{args.crop}px crops of {args.resize}px, {args.epochs} epochs, batch {args.batch_size}, Adam lr "
                   f"{args.lr}, seed {args.seed}, 2 shared CPU cores", **result}  # fmt: skip
            rows.append(row)
            with sink.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("target_eps", "views", "epsilon", "test/acc", "seconds")}),
                  flush=True)  # fmt: skip
    pretrained = [{**r, "model": f"EfficientNet-Lite0 {r['layers']} (pretrained)",
                   "epochs": int(r["scale"].split(", ")[1].split()[0])}
                  for r in read(args.out / "utkface" / "results.jsonl")]  # fmt: skip
    text = race_table(pretrained + rows) + "\n\n" + cost_table(pretrained + rows) + "\n"
    (args.out / "faces.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
