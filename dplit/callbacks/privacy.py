"""DifferentialPrivacy: makes any dplit task private (DP-SGD / DP-Adam) through public Lightning hooks only."""

from __future__ import annotations

import logging
import warnings
from dataclasses import fields
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from dplit.callbacks._privacy_state import PrivacyState
from dplit.callbacks._trainer_checks import check_accumulation, check_min_training, check_trainer, planned_end
from dplit.callbacks._wiring import TrainLoaderPatch
from dplit.privacy import budget, engine
from dplit.privacy.accounting import PrivacyAccountant
from dplit.privacy.algorithms import DPAlgorithm, build_algorithm
from dplit.privacy.backends import PerSampleBackend, make_backend
from dplit.privacy.compat import prepare_model
from dplit.privacy.config import AccountantName, ClippingMode, GradSampleMode, PrivacyConfig, PrivacyConfigError
from dplit.privacy.ledger import PrivacyLedger
from dplit.privacy.rng import make_generators
from dplit.privacy.stepping import BatchTrace, StepController, discard_pending
from dplit.privacy.use_guard import OutsideUseGuard

log = logging.getLogger(__name__)


class DifferentialPrivacy(PrivacyState):
    """Per-sample clipping + Gaussian noise + Poisson sampling + accounting, without the task knowing.

    In ``setup`` the model and trainer are checked (BatchNorm, parameters no clipping rule covers, gradient
    accumulation, ``overfit_batches``); in ``on_fit_start`` (the one hook where optimizers exist and the train loader
    is not yet built) the clipping backend is attached, the optimizer wrapped, the train loader's sampling replaced
    and the accountant started, resumed or continued (a second ``fit`` with the same callback continues it).
    Every optimizer step asks a :class:`~dplit.privacy.stepping.StepController` whether to accumulate (virtual
    steps), release (noise once, account once) or refuse (the budget would be exceeded, whatever ``min_epochs``
    says). ``privacy/epsilon``, ``privacy/noise_multiplier``, ``privacy/sample_rate`` and ``privacy/steps`` are
    logged. See ``PrivacyConfig`` for the meaning of each argument.

    Args:
        replace_batchnorm: replace BatchNorm layers by GroupNorm before training instead of refusing the model.
        ledger: write the accountant's state atomically after every step to ``privacy_ledger-<run id>.json`` in
            the run's log dir, so that resuming after a crash between checkpoints still counts every step taken.
    """

    def __init__(
        self,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        max_epsilon: float | None = None,
        max_grad_norm: float = 1.0,
        delta: float = 1e-5,
        accountant: AccountantName = "rdp",
        clipping: ClippingMode = "flat",
        algorithm: str = "dpsgd",
        count_noise: float | None = None,
        global_threshold: float | None = None,
        target_quantile: float | None = None,
        adapt_lr: float | None = None,
        min_clip: float | None = None,
        max_clip: float | None = None,
        stability: float | None = None,
        grad_sample_mode: GradSampleMode = "hooks",
        poisson_sampling: bool = True,
        max_physical_batch_size: int | None = None,
        secure_mode: bool = False,
        insecure_testing_seed: int | None = None,
        replace_batchnorm: bool = False,
        ledger: bool = True,
    ) -> None:
        given = locals()  # every argument named like a PrivacyConfig field goes to it (the config validates them)
        self.config = PrivacyConfig(**{f.name: given[f.name] for f in fields(PrivacyConfig)})
        self.replace_batchnorm = replace_batchnorm
        self.use_ledger = ledger
        self.ledger: PrivacyLedger | None = None
        self.accountant: PrivacyAccountant | None = None
        self.noise_multiplier: float | None = None
        self.plan: engine.SamplingPlan | None = None
        self.optimizer: Any = None
        self.backend: PerSampleBackend | None = None
        self._use_guard: OutsideUseGuard | None = None
        self.controller: StepController | None = None
        self.algorithm: DPAlgorithm | None = None
        self.loader: torch.utils.data.DataLoader | None = None
        """The private train loader of the current fit."""
        self.stop_reason: str | None = None
        """Why this callback stopped training (None: it did not)."""
        self._trace = BatchTrace()
        self._restored: dict[str, Any] | None = None
        self._restored_ledger: dict[str, Any] | None = None
        self._restored_algorithm: dict[str, Any] | None = None
        self._fingerprint: str | None = None
        self._loader_patch: TrainLoaderPatch | None = None
        self._world_size = 1
        self._is_global_zero = True
        self._step_limit: int | None = None
        self._logical_max_steps: int | None = None  # stop at this accountant step count (virtual steps)
        self._lightning_max_steps: int | None = None  # trainer.max_steps, lifted for the run and restored after

    # ---------------------------------------------------------------- setup: fail loudly and early
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_trainer(trainer, pl_module, self.config, DifferentialPrivacy)
        replaced = prepare_model(pl_module, self.config.grad_sample_mode, self.replace_batchnorm)
        if replaced:
            log.warning("DifferentialPrivacy replaced BatchNorm by GroupNorm in: %s", ", ".join(replaced))

    # ---------------------------------------------------------------- on_fit_start: swap in the private pieces
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise PrivacyConfigError(
                f"DifferentialPrivacy wraps exactly one optimizer; {type(pl_module).__name__}.configure_optimizers "
                f"returned {len(optimizers)}. Use one optimizer with parameter groups instead."
            )
        self._loader_patch = TrainLoaderPatch(trainer, pl_module)
        plan = engine.plan_sampling(self._loader_patch.original())
        cfg = self.config
        self._world_size, self._is_global_zero = trainer.world_size, trainer.is_global_zero
        if cfg.delta >= 1 / plan.dataset_size:
            warnings.warn(
                f"`delta={cfg.delta}` is not below 1/N = {1 / plan.dataset_size:.3g} (N={plan.dataset_size}): a "
                "mechanism that publishes one random example outright satisfies such a guarantee. Use a smaller delta.",
                stacklevel=2,
            )
        per_epoch = budget.steps_per_epoch(trainer.limit_train_batches, plan.steps_per_epoch)
        if self.accountant is None:
            self.plan = plan
            self._start_accountant(trainer, per_epoch)
        else:
            self._continue_accountant(plan)
        assert self.accountant is not None and self.noise_multiplier is not None and self._fingerprint is not None
        self._restore()
        self._count_logical_steps(trainer)
        self._open_ledger(trainer)
        sigma, q = self.noise_multiplier, plan.sample_rate

        sampler_rng, noise_rng = make_generators(
            rank=trainer.global_rank,
            step=self.accountant.steps,
            secure=cfg.secure_mode,
            testing_seed=cfg.insecure_testing_seed,
        )
        names = getattr(getattr(trainer, "datamodule", None), "group_names", None) or []
        self.algorithm = build_algorithm(
            cfg,
            noise_multiplier=sigma,
            sample_rate=q,
            dataset_size=plan.dataset_size,
            group_names=names,
            generator=noise_rng,
        )
        if self._restored_algorithm is not None:
            self.algorithm.load_state_dict(self._restored_algorithm)
            self._restored_algorithm = None
        events = self.algorithm.events()
        if cfg.target_epsilon is not None and events != [(sigma, q)]:
            raise PrivacyConfigError(
                f"`target_epsilon` calibrates the gradient noise alone; `algorithm: {cfg.algorithm}` also releases "
                "other statistics each step. Give `noise_multiplier` and `max_epsilon` (the budget) instead."
            )
        self._step_limit = budget.step_limit(self.accountant, cfg, events) if cfg.poisson_sampling else None
        check_min_training(trainer, cfg, self.accountant, sigma, self._step_limit, per_epoch)
        self.controller = StepController(
            self.accountant,
            self.algorithm,
            pass_events=None if cfg.poisson_sampling else [(sigma, 1.0)],
            budget=cfg.budget,
            delta=cfg.delta,
            step_limit=self._step_limit,
            on_release=self._write_ledger,
        )
        self.backend = make_backend(pl_module, cfg)
        self.optimizer = engine.make_optimizer(
            optimizers[0],
            cfg,
            noise_multiplier=sigma,
            plan=plan,
            backend=self.backend,
            controller=self.controller,
            world_size=trainer.world_size,
            generator=noise_rng,
        )
        trainer.optimizers = [self.optimizer]  # schedulers keep working: DP optimizers share param_groups
        if trainer.world_size > 1:
            engine.local_gradients(trainer.strategy.model)  # the DP optimizer all-reduces the clipped sums
        self.backend.install_loss(pl_module, self.optimizer)
        self._use_guard = OutsideUseGuard(pl_module)  # a parameter read outside its own layer escapes clipping

        def make_private(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
            self.loader = engine.make_loader(
                loader, cfg, plan=plan, trace=self._trace, world_size=trainer.world_size, generator=sampler_rng
            )
            return self.loader

        self._loader_patch.apply(make_private)
        log.info(
            "DP on: sigma=%.4g C=%g q=%.5g (B=%d, N=%d), %s accountant, delta=%g",
            sigma,
            cfg.max_grad_norm,
            q,
            plan.batch_size,
            plan.dataset_size,
            cfg.accountant,
            cfg.delta,
        )

    # ---------------------------------------------------------------- per step: guard, account, log, stop
    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_accumulation(trainer)
        if not getattr(trainer.train_dataloader, "_dplit_private", False):
            raise RuntimeError(
                "DifferentialPrivacy: the train loader in use is not the private one, so sampling would not match "
                "the accountant. Use a LightningDataModule, and `trainer.use_distributed_sampler: false` under DDP."
            )
        if self.controller is not None and discard_pending(self.optimizer, self.controller):
            log.info("DifferentialPrivacy: dropped a logical batch cut by the end of the last epoch (never released).")

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        check_accumulation(trainer)  # whatever set it (a scheduler, a callback) after setup()
        assert self.controller is not None
        if trainer.world_size > 1:
            engine.local_gradients(trainer.strategy.model)  # again: nothing may have turned DDP's sync back on
        self.controller.begin_batch(self._trace.pop(), batch)
        assert self.backend is not None
        self.backend.begin_batch()
        if self._use_guard is not None:
            self._use_guard.skip_next = self.controller.empty  # an empty batch may not run the model

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Any) -> None:
        assert self.backend is not None
        self.backend.check_loss(loss)

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.backend is not None
        self.backend.after_backward()

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        assert self.backend is not None
        self.backend.assert_clipped(self.optimizer)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self.accountant is not None and self.controller is not None
        if not self.controller.stepped:
            raise RuntimeError(
                "DifferentialPrivacy: a training batch ended without an optimizer step (did `training_step` return "
                "None?). Its clipped gradients could leak into the next logical batch: return the loss on every batch."
            )
        # Recorded on every step; handed to Lightning only on the steps its loggers write (every
        # `log_every_n_steps`): `self.log` costs ~0.5 ms a key, and a PRV epsilon up to seconds.
        every = getattr(trainer, "log_every_n_steps", 50)
        if every > 0 and (trainer.global_step % every == 0 or trainer.should_stop):
            self._log(pl_module, on_step=True)
        done = self._logical_max_steps is not None and self.accountant.steps >= self._logical_max_steps
        if done:
            trainer.should_stop = True  # `trainer.max_steps` logical steps taken (see _count_logical_steps)
        if trainer.should_stop and self.stop_reason is None and not done:
            return
        stop = self.controller.exhausted or (self._step_limit is not None and self.accountant.steps >= self._step_limit)
        if trainer.world_size > 1:
            stop = trainer.strategy.broadcast(stop, src=0)
        if stop and self.stop_reason is None and not (done or planned_end(trainer, batch_idx)):
            self.stop_reason = f"privacy budget reached: epsilon={self.epsilon:.4g} of {self.config.budget}"
            log.warning(
                "Privacy budget reached: epsilon=%.4f after %d steps; the next step would exceed %g. Stopping.",
                self.epsilon,
                self.accountant.steps,
                self.config.budget,
            )
        if stop:
            trainer.should_stop = True

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("privacy/epsilon_epoch", self.epsilon, on_step=False, on_epoch=True, sync_dist=False)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_max_steps(trainer)
        # The final spend reaches the loggers even when the last step fell between `log_every_n_steps`.
        if trainer.is_global_zero and self.accountant is not None:
            for logger in trainer.loggers:
                logger.log_metrics(self._metrics(), step=trainer.global_step)
                logger.save()

    def per_sample_grad_norms(self) -> torch.Tensor | None:
        """Pre-clipping per-example gradient norms [B] of the current batch (call between backward and step).

        For diagnostics only: NOT differentially private.
        """
        if self.backend is None or self.optimizer is None:
            return None
        return self.backend.per_example_norms(self.optimizer)

    @property
    def clip_bound(self) -> float:
        """The per-example clipping bound (the DP algorithm's sensitivity), for diagnostics."""
        return self.algorithm.sensitivity if self.algorithm is not None else self.config.max_grad_norm

    # ---------------------------------------------------------------- teardown and checkpoint state
    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._restore_max_steps(trainer)
        if self.backend is None:
            return
        self.backend.detach()
        self.backend = None
        if self._use_guard is not None:
            self._use_guard.remove()
            self._use_guard = None
        if self._loader_patch is not None:
            self._loader_patch.restore()
            self._loader_patch = None
