"""Ghost clipping as a dplit backend (Opacus' fast gradient clipping): per-example norms from a first backward, the
clipped sum from a second one through the task's ``criterion`` (:class:`GhostLoss`)."""

from __future__ import annotations

from typing import Any

import torch
from opacus.grad_sample.utils import prepare_module
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from dplit.privacy import grad_samplers  # noqa: F401  (registers dplit's Opacus rules)
from dplit.privacy.backend_base import PerSampleBackend, UnclippedStepError
from dplit.privacy.config import PrivacyConfig
from dplit.privacy.coverage import RepeatedUseGuard
from dplit.privacy.lstm_rules import GateCapture
from dplit.privacy.transformer_rules import register_opacus_rules


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


__all__ = ["Ghost", "GhostLoss", "GhostLossError"]
