"""DP algorithms: how each example's gradient is weighted before the noise, and what each step spends.

An algorithm sees, for every physical batch, the pre-clipping per-unit gradient norms and the units' group ids (the
batch contract ``(x, y, group)``); it returns per-unit factors ``w_i`` whose weighted gradients ``w_i g_i`` all have
norm at most ``sensitivity`` (checked on every batch: a violation stops training before anything is released). On
each release it declares the privacy events the step spent (the noisy gradient sum, and any extra noisy statistic
it releases, e.g. a noisy count of clipped examples per group); the accountant composes them, and
``target_epsilon`` calibration uses the same list. The noise on the gradient sum has std
``noise_multiplier * sensitivity``.

DP-SGD (Abadi et al. 2016) is the first algorithm: ``w_i = min(1, C / ||g_i||)``, one subsampled Gaussian per step.
Register more with :func:`register_algorithm` (as Opacus registers accountants).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from dplit.privacy.accounting import Event


class SensitivityError(RuntimeError):
    """An algorithm returned factors that let some example's weighted gradient exceed the sensitivity."""


class DPAlgorithm:
    """Base class: DP-SGD's flat clipping. Subclasses override ``clip_factors`` / ``events`` / ``on_release``.

    Args:
        max_grad_norm: the clipping bound C.
        noise_multiplier: sigma of the gradient noise (relative to ``sensitivity``).
        sample_rate: Poisson sampling rate q of units.
        num_groups: number of subgroup ids the batches carry (0 if unknown).
    """

    name: ClassVar[str] = "dpsgd"

    def __init__(self, max_grad_norm: float, noise_multiplier: float, sample_rate: float, num_groups: int = 0) -> None:
        self.max_grad_norm = max_grad_norm
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.num_groups = num_groups

    @property
    def sensitivity(self) -> float:
        """Bound on every unit's weighted gradient norm (the noise std is ``noise_multiplier`` times this)."""
        return self.max_grad_norm

    def clip_factors(self, norms: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        """Per-unit factors ``[B]`` for pre-clipping norms ``[B]`` (and group ids ``[B]``, when the batch has them)."""
        return (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)

    def events(self) -> list[Event]:
        """Privacy events one released step spends under Poisson sampling (the gradient sum: one Gaussian)."""
        return [(self.noise_multiplier, self.sample_rate)]

    def on_release(self) -> dict[str, float]:
        """Update any state after a release (e.g. an adapted clip bound); returns metrics to log."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def checked_factors(algorithm: DPAlgorithm, norms: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """The algorithm's factors, refused unless every weighted norm is within its sensitivity."""
    factors = algorithm.clip_factors(norms, groups)
    if factors.shape != norms.shape:
        raise SensitivityError(f"{algorithm.name}: {factors.shape[0]} clip factors for {norms.shape[0]} units")
    weighted = factors.double() * norms.double()
    if len(norms) and (
        not torch.isfinite(factors).all() or (factors < 0).any() or weighted.max() > algorithm.sensitivity * (1 + 1e-5)
    ):
        raise SensitivityError(
            f"{algorithm.name}: a unit's weighted gradient norm {float(weighted.max()):.6g} exceeds the sensitivity "
            f"{algorithm.sensitivity:.6g}; nothing of this step is released."
        )
    return factors


ALGORITHMS: dict[str, type[DPAlgorithm]] = {"dpsgd": DPAlgorithm}


def register_algorithm(name: str, cls: type[DPAlgorithm]) -> None:
    """Registers a DP algorithm under ``name`` (refuses to silently replace a different class)."""
    if ALGORITHMS.get(name, cls) is not cls:
        raise ValueError(f"algorithm name {name!r} is already registered to {ALGORITHMS[name].__name__}")
    ALGORITHMS[name] = cls


def make_algorithm(name: str, **kwargs: Any) -> DPAlgorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"`algorithm` must be one of {', '.join(sorted(ALGORITHMS))}; got {name!r}")
    return ALGORITHMS[name](**kwargs)


__all__ = [
    "ALGORITHMS",
    "DPAlgorithm",
    "SensitivityError",
    "checked_factors",
    "make_algorithm",
    "register_algorithm",
]
