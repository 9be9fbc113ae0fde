"""Per-sample clipping backends behind one protocol: hooks, functorch, ghost clipping, book-keeping.

A backend attaches to the model in place (Lightning keeps training the LightningModule itself), makes every
example's gradient clipped to ``max_grad_norm`` before the DP optimizer adds noise, checks on every step that it
did, exposes the pre-clipping per-example norms (diagnostics only) and detaches. The callback drives it through
this interface and never branches on a mode name:

=====================  ==========================================================================================
``attach``             ``Backend(module, config)``: hooks on the model
``install_loss``       wrap the task's ``criterion`` if the backend needs the loss (ghost), leaving it in state_dict
``begin_batch``        a physical batch starts (ghost: count layer uses, a second use is refused)
``check_loss``         refuse a training loss the backend cannot clip correctly (``on_before_backward``)
``after_backward``     finish clipping after ``loss.backward()`` (book-keeping writes the clipped sum)
``assert_clipped``     raise before the optimizer step unless this step's gradients were clipped
``per_example_norms``  pre-clipping norms ``[B]`` of the last physical batch (NOT differentially private)
``detach``             remove every hook, give the criterion back
=====================  ==========================================================================================

``optimizer_family`` tells the engine which Opacus optimizer family applies: ``hooks`` (the optimizer clips
``p.grad_sample``) or ``ghost`` (``p.grad`` already holds the clipped sum).
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.grad_sample.utils import prepare_module
from torch import nn

from dplit.privacy import grad_samplers  # noqa: F401  (registers dplit's Opacus rules)
from dplit.privacy.backend_base import PerSampleBackend, UnclippedStepError
from dplit.privacy.bookkeeping import BookKeeping
from dplit.privacy.config import PrivacyConfig
from dplit.privacy.ghost_backend import Ghost, GhostLoss, GhostLossError
from dplit.privacy.lstm_rules import GateCapture
from dplit.privacy.transformer_rules import register_opacus_rules


class OpacusHooks(PerSampleBackend):
    """Opacus per-sample gradients (``p.grad_sample``) by module hooks; the DP optimizer clips them."""

    name = "hooks"
    ddp_verified = True
    mixed_precision_safe = True  # the DP optimizer widens grad_sample before norms and sums

    def __init__(self, module: nn.Module, config: PrivacyConfig) -> None:
        super().__init__(module, config)
        self.gates = GateCapture(module)  # dplit LSTM layers: gate gradients for the per-example rule
        register_opacus_rules(module)  # GPT-2 Conv1D, LlamaRMSNorm: rules instead of the torch.func fallback
        self.hooks = prepare_module(
            module, grad_sample_mode=self.name, wrap_model=False, batch_first=True, loss_reduction="mean", strict=True
        )

    def assert_clipped(self, optimizer: Any) -> None:
        missing = [i for i, p in enumerate(optimizer.params) if getattr(p, "grad_sample", None) is None]
        if missing and not self.empty_batch():
            raise UnclippedStepError(
                f"DifferentialPrivacy: {len(missing)} parameters have no per-sample gradients before the optimizer "
                "step (the forward pass bypassed the hooked module), so the step would not be private."
            )

    @torch.no_grad()
    def per_example_norms(self, optimizer: Any) -> torch.Tensor | None:
        grads: list[torch.Tensor] = []
        for p in optimizer.params:
            g = getattr(p, "grad_sample", None)
            if not isinstance(g, torch.Tensor):
                return None
            grads.append(g)
        if not grads:
            return None
        # each g: [B, *param.shape]; the per-example norm is taken over all parameters jointly
        return torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1).norm(dim=1)

    def detach(self) -> None:
        self.hooks.remove_hooks()
        self.gates.remove()


class Functorch(OpacusHooks):
    """Opacus per-sample gradients by ``torch.func.vmap`` over each trainable module."""

    name = "functorch"


class BookKeepingBackend(PerSampleBackend):
    """dplit's book-keeping clipping: one backward pass, then the clipped sums written into ``p.grad``."""

    name = "bookkeeping"
    optimizer_family = "ghost"
    ddp_verified = True  # clipped sums written locally, all-reduced by the DP optimizer
    mixed_precision_safe = True  # captures widened to float32 before norms and clipped sums

    def __init__(self, module: nn.Module, config: PrivacyConfig) -> None:
        super().__init__(module, config)
        self.bk = BookKeeping(module, config.max_grad_norm)
        self._seen = 0

    def install_loss(self, pl_module: nn.Module, optimizer: Any) -> None:
        super().install_loss(pl_module, optimizer)
        controller = optimizer.dplit_controller  # the DP algorithm's factors, unit checks
        self.bk.clip_factors = controller.factors
        self.bk.rows_per_unit = controller.rows_per_unit
        algorithm = controller.algorithm
        if algorithm.elementwise_factors:  # each unit's factor from its own norm and group: chunks may ask

            def chunk_factors(norms: torch.Tensor, units: slice, total: int) -> torch.Tensor:
                groups = controller.groups
                return algorithm.clip_factors(
                    norms, groups[units] if groups is not None and len(groups) == total else None
                )

            self.bk.chunk_factors = chunk_factors

    def after_backward(self) -> None:
        self.bk.clip_into_grad(empty=self.empty_batch())  # p.grad := sum of clipped per-example gradients

    def assert_clipped(self, optimizer: Any) -> None:
        if self.bk.batches_clipped == self._seen:
            raise UnclippedStepError("DifferentialPrivacy (book-keeping): the gradients of this step were not clipped.")
        self._seen = self.bk.batches_clipped

    def per_example_norms(self, optimizer: Any) -> torch.Tensor | None:
        return self.bk.last_norms

    def detach(self) -> None:
        self.bk.remove_hooks()


BACKENDS: dict[str, type[PerSampleBackend]] = {
    "hooks": OpacusHooks,
    "functorch": Functorch,
    "ghost": Ghost,
    "bookkeeping": BookKeepingBackend,
}


def register_backend(name: str, cls: type[PerSampleBackend]) -> None:
    """Registers a clipping backend under ``name`` (refuses to silently replace a different class)."""
    if BACKENDS.get(name, cls) is not cls:
        raise ValueError(f"backend name {name!r} is already registered to {BACKENDS[name].__name__}")
    BACKENDS[name] = cls


def make_backend(module: nn.Module, config: PrivacyConfig) -> PerSampleBackend:
    """Attach the configured backend (``config.grad_sample_mode``) to ``module``."""
    return BACKENDS[config.grad_sample_mode](module, config)


__all__ = [
    "BACKENDS",
    "BookKeepingBackend",
    "Functorch",
    "Ghost",
    "GhostLoss",
    "GhostLossError",
    "OpacusHooks",
    "PerSampleBackend",
    "UnclippedStepError",
    "make_backend",
    "register_backend",
]
