"""Per-group training diagnostics, and the small interface through which they read per-example gradients.

A callback that computes per-example gradients (the DifferentialPrivacy callback does) exposes them by
implementing :class:`PerExampleGradients`; :class:`~dplit.callbacks.SubgroupMetrics` finds it among the trainer's
callbacks with :func:`find_per_example_gradients` and never imports it. The diagnostics read the raw per-example
gradient norms and losses of the training data: they are NOT differentially private.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

log = logging.getLogger(__name__)


@runtime_checkable
class PerExampleGradients(Protocol):
    """What per-group gradient diagnostics need from a callback that computes per-example gradients."""

    def per_sample_grad_norms(self) -> Tensor | None:
        """Pre-clipping per-example gradient norms [B] of the current batch (between backward and step), or None."""
        ...

    @property
    def clip_bound(self) -> float:
        """The per-example clipping bound C: an example counts as clipped when its norm exceeds it."""
        ...


def find_per_example_gradients(callbacks: Iterable[Any]) -> PerExampleGradients | None:
    """The first callback implementing :class:`PerExampleGradients`, or None."""
    found = [cb for cb in callbacks if isinstance(cb, PerExampleGradients)]
    if len(found) > 1:
        log.warning(
            "Several callbacks expose per-example gradients (%s); diagnostics read the first.",
            ", ".join(type(cb).__name__ for cb in found),
        )
    return found[0] if found else None


class GroupDiagnostics:
    """Per-group sums over one training epoch: pre-clip gradient norm, fraction clipped, loss.

    Logged names: ``diag/grad_norm/group=<name>``, ``diag/frac_clipped/group=<name>``, ``diag/loss/group=<name>``
    (means over the epoch's training examples of that group; a group with no examples is left out).

    Args:
        group_names: Names of the (primary attribute's) groups, index = id.
    """

    def __init__(self, group_names: list[str]) -> None:
        self.group_names = list(group_names)
        self._sums: dict[str, Tensor] = {}

    def add_gradients(self, norms: Tensor, clip_bound: float, group: Tensor) -> None:
        """Add one batch's pre-clip per-example norms [B] with group ids [B]."""
        clipped = (norms > clip_bound).double()
        self._add({"norm": norms.double(), "clipped": clipped, "count": torch.ones_like(clipped)}, group)

    def add_losses(self, loss: Tensor, group: Tensor) -> None:
        """Add one batch's per-example training losses [B] with group ids [B]."""
        self._add({"loss": loss.double(), "loss_count": torch.ones_like(loss, dtype=torch.double)}, group)

    def _add(self, values: dict[str, Tensor], group: Tensor) -> None:
        num_groups = len(self.group_names)
        for key, v in values.items():
            g = group.to(v.device)
            sums = torch.zeros(num_groups, dtype=torch.double, device=v.device).index_add_(0, g, v.detach())
            self._sums[key] = self._sums.get(key, torch.zeros_like(sums)) + sums

    def __bool__(self) -> bool:
        return bool(self._sums)

    def compute(self, reduce: Any = None) -> dict[str, float]:
        """The epoch's per-group means under the logged names; resets the sums.

        Args:
            reduce: ``tensor -> tensor`` summing over processes (e.g. ``trainer.strategy.reduce`` with ``"sum"``).
        """
        sums = {k: (reduce(v) if reduce is not None else v) for k, v in self._sums.items()}
        self._sums = {}
        zeros = torch.zeros(len(self.group_names))
        flat: dict[str, float] = {}
        for i, name in enumerate(self.group_names):
            count = float(sums.get("count", zeros)[i])
            if count > 0:
                flat[f"diag/grad_norm/group={name}"] = float(sums["norm"][i]) / count
                flat[f"diag/frac_clipped/group={name}"] = float(sums["clipped"][i]) / count
            loss_count = float(sums.get("loss_count", zeros)[i])
            if loss_count > 0:
                flat[f"diag/loss/group={name}"] = float(sums["loss"][i]) / loss_count
        return flat


__all__ = ["GroupDiagnostics", "PerExampleGradients", "find_per_example_gradients"]
