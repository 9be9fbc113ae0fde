"""Trainer settings that would break the DP guarantee, refused with the fix (for the DifferentialPrivacy callback)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import GradientAccumulationScheduler

from dplit.privacy.accounting import PrivacyAccountant
from dplit.privacy.backends import BACKENDS
from dplit.privacy.config import PrivacyConfig, PrivacyConfigError
from dplit.privacy.precision import check_precision


def check_accumulation(trainer: L.Trainer) -> None:
    """Refuse ``accumulate_grad_batches > 1``, whatever set it (config, scheduler, another callback)."""
    if trainer.accumulate_grad_batches != 1:
        raise PrivacyConfigError(
            f"`trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}` breaks DP: Lightning divides "
            "the loss before clipping (effective clip k*C) and the accountant would see the wrong sampling "
            "rate. Use a larger `data.batch_size` (the logical batch) with "
            "`max_physical_batch_size` on DifferentialPrivacy (virtual steps) instead."
        )


def check_trainer(trainer: L.Trainer, pl_module: L.LightningModule, config: PrivacyConfig, callback_type: type) -> None:
    """Everything about the trainer checked in ``setup``, before any batch is drawn."""
    check_accumulation(trainer)
    callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
    if any(isinstance(cb, GradientAccumulationScheduler) for cb in callbacks):
        raise PrivacyConfigError(
            "GradientAccumulationScheduler changes `accumulate_grad_batches` during training, which breaks DP "
            "(the loss is divided before clipping and the accountant sees the wrong sampling rate). Remove it and "
            "use a larger `data.batch_size` with `max_physical_batch_size` on DifferentialPrivacy instead."
        )
    if sum(isinstance(cb, callback_type) for cb in callbacks) > 1:
        raise PrivacyConfigError(
            "More than one DifferentialPrivacy callback is configured (noise would be added twice); keep one."
        )
    overfit = getattr(trainer, "overfit_batches", 0)
    if overfit:
        raise PrivacyConfigError(
            f"`trainer.overfit_batches={overfit}` replays the same batches, which is neither the "
            "Poisson sampling nor the passes the accountant counts. Remove it (or train without DP to debug)."
        )
    if trainer.world_size > 1 and not BACKENDS[config.grad_sample_mode].ddp_verified:
        raise PrivacyConfigError(
            f"`grad_sample_mode: {config.grad_sample_mode}` is not verified under DDP. Use `grad_sample_mode: "
            "hooks`, `ghost` or `bookkeeping` for multi-device runs."
        )
    if trainer.world_size > 1 and config.max_physical_batch_size is not None:
        raise PrivacyConfigError(
            "`max_physical_batch_size` (virtual steps) is not supported under DDP: ranks would take different "
            "numbers of physical steps. Remove it, or use more devices to fit the batch in memory."
        )
    backend = BACKENDS[config.grad_sample_mode]
    check_precision(str(trainer.precision), config.grad_sample_mode, backend.mixed_precision_safe)
    if not pl_module.automatic_optimization:
        raise PrivacyConfigError("DifferentialPrivacy supports automatic optimization only.")


def check_min_training(
    trainer: L.Trainer,
    config: PrivacyConfig,
    accountant: PrivacyAccountant,
    noise_multiplier: float,
    step_limit: int | None,
    per_epoch: int,
) -> None:
    """Refuse ``min_epochs`` / ``min_steps`` that would force steps past the budget."""
    if config.budget is None:
        return
    min_epochs, min_steps = trainer.min_epochs or 0, trainer.min_steps or 0
    if not (min_epochs or min_steps):
        return
    if step_limit is not None:
        needed = max(min_steps, min_epochs * per_epoch)
        if needed > step_limit:
            raise PrivacyConfigError(
                f"`trainer.min_epochs={min_epochs}` / `min_steps={min_steps}` ask for {needed} steps, but the "
                f"privacy budget epsilon={config.budget} allows {step_limit}: Lightning would not stop "
                "at the budget. Lower them (or remove them)."
            )
        return
    eps = accountant.epsilon_with([(noise_multiplier, 1.0, max(1, min_epochs))], config.delta)
    if eps > config.budget:
        raise PrivacyConfigError(
            f"`trainer.min_epochs={min_epochs}` needs {min_epochs} passes (epsilon {eps:.3g}) over the budget "
            f"{config.budget}: lower it (or remove it)."
        )


def planned_end(trainer: L.Trainer, batch_idx: int) -> bool:
    """This batch ends the planned training anyway (``max_steps``, or the last batch of ``max_epochs``): the budget
    running out with it (``target_epsilon`` is calibrated to do so) is not a stop by the privacy callback."""
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
    return last_epoch and batch_idx + 1 >= trainer.num_training_batches


__all__ = ["check_accumulation", "check_min_training", "check_trainer", "planned_end"]
