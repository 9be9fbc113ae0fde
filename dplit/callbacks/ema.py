"""EMAWeights: an exponential moving average of the trainable weights, used for evaluation and checkpoints.

De et al. 2022 and Berrada et al. 2023 evaluate DP-trained models with an EMA of their weights (decay 0.9999): the
average smooths the noise of DP-SGD at no privacy cost (post-processing of released iterates). The average is
updated once per optimizer step that changed the weights (not on the virtual steps of DP, which Lightning
counts as steps, nor within gradient accumulation), with the warm-up
``decay_t = min(decay, (1 + t) / (10 + t))`` after ``t`` updates, so early averages do not hold the random
initialisation. Validation and test run with the EMA weights swapped in; checkpoints hold them as the model's
``state_dict`` (what a later ``test``/``predict`` loads), and the raw training weights in the callback state, so
resuming continues training from the raw weights and the average from where it was.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override


class EMAWeights(Callback):
    """Exponential moving average of the trainable parameters; evaluation and checkpoints use it.

    Args:
        decay: The EMA decay (0.9999 in Berrada et al. 2023 and De et al. 2022).
        warmup: Use ``min(decay, (1 + t) / (10 + t))`` after ``t`` updates instead of ``decay`` from the start.
        evaluate_with_ema: Swap the EMA weights in for validation and test (else only checkpoints hold them).
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, evaluate_with_ema: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMAWeights: decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.evaluate_with_ema = evaluate_with_ema
        self.updates = 0
        self.ema: dict[str, Tensor] = {}  # parameter name -> average (trainable parameters only)
        self._module: L.LightningModule | None = None
        self._backup: dict[str, Tensor] | None = None  # raw training weights while the EMA is swapped in
        self._last_step: int | None = None
        self._restored: dict[str, Tensor] | None = None  # raw training weights from a checkpoint, until fit starts

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def _params(self, pl_module: L.LightningModule) -> dict[str, Tensor]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._module = pl_module
        params = self._params(pl_module)
        if not params:
            raise ValueError("EMAWeights: the model has no trainable parameters to average")
        with torch.no_grad():
            # Resumed: the model was loaded from the checkpoint's state_dict, i.e. the EMA weights.
            self.ema = {n: p.detach().clone() for n, p in params.items()}
            if self._restored is not None:
                missing = sorted(set(params) - set(self._restored))
                if missing:
                    raise ValueError(f"EMAWeights: the checkpoint has no training weights for {missing[:5]}")
                for n, p in params.items():
                    p.copy_(self._restored[n].to(p.device))
                self._restored = None
        self._last_step = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if trainer.global_step == self._last_step:
            return  # no optimizer step on this batch (gradient accumulation)
        self._last_step = trainer.global_step
        if any(getattr(opt, "_is_last_step_skipped", False) for opt in trainer.optimizers):
            return  # a DP optimizer's virtual step: gradients accumulated, weights unchanged (Opacus' skip flag)
        decay = self.current_decay()
        with torch.no_grad():
            for n, p in self._params(pl_module).items():
                self.ema[n].mul_(decay).add_(p.detach(), alpha=1.0 - decay)
        self.updates += 1

    # ---------------------------------------------------------------- evaluation with the EMA weights
    def _swap_in(self, pl_module: L.LightningModule) -> None:
        if not (self.evaluate_with_ema and self.ema) or self._backup is not None:
            return
        params = self._params(pl_module)
        with torch.no_grad():
            self._backup = {n: p.detach().clone() for n, p in params.items()}
            for n, p in params.items():
                p.copy_(self.ema[n])

    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self._backup is None:
            return
        with torch.no_grad():
            for n, p in self._params(pl_module).items():
                p.copy_(self._backup[n])
        self._backup = None

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._swap_out(pl_module)

    # ---------------------------------------------------------------- checkpoints
    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if self.ema and isinstance(state, dict):
            for n, t in self.ema.items():
                if n in state:
                    state[n] = t.detach().clone()

    @override
    def state_dict(self) -> dict[str, Any]:
        training: dict[str, Tensor] = {}
        if self._module is not None and self.ema:
            source = self._backup or {n: p.detach() for n, p in self._params(self._module).items()}
            training = {n: t.clone() for n, t in source.items()}
        return {"decay": self.decay, "updates": self.updates, "training_weights": training}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict["updates"])
        self._restored = dict(state_dict["training_weights"]) or None


__all__ = ["EMAWeights"]
