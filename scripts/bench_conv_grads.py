"""Per-example Conv2d weight gradients on MnistCNN's two layers (B=256): ``unfold`` + ``bmm`` (book-keeping before),
``patches`` (a strided copy of the input patches + batched product) and ``grouped`` (one grouped convolution
weight-gradient, the batch as groups), interleaved; process CPU time (``time.process_time``) per call, 1 thread.

    .venv/bin/python scripts/bench_conv_grads.py --reps 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.functional import unfold

from dplit.privacy.conv_grads import per_example_weight_grads

LAYERS = {"conv1": (1, 20, 28, 5), "conv2": (20, 50, 12, 5)}  # MnistCNN: in, out, input side, kernel


def _unfold_bmm(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    cols = unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # [n, in*k*k, L]
    return torch.bmm(g.flatten(2), cols.transpose(1, 2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out: dict[str, dict[str, list[float]]] = {}
    for name, (cin, cout, side, k) in LAYERS.items():
        m = nn.Conv2d(cin, cout, k)
        a = torch.randn(args.batch_size, cin, side, side)
        g = torch.randn(args.batch_size, cout, side - k + 1, side - k + 1)
        methods: dict[str, Callable[[], torch.Tensor]] = {
            "unfold_bmm": lambda: _unfold_bmm(m, a, g),
            "patches": lambda: per_example_weight_grads(m, a, g, "patches"),
            "grouped": lambda: per_example_weight_grads(m, a, g, "grouped"),
        }
        ref = methods["unfold_bmm"]()
        for f in methods.values():  # same gradients (summation order aside); also a warm-up
            torch.testing.assert_close(f(), ref, rtol=1e-4, atol=1e-3)
        times: dict[str, list[float]] = {k: [] for k in methods}
        for _ in range(args.reps):
            for key, f in methods.items():
                t0 = time.process_time()
                f()
                times[key].append(1e3 * (time.process_time() - t0))
        out[name] = {k: [round(statistics.median(v), 2), round(min(v), 2)] for k, v in times.items()}
    print(json.dumps({"cpu_ms_median_min": out, "batch_size": args.batch_size, "threads": args.threads}))


if __name__ == "__main__":
    main()
