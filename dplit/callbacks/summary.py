"""RunSummary: at the end of ``fit`` / ``validate`` / ``test``, a short table on the console and ``summary.json``.

The table (rank zero only) says what the run spent and what it got: epsilon, delta, steps and the true stop reason;
overall accuracy; accuracy and count per group, the worst group and the gap; where the run folder, checkpoint and
W&B run are; and the ``dplit report`` command that compares the run with its twin config. ``summary.json`` in the
run folder holds the same values plus ``kind`` (fit/validate/test/audit) and ``status`` (completed/failed/
interrupted), which ``dplit report`` uses to pick training runs and skip audits and failed runs.

The privacy numbers are read from the DifferentialPrivacy callback's public attributes (``epsilon``,
``config.delta``, ``accountant.steps``, ``stop_reason``); for an evaluation of a checkpoint, from the callback state
that the checkpoint holds. The dplit CLI adds this callback to every run unless the config lists one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from dplit.callbacks.privacy import DifferentialPrivacy
from dplit.report.select import SUMMARY_FILE
from dplit.report.twins import config_root_dir, shown, twin_config

GROUP = "/group="
Kind = Literal["fit", "validate", "test", "audit"]


class RunSummary(Callback):
    """End-of-run table on the console (rank zero) and ``summary.json`` in the run folder.

    Args:
        print_table: print the table at the end of ``fit`` / ``validate`` / ``test``.
        announce_wandb: say once, when the run starts, where its W&B run goes (URL, or offline folder and the
            ``wandb sync`` command).
        kind: what the run is, written to ``summary.json``; None: the trainer's stage (fit/validate/test).
            ``dplit audit`` sets ``audit`` so the report never mistakes the canary run for a training run.
    """

    def __init__(self, print_table: bool = True, announce_wandb: bool = True, kind: Kind | None = None) -> None:
        self.print_table = print_table
        self.announce_wandb = announce_wandb
        self.kind = kind
        self.config_files: list[str] = []
        """Config files of the run (set by the dplit CLI): their twin gives the comparison command."""
        self.summary: dict[str, Any] | None = None
        self.train_counts: dict[str, int] | None = None
        """Training examples per group (primary attribute), when the training set can count them."""
        self._announced = False
        self._pending: dict[str, Any] | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.announce_wandb and not self._announced and trainer.is_global_zero:
            self._announced = True
            for where in _wandb_locations(trainer):
                print(f"W&B: {_wandb_text(where)}", flush=True)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = getattr(trainer.datamodule, "group_names", None)  # type: ignore[attr-defined]
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        if names and callable(getattr(dataset, "group_counts", None)):
            try:
                counts = dataset.group_counts(len(names))  # type: ignore[union-attr]
            except (RuntimeError, ValueError):  # e.g. several group attributes ([N, A] ids): counts unknown
                return
            self.train_counts = {str(name): int(c) for name, c in zip(names, counts, strict=True)}

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, "fit", "completed")

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self._finish(trainer, "validate", "completed")

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, "test", "completed")

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        stage = str(trainer.state.fn.value) if trainer.state.fn is not None else "fit"
        self._finish(trainer, stage, status, error=f"{type(exception).__name__}: {exception}")

    # ---------------------------------------------------------------- collecting
    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # after Lightning's own end-of-stage output (the validate/test results table), so the summary comes last
        if self._pending is not None:
            summary, self._pending = self._pending, None
            self._write(trainer, summary)

    def _finish(self, trainer: L.Trainer, stage: str, status: str, error: str | None = None) -> None:
        self.summary = self.collect(trainer, stage, status, error)
        if status == "completed":
            self._pending = self.summary  # written and printed in teardown
        else:
            self._write(trainer, self.summary)

    def _write(self, trainer: L.Trainer, summary: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        self.summary = summary
        run_dir = Path(self.summary["run_dir"])
        if run_dir.is_dir() or summary["status"] == "completed":
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = run_dir / f".{SUMMARY_FILE}.tmp"
            tmp.write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
            os.replace(tmp, run_dir / SUMMARY_FILE)
        if self.print_table:
            _print(format_summary(self.summary))

    def collect(self, trainer: L.Trainer, stage: str, status: str, error: str | None = None) -> dict[str, Any]:
        """The summary of ``trainer``'s run as a JSON-ready dict (see ``format_summary`` for its table)."""
        dp = next((cb for cb in trainer.callbacks if isinstance(cb, DifferentialPrivacy)), None)  # type: ignore[attr-defined]
        split = "test" if stage == "test" else "val"
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if _is_number(v)}
        groups = {
            key.split(GROUP, 1)[1]: {
                "acc": value,
                "count": metrics.get(f"{split}/count{GROUP}{key.split(GROUP, 1)[1]}"),
            }
            for key, value in metrics.items()
            if key.startswith(f"{split}/acc{GROUP}")
        }
        worst = min(groups, key=lambda g: metrics[f"{split}/acc{GROUP}{g}"]) if groups else None
        run_dir = trainer.log_dir or trainer.default_root_dir
        checkpoint = trainer.checkpoint_callback
        ckpt = getattr(checkpoint, "best_model_path", "") or getattr(checkpoint, "last_model_path", "")
        summary: dict[str, Any] = {
            "kind": self.kind or stage,
            "status": status,
            "stop_reason": _stop_reason(trainer, dp, stage, status),
            "error": error,
            "privacy": _privacy(dp, trainer) if dp is not None else None,
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
            "split": split,
            "acc": metrics.get(f"{split}/acc"),
            "count": _total(groups),
            "groups": groups,
            "train_counts": self.train_counts,
            "worst_group": worst,
            "worst_group_acc": metrics.get(f"{split}/worst_group_acc", groups[worst]["acc"] if worst else None),
            "acc_gap": metrics.get(f"{split}/acc_gap"),
            "run_dir": str(run_dir),
            "checkpoint": ckpt or (str(trainer.ckpt_path) if trainer.ckpt_path else None),
            "wandb": _wandb_locations(trainer) if trainer.is_global_zero else [],  # other ranks: dummy runs
            "config": list(self.config_files),
        }
        summary["compare"] = _compare_command(summary, dp is not None, self.config_files, str(run_dir))
        return summary


def _total(groups: dict[str, dict[str, Any]]) -> float | None:
    """Examples over all groups, when every group's count was logged."""
    counts = [g["count"] for g in groups.values()]
    return float(sum(counts)) if counts and all(c is not None for c in counts) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) or (isinstance(value, torch.Tensor) and value.numel() == 1)


def _privacy(dp: DifferentialPrivacy, trainer: L.Trainer) -> dict[str, Any]:
    budget = dp.config.target_epsilon if dp.config.target_epsilon is not None else dp.config.max_epsilon
    if dp.accountant is not None:
        return {"epsilon": float(dp.epsilon), "delta": float(dp.config.delta), "steps": int(dp.accountant.steps),
                "budget": budget, "source": "accountant"}  # fmt: skip
    state = _checkpoint_privacy(
        str(trainer.ckpt_path) if trainer.ckpt_path else None
    )  # an evaluation: what the checkpoint's training spent
    if state is not None:
        return {"epsilon": state.get("epsilon"), "delta": state.get("delta", dp.config.delta), "steps": None,
                "budget": budget, "source": f"checkpoint {trainer.ckpt_path}"}  # fmt: skip
    return {"epsilon": None, "delta": float(dp.config.delta), "steps": None, "budget": budget, "source": None}


def _checkpoint_privacy(ckpt_path: str | None) -> dict[str, Any] | None:
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - only a summary line is lost
        return None
    states = ckpt.get("callbacks", {}) if isinstance(ckpt, dict) else {}
    return next((s for k, s in states.items() if str(k).startswith("DifferentialPrivacy") and "epsilon" in s), None)


def _stop_reason(trainer: L.Trainer, dp: DifferentialPrivacy | None, stage: str, status: str) -> str:
    if status != "completed":
        return status
    if stage != "fit":
        return f"{stage} finished"
    reason = getattr(dp, "stop_reason", None) if dp is not None else None
    if reason:
        return str(reason)
    max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return f"max_steps={max_steps} reached"
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs:
        return f"max_epochs={max_epochs} reached"
    if any(isinstance(cb, EarlyStopping) and cb.stopped_epoch > 0 for cb in trainer.callbacks):  # type: ignore[attr-defined]
        return "early stopping"
    if trainer.should_stop and dp is not None and (dp.config.target_epsilon or dp.config.max_epsilon):
        return "privacy budget reached"
    return "stopped by a callback (trainer.should_stop)" if trainer.should_stop else "finished"


def _wandb_locations(trainer: L.Trainer) -> list[dict[str, str]]:
    from dplit.loggers import wandb_location

    return [wandb_location(lg) for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _wandb_text(where: dict[str, str]) -> str:
    if where["mode"] == "online":
        return f"online, {where['url']}"
    if where["mode"] == "offline":
        return f"offline (upload later: wandb sync {shown(where['dir'])})"
    return "off (WANDB_MODE=disabled)"


def _compare_command(summary: dict[str, Any], is_dp: bool, configs: list[str], run_dir: str) -> str | None:
    if summary["kind"] != "fit" or summary["status"] != "completed" or not configs:
        return None
    twin = twin_config(configs[-1])
    twin_root = config_root_dir(twin) if twin is not None else None
    if twin is None or twin_root is None:
        return None
    this = shown(run_dir)
    report = f"dplit report {this} --baseline {twin_root}" if is_dp else f"dplit report {twin_root} --baseline {this}"
    if not Path(twin_root).is_dir():
        return f"dplit fit --config {shown(twin)}, then {report}"
    return report


# ---------------------------------------------------------------- the table
def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def format_summary(s: dict[str, Any]) -> str:
    """The console table of a summary dict."""
    rows: list[tuple[str, str]] = [("status", f"{s['status']} ({s['stop_reason']})")]
    if s.get("error"):
        rows.append(("error", s["error"].splitlines()[0][:200]))
    p = s.get("privacy")
    if p is None:
        rows.append(("privacy", "none (no DifferentialPrivacy callback: a non-private run)"))
    elif p.get("epsilon") is None:
        rows.append(("privacy", f"epsilon unknown (not trained in this run), delta {p['delta']:g}"))
    else:
        budget = f" of budget {p['budget']:g}" if p.get("budget") is not None else ""
        steps = f", {p['steps']} steps" if p.get("steps") is not None else ""
        origin = (
            f" (from {shown(p['source'].split(' ', 1)[1])})" if str(p.get("source")).startswith("checkpoint") else ""
        )
        rows.append(("privacy", f"epsilon {p['epsilon']:.3f}{budget} at delta {p['delta']:g}{steps}{origin}"))
    count = f" ({s['count']:,.0f} examples)" if s.get("count") else ""
    rows.append(
        (
            f"{s['split']} accuracy",
            f"{_pct(s.get('acc'))}{count}" if s.get("acc") is not None else "— (no evaluation ran)",
        )
    )
    groups = s.get("groups") or {}
    if groups:
        width = max(len(g) for g in groups)
        lines = [f"{g:<{width}}  {_pct(v['acc']):>6}  n={v['count']:,.0f}" if v.get("count") else
                 f"{g:<{width}}  {_pct(v['acc']):>6}" for g, v in groups.items()]  # fmt: skip
        rows += [("per group" if i == 0 else "", line) for i, line in enumerate(lines)]
        gap = f", gap {100 * s['acc_gap']:.1f} pp (best - worst)" if s.get("acc_gap") is not None else ""
        rows.append(("worst group", f"{s['worst_group']}: {_pct(s.get('worst_group_acc'))}{gap}"))
    rows.append(("run dir", f"{shown(s['run_dir'])} ({SUMMARY_FILE})"))
    if s.get("checkpoint"):
        rows.append(("checkpoint", shown(s["checkpoint"])))
    rows += [("W&B", _wandb_text(w)) for w in s.get("wandb") or []]
    if s.get("compare"):
        rows.append(("compare", s["compare"]))
    label = max(len(k) for k, _ in rows)
    title = f"dplit {s['kind']} summary"
    return "\n".join([title, "-" * len(title)] + [f"{k:<{label}}  {v}" for k, v in rows])


@rank_zero_only
def _print(text: str) -> None:
    print("\n" + text, flush=True)


__all__ = ["SUMMARY_FILE", "RunSummary", "format_summary"]
