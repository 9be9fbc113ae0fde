"""Micro-benchmark of one book-keeping step on MnistCNN (B=256), no Lightning: process CPU time per step, and the
operators that take it (torch profiler).

Variants in one process, interleaved: ``nodp`` (forward + backward), ``bk_autograd_weight_grad`` (book-keeping with
autograd also forming the summed weight and bias gradients, i.e. without the pre-hooks that hide them), ``bk``
(book-keeping as in this tree) and, with ``--before REV``, ``bk_before`` (the ``BookKeeping`` of
``dplit/privacy/bookkeeping.py`` at git revision REV, loaded from ``git show``, for a before/after in one run). CPU
time (``time.process_time``) is less sensitive than wall time to other processes on a shared machine, though not
immune (caches, memory bandwidth).

    .venv/bin/python scripts/bench_bookkeeping_step.py --rounds 3 --steps 15 [--before main] [--profile]
    .venv/bin/python scripts/bench_bookkeeping_step.py --memory   # peak memory of one step, per phase

``--memory``: each variant in a fresh process with glibc's mmap threshold fixed at 64 KiB (RSS then follows live
tensors), after 3 warm-up steps: the peak RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS at the
step's start, through the forward, through the backward, and through ``clip_into_grad``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from typing import Any

import torch
from torch.nn import functional as F

from dplit.models import MnistCNN
from dplit.privacy.bookkeeping import BookKeeping

_BEFORE: list[Any] = []  # the BookKeeping class at --before REV


def _load_before(rev: str) -> Any:
    """``BookKeeping`` from ``dplit/privacy/bookkeeping.py`` at git revision ``rev`` (run from the repository root)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:dplit/privacy/bookkeeping.py"], check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType("bookkeeping_before")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{rev}:dplit/privacy/bookkeeping.py", "exec"), module.__dict__)
    return module.BookKeeping


def _bookkeeping(net: torch.nn.Module, hide_weights: bool, before: bool = False) -> BookKeeping:
    bk = _BEFORE[0](net, 1.0) if before else BookKeeping(net, 1.0)
    if not hide_weights:  # the hooks without the forward pre-hooks that hide weights from autograd
        bk.remove_hooks()
        for m in bk.layers:
            bk._handles.append(m.register_forward_hook(bk._forward_hook))
            bk._handles.append(m.register_full_backward_hook(bk._backward_hook))
    return bk


def _model(name: str, batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """MnistCNN on [B, 1, 28, 28]; or a transformer-sized MLP block stack (Linear 384-1536-384 x 2, 64 tokens)."""
    torch.manual_seed(0)
    if name == "cnn":
        return MnistCNN(), torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    blocks = [torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384), torch.nn.GELU()] * 1
    net = torch.nn.Sequential(
        torch.nn.Linear(128, 384), *blocks, torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384),
        torch.nn.Flatten(), torch.nn.Linear(64 * 384, 10),
    )  # fmt: skip
    return net, torch.randn(batch, 64, 128), torch.randint(0, 10, (batch,))


def _steps(variant: str, steps: int, batch: int, model: str = "cnn") -> list[float]:
    net, x, y = _model(model, batch)
    bk = None if variant == "nodp" else _bookkeeping(net, variant != "bk_autograd_weight_grad", variant == "bk_before")
    out = []
    for i in range(steps + 3):
        t0 = time.process_time()
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        if bk is not None:
            bk.clip_into_grad()
        if i >= 3:
            out.append(time.process_time() - t0)
    if bk is not None:
        bk.remove_hooks()
    return out


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _memory_worker(variant: str, batch: int) -> None:
    net, x, y = _model("cnn", batch)
    bk = None if variant == "nodp" else _bookkeeping(net, True, variant == "bk_before")
    for _ in range(3):
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        if bk is not None:
            bk.clip_into_grad()
    net.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _kb("VmRSS")
    loss = F.cross_entropy(net(x), y)
    forward = _kb("VmHWM") - base
    loss.backward()
    backward = _kb("VmHWM") - base
    if bk is not None:
        bk.clip_into_grad()
    peak = {"forward": forward, "backward": backward, "clip": _kb("VmHWM") - base}
    print(json.dumps({variant: {k: round(v / 1024, 1) for k, v in peak.items()}}))


def _memory(args: argparse.Namespace) -> None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out: dict[str, Any] = {}
    for variant in ("nodp", "bk_before", "bk") if args.before else ("nodp", "bk"):
        cmd = [sys.executable, __file__, "--memory-worker", variant, "--batch-size", str(args.batch_size)]
        cmd += ["--threads", str(args.threads)] + (["--before", args.before] if args.before else [])
        out.update(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout))
    print(json.dumps({"peak_mb_above_step_start": out, "batch_size": args.batch_size, "mmap_threshold": 65536}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", choices=("cnn", "mlp"), default="cnn", help="mlp: Linear layers over 64 tokens")
    p.add_argument("--before", metavar="REV", help="also time the BookKeeping of this git revision (bk_before)")
    p.add_argument("--profile", action="store_true", help="torch profiler table of 5 bk steps")
    p.add_argument("--memory", action="store_true", help="peak memory of one step per phase (see above), no timing")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_worker or args.memory:
        if args.before:
            _BEFORE.append(_load_before(args.before))
        if args.memory_worker:
            _memory_worker(args.memory_worker, args.batch_size)
        else:
            _memory(args)
        return
    variants: tuple[str, ...] = ("nodp", "bk_autograd_weight_grad", "bk")
    if args.before:
        _BEFORE.append(_load_before(args.before))
        variants = ("nodp", "bk_autograd_weight_grad", "bk_before", "bk")
    med: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            med[v].append(1e3 * statistics.median(_steps(v, args.steps, args.batch_size, args.model)))
    result: dict[str, Any] = {
        "cpu_ms_per_step_per_round": {v: [round(t, 1) for t in med[v]] for v in variants},
        "over_nodp_per_round": {
            v: [round(a / b, 3) for a, b in zip(med[v], med["nodp"], strict=True)] for v in variants
        },
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "threads": args.threads,
        "before": args.before,
    }
    print(json.dumps(result))
    if args.profile:
        from torch.profiler import profile

        torch.manual_seed(0)
        net = MnistCNN()
        x, y = torch.randn(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,))
        bk = _bookkeeping(net, hide_weights=True)
        with profile() as prof:
            for _ in range(5):
                net.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                bk.clip_into_grad()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
