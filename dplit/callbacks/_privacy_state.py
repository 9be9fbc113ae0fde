"""The DP callback's checkpoint, ledger and logging state (a mixin of :class:`~dplit.callbacks.DifferentialPrivacy`).

Kept apart from the hooks so that each file holds one concern: how the accountant starts (noise calibrated to the
planned steps) or continues, what ``trainer.max_steps`` counts under virtual steps, what a checkpoint carries, how
a resumed run restores the accountant (never backwards), the crash-safe ledger, and the ``privacy/*`` metrics.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from dplit.privacy import budget, engine
from dplit.privacy.accounting import PrivacyAccountant
from dplit.privacy.algorithms import DPAlgorithm
from dplit.privacy.config import PrivacyConfig, PrivacyConfigError
from dplit.privacy.ledger import PrivacyLedger
from dplit.privacy.resume import check_same_privacy, open_ledger
from dplit.privacy.stepping import StepController

log = logging.getLogger("dplit.callbacks.privacy")


class PrivacyState(Callback):
    """Checkpoint state, ledger and metrics of the DP callback; the attributes are set by ``DifferentialPrivacy``."""

    config: PrivacyConfig
    accountant: PrivacyAccountant | None
    noise_multiplier: float | None
    plan: engine.SamplingPlan | None
    algorithm: DPAlgorithm | None
    controller: StepController | None
    ledger: PrivacyLedger | None
    use_ledger: bool
    _fingerprint: str | None
    _is_global_zero: bool
    _restored: dict[str, Any] | None
    _restored_ledger: dict[str, Any] | None
    _restored_algorithm: dict[str, Any] | None
    _logical_max_steps: int | None
    _lightning_max_steps: int | None

    def _start_accountant(self, trainer: L.Trainer, per_epoch: int) -> None:
        cfg, plan = self.config, self.plan
        assert plan is not None
        steps = passes = None
        if cfg.target_epsilon is not None and cfg.poisson_sampling:
            steps = budget.planned_steps(trainer.max_steps, trainer.max_epochs, per_epoch)
        elif cfg.target_epsilon is not None:
            passes = budget.planned_passes(trainer.max_steps, trainer.max_epochs, per_epoch)
        self.noise_multiplier = budget.resolve_noise_multiplier(cfg, plan, steps, passes)
        self._fingerprint = cfg.fingerprint(
            noise_multiplier=self.noise_multiplier, sample_rate=plan.sample_rate, dataset_size=plan.dataset_size
        )
        self.accountant = PrivacyAccountant(cfg.accountant)

    def _continue_accountant(self, plan: engine.SamplingPlan) -> None:
        """A second ``fit`` with this callback: the same plan continues the same accountant (never a reset)."""
        assert self.plan is not None and self.accountant is not None
        if (plan.dataset_size, plan.batch_size) != (self.plan.dataset_size, self.plan.batch_size):
            raise PrivacyConfigError(
                f"This DifferentialPrivacy callback already trained with N={self.plan.dataset_size}, "
                f"B={self.plan.batch_size}; fitting again with N={plan.dataset_size}, B={plan.batch_size} would need "
                "another accountant. Continue with the same data and batch size, or use a new callback (a new run)."
            )
        log.info("DifferentialPrivacy: fit again; the accountant continues at step %d.", self.accountant.steps)

    def _restore(self) -> None:
        state, self._restored = self._restored, None
        if state is None:
            return
        assert self.accountant is not None and self._fingerprint is not None and self.plan is not None
        assert self.noise_multiplier is not None
        check_same_privacy(state, self._fingerprint, self.noise_multiplier, self.plan.sample_rate)
        restored = PrivacyAccountant(self.config.accountant)
        restored.load_state_dict(state["accountant"])
        if restored.steps > self.accountant.steps:  # never backwards: keep whichever history is longer
            self.accountant.load_state_dict(restored.state_dict())
        self._restored_ledger = state
        self._restored_algorithm = state.get("algorithm") or None
        log.info("Resumed privacy accountant at step %d (epsilon=%.4g)", self.accountant.steps, self.epsilon)

    def _count_logical_steps(self, trainer: L.Trainer) -> None:
        """Under virtual steps, ``trainer.max_steps`` means logical (noised, accounted) steps, as the noise
        calibration assumes. Lightning counts every physical batch as an optimizer step, and a Poisson batch
        above ``max_physical_batch_size`` is split, so Lightning's own limit is lifted for the run and this callback
        stops the run once the accountant holds ``max_steps`` releases (restored at the end of the fit)."""
        assert self.accountant is not None
        self._logical_max_steps = None
        max_steps = trainer.max_steps
        if self.config.max_physical_batch_size is None or max_steps is None or max_steps <= 0:
            return
        # A fresh trainer counts max_steps from 0 (a second fit continuing this accountant); a resumed or reused one
        # counts from the run's start, as the accountant's steps do.
        fresh = trainer.ckpt_path is None and trainer.global_step == 0  # (a resumed trainer's loops restore later)
        self._logical_max_steps = max_steps + (self.accountant.steps if fresh else 0)
        self._lightning_max_steps = max_steps
        trainer.fit_loop.epoch_loop.max_steps = -1
        log.info("DifferentialPrivacy: trainer.max_steps=%d counts logical steps (virtual steps split batches "
                 "above max_physical_batch_size=%d).", max_steps, self.config.max_physical_batch_size)  # fmt: skip

    def _restore_max_steps(self, trainer: L.Trainer) -> None:
        if self._lightning_max_steps is not None:
            trainer.fit_loop.epoch_loop.max_steps = self._lightning_max_steps
            self._lightning_max_steps = self._logical_max_steps = None

    def _open_ledger(self, trainer: L.Trainer) -> None:
        assert self.accountant is not None and self._fingerprint is not None
        if not self.use_ledger:
            return
        state = self._restored_ledger
        if self.ledger is None or state is not None:
            log_dir = trainer.log_dir or trainer.default_root_dir
            self.ledger = open_ledger(state, self.accountant, self._fingerprint, log_dir)
        self._restored_ledger = None
        self._write_ledger()

    def _write_ledger(self) -> None:
        if self.ledger is not None and self._fingerprint is not None and self._is_global_zero:
            assert self.accountant is not None
            self.ledger.write(self._fingerprint, self.accountant.state_dict())

    def _metrics(self) -> dict[str, float]:
        assert self.accountant is not None and self.plan is not None
        return {
            "privacy/epsilon": self.epsilon,
            "privacy/delta": self.config.delta,
            "privacy/noise_multiplier": float(self.noise_multiplier or 0.0),
            **(
                {"privacy/gradient_noise_multiplier": self.algorithm.gradient_noise_multiplier}
                if self.algorithm is not None and self.algorithm.gradient_noise_multiplier != self.noise_multiplier
                else {}
            ),
            "privacy/sample_rate": self.plan.sample_rate,
            "privacy/steps": float(self.accountant.steps),
            **{f"privacy/{k}": v for k, v in (self.controller.released_metrics if self.controller else {}).items()},
        }

    def _log(self, pl_module: L.LightningModule, on_step: bool) -> None:
        pl_module.log_dict(self._metrics(), on_step=on_step, on_epoch=False, prog_bar=False, sync_dist=False)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first step)."""
        return 0.0 if self.accountant is None else self.accountant.epsilon(self.config.delta)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.accountant is None:
            return {} if self._restored is None else dict(self._restored)
        state: dict[str, Any] = {
            "accountant": self.accountant.state_dict(),
            "fingerprint": self._fingerprint,
            "noise_multiplier": float(self.noise_multiplier or 0.0),
            "sample_rate": self.plan.sample_rate if self.plan else 0.0,
            "epsilon": self.epsilon,
            "delta": self.config.delta,
            # metadata: a run trained with public randomness says so in every checkpoint
            "insecure_testing_seed": self.config.insecure_testing_seed is not None,
            "algorithm": self.algorithm.state_dict() if self.algorithm is not None else {},
        }
        if self.ledger is not None:
            state["ledger_path"] = str(self.ledger.path.resolve())
            state["run_id"] = self.ledger.run_id
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) if state_dict else None
