"""The per-sample clipping backend protocol (see :mod:`dplit.privacy.backends` for the table of its methods)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from dplit.privacy.config import PrivacyConfig


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


__all__ = ["PerSampleBackend", "UnclippedStepError"]
