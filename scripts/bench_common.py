"""Pieces shared by the benchmark scripts: the timing callback, the bare Lightning trainer they time, and the
fresh-process worker runs whose result is one marked JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_worker(cmd: list[str], threads: int, mark: str, failure: str, **env: str) -> dict[str, Any]:
    """Run ``cmd`` in a fresh process (W&B off, ``threads`` OpenMP/MKL threads, extra ``env``; a value "" unsets it)
    and return the JSON after the last ``mark`` it prints; on failure, its output tail and SystemExit(``failure``)."""
    full = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    for key, value in env.items():
        if value:
            full[key] = value
        else:
            full.pop(key, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(mark)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{failure} (exit {proc.returncode}); its output is above")
    return json.loads(lines[-1][len(mark) :])


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_trainer(
    timer: Any, callbacks: list[Any], prefix: str = "dplit-bench-", accelerator: str = "cpu", precision: str = "32-true"
) -> Any:
    """A one-device Trainer (CPU by default) running ``timer.total`` steps, no validation/logging/checkpoints, with a
    timing callback added after ``callbacks`` (so a DP callback's per-step work is inside the step time). On CUDA the
    timer synchronises the device at every step boundary, so a step's time includes its kernels."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    class Timing(Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            timer.peak.reset()  # model, optimizer (DP-wrapped), data and loaders all exist by now

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            _sync()
            timer.start(len(batch[1]))

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            _sync()
            timer.end()

    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        default_root_dir=tempfile.mkdtemp(prefix=prefix),  # the DP callback's ledger goes there
        max_steps=timer.total,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, Timing()],
    )
