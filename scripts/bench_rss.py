"""Where a `dplit fit` run's resident memory goes: RSS sampled over a short run of a config, DP against its twin.

Runs ``dplit fit --config CONFIG`` in this process (each config in a fresh subprocess) with a short schedule, a
background thread sampling VmRSS every ``--every`` seconds, and reports: RSS after setup (data + model), the peak
(VmHWM), RSS at the end, and the growth over the last half of the steps (a leak grows linearly with steps; allocator
caching plateaus). ``--no-diagnostics`` drops the SubgroupMetrics callback's per-group training diagnostics, and
``--mmap-threshold`` fixes glibc's mmap threshold at 64 KiB (freed large tensors go back to the kernel) to separate
live memory from what malloc keeps cached. Each worker first does what the ``dplit`` command does at start-up
(``dplit.cli.malloc.tune_malloc``): nothing by default; with ``--dplit-mmap-threshold BYTES`` (which sets
``DPLIT_MALLOC_MMAP_THRESHOLD``), a fixed mmap threshold set through ``mallopt``.

    .venv/bin/python scripts/bench_rss.py --configs mnist_dp,mnist_nodp --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"
MARK = "RSS_RESULT "


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(config: str, steps: int, every: float, diagnostics: bool) -> None:
    import torch

    from dplit.cli import DplitCLI
    from dplit.cli.malloc import tune_malloc

    threshold = tune_malloc()  # as the `dplit` command does at start-up
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    samples: list[tuple[float, float]] = []
    done = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter() - t0, _status_mb("VmRSS")))
            time.sleep(every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    args = [
        "fit", f"--config={ROOT / 'configs' / f'{config}.yaml'}", f"--data.init_args.root={SHARED_MNIST}",
        "--data.init_args.download=false", f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={tempfile.mkdtemp(prefix='dplit-rss-')}",
    ]  # fmt: skip
    if not diagnostics:
        args.append("--trainer.callbacks=[]")  # drops the config's callbacks; the DP callback is re-added below
        if "_dp" in config:
            args += ["--trainer.callbacks+=dplit.callbacks.DifferentialPrivacy",
                     "--trainer.callbacks.noise_multiplier=0.8", "--trainer.callbacks.grad_sample_mode=ghost",
                     "--trainer.callbacks.delta=1e-6"]  # fmt: skip
    setup_rss = _status_mb("VmRSS")
    DplitCLI(args=args)
    done.set()
    thread.join()
    rss = [r for _, r in samples]
    half = rss[len(rss) // 2 :]
    print(
        MARK
        + json.dumps(
            {
                "config": config,
                "diagnostics": diagnostics,
                "steps": steps,
                "rss_before_fit_mb": round(setup_rss, 1),
                "rss_peak_mb": round(_status_mb("VmHWM"), 1),
                "rss_end_mb": round(rss[-1], 1) if rss else None,
                "rss_max_sampled_mb": round(max(rss), 1) if rss else None,
                "growth_last_half_mb": round(half[-1] - half[0], 1) if len(half) > 1 else None,
                "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                "dplit_mmap_threshold": threshold,
                "wall_s": round(time.perf_counter() - t0, 1),
            }
        ),
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="mnist_dp,mnist_nodp")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=float, default=0.25, help="RSS sampling period (s)")
    p.add_argument("--no-diagnostics", action="store_true", help="without the config's callbacks (DP kept)")
    p.add_argument("--mmap-threshold", action="store_true", help="MALLOC_MMAP_THRESHOLD_=65536 (live memory)")
    p.add_argument("--dplit-mmap-threshold", default=None, help="DPLIT_MALLOC_MMAP_THRESHOLD (bytes) for the runs")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        worker(args.worker, args.steps, args.every, not args.no_diagnostics)
        return
    env = dict(os.environ, WANDB_MODE="disabled")
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env.pop("DPLIT_MALLOC_MMAP_THRESHOLD", None)
    if args.dplit_mmap_threshold:
        env["DPLIT_MALLOC_MMAP_THRESHOLD"] = args.dplit_mmap_threshold
    for config in args.configs.split(","):
        cmd = [sys.executable, __file__, "--worker", config, "--steps", str(args.steps), "--every", str(args.every)]
        cmd += ["--no-diagnostics"] if args.no_diagnostics else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
            raise SystemExit(f"{config} failed (exit {proc.returncode})")
        print(lines[-1][len(MARK) :], flush=True)


if __name__ == "__main__":
    main()
