"""Same-process A/B of book-keeping's one-pass clipping of a large Conv2d (``conv_grads.clip_deferred``) against the
recomputed clipped sum, on MnistCNN at a fixed batch of 256, without Lightning (no sampling, noise or logging).

Three models with the same weights run interleaved steps (forward, backward, ``clip_into_grad``): ``nodp`` (plain
autograd), ``deferred`` (book-keeping with its own elementwise factors: conv2's weight in one pass) and
``recompute`` (book-keeping with the same factors given as whole-batch ``clip_factors``, which turns the one-pass
path off). Prints the median step times and both ratios to non-DP.

    .venv/bin/python scripts/bench_bk_deferred.py --threads 2 --rounds 12
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from dplit.models.cnn import MnistCNN
from dplit.privacy.bookkeeping import BookKeeping


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=12, help="interleaved timed steps per model")
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    first = MnistCNN()
    models = {"nodp": first}
    for name in ("deferred", "recompute"):
        models[name] = MnistCNN()
        models[name].load_state_dict(first.state_dict())
    bks = {name: BookKeeping(models[name], 1.0) for name in ("deferred", "recompute")}
    bks["recompute"].clip_factors = lambda norms: (1.0 / (norms + 1e-6)).clamp(max=1.0)  # whole-batch: no one pass
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))

    def step(name: str) -> float:
        model = models[name]
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        if name in bks:
            bks[name].clip_into_grad()
        return time.perf_counter() - start

    for name in models:  # warm-up
        for _ in range(3):
            step(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name in models:
            times[name].append(step(name))
    med = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    print(
        f"threads {args.threads}, B {args.batch_size}, median ms/step: "
        + ", ".join(f"{k} {v:.1f}" for k, v in med.items())
        + f"; deferred / nodp {med['deferred'] / med['nodp']:.3f}"
        + f", recompute / nodp {med['recompute'] / med['nodp']:.3f}"
    )
    for bk in bks.values():
        bk.remove_hooks()


if __name__ == "__main__":
    main()
