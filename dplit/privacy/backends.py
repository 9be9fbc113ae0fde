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

from typing import Any, ClassVar

import torch
from opacus.grad_sample.utils import prepare_module
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from dplit.privacy import grad_samplers  # noqa: F401  (registers dplit's Opacus rules)
from dplit.privacy.bookkeeping import BookKeeping
from dplit.privacy.config import PrivacyConfig
from dplit.privacy.coverage import RepeatedUseGuard
from dplit.privacy.lstm_rules import GateCapture
from dplit.privacy.transformer_rules import register_opacus_rules


class UnclippedStepError(RuntimeError):
    """An optimizer step was about to use gradients that were not clipped per example."""


class PerSampleBackend:
    """Base class of the clipping backends (see the module docstring for the protocol)."""

    name: ClassVar[str]
    optimizer_family: ClassVar[str] = "hooks"
    ddp_verified: ClassVar[bool] = False
    """Tested under DDP (per-example clipping before DDP's all-reduce, noise once across ranks)."""
    mixed_precision_safe: ClassVar[bool] = False
    """Under ``bf16-mixed``: norms and clipped sums in float32 from per-example captures (see ``precision``)."""

    def __init__(self, module: nn.Module, config: PrivacyConfig) -> None:
        self.module = module
        self.config = config
        self.controller: Any = None

    def install_loss(self, pl_module: nn.Module, optimizer: Any) -> None:
        """Hook the task's criterion if this backend needs the per-example loss (base: keeps the step controller)."""
        self.controller = optimizer.dplit_controller

    def empty_batch(self) -> bool:
        """The physical batch has no rows (Poisson): the task may skip the model, nothing is clipped, noise only."""
        return bool(getattr(self.controller, "empty", False))

    def begin_batch(self) -> None:
        """A new physical batch starts (before its forward pass); no-op by default."""

    def check_loss(self, loss: Any) -> None:
        """Refuse a training loss this backend cannot clip correctly (no-op by default)."""

    def after_backward(self) -> None:
        """Finish clipping after ``loss.backward()`` (no-op by default)."""

    def assert_clipped(self, optimizer: Any) -> None:
        """Raise ``UnclippedStepError`` unless the gradients of this step were clipped per example."""
        raise NotImplementedError

    @torch.no_grad()
    def per_example_norms(self, optimizer: Any) -> torch.Tensor | None:
        """Pre-clipping per-example gradient norms ``[B]`` (diagnostics only: NOT differentially private)."""
        return None

    def detach(self) -> None:
        """Remove every hook from the model."""


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


class GhostLossError(RuntimeError):
    """The training loss under ghost clipping is not exactly the per-example loss of ``self.criterion``."""


_GHOST_LOSS_HELP = (
    "Under `grad_sample_mode: ghost` the training loss must be exactly `self.criterion(...)` (mean reduction): "
    "ghost clipping computes each example's gradient norm from that loss alone, so any other term (a penalty on "
    "the weights, a batch-level term, an auxiliary loss) would reach the update unclipped. Put weight penalties in "
    "the optimizer's `weight_decay`, or use `grad_sample_mode: hooks` (which clips whatever per-example loss the "
    "task computes)."
)


class GhostLoss(DPTensorFastGradientClipping):
    """Ghost clipping's per-example loss; arithmetic other than scaling by a Python number is refused."""

    def _scaled(self, factor: float) -> GhostLoss:
        return GhostLoss(self.module, self.optimizer, self.loss_per_sample * factor, self.loss_reduction)

    def __truediv__(self, other: Any) -> GhostLoss:
        if isinstance(other, int | float) and other != 0:
            return self._scaled(1.0 / other)
        raise GhostLossError(_GHOST_LOSS_HELP)

    def __mul__(self, other: Any) -> GhostLoss:
        if isinstance(other, int | float):
            return self._scaled(float(other))
        raise GhostLossError(_GHOST_LOSS_HELP)

    __rmul__ = __mul__

    def _refuse(self, *args: Any) -> Any:
        raise GhostLossError(_GHOST_LOSS_HELP)

    __add__ = __radd__ = __sub__ = __rsub__ = __neg__ = _refuse  # type: ignore[assignment]

    def backward(self) -> None:
        """Opacus' two backward passes, with the clip factors chosen by dplit's DP algorithm (checked)."""
        if len(self.loss_per_sample) == 0:
            self.loss_per_sample.sum().backward()  # an empty Poisson batch: zero gradients, the noise still comes
            return
        self.loss_per_sample.mean(dim=0).backward(retain_graph=True)  # hooks: per-example norms
        self.optimizer.zero_grad()
        norms = self.module.get_norm_sample()  # [B]
        controller = getattr(self.optimizer, "dplit_controller", None)
        if controller is None:
            raise UnclippedStepError("ghost clipping: the DP optimizer has no step controller")
        if controller.rows_per_unit(len(norms)) != 1:
            raise GhostLossError(
                "ghost clipping computes one norm per row and cannot combine the K rows of a privacy unit before "
                "clipping (the unit's norm needs cross terms between its rows, which Opacus' norm samplers do not "
                "form); use `grad_sample_mode: bookkeeping`, `hooks` or `functorch` for tasks with several rows per "
                "example."
            )
        coef = controller.factors(norms)
        self.module.disable_hooks()
        (coef.to(self.loss_per_sample.device) * self.loss_per_sample).sum().backward()
        self.module.enable_hooks()


class Ghost(PerSampleBackend):
    """Opacus ghost clipping: per-example norms without per-example gradients, then a second, reweighted backward."""

    name = "ghost"
    optimizer_family = "ghost"
    ddp_verified = True  # the second backward's clipped sum is all-reduced by the DP optimizer

    def __init__(self, module: nn.Module, config: PrivacyConfig) -> None:
        super().__init__(module, config)
        self.gates = GateCapture(module)
        register_opacus_rules(module)
        self.hooks = prepare_module(
            module,
            grad_sample_mode="ghost",
            wrap_model=False,
            batch_first=True,
            loss_reduction="mean",
            strict=True,
            max_grad_norm=config.max_grad_norm,
        )
        self.guard = RepeatedUseGuard(module, "ghost")  # a layer run twice would get per-use norms
        self._criterion: nn.Module | None = None
        self._handles: list[Any] = []
        self._reduction: str | None = None
        self._optimizer: Any = None
        self.checked = 0

    def install_loss(self, pl_module: nn.Module, optimizer: Any) -> None:
        criterion = getattr(pl_module, "criterion", None)
        if not isinstance(criterion, nn.Module) or getattr(criterion, "reduction", None) != "mean":
            raise GhostLossError(
                f"`grad_sample_mode: ghost` needs {type(pl_module).__name__}.criterion to be an nn.Module loss with "
                "`reduction='mean'` (it is called with reduction 'none' to get the per-example losses)."
            )
        self._criterion, self._optimizer = criterion, optimizer
        super().install_loss(pl_module, optimizer)
        self._handles = [
            criterion.register_forward_pre_hook(self._pre_hook),
            criterion.register_forward_hook(self._post_hook),
        ]

    def begin_batch(self) -> None:
        self.guard.reset()

    def _active(self) -> bool:
        return torch.is_grad_enabled() and self.module.training

    def _pre_hook(self, criterion: nn.Module, args: Any) -> None:
        if self._active():
            self._reduction = criterion.reduction  # type: ignore[assignment]
            criterion.reduction = "none"  # type: ignore[assignment]

    def _post_hook(self, criterion: nn.Module, args: Any, output: torch.Tensor) -> Any:
        if self._reduction is None:
            return None
        criterion.reduction, self._reduction = self._reduction, None  # type: ignore[assignment]
        if output.dim() != 1:
            raise GhostLossError(
                f"ghost clipping needs one loss per example; {type(criterion).__name__} with reduction 'none' "
                f"returned shape {tuple(output.shape)}. Use `grad_sample_mode: hooks` for this loss."
            )
        return GhostLoss(self.hooks, self._optimizer, output, "mean")

    def check_loss(self, loss: Any) -> None:
        if not isinstance(loss, GhostLoss) and not self.empty_batch():
            raise GhostLossError(_GHOST_LOSS_HELP + f" The loss given to backward was a {type(loss).__name__}.")
        self.checked += 1

    def assert_clipped(self, optimizer: Any) -> None:
        if self.checked == 0:
            raise UnclippedStepError(
                "DifferentialPrivacy (ghost clipping): the training loss was not computed through `self.criterion`, "
                "so gradients were not clipped. Compute the loss with `self.criterion(...)`."
            )
        self.checked = 0

    @torch.no_grad()
    def per_example_norms(self, optimizer: Any) -> torch.Tensor | None:
        try:
            return self.hooks.per_sample_gradient_norms.detach()
        except (AttributeError, ValueError):
            return None

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.guard.remove()
        self.hooks.remove_hooks()
        self.gates.remove()


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
