"""DifferentialPrivacy: makes any dplit task private (DP-SGD / DP-Adam) through public Lightning hooks only."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from dplit.callbacks._wiring import CriterionPatch, TrainLoaderPatch
from dplit.privacy import budget, engine
from dplit.privacy.accounting import PrivacyAccountant
from dplit.privacy.compat import prepare_model
from dplit.privacy.config import AccountantName, ClippingMode, GradSampleMode, PrivacyConfig, PrivacyConfigError
from dplit.privacy.grad_samplers import keep_for_dp
from dplit.privacy.ledger import PrivacyLedger
from dplit.privacy.resume import check_same_privacy, open_ledger
from dplit.privacy.rng import make_generators, restore_generators

log = logging.getLogger(__name__)


class DifferentialPrivacy(Callback):
    """Per-sample clipping + Gaussian noise + Poisson sampling + accounting, without the task knowing.

    In ``setup`` the model is checked (BatchNorm, unsupported layers, gradient accumulation); in ``on_fit_start``
    (the one hook where optimizers exist and the train loader is not yet built) the optimizer is wrapped, the
    train loader's sampling replaced and the accountant started or resumed. ``privacy/epsilon``,
    ``privacy/noise_multiplier``, ``privacy/sample_rate`` and ``privacy/steps`` are logged on every step, and
    training stops before a step would exceed ``target_epsilon`` / ``max_epsilon``. See ``PrivacyConfig`` for
    the meaning of each argument.

    Args:
        replace_batchnorm: replace BatchNorm layers by GroupNorm before training instead of refusing the model.
        ledger: write the accountant's state atomically after every step to ``privacy_ledger.json`` in the run's
            log dir, so that resuming after a crash between checkpoints still counts every step taken.
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
        grad_sample_mode: GradSampleMode = "hooks",
        poisson_sampling: bool = True,
        max_physical_batch_size: int | None = None,
        secure_mode: bool = False,
        seed: int | None = None,
        replace_batchnorm: bool = False,
        ledger: bool = True,
    ) -> None:
        self.config = PrivacyConfig(
            noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon,
            max_epsilon=max_epsilon,
            max_grad_norm=max_grad_norm,
            delta=delta,
            accountant=accountant,
            clipping=clipping,
            grad_sample_mode=grad_sample_mode,
            poisson_sampling=poisson_sampling,
            max_physical_batch_size=max_physical_batch_size,
            secure_mode=secure_mode,
            seed=seed,
        )
        self.replace_batchnorm = replace_batchnorm
        self.use_ledger = ledger
        self.ledger: PrivacyLedger | None = None
        self.accountant: PrivacyAccountant | None = None
        self.noise_multiplier: float | None = None
        self.plan: engine.SamplingPlan | None = None
        self.optimizer: Any = None
        self._restored: dict[str, Any] | None = None
        self._fingerprint: str | None = None
        self._hooks: Any = None
        self._loader_patch: TrainLoaderPatch | None = None
        self._criterion: CriterionPatch | None = None
        self._loader: Any = None
        self._sampler_rng: torch.Generator | None = None
        self._noise_rng: torch.Generator | None = None
        self._bk_seen = 0
        self._world_size = 1
        self._is_global_zero = True
        self._step_limit: int | None = None

    # ---------------------------------------------------------------- setup: fail loudly and early
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.accumulate_grad_batches != 1:
            raise PrivacyConfigError(
                f"`trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}` breaks DP: Lightning divides "
                "the loss before clipping (effective clip k*C) and the accountant would see the wrong sampling "
                "rate. Use a larger `data.batch_size` (the logical batch) with "
                "`max_physical_batch_size` on DifferentialPrivacy (virtual steps) instead."
            )
        if sum(isinstance(cb, DifferentialPrivacy) for cb in trainer.callbacks) > 1:  # type: ignore[attr-defined]
            raise PrivacyConfigError(
                "More than one DifferentialPrivacy callback is configured (noise would be added twice); keep one."
            )
        if trainer.world_size > 1 and self.config.grad_sample_mode in ("ghost", "bookkeeping"):
            raise PrivacyConfigError(
                f"`grad_sample_mode: {self.config.grad_sample_mode}` is not verified under DDP (DDP all-reduces the "
                "gradients before they are clipped). Use `grad_sample_mode: hooks` for multi-device runs."
            )
        if not pl_module.automatic_optimization:
            raise PrivacyConfigError("DifferentialPrivacy supports automatic optimization only.")
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
        self.plan = engine.plan_sampling(self._loader_patch.original())
        cfg, plan, world_size = self.config, self.plan, trainer.world_size
        self._world_size = world_size
        self._is_global_zero = trainer.is_global_zero
        if cfg.delta >= 1 / plan.dataset_size:
            warnings.warn(
                f"`delta={cfg.delta}` is not below 1/N = {1 / plan.dataset_size:.3g} (N={plan.dataset_size}): a "
                "mechanism that publishes one random example outright satisfies such a guarantee. Use a smaller delta.",
                stacklevel=2,
            )
        steps = (
            None
            if cfg.noise_multiplier is not None
            else budget.planned_steps(trainer.max_steps, trainer.max_epochs, plan.steps_per_epoch)
        )
        self.noise_multiplier = budget.resolve_noise_multiplier(cfg, plan, steps)
        self._fingerprint = cfg.fingerprint(
            noise_multiplier=self.noise_multiplier, sample_rate=plan.sample_rate, dataset_size=plan.dataset_size
        )
        self.accountant = PrivacyAccountant(
            cfg.accountant, poisson=cfg.poisson_sampling, steps_per_epoch=plan.steps_per_epoch
        )
        self._restore(trainer)
        self._open_ledger(trainer)
        self._step_limit = budget.step_limit(self.accountant, cfg, self.noise_multiplier, plan.sample_rate)

        self._hooks = engine.attach_hooks(pl_module, cfg)
        self.optimizer = engine.make_optimizer(
            optimizers[0],
            cfg,
            noise_multiplier=self.noise_multiplier,
            plan=plan,
            world_size=world_size,
            generator=self._noise_rng,
        )
        self.optimizer.attach_step_hook(self._on_dp_step)
        trainer.optimizers = [self.optimizer]  # schedulers keep working: DP optimizers share param_groups
        if cfg.grad_sample_mode == "ghost":
            self._criterion = CriterionPatch(
                pl_module, lambda criterion: engine.make_criterion(criterion, self._hooks, self.optimizer)
            )

        def make_private(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
            self._loader = engine.make_loader(
                loader, cfg, plan=plan, optimizer=self.optimizer, world_size=world_size, generator=self._sampler_rng
            )
            return self._loader

        self._loader_patch.apply(make_private)
        log.info(
            "DP on: sigma=%.4g C=%g q=%.5g (B=%d, N=%d), %s accountant, delta=%g",
            self.noise_multiplier,
            cfg.max_grad_norm,
            plan.sample_rate,
            plan.batch_size,
            plan.dataset_size,
            cfg.accountant,
            cfg.delta,
        )

    def _restore(self, trainer: L.Trainer) -> None:
        assert self.accountant is not None
        seed = self.config.seed if self.config.seed is not None else torch.initial_seed() % 2**31
        rank = trainer.global_rank
        self._sampler_rng, self._noise_rng = make_generators(seed, rank, secure=self.config.secure_mode)
        state = self._restored
        if state is None:
            return
        assert self._fingerprint is not None and self.noise_multiplier is not None and self.plan is not None
        check_same_privacy(state, self._fingerprint, self.noise_multiplier, self.plan.sample_rate)
        self.accountant.load_state_dict(state["accountant"])
        if not self.config.secure_mode:
            restore_generators(
                state,
                self._sampler_rng,
                self._noise_rng,
                seed=seed,
                rank=rank,
                world_size=trainer.world_size,
                step=self.accountant.steps,
            )
        log.info("Resumed privacy accountant at step %d (epsilon=%.4g)", self.accountant.steps, self.epsilon)

    def _open_ledger(self, trainer: L.Trainer) -> None:
        assert self.accountant is not None and self._fingerprint is not None
        if not self.use_ledger:
            return
        self.ledger = open_ledger(
            self._restored, self.accountant, self._fingerprint, trainer.log_dir or trainer.default_root_dir
        )
        if trainer.is_global_zero:
            self.ledger.write(self._fingerprint, self.accountant.state_dict())

    # ---------------------------------------------------------------- per step: guard, account, log, stop
    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not getattr(trainer.train_dataloader, "_dplit_private", False):
            raise RuntimeError(
                "DifferentialPrivacy: the train loader in use is not the private one, so sampling would not match "
                "the accountant. Use a LightningDataModule, and `trainer.use_distributed_sampler: false` under DDP."
            )

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.config.grad_sample_mode == "bookkeeping" and self._hooks is not None:
            self._hooks.clip_into_grad()  # p.grad := sum of clipped per-example gradients

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.config.grad_sample_mode == "bookkeeping":
            if self._hooks.batches_clipped == self._bk_seen:
                raise RuntimeError("DifferentialPrivacy (book-keeping): the gradients of this step were not clipped.")
            self._bk_seen = self._hooks.batches_clipped
            return
        if self._criterion is not None:
            if self._criterion.calls == 0:
                raise RuntimeError(
                    "DifferentialPrivacy (ghost clipping): the training loss was not computed through "
                    "`self.criterion`, so gradients were not clipped. Compute the loss with `self.criterion(...)`."
                )
            self._criterion.calls = 0
            return
        missing = [i for i, p in enumerate(self.optimizer.params) if getattr(p, "grad_sample", None) is None]
        if missing:
            raise RuntimeError(
                f"DifferentialPrivacy: {len(missing)} parameters have no per-sample gradients before the optimizer "
                "step (the forward pass bypassed the hooked module), so the step would not be private."
            )

    def _on_dp_step(self, optimizer: Any) -> None:
        assert self.accountant is not None and self.plan is not None and self.noise_multiplier is not None
        self.accountant.step(self.noise_multiplier, self.plan.sample_rate)
        if self.ledger is not None and self._fingerprint is not None and self._is_global_zero:
            self.ledger.write(self._fingerprint, self.accountant.state_dict())

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self.accountant is not None
        # Recorded on every step; handed to Lightning only on the steps its loggers write (every
        # `log_every_n_steps`): `self.log` costs ~0.5 ms a key, and a PRV epsilon up to seconds.
        every = getattr(trainer, "log_every_n_steps", 50)
        if every > 0 and (trainer.global_step % every == 0 or trainer.should_stop):
            self._log(pl_module, on_step=True)
        if self._step_limit is None or trainer.should_stop:
            return
        stop = self.accountant.steps >= self._step_limit
        if trainer.world_size > 1:
            stop = trainer.strategy.broadcast(stop, src=0)
        if stop:
            log.warning(
                "Privacy budget reached: epsilon=%.4f after %d steps; the next step would exceed %g. Stopping.",
                self.epsilon,
                self.accountant.steps,
                self.config.budget,
            )
            trainer.should_stop = True

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("privacy/epsilon_epoch", self.epsilon, on_step=False, on_epoch=True, sync_dist=False)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The final spend reaches the loggers even when the last step fell between `log_every_n_steps`.
        if trainer.is_global_zero and self.accountant is not None:
            for logger in trainer.loggers:
                logger.log_metrics(self._metrics(), step=trainer.global_step)
                logger.save()

    def _metrics(self) -> dict[str, float]:
        assert self.accountant is not None and self.plan is not None
        return {
            "privacy/epsilon": self.epsilon,
            "privacy/delta": self.config.delta,
            "privacy/noise_multiplier": float(self.noise_multiplier or 0.0),
            "privacy/sample_rate": self.plan.sample_rate,
            "privacy/steps": float(self.accountant.steps),
        }

    def _log(self, pl_module: L.LightningModule, on_step: bool) -> None:
        pl_module.log_dict(self._metrics(), on_step=on_step, on_epoch=False, prog_bar=False, sync_dist=False)

    def per_sample_grad_norms(self) -> torch.Tensor | None:
        """Pre-clipping per-example gradient norms [B] of the current batch (call between backward and step).

        For diagnostics only: NOT differentially private.
        """
        if self._hooks is None or self.optimizer is None:
            return None
        return engine.per_sample_grad_norms(self._hooks, self.optimizer, self.config.grad_sample_mode)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first step)."""
        return 0.0 if self.accountant is None else self.accountant.epsilon(self.config.delta)

    # ---------------------------------------------------------------- teardown and checkpoint state
    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._hooks is None:
            return
        self._hooks.remove_hooks()
        self._hooks = None
        keep_for_dp(pl_module, False)
        if self._criterion is not None:
            self._criterion.restore()
            self._criterion = None
        if self._loader_patch is not None:
            self._loader_patch.restore()
            self._loader_patch = None

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
        }
        if self.ledger is not None:
            state["ledger_path"] = str(self.ledger.path.resolve())
            state["run_id"] = self.ledger.run_id
        if self._sampler_rng is not None and not self.config.secure_mode:
            state["sampler_rng"] = self._sampler_rng.get_state()
            state["noise_rng"] = self._noise_rng.get_state() if self._noise_rng is not None else None
            state["world_size"] = self._world_size
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) if state_dict else None
