"""Where the DP run's extra peak memory sits, step by step: resident memory between steps and each step's own peak.

Runs ``bench_dp_overhead.py``'s Lightning worker (MnistCNN on the full MNIST, the same trainer and callbacks) for a
configuration, with glibc's mmap threshold fixed at 64 KiB (as the benchmark's memory runs), and prints after every
physical step: its batch size, the RSS after it (above the post-setup RSS) and the step's own peak (VmHWM, reset
before each step, minus the RSS at its start). ``--onednn off`` runs the same with oneDNN disabled
(``torch.backends.mkldnn.enabled = False``), to tell oneDNN's per-shape state from dplit's own memory: Poisson batches
(and their split into physical batches) come in many sizes, and oneDNN keeps state for every input shape it meets.

    python scripts/probe_rss_per_step.py --configs nodp dp_bk_cap --onednn on off --steps 30

Prints one summary line per run: RSS growth from the first to the last step (MB per step), the median and largest
step peak, and the VmHWM-based peak over the whole window that ``bench_dp_overhead.py`` reports.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARK = "PROBE "


def _kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(config: str, onednn: str, steps: int) -> None:
    spec = importlib.util.spec_from_file_location("bench_dp_overhead", HERE / "bench_dp_overhead.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))
    spec.loader.exec_module(bench)
    rows: list[dict[str, float]] = []
    state: dict[str, float] = {}
    start, end = bench.StepTimer.start, bench.StepTimer.end

    def on_start(self, n: int) -> None:  # type: ignore[no-untyped-def]
        start(self, n)
        state["rss0"] = _kb("VmRSS")
        _reset_hwm()

    def on_end(self) -> None:  # type: ignore[no-untyped-def]
        end(self)
        base = self.peak.base_kb
        rows.append(
            {
                "n": self.sizes[-1],
                "rss_mb": (_kb("VmRSS") - base) / 1024,
                "step_peak_mb": (_kb("VmHWM") - state["rss0"]) / 1024,
            }
        )

    bench.StepTimer.start, bench.StepTimer.end = on_start, on_end
    sys.argv = [
        "bench_dp_overhead.py", "--worker", config, "--data", "files", "--steps", str(steps), "--warmup", "1",
        "--threads", "1", "--onednn", onednn,
    ]  # fmt: skip
    bench.main()
    print(MARK + json.dumps(rows), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["nodp", "dp_bk_cap"])
    p.add_argument("--onednn", nargs="+", default=["on", "off"], choices=["on", "off"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--worker", nargs=2, metavar=("CONFIG", "ONEDNN"), help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true", help="print every step")
    args = p.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.steps)
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", WANDB_MODE="disabled")
    for onednn in args.onednn:
        for config in args.configs:
            cmd = [sys.executable, __file__, "--worker", config, onednn, "--steps", str(args.steps)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            lines = [line for line in out.stdout.splitlines() if line.startswith(MARK)]
            if out.returncode or not lines:
                raise SystemExit(f"{config} onednn={onednn} failed:\n{out.stderr[-3000:]}")
            rows = json.loads(lines[-1][len(MARK) :])
            bench = next(json.loads(x.split(" ", 1)[1]) for x in out.stdout.splitlines() if x.startswith("BENCH_"))
            if args.verbose:
                for i, r in enumerate(rows):
                    print(
                        f"  {config} onednn={onednn} step {i}: n={r['n']} rss {r['rss_mb']:.1f} "
                        f"peak {r['step_peak_mb']:.1f}"
                    )
            later = rows[1:]  # the first step builds the kernels of the first shapes
            growth = (later[-1]["rss_mb"] - later[0]["rss_mb"]) / max(1, len(later) - 1)
            peaks = [r["step_peak_mb"] for r in later]
            print(
                f"{config:<10} onednn={onednn:<3} steps {len(rows)}: RSS after step 2 {later[0]['rss_mb']:.1f} MB, "
                f"after the last {later[-1]['rss_mb']:.1f} MB ({growth:+.2f} MB/step); step peak median "
                f"{statistics.median(peaks):.1f} MB, max {max(peaks):.1f} MB; window peak (as bench_dp_overhead) "
                f"{bench['peak_mb']:.1f} MB; {len({r['n'] for r in rows})} batch sizes",
                flush=True,
            )


if __name__ == "__main__":
    main()
